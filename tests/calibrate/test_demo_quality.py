"""The demo's export task also goes through `export --recalibrate`, read back with plain
transformers and scored."""

from __future__ import annotations

from pathlib import Path

from premoe.demo.tasks import build_tokenizer
from premoe.eval.demo import DemoOptions, run_demo
from tests.tiny import build_tiny, save_tiny


def test_demo_reports_the_recalibrated_export(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    tok = build_tokenizer(64)
    model = build_tiny(
        "qwen3_moe", 1, vocab_size=128, eos_token_id=tok.eos_token_id, pad_token_id=0
    )
    save_tiny(model, folder, "original")
    tok.save_pretrained(folder)
    opts = DemoOptions.quick(keep=4, n_profile=16, n_eval=8, recalibrate_steps=2)
    result = run_demo(tmp_path / "demo", model=folder, options=opts)
    rc = result.export["recalibrated"]
    assert rc["selection"] == "recon" and rc["steps"] == 2 and rc["n"] == 8
    assert rc["kl_after"] <= rc["kl_before"]
    assert Path(rc["out"], "premoe.json").is_file()
