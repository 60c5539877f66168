"""Any image classifier as a CLI base model: ``timm:NAME``, ``torchvision:NAME`` or
``package.module:factory`` (a Python callable returning an ``nn.Module``; naming one imports the
user's code, which is the user's explicit choice, like ``--trust-remote-code``).

    spec ─► builder (registry) ─► nn.Module ─► --weights FILE (every key checked) ─► head surgery
                                                                                      │
      VisionClassifier: pixel_values (B, C, S, S) ─► net ─► features (B, F) ─► classifier ─► logits (B, L)

The model's own head is replaced by ``classifier``, a fresh ``Linear(F, num_labels)``: the
``*ForImageClassification`` name and the ``classifier`` path make the library train it in full
(``targets.auto_modules_to_save``), and the pooled features are the hidden state that forgetting
compares.  The wrapper answers like a transformers model (``.logits``, ``.loss``,
``.hidden_states``, ``.config``, ``save_pretrained``), so training, evaluation, merge and
forgetting run unchanged.

BatchNorm: with an adapter attached (any PEFT method) every BatchNorm stays in eval mode while
training, so its running statistics -- base buffers that no adapter file stores -- never drift
and ``dt.disabled`` gives back the base exactly.  Full fine-tuning updates them as usual (they
are saved with the model).
"""
from __future__ import annotations

import importlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..core.delta import DeltaError, has_adapters
from ..safety import load_exact
from .images import ImageConfig, Preprocessor
from .ports import timm_twin

SPEC_FILE = "vision_model.json"  # written next to model.safetensors by save_pretrained
WEIGHTS_FILE = "model.safetensors"
FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")  # package.module:callable[.attr]


def is_vision_spec(spec: str) -> bool:
    """``timm:``/``torchvision:`` names, ``module:factory`` or a saved full run's model directory."""
    if spec.startswith(("timm:", "torchvision:")):
        return True
    p = Path(spec).expanduser()
    if p.is_dir():
        return (p / SPEC_FILE).exists()
    return bool(FACTORY.match(spec)) and not p.exists()


# --------------------------------------------------------------------------- builders

def _import(module: str, extra: str = "vision"):
    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken install (torchvision built for another torch)
        raise DeltaError(f"{module} is not importable here ({type(e).__name__}: {str(e)[:120]}); install it "
                         f"(pip install 'deltatune[{extra}]', with a torchvision built for your torch)") from None


def _timm(name: str) -> tuple[nn.Module, ImageConfig]:
    timm = _import("timm")
    if not timm.list_models(name) and not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise DeltaError(f"timm has no model {name!r}" + (f"; similar: {close}" if close else "")
                         + "; list them with python -c 'import timm; print(timm.list_models())'")
    net = timm.create_model(name, pretrained=False)  # never a download: weights come from --weights
    dc = timm.data.resolve_data_config({}, model=net)  # {'input_size': (3, H, W), 'mean', 'std', 'interpolation'}
    c, h, _ = dc["input_size"]
    return net, ImageConfig(size=int(h), channels=int(c), mean=tuple(dc["mean"]), std=tuple(dc["std"]),
                            interpolation=dc.get("interpolation", "bilinear"), source=f"timm {name} data config")


def _torchvision(name: str) -> tuple[nn.Module, ImageConfig]:
    tvm = _import("torchvision.models")
    try:
        net = tvm.get_model(name, weights=None)
    except ValueError:
        raise DeltaError(f"torchvision has no model {name!r}; choose one of "
                         f"{sorted(tvm.list_models(module=tvm))[:12]} ...") from None
    cfg = ImageConfig(source="ImageNet defaults")
    try:  # the weights entry's transforms say size/mean/std without downloading anything
        t = tvm.get_model_weights(name).DEFAULT.transforms()
        cfg = ImageConfig(size=int(t.crop_size[0]), mean=tuple(t.mean), std=tuple(t.std),
                          interpolation=getattr(t.interpolation, "value", "bilinear"),
                          source=f"torchvision {name} DEFAULT weights transforms")
    except Exception:  # models without published weights
        pass
    return net, cfg


def _factory(spec: str) -> tuple[nn.Module, ImageConfig]:
    module, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:  # `deltatune` as a console script does not see the working directory
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise DeltaError(f"--model {spec}: cannot import {module!r} ({e}); give package.module:callable of an "
                         "importable module (the working directory is searched)") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise DeltaError(f"--model {spec}: {module} has no {attr!r}; give package.module:callable")
        obj = getattr(obj, part)
    if not callable(obj):
        raise DeltaError(f"--model {spec}: {attr} is not callable; give a function that returns an nn.Module")
    net = obj()
    if not isinstance(net, nn.Module):
        raise DeltaError(f"--model {spec}: {attr}() returned {type(net).__name__}, not a torch nn.Module")
    conv = next((m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    c = conv.in_channels if isinstance(conv, nn.Conv2d) else 3
    return net, ImageConfig().with_channels(c)


BUILDERS: dict[str, Callable[[str], tuple[nn.Module, ImageConfig]]] = {"timm": _timm, "torchvision": _torchvision}


def build(spec: str) -> tuple[nn.Module, ImageConfig]:
    kind, _, name = spec.partition(":")
    if kind in BUILDERS:
        if not name:
            raise DeltaError(f"--model {spec}: give a model name, e.g. {kind}:resnet18")
        return BUILDERS[kind](name)
    return _factory(spec)


# --------------------------------------------------------------------------- --weights

def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file, never unpickling code (weights_only)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DeltaError(f"--weights {p} does not exist; give a .pth/.pt/.bin or .safetensors state dict")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DeltaError(f"--weights {p}: not a loadable state dict ({type(e).__name__}: {str(e)[:160]})") from None
    for key in ("state_dict", "model", "model_state_dict"):  # training checkpoints nest the weights
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise DeltaError(f"--weights {p}: expected a dict of tensors (a state dict), got {type(sd).__name__}")
    return {k.removeprefix("module."): v for k, v in sd.items()}  # DataParallel / DDP saves


def _leaf(k: str) -> str:
    return k.rsplit(".", 1)[-1]


def map_keys(file: dict[str, torch.Tensor], model: dict[str, torch.Tensor]) -> tuple[dict, str]:
    """(file keys renamed to the model's, how).  Same names: kept.  Otherwise, when both list the
    same number of tensors and, position by position, the same shape and the same kind (weight,
    bias, running_mean, ...), the i-th file tensor is the model's i-th: state dicts follow module
    registration order, and ports of one architecture register in the same order (the packaged
    EfficientNet-Lite0 file, lukemelas' naming ``_blocks.0._depthwise_conv``, into timm's
    ``blocks.0.0.conv_dw``)."""
    if set(file) == set(model):
        return file, "by name"
    if len(file) == len(model) and all(
            a.shape == b.shape and _leaf(ka) == _leaf(kb)
            for (ka, a), (kb, b) in zip(file.items(), model.items())):
        return {kb: a for (_, a), kb in zip(file.items(), model)}, f"by position ({len(file)} tensors, names differ, " \
                                                                    "every shape and kind agrees)"
    return file, "by name"


def load_weights(net: nn.Module, path: str | Path, sd: dict[str, torch.Tensor] | None = None) -> str:
    """Load ``path`` (or its already-read ``sd``) into ``net`` checking every key; one line
    listing mismatches otherwise."""
    sd = read_state_dict(path) if sd is None else sd
    want = net.state_dict()
    sd, how = map_keys(sd, want)
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(want[k].shape)}" for k in want
              if k in sd and sd[k].shape != want[k].shape]
    if missing or unexpected or shapes:
        def few(xs):
            return f"{xs[:4]}{' ...' if len(xs) > 4 else ''}"

        parts = [f"{len(missing)} missing {few(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected {few(unexpected)}" if unexpected else "",
                 f"{len(shapes)} of another shape {few(shapes)}" if shapes else ""]
        raise DeltaError(f"--weights {path} does not fit {type(net).__name__}: "
                         + "; ".join(x for x in parts if x) + "; pick the model these weights were saved from")
    net.load_state_dict(sd, strict=True)
    return how


# --------------------------------------------------------------------------- head surgery

def split_head(net: nn.Module) -> tuple[str, nn.Linear]:
    """Replace the classification head (timm's ``get_classifier``, else the last Linear) by an
    identity so ``net`` returns pooled features (B, F); return (its path, the old Linear)."""
    get = getattr(net, "get_classifier", None)
    head = get() if callable(get) else None
    lins = [(p, m) for p, m in net.named_modules() if isinstance(m, nn.Linear)]
    path = next((p for p, m in net.named_modules() if m is head), None) if isinstance(head, nn.Linear) else None
    if path is None:
        if not lins:
            raise DeltaError(f"{type(net).__name__} has no Linear classification head; the model must end in "
                             "nn.Linear (features -> classes)")
        path, head = lins[-1]
    parent = net.get_submodule(path.rsplit(".", 1)[0]) if "." in path else net
    setattr(parent, path.rsplit(".", 1)[-1], nn.Identity())
    return path, head


def split_head_size(net: nn.Module) -> int:
    """Number of classes of ``net``'s own head (without removing it)."""
    get = getattr(net, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Linear):
        head = next((m for m in reversed(list(net.modules())) if isinstance(m, nn.Linear)), None)
    return head.out_features if head is not None else 2


@dataclass
class VisionConfig:
    """What rebuilds the model (saved as vision_model.json) and what the library reads from
    ``model.config`` (num_channels, image_size for forgetting and merge checks)."""

    spec: str
    num_labels: int
    id2label: dict = field(default_factory=dict)
    image: dict = field(default_factory=dict)  # ImageConfig.to_dict()
    head: str = ""  # path of the original head inside the model (replaced by ``classifier``)
    weights: str | None = None  # the base weights the run started from (provenance)
    _name_or_path: str = ""

    @property
    def num_channels(self) -> int:
        return int(self.image.get("channels", 3))

    @property
    def image_size(self) -> int:
        return int(self.image.get("size", 224))

    @property
    def image_mean(self):
        return self.image.get("mean")

    @property
    def image_std(self):
        return self.image.get("std")

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class VisionModelForImageClassification(nn.Module):
    """``net`` (head removed) + ``classifier``; forward as transformers' image classifiers."""

    def __init__(self, net: nn.Module, features: int, config: VisionConfig):
        super().__init__()
        self.net = net
        self.classifier = nn.Linear(features, config.num_labels)  # (F) -> (L), fresh
        self.config = config

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                output_hidden_states: bool = False, **_):
        from transformers.modeling_outputs import ImageClassifierOutput

        h = self.net(pixel_values)  # (B, F)
        if h.dim() != 2:
            raise DeltaError(f"{self.config.spec} returned features of shape {tuple(h.shape)} once its head was "
                             "removed; expected (batch, features): the last Linear layer is not the head")
        logits = self.classifier(h)  # (B, L)
        loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=(h,) if output_hidden_states else None)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and has_adapters(self):  # PEFT: BatchNorm running statistics are base buffers, keep them
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def save_pretrained(self, out: str | Path, **_) -> None:
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(out / WEIGHTS_FILE))
        (out / SPEC_FILE).write_text(json.dumps(self.config.to_dict(), indent=2), encoding="utf-8")


def _classifier(net: nn.Module, image: ImageConfig, spec: str, label_names: list[str]) -> VisionModelForImageClassification:
    path, head = split_head(net)
    cfg = VisionConfig(spec=spec, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                       image=image.to_dict(), head=path, _name_or_path=spec)
    return VisionModelForImageClassification(net, head.in_features, cfg)


def load_saved(d: Path, label_names: list[str] | None) -> VisionModelForImageClassification:
    """A full fine-tuning run's ``model/`` directory: rebuild from vision_model.json, load exactly."""
    try:
        cfg = json.loads((d / SPEC_FILE).read_text(encoding="utf-8"))
        net, _ = build(cfg["spec"])
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise DeltaError(f"{d / SPEC_FILE}: unreadable ({e}); the saved model directory is damaged") from None
    names = [cfg.get("id2label", {}).get(str(i)) or str(i) for i in range(cfg["num_labels"])]
    if label_names is not None and list(label_names) != names:
        raise DeltaError(f"{d}: the model was trained on labels {names}, not {label_names}")
    model = _classifier(net, ImageConfig.from_dict(cfg.get("image", {})), cfg["spec"], names)
    model.config.weights = cfg.get("weights")
    load_exact(model, d / WEIGHTS_FILE, cfg["spec"])
    return model


def _port_twin(spec: str, sd: dict | None, log: Callable[[str], None] | None) -> str:
    """``timm:tf_NAME`` when ``sd`` is a TF port and timm has the twin (see :mod:`.ports`)."""
    if sd is None or not spec.startswith("timm:"):
        return spec
    timm = _import("timm")
    name = spec.partition(":")[2]
    twin = timm_twin(name, sd, lambda n: bool(timm.is_model(n)))
    if twin != name and log is not None:
        log(f"weights: TF-port naming (_conv_stem, _bn0): building timm:{twin}, whose TF 'same' padding and "
            f"BatchNorm eps compute what they were trained for ({name} would load every key but not match)")
    return f"timm:{twin}"


def load_vision_model(spec: str, label_names: list[str] | None, weights: str | None = None,
                      image_size: int | None = None, log: Callable[[str], None] | None = None):
    """(model, Preprocessor, spec) for a vision spec; ``label_names`` size the new head."""
    p = Path(spec).expanduser()
    if p.is_dir() and (p / SPEC_FILE).exists():
        model = load_saved(p, label_names)
    else:
        sd = read_state_dict(weights) if weights else None
        spec = _port_twin(spec, sd, log)
        net, image = build(spec)
        if weights:
            how = load_weights(net, weights, sd)
            if log is not None:
                log(f"weights: {weights} loaded into {spec} {how}")
        if label_names is None:  # inspect / eval without data labels: as many classes as the model had
            label_names = [str(i) for i in range(split_head_size(net))]
        model = _classifier(net, image, spec, list(label_names))
        model.config.weights = str(Path(weights).expanduser().resolve()) if weights else None
    image = ImageConfig.from_dict(model.config.image)
    if image_size:
        image.size = int(image_size)
        model.config.image = image.to_dict()
    if log is not None:
        log(f"inputs: {image.channels}×{image.size}×{image.size}, mean {tuple(round(m, 3) for m in image.mean)}, "
            f"std {tuple(round(s, 3) for s in image.std)} ({image.source})")
    return model.eval(), Preprocessor(image), spec  # eval mode, as from_pretrained leaves a model (BatchNorm, dropout)
