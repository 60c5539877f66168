"""One test per promise of docs/security.md: nothing deltatune loads can run code, names and paths
cannot leave their directory, remote code and downloads are off unless asked, the server's
mutating endpoints need a token."""
from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path

import pytest
import torch

import deltatune as dt
from conftest import tiny_mlp
from deltatune import safety
from deltatune.storage.adapter import _manifest_digest

SRC = Path(dt.__file__).parent


class Payload:
    """Unpickling this runs ``touch MARKER``: what an attacker puts in a .bin/.pt file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def adapter_dir(tmp_path) -> Path:
    d = dt.save(dt.attach(tiny_mlp(), "lora", targets=["fc1"]), tmp_path / "a")
    (d / "deltatune.json").unlink()
    return d


# --------------------------------------------------------------------------- 1. no pickles

def test_pickle_in_legacy_adapter_bin_is_refused_and_not_run(tmp_path):
    d = adapter_dir(tmp_path)
    (d / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"base_model.model.fc1.lora_A.weight": torch.zeros(8, 16), "x": Payload(marker)},
               d / "adapter_model.bin")
    with pytest.raises(dt.DeltaError, match="adapter_model.bin: refused"):
        dt.load(tiny_mlp(), d)
    assert not marker.exists(), "the pickle payload ran"


def test_plain_legacy_bin_still_loads(tmp_path):
    """The refusal is about code, not the format: a plain tensor .bin (peft's legacy) loads."""
    src = dt.attach(tiny_mlp(), "lora", targets=["fc1"])
    d = adapter_dir(tmp_path)
    (d / "adapter_model.safetensors").unlink()
    sd = {"base_model.model." + k: v.detach() for k, v in dt.adapter_tensors(src, "default").items()}
    torch.save(sd, d / "adapter_model.bin")
    m = dt.load(tiny_mlp(), d)
    assert set(dt.adapter_tensors(m, "default")) == set(dt.adapter_tensors(src, "default"))


def test_pickle_in_training_checkpoint_is_refused_and_not_run(tmp_path):
    from deltatune.train.trainer import TrainConfig, Trainer

    marker = tmp_path / "pwned"
    ck = tmp_path / "run" / "checkpoints"
    (ck / "step-0000001").mkdir(parents=True)
    torch.save({"step": 1, "x": Payload(marker)}, ck / "step-0000001" / "trainer_state.pt")
    (ck / "latest").write_text("step-0000001")
    model = dt.attach(tiny_mlp(), "lora", targets=["fc1"])
    feats = [{"input_ids": [1, 2, 3], "labels": 0}, {"input_ids": [4, 5], "labels": 1}]
    tr = Trainer(model, feats, TrainConfig(max_steps=2, progress=False), output_dir=tmp_path / "run",
                 loss_fn=lambda m, b: m(b["input_ids"]).sum())
    with pytest.raises(dt.DeltaError, match="trainer_state.pt: unreadable checkpoint"):
        tr.train(resume=True)
    assert not marker.exists(), "the pickle payload ran"


def test_npz_with_objects_is_refused(tmp_path):
    import numpy as np

    from deltatune.data.examples import load_images

    np.savez(tmp_path / "x.npz", images=np.array([Payload(tmp_path / "pwned")] * 2, dtype=object),
             labels=np.array([0, 1]))
    with pytest.raises(dt.DeltaError, match="x.npz: refused"):
        load_images(tmp_path / "x.npz")
    assert not (tmp_path / "pwned").exists()


def test_yaml_config_cannot_construct_objects(tmp_path):
    from typer.testing import CliRunner

    from deltatune import cli

    marker = tmp_path / "pwned"
    (tmp_path / "c.yaml").write_text(f'lr: !!python/object/apply:os.system ["touch {marker}"]\n')
    r = CliRunner().invoke(cli.app, ["train", "--model", "m", "--data", "d.csv", "--config", str(tmp_path / "c.yaml")])
    assert r.exit_code == 2 and "not valid YAML" in " ".join(re.sub(r"[│╭╮╰╯─]", " ", r.output).split())
    assert not marker.exists()


UNSAFE = {
    r"torch\.load\((?![^)]*weights_only=True)": "torch.load without weights_only=True",
    r"\bpickle\.loads?\(": "pickle.load",
    r"\byaml\.load\(": "yaml.load (use yaml.safe_load)",
    r"allow_pickle=True": "numpy allow_pickle=True",
    r"(?<![\w.])eval\(|(?<![\w.])exec\(": "eval/exec",
    r"shell=True": "subprocess with shell=True",
    r"trust_remote_code=True": "trust_remote_code=True hard-coded",
}


def test_source_has_no_unsafe_loading():
    """A regression guard over every module of the package."""
    found = []
    for f in sorted(SRC.rglob("*.py")):
        text = f.read_text(encoding="utf-8")
        for pat, what in UNSAFE.items():
            for m in re.finditer(pat, text):
                line = text[: m.start()].count("\n") + 1
                found.append(f"{f.relative_to(SRC)}:{line}: {what}")
    assert not found, "\n".join(found)


# --------------------------------------------------------------------------- 2. remote code off

def test_trust_remote_code_defaults_to_false():
    from deltatune import cli, models
    from deltatune.app import run, tools

    assert inspect.signature(models.load_model).parameters["trust_remote_code"].default is False
    assert run.RunOptions.__dataclass_fields__["trust_remote_code"].default is False
    for fn in (tools.load_with_adapter, tools.merge_adapter, tools.evaluate_adapter):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False
    for cmd in cli.app.registered_commands:
        p = inspect.signature(cmd.callback).parameters.get("trust_remote_code")
        if p is not None:
            assert p.default.default is False, cmd.name


def test_model_with_custom_code_is_refused_and_its_code_not_run(tmp_path):
    """A model directory whose config asks for its own Python code (auto_map) is refused without
    --trust-remote-code, and that code is never imported."""
    from deltatune.models import load_model

    marker = tmp_path / "pwned"
    d = tmp_path / "evil-model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForSequenceClassification": "evil.EvilModel"}}))
    (d / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                               "from transformers import PretrainedConfig\n"
                               "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    with pytest.raises(dt.DeltaError, match="needs custom code.*--trust-remote-code"):
        load_model(str(d), "classify", ["a", "b"])
    assert not marker.exists(), "the model's own code was imported"


def test_no_downloads(monkeypatch):
    """An id that is not in the local cache fails at once with a message, without the network."""
    import socket

    from deltatune.models import load_model

    tried = []

    def no_network(self, addr, *a, **k):
        tried.append(addr)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(dt.DeltaError, match="model-that-is-not-cached-xyz"):
        load_model("some-org/model-that-is-not-cached-xyz", "classify", ["a", "b"])
    assert tried == [], f"deltatune tried to connect to {tried}"


# --------------------------------------------------------------------------- 3. names and paths

@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".", "/etc", "a b", "", "x" * 65, "a\x00b", "ä", None, 3, "a\n"])
def test_adapter_names_cannot_be_paths(name):
    with pytest.raises(dt.DeltaError, match="is invalid"):
        dt.attach(tiny_mlp(), "lora", name=name)


def test_safe_join(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "link").symlink_to(tmp_path)  # a link that points outside the root
    assert safety.safe_join(root, "sub", "ok") == (root / "sub" / "ok").resolve()
    for parts in (["../x"], ["sub", "../../x"], ["/etc/passwd"], ["link", "x"], ["a\x00"], [""], ["C:\\x"]):
        with pytest.raises(dt.DeltaError):
            safety.safe_join(root, *parts)


def test_manifest_cannot_point_outside_the_adapter(tmp_path):
    """A manifest listing ../../secret must not make the verifier read (or report on) that file."""
    d = dt.save(dt.attach(tiny_mlp(), "lora", targets=["fc1"]), tmp_path / "a")
    man = json.loads((d / "deltatune.json").read_text())
    man["files"]["../secret"] = {"sha256": "0" * 64, "bytes": 1}
    man["manifest_sha256"] = _manifest_digest(man)  # a consistent (but malicious) manifest
    (d / "deltatune.json").write_text(json.dumps(man))
    (tmp_path / "secret").write_text("s")
    with pytest.raises(dt.DeltaError, match="bad entry for '../secret'"):
        dt.load(tiny_mlp(), d)


def test_server_names_stay_in_the_adapter_directory(tmp_path):
    pytest.importorskip("fastapi")
    from deltatune.serve.app import _adapter_path
    from deltatune.serve.engine import RequestError

    adir = tmp_path / "adapters"
    dt.save(dt.attach(tiny_mlp(), "lora", targets=["fc1"]), adir / "ok")
    dt.save(dt.attach(tiny_mlp(), "lora", targets=["fc1"]), tmp_path / "outside")
    (adir / "escape").symlink_to(tmp_path / "outside")
    assert _adapter_path(adir, "ok") == (adir / "ok").resolve()
    with pytest.raises(RequestError) as e:
        _adapter_path(adir, "escape")
    assert e.value.status == 400


def test_adapter_files_are_regular_files_inside_their_directory(tmp_path):
    """A FIFO (a read would block forever), a link to /dev/zero (endless) or to any file outside the
    adapter directory is refused without being read, and the refusal says nothing about the target;
    a link between files of the same directory still loads."""
    def weights_replaced(name, make):
        d = adapter_dir(tmp_path / name)
        w = d / "adapter_model.safetensors"
        data = w.read_bytes()
        w.unlink()
        make(w, data)
        return d

    cases = {"fifo": lambda w, data: os.mkfifo(w),
             "zero": lambda w, data: w.symlink_to("/dev/zero"),
             "etc": lambda w, data: w.symlink_to("/etc/passwd"),
             "outside": lambda w, data: ((tmp_path / "w").write_bytes(data), w.symlink_to(tmp_path / "w"))}
    for name, make in cases.items():
        with pytest.raises(dt.DeltaError, match="not a regular file|symlink pointing outside") as e:
            dt.load(tiny_mlp(), weights_replaced(name, make))
        said = str(e.value)
        assert "passwd" not in said and "bytes" not in said and "/dev" not in said and str(tmp_path / "w") not in said
    inside = weights_replaced("inside", lambda w, data: ((w.parent / "w").write_bytes(data), w.symlink_to("w")))
    dt.load(tiny_mlp(), inside)
    # the Hugging Face cache keeps files as links from snapshots/<rev>/ to the repo's blobs/: allowed
    snap = tmp_path / "models--org--lora" / "snapshots" / "abc"
    (tmp_path / "models--org--lora" / "blobs").mkdir(parents=True)
    for f in adapter_dir(tmp_path / "hub").iterdir():
        f.rename(tmp_path / "models--org--lora" / "blobs" / f.name)
        (snap / f.name).parent.mkdir(parents=True, exist_ok=True)
        (snap / f.name).symlink_to(Path("../../blobs") / f.name)
    dt.load(tiny_mlp(), snap)


# --------------------------------------------------------------------------- 4. the server

def test_server_mutations_need_a_token(tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from deltatune.serve.app import build_app

    from conftest import tiny_llama

    adir = tmp_path / "adapters"
    dt.save(dt.attach(tiny_llama(), "lora", targets=["q_proj"], name="a"), adir / "a", name="a")
    for token, headers, status in [(None, {"Authorization": "Bearer x"}, 403),  # no token set: disabled
                                   ("t", {}, 401), ("t", {"Authorization": "Bearer wrong"}, 403)]:
        app = build_app(tiny_llama(), None, adir, token=token, load_all=False)
        with TestClient(app) as c:
            assert c.post("/v1/adapters", json={"name": "a"}, headers=headers).status_code == status
            assert c.delete("/v1/adapters/a", headers=headers).status_code == status
            assert c.get("/v1/adapters").json()["loaded"] == []
    assert inspect.signature(__import__("deltatune.serve").serve.run).parameters["host"].default == "127.0.0.1"


def test_server_start_up_refuses_an_adapter_dir_linked_outside(tmp_path):
    """The rule of POST /v1/adapters (a child that is a symlink to elsewhere is refused) holds for
    the adapters loaded at start-up too, and the refusal names no server path."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from deltatune.serve.app import build_app

    from conftest import tiny_llama

    adir = tmp_path / "adapters"
    dt.save(dt.attach(tiny_llama(), "lora", targets=["q_proj"], name="a"), adir / "a", name="a")
    dt.save(dt.attach(tiny_llama(), "lora", targets=["q_proj"], name="b"), tmp_path / "outside", name="b")
    (adir / "b").symlink_to(tmp_path / "outside")
    with TestClient(build_app(tiny_llama(), None, adir)) as c:
        listing = c.get("/v1/adapters").json()
    assert [x["name"] for x in listing["loaded"]] == ["a"]
    assert "outside the adapter directory" in listing["failed"]["b"]
    assert str(tmp_path) not in str(listing)
