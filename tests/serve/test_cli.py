"""`premoe serve` refuses bad options with one line, before it opens a socket."""

from __future__ import annotations

import socket
import sys

import pytest

from premoe_cli.app import main
from tests.serve.conftest import ServeWorld


def premoe_main(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str
) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["premoe", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        main()
    return int(info.value.code or 0), capsys.readouterr().err


def test_serve_bad_options(
    serve_world: ServeWorld, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, store = str(serve_world.model), str(serve_world.store)
    cases = [
        (["--store", str(serve_world.root / "missing"), "--keep", "4"], "no pattern store"),
        (["--store", store, "--keep", "4", "--budget", "1GiB"], "not both"),
        (["--store", store], "--keep"),
        (["--store", store, "--budget", "2KiB"], "budget"),
        (["--store", store, "--keep", "1"], "keep at least 2"),
        (["--store", store, "--keep", "4", "--cache", "paged"], "--cache"),
    ]
    for extra, words in cases:
        code, err = premoe_main(capsys, monkeypatch, "serve", model, "--device", "cpu", *extra)
        assert code != 0, extra
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("premoe: error:"), err
        assert words in lines[0], (extra, err)


def test_serve_port_in_use(
    serve_world: ServeWorld, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code, err = premoe_main(
            capsys,
            monkeypatch,
            "serve",
            str(serve_world.model),
            "--store",
            str(serve_world.store),
            "--keep",
            "4",
            "--port",
            str(port),
        )
    assert code == 2 and "in use" in err
