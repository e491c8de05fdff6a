"""Router recalibration: after pruning, retrain only the routers to match the full model.

Pruning leaves the kept experts exact but the router still spreads probability as if every
expert were there. `recalibrate` trains only the pruned model's router tensors (the weight rows,
and a logit bias where the family has one; `ArchSpec.router_tensors`) so that the pruned model's
next-token distributions match the full model's on the task's corpus:

    loss = (1 / N) · Σ_t  KL( p_full(· | x_<t) ‖ p_pruned(· | x_<t) )      over real tokens t

for a bounded number of Adam steps. Expert weights, attention, norms and embeddings never change
(they are frozen and never written), so the result is a standard checkpoint of the pruned
architecture whose only difference from the plain export is the router tensors. The returned
routers are the best of the steps as measured on the calibration set (never worse than the
unrecalibrated routers there).

Correction biases (DeepSeek-V3 style, used only to choose experts) get no gradient through the
top-k choice and are kept as pruned (sliced), which is exact.

Teacher targets are computed once, with the full model, before the student is loaded; for a
large vocabulary only the teacher's top `teacher_topk` probabilities are kept (renormalised),
which bounds host memory at tokens × teacher_topk.

Two paths:

- ``in-memory`` (`recalibrate`): the full model, then the pruned model, each on one device;
- ``layer-sequential`` (`recalibrate_layerwise`): for models that do not fit one device. Each
  MoE layer's router is fitted so the pruned block's output matches the full block's output on
  the pruned model's own hidden states, layer after layer (lower layers already pruned and
  recalibrated), holding one decoder layer on the device at a time
  (`premoe.calibrate.layerwise`).

Shape legend: B batch, S sequence, V vocabulary, T real tokens, Kt kept teacher entries.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from premoe.batching import pad_batch, pad_token_id
from premoe.calibrate.routers import CalibratedRouters, router_roles, router_tensor
from premoe.errors import CorpusError, UsageError
from premoe.load.loader import as_source, load_pruned
from premoe.profile.corpus import load_task
from premoe.prune.keepsets import KeepSets
from premoe.runtime import pretrained_causal_lm, resolve_device, resolve_dtype
from premoe.source import load_tokenizer

log = logging.getLogger(__name__)

FULL_VOCAB_UP_TO = 8192  # teacher_topk="auto": keep the whole distribution up to this vocabulary
AUTO_TEACHER_TOPK = 256
TRAINABLE_ROLES: tuple[str, ...] = ("weight", "logit_bias")
TOKEN_WEIGHTS: tuple[str, ...] = ("uniform", "confidence")


@dataclass(frozen=True)
class RecalibrateOptions:
    """How routers are recalibrated. Defaults: `premoe export --recalibrate`."""

    steps: int = 200
    lr: float = 2e-2
    batch_size: int = 64  # calibration samples per step
    max_tokens: int | None = 20_000  # calibration tokens used (None: the whole corpus)
    teacher_topk: int | None = None  # None: auto (whole distribution for small vocabularies)
    weight_decay: float = 0.0
    token_weight: str = "confidence"  # "uniform", or "confidence": weight t by max_v p_full(v)
    seed: int = 0

    def check(self) -> RecalibrateOptions:
        if self.steps < 0:
            raise UsageError(f"--recalibrate-steps must be >= 0, got {self.steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"--recalibrate-lr must be a positive number, got {self.lr}")
        if self.batch_size < 1:
            raise UsageError(f"recalibration batch size must be >= 1, got {self.batch_size}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise UsageError(f"recalibration max tokens must be >= 1, got {self.max_tokens}")
        if self.token_weight not in TOKEN_WEIGHTS:
            raise UsageError(
                f"unknown token weight {self.token_weight!r}; choose {', '.join(TOKEN_WEIGHTS)}"
            )
        if self.teacher_topk is not None and self.teacher_topk < 1:
            raise UsageError(f"teacher top-k must be >= 1, got {self.teacher_topk}")
        return self


@dataclass
class RecalibrateProgress:
    """`step` of `steps` done; `loss` the step's KL (nats per token)."""

    stage: str
    step: int
    steps: int
    loss: float = float("nan")


Progress = Callable[[RecalibrateProgress], None]


# ---- corpus --------------------------------------------------------------------------------------


def check_corpus(token_ids: Sequence[Sequence[int]], what: str = "calibration corpus") -> None:
    if not token_ids or not any(len(t) for t in token_ids):
        raise CorpusError(f"{what} is empty: recalibration needs at least one token")


def cap_tokens(token_ids: Sequence[Sequence[int]], max_tokens: int | None) -> list[list[int]]:
    """The corpus's first samples, up to `max_tokens` tokens in all (at least one sample)."""
    out: list[list[int]] = []
    total = 0
    for t in token_ids:
        if not t:
            continue
        if max_tokens is not None and out and total + len(t) > max_tokens:
            break
        out.append(list(t))
        total += len(t)
    return out


def batches(
    token_ids: Sequence[Sequence[int]], batch_size: int, pad_id: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded (ids [B, S], mask [B, S]) batches, longest first (little padding)."""

    order = sorted(range(len(token_ids)), key=lambda i: (-len(token_ids[i]), i))
    out = []
    for start in range(0, len(order), batch_size):
        rows = [token_ids[i] for i in order[start : start + batch_size]]
        out.append(pad_batch(rows, pad_id))
    return out


def store_corpus(
    store: Any,
    task: str,
    tokenizer: Any,
    *,
    corpus: str | Path | None = None,
) -> list[list[int]]:
    """A task's calibration corpus: `corpus` if given (a task source: JSONL, text, Parquet...),
    else the source the store recorded when the task was profiled, sampled with the same
    options. A source that no longer exists is a one-line `CorpusError`."""

    info = store.tasks.get(task) if store is not None else None
    if corpus is None:
        if info is None:
            raise UsageError(f"no corpus for task {task!r}: give one (--calibration TASK=FILE)")
        source = str(info.source)
        if not source.startswith("hf:") and not Path(source).exists():
            raise CorpusError(
                f"the corpus of task {task!r} recorded in the store ({source}) is gone; give "
                f"it again with --calibration {task}=FILE"
            )
        opts = dict(info.options)
    else:
        source, opts = str(corpus), {}
        if not source.startswith("hf:") and not Path(source).exists():
            raise CorpusError(f"calibration corpus {source} of task {task!r} does not exist")
    try:
        got = load_task(
            task,
            source,
            tokenizer,
            text_field=opts.get("text_field"),
            max_samples=opts.get("max_samples"),
            max_tokens=opts.get("max_tokens"),
            max_length=int(opts.get("max_length") or 512),
            seed=int(opts.get("seed") or 0),
        )
    except CorpusError as exc:
        raise CorpusError(f"recalibration of task {task!r}: {exc}") from None
    return got.token_ids


# ---- teacher -------------------------------------------------------------------------------------


@dataclass
class Targets:
    """The teacher's next-token distribution at every real token of one batch (on the host).

    Either `probs` [T, V] (whole distribution) or (`top_p` [T, Kt], `top_i` [T, Kt]) renormalised.
    """

    mask: torch.Tensor  # [B, S] bool: real tokens
    weight: torch.Tensor  # [T] token weights, summing to 1
    probs: torch.Tensor | None = None
    top_p: torch.Tensor | None = None
    top_i: torch.Tensor | None = None


def _input_device(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def teacher_targets(
    teacher: Any,
    data: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    topk: int | None,
    token_weight: str = "confidence",
) -> list[Targets]:
    """Run the full model once over the batches; keep its next-token distributions and the
    tokens' weights (uniform, or the teacher's top-1 probability: positions where the full
    model is sure of the next token are the ones greedy decoding depends on; near-uniform
    positions, such as the random digits of a prompt, carry little that routing can fix)."""
    dev = _input_device(teacher)
    out = []
    for ids, mask in data:
        logits = teacher(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits  # [B, S, V]
        real = mask.bool()
        lp = logits.float()[real.to(dev)].log_softmax(-1)  # [T, V]
        if token_weight == "confidence":
            w = lp.max(-1).values.exp()  # [T]
        else:
            w = torch.ones(lp.shape[0], device=lp.device)
        w = (w / w.sum().clamp(min=1e-30)).cpu()
        if topk is None or topk >= lp.shape[-1]:
            out.append(Targets(real, w, probs=lp.exp().cpu()))
        else:
            v, i = lp.topk(topk, dim=-1)  # [T, Kt]
            out.append(Targets(real, w, top_p=v.softmax(-1).cpu(), top_i=i.cpu()))
    return out


def kl_loss(logits: torch.Tensor, target: Targets) -> torch.Tensor:
    """Weighted mean over real tokens of KL(teacher ‖ student); `logits` [B, S, V]."""
    dev = logits.device
    lq = logits.float()[target.mask.to(dev)].log_softmax(-1)  # [T, V]
    if target.probs is not None:
        p = target.probs.to(dev)  # [T, V]
        kl = (p * (p.clamp(min=1e-30).log() - lq)).sum(-1)  # [T]
        return (kl * target.weight.to(dev)).sum()
    assert target.top_p is not None and target.top_i is not None
    p = target.top_p.to(dev)  # [T, Kt]
    kl = (p * (p.clamp(min=1e-30).log() - lq.gather(1, target.top_i.to(dev)))).sum(-1)  # [T]
    return (kl * target.weight.to(dev)).sum()


# ---- training ------------------------------------------------------------------------------------


def trainable_router_params(model: Any, arch: Any, layers: Sequence[int]) -> list[torch.Tensor]:
    """Freeze everything; return the router tensors that train (weight, logit bias)."""
    for p in model.parameters():
        p.requires_grad_(False)
    params: list[torch.Tensor] = []
    for layer in layers:
        for role in router_roles(arch):
            if role in TRAINABLE_ROLES:
                t = router_tensor(model, arch, layer, role)
                t.requires_grad_(True)
                params.append(t)
    return params


def _mean_kl(model: Any, data: Sequence[tuple[torch.Tensor, torch.Tensor]], targets: Any) -> float:
    dev = _input_device(model)
    total, n = 0.0, 0
    with torch.no_grad():
        for (ids, mask), tgt in zip(data, targets, strict=True):
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
            t = int(mask.sum())
            total += float(kl_loss(logits, tgt)) * t
            n += t
    return total / max(n, 1)


def train_routers(
    student: Any,
    arch: Any,
    layers: Sequence[int],
    data: Sequence[tuple[torch.Tensor, torch.Tensor]],
    targets: Sequence[Targets],
    options: RecalibrateOptions,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train the student's routers in place (keeps the best state seen). Returns a summary."""
    params = trainable_router_params(student, arch, layers)
    start = [p.detach().clone() for p in params]
    was_training = student.training
    student.eval()  # no dropout; routers are trained in eval mode (as they run)
    dev = _input_device(student)
    before = _mean_kl(student, data, targets)
    best, best_state = before, start
    opt = torch.optim.Adam(params, lr=options.lr, weight_decay=options.weight_decay)
    g = torch.Generator().manual_seed(options.seed)
    check_every = max(1, options.steps // 8)
    last = float("nan")
    for step in range(options.steps):
        b = int(torch.randint(len(data), (1,), generator=g))
        ids, mask = data[b]
        logits = student(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
        loss = kl_loss(logits, targets[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = float(loss.detach())
        if not math.isfinite(last):
            log.warning("recalibration diverged at step %d; keeping the best routers", step)
            break
        if (step + 1) % check_every == 0 or step + 1 == options.steps:
            now = _mean_kl(student, data, targets)
            if now < best:
                best, best_state = now, [p.detach().clone() for p in params]
        if progress is not None:
            progress(RecalibrateProgress("train", step + 1, options.steps, last))
    with torch.no_grad():
        for p, v in zip(params, best_state, strict=True):
            p.copy_(v)
    for p in params:
        p.requires_grad_(False)
    student.train(was_training)
    return {"kl_before": before, "kl_after": best, "last_step_loss": last}


def _teacher_topk(options: RecalibrateOptions, vocab: int) -> int | None:
    if options.teacher_topk is not None:
        return options.teacher_topk
    return None if vocab <= FULL_VOCAB_UP_TO else AUTO_TEACHER_TOPK


def recalibrate(
    model: str | Path | Any,
    keep: KeepSets,
    corpus: Sequence[Sequence[int]],
    *,
    top_k: int | None = None,
    options: RecalibrateOptions | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    teacher: Any = None,
    progress: Progress | None = None,
) -> CalibratedRouters:
    """Recalibrate the routers of `model` pruned to `keep` on `corpus` (token-id lists).

    `model`: checkpoint folder, hub id or `ModelSource`. `teacher`: the full model if already
    loaded (else it is loaded on `device`, used, and freed before the student loads). Returns
    the calibrated routers (apply with `apply_routers`, export with `router_overrides`, keep
    with `PatternStore.set_routers`). In-memory path: each model fits `device`.
    """

    opts = (options or RecalibrateOptions()).check()
    check_corpus(corpus)
    t0 = time.perf_counter()
    src, owned = as_source(model)
    try:
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, src)
        keep.validate(src.arch, src.config, top_k=top_k)
        try:
            tokenizer = load_tokenizer(src.path)
            pad = pad_token_id(tokenizer, src.config)
        except Exception:
            pad = int(getattr(src.config, "pad_token_id", None) or 0)
        rows = cap_tokens(corpus, opts.max_tokens)
        check_corpus(rows)
        data = batches(rows, opts.batch_size, pad)
        n_tokens = sum(len(r) for r in rows)
        vocab = int(src.config.vocab_size)
        topk = _teacher_topk(opts, vocab)
        if progress is not None:
            progress(RecalibrateProgress("teacher", 0, opts.steps))
        own_teacher = teacher is None
        if own_teacher:
            teacher = pretrained_causal_lm(src.path, dtype=dt, device_map={"": str(dev)}).eval()
        targets = teacher_targets(teacher, data, topk=topk, token_weight=opts.token_weight)
        if own_teacher:
            del teacher
        t1 = time.perf_counter()
        student = load_pruned(src, keep, device=dev, dtype=dt, top_k=top_k)
        summary = train_routers(
            student, src.arch, src.moe_layers, data, targets, opts, progress=progress
        )
        tensors = {
            layer: {
                role: router_tensor(student, src.arch, layer, role).detach().float().cpu().clone()
                for role in router_roles(src.arch)
            }
            for layer in src.moe_layers
        }
        del student
        t2 = time.perf_counter()
        info = {
            "method": "kl",
            "options": asdict(opts),
            "teacher_topk": topk,
            "tokens": n_tokens,
            "samples": len(rows),
            "seconds_teacher": t1 - t0,
            "seconds_train": t2 - t1,
            "seconds": t2 - t0,
            **summary,
        }
        log.info(
            "recalibrated %d routers on %d tokens: KL %.4f -> %.4f nats/token (%.1f s)",
            len(tensors),
            n_tokens,
            summary["kl_before"],
            summary["kl_after"],
            t2 - t0,
        )
        return CalibratedRouters(keep, tensors, top_k, info)
    finally:
        if owned:
            src.close()


__all__ = [
    "RecalibrateOptions",
    "RecalibrateProgress",
    "Targets",
    "batches",
    "cap_tokens",
    "check_corpus",
    "kl_loss",
    "recalibrate",
    "store_corpus",
    "teacher_targets",
    "train_routers",
    "trainable_router_params",
]
