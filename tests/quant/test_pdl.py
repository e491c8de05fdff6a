"""premoe.quant.pdl: when premoe's kernels are launched with programmatic dependent launch."""

from __future__ import annotations

import importlib

import pytest
import torch

from premoe.quant import pdl


def test_only_cuda_devices_launch_with_pdl(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not pdl.active(torch.device("cpu"))  # the interpreter's tensors: never
    assert pdl.launch_options(False) == {}  # older Tritons know no launch_pdl option
    assert pdl.launch_options(True) == {"launch_pdl": True}
    asked: list[int] = []
    monkeypatch.setattr(pdl, "_capable", lambda index: asked.append(index) or index == 1)
    monkeypatch.setattr(pdl, "ENABLED", True)
    assert pdl.active(torch.device("cuda", 1)) and not pdl.active(torch.device("cuda", 0))
    monkeypatch.setattr(pdl, "ENABLED", False)  # switched off: the device is not even asked
    assert not pdl.active(torch.device("cuda", 1))
    assert asked == [1, 0]


@pytest.mark.parametrize(("value", "on"), [(None, True), ("1", True), ("0", False)])
def test_premoe_pdl_environment_switch(
    monkeypatch: pytest.MonkeyPatch, value: str | None, on: bool
) -> None:
    """On by default; PREMOE_PDL=0 turns it off (read when the module is imported)."""
    if value is None:
        monkeypatch.delenv("PREMOE_PDL", raising=False)
    else:
        monkeypatch.setenv("PREMOE_PDL", value)
    try:
        assert importlib.reload(pdl).ENABLED is on
    finally:
        monkeypatch.undo()
        importlib.reload(pdl)
