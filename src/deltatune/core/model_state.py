"""Every piece of hidden state deltatune keeps on a user's modules, declared in one place.

deltatune never subclasses the user's model, so what it must remember about a model (or about one
of its modules) lives in that object's ``__dict__`` under a private key.  Not as a submodule,
parameter or buffer, because then it would appear in ``state_dict()`` (and in every checkpoint
the user writes) and be moved, cast or counted by torch; not as a plain ``setattr`` either,
because ``nn.Module.__setattr__`` would register a module value as a submodule.  An entry of
``__dict__`` is copied by ``copy.deepcopy`` and pickling, survives ``model.to()`` / ``.half()``
untouched (nothing in it is a tensor torch should move: tensors live in the modules themselves),
and is invisible to torch.

Every key is a :class:`Key` below; code reads and writes them only through :func:`get`,
:func:`put`, :func:`pop` and :func:`setdefault`, so ``grep model_state`` finds every reader and
writer.

On the root model:

==================  =================================  ==============================================
key                 written by                         what and why here
==================  =================================  ==============================================
STATE               core/delta.py ``get_state``        ``DeltaState``: adapters, active set, merged
                                                       names, the row router; shared with every
                                                       DeltaLayer (plain Python, O(1) switches)
VIRTUAL_HOOK        methods/_virtual_tokens.py         the handles of the forward pre-hook that
                                                       prepends prompt/prefix tokens (removed with
                                                       the last prompt adapter)
MASK_POSITIONS      methods/_hf_compat.py              whether this model derives position ids from
                                                       the attention mask (probed once, a bool)
CACHE_LAYOUT        methods/prefix.py                  the measured per-layer key/value shapes of
                                                       the model's cache (probed once)
ADALORA_HOOKS       methods/adalora.py                 adapter name -> its rank allocator (the
                                                       training-time budget schedule and EMA
                                                       statistics; saved by ``train_state``)
QUANT               quant/layers.py, quant/load.py     how the base was quantized ({"scheme", ...});
                                                       written into an adapter's manifest on save
==================  =================================  ==============================================

On modules inside the model:

==================  =================================  ==============================================
LAYER_STATE         core/delta.py ``DeltaLayer``       the root's ``DeltaState``, shared by reference
                                                       (a submodule would be a cycle in the tree)
MIXED_STACKS        mixed.py                           a DeltaLayer's stacked LoRA factors per rank
                                                       for batched mixed-adapter rows (a cache)
SELECTED            methods/_selector.py               a selected module's original tensors and each
                                                       adapter's trained copy (BitFit, LN tuning)
SELECTED_STASH      methods/_selector.py               the Parameters a selector swapped out for the
                                                       duration of one forward (half-precision bases)
==================  =================================  ==============================================

Bookkeeping private to one Delta (``IA3Delta``'s pre-merge copy, VeRA's peft seed, an adapter's
input slot) stays on that Delta, commented where it is set: it is not model state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Key:
    """One hidden entry: ``attr`` is the ``__dict__`` key (kept stable: pickled models carry it)."""

    attr: str
    doc: str


STATE = Key("_deltatune", "DeltaState shared by the root model and its DeltaLayers")
VIRTUAL_HOOK = Key("_deltatune_virtual_hook", "prompt/prefix forward pre-hook handles")
MASK_POSITIONS = Key("_deltatune_positions_from_mask", "whether position ids come from the attention mask")
CACHE_LAYOUT = Key("_deltatune_cache_layout", "measured key/value cache layout for prefixes")
ADALORA_HOOKS = Key("_dt_adalora_hooks", "AdaLoRA rank allocators by adapter name")
QUANT = Key("_dt_quant", "how the base model was quantized")
LAYER_STATE = Key("_dt_state", "a DeltaLayer's reference to the root DeltaState")
MIXED_STACKS = Key("_dt_mixed_stacks", "a DeltaLayer's stacked LoRA factors for mixed batches")
SELECTED = Key("_dt_selected", "a selected module's original and per-adapter tensors")
SELECTED_STASH = Key("_dt_selected_stash", "Parameters swapped out during one forward")

KEYS = (STATE, VIRTUAL_HOOK, MASK_POSITIONS, CACHE_LAYOUT, ADALORA_HOOKS, QUANT, LAYER_STATE, MIXED_STACKS,
        SELECTED, SELECTED_STASH)


def _dict(obj: Any) -> dict:
    return getattr(obj, "__dict__", {})  # None or a plain value: nothing stored


def get(obj: Any, key: Key, default: Any = None) -> Any:
    """The value stored under ``key`` on ``obj`` (a model or module), or ``default``."""
    return _dict(obj).get(key.attr, default)


def has(obj: Any, key: Key) -> bool:
    return key.attr in _dict(obj)


def put(obj: Any, key: Key, value: Any) -> None:
    obj.__dict__[key.attr] = value


def pop(obj: Any, key: Key, default: Any = None) -> Any:
    return obj.__dict__.pop(key.attr, default)


def setdefault(obj: Any, key: Key, default: Any) -> Any:
    return obj.__dict__.setdefault(key.attr, default)
