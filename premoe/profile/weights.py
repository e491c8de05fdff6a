"""Where layer-sequential profiling gets each layer's weights: an already-loaded host model
(`ModuleWeights`) or the checkpoint itself (`CheckpointWeights`: a meta skeleton filled one
module at a time by reader threads, dequantizing quantized formats, then emptied again).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from premoe.arch import arch_for_config
from premoe.arch.keys import ExpertKey, RouterKey
from premoe.arch.model import decoder_layers, decoder_stack
from premoe.arch.spec import ArchSpec
from premoe.errors import CheckpointError
from premoe.load.loader import (
    Copier,
    ExpertIO,
    build_skeleton,
    layer_of,
    materialize,
    read_plain,
    tensor_of,
)
from premoe.runtime import resolve_dtype
from premoe.source import ModelSource

log = logging.getLogger(__name__)

READ_THREADS = 4
"""Worker threads reading checkpoint tensors into host memory (`CheckpointWeights`)."""


# ---- where the weights come from ----------------------------------------------------------------


class LayerWeights:
    """Puts parts of the model on the compute device and takes them off again."""

    model: Any
    arch: ArchSpec
    device: torch.device
    load_seconds: float = 0.0

    def prefetch(self, modules: Sequence[nn.Module]) -> None:
        """Hint: `modules` will be brought in next (start reading them)."""

    def close(self) -> None:
        """Stop background work."""

    def prefix_modules(self) -> list[nn.Module]:
        """Modules of the decoder stack outside its layers (embeddings, rotary, norm...)."""
        stack, layers = decoder_stack(self.model, self.arch), decoder_layers(self.model, self.arch)
        return [m for m in stack.children() if m is not layers]

    def bring(self, modules: Sequence[nn.Module]) -> None:
        raise NotImplementedError

    def release(self, modules: Sequence[nn.Module]) -> None:
        raise NotImplementedError

    def model_bytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for p in self.model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
        return total


class ModuleWeights(LayerWeights):
    """An already-loaded model (on the host): tensors are copied to the device per module and
    the device copies dropped afterwards (the host tensors are never modified)."""

    def __init__(self, model: Any, device: torch.device) -> None:
        self.model = model
        self.arch = arch_for_config(model.config)
        self.device = device
        self._saved: dict[int, list[tuple[Any, str, str, torch.Tensor]]] = {}

    def bring(self, modules: Sequence[nn.Module]) -> None:
        t0 = time.perf_counter()
        for top in modules:
            saved: list[tuple[Any, str, str, torch.Tensor]] = []
            for mod in top.modules():
                for kind in ("_parameters", "_buffers"):
                    for name, t in getattr(mod, kind).items():
                        if t is None or t.device == self.device:
                            continue
                        saved.append((mod, kind, name, t))
                        moved = t.data.to(self.device, non_blocking=True)
                        if kind == "_parameters":
                            getattr(mod, kind)[name] = nn.Parameter(moved, requires_grad=False)
                        else:
                            getattr(mod, kind)[name] = moved
            self._saved[id(top)] = saved
        self.load_seconds += time.perf_counter() - t0

    def release(self, modules: Sequence[nn.Module]) -> None:
        for top in modules:
            for mod, kind, name, t in self._saved.pop(id(top), []):
                getattr(mod, kind)[name] = t


class CheckpointWeights(LayerWeights):
    """A skeleton on the meta device filled from the checkpoint one module at a time.

    Parameters are allocated on the device (in the dtype `from_pretrained` would use, fp32 where
    the model keeps modules in fp32) and read with the source's `CheckpointReader` in the fused
    in-memory layout (`premoe.load.loader.ExpertIO`); after `release` they are meta again.
    Reading is done by worker threads into (pinned) host buffers, one tensor per job, so that
    `prefetch` of the next group overlaps the device's work on the current one; `bring` then only
    issues asynchronous host-to-device copies.
    """

    def __init__(self, src: ModelSource, device: torch.device, dtype: Any) -> None:

        self.src = src
        self.arch = src.arch
        self.device = device
        self.dtype = resolve_dtype(dtype, src)
        self.model = build_skeleton(src.config, self.dtype).eval()
        self.io = ExpertIO(src)
        self.copier = Copier(device)
        self._pool = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="premoe-read")
        self._pending: dict[int, list[Future[tuple[str, torch.Tensor]]]] = {}
        self._plan()

    def _plan(self) -> None:
        """id(module) -> [(checkpoint key, tensor name relative to the module)]: modules are the
        decoder layers and the other children of the decoder stack (embeddings, norm)."""

        km, reader = self.src.keymap, self.src.reader
        stack = decoder_stack(self.model, self.arch)
        layers = decoder_layers(self.model, self.arch)
        state = self.model.state_dict(keep_vars=True)
        tied = dict(getattr(self.model, "all_tied_weights_keys", None) or {})
        self.reads: dict[int, list[tuple[str, str]]] = {}
        unused: list[str] = []

        def add(module: nn.Module, key: str, rel: str) -> None:
            self.reads.setdefault(id(module), []).append((key, rel))

        for key in reader.keys():
            role = km.role(key)
            if isinstance(role, ExpertKey) or (role is not None and km.is_mtp(role.layer)):
                continue  # experts: read by `ExpertIO` when the layer is brought in
            if isinstance(role, RouterKey):
                add(layers[role.layer], key, role.tensor.memory)
                continue
            target, _ = km.plain_target(key)
            if target is None:
                continue  # a quantization companion: read with its weight
            layer = layer_of(key, km.prefix)
            if layer is not None:
                if layer < len(layers):  # (DeepSeek-V3's MTP layer is not in the model)
                    add(layers[layer], key, target[len(km.prefix) + len(str(layer)) + 2 :])
                else:
                    unused.append(key)
                continue
            name = target
            source = tied.get(name)
            if source is not None and source not in reader:
                name = source  # a tied head saved in place of its source (the embeddings)
            child, _, rel = name.removeprefix("model.").partition(".")
            if name not in state or not name.startswith("model.") or not rel:
                unused.append(key)  # the output head (never needed) or foreign tensors
                continue
            add(stack.get_submodule(child), key, rel)
        if unused:
            log.debug("%d checkpoint tensors not needed, e.g. %s", len(unused), unused[0])

    def _layer_index(self, module: nn.Module) -> int | None:
        for i, layer in enumerate(decoder_layers(self.model, self.arch)):
            if layer is module:
                return i
        return None

    # -- host side: read a module's tensors into (pinned) host memory, in worker threads --------
    def _host_jobs(self, module: nn.Module) -> list[Callable[[], tuple[str, torch.Tensor]]]:
        """One job per tensor of `module`: each returns (name relative to the module, host
        tensor shaped like the model's tensor, in its dtype; pinned when the device is CUDA).
        Fused expert parameters are assembled whole in the in-memory layout."""

        pin = self.copier.cuda
        jobs: list[Callable[[], tuple[str, torch.Tensor]]] = []

        def plain(key: str, rel: str) -> tuple[str, torch.Tensor]:
            like = tensor_of(module, rel)  # meta parameter or host buffer
            src = read_plain(self.src, key)
            if tuple(src.shape) != tuple(like.shape):
                raise CheckpointError(
                    f"{key}: checkpoint shape {tuple(src.shape)} does not match the model's "
                    f"{tuple(like.shape)}; is config.json the one the checkpoint was saved with?"
                )
            host = torch.empty(like.shape, dtype=like.dtype, pin_memory=pin)
            host.copy_(src)
            return rel, host

        for key, rel in self.reads.get(id(module), []):
            jobs.append(lambda key=key, rel=rel: plain(key, rel))
        layer = self._layer_index(module)
        if layer is not None and layer in self.src.moe_layers:
            e = self.src.num_experts
            for ti, t in enumerate(self.src.arch.experts):

                def experts(ti: int = ti, t: Any = t) -> tuple[str, torch.Tensor]:
                    like = tensor_of(module, t.memory)  # meta [E, ...]
                    host = torch.empty(like.shape, dtype=like.dtype, pin_memory=pin)
                    self.io.check_shape(layer, ti, host.shape[1:])
                    for ex, off, piece in self.io.pieces(layer, ti, range(e)):
                        host[ex].narrow(0, off, piece.shape[0]).copy_(piece)
                    return t.memory, host

                jobs.append(experts)
        return jobs

    def prefetch(self, modules: Sequence[nn.Module]) -> None:
        """Start reading `modules` into host memory in the background (for a later `bring`)."""
        for mod in modules:
            if id(mod) not in self._pending:
                self._pending[id(mod)] = [self._pool.submit(job) for job in self._host_jobs(mod)]

    def close(self) -> None:
        for futures in self._pending.values():
            for f in futures:
                f.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)

    def bring(self, modules: Sequence[nn.Module]) -> None:

        t0 = time.perf_counter()
        self.prefetch(modules)  # (already running if the caller asked for it earlier)
        wanted = {id(p) for m in modules for p in m.parameters()}
        with torch.no_grad():
            materialize(self.model, self.device, self.dtype, only=wanted)
            if self.copier.cuda:  # the reused memory may still be read by the compute stream
                self.copier.stream.wait_stream(torch.cuda.current_stream(self.device))
            filled: set[int] = set()
            for mod in modules:
                for future in self._pending.pop(id(mod)):
                    rel, host = future.result()
                    dst = tensor_of(mod, rel)
                    self.copier.copy(dst, host)  # pinned, same dtype: asynchronous
                    filled.add(id(dst))
            self.copier.finish(blocking=False)
        missing = [n for m in modules for n, p in m.named_parameters() if id(p) not in filled]
        if missing:
            raise CheckpointError(
                f"checkpoint {self.src.path} has no tensor for {len(missing)} parameter(s), e.g. "
                f"{missing[0]!r}; is it complete, and for this config.json?"
            )
        self.load_seconds += time.perf_counter() - t0

    def release(self, modules: Sequence[nn.Module]) -> None:
        for top in modules:
            for mod in top.modules():
                for name, p in list(mod._parameters.items()):
                    if p is not None and p.device.type != "meta":
                        mod._parameters[name] = nn.Parameter(
                            torch.empty(p.shape, dtype=p.dtype, device="meta"),
                            requires_grad=False,
                        )
