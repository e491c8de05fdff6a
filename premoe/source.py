"""Resolve a model argument (local folder or hub id) into config, architecture and checkpoint."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from premoe.arch import ArchSpec, arch_for_config
from premoe.arch.keys import KeyMap
from premoe.errors import ModelNotFoundError
from premoe.io.reader import CheckpointReader

log = logging.getLogger(__name__)

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


def _local_path(model: str | Path, revision: str | None) -> Path:
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    text = str(model)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ModelNotFoundError(
            f"model {text!r} is not a folder; pass a local checkpoint folder or a hub id "
            "like org/name"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, revision=revision, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # any hub failure is a user-facing "cannot resolve"
        raise ModelNotFoundError(
            f"model {text!r} is not a local folder and could not be fetched from the hub "
            f"({type(exc).__name__}); download it first or pass its local folder"
        ) from None


def load_config(path: Path) -> Any:
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} has no config.json; is it a Hugging Face model folder?")
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise ModelNotFoundError(f"cannot read {path / 'config.json'}: {exc}") from None


@dataclass
class ModelSource:
    """A resolved model: its folder, config, family spec and (lazily) checkpoint reader."""

    path: Path
    config: Any
    arch: ArchSpec
    _reader: CheckpointReader | None = field(default=None, repr=False)

    @property
    def reader(self) -> CheckpointReader:
        if self._reader is None:
            self._reader = CheckpointReader(self.path)
        return self._reader

    @cached_property
    def keymap(self) -> KeyMap:
        return KeyMap(self.arch, self.config, self.reader.keys(), self.reader.shape)

    @property
    def num_experts(self) -> int:
        return self.arch.num_experts(self.config)

    @property
    def top_k(self) -> int:
        return self.arch.top_k(self.config)

    @property
    def moe_layers(self) -> list[int]:
        return self.arch.moe_layer_ids(self.config)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def resolve_model(model: str | Path, *, revision: str | None = None) -> ModelSource:
    """Resolve `model` and check that its family is supported (no tensor is read)."""
    path = _local_path(model, revision)
    config = load_config(path)
    arch = arch_for_config(config)
    log.debug("resolved %s: %s, %s", model, arch.name, path)
    return ModelSource(path=path, config=config, arch=arch)


_PROBE = "The quick brown fox, 1 + 2 = 3."


def load_tokenizer(path: str | Path) -> Any:
    """`AutoTokenizer.from_pretrained(path)`; a clear `ModelNotFoundError` when it fails, or when
    the folder has no tokenizer files (transformers then builds an empty tokenizer from the
    config's model type, which turns every text into zero tokens)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise ModelNotFoundError(
            f"cannot load a tokenizer from {path} ({type(exc).__name__}); add the tokenizer "
            "files to the model folder"
        ) from None
    try:
        ids = tokenizer(_PROBE)["input_ids"]
    except Exception:
        ids = []
    if not ids:
        raise ModelNotFoundError(
            f"{path} has no usable tokenizer (it turns text into no tokens); add the tokenizer "
            "files (tokenizer.json or the vocabulary, tokenizer_config.json) to the model folder"
        )
    return tokenizer
