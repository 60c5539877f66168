"""Where and in what precision ``deltatune serve`` runs its base model: ``--device``, ``--dtype``
and ``--quantize``.

    --device auto|cpu|cuda|cuda:1|mps|...   auto: cuda if visible, else mps, else cpu
    --dtype  auto|fp32|bf16|fp16             auto: see pick_dtype
    --quantize nf4|int8                      the linear layers quantized while loading
                                             (dt.load_quantized; the rest in --dtype)

Why ``auto`` measures instead of assuming bf16 on CPU: a CPU without AMX / AVX512-BF16 has no
bf16 matmul units, and PyTorch then converts on the fly; a bf16 matmul measured 150x slower than
fp32 on such a machine (docs/benchmarks.md).  So on CPU ``auto`` times one (256 x 1024) @
(1024 x 1024) matmul in both dtypes (~10 ms) and takes bf16 only when it is at least as fast as
fp32 (it also halves the weights' memory); fp16 is never picked on CPU.  On CUDA, ``auto`` is bf16
when the GPU supports it (``torch.cuda.is_bf16_supported``), else fp16.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import transformers
from torch import nn

from ..app.calibration import check_calibrate, from_texts
from ..app.evaluate import read_reference
from ..core import model_state
from ..core.delta import DeltaError
from ..models import AUTO_CLASSES, load_model, load_tokenizer, resolve
from ..quant import SCHEMES, load_quantized

log = logging.getLogger("deltatune.serve")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BF16_PROBE = (256, 1024, 1024)  # (rows, inner, cols) of the timed matmul: a decoding batch's shape


@dataclass(frozen=True)
class Placement:
    device: str = "cpu"  # torch device string, or "auto"
    dtype: str = "fp32"  # fp32 | bf16 | fp16 | auto
    quantize: str | None = None  # nf4 | int8 | None (full precision weights)
    calibrate: int = 0  # nf4: calibrated block scales from this many batches of text (app/calibration.py)
    calibrate_data: str | None = None  # a text file (a line a text); None: the packaged general text

    def check(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise DeltaError(f"--dtype {self.dtype!r}: choose one of auto, {', '.join(DTYPES)}")
        if self.quantize is not None and self.quantize not in SCHEMES:
            raise DeltaError(f"--quantize {self.quantize!r}: choose one of {', '.join(sorted(SCHEMES))}")
        check_calibrate(self.calibrate, self.quantize, self.calibrate_data)
        if self.calibrate_data is not None:
            read_reference(self.calibrate_data)  # a missing or empty file fails before the model loads


def pick_device(name: str) -> torch.device:
    """``name`` as a torch device that exists here (``auto``: cuda, then mps, then cpu)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeltaError(f"--device {name!r} is not a torch device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeltaError(f"--device {name}: no CUDA device is visible here (torch.cuda.is_available() is False); "
                             "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeltaError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible; "
                             f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeltaError(f"--device {name}: MPS is not available here; use --device cpu")
    return dev


def bf16_speed(device: torch.device, reps: int = 3) -> float:
    """fp32 time / bf16 time of one BF16_PROBE matmul on ``device`` (best of ``reps``; > 1: bf16 is faster)."""
    m, k, n = BF16_PROBE
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=g).to(device), torch.randn(k, n, generator=g).to(device)

    def best(x: torch.Tensor, y: torch.Tensor) -> float:
        times = []
        for _ in range(reps + 1):  # the first call warms up (kernel choice, allocation)
            t0 = time.perf_counter()
            x @ y
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        return min(times[1:])

    return best(a, b) / best(a.bfloat16(), b.bfloat16())


def pick_dtype(name: str, device: torch.device) -> tuple[torch.dtype, str]:
    """(``name`` as a torch dtype, why); ``auto`` as described in the module docstring (measured on CPU)."""
    if name != "auto":
        dtype = DTYPES[name]
        if dtype is torch.float16 and device.type == "cpu":
            log.warning("--dtype fp16 on CPU: many CPU kernels are slow or missing in fp16; bf16 or fp32 is usual")
        return dtype, f"--dtype {name}"
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        return (torch.bfloat16, "--dtype auto: the GPU supports bf16") if bf16 else \
            (torch.float16, "--dtype auto: the GPU has no bf16")
    if device.type != "cpu":
        return torch.float32, f"--dtype auto on {device.type}"
    speed = bf16_speed(device)
    why = f"--dtype auto: a bf16 matmul ran {speed:.2f}x as fast as fp32 on this CPU"
    return (torch.bfloat16 if speed >= 1.0 else torch.float32), why


def load_served(spec: str, task: str, placement: Placement) -> tuple[nn.Module, object, str]:
    """(model on its device in its dtype, tokenizer or None, one line saying where and in what it runs)
    for ``deltatune serve``."""
    placement.check()
    device = pick_device(placement.device)
    dtype, why = pick_dtype(placement.dtype, device)
    if placement.quantize is None:
        model, tok, _ = load_model(spec, task, tokenizer_required=False)  # no tokenizer: serve input_ids
    else:
        path = resolve(spec)
        tok = load_tokenizer(path, spec, False, required=bool(placement.calibrate))  # calibration text needs it
        if tok is not None and tok.pad_token is None:
            tok.pad_token = tok.eos_token
        texts = read_reference(placement.calibrate_data) if placement.calibrate_data else None
        make = from_texts(placement.calibrate, texts)
        model = load_quantized(path, placement.quantize, model_cls=getattr(transformers, AUTO_CLASSES[task]),
                               dtype=dtype, calibration=make(tok) if make else None)
    model = model.to(device=device) if placement.quantize else model.to(device=device, dtype=dtype)
    where = f"{type(model).__name__} on {device}, {str(dtype).removeprefix('torch.')} ({why})"
    cal = (model_state.get(model, model_state.QUANT) or {}).get("calibrated")
    return model.eval(), tok, where + (f", {placement.quantize} linear layers" if placement.quantize else "") + (
        f" calibrated on {cal} batch(es)" if cal else "")


__all__ = ["DTYPES", "Placement", "bf16_speed", "load_served", "pick_device", "pick_dtype"]
