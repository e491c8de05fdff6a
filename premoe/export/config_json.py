"""The pruned checkpoint's config.json: the source's own file with only the pruned fields
rewritten (expert count under the key the source uses and every alias, routed count, groups, the
MTP count when dropped, `quantization_config` entries that name experts)."""

from __future__ import annotations

import json
import logging
from typing import Any

from premoe.arch.spec import config_value
from premoe.errors import UsageError
from premoe.prune import GroupPlan, KeepSets, pruned_config
from premoe.prune.quant_config import pruned_quant_config
from premoe.source import ModelSource

log = logging.getLogger(__name__)


def _aliases(config: Any, key: str) -> list[str]:
    amap = dict(getattr(config, "attribute_map", {}) or {})
    names = [key, *(a for a, target in amap.items() if target == key)]
    if key in amap:
        names.append(amap[key])
    return list(dict.fromkeys(names))


def _set_raw(raw: dict[str, Any], key: str, value: Any, config: Any) -> None:
    """Set `key` (dotted, or an attribute_map alias) in the raw config.json dict."""
    if "." in key:
        *parents, last = key.split(".")
        obj = raw
        for p in parents:
            obj = obj.setdefault(p, {})
        obj[last] = value
        return
    present = [n for n in _aliases(config, key) if n in raw]
    for name in present or [key]:
        raw[name] = value


def pruned_config_json(
    src: ModelSource,
    keep: KeepSets,
    plan: GroupPlan,
    *,
    top_k: int | None = None,
    drop_mtp: bool = False,
) -> dict[str, Any]:
    """The source's config.json with the fields that pruning changes rewritten: expert count,
    routed count, groups, the MTP count when `drop_mtp`, and `quantization_config` entries that
    name specific experts."""
    arch, config = src.arch, src.config
    path = src.path / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read {path}: {err}") from None
    new = pruned_config(arch, config, keep, plan, top_k=top_k)
    keys = [arch.num_experts_key, arch.top_k_key]
    if arch.router.grouped:
        keys += ["n_group", "topk_group"]
    for key in keys:
        if config_value(config, key) != config_value(new, key) or config_value(config, key) is None:
            _set_raw(raw, key, config_value(new, key), config)
    check = type(config).from_dict(dict(raw))
    want = (keep.count, arch.top_k(new), arch.groups(new))
    got = (arch.num_experts(check), arch.top_k(check), arch.groups(check))
    if got != want:  # a key name premoe does not know: write the transformers serialisation
        log.warning(
            "config.json rewrite gave %s, expected %s; writing transformers' own", got, want
        )
        raw = new.to_dict()
    mtp = src.arch.mtp
    if drop_mtp and mtp is not None and src.keymap.mtp_layers:
        _set_raw(raw, mtp.count_key, 0, config)
    if isinstance(raw.get("quantization_config"), dict):
        dropped = src.keymap.mtp_layers if drop_mtp else []
        raw["quantization_config"] = pruned_quant_config(
            raw["quantization_config"], keep.layers, dropped
        )
    return raw
