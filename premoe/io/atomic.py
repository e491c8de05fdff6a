"""Atomic output: build a folder or file next to its destination, then rename it into place.

Nothing appears at the destination until the work succeeds, and a failure leaves the destination
as it was. Renaming (never rewriting in place) also keeps a source checkpoint that is still
memory-mapped intact when an export overwrites it (safetensors commit `24b0b28`).

Safety rules every writer here follows:

- **Check first.** `check_output_path` refuses, before any work: an output that is, contains or
  lies inside one of the run's inputs (with or without overwrite); an existing output without
  overwrite; with overwrite, an existing output premoe did not write (no marker file, see
  `OUTPUT_MARKERS`); and a location that cannot be written (read-only, under a file, full).
- **One writer at a time.** `output_lock` holds an `fcntl.flock` on ``.{name}.premoe-lock`` next
  to the output while it is written (re-entrant within a process); a second writer waits.
- **Leftovers are cleaned.** SIGINT/SIGTERM/SIGHUP unwind through the `except` clauses here (the
  CLI turns the last two into exceptions), so the temporary sibling is deleted. A run killed with
  SIGKILL (or a power loss) leaves ``.{name}.premoe-tmp-*``; the next writer of the same output
  removes it under the lock (`sweep_leftovers`), and restores an old output that was moved aside
  but not yet replaced.
- **Durable.** Every file and folder of the new output is fsynced before the final rename, and
  the parent folder after it.

One module because the output checks, the lock, the sweep of leftovers, the fsync and the
final rename are one protocol: each step relies on the names and markers the others write.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from premoe.errors import OutputError, OutputExistsError, UnsafeOutputError

LOG = logging.getLogger(__name__)

TMP_MARKER = ".premoe-tmp-"
"""Part of the name of every temporary sibling made here: `.{name}.premoe-tmp-<random>`."""

LOCK_SUFFIX = ".premoe-lock"
"""The lock file of an output: `.{name}.premoe-lock` (deleted when the writer is done)."""

OUTPUT_MARKERS: tuple[str, ...] = ("store.json", "premoe.json", "demo.json")
"""Files that mark a folder as premoe's own output (a store, an export, a demo folder): only
such a folder is ever replaced by ``overwrite``."""

_OLD_MARKER = ".premoe-old-"
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}

Inputs = Iterable[tuple[str, "str | Path | None"]]
"""(what, path) pairs of a run's inputs, e.g. ``[("model folder", path), ("corpus", file)]``."""


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


def _why(err: OSError) -> str:
    return err.strerror or type(err).__name__


# ---- checks --------------------------------------------------------------------------------------


def is_premoe_output(path: str | Path) -> bool:
    """Whether `path` is a folder premoe wrote (it holds one of `OUTPUT_MARKERS`)."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return False
    return any((path / name).is_file() for name in OUTPUT_MARKERS)


def _refuse(out: Path) -> OutputExistsError:
    if is_premoe_output(out):
        return OutputExistsError(
            f"output {out} already exists; pass --overwrite to replace it or choose another path"
        )
    return OutputExistsError(
        f"output {out} already exists and premoe did not write it; choose another path "
        "(--overwrite replaces only folders premoe wrote)"
    )


def refuse_existing(out: Path, *, overwrite: bool, require_marker: bool = True) -> None:
    """Raise `OutputExistsError` if `out` exists (even as a dangling link) and not `overwrite`;
    with `overwrite` (and `require_marker`), raise `UnsafeOutputError` unless premoe wrote it."""
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise _refuse(out)
    if require_marker and not is_premoe_output(out):
        what = "a file" if not out.is_dir() or out.is_symlink() else "a folder"
        raise UnsafeOutputError(
            f"output {out} is {what} premoe did not write (no {', '.join(OUTPUT_MARKERS)}); "
            "--overwrite replaces only premoe's own outputs: remove it yourself or choose "
            "another path"
        )


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def check_not_input(out: str | Path, inputs: Inputs) -> None:
    """Refuse an output that is, contains or lies inside one of `inputs` (with or without
    overwrite: replacing it would delete or corrupt the input). Inputs that are not local paths
    (hub ids, ``hf:`` datasets) are skipped."""
    out = Path(out).expanduser()
    real_out = _real(out)
    for what, src in inputs:
        if src is None or not os.path.lexists(Path(src).expanduser()):
            continue
        real_src = _real(src)
        same = real_out == real_src
        if not same and os.path.exists(real_out):
            with contextlib.suppress(OSError):
                same = os.path.samefile(real_out, real_src)
        if same:
            raise UnsafeOutputError(
                f"output {out} is the {what} {src}; writing there would destroy it, choose "
                "another output"
            )
        if real_src in real_out.parents:
            raise UnsafeOutputError(
                f"output {out} is inside the {what} {src}; write it somewhere else"
            )
        if real_out in real_src.parents:
            raise UnsafeOutputError(
                f"output {out} contains the {what} {src}; replacing it would delete the input, "
                "choose another output"
            )


def check_writable(out: str | Path) -> None:
    """Raise `OutputError` (one line, with the path) if `out` cannot be created or replaced:
    a parent that is a file, a read-only or unwritable folder, no free space. Probes with a
    temporary file that is deleted at once."""
    out = Path(out).expanduser()
    parent = Path(os.path.abspath(out)).parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {out}: {parent} is a file, not a folder")
    # named like a temporary sibling of `out`, so that `sweep_leftovers` removes it if a
    # SIGKILL lands between its creation and its deletion
    prefix = f".{out.name}{TMP_MARKER}probe-"
    try:
        with _signals_deferred():  # a SIGTERM cannot land between creation and deletion
            fd, probe = tempfile.mkstemp(prefix=prefix, dir=parent)
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):  # a concurrent sweep may take it
                os.unlink(probe)
        free = os.statvfs(parent).f_bavail
    except OSError as err:
        raise OutputError(f"cannot write {out}: {_why(err)} ({parent})") from None
    if free == 0:
        raise OutputError(f"cannot write {out}: no space left on the device of {parent}")


def check_output_path(
    out: str | Path, *, overwrite: bool, inputs: Inputs = (), require_marker: bool = True
) -> Path:
    """Every check an output gets before the work starts (module doc); returns `out` as a Path."""
    out = Path(out).expanduser()
    check_not_input(out, inputs)
    refuse_existing(out, overwrite=overwrite, require_marker=require_marker)
    check_writable(out)
    return out


def check_output_file(out: str | Path, *, overwrite: bool, inputs: Inputs = ()) -> Path:
    """`check_output_path` for a single output file (a plot): an existing folder is never
    replaced, an existing file only with `overwrite`."""
    out = Path(out).expanduser()
    check_not_input(out, inputs)
    if os.path.lexists(out):
        if out.is_dir():
            raise UnsafeOutputError(f"output {out} is a folder; give a file path")
        if not overwrite:
            raise OutputExistsError(
                f"{out} already exists; pass --overwrite or choose another path"
            )
    check_writable(out)
    return out


# ---- lock and leftovers --------------------------------------------------------------------------


def lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}{LOCK_SUFFIX}")


@dataclass
class _Held:
    rlock: threading.RLock
    depth: int = 0
    fd: int = -1


_HELD: dict[str, _Held] = {}
_HELD_GUARD = threading.Lock()


def _holder(path: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        return f" (pid {int(path.read_text().strip())})"
    return ""


def _flock(path: Path, out: Path, timeout: float | None) -> int:
    """Open and lock `path` exclusively; retry when it was deleted under us (module doc)."""
    start = time.monotonic()
    told = False
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise OutputError(f"cannot write {out}: {_why(err)} ({path.parent})") from None
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not told:
                        LOG.warning(
                            "another premoe process%s is writing %s; waiting", _holder(path), out
                        )
                        told = True
                    if timeout is not None and time.monotonic() - start > timeout:
                        raise OutputError(
                            f"{out} is being written by another premoe process{_holder(path)}; "
                            "wait for it or choose another path"
                        ) from None
                    time.sleep(0.05)
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the previous holder deleted the file after we opened it: retry


@contextlib.contextmanager
def output_lock(out: str | Path, *, timeout: float | None = None) -> Iterator[None]:
    """Hold the exclusive lock of output `out` (re-entrant in one thread; other threads and
    processes wait, at most `timeout` seconds if given). The parent folder must exist."""
    out = Path(os.path.abspath(Path(out).expanduser()))
    with _HELD_GUARD:
        held = _HELD.setdefault(str(out), _Held(threading.RLock()))
    if not held.rlock.acquire(timeout=-1 if timeout is None else timeout):
        raise OutputError(
            f"{out} is being written by another premoe process (pid {os.getpid()}); wait for "
            "it or choose another path"
        )
    try:
        if held.depth == 0:
            held.fd = _flock(lock_path(out), out, timeout)
        held.depth += 1
        try:
            yield
        finally:
            held.depth -= 1
            if held.depth == 0:
                with contextlib.suppress(OSError):
                    os.unlink(lock_path(out))
                os.close(held.fd)
                held.fd = -1
    finally:
        held.rlock.release()


def sweep_leftovers(out: str | Path) -> list[Path]:
    """Remove the temporary siblings of `out` that an interrupted run left (call it holding
    `output_lock(out)`); an old output moved aside but never replaced is moved back first.
    Returns what was removed or restored."""
    out = Path(out)
    parent = out.parent
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    tmps = [parent / n for n in names if n.startswith(f".{out.name}{TMP_MARKER}")]
    olds = sorted(
        (parent / n for n in names if n.startswith(f".{out.name}{_OLD_MARKER}")),
        key=lambda p: p.lstat().st_mtime,
    )
    done: list[Path] = []
    if olds and not os.path.lexists(out):
        os.rename(olds[-1], out)
        LOG.warning("restored %s from %s, left by an interrupted premoe run", out, olds[-1])
        done.append(olds.pop())
    for path in tmps + olds:
        _remove(path)
        LOG.warning("removed %s, left by an interrupted premoe run", path)
        done.append(path)
    return done


# ---- durability ----------------------------------------------------------------------------------


def _fsync(path: Path, *, is_dir: bool) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if is_dir else 0))
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):  # some filesystems cannot fsync dirs
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every regular file and folder under `root` (folders after their contents)."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink():
                _fsync(path, is_dir=False)
        _fsync(Path(folder), is_dir=True)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP until the block is done (they are delivered after)."""
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    except (OSError, ValueError):  # pragma: no cover - platforms without sigmask
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# ---- writing -------------------------------------------------------------------------------------


def _commit(tmp: Path, out: Path, *, overwrite: bool) -> None:
    """Move `tmp` to `out`; an existing `out` is renamed aside first and deleted only after.

    SIGINT/SIGTERM/SIGHUP are held during the renames; one that arrives then is raised right
    after them, and the old copy is still deleted."""
    backup: Path | None = None
    committed = False
    try:
        with _signals_deferred():
            if os.path.lexists(out):
                if not overwrite:  # something appeared at `out` while we were working
                    raise _refuse(out)
                backup = _free_sibling(out, _OLD_MARKER)
                os.rename(out, backup)
            try:
                os.rename(tmp, out)
            except BaseException:
                if backup is not None:
                    os.rename(backup, out)
                raise
            committed = True
            with contextlib.suppress(OSError):
                _fsync(out.parent, is_dir=True)
    finally:
        if committed and backup is not None:
            _remove(backup)
            if os.path.lexists(backup):
                LOG.warning("replaced %s but could not delete the old copy at %s", out, backup)


def _output_error(err: OSError, out: Path, tmp: Path) -> OutputError | None:
    """A one-line `OutputError` for an OS error met while writing `out` (None: not ours)."""
    name = str(err.filename or "")
    if err.errno in _FULL or name.startswith(str(tmp)) or name.startswith(str(out)):
        return OutputError(f"cannot write {out}: {_why(err)}")
    return None


@contextlib.contextmanager
def atomic_output_dir(
    out: str | Path, *, overwrite: bool = False, require_marker: bool = True
) -> Iterator[Path]:
    """Yield a fresh temporary folder that becomes `out` when the `with` block succeeds.

    The temporary folder is a sibling of `out` (same filesystem, so the final rename is atomic)
    named `.{out.name}.premoe-tmp-<random>`. If `out` exists and `overwrite` is False this raises
    `OutputExistsError` before yielding, so no work is wasted; with `overwrite`, an `out` premoe
    did not write is refused too (unless `require_marker` is False). The old `out` is renamed to
    a sibling backup, the new folder renamed into place, then the backup deleted, so one of the
    two is always on disk. On any exception the temporary folder is deleted and `out` is left
    untouched; an OS error writing the output (disk full...) becomes a one-line `OutputError`.
    Missing parent folders are created. The output's lock is held throughout, and leftovers of
    interrupted runs are removed first (module doc).
    """
    out = Path(out).expanduser()
    refuse_existing(out, overwrite=overwrite, require_marker=require_marker)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot write {out}: {_why(err)} ({out.parent})") from None
    with output_lock(out):
        sweep_leftovers(out)
        refuse_existing(out, overwrite=overwrite, require_marker=require_marker)
        tmp = Path()
        try:
            with _signals_deferred():  # no signal between making `tmp` and knowing its name
                tmp = _mkdtemp(out)
            os.chmod(tmp, default_mode(is_dir=True))  # mkdtemp makes 0o700; match a plain mkdir
            yield tmp
            fsync_tree(tmp)
            _commit(tmp, out, overwrite=overwrite)
        except OSError as err:
            if tmp.name:
                _remove(tmp)
            mapped = _output_error(err, out, tmp)
            if mapped is None:
                raise
            raise mapped from err
        except BaseException:
            if tmp.name:
                _remove(tmp)
            raise
    LOG.debug("wrote %s", out)


def _mkdtemp(out: Path) -> Path:
    try:
        return Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_MARKER}", dir=out.parent))
    except OSError as err:
        raise OutputError(f"cannot write {out}: {_why(err)} ({out.parent})") from None


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and `os.replace`.

    Readers see either the old content or the new one, never a partial file.
    """
    path = Path(path)
    tmp = Path()
    try:
        with _signals_deferred():  # no signal between making the file and knowing its name
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARKER}", dir=path.parent)
            tmp = Path(tmp_name)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode(is_dir=False))
        os.replace(tmp, path)
        with contextlib.suppress(OSError):
            _fsync(path.parent, is_dir=True)
    except OSError as err:
        if tmp.name:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise OutputError(f"cannot write {path}: {_why(err)} ({path.parent})") from err
    except BaseException:
        if tmp.name:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise


def atomic_write_text(path: str | Path, text: str, *, encoding: str = "utf-8") -> None:
    """`atomic_write_bytes` for text."""
    atomic_write_bytes(path, text.encode(encoding))
