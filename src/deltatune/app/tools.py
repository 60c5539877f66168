"""The work behind ``deltatune eval``, ``compare``, ``inspect`` and ``merge`` (printing stays in
:mod:`deltatune.cli`).  Each function returns a JSON-able dict."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch

import deltatune as dt
from ..models import load_quantized_model
from ..quant.load import base_mismatch
from .calibration import check_calibrate, from_examples
from .export import Exported, check_options, export_merged
from ..vision.classifier import is_vision_spec
from .full_eval import evaluate_base, evaluate_full, full_run_dir

from ..core.delta import DeltaError, iter_delta_layers
from ..core.tasks import task_of
from ..core.targets import HEAD_NAMES, find_targets
from ..data.examples import load_examples
from ..data.reference_text import TEXTS
from ..files import atomic_write, atomic_write_json
from ..models import load_model, quiet_transformers, resolve
from ..storage import model_card
from ..storage.adapter import CONFIG, MANIFEST, read_adapter_dir, sha256
from .evaluate import Forgetting, MAIN_METRIC, read_reference, task_metrics
from .run import (FULL_LR, HEADLESS_LR_FACTOR, MAX_LENGTH, METRICS_FILE, collate_for, default_lr,
                  encode_examples, read_task, real_model_name, set_chat_template)

RUN_TASKS = ("classify", "causal-lm", "image-classify")  # the core.tasks tasks `deltatune train` runs


def adapter_dir(path: str | Path) -> Path:
    """Accept an adapter directory or a run directory that holds ``adapter/``."""
    p = Path(path)
    if (p / "adapter").is_dir() and not (p / CONFIG).exists():
        return p / "adapter"
    if not p.is_dir():
        raise DeltaError(f"adapter directory {p} does not exist")
    return p


def _manifest(d: Path) -> dict:
    f = d / MANIFEST
    return json.loads(f.read_text(encoding="utf-8")) if f.exists() else {}


def _base_and_task(d: Path, model: str | None, task: str | None) -> tuple[str, str, dict]:
    info = read_task(d)
    man = _manifest(d)
    base = model or info.get("base_model") or man.get("base_model", {}).get("name_or_path")
    if not base:
        try:
            base = json.loads((d / CONFIG).read_text()).get("base_model_name_or_path")
        except (OSError, json.JSONDecodeError):
            base = None
    if not base:
        raise DeltaError(f"{d}: the base model is not recorded; pass --model")
    cls = man.get("base_model", {}).get("class", "")
    task = task or info.get("task") or (task_of(cls) if task_of(cls) in RUN_TASKS else None)
    if task is None:
        raise DeltaError(f"{d}: cannot tell the task (base class {cls or 'unknown'}); pass --task")
    return base, task, info


def load_with_adapter(adapter: str | Path, model: str | None = None, task: str | None = None,
                      trust_remote_code: bool = False, quantize: str | None = None, calibration=None):
    """(model with the adapter loaded, tokenizer, task, info, adapter dir, base spec).  With
    ``quantize`` the base is streamed into nf4/int8 storage (``models.load_quantized_model``;
    ``calibration``: tokenizer -> batches for calibrated NF4 scales, app/calibration.py)."""
    d = adapter_dir(adapter)
    base, task, info = _base_and_task(d, model, task)
    labels = info.get("label_names") or None
    torch.manual_seed(info.get("seed", 0))  # a fresh head (under dt.disabled) initialised as in train's "before"
    if quantize:
        m, proc, _ = load_quantized_model(base, quantize, task, trust_remote_code, calibration=calibration)
    else:
        m, proc, _ = load_model(base, task, labels, trust_remote_code,
                                weights=info.get("weights") if model is None else None, image_size=info.get("image_size"))
    dt.load(m, d)
    return m, proc, task, info, d, base


def quantization_warning(d: Path, quantize: str | None) -> str | None:
    """One line when the adapter in ``d`` was trained on a base of the other kind (4-bit vs float)."""
    recorded = _manifest(d).get("base_model", {}).get("quantization")
    return base_mismatch(recorded, quantize)


def evaluate_adapter(adapter, data, model=None, task=None, reference=None, batch_size=32, trust_remote_code=False,
                     columns: dict | None = None, weights: str | None = None, image_size: int | None = None,
                     quantize: str | None = None, log: Callable[[str], None] | None = None, calibrate: int = 0) -> dict:
    """``eval``: an adapter (or a run holding adapter/) against its base with the adapter disabled;
    a ``--method full`` run against the base recorded at train time (:mod:`.full_eval`); with no
    adapter, the base ``model`` alone."""
    if adapter is None:
        if model is None:
            raise DeltaError("eval needs --adapter RUN (an adapter or a training run) or --model MODEL (a base model)")
        return evaluate_base(model, data, task, batch_size, trust_remote_code, columns, weights, image_size)
    if weights or image_size:
        raise DeltaError("--weights/--image-size are for --model without --adapter; a run records its own")
    if full_run_dir(adapter) is not None:
        return evaluate_full(adapter, data, model=model, task=task, reference=reference, batch_size=batch_size,
                             trust_remote_code=trust_remote_code, columns=columns)
    check_calibrate(calibrate, quantize)
    warning = quantization_warning(adapter_dir(adapter), quantize)
    if warning and log is not None:
        log(f"warning: {warning}")
    _, task, info = _base_and_task(adapter_dir(adapter), model, task)
    cols = {k: v for k, v in (info.get("columns") or {}).items()}
    cols.update({k: v for k, v in (columns or {}).items() if v is not None})
    ex = load_examples(task, data, label_names=info.get("label_names") or None, **cols)
    max_length, train_on = info.get("max_length") or MAX_LENGTH[task], info.get("train_on") or "responses"
    template = lambda tok: set_chat_template(tok, info.get("chat_template"))  # noqa: E731  (as at training)
    m, proc, task, info, d, base = load_with_adapter(adapter, model, task, trust_remote_code, quantize,
                                                     from_examples(ex, calibrate, batch_size, max_length, train_on, template))
    template(proc)
    feats = encode_examples(ex, proc, max_length, train_on)
    coll = collate_for(proc)
    metrics = task_metrics(task, m, feats, coll, batch_size)
    with dt.disabled(m):
        base_metrics = task_metrics(task, m, feats, coll, batch_size)
    tok = proc if task != "image-classify" else None
    fg = Forgetting(tok, task, read_reference(reference) if reference else None).snapshot(m).measure(m)
    return {"adapter": str(d), "kind": "adapter", "base_model": base, "task": task, "data": str(data), "rows": len(ex),
            "metrics": metrics, "base_metrics": base_metrics, "forgetting": fg, "quantize": quantize,
            "warnings": [warning] if warning else []}


# --------------------------------------------------------------------------- compare

def compare_methods(methods: list[str], model: str, data: str, task: str, output: str, max_steps: int,
                    batch_size: int, seed: int, full: bool, extra: dict[str, Any],
                    log: Callable[[str], None] = print) -> dict:
    """Train each method in a fresh process (so peak memory is per method) on the same budget."""
    out = Path(output)
    rows, skipped = [], []
    todo = list(dict.fromkeys(methods + (["full"] if full and "full" not in methods else [])))
    for m in todo:
        if m != "full" and m not in dt.METHODS:
            skipped.append({"method": m, "reason": f"not registered in dt.METHODS (available: {sorted(dt.METHODS)})"})
            log(f"skip {m}: not registered (available: {', '.join(sorted(dt.METHODS))})")
            continue
        cmd = [sys.executable, "-m", "deltatune.cli", "train", "--model", model, "--data", data, "--task", task,
               "--method", m, "--output", str(out / m), "--max-steps", str(max_steps), "--batch-size",
               str(batch_size), "--seed", str(seed), "--overwrite", "--no-progress", "--json"]
        for k, v in extra.items():  # True: a bare flag (--packing); anything else: --flag VALUE
            cmd += [k] if v is True else [k, str(v)]
        log(f"train {m} ...")
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            reason = (p.stderr.strip().splitlines() or ["failed"])[-1]
            skipped.append({"method": m, "reason": reason})
            log(f"skip {m}: {reason}")
            continue
        r = json.loads(p.stdout)
        fg = r.get("forgetting") or {}
        rows.append({"method": m, "metric": r["after"][r["metric"]], "metric_name": r["metric"],
                     "metric_before": r["before"][r["metric"]], "forgetting": fg.get("value"),
                     "forgetting_kind": fg.get("kind"), "trainable_params": r["trainable_params"],
                     "trainable_percent": r["trainable_percent"], "peak_rss_mb": r["peak_rss_mb"],
                     "wall_time_s": r["train_time_s"], "artifact_bytes": r["artifact_bytes"],
                     "artifact": r["artifact"]})
        log(f"  {m}: {r['metric']} {rows[-1]['metric']:.4f}, {r['trainable_params']:,} trainable, "
            f"{r['train_time_s']:.1f} s")
    metric, greater = MAIN_METRIC[task]
    res = {"metric": metric, "greater_is_better": greater, "max_steps": max_steps, "rows": rows,
           "skipped": skipped, "plot": str(out / "pareto.png"), "table": str(out / "compare.json")}
    if rows:
        pareto_plot(rows, out / "pareto.png", metric, greater)
    else:
        res["plot"] = None
    atomic_write_json(out / "compare.json", res)
    return res


def pareto_front(rows: list[dict], greater: bool) -> list[str]:
    """Methods no other method beats on both fewer trainable params and a better metric."""
    def better(a, b):
        ma, mb = (a["metric"], b["metric"]) if greater else (-a["metric"], -b["metric"])
        return (a["trainable_params"] <= b["trainable_params"] and ma >= mb
                and (a["trainable_params"] < b["trainable_params"] or ma > mb))
    return [r["method"] for r in rows if not any(better(o, r) for o in rows if o is not r)]


def pareto_plot(rows: list[dict], path: Path, metric: str, greater: bool) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = set(pareto_front(rows, greater))
    fig, ax = plt.subplots(figsize=(6.6, 4), dpi=100)
    # colour = forgetting (drift / perplexity change on general data): a method can sit on the
    # accuracy/size front and still forget more than another; grey = not measured
    fg = [r.get("forgetting") for r in rows]
    known = [v for v in fg if v is not None]
    norm = matplotlib.colors.Normalize(vmin=min(known + [0.0]), vmax=max(known + [1e-9])) if known else None
    cmap = matplotlib.colormaps["plasma"]
    for r, v in zip(rows, fg):
        on = r["method"] in front
        ax.scatter(r["trainable_params"], r["metric"], s=90 if on else 60, zorder=3,
                   color=cmap(norm(v)) if v is not None else "tab:gray",
                   edgecolors="tab:red" if on else "none", linewidths=2)
        ax.annotate(r["method"], (r["trainable_params"], r["metric"]), textcoords="offset points", xytext=(5, 5))
    if known:
        kind = next((r.get("forgetting_kind") for r in rows if r.get("forgetting") is not None), None) or "forgetting"
        fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax,
                     label=f"forgetting ({kind.replace('_', ' ')}{', %' if kind == 'perplexity_change' else ''})")
    pts = sorted((r["trainable_params"], r["metric"]) for r in rows if r["method"] in front)
    if len(pts) > 1:
        ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", color="tab:red", alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel(f"{metric} ({'higher' if greater else 'lower'} is better)")
    ax.set_title("metric vs trainable parameters (red ring = Pareto front)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(path, buf.getvalue())


# --------------------------------------------------------------------------- inspect

def inspect_adapter(d: Path) -> dict:
    man = _manifest(d)
    files = []
    for f in sorted(d.iterdir()):
        if not f.is_file():
            continue
        meta = man.get("files", {}).get(f.name)
        entry = {"name": f.name, "bytes": f.stat().st_size}
        if meta:
            data = f.read_bytes()
            entry["checksum"] = "ok" if (len(data) == meta.get("bytes") and sha256(data) == meta.get("sha256")) else "MISMATCH"
        elif f.name == MANIFEST:
            entry["checksum"] = "(the manifest)"
        files.append(entry)
    try:
        tensors, method, cfg, name = read_adapter_dir(d, verify=True)
        integrity, err = "ok", None
    except DeltaError as e:
        integrity, err, tensors, method, cfg = "FAILED", str(e), {}, man.get("method"), None
    by_module: Counter = Counter()
    for k, t in tensors.items():
        mod = k.split(".lora_")[0] if ".lora_" in k else k.rsplit(".", 1)[0]
        by_module[mod] += t.numel()
    return {"kind": "adapter", "path": str(d), "method": method, "integrity": integrity, "error": err,
            "files": files, "config": cfg.to_dict() if cfg is not None else man.get("config"),
            "base_model": man.get("base_model"), "task": read_task(d) or None,
            "tensors": [{"key": k, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                        for k, t in sorted(tensors.items())],
            "params": sum(t.numel() for t in tensors.values()), "params_by_module": dict(sorted(by_module.items()))}


def inspect_model(spec: str, task: str | None, method: str, options: dict, trust_remote_code: bool) -> dict:
    import transformers

    quiet_transformers()
    if task or is_vision_spec(spec):
        model, _, path = load_model(spec, task or "image-classify", None, trust_remote_code)
    else:
        path = resolve(spec)
        model = transformers.AutoModel.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    types = Counter(type(m).__name__ for _, m in model.named_modules())
    total = sum(p.numel() for p in model.parameters())
    cands: dict[str, Any] = {}
    for name in ("all-linear", "attention"):
        try:
            cands[name] = find_targets(model, name)
        except DeltaError as e:
            cands[name] = str(e)
    heads = [n for n, _ in model.named_modules() if n and n.rsplit(".", 1)[-1] in HEAD_NAMES]
    dt.attach(model, method, **options)
    per_layer = {p: sum(x.numel() for x in layer.deltas["default"].parameters())
                 for p, layer in iter_delta_layers(model) if "default" in layer.deltas}
    inside = set()
    for p, layer in iter_delta_layers(model):
        if "default" in layer.deltas:
            inside |= {id(x) for x in layer.deltas["default"].parameters()}
    for k, t in dt.adapter_tensors(model, "default").items():  # selectors' tensors outside DeltaLayers
        if id(t) not in inside:
            mod = k.rsplit(".", 1)[0]
            per_layer[mod] = per_layer.get(mod, 0) + t.numel()
    counts = dt.trainable_parameters(model)
    return {"kind": "model", "path": path, "class": type(model).__name__, "params": total,
            "module_types": dict(types.most_common()), "candidate_targets": cands, "heads": heads,
            "method": method, "method_options": options, "trainable_params": counts.trainable,
            "trainable_percent": counts.percent, "trainable_by_layer": per_layer,
            "methods_available": sorted(dt.METHODS)}


def inspect_path(path: str, task=None, method="lora", options=None, trust_remote_code=False) -> dict:
    p = Path(path)
    if p.is_dir() and ((p / CONFIG).exists() or (p / MANIFEST).exists()
                       or (p / "adapter").is_dir()):
        return inspect_adapter(adapter_dir(p))
    return inspect_model(path, task, method, options or {}, trust_remote_code)


def quantization_note(q: dict | None) -> str:
    """How the adapter's base was stored at training, for ``inspect``: '' (float), ', nf4 base
    (calibrated on 8 batches)'."""
    if not q:
        return ""
    cal = q.get("calibrated")
    how = f"calibrated on {cal} batch(es)" if cal else "absmax scales" if q.get("scheme") == "nf4" else ""
    return f", {q.get('scheme')} base" + (f" ({how})" if how else "")


def print_inspect(out, res: dict) -> None:
    from rich.table import Table

    if res["kind"] == "adapter":
        out.log(f"adapter {res['path']}: method {res['method']}, integrity {res['integrity']}"
                + (f" ({res['error']})" if res["error"] else ""))
        if res.get("base_model"):
            out.log(f"base model: {res['base_model'].get('class')} from {res['base_model'].get('name_or_path')}"
                    + quantization_note(res["base_model"].get("quantization")))
        t = Table(title="files")
        t.add_column("file")
        t.add_column("bytes", justify="right")
        t.add_column("checksum")
        for f in res["files"]:
            t.add_row(f["name"], f"{f['bytes']:,}", f.get("checksum", "(not in manifest)"))
        out.console.print(t)
        t = Table(title=f"{len(res['tensors'])} tensors, {res['params']:,} parameters")
        t.add_column("module")
        t.add_column("params", justify="right")
        for k, v in res["params_by_module"].items():
            t.add_row(k, f"{v:,}")
        out.console.print(t)
        out.log(f"config: {json.dumps(res['config'])}")
        return
    out.log(f"model {res['class']} ({res['params']:,} parameters) from {res['path']}")
    out.log("module types: " + ", ".join(f"{k} x{v}" for k, v in list(res["module_types"].items())[:12]))
    for k, v in res["candidate_targets"].items():
        shown = v if isinstance(v, str) else f"{len(v)} modules, e.g. {v[:4]}"
        out.log(f"targets {k!r}: {shown}")
    out.log(f"heads (left out of 'all-linear'): {res['heads']}")
    t = Table(title=f"{res['method']} {res['method_options'] or ''}: trainable {res['trainable_params']:,} "
                    f"({res['trainable_percent']:.3f}%)")
    t.add_column("layer")
    t.add_column("trainable", justify="right")
    for k, v in res["trainable_by_layer"].items():
        t.add_row(k, f"{v:,}")
    out.console.print(t)
    out.log(f"methods available: {', '.join(res['methods_available'])}")


# --------------------------------------------------------------------------- merge

def _write_merged_card(out: Path, adapter_dir: Path, base: str, task: str, info: dict, fmt: str = "safetensors",
                       files: list[str] | None = None) -> None:
    """README.md of a merged model: the base, the adapter it came from, and that run's results."""
    manifest = json.loads((adapter_dir / MANIFEST).read_text(encoding="utf-8")) \
        if (adapter_dir / MANIFEST).exists() else {}
    run_file = adapter_dir.parent / METRICS_FILE  # train's run directory, when the adapter came from one
    run = json.loads(run_file.read_text(encoding="utf-8")) if run_file.exists() else {}
    before, after = run.get("before") or {}, run.get("after") or {}
    model_card.write(out, model_card.card(
        base_model=real_model_name(base), method=info.get("method") or manifest.get("method", "adapter"),
        method_config=manifest.get("config"), task=task, merged_from=str(adapter_dir.resolve()),
        datasets=[Path(run["data"]).name] if run.get("data") else None,
        metrics={k: (before.get(k), v) for k, v in after.items()} or None, main_metric=run.get("metric"),
        forgetting=run.get("forgetting"), gguf_file=(files or [None])[0] if fmt == "gguf" else None,
        pooling=run.get("pooling")))


def merge_adapter(adapter, output, model=None, task=None, force=False, trust_remote_code=False,
                  fmt: str = "safetensors", dtype: str = "fp32") -> dict:
    import torch

    check_options(fmt, dtype)
    out = Path(output)
    if out.exists() and any(out.iterdir()) and not force:
        raise DeltaError(f"output directory {out} exists and is not empty; pass --force to replace it")
    m, proc, task, info, d, base = load_with_adapter(adapter, model, task, trust_remote_code)
    m.eval()
    if task == "image-classify":
        c = m.config
        x = {"pixel_values": torch.randn(2, getattr(c, "num_channels", 3), c.image_size, c.image_size,
                                         generator=torch.Generator().manual_seed(0))}
    else:
        x = dict(proc(list(TEXTS[:4]), padding=True, return_tensors="pt"))
    with torch.no_grad():
        want = m(**x).logits
    merged = dt.merge(m)
    with torch.no_grad():
        got = merged(**x).logits
    diff = float((want - got).abs().max())
    if not torch.isfinite(got).all():
        raise DeltaError("the merged model produces NaN/Inf; refusing to write it")

    def extra(tmp: Path, written: Exported) -> None:  # provenance and the card join the same atomic swap
        if info:
            atomic_write_json(tmp / "deltatune_merge.json", {"adapter": str(d), "base_model": base, **info})
        _write_merged_card(tmp, d, base, task, info, fmt, written.files)

    res = export_merged(merged, proc, out, fmt, dtype, inputs=x, task=task, extra=extra)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {"adapter": str(d), "base_model": base, "output": str(out), "class": type(merged).__name__,
            "format": fmt, "dtype": dtype, "files": res.files, "bytes": size, "check_max_abs_diff": diff,
            **res.check}


def print_methods(out) -> None:
    """``deltatune inspect --methods``: the method registry, one row per method (or JSON)."""
    import dataclasses

    # every column comes from the method's registry entry (core/method.py's Method)
    rows = [{"name": n, "summary": m.summary, "peft_type": m.peft_type, "mergeable": m.mergeable,
             "default_targets": m.default_targets, "default_lr": m.default_lr,
             "default_lr_by_task": {task: default_lr(n, task) for task in RUN_TASKS},
             "options": [f.name for f in dataclasses.fields(m.config_cls)]}
            for n, m in sorted(dt.METHODS.items())]

    def human():
        from rich.table import Table

        t = Table(title="methods (deltatune train --method NAME -o KEY=VALUE); "
                        f"lr x{HEADLESS_LR_FACTOR['causal-lm']:g} for causal LMs")
        for c in ("method", "what it trains", "default targets", "lr", "merge"):
            t.add_column(c)
        for r in rows:
            t.add_row(r["name"], r["summary"], r["default_targets"], f"{r['default_lr']:g}",
                      "yes" if r["mergeable"] else "no")
        t.add_row("full", "every weight (the reference in `compare`)", "every weight", f"{FULL_LR:g}", "-")
        out.console.print(t)

    out.done({"methods": rows}, human)


def command_line(ctx) -> str:
    """The command as given (for the model card), rebuilt from the options click parsed from the
    command line or the --config file, so it is the same whether run as `deltatune`, `python -m`
    or in-process."""
    import shlex

    words = ["deltatune", ctx.info_name or ""]
    for p in ctx.command.params:
        src = ctx.get_parameter_source(p.name)
        v = ctx.params.get(p.name)
        if p.name == "config" or getattr(src, "name", "") not in ("COMMANDLINE", "DEFAULT_MAP") or v is None:
            continue
        flag = p.opts[0]
        if getattr(p, "is_flag", False) or isinstance(v, bool):
            words.append(flag if v else (p.secondary_opts[0] if p.secondary_opts else ""))
            continue
        for item in v if isinstance(v, (list, tuple)) else [v]:
            words += [flag, str(item)]
    return shlex.join(w for w in words if w)
