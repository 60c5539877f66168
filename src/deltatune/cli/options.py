"""What every command shares: ``--config FILE.yaml`` as option defaults, ``--json`` output, the
``--opt KEY=VALUE`` parser, and the one-line error contract (status 2)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from ..core.delta import DeltaError
from ..files import write_error


def load_config(ctx: typer.Context, param, value: Optional[Path]):
    """Eager ``--config``: YAML keys become defaults of the command's other options."""
    if not value:
        return value
    import yaml

    try:
        data = yaml.safe_load(Path(value).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise typer.BadParameter(f"config file {value} does not exist") from None
    except yaml.YAMLError as e:
        raise typer.BadParameter(f"{value}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{value}: expected a mapping of option names to values")
    # YAML keys are flag names ("json", "batch-size"); the parameter behind "--json" is called as_json
    by_flag = {o.lstrip("-").replace("-", "_"): p.name for p in ctx.command.params for o in p.opts
               if o.startswith("--")}
    by_flag.update({p.name: p.name for p in ctx.command.params})
    dm: dict[str, Any] = {}
    for k, v in data.items():
        key = str(k).replace("-", "_")
        if key in ("method_options", "options") and isinstance(v, dict):
            key, v = "opt", [f"{a}={json.dumps(b)}" for a, b in v.items()]
        if key not in by_flag:
            flags = sorted(o for p in ctx.command.params for o in p.opts if o.startswith("--") and o != "--config")
            raise typer.BadParameter(f"{value}: unknown option {k!r}; known: {', '.join(flags)}")
        dm[by_flag[key]] = v
    ctx.default_map = {**(ctx.default_map or {}), **dm}
    return value


ConfigOpt = typer.Option(None, "--config", help="YAML file of option values (flags override it).",
                         is_eager=True, callback=load_config, exists=False)
JsonOpt = typer.Option(False, "--json", help="Print one JSON object instead of the human summary.")


class Out:
    """Human output on stdout via rich, or logs to stderr and one JSON object at the end."""

    def __init__(self, as_json: bool):
        from rich.console import Console

        self.as_json = as_json
        self.console = Console(stderr=as_json, highlight=False, soft_wrap=True)

    def log(self, msg: str) -> None:
        self.console.print(msg, markup=False)

    def done(self, obj: dict, human) -> None:
        if self.as_json:
            sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
        else:
            human()


def parse_opts(opts: list[str] | None) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for o in opts or []:
        k, eq, v = o.partition("=")
        if not eq or not k.strip():
            raise DeltaError(f"--opt {o!r}: expected KEY=VALUE, e.g. --opt r=16 --opt targets='[q_proj,v_proj]'")
        try:
            val = yaml.safe_load(v)
        except yaml.YAMLError:
            val = v
        out[k.strip()] = exponent_number(val) if val == v.strip() else val
    return out


def exponent_number(v):
    """YAML 1.1 reads ``1e8`` and ``1e-3`` (no dot) as strings: give them their number (integers
    stay integers, so ``r=1e8`` is the rank 100000000 and is judged as such)."""
    import math

    if not isinstance(v, str) or not any(c in v for c in "eE"):
        return v
    try:
        f = float(v)
    except ValueError:
        return v
    if not math.isfinite(f):
        return v
    return int(f) if f.is_integer() and "." not in v.lower().split("e")[0] and "-" not in v.lower().split("e")[1] \
        else f


def one_line_errors(fn):
    """Commands print a DeltaError as one line on stderr and exit with status 2."""
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except DeltaError as e:
            sys.stderr.write(f"error: {e}\n")
            raise typer.Exit(2) from None
        except OSError as e:  # disk full, file-size limit, read-only or forbidden path: one line too
            w = write_error(e, e.filename or "a file")
            if w is e:
                raise
            sys.stderr.write(f"error: {w}\n")
            raise typer.Exit(2) from None

    return wrapper


FORMAT_HELP = ("causal-lm data format (default: from the columns): messages | sharegpt | alpaca | "
               "prompt-completion | text.")


QuantizeOpt = typer.Option(None, "--quantize", help="causal-lm: stream the base into nf4 (QLoRA) or int8 storage "
                           "while loading (small-memory defaults: chunked loss, gradient checkpointing when it pays).")

# train, compare and demo: the same two options, the same meaning (RunOptions.packing / .report_to)
PackingOpt = typer.Option(None, "--packing/--no-packing", help="causal-lm: several rows per sequence, each attending "
                          "only to itself (default: on when the median row is <= half of --max-length; not with "
                          "prompt/prefix).")
ReportToOpt = typer.Option("none", "--report-to", help="Experiment tracking: tensorboard, mlflow (comma-separated) "
                           "or none; needs pip install 'deltatune\\[tracking]'.")  # \\[: rich markup would eat [tracking]
