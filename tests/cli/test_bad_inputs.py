"""The bad-input corpus (`tests/cli/bad_inputs.py`) through the real CLI: every case is a
one-line error, a non-zero exit and nothing written (issue #13)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.bad_inputs import (
    CASES,
    Case,
    Workspace,
    build_workspace,
    run_case,
    unwritable_available,
)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return build_workspace(Path(tmp_path_factory.mktemp("bad-inputs")) / "ws")


def test_the_corpus_is_large_and_ids_are_unique() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) >= 60 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clean_line(case: Case, ws: Workspace) -> None:
    if case.needs == "unwritable" and not unwritable_available():
        pytest.skip("no location here that refuses writes")
    got = run_case(case, ws)
    assert got.traceback is None, got.traceback
    assert got.clean, (got.code, got.err[-2000:], got.changed)
