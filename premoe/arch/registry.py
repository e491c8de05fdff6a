"""Look up the `ArchSpec` of a model from its config or model type."""

from __future__ import annotations

from typing import Any

from premoe.arch.families import ARCHS
from premoe.arch.spec import ArchSpec
from premoe.errors import UnsupportedArchitectureError

_BY_TYPE: dict[str, ArchSpec] = {t: a for a in ARCHS for t in a.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_TYPE)


def arch_for_model_type(model_type: str) -> ArchSpec:
    try:
        return _BY_TYPE[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"model type {model_type!r} is not a supported MoE family; supported: "
            f"{', '.join(supported_model_types())} (run `premoe archs` for details)"
        ) from None


def arch_for_config(config: Any) -> ArchSpec:
    """The spec for a transformers config, after checking the options premoe cannot handle."""
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedArchitectureError(
            "the config has no model_type; is this a transformers model?"
        )
    text = getattr(config, "text_config", None)
    if model_type not in _BY_TYPE and text is not None and text.model_type in _BY_TYPE:
        raise UnsupportedArchitectureError(
            f"{model_type!r} is a multimodal wrapper around {text.model_type!r}; premoe handles "
            "the text model only: export or load its language model as a standalone checkpoint"
        )
    arch = arch_for_model_type(model_type)
    if arch.name == "deepseek_v2" and getattr(config, "topk_method", "greedy") != "greedy":
        raise UnsupportedArchitectureError(
            f"deepseek_v2 with topk_method={config.topk_method!r} is not supported (only 'greedy')"
        )
    return arch
