"""The small non-weight files an export copies from its source (tokenizer, chat template,
generation config...)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

PROVENANCE_NAME = "premoe.json"
MAX_COPY_BYTES = 256 * 2**20
"""Non-weight files larger than this are not copied (with a warning)."""

_WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".npz",
    ".onnx",
)
_SKIP_NAMES = {"config.json", PROVENANCE_NAME}


def _is_weight(name: str) -> bool:
    lower = name.lower()
    return lower.endswith(_WEIGHT_SUFFIXES) or lower.endswith(".index.json")


def copy_extra_files(source: Path, dest: Path) -> list[str]:
    """Copy tokenizer files, chat template, generation config and any other small non-weight
    file (not hidden, not config.json / premoe.json) from `source` into `dest`."""
    copied = []
    for root, dirs, files in os.walk(source, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_root = Path(root).relative_to(source)
        for name in sorted(files):
            rel = rel_root / name
            if name.startswith(".") or _is_weight(name) or str(rel) in _SKIP_NAMES:
                continue
            path = Path(root) / name
            try:
                size = path.stat().st_size
            except OSError:  # a dangling link
                continue
            if size > MAX_COPY_BYTES:
                log.warning("not copying %s (%d bytes): too large for a non-weight file", rel, size)
                continue
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest / rel)
            copied.append(str(rel))
    return copied
