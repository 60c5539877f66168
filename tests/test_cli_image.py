"""`deltatune train/eval --task image-classify` end to end on a tiny ViT and an .npz of images."""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from deltatune.cli.main import app


@pytest.fixture
def vit_and_data(tmp_path):
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, num_labels=2)
    d = tmp_path / "vit"
    ViTForImageClassification(cfg).save_pretrained(d)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(d)
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 2
    # class 1 is bright, class 0 dark: learnable in a few steps
    images = (rng.uniform(0, 0.4, (40, 16, 16, 3)) + 0.5 * labels[:, None, None, None]) * 255
    np.savez(tmp_path / "imgs.npz", images=images.astype(np.uint8), labels=labels)
    return d, tmp_path / "imgs.npz"


def test_train_and_eval_image_classification(vit_and_data, tmp_path):
    vit, data = vit_and_data
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--task", "image-classify", "--model", str(vit), "--data", str(data),
                                 "--output", str(out), "--max-steps", "16", "--batch-size", "8", "--lr", "1e-2",
                                 "--no-progress", "--json"])
    assert r.exit_code == 0, (r.output, r.exception)
    m = json.loads(r.stdout)
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    after = m["after"]["accuracy"] if "after" in m else m["metrics"]["accuracy"]
    assert after >= 0.75, m
    fg = m["forgetting"]  # drift on general photos the model was not trained on
    assert fg["kind"] == "representation_drift" and 0 < fg["value"] < 2, fg
    r = CliRunner().invoke(app, ["eval", "--adapter", str(out), "--data", str(data), "--json"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "accuracy" in r.stdout
