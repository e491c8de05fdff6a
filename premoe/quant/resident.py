"""Quantized experts resident on the device: fp8 (block) or int4 (packed) slots, swapped in place.

`quantize_resident(model, experts, scheme)` takes a loaded model whose MoE blocks hold fused
expert parameters (transformers' experts interface: ``gate_up_proj`` / ``up_proj`` ``[E, N, K]``,
``down_proj`` ``[E, H, I]``, ``[E, K, N]`` when the module says ``is_transposed``), quantizes them,
frees the dense parameters and replaces each experts module's forward:

- on CUDA with Triton, rows of routed (token, expert) pairs at decode go through
  `premoe.quant.kernels.moe_gemv`, which reads the quantized bytes directly (for SiLU-gated
  modules its two fused variants, `moe_gemv_silu` and `moe_gemv_wsum`: see `fuse`);
- otherwise (CPU, or more rows than `gemv_rows`), the hit experts are dequantized on the fly and
  run as transformers' eager loop does, so on the CPU the logits equal, bit for bit, those of the
  model holding the dequantized weights.

Storage: one ``uint8`` buffer ``[E, slot_bytes]`` per experts module holds, for every expert slot,
all its quantized tensors back to back (16-byte aligned): the weight and scales of the up and down
projections. The tensors the forward reads are strided views into that buffer. A swap is therefore
one copy per expert (`write_slot`), in place: the buffer's storage never changes, so compiled
graphs and captured CUDA graphs stay valid (DESIGN.md invariant 5). The buffer is registered on
the experts module (``premoe_qstorage``, not persistent), so `model.to(device)` moves it; the
forward derives its views from it on every call. Host-side entries (one
``uint8 [slot_bytes]`` tensor per expert) come from dense weights (`entry_from_dense`) or from the
parts of a quantized checkpoint (`entry_from_parts`); `parts_of_entry` reads one back.

Shape legend: E expert slots, T tokens, k routed per token, S = T*k routed pairs, H hidden,
N output rows and K input columns of one projection.

One module because the slot byte layout, the in-place swaps and the forward that reads the
slots must agree on one layout (`_Field` offsets); splitting them would spread that contract.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from premoe.errors import UsageError
from premoe.quant import gemv_experts, kernels
from premoe.quant.codecs import (
    FP8_DTYPE,
    dequantize,
    quantize_fp8_block,
    quantize_int4_pack,
)
from premoe.quant.export import check_scheme
from premoe.quant.gemv_experts import (
    DownSumFn,
    GemvFn,
    UpActFn,
    activate,
    bias_of,
    gemv_forward,
)

log = logging.getLogger(__name__)

_ALIGN = 16
STORAGE_BUFFER = "premoe_qstorage"  # the experts module's buffer holding the quantized slots
DEFAULT_GEMV_ROWS = 64  # routed pairs up to which the Triton GEMV runs (decode, small batches)


@dataclass(frozen=True)
class _Field:
    """One quantized tensor of one slot: bytes [offset, offset+nbytes) of the slot."""

    name: str  # "weight" | "scale"
    dtype: torch.dtype
    shape: tuple[int, ...]  # per slot
    offset: int

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class _Proj:
    """One quantized projection: its parameter name, orientation and fields."""

    param: str
    n: int  # output rows
    k: int  # input columns
    transposed: bool  # the dense parameter is [E, K, N]
    weight: _Field
    scale: _Field


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class QuantizedExperts:
    """The quantized expert slots of one experts module; see the module docstring."""

    def __init__(
        self,
        module: torch.nn.Module,
        scheme: str,
        *,
        params: Sequence[str],
        block: tuple[int, int] = (128, 128),
        group_size: int = 128,
        gemv_rows: int = DEFAULT_GEMV_ROWS,
        exact_weights: bool = False,
        grouped: bool | None = None,
    ) -> None:
        self.scheme = check_scheme(scheme)
        self.exact_weights = exact_weights
        self.block = (int(block[0]), int(block[1]))
        self.group_size = int(group_size)
        self.gemv_rows = int(gemv_rows)
        # the GEMV path as two fused kernels where the activation allows (gemv_experts.silu_gated)
        self.fuse = gemv_experts.FUSE
        self._grouped = grouped
        self.module = module
        dense = [getattr(module, p) for p in params]
        if any(not isinstance(t, torch.Tensor) or t.ndim != 3 for t in dense):
            raise UsageError(f"expert parameters {list(params)} must be 3-D [E, N, K] tensors")
        self.num_experts = int(dense[0].shape[0])
        self.dtype = dense[0].dtype
        self.device = dense[0].device
        self.transposed = bool(getattr(module, "is_transposed", False))
        offset = 0
        projs = []
        for name, t in zip(params, dense, strict=True):
            n, k = (t.shape[2], t.shape[1]) if self.transposed else (t.shape[1], t.shape[2])
            w_field, s_field, offset = self._fields(name, n, k, offset)
            projs.append(_Proj(name, n, k, self.transposed, w_field, s_field))
        self.projs: dict[str, _Proj] = {p.param: p for p in projs}
        self.slot_bytes = _align(offset)
        storage = torch.zeros(
            self.num_experts, self.slot_bytes, dtype=torch.uint8, device=self.device
        )  # [E, slot_bytes]
        # a buffer of the module: moves with it, and compiled graphs see a static address
        module.register_buffer(STORAGE_BUFFER, storage, persistent=False)
        # decided once, outside any trace: the Triton GEMV runs on CUDA (or under the interpreter)
        self.use_kernel = kernels.prepare(self.device)
        with torch.no_grad():
            for p, t in zip(projs, dense, strict=True):
                for e in range(self.num_experts):
                    self._write_proj(e, p, self._quantize(p, self._nk(p, t[e])))

    @property
    def grouped(self) -> bool:
        """Above `gemv_rows`: grouped matmuls (default on CUDA) or the eager per-expert loop
        (default elsewhere: on the CPU it equals the dequantized model bit for bit)."""
        if self._grouped is not None:
            return self._grouped
        return self.device.type == "cuda" and hasattr(torch, "_grouped_mm")

    @grouped.setter
    def grouped(self, value: bool | None) -> None:
        self._grouped = value

    # ---- layout --------------------------------------------------------------------------------

    def _fields(self, name: str, n: int, k: int, offset: int) -> tuple[_Field, _Field, int]:
        if self.scheme == "fp8":
            b0, b1 = self.block
            if n % b0 or k % b1:
                raise UsageError(
                    f"fp8 block {b0}x{b1} does not divide {name} {n}x{k}; pick a block that "
                    "divides the expert weights"
                )
            w = _Field("weight", FP8_DTYPE, (n, k), offset)
            s = _Field("scale", torch.float32, (n // b0, k // b1), _align(offset + w.nbytes))
        else:
            g = self.group_size
            if k % g or k % 8:
                raise UsageError(f"int4 group size {g} does not divide {name} K={k}")
            w = _Field("weight", torch.int32, (n, k // 8), offset)
            s = _Field("scale", self.dtype, (n, k // g), _align(offset + w.nbytes))
        return w, s, _align(s.offset + s.nbytes)

    @property
    def storage(self) -> torch.Tensor:
        """The module's ``uint8 [E, slot_bytes]`` buffer holding every slot."""
        return getattr(self.module, STORAGE_BUFFER)

    def _view(self, f: _Field, storage: torch.Tensor | None = None) -> torch.Tensor:
        """[E, *shape] view of field `f` in every slot of the storage buffer."""
        buf = self.storage if storage is None else storage
        flat = buf[:, f.offset : f.offset + f.nbytes].view(f.dtype)  # [E, numel]
        return flat.view(self.num_experts, *f.shape)

    def views(
        self, param: str, storage: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, scale) views of projection `param`: [E, ...] each, into the storage."""
        p = self.projs[param]
        return self._view(p.weight, storage), self._view(p.scale, storage)

    def scale_block(self, proj: str) -> tuple[int, int]:
        return self.block if self.scheme == "fp8" else (1, self.group_size)

    @property
    def fmt(self) -> str:
        """The codec format of the slots (`premoe.quant.codecs.dequantize`)."""
        return "fp8_block" if self.scheme == "fp8" else "ct_int4_pack"

    def qconfig(self) -> dict[str, Any]:
        if self.scheme == "fp8":
            return {"weight_block_size": list(self.block)}
        return {
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {
                        "num_bits": 4,
                        "type": "int",
                        "symmetric": True,
                        "strategy": "group",
                        "group_size": self.group_size,
                    },
                }  # fmt: skip
            }
        }

    # ---- quantize / entries --------------------------------------------------------------------

    @staticmethod
    def _nk(p: _Proj, t: torch.Tensor) -> torch.Tensor:
        """One expert's dense slice in [N, K] orientation."""
        return t.t() if p.transposed else t

    def _quantize(self, p: _Proj, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.scheme == "fp8":
            parts = quantize_fp8_block(w, self.block)
            return parts["weight"], parts["weight_scale_inv"]
        parts = quantize_int4_pack(w.to(self.dtype), group_size=self.group_size)
        return parts["weight_packed"], parts["weight_scale"]

    def _write_proj(self, slot: int, p: _Proj, wq: tuple[torch.Tensor, torch.Tensor]) -> None:
        wv, sv = self.views(p.param)
        wv[slot].copy_(wq[0])
        sv[slot].copy_(wq[1])

    def entry_from_parts(self, parts: Mapping[str, Mapping[str, torch.Tensor]]) -> torch.Tensor:
        """A host entry (``uint8 [slot_bytes]``) from checkpoint parts, per projection param.

        `parts[param]` holds ``weight`` + ``weight_scale_inv`` (fp8 block) or ``weight_packed``
        + ``weight_scale`` (int4) in [N, K] orientation; for a fused gate/up projection, the
        caller concatenates the gate and up parts on dim 0 (both are row-blocked).
        """
        out = torch.zeros(self.slot_bytes, dtype=torch.uint8)
        names = ("weight", "weight_scale_inv") if self.scheme == "fp8" else (
            "weight_packed", "weight_scale")  # fmt: skip
        for p in self.projs.values():
            src = parts[p.param]
            for f, part in ((p.weight, names[0]), (p.scale, names[1])):
                t = src[part].to(f.dtype)
                if tuple(t.shape) != f.shape:
                    raise UsageError(
                        f"{p.param}.{part} has shape {tuple(t.shape)}, the slot expects {f.shape}"
                    )
                out[f.offset : f.offset + f.nbytes].view(f.dtype).view(f.shape).copy_(t)
        return out

    def entry_from_dense(self, dense: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """A host entry quantized from one expert's dense slices (memory layout, per param)."""
        parts: dict[str, dict[str, torch.Tensor]] = {}
        with torch.no_grad():
            for p in self.projs.values():
                w, s = self._quantize(p, self._nk(p, dense[p.param].to("cpu")))
                if self.scheme == "fp8":
                    parts[p.param] = {"weight": w, "weight_scale_inv": s}
                else:
                    parts[p.param] = {"weight_packed": w, "weight_scale": s}
        return self.entry_from_parts(parts)

    def parts_of_entry(self, entry: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """Codec parts (views) of one entry or slot, per projection param, [N, K] orientation."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for p in self.projs.values():
            w = entry[p.weight.offset : p.weight.offset + p.weight.nbytes]
            s = entry[p.scale.offset : p.scale.offset + p.scale.nbytes]
            w = w.view(p.weight.dtype).view(p.weight.shape)
            s = s.view(p.scale.dtype).view(p.scale.shape)
            if self.scheme == "fp8":
                out[p.param] = {"weight": w, "weight_scale_inv": s}
            else:
                shape = torch.tensor([p.n, p.k])
                out[p.param] = {"weight_packed": w, "weight_scale": s, "weight_shape": shape}
        return out

    def write_slot(self, slot: int, entry: torch.Tensor, *, non_blocking: bool = True) -> int:
        """Copy one expert's entry into `slot`, in place; returns the bytes copied."""
        if entry.dtype != torch.uint8 or entry.numel() != self.slot_bytes:
            raise UsageError(
                f"an entry of this layer is uint8 [{self.slot_bytes}], got {entry.dtype} "
                f"{tuple(entry.shape)}"
            )
        self.storage[slot].copy_(entry, non_blocking=non_blocking)
        return self.slot_bytes

    def read_slot(self, slot: int) -> torch.Tensor:
        return self.storage[slot].to("cpu", copy=True)

    # ---- dense views ---------------------------------------------------------------------------

    def dense_like(self, param: str) -> torch.Tensor:
        """An empty CPU tensor shaped as one slot of dense parameter `param` (its own layout and
        dtype): the template for reading one expert's dense slice from a checkpoint."""
        p = self.projs[param]
        shape = (p.k, p.n) if p.transposed else (p.n, p.k)
        return torch.empty(shape, dtype=self.dtype)

    def _dequantize(self, param: str, sel: int | slice) -> torch.Tensor:
        """Dequantized weights of slot(s) `sel`, in the parameter's own layout."""
        p = self.projs[param]
        wv, sv = self.views(param)
        if self.scheme == "fp8":
            parts = {"weight": wv[sel], "weight_scale_inv": sv[sel]}
        else:
            parts = {"weight_packed": wv[sel], "weight_scale": sv[sel],
                     "weight_shape": torch.tensor([p.n, p.k])}  # fmt: skip
        w = dequantize(self.fmt, parts, self.qconfig(), dtype=self.dtype)  # [..., N, K]
        return w.transpose(-1, -2).contiguous() if p.transposed else w

    def dense_slot(self, param: str, slot: int) -> torch.Tensor:
        """Dequantized weight of one slot in the parameter's own layout ([N, K] or [K, N])."""
        return self._dequantize(param, slot)

    def dense(self, param: str) -> torch.Tensor:
        """All slots dequantized, in the parameter's layout: [E, N, K] (or [E, K, N])."""
        return self._dequantize(param, slice(None))

    @property
    def nbytes(self) -> int:
        return self.storage.numel()

    # ---- forward -------------------------------------------------------------------------------

    def _gemv(self, param: str, x: torch.Tensor, rows: torch.Tensor | int, eids: torch.Tensor,
              glu: torch.dtype | None, storage: torch.Tensor) -> torch.Tensor:  # fmt: skip
        p = self.projs[param]
        wv, sv = self.views(param, storage)
        y = kernels.moe_gemv(
            x, rows, eids, wv, sv, n=p.n, k=p.k, scale_block=self.scale_block(param),
            int4=self.scheme == "int4",
            round_dtype=self.dtype if self.exact_weights else None, glu=glu,
        )  # fmt: skip
        return y

    def _fused(self, storage: torch.Tensor) -> tuple[UpActFn, DownSumFn]:
        """The two fused kernels (`gemv_experts.gemv_forward`) over the slots in `storage`."""
        pu, pd = self.projs[self._up_param()], self.projs[self._down_param()]
        (wu, su), (wd, sd) = self.views(pu.param, storage), self.views(pd.param, storage)
        int4, round_dtype = self.scheme == "int4", self.dtype if self.exact_weights else None

        def up_act(x: torch.Tensor, top_k_index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            return kernels.moe_gemv_silu(
                x, top_k_index, wu, su, n=pu.n // 2, k=pu.k, out_dtype=dtype,
                scale_block=self.scale_block(pu.param), int4=int4, round_dtype=round_dtype,
            )  # fmt: skip

        def down_sum(
            h: torch.Tensor, top_k_index: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype
        ) -> torch.Tensor:
            return kernels.moe_gemv_wsum(
                h, top_k_index, weights, wd, sd, n=pd.n, k=pd.k, out_dtype=dtype,
                scale_block=self.scale_block(pd.param), int4=int4, round_dtype=round_dtype,
            )  # fmt: skip

        return up_act, down_sum

    def forward(
        self,
        hidden_states: torch.Tensor,  # [T, H]
        top_k_index: torch.Tensor,  # [T, k]
        top_k_weights: torch.Tensor,  # [T, k]
        storage: torch.Tensor | None = None,
    ) -> torch.Tensor:
        mod = self.module
        if self.use_kernel and top_k_index.numel() <= self.gemv_rows:
            buf = self.storage if storage is None else storage
            return self._forward_gemv(mod, hidden_states, top_k_index, top_k_weights, buf)
        if self.grouped:
            return self._forward_grouped(mod, hidden_states, top_k_index, top_k_weights)
        return self._forward_eager(mod, hidden_states, top_k_index, top_k_weights)

    def _forward_grouped(
        self, mod: Any, hidden: torch.Tensor, top_k_index: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Prefill / large batches: every slot dequantized once, then grouped matmuls over the
        routed pairs sorted by expert (no data-dependent shapes: compiles without a break)."""
        t, k = top_k_index.shape
        e_count = self.num_experts
        up, down = self._up_param(), self._down_param()
        eids = top_k_index.reshape(-1)  # [S]
        eids_sorted, perm = torch.sort(eids)
        x = hidden[perm // k]  # [S, H]
        hist_in = eids_sorted.float() if hidden.device.type == "cpu" else eids_sorted.int()
        counts = torch.histc(hist_in, bins=e_count, min=0, max=e_count - 1)
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)  # [E]
        # grouped_mm takes [E, K_in, N_out]: the transposed layout as is, else a transposed view
        w_up, w_down = self.dense(up), self.dense(down)
        if not self.transposed:
            w_up, w_down = w_up.transpose(-1, -2), w_down.transpose(-1, -2)
        h = torch._grouped_mm(x, w_up, offs=offsets)  # [S, N_up]
        bias = bias_of(self.module, up)
        if bias is not None:
            h = h + bias[eids_sorted]
        h = activate(mod, h)
        h = torch._grouped_mm(h, w_down, offs=offsets)  # [S, H]
        bias = bias_of(self.module, down)
        if bias is not None:
            h = h + bias[eids_sorted]
        h = h * weights.reshape(-1)[perm].unsqueeze(-1).to(h.dtype)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        return h[inv].view(t, k, -1).sum(dim=1).to(hidden.dtype)  # [T, H]

    def _up_param(self) -> str:
        return next(iter(self.projs))

    def _down_param(self) -> str:
        return list(self.projs)[-1]

    def _forward_gemv(
        self,
        mod: Any,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor,
        weights: torch.Tensor,
        storage: torch.Tensor,
    ) -> torch.Tensor:
        up, down = self._up_param(), self._down_param()

        def gemv(param: str) -> GemvFn:
            return lambda x, rows, eids, glu: self._gemv(param, x, rows, eids, glu, storage)

        fused = self._fused(storage) if self.fuse else None
        return gemv_forward(
            mod, hidden, top_k_index, weights, gemv(up), gemv(down), (up, down), self.dtype, fused
        )

    def _forward_eager(
        self, mod: Any, hidden: torch.Tensor, top_k_index: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """transformers' eager experts loop, each hit expert dequantized on the fly: all slots in
        one go when most are hit (prefill), else one slot at a time (the same values)."""
        up, down = self._up_param(), self._down_param()
        b_up, b_down = bias_of(self.module, up), bias_of(self.module, down)
        final = torch.zeros_like(hidden)
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        experts = [int(row[0]) for row in hit if int(row[0]) < self.num_experts]
        stacked = None
        if 2 * len(experts) >= self.num_experts:
            stacked = (self.dense(up), self.dense(down))  # [E, N, K] / [E, K, N] each
        for e in experts:
            top_k_pos, token_idx = torch.where(mask[e])
            x = hidden[token_idx]
            if stacked is not None:
                w_up, w_down = stacked[0][e], stacked[1][e]
            else:
                w_up, w_down = self.dense_slot(up, e), self.dense_slot(down, e)
            if self.transposed:
                h = x @ w_up
                h = h + b_up[e] if b_up is not None else h
                h = activate(mod, h)
                h = h @ w_down
                h = h + b_down[e] if b_down is not None else h
            else:
                h = F.linear(x, w_up, b_up[e] if b_up is not None else None)
                h = activate(mod, h)
                h = F.linear(h, w_down, b_down[e] if b_down is not None else None)
            h = h * weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, h.to(final.dtype))
        return final


@dataclass
class QuantizedResident:
    """What `quantize_resident` did: the quantized experts per module path."""

    scheme: str
    layers: dict[str, QuantizedExperts]

    @property
    def nbytes(self) -> int:
        return sum(q.nbytes for q in self.layers.values())

    def __getitem__(self, path: str) -> QuantizedExperts:
        return self.layers[path]


def _quantized_forward(self: torch.nn.Module, hidden_states: torch.Tensor, *args: Any,
                       **kwargs: Any) -> torch.Tensor:  # fmt: skip
    """The experts forward: (hidden [T, H], top-k index [T, k], top-k weights [T, k]), passed
    positionally (most families) or by keyword (gpt-oss: router_indices, routing_weights)."""
    rest = [*args, *kwargs.values()]
    if len(rest) != 2:
        raise UsageError("a quantized experts module takes (hidden, top_k_index, top_k_weights)")
    storage = getattr(self, STORAGE_BUFFER)
    return self._premoe_quant.forward(hidden_states, rest[0], rest[1], storage)  # type: ignore[operator]


def _experts_module(model: torch.nn.Module, path: str) -> tuple[str, torch.nn.Module]:
    """The experts module named `path`, or owning the parameter named `path`."""
    try:
        return path, model.get_submodule(path)
    except AttributeError:
        owner, _, name = path.rpartition(".")
        try:
            mod = model.get_submodule(owner)
        except AttributeError:
            raise UsageError(f"the model has no module or parameter {path!r}") from None
        if not isinstance(getattr(mod, name, None), torch.Tensor):
            raise UsageError(f"the model has no module or parameter {path!r}") from None
        return owner, mod


def default_params(module: torch.nn.Module) -> tuple[str, str]:
    """(up, down) parameter names of a transformers experts module (its experts interface)."""
    has_gate = getattr(module, "has_gate", True)
    up = "gate_up_proj" if has_gate and hasattr(module, "gate_up_proj") else "up_proj"
    if not isinstance(getattr(module, up, None), torch.Tensor) or not isinstance(
        getattr(module, "down_proj", None), torch.Tensor
    ):
        raise UsageError(
            f"{type(module).__name__} has no fused gate_up_proj/up_proj and down_proj "
            "parameters; pass params= with the names of its [E, N, K] expert weights"
        )
    return up, "down_proj"


def quantize_resident(
    model: torch.nn.Module,
    experts: Iterable[str],
    scheme: str,
    *,
    params: Sequence[str] | None = None,
    block: tuple[int, int] = (128, 128),
    group_size: int = 128,
    gemv_rows: int = DEFAULT_GEMV_ROWS,
    exact_weights: bool = False,
) -> QuantizedResident:
    """Quantize the experts of every module in `experts` in place and replace their forward.

    `experts`: module paths of the fused experts modules (``model.layers.3.mlp.experts``) or
    names of their parameters (``model.layers.3.mlp.experts.gate_up_proj``: the owner is used),
    e.g. built from `ArchSpec.experts` memory names. `params`: the (up, down) parameter names,
    default from the module's experts interface. `gemv_rows`: routed pairs up to which the Triton
    GEMV runs (else dequantize + matmul); `exact_weights`: round the kernel's dequantized weights
    to the model dtype (bit-equal weights, a little slower). The dense parameters are deleted;
    biases and everything else stay. Returns the quantized state, to swap slots with `write_slot`.
    """
    scheme = check_scheme(scheme)
    seen: dict[str, QuantizedExperts] = {}
    for path in experts:
        mpath, mod = _experts_module(model, path)
        if mpath in seen:
            continue
        names = tuple(params) if params is not None else default_params(mod)
        q = QuantizedExperts(
            mod,
            scheme,
            params=names,
            block=block,
            group_size=group_size,
            gemv_rows=gemv_rows,
            exact_weights=exact_weights,
        )
        for name in names:
            if name in mod._parameters:
                del mod._parameters[name]
            elif hasattr(mod, name):
                delattr(mod, name)
        mod._premoe_quant = q  # type: ignore[assignment]
        mod.forward = types.MethodType(_quantized_forward, mod)  # type: ignore[method-assign]
        seen[mpath] = q
    if not seen:
        raise UsageError("no experts module given to quantize")
    if any(q.device.type == "cuda" for q in seen.values()):
        torch.cuda.empty_cache()
    log.info(
        "quantized %d experts modules to %s: %.1f MiB resident",
        len(seen),
        scheme,
        sum(q.nbytes for q in seen.values()) / 2**20,
    )
    return QuantizedResident(scheme, seen)


__all__ = [
    "DEFAULT_GEMV_ROWS",
    "QuantizedExperts",
    "QuantizedResident",
    "default_params",
    "quantize_resident",
]
