"""Choosing which modules a method adapts: one function, :func:`find_targets`.

Pattern syntax (peft's, so configs are interchangeable):
  * a list of names: a module matches if its dotted path equals an entry or ends with ``.entry``;
  * a string: a regular expression that must match the whole path;
  * ``"all-linear"``: every linear-like layer except the output head;
  * ``"attention"``: the query/value projections of the architecture (the LoRA paper's choice).
"""
from __future__ import annotations

import difflib
import re
from typing import Iterable

from torch import nn

from .direct_reads import direct_weight_paths
from .delta import DeltaError, iter_base_modules
from .layer_types import linear_types
from .tasks import CLASSIFIER_TASKS, task_of

# Names of output heads: "all-linear" leaves them alone (adapting the vocabulary projection is
# costly and rarely helps; classification heads are trained in full via modules_to_save).
HEAD_NAMES = ("lm_head", "classifier", "score", "head", "output_layer", "embed_out", "fc", "qa_outputs")

# Query/value projection names per architecture family, tried in order; the first pair present
# in the model wins.  (Llama/Mistral/Qwen/OPT/Phi, GPT-2, BERT/RoBERTa/ViT, DistilBERT, T5,
# Falcon/BLOOM/GPT-NeoX.)
ATTENTION_NAMES: list[tuple[str, ...]] = [
    ("q_proj", "v_proj"),
    ("c_attn",),
    ("query", "value"),
    ("q_lin", "v_lin"),
    ("q", "v"),
    ("query_key_value",),
    ("qkv",),
]

# Classification heads of transformers' *For{Sequence,Token,Image}Classification models.
CLASSIFIER_HEADS = ("classifier", "score")


def _leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def matches(path: str, pattern: list[str] | tuple[str, ...] | str | None) -> bool:
    if pattern is None:
        return False
    if isinstance(pattern, str):
        return re.fullmatch(pattern, path) is not None
    return any(path == p or path.endswith("." + p) for p in pattern)


def _check_pattern(what: str, pattern) -> None:
    """A list of module names or one regex string; say which, instead of a TypeError later."""
    if pattern is None:
        return
    if isinstance(pattern, str):
        try:
            re.compile(pattern)
        except re.error as e:
            raise DeltaError(f"{what} {pattern!r} is not a valid regular expression ({e}); "
                             "pass a list of module names for exact/suffix matching") from None
    elif not isinstance(pattern, (list, tuple, set)) or not all(isinstance(p, str) for p in pattern):
        raise DeltaError(f"{what} must be a list of module names or a regex string, got {pattern!r}")


def find_targets(
    model: nn.Module,
    targets: list[str] | str | None,
    types: Iterable[type] | None = None,
    exclude: list[str] | str | None = None,
    default: str = "all-linear",
    from_defaults: bool = False,
) -> list[str]:
    """Paths of the modules to adapt. ``types`` restricts by layer class (a method lists the
    layer types it supports).  Raises a DeltaError that names the closest existing modules
    when nothing matches.  ``from_defaults``: ``targets`` is the method's own choice, not the
    user's, so layers an adapter cannot reach are left out as with ``all-linear``."""
    types = tuple(types) if types is not None else None
    if targets is None:
        targets, from_defaults = default, True
    for what, pat in (("targets", targets), ("exclude", exclude)):
        _check_pattern(what, pat)
    modules = [(p, m) for p, m in iter_base_modules(model) if p]
    if targets == "all-linear":
        lin = linear_types()
        heads = head_paths(model)
        found = [p for p, m in modules if isinstance(m, lin) and not _inside(p, heads)]
        if not found:  # e.g. a conv net: fall back to ungrouped convolutions
            found = [p for p, m in modules if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups == 1]
    elif targets == "attention":
        leaves = {_leaf(p) for p, _ in modules}
        names = next((n for n in ATTENTION_NAMES if all(x in leaves for x in n)), None)
        if names is None:
            raise DeltaError("targets='attention': no known query/value projection names found "
                             f"(looked for {ATTENTION_NAMES}); pass explicit targets=[...]")
        found = [p for p, _ in modules if _leaf(p) in names]
    else:
        found = [p for p, _ in modules if matches(p, targets)]
    if exclude is not None:
        found = [p for p in found if not matches(p, exclude)]
    if types is not None:
        bad = [(p, type(m).__name__) for p, m in modules if p in found and not isinstance(m, types)]
        if bad and targets not in ("all-linear",):
            # explicit names that hit a layer type the method cannot wrap (Conv3d, MultiheadAttention,
            # a whole block): say so, never skip it silently - peft refuses the same way
            leaves = bad
            if leaves:
                raise DeltaError(
                    f"targets {targets!r} matched {leaves[0][0]!r} of type {leaves[0][1]}"
                    f"{f' (and {len(leaves) - 1} more)' if len(leaves) > 1 else ''}, which this method cannot "
                    f"adapt; supported types: {[t.__name__ for t in types]} - exclude it or pick other targets")
        found = [p for p, m in modules if p in found and isinstance(m, types)]
        found = skip_direct_reads(model, "all-linear" if from_defaults else targets, found)
        if not found and from_defaults and targets != "all-linear":
            # e.g. WavLM: its query/value projections are all read directly; the defaults give way
            return find_targets(model, "all-linear", types, exclude)
    if not found:
        raise DeltaError(no_match_message(model, targets, types))
    return found


def skip_direct_reads(model: nn.Module, targets, found: list[str]) -> list[str]:
    """Layers whose parent computes with their ``.weight`` never run a wrapper's forward
    (core/direct_reads.py): ``all-linear`` leaves them out; naming one is an error."""
    direct = direct_weight_paths(model)
    hit = [p for p in found if p in direct]
    if not hit:
        return found
    if targets == "all-linear":
        return [p for p in found if p not in direct]
    raise DeltaError(
        f"targets {targets!r} include {hit[0]!r}{f' (and {len(hit) - 1} more)' if len(hit) > 1 else ''}, whose "
        f"parent {direct[hit[0]]} uses its .weight directly instead of calling it, so an adapter there would never "
        "run (and merging would change the model); pick other layers (targets='all-linear' skips these)")


def conv_blocks(model: nn.Module) -> list[str]:
    """The blocks of a CNN: items of a Sequential/ModuleList that are not containers themselves and
    hold a 2-d convolution (ResNet's ``layer1.0``, timm EfficientNet's ``blocks.1.0``,
    efficientnet-pytorch's ``_blocks.3``, torchvision's ``features.2.0``), outermost first."""
    lists = (nn.Sequential, nn.ModuleList)
    found = []
    for path, mod in iter_base_modules(model):
        if not path:
            continue
        parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
        if (isinstance(parent, lists) and type(mod) not in (nn.Sequential, nn.ModuleList)
                and not isinstance(mod, nn.Conv2d) and any(isinstance(m, nn.Conv2d) for m in mod.modules())
                and not any(path.startswith(f + ".") for f in found)):
            found.append(path)
    return found


def _inside(path: str, parents: set[str]) -> bool:
    """``path`` is one of ``parents`` or a module inside one of them."""
    return any(path == h or path.startswith(h + ".") for h in parents)


def head_paths(model: nn.Module) -> set[str]:
    """Output heads that ``all-linear`` leaves alone, with everything inside them: the module
    transformers reports as the output embeddings (lm_head, Whisper's proj_out, embed_out, ...,
    often tied to the input embedding), the classification heads that train in full
    (modules_to_save, including containers such as RoBERTa's ``classifier.dense/out_proj`` or
    ResNet's ``Sequential`` classifier), and the conventional head names."""
    paths = {p for p, _ in iter_base_modules(model) if p and _leaf(p) in HEAD_NAMES}
    get_out = getattr(model, "get_output_embeddings", None)
    out = None
    if callable(get_out):
        try:
            out = get_out()
        except (NotImplementedError, AttributeError, TypeError):  # models without an LM head
            out = None
    out = getattr(out, "base_layer", out)  # already wrapped by an earlier adapter
    if isinstance(out, nn.Module):
        paths |= {p for p, m in iter_base_modules(model) if p and m is out}
    paths |= set(auto_modules_to_save(model))
    return paths


def no_match_message(model: nn.Module, targets, types=None) -> str:
    names = [p for p, _ in iter_base_modules(model) if p]
    if types:
        typed = [p for p, m in iter_base_modules(model) if p and isinstance(m, tuple(types))]
        names = typed or names
    # a numeric leaf ("1" in ResNet's classifier.1) says nothing: show the path there
    leaves = sorted({p if _leaf(p).isdigit() else _leaf(p) for p in names})
    pats = [targets] if isinstance(targets, str) else list(targets or [])
    close: list[str] = []
    for pat in pats:
        close += difflib.get_close_matches(_leaf(str(pat)), leaves, n=3, cutoff=0.4)
    hint = f" Closest module names: {sorted(set(close))}." if close else ""
    return (f"targets {targets!r} matched no module of {type(model).__name__}.{hint} "
            f"Adaptable module names: {leaves[:25]}{' ...' if len(leaves) > 25 else ''}")


def auto_modules_to_save(model: nn.Module) -> list[str]:
    """The classification head of a transformers ``*For...Classification`` model (its weights are
    freshly initialised, so it must train in full), else nothing.

    Only direct children of the model count: transformers' task models and the vision wrapper
    (vision/classifier.py) add the fresh head next to the pretrained body (``classifier``,
    ``score``, RoBERTa's ``classifier.dense/out_proj`` container, DistilBERT's ``pre_classifier``),
    never inside it.  A module deeper down with such a name belongs to the pretrained network
    (torchvision's mobilenet_v3 ``net.classifier`` Sequential keeps its pretrained Linear(576, 1024)
    once its last layer became the wrapper's head) and is left to the method like the rest of the body."""
    if task_of(model) not in CLASSIFIER_TASKS:
        return []
    # peft matches modules_to_save by plain string suffix, so ["classifier"] also takes
    # DistilBERT's "pre_classifier": train every such module in full, as peft will when it loads
    # the file (LoRA inside one of them would make the file unloadable by peft)
    return [p for p, _ in iter_base_modules(model) if p and "." not in p and p.endswith(CLASSIFIER_HEADS)]


def modules_to_save_paths(model: nn.Module, mts: list[str] | str | None) -> list[str]:
    """The module paths that ``modules_to_save`` trains in full.  ``"auto"``: exactly the fresh
    head (:func:`auto_modules_to_save`).  A list: an entry that is a module's full path means that
    module only (a saved file lists full paths, and re-matching ``classifier`` as a suffix would
    also take a pretrained ``net.classifier``); any other entry suffix-matches as peft does."""
    if not mts:
        return []
    if mts == "auto":
        return auto_modules_to_save(model)
    if isinstance(mts, str):  # one module name, as peft accepts it
        mts = [mts]
    paths = [p for p, _ in iter_base_modules(model) if p]
    exact = [m for m in mts if m in paths]
    rest = [m for m in mts if m not in paths]  # peft lists e.g. "score" for every SEQ_CLS model: may match nothing
    found = list(dict.fromkeys(exact + [p for p in paths if rest and matches(p, rest)]))
    return found or find_targets(model, list(mts))  # nothing at all: find_targets' error names the closest
