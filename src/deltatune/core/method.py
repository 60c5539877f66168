"""The extension protocol: :class:`Method` (what a method must and may implement), the registry
``METHODS`` that ``@register`` fills, and the adapter dtype rule applied once per attach.

A method is one class in ``methods/<name>.py``; see ``docs/design.md`` for the protocol in prose.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .delta import PREFIX, DeltaConfig, DeltaError, DeltaState, get_state, iter_delta_layers
from .dtypes import adapter_dtype, cast_tensors, module_dtype
from .targets import find_targets


class Method:
    """A registry entry: everything deltatune knows about one method, in one object.

    Adders (LoRA, IA3, adapters...) override ``attach``; selectors (BitFit, LayerNorm, sparse)
    also override ``own_tensors`` and the activation hooks.  The optional hooks below have
    defaults that do nothing, so a method implements only what it needs; ``overrides(hook)`` says
    whether it does (the trainer calls a training hook only then)."""

    name: ClassVar[str] = ""  # the registry key; must equal config_cls.method (register checks)
    config_cls: ClassVar[type[DeltaConfig]] = DeltaConfig
    peft_type: ClassVar[str | None] = None  # the peft method whose file format we share
    summary: ClassVar[str] = ""
    layer_types: ClassVar[tuple[str, ...]] = ()
    mergeable: ClassVar[bool] = True
    merge_note: ClassVar[str] = ""  # why not, when mergeable is False
    # learning rate when the user gives none (`deltatune train`): adapters start at zero and need
    # ~10x full fine-tuning's rate; few-number methods are tuned higher.  A fresh classification
    # head has its own, higher rate (``TrainConfig.head_lr``); a causal LM has no fresh head and
    # trains the delta at twice this rate (app/run.py's HEADLESS_LR_FACTOR, docs/cli.md)
    default_lr: ClassVar[float] = 5e-4
    # what the method adapts when the config names no targets: a ``find_targets`` pattern
    # ("all-linear", "attention", a list of names) that ``target_paths()`` uses, or - for methods that
    # place themselves (selectors, bottleneck adapters, prompts) or whose choice depends on the
    # architecture (IA3 overrides ``default_targets_for``) - a one-line description; printed by
    # ``deltatune inspect --methods``
    default_targets: ClassVar[str] = "all-linear"
    # dt.mixed (one adapter per batch row): None = allowed unless the method keeps tensors outside
    # DeltaLayers (own_tensors), which every row would share; True = the method routes rows itself
    # (prompt / prefix); False = never
    supports_mixed: ClassVar[bool | None] = None

    def attach(self, model: nn.Module, cfg: DeltaConfig, name: str, state: DeltaState) -> None:
        """Add adapter ``name`` with options ``cfg`` to ``model``: find the targets, build every
        ``Delta`` first (an error must leave the model untouched), then put each into
        ``wrap(model, path, state).deltas[name]``.  ``dt.attach`` has already recorded the adapter
        in ``state`` and afterwards casts its tensors (``cast_adapter_dtype``) and sets
        ``requires_grad`` from the active set; it undoes everything if this raises."""
        raise NotImplementedError

    def default_targets_for(self, model: nn.Module) -> list[str] | str:
        """The targets pattern used on ``model`` when ``cfg.targets`` is None; default
        ``default_targets``.  Override where the choice depends on the architecture."""
        return self.default_targets

    def target_paths(self, model: nn.Module, cfg: DeltaConfig, types: tuple[type, ...] | None = None) -> list[str]:
        """Paths ``attach`` adapts: ``cfg.targets`` (minus ``cfg.exclude``) or, when None, this
        method's defaults, where layers an adapter cannot reach are left out rather than refused."""
        chosen = cfg.targets is None
        pattern = self.default_targets_for(model) if chosen else cfg.targets
        return find_targets(model, pattern, types=types, exclude=cfg.exclude, from_defaults=chosen)

    def own_tensors(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """Tensors that belong to the adapter but live outside DeltaLayers (selectors, prompts)."""
        return {}

    def own_dtypes(self, model: nn.Module, name: str) -> dict[str, torch.dtype]:
        """For each of ``own_tensors``, the dtype of the base it works with (``adapter_dtype`` picks
        the adapter's own from it).  Default: the input embeddings' (prompts, prefixes)."""
        own = self.own_tensors(model, name)
        if not own:
            return {}
        try:  # vision/audio models raise NotImplementedError: they have no token embeddings
            emb = model.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            emb = None
        dt = module_dtype(emb if isinstance(emb, nn.Module) else model)
        return {k: dt for k in own}

    def delete(self, model: nn.Module, name: str) -> None:
        """Remove what ``attach`` added outside DeltaLayers."""

    def on_activate(self, model: nn.Module, name: str, active: bool) -> None:
        """Called when ``name`` becomes active/inactive or the model is disabled/enabled."""

    def merge(self, model: nn.Module, name: str) -> None:
        """Merge what lives outside DeltaLayers (selectors: already in place)."""

    def unmerge(self, model: nn.Module, name: str) -> None:
        pass

    def unload(self, model: nn.Module, name: str) -> None:
        """Drop the bookkeeping after a merge, keeping the (merged) weights."""

    # -- file formats: peft's config dict, when peft has the method
    def to_peft(self, cfg: DeltaConfig, model: nn.Module, name: str) -> dict[str, Any] | None:
        return None

    def from_peft(self, d: dict[str, Any]) -> DeltaConfig:
        raise DeltaError(f"{self.name}: cannot read peft configs")

    def normalize_keys(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map key spellings of other versions/tools to ours when loading."""
        return tensors

    def file_key(self, key: str) -> str:
        """The key of adapter tensor ``key`` in the saved file (peft's layout).  Prompt-learning
        methods override this pair: peft writes them as ``prompt_embeddings`` / ``base_model.<path>``."""
        return PREFIX + key

    def from_file_key(self, key: str) -> str:
        """Inverse of :meth:`file_key`, applied when loading."""
        return key.removeprefix(PREFIX)

    def export(self, model: nn.Module, name: str, tensors: dict[str, torch.Tensor],
               cfg: DeltaConfig) -> tuple[dict[str, torch.Tensor], DeltaConfig]:
        """Hook to convert tensors and config at save time (e.g. PiSSA → plain LoRA)."""
        return tensors, cfg

    # -- mixed batches
    def check_mixed(self, model: nn.Module, rows: list[str | None]) -> None:
        """Raise a DeltaError if ``dt.mixed(model, rows)`` (one adapter name or None per batch row)
        cannot route this method's adapters exactly; called when one of them is used or active."""

    # -- training hooks: ``train.Trainer`` calls them for each active trainable adapter of a method
    #    that overrides them (a hand-written loop calls ``train.trainer.run_step_hooks``)
    def step_hook(self, model: nn.Module, name: str, step: int, total_steps: int) -> None:
        """After every optimizer step, gradients still present (AdaLoRA allocates its ranks here)."""

    def train_state(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """Tensors beyond the adapter's own that an exact resume needs; saved with each checkpoint."""
        return {}

    def load_train_state(self, model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`train_state` saved (on resume from a checkpoint)."""

    def overrides(self, hook: str) -> bool:
        """Whether this method implements the optional ``hook`` itself (its class or the instance)."""
        fn = getattr(self, hook)
        return getattr(fn, "__func__", fn) is not getattr(Method, hook)


def cast_adapter_dtype(model: nn.Module, name: str, autocast: bool = True) -> None:
    """Give every tensor of adapter ``name`` the dtype of the ``adapter_dtype`` rule (peft's
    ``cast_adapter_dtype``), whatever dtype its method built it in: called once by ``dt.attach``."""
    for _, layer in iter_delta_layers(model):
        if name in layer.deltas:
            d = layer.deltas[name]
            cast_tensors((*d.parameters(), *d.buffers()), adapter_dtype(module_dtype(layer.base_layer), autocast))
    m = method_of(get_state(model).adapters[name].method)
    base = m.own_dtypes(model, name)
    for k, t in m.own_tensors(model, name).items():
        cast_tensors([t], adapter_dtype(base[k], autocast))


METHODS: dict[str, Method] = {}
"""name -> Method. Filled by ``deltatune.methods``."""


def register(method_cls: type[Method]) -> type[Method]:
    """Class decorator: add the method to ``METHODS`` under its ``name``, which its config class
    must carry too (``DeltaConfig.method``: configs name their method when saved)."""
    name = method_cls.name
    if not name or method_cls.config_cls.method != name:
        raise DeltaError(f"{method_cls.__name__}: name {name!r} and {method_cls.config_cls.__name__}.method "
                         f"{method_cls.config_cls.method!r} must be the same non-empty string; set both")
    prev = METHODS.get(name)
    if prev is not None and (type(prev).__module__, type(prev).__qualname__) != (method_cls.__module__,
                                                                               method_cls.__qualname__):
        raise DeltaError(f"{method_cls.__name__}: a method named {name!r} is already registered "
                         f"({type(METHODS[name]).__name__}); choose another name")
    METHODS[name] = method_cls()
    return method_cls


def method_of(name: str) -> Method:
    if not isinstance(name, str):
        raise DeltaError(f"method must be a name such as 'lora', got {type(name).__name__} {name!r}; "
                         f"available: {sorted(METHODS)}")
    if name not in METHODS:
        import difflib

        close = difflib.get_close_matches(name, METHODS, n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise DeltaError(f"unknown method {name!r}.{hint} Available: {sorted(METHODS)}")
    return METHODS[name]
