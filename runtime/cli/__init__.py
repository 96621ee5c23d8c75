"""The `liverstage` console script.

One typer app; each command lives in its own module here (`<name>_cmd.py`) with a
`register(app)` function. Command modules import heavy libraries (torch, onnxruntime,
matplotlib) inside the command body, never at module level, so `liverstage --help` and the
runtime commands work without torch.

Errors: a `LiverstageError` becomes one line on stderr and its exit code; any other exception
becomes one line naming its type (set LIVERSTAGE_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import os
import sys

import typer

from .. import __version__
from ..errors import LiverstageError

app = typer.Typer(
    name="liverstage",
    help="Liver fibrosis staging (A early, B middle, C last) from MRI with angular-margin losses.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"liverstage {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Liver fibrosis staging from MRI (research software, not a medical device)."""


def _register_commands() -> None:
    from . import (  # noqa: PLC0415  (order = order in --help)
        demo_cmd,
        synth_cmd,
        crops_cmd,
        train_cmd,
        evaluate_cmd,
        experiment_cmd,
        plot_cmd,
        export_cmd,
        predict_cmd,
        series_cmd,
        serve_cmd,
        jobs_cmd,
        bench_cmd,
    )

    for module in (demo_cmd, synth_cmd, crops_cmd, train_cmd, evaluate_cmd, experiment_cmd,
                   plot_cmd, export_cmd, predict_cmd, series_cmd, serve_cmd, jobs_cmd, bench_cmd):
        module.register(app)


_register_commands()


def fail(message: str, code: int = 2) -> None:
    """Print one line on stderr and exit with `code`."""
    message = " ".join(str(message).split())  # one line, always
    typer.echo(f"liverstage: error: {message}", err=True)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="liverstage", standalone_mode=True)
    except LiverstageError as exc:
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except (MemoryError, OSError, ValueError, RuntimeError) as exc:
        if os.environ.get("LIVERSTAGE_DEBUG"):
            raise
        fail(f"{type(exc).__name__}: {exc} (set LIVERSTAGE_DEBUG=1 for the traceback)", 1)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
