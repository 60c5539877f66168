"""The ``deltatune`` command line: train, eval, compare, inspect, merge, demo, serve.

Every command takes flags or ``--config FILE.yaml`` (keys are the flag names, ``-`` or ``_``;
flags given on the command line win), prints a human summary by default and one JSON object with
``--json`` (progress and logs then go to stderr).  Models are local directories, Hub ids (from the
local Hugging Face cache; downloaded only when the user sets ``HF_HUB_OFFLINE=0``), or GGUF files;
``trust_remote_code`` is off unless ``--trust-remote-code`` is given.  Errors print one line and exit with status 2.
"""
from __future__ import annotations

import sys

import typer

from ..core.delta import DeltaError
from ..models import configure_threads
from . import eval_cmds, serve_cmd, tools_cmds, train_cmds

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Parameter-efficient fine-tuning from the command line (deltatune).")

# one module per command group; the registration order is the order of `deltatune --help`
app.command()(train_cmds.train)
app.command("eval")(eval_cmds.eval_cmd)
app.command()(eval_cmds.compare)
app.command()(eval_cmds.importance)
app.command()(tools_cmds.inspect)
app.command()(tools_cmds.merge)
app.command()(train_cmds.demo)
app.command()(serve_cmd.serve)


# what a bug report needs: ours, then the libraries whose releases change our behaviour
VERSION_PACKAGES = ("deltatune", "torch", "transformers", "peft", "accelerate", "safetensors", "bitsandbytes")


def version_text() -> str:
    """One line per package (``not installed`` when absent), read from the installed metadata
    without importing the packages (fast, and works when one of them is broken)."""
    import platform
    from importlib import metadata

    def ver(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    lines = [f"{p} {ver(p)}" for p in VERSION_PACKAGES]
    lines.append(f"python {platform.python_version()} ({platform.system()} {platform.machine()})")
    return "\n".join(lines)


def _version(value: bool):
    if value:
        typer.echo(version_text())
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                       help="Print the versions of deltatune, torch, transformers, peft, ... and exit."),
          verbose: bool = typer.Option(False, "--verbose", help="Let library logs, warnings and transformers' own "
                                       "progress bars through to the terminal (as DELTATUNE_VERBOSE=1).")):
    """Parameter-efficient fine-tuning from the command line (deltatune)."""
    import os

    if verbose:  # read by models.verbose() wherever a library would print
        os.environ["DELTATUNE_VERBOSE"] = "1"


def main(argv: list[str] | None = None) -> None:
    """Console entry point: DeltaErrors become one line on stderr and exit status 2."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    configure_threads(int(os.environ["DELTATUNE_THREADS"]) if os.environ.get("DELTATUNE_THREADS") else None)
    try:
        app(args=argv, standalone_mode=True)
    except DeltaError as e:
        sys.stderr.write(f"error: {e}\n")
        raise SystemExit(2)


if __name__ == "__main__":
    main()
