"""Run the profiling pass: plain, layer-sequential, and data-parallel over torch.distributed.

`profile_corpora` is what `premoe.profile.profile` calls to turn tokenized corpora into per-task
sums and keys. It picks the mode:

- **plain**: the whole model loaded (on one device or spread by an accelerate device map), one
  pass (`profiler.run_profile`);
- **sequential**: one group of decoder layers on the device at a time (`sequential.py`);
- **data-parallel**, on top of either: when the process was started by ``torchrun`` or
  ``accelerate launch`` (``WORLD_SIZE`` > 1 in the environment, or a process group already
  initialised), every rank takes a deterministic shard of every task's samples — the same
  sampling as a single process, then every ``world``-th sample starting at its rank — and
  profiles it on its own device (``cuda:LOCAL_RANK``; with ``--device-map auto`` the device map
  of the GPUs the rank can see). The per-task sums (float64, summed in the same order as one
  process would up to float rounding) are all-reduced; the per-sample keys, of different counts
  per rank, are all-gathered padded to the longest shard with their lengths and put back in
  corpus order. Every rank ends with the full result; only rank 0 writes the store. The process
  group (gloo on the CPU, NCCL on CUDA) is created here if the launcher did not create one, and
  destroyed at the end.

Shape legend: N samples of a task, N_r of them on rank r, D key dim, R accumulator rows,
L MoE layers, E experts, W world size.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from premoe.errors import UsageError
from premoe.policy import parse_bytes
from premoe.profile.corpus import TaskCorpus
from premoe.profile.hooks import Recorded
from premoe.profile.profiler import ModelHandle, Progress, run_profile
from premoe.profile.sequential import run_profile_sequential
from premoe.runtime import resolve_device

log = logging.getLogger(__name__)


# ---- the distributed environment -----------------------------------------------------------------


@dataclass
class DistContext:
    """This process's place in a data-parallel run."""

    rank: int
    world: int
    local_rank: int
    backend: str = ""
    created: bool = False  # whether this module initialised the process group

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """The device the collectives run on (NCCL needs this rank's GPU)."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r} is not an integer") from None


def detect(distributed: bool | None = None) -> DistContext | None:
    """The data-parallel context, or None for a single process.

    `distributed` None: on when a process group is initialised with more than one rank or the
    environment has ``WORLD_SIZE`` > 1 (torchrun, accelerate launch); True: required (an error
    if the process was not started by a launcher); False: off.
    """
    if distributed is False:
        return None
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        if world > 1 or distributed:
            local = _env_int("LOCAL_RANK")
            return DistContext(
                dist.get_rank(),
                world,
                dist.get_rank() if local is None else local,
                dist.get_backend(),
            )
        return None
    world = _env_int("WORLD_SIZE")
    rank = _env_int("RANK")
    if world is None or world <= 1:
        if distributed:
            raise UsageError(
                "data-parallel profiling needs a launcher: run it with `torchrun "
                "--nproc-per-node N -m premoe_cli.app profile ...` or `accelerate launch`"
            )
        return None
    if rank is None or not 0 <= rank < world:
        raise UsageError(f"bad RANK={os.environ.get('RANK')!r} for WORLD_SIZE={world}")
    local = _env_int("LOCAL_RANK")
    return DistContext(rank, world, rank if local is None else local)


def rank_device(device: str | torch.device, ctx: DistContext | None) -> torch.device:
    """The compute device of this rank: a bare ``cuda`` (or ``auto`` on a GPU machine) becomes
    ``cuda:LOCAL_RANK`` (modulo the visible GPUs)."""
    dev = resolve_device(device)
    if ctx is not None and dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", ctx.local_rank % torch.cuda.device_count())
    return dev


def init_group(ctx: DistContext, device: torch.device) -> None:
    """Initialise the default process group if the launcher has not (gloo on CPU, else NCCL)."""
    import torch.distributed as dist

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    if dist.is_initialized():
        ctx.backend = dist.get_backend()
        return
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(var):
            raise UsageError(f"data-parallel profiling: {var} is not set (start with torchrun)")
    backend = "nccl" if cuda and dist.is_nccl_available() else "gloo"
    dist.init_process_group(backend, init_method="env://", rank=ctx.rank, world_size=ctx.world)
    ctx.backend, ctx.created = backend, True
    log.info("process group: rank %d of %d, %s, device %s", ctx.rank, ctx.world, backend, device)


def finish_group(ctx: DistContext) -> None:
    import torch.distributed as dist

    if ctx.created and dist.is_initialized():
        dist.destroy_process_group()
        ctx.created = False


# ---- shards and gathering ------------------------------------------------------------------


def shard_indices(n: int, rank: int, world: int) -> range:
    """The samples of rank `rank`: every `world`-th, starting at `rank` (balanced lengths)."""
    return range(rank, n, world)


def shard_corpora(corpora: Mapping[str, TaskCorpus], ctx: DistContext) -> dict[str, TaskCorpus]:
    return {
        name: replace(
            c, token_ids=[c.token_ids[i] for i in shard_indices(c.samples, ctx.rank, ctx.world)]
        )
        for name, c in corpora.items()
    }


def gather_recorded(
    local: Mapping[str, Recorded], corpora: Mapping[str, TaskCorpus], ctx: DistContext
) -> dict[str, Recorded]:
    """Every rank's shard results -> the full per-task result (on every rank)."""
    import torch.distributed as dist

    dev = ctx.device
    out: dict[str, Recorded] = {}
    for name, corpus in corpora.items():  # same order on every rank
        rec = local[name]
        rows = sorted(rec.sums)
        stacked = torch.stack([rec.sums[r] for r in rows]).to(dev)  # [R, L, E] float64
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        sums = {r: stacked[i].cpu() for i, r in enumerate(rows)}
        keys = {
            kind: _gather_keys(rec.keys[kind], corpus.samples, ctx) for kind in sorted(rec.keys)
        }
        out[name] = Recorded(sums=sums, keys=keys)
    return out


def _gather_keys(mine: torch.Tensor, n: int, ctx: DistContext) -> torch.Tensor:
    """Rank shards [N_r, D] -> [N, D] in corpus order (padded all_gather + lengths)."""
    import torch.distributed as dist

    dev = ctx.device
    shape = torch.tensor([mine.shape[0], mine.shape[1] if mine.dim() == 2 else 0], device=dev)
    shapes = [torch.zeros_like(shape) for _ in range(ctx.world)]
    dist.all_gather(shapes, shape)
    lengths = [int(s[0]) for s in shapes]
    dims = {int(s[1]) for s, m in zip(shapes, lengths, strict=True) if m > 0}
    if len(dims) > 1:
        raise RuntimeError(f"ranks produced keys of different widths {sorted(dims)}")
    d = dims.pop() if dims else 0
    for r, m in enumerate(lengths):
        if m != len(shard_indices(n, r, ctx.world)):
            raise RuntimeError(f"rank {r} returned {m} keys for its shard of {n} samples")
    longest = max(lengths)
    padded = torch.zeros((longest, d), dtype=torch.float32, device=dev)  # [max N_r, D]
    if lengths[ctx.rank]:
        padded[: lengths[ctx.rank]] = mine.to(dev, torch.float32)
    parts = [torch.empty_like(padded) for _ in range(ctx.world)]
    dist.all_gather(parts, padded)
    full = torch.zeros((n, d), dtype=torch.float32)  # [N, D]
    for r, (part, m) in enumerate(zip(parts, lengths, strict=True)):
        if m:
            full[torch.arange(r, n, ctx.world)] = part[:m].cpu()  # shard_indices(n, r, world)
    return full


# ---- the dispatch ----------------------------------------------------------------------------


@dataclass
class RunResult:
    """Per-task sums and keys of a profiling pass, and how it ran."""

    recorded: dict[str, Recorded]
    dtype: str  # the weights' dtype
    writer: bool = True  # whether this process writes the store (rank 0, or the only one)
    mode: str = "plain"  # plain | sequential
    rank: int = 0
    world: int = 1
    stats: dict[str, Any] = field(default_factory=dict)


def check_options(
    *,
    sequential: bool,
    sequential_layers: int,
    device_map: Any,
    host_budget: int | str | None,
    offload_dir: str | Path | None,
) -> int | None:
    """Validate the scale-out options before anything runs; returns the host budget in bytes."""
    if sequential_layers < 1:
        raise UsageError(f"--sequential-layers must be >= 1, got {sequential_layers}")
    if sequential and device_map is not None:
        raise UsageError(
            "--sequential and --device-map are alternatives (one layer at a time on one device "
            "vs. the whole model spread over devices); choose one"
        )
    if not sequential and (offload_dir is not None or host_budget is not None):
        raise UsageError("--offload-dir and --host-budget apply to --sequential only")
    if offload_dir is not None and Path(offload_dir).exists() and not Path(offload_dir).is_dir():
        raise UsageError(f"--offload-dir {offload_dir} exists and is not a folder")
    if host_budget is None:
        return None

    return parse_bytes(host_budget)


def profile_corpora(
    handle: ModelHandle,
    corpora: Mapping[str, TaskCorpus],
    *,
    metrics: list[str],
    threshold: float,
    batch_size: int,
    progress: Progress | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    device_map: str | dict[str, Any] | None = None,
    sequential: bool = False,
    sequential_layers: int = 1,
    offload_dir: str | Path | None = None,
    host_budget: int | str | None = None,
    distributed: bool | None = None,
) -> RunResult:
    """Per-task sums and keys of `corpora` (see the module doc for the modes)."""
    budget = check_options(
        sequential=sequential,
        sequential_layers=sequential_layers,
        device_map=device_map,
        host_budget=host_budget,
        offload_dir=offload_dir,
    )
    ctx = detect(distributed)
    dev: str | torch.device = device
    if ctx is not None:
        dev = rank_device(device, ctx)
        init_group(ctx, dev)
    try:
        mine = shard_corpora(corpora, ctx) if ctx is not None else dict(corpora)
        report = progress if ctx is None or ctx.is_writer else None
        stats: dict[str, Any] = {}
        if sequential:
            run = run_profile_sequential(
                handle.load() if handle.loaded else handle.path,
                handle.arch,
                mine,
                tokenizer=handle.tokenizer,
                metrics=metrics,
                threshold=threshold,
                batch_size=batch_size,
                device=dev,
                dtype=dtype,
                layers_at_once=sequential_layers,
                offload_dir=offload_dir,
                host_budget=budget,
                progress=report,
            )
            recorded, dtype_used, stats = run.recorded, run.dtype, run.stats.to_json()
        else:
            net = handle.load(device=dev, dtype=dtype, device_map=device_map)
            recorded = run_profile(
                net,
                handle.arch,
                mine,
                tokenizer=handle.tokenizer,
                metrics=metrics,
                threshold=threshold,
                batch_size=batch_size,
                progress=report,
            )
            dtype_used = str(next(net.parameters()).dtype).removeprefix("torch.")
        if ctx is not None:
            recorded = gather_recorded(recorded, corpora, ctx)
        return RunResult(
            recorded,
            dtype_used,
            writer=ctx is None or ctx.is_writer,
            mode="sequential" if sequential else "plain",
            rank=ctx.rank if ctx is not None else 0,
            world=ctx.world if ctx is not None else 1,
            stats=stats,
        )
    finally:
        if ctx is not None:
            finish_group(ctx)


__all__ = [
    "DistContext",
    "RunResult",
    "check_options",
    "detect",
    "gather_recorded",
    "profile_corpora",
    "rank_device",
    "shard_corpora",
    "shard_indices",
]
