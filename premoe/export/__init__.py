"""Pruned exports: Hugging Face checkpoints and per-layer expert lists."""

from premoe.export.config_json import pruned_config_json
from premoe.export.expert_list import (
    EXPERT_LIST_NAME,
    expert_list_lines,
    read_expert_list,
)
from premoe.export.export import (
    FORMATS,
    ExportResult,
    check_output,
    export_from_store,
    export_pruned,
)
from premoe.export.files import PROVENANCE_NAME, copy_extra_files

__all__ = [
    "EXPERT_LIST_NAME",
    "FORMATS",
    "PROVENANCE_NAME",
    "ExportResult",
    "check_output",
    "copy_extra_files",
    "export_from_store",
    "export_pruned",
    "expert_list_lines",
    "pruned_config_json",
    "read_expert_list",
]
