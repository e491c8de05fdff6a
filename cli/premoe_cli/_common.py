"""Output helpers shared by the commands: JSON and plain tables on stdout, progress on stderr."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import typer

from premoe.policy import human_bytes as human_bytes  # re-exported for the commands


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            typer.echo("  ".join("-" * w for w in widths))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def progress_enabled() -> bool:
    """Progress bars go to stderr, only when it is a terminal and -q was not given."""
    from premoe_cli.app import state

    return not state.quiet and sys.stderr.isatty()


def os_error_line(err: OSError) -> str:
    """One line for an OS error that reached the CLI edge: what failed, and on which path."""
    why = err.strerror or type(err).__name__
    where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
    return f"{why}: {where}" if where else why


_received: list[int] = []


def _exit_on_signal(signum: int, frame: Any) -> None:
    _received.append(signum)
    raise SystemExit(128 + signum)


def signal_exit_code() -> int | None:
    """128 + the signal that `signals_unwind` turned into SystemExit, if one came. An extension
    that calls back into Python may turn that SystemExit into an error of its own (safetensors
    reports a ValueError); the CLI exits with this code all the same."""
    return 128 + _received[-1] if _received else None


@contextlib.contextmanager
def signals_unwind() -> Iterator[None]:
    """SIGTERM and SIGHUP raise SystemExit(128 + signal) in the main thread, as SIGINT raises
    KeyboardInterrupt, so partial outputs are cleaned up by the same `except`/`finally` code."""
    _received.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s]
    old = {s: signal.signal(s, _exit_on_signal) for s in sigs}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def read_stdin() -> str:
    """A prompt read from stdin, as UTF-8; anything else is a one-line `UsageError`."""
    from premoe.errors import UsageError

    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:
        return sys.stdin.read()
    data = stream.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"the prompt read from stdin is not UTF-8 text (byte 0x{data[exc.start]:02x} at "
            f"offset {exc.start})"
        ) from None
