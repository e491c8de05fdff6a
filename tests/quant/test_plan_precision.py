"""`plan` at equal memory: per expert precision, the keep count that fits and what it covers."""

from __future__ import annotations

import re

import pytest
from safetensors.torch import load_file

from premoe.errors import UsageError
from premoe.plan import PRECISIONS, PrecisionRow, SizeModel, plan, recommend
from premoe.quant.export import ExpertQuantizer
from premoe.source import resolve_model
from tests.helpers import run_cli

pytest.importorskip("compressed_tensors")


def test_precision_bytes_match_the_quantized_export(tiny_checkpoint) -> None:
    folder = tiny_checkpoint("qwen3_moe")
    src = resolve_model(folder)
    sizes = SizeModel.from_source(src)
    assert sizes.expert_per_k_at("source") == sizes.expert_per_k
    for scheme in ("fp8", "int4"):
        q = ExpertQuantizer(scheme, block=(16, 16), group_size=16)
        written = 0
        for f in sorted(folder.glob("*.safetensors")):
            for key, t in load_file(f).items():
                is_expert = re.search(r"\.experts\.0\.", key) is not None
                for out in q(key, t, expert_weight=is_expert).values():
                    written += out.numel() * out.element_size() if is_expert else 0
        got = sizes.expert_per_k_at(scheme, block=(16, 16), group_size=16)
        assert got == written
        assert got < sizes.expert_per_k


def test_equal_memory_rows_and_recommendation(tiny_checkpoint) -> None:
    src = resolve_model(tiny_checkpoint("qwen3_moe"))
    sizes = SizeModel.from_source(src)
    budget = sizes.resident(3)  # fits 3 at the source precision, more when quantized
    p = plan(src, budget=budget, precisions=PRECISIONS)
    rows = {r.precision: r for r in p.precisions or []}
    assert list(rows) == list(PRECISIONS)
    assert rows["source"].keep == 3
    assert rows["fp8"].keep is not None and rows["int4"].keep is not None
    assert rows["fp8"].keep == rows["int4"].keep == 8  # every expert fits at both
    assert p.fits == rows["source"].keep
    for r in rows.values():
        assert r.resident_bytes is not None and r.resident_bytes <= budget
    # no store: coverage is K / E; on a tie the higher precision wins
    assert p.recommended is rows["fp8"]
    # a budget only int4 fits is no error
    tight = sizes.resident_at(2, "int4")
    if sizes.resident(2) > tight:
        q = plan(src, budget=tight, precisions=PRECISIONS)
        assert q.fits is None and q.recommended is not None
        assert q.recommended.precision == "int4"
    with pytest.raises(UsageError, match="unknown precision"):
        plan(src, budget=budget, precisions=["nf4"])


def test_recommend_prefers_precision_within_slack() -> None:
    rows = [
        PrecisionRow("source", 100, 8, 1000, 0.90, 0.950),
        PrecisionRow("fp8", 50, 16, 1000, 0.95, 0.955),
        PrecisionRow("int4", 26, 30, 1000, 0.99, 0.990),
    ]
    assert recommend(rows, 64).precision == "int4"
    rows[2] = PrecisionRow("int4", 26, 30, 1000, 0.96, 0.962)
    assert recommend(rows, 64).precision == "fp8"
    assert recommend([PrecisionRow("source", 1, None, None)], 64) is None


def test_plan_cli_prints_precision_table(tiny_checkpoint, capsys) -> None:
    folder = tiny_checkpoint("qwen3_moe")
    sizes = SizeModel.from_source(resolve_model(folder))
    budget = str(sizes.resident_at(6, "int4"))
    code, out, err = run_cli(["plan", str(folder), "--budget", budget], capsys)
    assert code == 0, err
    assert "per expert precision" in out and "recommended: int4" in out
    assert re.search(r"fp8\s", out) and "--quantize int4" in out
