"""The `premoe` command: a thin typer front end over the premoe library.

Library errors (`premoe.errors.PremoeError`) become one line on stderr and a non-zero exit code;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Annotated

import typer

import premoe
from premoe.errors import PremoeError
from premoe_cli._common import os_error_line, signal_exit_code, signals_unwind
from premoe_cli.archs import archs
from premoe_cli.demo_cmd import demo_command
from premoe_cli.eval_cmd import eval_command
from premoe_cli.export_cmd import export_command
from premoe_cli.generate_cmd import generate_command
from premoe_cli.inspect_cmd import inspect
from premoe_cli.patterns_cmd import patterns_app
from premoe_cli.plan_cmd import plan_command
from premoe_cli.profile_cmd import profile_command
from premoe_cli.route_cmd import route_command
from premoe_cli.serve_cmd import serve_command


@dataclass
class _State:
    quiet: bool = False
    verbose: int = 0


state = _State()

app = typer.Typer(
    name="premoe",
    help="Run huge Mixture-of-Experts models in far less memory: profile which experts each task "
    "uses, route queries to task patterns, export pruned checkpoints, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"premoe {premoe.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="More log output (-vv: debug).")
    ] = 0,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Only errors; no progress bars.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    state.quiet, state.verbose = quiet, verbose
    level = (
        logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    )
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("transformers", "httpx", "urllib3", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


app.command("archs")(archs)
app.command("inspect")(inspect)
app.command("profile")(profile_command)
app.add_typer(patterns_app, name="patterns")
app.command("route")(route_command)
app.command("plan")(plan_command)
app.command("export")(export_command)
app.command("generate")(generate_command)
app.command("serve")(serve_command)
app.command("eval")(eval_command)
app.command("demo")(demo_command)


def main() -> None:
    """Console entry point: usage errors are handled by typer; library errors, and OS errors
    (unreadable, unwritable or full locations), become one line; SIGTERM/SIGHUP unwind like
    SIGINT, so partial outputs are removed."""
    try:
        with signals_unwind():
            app()
    except SystemExit:
        raise
    except BaseException as err:
        code = signal_exit_code()
        if code is not None:  # stopped by SIGTERM/SIGHUP; the partial output is already gone
            sys.exit(code)
        if isinstance(err, PremoeError):
            typer.echo(f"premoe: error: {err}", err=True)
            sys.exit(err.exit_code)
        if isinstance(err, OSError):
            typer.echo(f"premoe: error: {os_error_line(err)}", err=True)
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
