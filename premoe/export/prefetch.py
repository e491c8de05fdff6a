"""Read-ahead hints for the kept bytes of a source shard (posix_fadvise WILLNEED).

Export reads only the kept experts: many separate byte ranges (one per kept per-expert tensor,
or per run of kept rows of a fused tensor). Faulted in one page at a time through the shard's
memory map, cold ranges are read in small pieces. Telling the kernel the ranges of the next shard
up front (`POSIX_FADV_WILLNEED`) lets it read them in large requests, in the background, while
the current shard is processed. Hints only: nothing changes if the call is unavailable or fails.

The byte ranges come from the shard's safetensors header (8-byte length + JSON,
`premoe.plan.read_header`); `CheckpointReader` does not expose data offsets.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from premoe.arch.keys import ExpertKey, KeyMap, RouterKey
from premoe.errors import CheckpointError
from premoe.io.reader import row_runs
from premoe.prune import KeepSets
from premoe.sizes import read_header

log = logging.getLogger(__name__)

_HAVE_FADVISE = hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_WILLNEED")


def kept_ranges(
    path: Path, keys: Iterable[str], keymap: KeyMap, keep: KeepSets
) -> list[tuple[int, int]]:
    """(file offset, length) of the bytes of `keys` in shard `path` that the export reads."""
    base, header = read_header(path)
    ranges = []
    for key in keys:
        info = header.get(key)
        if info is None:
            continue
        start, stop = (int(x) for x in info["data_offsets"])
        role = keymap.role(key)
        shape = info.get("shape") or []
        if role is not None and not (isinstance(role, ExpertKey) and role.expert is not None):
            along_rows = isinstance(role, ExpertKey) or (
                isinstance(role, RouterKey) and role.tensor.dim == 0
            )
            if along_rows and shape and (stop - start) % shape[0] == 0:
                row = (stop - start) // shape[0]
                for a, b in row_runs(sorted(set(keep.layers[role.layer]))):
                    ranges.append((base + start + a * row, (b - a) * row))
                continue
        ranges.append((base + start, stop - start))
    return ranges


def will_need(path: Path, ranges: list[tuple[int, int]]) -> None:
    """Ask the kernel to read `ranges` of `path` ahead (a hint; errors are ignored)."""
    if not _HAVE_FADVISE or not ranges:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        for offset, length in ranges:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
    except OSError as err:
        log.debug("read-ahead hint for %s failed: %s", path, err)
    finally:
        os.close(fd)


class ShardPrefetcher:
    """Hints the kept ranges of shard i+1 when streaming enters shard i.

    `shard_keys`: the wanted source keys grouped by shard, in streaming order. Call
    `entering(shard)` before the first tensor of each shard.
    """

    def __init__(self, shard_keys: dict[Path, list[str]], keymap: KeyMap, keep: KeepSets) -> None:
        self.order = [s for s, keys in shard_keys.items() if keys]
        self.shard_keys = shard_keys
        self.keymap = keymap
        self.keep = keep
        self.done: set[Path] = set()

    def _hint(self, shard: Path) -> None:
        if shard in self.done:
            return
        self.done.add(shard)
        try:
            ranges = kept_ranges(shard, self.shard_keys[shard], self.keymap, self.keep)
        except CheckpointError as err:  # a hint only; the reader reports it when reading
            log.debug("no read-ahead for %s: %s", shard, err)
            return
        will_need(shard, ranges)

    def entering(self, shard: Path) -> None:
        self._hint(shard)
        i = self.order.index(shard) if shard in self.order else -1
        if 0 <= i < len(self.order) - 1:
            self._hint(self.order[i + 1])
