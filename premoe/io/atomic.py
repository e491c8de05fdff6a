"""Atomic output: build a folder or file next to its destination, then rename it into place.

Nothing appears at the destination until the work succeeds, and a failure leaves the destination
as it was. Renaming (never rewriting in place) also keeps a source checkpoint that is still
memory-mapped intact when an export overwrites it (safetensors commit `24b0b28`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from premoe.errors import OutputExistsError

LOG = logging.getLogger(__name__)

TMP_MARKER = ".premoe-tmp-"
"""Part of the name of every temporary sibling made here: `.{name}.premoe-tmp-<random>`."""

_OLD_MARKER = ".premoe-old-"


def _umask() -> int:
    """The process umask, read without changing it where the OS allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(*, is_dir: bool) -> int:
    """The mode a plain `open()`/`mkdir()` would give: 0o666 or 0o777 less the umask."""
    return (0o777 if is_dir else 0o666) & ~_umask()


def _remove(path: Path) -> None:
    """Delete a file, link or folder tree, best effort (the caller checks what is left)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _free_sibling(out: Path, marker: str) -> Path:
    """A name next to `out` that nothing uses yet."""
    while True:
        candidate = out.with_name(f".{out.name}{marker}{secrets.token_hex(4)}")
        if not os.path.lexists(candidate):
            return candidate


def _refuse(out: Path) -> OutputExistsError:
    return OutputExistsError(
        f"output {out} already exists; pass --overwrite to replace it or choose another path"
    )


def refuse_existing(out: Path, *, overwrite: bool) -> None:
    """Raise `OutputExistsError` if `out` exists (even as a dangling link) and not `overwrite`."""
    if os.path.lexists(out) and not overwrite:
        raise _refuse(out)


def _commit(tmp: Path, out: Path, *, overwrite: bool) -> None:
    """Move `tmp` to `out`; an existing `out` is renamed aside first and deleted only after."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    if not overwrite:  # something appeared at `out` while we were working
        raise _refuse(out)
    backup = _free_sibling(out, _OLD_MARKER)
    os.rename(out, backup)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(backup, out)
        raise
    _remove(backup)
    if os.path.lexists(backup):
        LOG.warning("replaced %s but could not delete the old copy at %s", out, backup)


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder that becomes `out` when the `with` block succeeds.

    The temporary folder is a sibling of `out` (same filesystem, so the final rename is atomic)
    named `.{out.name}.premoe-tmp-<random>`. If `out` exists and `overwrite` is False this raises
    `OutputExistsError` before yielding, so no work is wasted. With `overwrite`, the old `out` is
    renamed to a sibling backup, the new folder renamed into place, then the backup deleted, so
    one of the two is always on disk. On any exception the temporary folder is deleted and `out`
    is left untouched. Missing parent folders are created.
    """
    out = Path(out)
    refuse_existing(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_MARKER}", dir=out.parent))
    try:
        os.chmod(tmp, default_mode(is_dir=True))  # mkdtemp makes 0o700; match a plain mkdir
        yield tmp
        _commit(tmp, out, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    LOG.debug("wrote %s", out)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and `os.replace`.

    Readers see either the old content or the new one, never a partial file.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARKER}", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode(is_dir=False))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_text(path: str | Path, text: str, *, encoding: str = "utf-8") -> None:
    """`atomic_write_bytes` for text."""
    atomic_write_bytes(path, text.encode(encoding))
