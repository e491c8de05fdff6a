"""Architecture registry: one declarative `ArchSpec` per MoE family."""

from premoe.arch.families import ARCHS
from premoe.arch.registry import arch_for_config, arch_for_model_type, supported_model_types
from premoe.arch.spec import ArchSpec, ExpertTensor, RouterSpec, RouterTensor

__all__ = [
    "ARCHS",
    "ArchSpec",
    "ExpertTensor",
    "RouterSpec",
    "RouterTensor",
    "arch_for_config",
    "arch_for_model_type",
    "supported_model_types",
]
