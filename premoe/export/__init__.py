"""Pruned exports: Hugging Face checkpoints and per-layer expert lists."""

from premoe.export.expert_list import (
    EXPERT_LIST_NAME,
    expert_list_lines,
    read_expert_list,
)
from premoe.export.export import (
    FORMATS,
    PROVENANCE_NAME,
    ExportResult,
    check_output,
    copy_extra_files,
    export_from_store,
    export_pruned,
    pruned_config_json,
)

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
