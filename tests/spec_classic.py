"""Specs of the classic methods (BitFit, LayerNorm tuning, IA3, VeRA, bottleneck adapters) for the
shared invariant matrix (test_invariants.py)."""

SPECS = {
    "bitfit": ("bitfit", {}, {"llama": {"add_missing": True}}),
    "bitfit_attn_missing": ("bitfit", {"parts": ["attention"], "add_missing": True},
                            {"mlp": None, "conv": None}),
    "ln": ("ln", {}, {"mlp": None, "conv": None}),
    "ia3": ("ia3", {}, {"mlp": {"targets": ["fc1", "fc2"], "feedforward": ["fc2"]},
                        "conv": {"targets": ["c1", "c2", "c3"], "feedforward": ["c2", "c3"]}}),
    "vera": ("vera", {"r": 8}, {"mlp": {"targets": ["fc1", "fc2"]}, "conv": {"targets": ["head"], "modules_to_save": None}}),
    "vera_dropout": ("vera", {"r": 4, "dropout": 0.1, "targets": "all-linear", "projection_prng_key": 3},
                     {"conv": {"targets": ["head"], "modules_to_save": None}}),
    "adapter_houlsby": ("adapter", {}, {"mlp": {"targets": ["fc1", "fc2"]}, "conv": {"targets": ["c1", "c3"]}}),
    "adapter_pfeiffer": ("adapter", {"placement": "pfeiffer", "bottleneck": 3, "activation": "gelu"},
                         {"mlp": {"targets": ["fc2"]}, "conv": {"targets": ["c2"]}}),
    "adapter_parallel": ("adapter", {"placement": "parallel", "dropout": 0.1},
                         {"mlp": {"targets": ["fc1"]}, "conv": {"targets": ["c1", "c3"]}}),
}
# bottleneck adapters apply a non-linearity: never mergeable (test_adapter.py checks the refusal)
SKIP: dict[str, set[str]] = {s: {"merge"} for s in ("adapter_houlsby", "adapter_pfeiffer", "adapter_parallel")}
