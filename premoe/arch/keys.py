"""The checkpoint-layout seam: every tensor name of an on-disk checkpoint and its MoE role.

A checkpoint stores experts either per expert (`...mlp.experts.{e}.gate_proj.weight`, what
`save_pretrained` writes by default and what the hub holds) or fused (`...mlp.experts.gate_up_proj`
with E on dim 0, as in memory), in the format its `quantization_config` declares (dense, or one
of `premoe.arch.formats`: a quantized weight is several companion tensors). Multi-token-prediction
layers (DeepSeek-V3 / GLM-4.5 layer N, Qwen3-Next `mtp.layers.i`) carry their own MoE block.

`KeyMap` enumerates the names the family's `ArchSpec` and the format predict for every MoE layer
(MTP layers included), checks that the checkpoint has them and that companions fit each other,
and answers for any key: an expert tensor (layer, expert, logical weight, component), a router
tensor (which dim is E), or neither (copied untouched: attention, norms, dense layers, shared
experts). A key that carries an expert index, or lies in an experts module, and has no declared
role is refused (DESIGN.md invariant 6): nothing expert-indexed is ever copied unclaimed.

Every reader of expert tensors (export, plan, loader, sequential profiler, resident swaps, host
cache, prefetch) goes through this map.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from premoe.arch.formats import (
    DENSE,
    QuantFormat,
    check_components,
    format_for_config,
    quantization_config,
)
from premoe.arch.spec import ArchSpec, ExpertTensor, RouterTensor
from premoe.errors import CheckpointError

Layout = Literal["fused", "per_expert"]
Shape = tuple[int, ...]

_EXPERT_INDEX = re.compile(r"(?:^|\.)experts\.(\d+)\.")
_ROUTER_COMPANIONS = {"weight", "bias", "e_score_correction_bias"}


@dataclass(frozen=True)
class ExpertKey:
    layer: int
    tensor: ExpertTensor
    expert: int | None  # None: fused [E, ...] tensor; else the expert id of a per-expert tensor
    part: int = 0  # index into tensor.per_expert (gate=0, up=1 for a gate_up pair)
    component: str = ""  # per-expert: the key's last segment ("weight", "weight_scale_inv");
    # fused: the suffix after the tensor's name ("" dense, "_blocks", "_scales")


@dataclass(frozen=True)
class RouterKey:
    layer: int
    tensor: RouterTensor


Role = ExpertKey | RouterKey


@dataclass(frozen=True)
class Stored:
    """How one logical expert weight is stored: its format and component -> checkpoint key."""

    format: QuantFormat
    keys: dict[str, str]
    shapes: dict[str, Shape]

    @property
    def dense_shape(self) -> Shape:
        """The dense weight's shape ([N, K] per expert, [E, ...] fused)."""
        if not self.format.quantized:
            return next(iter(self.shapes.values()))
        comp = {k.lstrip("_"): v for k, v in self.shapes.items()}
        return tuple(self.format.dense_shape(comp))


def find_layers_prefix(keys: Iterable[str]) -> str:
    """The prefix before `.{layer}.` in decoder-layer keys (`model.layers`)."""
    for key in keys:
        if key.startswith("mtp."):
            continue
        m = re.match(r"^(.*?\blayers)\.\d+\.", key)
        if m:
            return m.group(1)
    raise CheckpointError("no decoder-layer tensors (`*.layers.N.*`) found in the checkpoint")


class KeyMap:
    """Roles of a checkpoint's keys for one model (spec + config + actual key list).

    `shape(key)` gives a tensor's header shape; with it, quantization companions are checked to
    fit each other. `moe_layers` are the model's MoE layers; `mtp_layers` the MTP layers whose
    weights the checkpoint holds (logical ids num_hidden_layers + i); `layers` both.
    """

    def __init__(
        self,
        arch: ArchSpec,
        config: Any,
        keys: Iterable[str],
        shape: Callable[[str], Shape] | None = None,
    ) -> None:
        keys = list(keys)
        self.arch = arch
        self.prefix = find_layers_prefix(keys)
        self.num_experts = arch.num_experts(config)
        self.num_hidden_layers = int(config.num_hidden_layers)
        self.moe_layers = arch.moe_layer_ids(config)
        self.format = format_for_config(config)
        self.qconfig = quantization_config(config) or {}
        self._shape = shape or (lambda key: ())
        present = set(keys)
        self._modules = _components(keys)
        declared_mtp = arch.mtp_layer_ids(config)
        self.mtp_layers = [
            m for m in declared_mtp if any(k.startswith(self.layer_prefix(m) + ".") for k in keys)
        ]
        self.layers = [*self.moe_layers, *self.mtp_layers]
        per_expert = arch.per_expert_block is not None and any(
            f".{arch.per_expert_block}.experts.0." in k for k in keys
        )
        self.layout: Layout = "per_expert" if per_expert else "fused"
        self._roles: dict[str, Role] = {}
        self._stored: dict[tuple[int, int, int | None, int], Stored] = {}
        for layer in self.layers:
            self._map_experts(layer, present)
            self._map_routers(layer, present)
        self._routers: dict[tuple[int, str], str] = {}
        for name, role in self._roles.items():
            if isinstance(role, RouterKey):
                self._routers.setdefault((role.layer, role.tensor.role), name)
        self._refuse_unclaimed(keys)
        self._plain = self._map_plain()

    # ---- names -----------------------------------------------------------------------------

    def layer_prefix(self, layer: int) -> str:
        """`model.layers.{layer}`, or the MTP prefix (`mtp.layers.{i}`) for MTP layers."""
        mtp = self.arch.mtp
        if mtp is not None and mtp.prefix and layer >= self.num_hidden_layers:
            return f"{mtp.prefix}.{layer - self.num_hidden_layers}"
        return f"{self.prefix}.{layer}"

    def layer_key(self, layer: int, rel: str) -> str:
        return f"{self.layer_prefix(layer)}.{rel}"

    def expert_key(self, layer: int, tensor: ExpertTensor, expert: int, part: int) -> str:
        """The dense per-expert key (`...experts.{e}.gate_proj.weight`)."""
        return self.layer_key(
            layer, f"{self.arch.per_expert_block}.experts.{expert}.{tensor.per_expert[part]}"
        )

    def is_mtp(self, layer: int) -> bool:
        return layer in self.mtp_layers

    # ---- building --------------------------------------------------------------------------

    def _stored_of(self, owner: str, comps: dict[str, str], dense: str) -> Stored:
        """How `owner` (a module prefix, or a fused tensor name) is stored, from its components
        (component -> key); raises when they match neither dense nor the declared format."""
        names = set(comps)
        fmt = self.format
        if names == {dense}:  # dense, also in a quantized checkpoint (an ignore list)
            chosen = DENSE
        elif (
            fmt.quantized
            and set(fmt.components or ()) | set(fmt.fused) <= names
            and (names <= fmt.all_components() | set(fmt.fused))
        ):
            chosen = fmt
        elif fmt.quantized and fmt.components and dense in names and names - {dense}:
            unknown = sorted(names - fmt.all_components())
            missing = sorted(set(fmt.components) - names)
            raise CheckpointError(
                f"{owner}: companion tensor(s) {unknown or missing} do not fit the declared "
                f"{fmt.name} format ({', '.join(fmt.components)}); the checkpoint and its "
                "quantization_config disagree"
            )
        else:
            unknown = sorted(names - {dense} - fmt.all_components() - set(fmt.fused))
            what = (
                f"unknown companion tensor(s) {unknown}" if unknown else f"tensors {sorted(names)}"
            )
            raise CheckpointError(
                f"{owner}: {what} for a {fmt.name} checkpoint; premoe does not know how this "
                "weight is stored, so it will not prune it"
            )
        shapes = {c: tuple(self._shape(k)) for c, k in comps.items()}
        if chosen.quantized:
            check_components(
                chosen, owner, {c.lstrip("_"): s for c, s in shapes.items()}, self.qconfig
            )
        return Stored(chosen, dict(comps), shapes)

    def _map_experts(self, layer: int, present: set[str]) -> None:
        for ti, t in enumerate(self.arch.experts):
            if self.layout == "per_expert":
                for e in range(self.num_experts):
                    for part in range(len(t.per_expert)):
                        dense = self.expert_key(layer, t, e, part)
                        module, _, leaf = dense.rpartition(".")
                        comps = self._modules.get(module, {})
                        if not comps:
                            self._missing(dense)
                        stored = self._stored_of(module, comps, leaf)
                        self._stored[(layer, ti, e, part)] = stored
                        for comp, key in comps.items():
                            self._roles[key] = ExpertKey(layer, t, e, part, comp)
                continue
            names = dict.fromkeys((t.fused_disk, t.memory))
            base = next(
                (self.layer_key(layer, n) for n in names if self.layer_key(layer, n) in present),
                None,
            )
            if base is not None:
                comps = {"": base}
            else:
                base = self.layer_key(layer, t.fused_disk)
                comps = {s: base + s for s in self.format.fused if base + s in present}
                if not comps:
                    self._missing(base)
            stored = self._stored_of(base, comps, "")
            self._stored[(layer, ti, None, 0)] = stored
            for comp, key in comps.items():
                self._roles[key] = ExpertKey(layer, t, None, 0, comp)

    def _map_routers(self, layer: int, present: set[str]) -> None:
        for r in self.arch.router_tensors:
            names = dict.fromkeys((r.disk_name(self.layout), r.memory))
            cands = [self.layer_key(layer, n) for n in names]
            name = next((n for n in cands if n in present), None)
            if name is None:
                self._missing(cands[0])
            module, _, _ = name.rpartition(".")
            extra = set(self._modules.get(module, {})) - _ROUTER_COMPANIONS
            if extra:
                raise CheckpointError(
                    f"router {name} is quantized ({', '.join(sorted(extra))}); premoe can only "
                    "slice unquantized router rows (every published checkpoint keeps them dense)"
                )
            self._roles[name] = RouterKey(layer, r)

    def _missing(self, name: str) -> None:
        raise CheckpointError(
            f"checkpoint lacks {name!r}, which a {self.arch.name} model with {self.num_experts} "
            f"experts must have ({self.layout} layout, {self.format.name} weights); is the "
            "checkpoint complete and is config.json the one it was saved with?"
        )

    def _refuse_unclaimed(self, keys: list[str]) -> None:
        """Refuse keys of an MoE layer that look expert-indexed but have no role."""
        blocks = {self.arch.block, self.arch.per_expert_block or self.arch.block}
        prefixes = tuple(f"{self.layer_prefix(layer)}." for layer in self.layers)
        for key in keys:
            if key in self._roles or not key.startswith(prefixes):
                continue
            m = _EXPERT_INDEX.search(key)
            in_experts = any(f".{b}.experts." in key for b in blocks)
            if m is None and not in_experts:
                continue
            if m is not None and int(m.group(1)) >= self.num_experts:
                raise CheckpointError(
                    f"tensor {key!r} belongs to expert {m.group(1)}, but config.json declares "
                    f"{self.num_experts} experts; the config does not match the weights"
                )
            raise CheckpointError(
                f"tensor {key!r} lies in an experts module but has no declared role (an unknown "
                f"quantization companion or layout, {self.format.name} declared); refusing to "
                "copy it unclaimed"
            )

    def _map_plain(self) -> dict[str, tuple[str | None, Stored | None]]:
        """Quantized non-MoE linears (attention, shared experts, dense MLPs of an fp8 or GPTQ
        checkpoint): data key -> (dense `module.weight` name, how it is stored); companion key
        -> (None, None). Dense keys are absent (they fill the tensor of their own name)."""
        fmt = self.format
        out: dict[str, tuple[str | None, Stored | None]] = {}
        if not fmt.quantized or not fmt.components:
            return out
        for module, comps in self._modules.items():
            names = set(comps)
            if not set(fmt.components) <= names <= fmt.all_components() | {"bias"}:
                continue
            if any(key in self._roles for key in comps.values()):
                continue
            quant = {c: k for c, k in comps.items() if c != "bias"}
            shapes = {c: tuple(self._shape(k)) for c, k in quant.items()}
            stored = Stored(fmt, quant, shapes)
            for comp, key in quant.items():
                out[key] = (
                    (f"{module}.weight", stored) if comp == fmt.components[0] else (None, None)
                )
        return out

    # ---- queries ---------------------------------------------------------------------------

    def plain_target(self, key: str) -> tuple[str | None, Stored | None]:
        """For a key pruning copies unchanged: (the model tensor it fills, how it is stored).
        A dense key fills itself (stored None); the data key of a quantized linear fills
        `module.weight` (dequantized from `Stored`); its other companions fill nothing."""
        return self._plain.get(key, (key, None))

    def role(self, key: str) -> Role | None:
        """The MoE role of `key`, or None for tensors that pruning copies unchanged."""
        return self._roles.get(key)

    def stored(self, layer: int, ti: int, expert: int | None = None, part: int = 0) -> Stored:
        """How expert tensor `ti` of `layer` is stored (per expert: of `expert`'s `part`)."""
        return self._stored[(layer, ti, None if self.layout == "fused" else expert, part)]

    def router_key(self, layer: int, role: str = "weight") -> str:
        """The checkpoint key of `layer`'s router tensor with `role`."""
        try:
            return self._routers[(layer, role)]
        except KeyError:  # as `next()` over the roles found nothing
            raise StopIteration from None

    def renumbered(self, key: ExpertKey, new_expert: int) -> str:
        """The per-expert key of `key`'s component for expert number `new_expert`."""
        dense = self.expert_key(key.layer, key.tensor, new_expert, key.part)
        return f"{dense.rpartition('.')[0]}.{key.component}"

    def summary(self) -> dict[str, Any]:
        """What `premoe inspect` shows about the layout."""
        comps = sorted({r.component for r in self._roles.values() if isinstance(r, ExpertKey)})
        return {
            "layout": self.layout,
            "format": self.format.name,
            "quant_method": self.qconfig.get("quant_method"),
            "expert_components": [c or "(dense)" for c in comps],
            "mtp_layers": self.mtp_layers,
        }


def _components(keys: Iterable[str]) -> dict[str, dict[str, str]]:
    """module prefix -> {last segment: key}; fused suffixes are matched by `KeyMap` itself."""
    out: dict[str, dict[str, str]] = {}
    for key in keys:
        module, _, leaf = key.rpartition(".")
        out.setdefault(module, {})[leaf] = key
    return out
