"""Models built from several threads at once come out as built alone (premoe.runtime: one build
at a time; transformers patches class attributes while it builds)."""

from __future__ import annotations

import threading

from transformers import PreTrainedModel

from premoe.runtime import pretrained_causal_lm

DEMO = "premoe/demo/model"


def _build_concurrently(threads: int = 4, each: int = 3) -> list[BaseException]:
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads, timeout=60)

    def run() -> None:
        try:
            barrier.wait()
            for _ in range(each):
                pretrained_causal_lm(DEMO)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return errors


def test_concurrent_builds_leave_transformers_as_they_found_it() -> None:
    tie, init = PreTrainedModel.tie_weights, PreTrainedModel.init_weights
    assert not _build_concurrently()
    assert PreTrainedModel.tie_weights is tie
    assert PreTrainedModel.init_weights is init
    model = pretrained_causal_lm(DEMO)
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.get_input_embeddings().weight
