"""Run by test_miss.py under Triton's CPU interpreter: `meter_fold.fold` folds what the eager
meter pass folds (`MissMeter._from_logits`, `RowMeter._share`, `SlotAccumulator.add_rows`) for
every scoring it takes, with and without a logit bias and a selection-only correction; and a
captured step of tiny models (softmax, sigmoid with a
correction, a logit bias) meters through it as an eager step does."""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

from premoe.arch.routing import RoutingRule
from premoe.load.miss import FullRouterRows
from premoe.prune import KeepSets
from premoe.serve import meter_fold
from premoe.serve.miss import RowMeter, SlotAccumulator, SlotMiss
from premoe.source import resolve_model
from tests.helpers import save_with_tokenizer, tiny_model

SUMS = ("sum", "max_layer", "max_token", "win_sum", "count", "win_count")


def eager_meter(rows: FullRouterRows, scoring: str, k: int, masks: torch.Tensor) -> RowMeter:
    """A RowMeter's measuring state without a model (its eager pass reads nothing else)."""
    meter = RowMeter.__new__(RowMeter)
    e = rows.weight.shape[1]
    meter.rows, meter.scoring, meter.masks = rows, scoring, masks
    meter.rule = RoutingRule(scoring, "scores", e, k, False)
    meter._layer_ids = torch.arange(rows.weight.shape[0])
    return meter


def kernel() -> None:
    g = torch.Generator().manual_seed(0)
    for scoring in meter_fold.SCORINGS:
        for has_bias, has_corr in ((False, False), (True, False), (False, True)):
            for n_layers, b, e, k, p in ((3, 1, 128, 8, 2), (20, 5, 256, 8, 3), (4, 3, 60, 2, 1)):
                bias = torch.randn(n_layers, e, generator=g) if has_bias else None
                corr = torch.rand(n_layers, e, generator=g) * 0.1 if has_corr else None
                rows = FullRouterRows(list(range(n_layers)), torch.empty(n_layers, e, 1), bias,
                                      corr)  # fmt: skip
                masks = (torch.rand(p, n_layers, e, generator=g) < 0.6).float()  # [P, L, E]
                logits = torch.randn(n_layers, b, e, generator=g)  # [L, B, E] fp32: no ties
                tok = torch.randint(0, p, (b,), generator=g)
                live = (torch.arange(b) % 3 != 1).float()
                want, got = SlotAccumulator(n_layers, 8, "cpu"), SlotAccumulator(n_layers, 8, "cpu")
                before = {name: torch.rand(getattr(want, name).shape, generator=g) * 0.3
                          for name in SUMS}  # fmt: skip
                for acc in (want, got):  # earlier sums, so the max and the adds are exercised
                    for name, t in before.items():
                        getattr(acc, name).copy_(t)
                meter = eager_meter(rows, scoring, k, masks)
                meter._tok = tok
                want.add_rows(meter._from_logits(logits, None), live)
                meter_fold.fold(logits, tok, masks, live, got, k=k, scoring=scoring, bias=bias,
                                correction=corr)  # fmt: skip
                case = f"{scoring} bias {has_bias} correction {has_corr} [{n_layers}, {b}, {e}]"
                for name in SUMS:
                    a, w = getattr(got, name), getattr(want, name)
                    assert torch.allclose(a, w, rtol=1e-5, atol=1e-6), (case, name, a, w)
                assert float(want.sum[0].sum()) != float(want.sum[2].sum()), case
    print("fold ok")


def captured_steps(tmp: Path) -> None:
    for family in ("qwen3_moe", "deepseek_v3", "gpt_oss"):
        model = tiny_model(family).eval()
        src = resolve_model(str(save_with_tokenizer(model, tmp / family)))
        g = torch.Generator().manual_seed(1)
        e = src.num_experts
        patterns = {
            f"p{i}": KeepSets.from_mapping(
                {n: torch.randperm(e, generator=g)[: e // 2].tolist() for n in src.moe_layers}
            )
            for i in range(2)
        }
        meter = RowMeter(model, src, patterns)
        assert meter_fold.available(meter.device, meter.scoring), family
        rows = [SimpleNamespace(slot=0, pattern="p0"), None, SimpleNamespace(slot=2, pattern="p1")]
        ids = torch.tensor([[5], [0], [7]])  # [B, 1]
        eager, captured = SlotMiss(meter, 3), SlotMiss(meter, 3)
        captured.enable_graphs()
        with meter, torch.no_grad():
            with eager.forward(rows, 1, False):  # type: ignore[arg-type]
                model(ids)
            captured.before_replay(rows)  # type: ignore[arg-type]
            with captured.tapping():
                model(ids)
                captured.captured(3, warm=True)
                assert float(captured.gen.count.sum()) == 0.0
                captured.captured(3, warm=False)
        for name in SUMS:
            torch.testing.assert_close(getattr(captured.gen, name), getattr(eager.gen, name),
                                       rtol=1e-5, atol=1e-6)  # fmt: skip
        assert float(eager.gen.sum[0].sum()) != float(eager.gen.sum[2].sum()), family
        print(f"{family} captured ok ({meter.scoring}, bias {meter.rows.bias is not None}, "
              f"correction {meter.rows.correction is not None})")  # fmt: skip
        src.close()


if __name__ == "__main__":
    kernel()
    with tempfile.TemporaryDirectory() as tmp:
        captured_steps(Path(tmp))
