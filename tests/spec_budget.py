"""AdaLoRA and gradient-selected sparse specs for the shared invariant matrix.

Sparse selection needs data at attach time: each model gets one batch of its test input and a
loss (mean square of the output, as the matrix's own training check uses)."""
from conftest import MODELS


def _selection_data(model_name):
    make_input, output = MODELS[model_name][1], MODELS[model_name][2]
    return {"batches": [make_input()], "loss_fn": lambda model, batch: output(model(*batch)).float().pow(2).mean()}


SPECS = {
    # conv net: AdaLoRA adapts linear layers only, so it takes the head there.  alpha=64: the matrix
    # perturbs every tensor by ~0.05, and ΔW = s·PΛQ is cubic in that; s = 64/4 makes it visible.
    "adalora": ("adalora", {"r": 4, "target_r": 2, "alpha": 64.0},
                {"conv": {"targets": ["head"], "modules_to_save": None}}),
    "sparse_gps": ("sparse", {"budget": 0.05, "rule": "gps"}, {m: _selection_data(m) for m in MODELS}),
    "sparse_fisher": ("sparse", {"budget": 300, "rule": "fisher"}, {m: _selection_data(m) for m in MODELS}),
}
