"""Run the bad-input corpus (`tests/cli/bad_inputs.py`) through the real CLI and count outcomes.

    python3 bench/bench_bad_inputs.py [--out results/bad_inputs.json] [--cases ID,ID...]

Every case should end in one ``premoe: error: ...`` line, a non-zero exit and nothing written.
Prints (and with --out writes) JSON: cases, clean errors, tracebacks (target 0), silent wrong
results (exit 0 where an error was due; target 0), cases that wrote something, and the ids of
the cases that were not clean. CPU only; builds its tiny inputs in a temporary folder (seconds).

The corpus module is loaded from this checkout by path, so the same cases can be run against
another checkout's premoe, e.g. ``PYTHONPATH=../main:../main/cli python3 bench/...`` for a
before/after comparison; a case that changes the workspace (say, deletes the model) is followed by
a restore, so it cannot spoil the cases after it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # after PYTHONPATH: another checkout's premoe may be measured


def _corpus() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "bad_inputs", ROOT / "tests" / "cli" / "bad_inputs.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bad_inputs"] = module
    spec.loader.exec_module(module)
    return module


def _restore(root: Path, pristine: Path) -> None:
    shutil.rmtree(root)
    shutil.copytree(pristine, root, symlinks=True)


def _detail(o) -> str:
    """Why a case was not clean, in one line."""
    if o.traceback is not None:
        return "traceback: " + o.traceback.strip().splitlines()[-1][:200]
    if o.silent:
        return "exit 0" + (f", wrote {len(o.changed)} path(s)" if o.changed else "")
    line = o.error_line or (o.err.strip().splitlines() or [""])[-1]
    return line[:200] + (f" (wrote {len(o.changed)} path(s))" if o.changed else "")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--cases", help="only these case ids (comma-separated)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    bad = _corpus()
    cases = list(bad.CASES)
    if args.cases:
        wanted = set(args.cases.split(","))
        cases = [c for c in cases if c.id in wanted]
    unwritable = bad.unwritable_available()
    with tempfile.TemporaryDirectory(prefix="premoe-bad-inputs-") as tmp:
        start = time.perf_counter()
        ws = bad.build_workspace(Path(tmp) / "ws")
        pristine = Path(tmp) / "pristine"
        shutil.copytree(ws.root, pristine, symlinks=True)
        built = time.perf_counter() - start
        outcomes = []
        skipped = []
        for case in cases:
            if case.needs == "unwritable" and not unwritable:
                skipped.append(case.id)
                continue
            outcome = bad.run_case(case, ws)
            outcomes.append(outcome)
            if outcome.changed:
                _restore(ws.root, pristine)
        seconds = time.perf_counter() - start
    import premoe

    result = {
        "premoe": str(Path(premoe.__file__).parent),
        **bad.summary(outcomes),
        "skipped": skipped,
        "details": {o.case.id: _detail(o) for o in outcomes if not o.clean},
        "seconds": {"workspace": round(built, 1), "total": round(seconds, 1)},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
