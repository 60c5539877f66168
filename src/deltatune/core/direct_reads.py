"""Layers whose parent uses their weight in arithmetic instead of calling them.

A method that wraps a layer (LoRA, DoRA, IA3, VeRA, sparse deltas) changes what the layer's
*forward* returns.  Some models never call that forward: WavLM's attention passes
``self.q_proj.weight`` to ``F.multi_head_attention_forward``, Mamba's mixer computes
``self.dt_proj.weight @ time_step``.  Wrapping such a layer trains nothing while ``merge`` does
change the weight, so merged != unmerged, silently.  peft has the same blind spot.

We find them by reading the parent class's source once (``ast``), so no forward pass and no
example input are needed: a child ``X`` counts as read directly when a method other than the
initialisers uses ``self.X.weight`` (possibly through ``.t()``, ``.view(...)``, ``.float()``, a
tuple or a keyword) as an operand of ``@``/``*``/``+`` or as an argument of any function
(``F.multi_head_attention_forward``, ``torch.cat``, a fused kernel).  Reading
``.dtype``/``.shape``/``.device``, ``isinstance`` and in-place initialisers (``init.normal_``) do
not count.  A fused kernel counts even where it is absent: Mamba's ``mamba_inner_fn`` receives
``x_proj``/``dt_proj``/``out_proj``/``conv1d`` weights on GPUs that have it, so an adapter there
works on this CPU and is skipped on such a GPU; peft refuses ``out_proj``/``conv1d`` for the same
reason.
"""
from __future__ import annotations

import ast
import functools
import inspect
import textwrap

from torch import nn

from .delta import iter_base_modules

# methods that build or tie weights rather than compute with them
_INIT_METHODS = {"__init__", "_init_weights", "reset_parameters", "init_weights", "_reset_parameters",
                 "tie_weights", "_tie_weights", "extra_repr"}
_CONTAINERS = (ast.Tuple, ast.List, ast.Starred, ast.keyword)
# builtins and helpers that look at a weight without using its values in the forward
_BOOKKEEPING = {"isinstance", "hasattr", "getattr", "len", "id", "type", "print", "is_tensor", "is_floating_point"}


def _root_name(func: ast.expr) -> str | None:
    while isinstance(func, ast.Attribute):
        func = func.value
    return func.id if isinstance(func, ast.Name) else None


def _is_bookkeeping(func: ast.expr) -> bool:
    """Calls that inspect or initialise a weight rather than compute with it."""
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    return name in _BOOKKEEPING or name.endswith("_") or _root_name(func) in ("init", "logger", "warnings")


def _used_in_math(node: ast.AST, parents: dict) -> bool:
    """``node`` is ``self.X.weight``: follow it up through method calls on it and containers."""
    cur = node
    while True:
        up = parents.get(cur)
        if isinstance(up, ast.Attribute):  # self.X.weight.t() / .view(...): follow the call
            call = parents.get(up)
            if isinstance(call, ast.Call) and call.func is up:
                cur = call
                continue
            return False  # .dtype / .shape / .device
        if isinstance(up, _CONTAINERS):
            cur = up
            continue
        if isinstance(up, ast.BinOp):
            return True
        if isinstance(up, ast.Call):
            return cur is not up.func and not _is_bookkeeping(up.func)
        return False


@functools.lru_cache(maxsize=None)
def direct_children(cls: type) -> frozenset[str]:
    """Attribute names ``X`` whose ``self.X.weight`` some method of ``cls`` computes with."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is object or klass.__module__.startswith("torch."):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # built-in, generated or C classes: nothing to read
            continue
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or fn.name in _INIT_METHODS:
                continue
            for node in ast.walk(fn):
                if (isinstance(node, ast.Attribute) and node.attr == "weight"
                        and isinstance(node.value, ast.Attribute) and isinstance(node.value.value, ast.Name)
                        and node.value.value.id == "self" and _used_in_math(node, parents)):
                    names.add(node.value.attr)
    return frozenset(names)


def direct_weight_paths(model: nn.Module) -> dict[str, str]:
    """{path of a layer whose weight its parent reads directly: the parent's class name}."""
    out: dict[str, str] = {}
    for path, module in iter_base_modules(model):
        for child in direct_children(type(module)):
            if isinstance(getattr(module, child, None), nn.Module):
                out[f"{path}.{child}" if path else child] = type(module).__name__
    return out
