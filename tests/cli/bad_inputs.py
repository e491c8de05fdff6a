"""A corpus of bad inputs, run through the real `premoe` entry point (issue #13).

Each `Case` is one command line with something wrong in it: a corrupt store, a bad corpus or
eval set, a bad option, an output that is an input, an unwritable or full output location. The
contract: a one-line ``premoe: error: ...`` (no traceback), a non-zero exit code, and nothing
written anywhere in the workspace. `build_workspace` makes the shared inputs once (a tiny model
with a tokenizer, a store of it, good and bad files); `run_case` runs one case in process.

Used by `tests/cli/test_bad_inputs.py` and `bench/bench_bad_inputs.py`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

UNWRITABLE = Path("/sys/premoe-unwritable")
"""A location no process can write, not even root (sysfs refuses new entries)."""


@dataclass(frozen=True)
class Case:
    """One bad command line. `args` may hold ``{name}`` fields of `Workspace.paths`."""

    id: str
    args: tuple[str, ...]
    expect: str  # a substring of the one error line
    code: int | None = None  # the exit code, when it matters (None: any non-zero)
    stdin: bytes | None = None
    patch: str | None = None  # a dotted name replaced by a function raising ENOSPC
    needs: str | None = None  # "unwritable": skipped where UNWRITABLE is writable


@dataclass
class Outcome:
    case: Case
    code: int
    out: str
    err: str
    traceback: str | None = None
    changed: list[str] = field(default_factory=list)

    @property
    def lines(self) -> list[str]:
        return [line for line in self.err.strip().splitlines() if line.strip()]

    @property
    def error_line(self) -> str:
        errors = [line for line in self.lines if line.startswith("premoe: error: ")]
        return errors[0] if len(errors) == 1 else ""

    @property
    def clean(self) -> bool:
        """One error line, last on stderr, with the expected text; non-zero exit; no traceback;
        nothing written."""
        return (
            self.traceback is None
            and "Traceback" not in self.err
            and self.code != 0
            and (self.case.code is None or self.code == self.case.code)
            and bool(self.error_line)
            and self.lines[-1] == self.error_line
            and self.case.expect in self.error_line
            and not self.changed
        )

    @property
    def silent(self) -> bool:
        """Exit 0: a wrong or silent answer instead of an error."""
        return self.code == 0 and self.traceback is None


# ---- workspace ---------------------------------------------------------------------------------


@dataclass
class Workspace:
    root: Path
    paths: dict[str, str]

    def digest(self) -> dict[str, str]:
        """relative path -> sha256 (files), "dir" (folders), "link" (links), of the workspace."""
        out: dict[str, str] = {}
        for folder, dirs, files in os.walk(self.root):
            for name in dirs + files:
                path = Path(folder) / name
                rel = str(path.relative_to(self.root))
                if path.is_symlink():
                    out[rel] = "link"
                elif path.is_dir():
                    out[rel] = "dir"
                else:
                    out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        return out


def _write(path: Path, data: bytes | str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    return str(path)


def _store_copy(store: Path, dest: Path, edit: Callable[[Path], None]) -> str:
    shutil.copytree(store, dest)
    edit(dest)
    return str(dest)


def _edit_meta(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        meta = json.loads((folder / "store.json").read_text())
        change(meta)
        (folder / "store.json").write_text(json.dumps(meta))

    return edit


def build_workspace(root: Path) -> Workspace:
    """The shared inputs of the cases (a few seconds: one tiny model, one small store)."""
    from premoe.profile import profile
    from tests.helpers import save_with_tokenizer, suite, tiny_model
    from tests.tiny import build_tiny, save_tiny

    root.mkdir(parents=True, exist_ok=True)
    model = save_with_tokenizer(tiny_model("qwen3_moe"), root / "model")
    other = save_with_tokenizer(tiny_model("qwen3_moe", seed=1), root / "other")
    notok = save_tiny(build_tiny("qwen3_moe", 0), root / "notok", "original")
    data = suite(root / "data", tasks=("add", "reverse"), n=16)
    store = root / "stores" / "store"
    tasks = {t: data[t]["profile"] for t in ("add", "reverse")}
    profile(model, tasks, out=store, device="cpu", max_length=64, batch_size=16)
    other_store = root / "stores" / "other"
    profile(other, {"add": data["add"]["profile"]}, out=other_store, device="cpu", max_length=64)
    bad = root / "bad"
    p: dict[str, str] = {
        "ws": str(root),
        "model": str(model),
        "other": str(other),
        "notok": str(notok),
        "store": str(store),
        "stores": str(store.parent),
        "other_store": str(other_store),
        "good": str(data["add"]["profile"]),
        "good_eval": str(data["add"]["eval"]),
        "data": str(root / "data"),
        "afile": _write(root / "afile.txt", "just a file\n"),
        "png": _write(root / "old.png", b"not really a png"),
        "plain": str(root / "plain"),
        "missing": str(root / "does-not-exist.jsonl"),
        "nonutf8_txt": _write(bad / "latin1.txt", "caf\xe9 au lait\n".encode("latin-1")),
        "nonutf8_jsonl": _write(bad / "latin1.jsonl", '{"text": "caf\xe9"}\n'.encode("latin-1")),
        "binary_jsonl": _write(bad / "binary.jsonl", bytes(range(256)) * 4),
        "binary_txt": _write(bad / "binary.txt", b"\x00\x01\x02text\x00\n" * 10),
        "empty": _write(bad / "empty.jsonl", ""),
        "blank_lines": _write(bad / "blank.txt", "\n   \n\t\n"),
        "bad_json": _write(bad / "broken.jsonl", '{"text": "ok"}\n{"text": \n'),
        "not_object": _write(bad / "list.jsonl", "[1, 2, 3]\n"),
        "no_field": _write(bad / "nofield.jsonl", '{"body": "x"}\n'),
        "bad_value": _write(bad / "number.jsonl", '{"text": 17}\n'),
        "json_array_bad": _write(bad / "array.json", "[{"),
        "unknown_suffix": _write(bad / "corpus.xyz", "text\n"),
        "bad_csv": _write(bad / "bad.parquet", "not parquet at all"),
        "eval_nonutf8": _write(bad / "eval.latin1.jsonl", b'{"prompt": "\xff", "answer": "1"}\n'),
        "eval_binary": _write(bad / "eval.bin.txt", b"\x00\x00\x00\x00"),
        "eval_unknown": _write(bad / "eval.xyz", "x\n"),
        "eval_no_task": _write(bad / "eval.notask.jsonl", '{"prompt": "1+1=", "answer": "2"}\n'),
        "unwritable": str(UNWRITABLE / "out"),
        "unwritable_png": str(UNWRITABLE / "plot.png"),
        "long_prompt": "1+2=" * 40,
    }
    (root / "plain").mkdir()
    _write(root / "plain" / "mine.txt", "my own file\n")
    (bad / "folder-corpus").mkdir()
    p["folder_corpus"] = str(bad / "folder-corpus")

    # corrupt stores
    s = bad / "stores"
    p["st_damaged"] = _store_copy(store, s / "damaged", lambda d: _write(d / "store.json", "{"))
    p["st_latin1"] = _store_copy(
        store, s / "latin1", lambda d: _write(d / "store.json", b"\xff\xfe{}")
    )
    p["st_no_scores"] = _store_copy(
        store, s / "noscores", lambda d: (d / "scores.safetensors").unlink()
    )
    p["st_trunc_scores"] = _store_copy(
        store,
        s / "truncscores",
        lambda d: _write(d / "scores.safetensors", (d / "scores.safetensors").read_bytes()[:100]),
    )
    p["st_no_index"] = _store_copy(store, s / "noindex", lambda d: (d / "index.faiss").unlink())
    p["st_bad_index"] = _store_copy(
        store, s / "badindex", lambda d: _write(d / "index.faiss", b"garbage" * 10)
    )
    p["st_future"] = _store_copy(
        store, s / "future", _edit_meta(lambda m: m.update(format_version=99))
    )
    p["st_not_store"] = _store_copy(
        store, s / "notstore", _edit_meta(lambda m: m.update(format="something-else"))
    )
    p["st_no_tasks"] = _store_copy(store, s / "notasks", _edit_meta(lambda m: m.pop("tasks")))
    p["st_bad_metric"] = _store_copy(
        store, s / "badmetric", _edit_meta(lambda m: m.update(metrics=["bogus"]))
    )
    p["st_bad_key"] = _store_copy(
        store, s / "badkey", _edit_meta(lambda m: m["key"].update(kind="bogus"))
    )
    p["st_tokens"] = _store_copy(
        store, s / "tokens", _edit_meta(lambda m: m["tasks"]["add"].update(tokens=1))
    )
    p["st_empty_dir"] = str(s / "emptydir")
    (s / "emptydir").mkdir()

    # broken models
    m = bad / "models"
    p["md_noconfig"] = str(m / "noconfig")
    (m / "noconfig").mkdir(parents=True)
    _write(m / "noconfig" / "model.safetensors", b"")
    p["md_badconfig"] = _store_copy(
        model, m / "badconfig", lambda d: _write(d / "config.json", "{")
    )
    p["md_llama"] = _store_copy(
        model,
        m / "llama",
        lambda d: _write(d / "config.json", json.dumps({"model_type": "llama"})),
    )
    p["md_trunc"] = _store_copy(
        model,
        m / "trunc",
        lambda d: _write(d / "model.safetensors", (d / "model.safetensors").read_bytes()[:64]),
    )
    p["md_noweights"] = _store_copy(
        model, m / "noweights", lambda d: os.unlink(d / "model.safetensors")
    )
    return Workspace(root, p)


# ---- the cases ---------------------------------------------------------------------------------


def _c(id: str, cmd: str | tuple[str, ...], expect: str, **kw: Any) -> Case:
    return Case(id, tuple(cmd.split()) if isinstance(cmd, str) else cmd, expect, **kw)


_P = "profile {model} -t add={good} --max-length 64"
_E = "export {model} -s {store} -t add -k 4"
_V = "eval {model} -s {store} -t add -e add={good_eval} -k 4 -m tcess --max-samples 4"
_G = "generate {model} -s {store} --keep 4 --device cpu"

CASES: tuple[Case, ...] = (
    # -- profile: bad corpora
    _c("profile-corpus-latin1-txt", "profile {model} -t a={nonutf8_txt} -o {ws}/o", "not UTF-8"),
    _c("profile-corpus-latin1-jsonl", "profile {model} -t a={nonutf8_jsonl} -o {ws}/o", "UTF-8"),
    _c("profile-corpus-binary-jsonl", "profile {model} -t a={binary_jsonl} -o {ws}/o", "binary"),
    _c("profile-corpus-binary-txt", "profile {model} -t a={binary_txt} -o {ws}/o", "binary"),
    _c("profile-corpus-missing", "profile {model} -t a={missing} -o {ws}/o", "does not exist"),
    _c("profile-corpus-folder", "profile {model} -t a={folder_corpus} -o {ws}/o", "is a folder"),
    _c("profile-corpus-suffix", "profile {model} -t a={unknown_suffix} -o {ws}/o", "format"),
    _c("profile-corpus-empty", "profile {model} -t a={empty} -o {ws}/o", "no non-empty sample"),
    _c("profile-corpus-blank", "profile {model} -t a={blank_lines} -o {ws}/o", "non-empty"),
    _c("profile-corpus-bad-json", "profile {model} -t a={bad_json} -o {ws}/o", "not valid JSON"),
    _c("profile-corpus-not-object", "profile {model} -t a={not_object} -o {ws}/o", "JSON object"),
    _c("profile-corpus-no-field", "profile {model} -t a={no_field} -o {ws}/o", "no text field"),
    _c("profile-corpus-number", "profile {model} -t a={bad_value} -o {ws}/o", "expected text"),
    _c("profile-corpus-json-array", "profile {model} -t a={json_array_bad} -o {ws}/o", "JSON"),
    _c("profile-corpus-parquet", "profile {model} -t a={bad_csv} -o {ws}/o", "cannot read"),
    _c("profile-text-field", _P + " --text-field body -o {ws}/o", "no field 'body'"),
    # -- profile: bad options
    _c("profile-task-spec", "profile {model} -t add -o {ws}/o", "NAME=SOURCE", code=2),
    _c("profile-task-name", "profile {model} -t __x={good} -o {ws}/o", "bad task name", code=2),
    _c("profile-task-twice", _P + " -t add={good} -o {ws}/o", "given twice", code=2),
    _c("profile-knn-0", _P + " --knn 0 -o {ws}/o", "--knn must be >= 1", code=2),
    _c(
        "profile-max-length-0", "profile {model} -t a={good} --max-length 0 -o {ws}/o", "max-length"
    ),
    _c("profile-max-samples-0", _P + " --max-samples 0 -o {ws}/o", "max-samples", code=2),
    _c("profile-batch-0", _P + " --batch-size 0 -o {ws}/o", "batch-size", code=2),
    _c("profile-threshold", _P + " --threshold 1.5 -o {ws}/o", "threshold", code=2),
    _c("profile-metric", _P + " -m bogus -o {ws}/o", "bogus", code=2),
    _c("profile-key", _P + " --key bogus -o {ws}/o", "key kind", code=2),
    _c("profile-search", _P + " --search bogus -o {ws}/o", "search", code=2),
    _c("profile-max-length-mix", _P.replace("64", "32") + " -o {store}", "--max-length 64"),
    _c("profile-store-metrics-mix", _P + " -m frequency -o {store}", "holds metrics", code=2),
    _c("profile-other-model-store", _P + " -o {other_store}", "another model"),
    _c("profile-damaged-store", _P + " -o {st_damaged}", "damaged"),
    # -- profile: bad models
    _c("profile-model-missing", "profile {ws}/nomodel -t a={good} -o {ws}/o", "not a folder"),
    _c("profile-model-no-tokenizer", "profile {notok} -t a={good} -o {ws}/o", "tokenizer"),
    _c("profile-model-no-config", "profile {md_noconfig} -t a={good} -o {ws}/o", "config.json"),
    _c("profile-model-bad-config", "profile {md_badconfig} -t a={good} -o {ws}/o", "config.json"),
    _c("profile-model-llama", "profile {md_llama} -t a={good} -o {ws}/o", "llama"),
    _c("profile-model-truncated", "profile {md_trunc} -t a={good} -o {ws}/o", "truncated"),
    # -- profile: outputs
    _c("profile-out-is-model", _P + " -o {model}", "not a pattern store"),
    _c("profile-out-is-model-overwrite", _P + " -o {model} --overwrite", "is the model folder"),
    _c("profile-out-in-model", _P + " -o {model}/store", "inside the model folder"),
    _c("profile-out-is-corpus", _P + " -o {good} --overwrite", "is the corpus"),
    _c("profile-out-holds-corpus", _P + " -o {data} --overwrite", "contains the corpus"),
    _c("profile-out-plain-overwrite", _P + " -o {plain} --overwrite", "premoe did not write"),
    _c("profile-out-under-file", _P + " -o {afile}/store", "is a file, not a folder"),
    _c("profile-out-unwritable", _P + " -o {unwritable}", "cannot write", needs="unwritable"),
    _c(
        "profile-out-full",
        _P + " -o {ws}/o",
        "No space left",
        patch="premoe.patterns.files.save_file",
    ),
    # -- export
    _c("export-out-is-store", _E + " -o {store} --overwrite", "is the pattern store"),
    _c("export-out-is-model", _E + " -o {model} --overwrite", "is the source model folder"),
    _c("export-out-in-model", _E + " -o {model}/pruned", "inside the source model folder"),
    _c("export-out-in-store", _E + " -o {store}/pruned", "inside the pattern store"),
    _c("export-out-holds-store", _E + " -o {stores} --overwrite", "contains the pattern store"),
    _c("export-out-exists", _E + " -o {plain}", "already exists", code=2),
    _c("export-out-plain-overwrite", _E + " -o {plain} --overwrite", "premoe did not write"),
    _c("export-out-under-file", _E + " -o {afile}/x", "is a file, not a folder"),
    _c("export-out-unwritable", _E + " -o {unwritable}", "cannot write", needs="unwritable"),
    _c("export-out-full", _E + " -o {ws}/x", "No space left", patch="premoe.io.writer.save_file"),
    _c("export-store-damaged", "export {model} -s {st_damaged} -t add -k 4 -o {ws}/x", "damaged"),
    _c("export-store-latin1", "export {model} -s {st_latin1} -t add -k 4 -o {ws}/x", "UTF-8"),
    _c("export-store-no-scores", "export {model} -s {st_no_scores} -t add -k 4 -o {ws}/x", "lacks"),
    _c(
        "export-store-trunc-scores",
        "export {model} -s {st_trunc_scores} -t add -k 4 -o {ws}/x",
        "damaged",
    ),
    _c("export-store-no-index", "export {model} -s {st_no_index} -t add -k 4 -o {ws}/x", "lacks"),
    _c("export-store-bad-index", "export {model} -s {st_bad_index} -t add -k 4 -o {ws}/x", "index"),
    _c("export-store-future", "export {model} -s {st_future} -t add -k 4 -o {ws}/x", "version"),
    _c(
        "export-store-not-store",
        "export {model} -s {st_not_store} -t add -k 4 -o {ws}/x",
        "not a premoe pattern store",
    ),
    _c(
        "export-store-no-tasks", "export {model} -s {st_no_tasks} -t add -k 4 -o {ws}/x", "no tasks"
    ),
    _c(
        "export-store-bad-metric",
        "export {model} -s {st_bad_metric} -t add -k 4 -o {ws}/x",
        "unknown metric",
    ),
    _c("export-store-bad-key", "export {model} -s {st_bad_key} -t add -k 4 -o {ws}/x", "key spec"),
    _c("export-store-tokens", "export {model} -s {st_tokens} -t add -k 4 -o {ws}/x", "token count"),
    _c(
        "export-store-empty-dir",
        "export {model} -s {st_empty_dir} -t add -k 4 -o {ws}/x",
        "not a pattern store",
    ),
    _c(
        "export-store-missing", "export {model} -s {ws}/nostore -t add -k 4 -o {ws}/x", "no pattern"
    ),
    _c(
        "export-store-other-model",
        "export {model} -s {other_store} -t add -k 4 -o {ws}/x",
        "another",
    ),
    _c(
        "export-task-unknown",
        "export {model} -s {store} -t nope -k 4 -o {ws}/x",
        "not in the store",
    ),
    _c("export-keep-0", "export {model} -s {store} -t add -k 0 -o {ws}/x", "keep", code=2),
    _c("export-keep-too-many", "export {model} -s {store} -t add -k 99 -o {ws}/x", "99", code=2),
    _c("export-two-policies", _E + " --coverage 0.5 -o {ws}/x", "one of", code=2),
    _c("export-budget", "export {model} -s {store} -t add -b lots -o {ws}/x", "lots", code=2),
    _c("export-format", _E + " -f onnx -o {ws}/x", "format", code=2),
    _c("export-shard-size", _E + " --max-shard-size huge -o {ws}/x", "huge", code=2),
    _c("export-metric", _E + " -m bogus -o {ws}/x", "bogus"),
    _c("export-model-truncated", "export {md_trunc} --policy random -k 4 -o {ws}/x", "truncated"),
    _c(
        "export-model-no-weights",
        "export {md_noweights} --policy random -k 4 -o {ws}/x",
        "safetensors",
    ),
    # -- eval: outputs first, then inputs
    _c("eval-plot-unwritable", _V + " --plot {unwritable_png}", "cannot write", needs="unwritable"),
    _c("eval-plot-under-file", _V + " --plot {afile}/p.png", "is a file, not a folder"),
    _c("eval-plot-not-png", _V + " --plot {ws}/p.jpg", "PNG", code=2),
    _c("eval-plot-in-store", _V + " --plot {store}/p.png", "inside the pattern store"),
    _c("eval-plot-exists", _V + " --plot {png}", "already exists", code=2),
    _c("eval-plot-is-folder", _V.replace("-e add={good_eval}", "") + " --plot {plain}", "PNG"),
    _c(
        "eval-set-latin1",
        "eval {model} -s {store} -t add -e add={eval_nonutf8} -k 4 -m tcess",
        "not UTF-8",
    ),
    _c("eval-set-binary", "eval {model} -s {store} -t add -e add={eval_binary} -k 4", "binary"),
    _c(
        "eval-set-missing", "eval {model} -s {store} -t add -e add={missing} -k 4", "does not exist"
    ),
    _c("eval-set-suffix", "eval {model} -s {store} -t add -e add={eval_unknown} -k 4", "format"),
    _c(
        "eval-set-no-task-field",
        "eval {model} -s {store} -t add -t reverse -e {eval_no_task} -k 4",
        "no 'task' field",
        code=2,
    ),
    _c("eval-set-task", "eval {model} -s {store} -t add -e zzz={good_eval} -k 4", "zzz", code=2),
    _c("eval-method", _V + " -m bogus", "unknown method", code=2),
    _c("eval-via", _V + " --via ftp", "ftp"),
    _c("eval-store-damaged", "eval {model} -s {st_damaged} -t add -k 4", "damaged"),
    # -- generate / route
    _c("generate-long-prompt", _G + " {long_prompt}", "maximum context length", code=2),
    _c("generate-empty-prompt", (*_G.split(), "  "), "prompt is empty", code=2),
    _c("generate-keep-and-budget", _G + " --budget 1GiB 1+1=", "at most one", code=2),
    _c("generate-task", _G + " --task nope 1+1=", "not in the store"),
    _c("generate-max-new-0", _G + " --max-new-tokens 0 1+1=", "max-new-tokens", code=2),
    _c("generate-stdin-latin1", _G + " -", "not UTF-8", stdin=b"caf\xe9\n", code=2),
    _c("generate-store-damaged", "generate {model} -s {st_damaged} 1+1=", "damaged"),
    _c("route-stdin-latin1", "route {store} {model} -", "not UTF-8", stdin=b"\xff\xfe", code=2),
    _c("route-store-bad-index", "route {st_bad_index} {model} 1+1=", "index"),
    _c("route-store-other-model", "route {other_store} {model} 1+1=", "another model"),
    # -- patterns / plan
    _c("patterns-list-missing", "patterns list {ws}/nostore", "no pattern store"),
    _c("patterns-show-damaged", "patterns show {st_damaged}", "damaged"),
    _c("patterns-show-task", "patterns show {store} -t nope", "unknown task"),
    _c("patterns-plot-in-store", "patterns plot {store} -o {store}", "inside the pattern store"),
    _c("patterns-plot-under-file", "patterns plot {store} -o {afile}/plots", "is a file"),
    _c(
        "patterns-plot-unwritable",
        "patterns plot {store} -o {unwritable}",
        "cannot",
        needs="unwritable",
    ),
    _c("plan-store-damaged", "plan {model} -s {st_damaged} -t add", "damaged"),
    _c("plan-budget", "plan {model} --budget lots", "lots", code=2),
    # -- demo
    _c("demo-out-under-file", "demo --quick -o {afile}/demo", "is a file, not a folder"),
    _c("demo-out-plain-overwrite", "demo --quick -o {plain} --overwrite", "premoe did not write"),
    _c(
        "demo-out-is-store",
        "demo --quick -s {store} -o {store} --overwrite",
        "is the pattern store",
    ),
    _c("demo-out-unwritable", "demo --quick -o {unwritable}", "cannot write", needs="unwritable"),
)


def unwritable_available() -> bool:
    """Whether `UNWRITABLE` really refuses writes here (Linux sysfs)."""
    try:
        UNWRITABLE.mkdir()
    except OSError:
        return True
    UNWRITABLE.rmdir()
    return False


# ---- running -----------------------------------------------------------------------------------


def _full(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[1]) if len(args) > 1 else "")


@contextlib.contextmanager
def _stdin(data: bytes | None) -> Iterator[None]:
    old = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(data or b""), encoding="utf-8")
    try:
        yield
    finally:
        sys.stdin = old


def expand(case: Case, ws: Workspace) -> list[str]:
    return [a.format(**ws.paths) for a in case.args]


def run_case(case: Case, ws: Workspace) -> Outcome:
    """Run `premoe ARGS` in process through the console entry point (`premoe_cli.app.main`)."""
    from premoe_cli.app import main

    before = ws.digest()
    out, err = io.StringIO(), io.StringIO()
    code, tb = 0, None
    argv = sys.argv
    sys.argv = ["premoe", *expand(case, ws)]
    patcher = mock.patch(case.patch, _full) if case.patch else contextlib.nullcontext()
    try:
        with patcher, _stdin(case.stdin), contextlib.redirect_stdout(out):
            with contextlib.redirect_stderr(err):
                main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # a traceback: the bug this corpus hunts
        code, tb = 1, traceback.format_exc()
    finally:
        sys.argv = argv
    after = ws.digest()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return Outcome(case, code, out.getvalue(), err.getvalue(), tb, changed)


def summary(outcomes: list[Outcome]) -> dict[str, Any]:
    """The figures of a run: cases, clean errors, tracebacks, silent wrong results."""
    return {
        "cases": len(outcomes),
        "clean_errors": sum(o.clean for o in outcomes),
        "tracebacks": sum(o.traceback is not None or "Traceback" in o.err for o in outcomes),
        "silent_wrong_results": sum(o.silent for o in outcomes),
        "wrote_something": sum(bool(o.changed) for o in outcomes),
        "unclean": [o.case.id for o in outcomes if not o.clean],
    }
