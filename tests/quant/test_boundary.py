"""premoe.quant depends on torch (and optionally compressed-tensors) and premoe.errors only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_SCRIPT = (
    "import sys, premoe.quant, premoe.quant.kernels\n"
    "mods = sorted(m for m in sys.modules if m.startswith('premoe.'))\n"
    "print('\\n'.join(mods))\n"
)


def test_quant_imports_no_other_premoe_package() -> None:
    root = str(Path(__file__).parents[2])
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": root, "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    mods = out.stdout.split()
    assert mods and all(m == "premoe.errors" or m.startswith("premoe.quant") for m in mods), mods
