"""Memory as the operating system sees this process, not as tensor bytes.

Two numbers make a training process's footprint on Linux:

    anonymous pages (RssAnon)  heap, tensors, optimizer state: cannot be dropped, only swapped
    file pages still mapped    e.g. an fp32 safetensors checkpoint that transformers memory-maps
                               and keeps mapped as the model's own weights (RssFile)

A :class:`MemoryTrace` samples RssAnon on a thread every ``interval`` seconds (2 ms by default:
peaks of loading transients last tens of ms) and records named phases, so a loader or a training
step can be charged with its own peak.  :func:`release_to_os` hands glibc's freed-but-kept heap
back to the kernel (``malloc_trim``), feature-detected: on other C libraries it does nothing.

Linux only (``/proc/self/status``); elsewhere :func:`rss_kib` raises a DeltaError.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from dataclasses import dataclass, field

from .delta import DeltaError

STATUS = "/proc/self/status"
FIELDS = ("RssAnon", "RssFile", "VmRSS", "VmHWM")


def rss_kib() -> dict[str, int]:
    """{RssAnon, RssFile, VmRSS, VmHWM} of this process in KiB."""
    try:
        with open(STATUS, "rb") as f:
            text = f.read()
    except OSError:
        raise DeltaError(f"{STATUS} is not readable; process memory tracing needs Linux's /proc") from None
    out = {}
    for line in text.split(b"\n"):
        key, _, rest = line.partition(b":")
        k = key.decode()
        if k in FIELDS:
            out[k] = int(rest.split()[0])
    return out


def anon_kib() -> int:
    with open(STATUS, "rb") as f:  # the hot path of the sampler: one read, one scan
        text = f.read()
    i = text.index(b"RssAnon:")
    return int(text[i + 8:text.index(b"kB", i)])


def _libc(fn_name: str, argtypes):
    name = ctypes.util.find_library("c")
    try:
        fn = getattr(ctypes.CDLL(name), fn_name)  # glibc only
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return fn


_TRIM = _libc("malloc_trim", [ctypes.c_size_t])
_MALLOPT = _libc("mallopt", [ctypes.c_int, ctypes.c_int])
M_MMAP_THRESHOLD = -3  # glibc's malloc.h
# Tensors at least this large get their own mmap and go back to the kernel when freed.  glibc's
# default starts at 128 KiB but *raises* the threshold (up to 32 MiB) each time such a block is
# freed, after which per-step temporaries (a dequantized NF4 weight: out·in·4 bytes) are carved
# from the heap and stay resident: on the 110M Llama, NF4 LoRA training held 418 MiB of anonymous
# memory with the moving threshold, 243 MiB with it fixed (bench/quant.py, docs/benchmarks.md).
HEAP_MMAP_THRESHOLD = 256 * 1024
_HEAP_CAPPED = False


def release_to_os() -> bool:
    """Give freed heap pages back to the kernel.  glibc keeps freed blocks below its mmap
    threshold in the heap (and in per-thread arenas) for reuse: after loading a model tensor by
    tensor, hundreds of MiB can stay resident although nothing uses them.  True when trimmed."""
    return bool(_TRIM(0)) if _TRIM is not None else False


def cap_heap_cache(threshold: int = HEAP_MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes (setting it turns off the moving
    threshold), so large freed tensors return to the OS at once instead of staying in the heap.
    Process-wide and idempotent; the quantized-training path calls it.  True when applied."""
    global _HEAP_CAPPED
    if _MALLOPT is None:
        return False
    if not _HEAP_CAPPED:
        _HEAP_CAPPED = bool(_MALLOPT(M_MMAP_THRESHOLD, int(threshold)))
    return _HEAP_CAPPED


@dataclass
class Phase:
    name: str
    anon_mib: float  # RssAnon at the end of the phase
    peak_anon_mib: float  # highest RssAnon sampled during the phase
    file_mib: float  # RssFile at the end of the phase
    seconds: float


@dataclass
class MemoryTrace:
    """RssAnon sampled every ``interval`` s on a daemon thread; ``phase(name)`` closes a phase.
    Values are MiB above the baseline taken at ``start()`` (anon) / file pages likewise."""
    interval: float = 0.002
    phases: list[Phase] = field(default_factory=list)

    def start(self) -> "MemoryTrace":
        r = rss_kib()
        self._base_anon, self._base_file = r["RssAnon"], r["RssFile"]
        self._peak = self._phase_peak = r["RssAnon"]
        self._t = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dt-memtrace", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            a = anon_kib()
            if a > self._phase_peak:
                self._phase_peak = a
                if a > self._peak:
                    self._peak = a

    def phase(self, name: str) -> Phase:
        r = rss_kib()
        a = r["RssAnon"]
        self._phase_peak = max(self._phase_peak, a)
        self._peak = max(self._peak, a)
        now = time.perf_counter()
        p = Phase(name, (a - self._base_anon) / 1024, (self._phase_peak - self._base_anon) / 1024,
                  (r["RssFile"] - self._base_file) / 1024, now - self._t)
        self.phases.append(p)
        self._phase_peak, self._t = a, now
        return p

    @property
    def peak_anon_mib(self) -> float:
        return (max(self._peak, anon_kib()) - self._base_anon) / 1024

    def stop(self) -> "MemoryTrace":
        self._stop.set()
        self._thread.join()
        return self

    def __enter__(self) -> "MemoryTrace":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def as_rows(self) -> list[dict]:
        return [p.__dict__ for p in self.phases]
