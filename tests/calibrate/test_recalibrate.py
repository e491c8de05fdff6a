"""Router recalibration: only router tensors change, exports load with plain transformers and
equal the pruned model with the stored routers, stores keep them, bad corpora fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from premoe.calibrate import (
    CalibratedRouters,
    RecalibrateOptions,
    apply_routers,
    recalibrate,
    router_overrides,
)
from premoe.calibrate.pipeline import calibrate_pattern, export_calibrated
from premoe.calibrate.routers import find_in_store, load_from_store, save_to_store
from premoe.errors import CorpusError
from premoe.export import export_pruned
from premoe.load import load_pruned
from premoe.patterns.store import PatternStore
from premoe.prune import KeepSets
from premoe.source import resolve_model
from tests.helpers import assert_one_line_error, random_texts, run_cli

FAST = RecalibrateOptions(steps=4, lr=5e-2, batch_size=8, max_tokens=400)


def _corpus(n: int = 16) -> list[list[int]]:
    from tests.helpers import tokenizer

    tok = tokenizer()
    return [tok(t)["input_ids"] for t in random_texts(n, 3)]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_only_router_tensors_change_and_export_is_exact(tiny_dir, tmp_path, family) -> None:
    from transformers import AutoModelForCausalLM

    folder = tiny_dir(family)
    src = resolve_model(folder)
    keep = KeepSets.from_mapping({layer: [0, 2, 3, 5] for layer in src.moe_layers})
    routers = recalibrate(src, keep, _corpus(), options=FAST)
    assert routers.info["kl_after"] <= routers.info["kl_before"]
    assert set(routers.tensors) == set(src.moe_layers)
    plain = export_pruned(src, keep, tmp_path / "plain")
    over = router_overrides(src, routers)
    calib = export_pruned(src, keep, tmp_path / "calib", router_overrides=over)
    assert plain.keep_count == calib.keep_count
    a, b = _tensors(tmp_path / "plain"), _tensors(tmp_path / "calib")
    assert set(a) == set(b)
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    router_keys = {src.keymap.router_key(layer, "weight") for layer in src.moe_layers}
    assert changed and changed <= set(over)
    assert changed <= router_keys | set(over)  # correction biases: overridden but unchanged
    # plain transformers loads it, and it equals load_pruned + the calibrated routers
    ids = torch.tensor([_corpus(2)[0]])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "calib", dtype=torch.float32).eval()
    ours = load_pruned(src, keep, dtype=torch.float32)
    apply_routers(ours, src.arch, routers)
    with torch.no_grad():
        d = (hf(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max()
    assert float(d) <= 1e-5
    src.close()


def test_store_keeps_routers_and_old_stores_load(tiny_dir, calib_store, tmp_path) -> None:
    folder = tiny_dir("qwen3_moe")
    store_dir, _ = calib_store(folder)
    before = PatternStore.load(store_dir)  # a store without routers
    assert before.calibrated == {}
    src = resolve_model(folder)
    keep = KeepSets.from_mapping({layer: [1, 2, 4, 7] for layer in src.moe_layers})
    routers = recalibrate(src, keep, _corpus(), options=FAST)
    name = save_to_store(before, "alpha", routers)
    before.save(store_dir, overwrite=True)
    after = PatternStore.load(store_dir)
    assert name in after.calibrated and after.calibrated[name]["task"] == "alpha"
    got = find_in_store(after, "alpha", keep)
    assert isinstance(got, CalibratedRouters)
    for layer in src.moe_layers:
        assert torch.equal(got.tensors[layer]["weight"], routers.tensors[layer]["weight"])
    assert (
        find_in_store(after, "alpha", KeepSets.from_mapping({0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}))
        is None
    )
    assert load_from_store(after, name).keep == keep
    src.close()


def test_pipeline_recon_recalibrate_export(tiny_dir, calib_store, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    folder = tiny_dir("qwen3_moe")
    store_dir, _ = calib_store(folder)
    pattern = calibrate_pattern(folder, store_dir, "alpha", keep=4, options=FAST, save=True)
    assert pattern.selection.keep.count == 4
    assert pattern.selection.provenance["name"] == "recon"
    assert pattern.stored_as in PatternStore.load(store_dir).calibrated
    from premoe.calibrate.pipeline import load_calibrated

    net = load_calibrated(folder, store_dir, "alpha", pattern.selection.keep, dtype=torch.float32)
    assert pattern.routers is not None
    w = pattern.routers.tensors[0]["weight"]
    assert torch.equal(net.model.layers[0].mlp.gate.weight.detach().float(), w)
    export_calibrated(folder, pattern, tmp_path / "out")
    prov = json.loads((tmp_path / "out" / "premoe.json").read_text())
    assert prov["recalibration"]["stored_as"] == pattern.stored_as
    assert prov["keep"] == pattern.selection.keep.to_json()
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_empty_corpus_is_a_clear_error(tiny_dir) -> None:
    src = resolve_model(tiny_dir("qwen3_moe"))
    keep = KeepSets.from_mapping({layer: [0, 1, 2, 3] for layer in src.moe_layers})
    with pytest.raises(CorpusError, match="empty"):
        recalibrate(src, keep, [], options=FAST)
    with pytest.raises(CorpusError, match="empty"):
        recalibrate(src, keep, [[]], options=FAST)
    src.close()


def test_gone_corpus_is_a_one_line_cli_error(tiny_dir, calib_store, tmp_path, capsys) -> None:
    folder = tiny_dir("qwen3_moe")
    store_dir, corpus = calib_store(folder)
    corpus.unlink()
    code, _, err = run_cli(
        [
            "export",
            str(folder),
            "-s",
            str(store_dir),
            "-t",
            "alpha",
            "--keep",
            "4",
            "--recalibrate",
            "--recalibrate-steps",
            "2",
            "--device",
            "cpu",
            "-o",
            str(tmp_path / "out"),
        ],
        capsys,
    )
    assert_one_line_error(code, err, "is gone", "--calibration")
    assert not (tmp_path / "out").exists()


def test_cli_export_recalibrate(tiny_dir, calib_store, tmp_path, capsys) -> None:
    folder = tiny_dir("qwen3_moe")
    store_dir, corpus = calib_store(folder)
    code, out, err = run_cli(
        [
            "export",
            str(folder),
            "-s",
            str(store_dir),
            "-t",
            "alpha",
            "--keep",
            "4",
            "--recalibrate",
            "--recalibrate-steps",
            "3",
            "--select",
            "tcess",
            "--calibration",
            f"alpha={corpus}",
            "--device",
            "cpu",
            "--json",
            "-o",
            str(tmp_path / "out"),
        ],
        capsys,
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["recalibration"]["options"]["steps"] == 3
    assert summary["policy"]["name"] == "task"
    assert PatternStore.load(store_dir).calibrated


def test_eval_compares_recon_and_recalibrated(tiny_dir, calib_store, tmp_path) -> None:
    from premoe.eval import evaluate
    from premoe.eval.harness import eval_set_from_rows

    folder = tiny_dir("qwen3_moe")
    store_dir, _ = calib_store(folder)
    rows = [{"text": t} for t in random_texts(6, 9, alphabet="abcdefgh")]
    es = eval_set_from_rows("alpha", rows, source="test")
    report = evaluate(
        folder,
        store_dir,
        ["alpha"],
        keeps=[4],
        methods=["tcess", "recon", "random"],
        eval_sets={"alpha": es},
        dtype="fp32",
        routing=False,
        recalibrate=True,
        recalibrate_options=FAST,
    )
    assert report.methods == ["tcess", "recon", "random", "tcess+recal", "recon+recal"]
    plain, recal = report.row("alpha", "tcess", 4), report.row("alpha", "tcess+recal", 4)
    assert plain.score.kind == "perplexity" and recal.score.value != plain.score.value
    # the recalibrated keep set without its routers scores as the plain one: routers restored
    again = evaluate(
        folder,
        store_dir,
        ["alpha"],
        keeps=[4],
        methods=["tcess"],
        eval_sets={"alpha": es},
        dtype="fp32",
        routing=False,
    )
    assert again.row("alpha", "tcess", 4).score.value == pytest.approx(plain.score.value)


def test_layerwise_recalibration_fits_every_layer(tiny_dir) -> None:
    from transformers import AutoModelForCausalLM

    from premoe.calibrate.layerwise import LayerwiseOptions, recalibrate_layerwise
    from premoe.calibrate.recalibrate import batches

    folder = tiny_dir("qwen3_moe")
    src = resolve_model(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    keep = KeepSets.from_mapping({layer: [0, 2, 3, 5] for layer in src.moe_layers})
    routers = recalibrate_layerwise(
        model,
        src.arch,
        keep,
        batches(_corpus(8), 4, 0),
        options=LayerwiseOptions(steps=20, lr=5e-2),
    )
    for layer in src.moe_layers:
        info = routers.info["layers"][str(layer)]
        assert info["relative_error_after"] <= info["relative_error_before"]
        assert routers.tensors[layer]["weight"].shape == (4, model.config.hidden_size)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    ours = load_pruned(src, keep, dtype=torch.float32)
    apply_routers(ours, src.arch, routers)
    src.close()


def test_cli_export_recalibrate_sequential(tiny_dir, calib_store, tmp_path, capsys) -> None:
    """`--sequential`: routers fitted layer by layer from the checkpoint (one decoder layer on
    the device at a time); the export differs from the plain one in router tensors only."""
    folder = tiny_dir("qwen3_moe")
    store_dir, corpus = calib_store(folder)
    base = ["export", str(folder), "-s", str(store_dir), "-t", "alpha", "--keep", "4"]
    opts = ["--calibration", f"alpha={corpus}", "--device", "cpu"]
    code, out, err = run_cli(
        [
            *base,
            "--recalibrate",
            "--sequential",
            "--recalibrate-steps",
            "3",
            *opts,
            "--json",
            "-o",
            str(tmp_path / "seq"),
        ],  # fmt: skip
        capsys,
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["recalibration"]["streamed"] is True
    code, _, err = run_cli([*base, "-o", str(tmp_path / "plain")], capsys)
    assert code == 0, err
    seq, plain = _tensors(tmp_path / "seq"), _tensors(tmp_path / "plain")
    assert set(seq) == set(plain)
    changed = {k for k in seq if not torch.equal(seq[k], plain[k])}
    assert changed and all(k.endswith("mlp.gate.weight") for k in changed), changed
    assert PatternStore.load(store_dir).calibrated
    for extra, needle in (
        (["--recalibrate", "--sequential", "--select", "recon"], "store metric"),
        (["--sequential"], "needs --recalibrate"),
    ):
        code, _, err = run_cli([*base, *extra, *opts, "-o", str(tmp_path / "bad")], capsys)
        assert_one_line_error(code, err, needle)
        assert not (tmp_path / "bad").exists()
