"""Map the tensor names of an on-disk checkpoint to their MoE roles.

A checkpoint stores experts either per expert (`...mlp.experts.{e}.gate_proj.weight`, what
`save_pretrained` writes by default and what the hub holds) or fused (`...mlp.experts.gate_up_proj`
with E on dim 0, as in memory). `KeyMap` enumerates the names the family's `ArchSpec` predicts for
every MoE layer, checks that the checkpoint has them, and answers for any key: is it an expert
tensor (which layer, which expert, which part), a router tensor (which dim is E), or neither
(copied untouched: attention, norms, dense layers, shared experts).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from premoe.arch.spec import ArchSpec, ExpertTensor, RouterTensor
from premoe.errors import CheckpointError

Layout = Literal["fused", "per_expert"]


@dataclass(frozen=True)
class ExpertKey:
    layer: int
    tensor: ExpertTensor
    expert: int | None  # None: fused [E, ...] tensor; else the expert id of a per-expert tensor
    part: int = 0  # index into tensor.per_expert (gate=0, up=1 for a gate_up pair)


@dataclass(frozen=True)
class RouterKey:
    layer: int
    tensor: RouterTensor


Role = ExpertKey | RouterKey


def find_layers_prefix(keys: Iterable[str]) -> str:
    """The prefix before `.{layer}.` in decoder-layer keys (`model.layers`)."""
    for key in keys:
        m = re.match(r"^(.*?\blayers)\.\d+\.", key)
        if m:
            return m.group(1)
    raise CheckpointError("no decoder-layer tensors (`*.layers.N.*`) found in the checkpoint")


class KeyMap:
    """Roles of a checkpoint's keys for one model (spec + config + actual key list)."""

    def __init__(self, arch: ArchSpec, config: Any, keys: Iterable[str]) -> None:
        keys = list(keys)
        self.arch = arch
        self.prefix = find_layers_prefix(keys)
        self.num_experts = arch.num_experts(config)
        self.moe_layers = arch.moe_layer_ids(config)
        present = set(keys)
        per_expert = arch.per_expert_block is not None and any(
            f".{arch.per_expert_block}.experts.0." in k for k in keys
        )
        self.layout: Layout = "per_expert" if per_expert else "fused"
        self._roles: dict[str, Role] = {}
        for layer in self.moe_layers:
            for names, role in self._expected(layer):
                name = next((n for n in names if n in present), None)
                if name is None:
                    raise CheckpointError(
                        f"checkpoint lacks {names[0]!r}, which a {arch.name} model with "
                        f"{self.num_experts} experts must have ({self.layout} layout); is the "
                        "checkpoint complete and is config.json the one it was saved with?"
                    )
                self._roles[name] = role
        # (layer, router role) -> key: the first such key in `_roles` order, as a scan would find
        self._routers: dict[tuple[int, str], str] = {}
        for name, role in self._roles.items():
            if isinstance(role, RouterKey):
                self._routers.setdefault((role.layer, role.tensor.role), name)

    def layer_key(self, layer: int, rel: str) -> str:
        return f"{self.prefix}.{layer}.{rel}"

    def expert_key(self, layer: int, tensor: ExpertTensor, expert: int, part: int) -> str:
        return self.layer_key(
            layer, f"{self.arch.per_expert_block}.experts.{expert}.{tensor.per_expert[part]}"
        )

    def _expected(self, layer: int) -> Iterable[tuple[tuple[str, ...], Role]]:
        """(candidate names, role) of every MoE tensor of `layer`; fused tensors may be saved
        under their original on-disk name or their in-memory name."""
        for t in self.arch.experts:
            if self.layout == "per_expert":
                for e in range(self.num_experts):
                    for part in range(len(t.per_expert)):
                        name = self.expert_key(layer, t, e, part)
                        yield (name,), ExpertKey(layer, t, e, part)
            else:
                names = dict.fromkeys((t.fused_disk, t.memory))
                yield tuple(self.layer_key(layer, n) for n in names), ExpertKey(layer, t, None)
        for r in self.arch.router_tensors:
            names = dict.fromkeys((r.disk_name(self.layout), r.memory))
            yield tuple(self.layer_key(layer, n) for n in names), RouterKey(layer, r)

    def role(self, key: str) -> Role | None:
        """The MoE role of `key`, or None for tensors that pruning copies unchanged."""
        return self._roles.get(key)

    def router_key(self, layer: int, role: str = "weight") -> str:
        """The checkpoint key of `layer`'s router tensor with `role`."""
        try:
            return self._routers[(layer, role)]
        except KeyError:  # as `next()` over the roles found nothing
            raise StopIteration from None

    def renumbered(self, key: ExpertKey, new_expert: int) -> str:
        """The per-expert key of `key`'s tensor for expert number `new_expert`."""
        return self.expert_key(key.layer, key.tensor, new_expert, key.part)
