"""PNG plots of an evaluation and of a pattern store (`premoe patterns plot`)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from premoe.errors import OutputExistsError, StoreError, UsageError
from premoe.eval.plots import coverage_curve, jaccard_matrix, plot_eval, plot_patterns
from premoe.patterns import PatternStore
from premoe_cli.app import app

runner = CliRunner()


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, checking its signature and IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR" and data[-8:-4] == b"IEND"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_pattern_plots_are_pngs_and_refuse_to_clobber(eval_store: Path, tmp_path: Path) -> None:
    paths = plot_patterns(eval_store, tmp_path / "plots", keep=4)
    assert set(paths) == {"heatmaps", "overlap", "coverage"}
    for p in paths.values():
        w, h = png_size(p)
        assert w > 200 and h > 200
    before = {n: p.read_bytes() for n, p in paths.items()}
    with pytest.raises(OutputExistsError, match="already exists"):
        plot_patterns(eval_store, tmp_path / "plots", keep=2)
    assert {n: p.read_bytes() for n, p in paths.items()} == before
    plot_patterns(eval_store, tmp_path / "plots", keep=2, metric="frequency", overwrite=True)
    with pytest.raises(StoreError, match="metric 'reap' is not in this store"):
        plot_patterns(eval_store, tmp_path / "other", metric="reap")
    with pytest.raises(UsageError, match="--keep must be between 1 and"):
        plot_patterns(eval_store, tmp_path / "other", keep=99)
    assert not (tmp_path / "other").exists()


def test_overlap_and_coverage_numbers(eval_store: Path) -> None:
    st = PatternStore.load(eval_store)
    jac = jaccard_matrix(st, st.task_names, "tcess", 4)  # [T, T]
    assert torch.allclose(jac, jac.T) and torch.allclose(jac.diagonal(), torch.ones(len(jac)))
    assert bool(((jac >= 0) & (jac <= 1)).all())
    assert torch.allclose(jaccard_matrix(st, st.task_names, "tcess", 8), torch.ones_like(jac))
    cov = coverage_curve(st.scores("add", "tcess"))  # [L, E]
    assert torch.allclose(cov[:, -1], torch.ones(cov.shape[0]), atol=1e-5)
    assert bool((cov[:, 1:] >= cov[:, :-1] - 1e-7).all())


def test_eval_plot(tmp_path: Path) -> None:
    data = {
        "model": "m",
        "tasks": ["a", "b"],
        "methods": ["tcess", "random"],
        "keeps": [2, 4, 8],
        "num_experts": 8,
        "full": {
            "a": {"kind": "accuracy", "value": 1.0, "n": 5},
            "b": {"kind": "perplexity", "value": 3.0, "n": 5},
        },
        "results": [
            {"task": t, "method": m, "keep": k, "value": v}
            for t, base in (("a", 0.5), ("b", 4.0))
            for m in ("tcess", "random")
            for k, v in ((2, base), (4, base), (8, base))
        ],
    }
    out = plot_eval(data, tmp_path / "eval.png")
    assert png_size(out)[0] > 400
    with pytest.raises(OutputExistsError):
        plot_eval(data, out)
    with pytest.raises(UsageError, match="PNG"):
        plot_eval(data, tmp_path / "eval.svg")


def test_cli_patterns_plot(eval_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "p"
    res = runner.invoke(app, ["patterns", "plot", str(eval_store), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    files = json.loads(res.stdout)
    assert sorted(files) == ["coverage", "heatmaps", "overlap"]
    assert all(png_size(Path(p)) for p in files.values())
    res = runner.invoke(app, ["patterns", "plot", str(eval_store), "--out", str(out)])
    assert res.exit_code != 0
    res = runner.invoke(
        app,
        [
            "patterns",
            "plot",
            str(eval_store),
            "-o",
            str(out),
            "--overwrite",
            "-t",
            "add",
            "-k",
            "2",
        ],
    )
    assert res.exit_code == 0 and "heatmaps" in res.stdout
