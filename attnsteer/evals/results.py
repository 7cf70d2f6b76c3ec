"""One run directory per evaluation: ``results.json`` + ``samples.jsonl``, resumable.

Layout of a run directory (``--output_path``)::

    results.json          what decides the numbers (identity + full config), the recipes as
                          resolved with their hashes, data hashes, seeds, metrics, library
                          versions, git hash, timings, machine, one entry per session
    samples.jsonl         one JSON line per finished item, appended (flushed and fsynced) as
                          soon as the item is done
    samples.rank<R>.jsonl what process R of an ``accelerate launch`` run appends; merged into
                          samples.jsonl by the main process at the end (a crash leaves them in
                          place and they are read back on resume)

Every sample line has a ``key`` = ``<item id>|<recipe hash>|<seed>``. Re-running the same command
reads the lines back and skips every key already there, so an interrupted run resumes where it
stopped and never recomputes a finished item; a crash can lose only the items in flight (a
half-written last line is ignored and cut off).

``results.json`` is written when the run starts (``"status": "running"``) and rewritten at the end
(``"complete"``). A session that stops before the end marks it ``"interrupted"`` (Ctrl-C) or
``"failed"`` (an error), with what stopped it (``stopped``) and how to resume (``resume``: rerun the
same command on the same ``--output_path``); only a killed process leaves ``"running"``. Its ``identity`` holds the settings that decide the generated outputs (model,
data files by hash, prompt, decoding, ...). Resuming with a different identity is an error that
names each difference; settings that only select *which* items run (``--recipe``, ``--seed``,
``--limit``) or how fast (``--batch_size``, processes) may change between sessions, and scoring
settings (parser, lemmatiser) are re-applied to the raw outputs at the end.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import AttnsteerError

RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.jsonl"
RESULTS_SCHEMA = 1
STOPPED = ("interrupted", "failed")  # statuses of a run whose last session stopped before the end
BASELINE_HASH = "none"  # the "recipe hash" of the unsteered baseline in sample keys

_VERSION_PACKAGES = (
    "attnsteer",
    "torch",
    "transformers",
    "accelerate",
    "tokenizers",
    "lm-eval",
    "datasets",
    "huggingface-hub",
    "numpy",
    "pillow",
    "nltk",
    "matplotlib",
)


class RunDirError(AttnsteerError, ValueError):
    """The run directory cannot be used for this command (other settings, unreadable files)."""


def sample_key(item_id: str, recipe_hash: str, seed: int) -> str:
    """The resume key of one sample: ``<item id>|<recipe hash>|<seed>``."""
    return f"{item_id}|{recipe_hash}|{seed}"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


# ---- provenance ---------------------------------------------------------------------------------
def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that can change a number (None = not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSION_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_info() -> dict[str, Any]:
    """Commit of the attnsteer source tree (None outside a git checkout) and whether it is dirty."""
    root = Path(__file__).resolve().parents[2]
    info: dict[str, Any] = {"commit": None, "dirty": None}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return info
        info["commit"] = commit.stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
        info["dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def machine_info() -> dict[str, Any]:
    """Host, OS, CPU count and (when torch is loaded) threads and accelerators."""
    out: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            out["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            out["cuda_version"] = torch.version.cuda
    return out


# ---- JSON helpers -------------------------------------------------------------------------------
def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        if not value and prefix:
            out[prefix] = {}
        return out
    return {prefix: value}


def diff_identity(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two identity dicts (dotted paths)."""
    a, b = _flatten(_jsonable(old)), _flatten(_jsonable(new))
    lines = []
    for key in sorted(set(a) | set(b)):
        if key not in a:
            lines.append(f"{key}: not set in the existing run, {b[key]!r} now")
        elif key not in b:
            lines.append(f"{key}: {a[key]!r} in the existing run, not set now")
        elif a[key] != b[key]:
            lines.append(f"{key}: {a[key]!r} in the existing run, {b[key]!r} now")
    return lines


def _jsonable(value: Any) -> Any:
    """Round-trip through JSON so tuples/lists and int/str keys compare the way they are stored."""
    return json.loads(json.dumps(value, default=str))


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file, fsync it and rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_jsonl(path: Path, *, repair: bool = False) -> list[dict]:
    """Read a JSON Lines file written by :class:`RunDir`. A half-written last line (a crash in
    the middle of a write) is ignored, and cut off when ``repair``; a bad line elsewhere is an
    error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    records: list[dict] = []
    complete_end = data.rfind(b"\n") + 1  # bytes up to the last full line
    for lineno, raw in enumerate(data[:complete_end].splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            records.append(json.loads(raw))
        except json.JSONDecodeError as exc:
            raise RunDirError(
                f"{path}:{lineno}: not a JSON line ({exc}). The samples file was edited or damaged; "
                "fix or delete that line (the item is then recomputed)"
            ) from None
    tail = data[complete_end:]
    if tail.strip():
        try:  # a last line without "\n" that is nevertheless complete JSON
            records.append(json.loads(tail))
            if repair:
                with open(path, "ab") as f:
                    f.write(b"\n")
        except json.JSONDecodeError:
            if repair:
                with open(path, "r+b") as f:
                    f.truncate(complete_end)
    return records


# ---- the run directory --------------------------------------------------------------------------
class RunDir:
    """A resumable run directory (see the module docstring).

    Args:
        path: the directory (created if missing).
        task: ``pope`` / ``chair`` / ``mmlu`` / ...; part of the identity.
        identity: settings that must match to resume (JSON-serialisable).
        data: data files by name -> hash (e.g. one POPE question file per split). A name present
            in both the existing run and this command must have the same hash; new names (another
            split) may be added.
        rank, world_size, is_main: this process in an ``accelerate launch`` run.
    """

    def __init__(
        self,
        path: str | Path,
        task: str,
        identity: dict,
        *,
        data: dict | None = None,
        rank: int = 0,
        world_size: int = 1,
        is_main: bool = True,
    ):
        self.path = Path(path).expanduser()
        self.task = task
        self.identity = _jsonable({"task": task, **identity})
        self.data = _jsonable(data or {})
        self.rank, self.world_size, self.is_main = rank, world_size, is_main
        self.results_path = self.path / RESULTS_FILE
        self.samples_path = self.path / SAMPLES_FILE
        self._own_samples = self.samples_path if rank == 0 else self.path / f"samples.rank{rank}.jsonl"
        self._fh = None
        self._done: dict[str, dict] | None = None
        self.previous: dict | None = None  # results.json of an earlier session, if any
        self.fresh = False  # open() created the run (no earlier session)
        self.started = time.time()

    # ---- opening ------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise :class:`RunDirError` if the directory holds a run with another identity."""
        if self.results_path.is_file():
            try:
                previous = json.loads(self.results_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise RunDirError(
                    f"--output_path {self.path}: {RESULTS_FILE} is unreadable ({exc}). Fix: delete the folder to "
                    "start over, or pass another --output_path"
                ) from None
            old = previous.get("identity")
            if old is None or previous.get("task") != self.task:
                raise RunDirError(
                    f"--output_path {self.path} holds a {previous.get('task')!r} run, not {self.task!r}. "
                    "Fix: pass another --output_path"
                )
            diffs = diff_identity(old, self.identity)
            if diffs:
                raise RunDirError(
                    f"--output_path {self.path} holds a run made with other settings, so its samples cannot be "
                    f"reused: {'; '.join(diffs)}. Fix: rerun with the original settings to resume it, pass another "
                    "--output_path, or delete the folder to start over"
                )
            old_data = previous.get("data_identity") or {}
            changed = [
                f"{name}: {old_data[name]!r} in the existing run, {self.data[name]!r} now"
                for name in sorted(set(old_data) & set(self.data))
                if old_data[name] != self.data[name]
            ]
            if changed:
                raise RunDirError(
                    f"--output_path {self.path} holds a run made with other data files: {'; '.join(changed)}. Fix: "
                    "use the original files to resume it, pass another --output_path, or delete the folder to start over"
                )
            self.previous = previous
        elif self.path.is_dir() and any(self.path.glob("samples*.jsonl")):
            raise RunDirError(
                f"--output_path {self.path} has samples but no {RESULTS_FILE}, so their settings are unknown. "
                "Fix: pass another --output_path, or delete the folder to start over"
            )

    def open(self, initial: dict | None = None) -> RunDir:
        """Check the identity; on the main process create the directory and write the initial
        ``results.json`` (``status: running``) if there is none. Call :meth:`sync` on every process
        afterwards (other processes wait for the main one there)."""
        self.check()
        if self.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            if self.previous is None:
                write_json_atomic(self.results_path, self.base_record(initial or {}, status="running"))
                self.fresh = True
            elif self.previous.get("status") in STOPPED:  # resuming a stopped run: running again
                self.previous = {**self.previous, "status": "running"}
                self.previous.pop("resume", None)
                self.previous.pop("stopped", None)
                write_json_atomic(self.results_path, self.previous)
        return self

    @contextlib.contextmanager
    def guard(self, log: Callable[[str], None] | None = None) -> Iterator[RunDir]:
        """Around a session's work after :meth:`open`: when it stops (Ctrl-C, an error), record it
        with :meth:`stopped` and pass how to resume to ``log`` (main process) before the exception
        goes on."""
        try:
            yield self
        except BaseException as exc:
            line = self.stopped(exc)
            if self.is_main and line and log is not None:
                log(line)
            raise

    def resume_hint(self) -> str:
        """How to resume this run: the same command, on the same run directory."""
        return f"rerun the same command (with --output_path {self.path}) to resume it"

    def stopped(self, exc: BaseException) -> str:
        """Record in ``results.json`` that this session stopped before the end -- status
        ``interrupted`` (Ctrl-C) or ``failed`` (an error), what stopped it, how many samples are kept
        and how to resume -- and return the line to print. Never raises (it runs while another
        exception propagates); other processes of a launch only close their samples file.

        A usage error (:class:`AttnsteerError`: a recipe that does not fit, ...) before the first
        sample of a run this session created leaves no run behind: its ``results.json`` is removed
        (and the folder, when empty) and the line is empty -- the error says what to fix."""
        self.close()
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        try:
            kept = len(self.finished())
        except (OSError, RunDirError):
            kept = None
        if self.fresh and kept == 0 and isinstance(exc, AttnsteerError):
            if self.is_main:
                with contextlib.suppress(OSError):
                    self.results_path.unlink()
                    self.path.rmdir()  # only when empty
            return ""
        samples = f"{kept} finished sample(s) are kept" if kept is not None else "the finished samples are kept"
        what = "was interrupted" if status == "interrupted" else "stopped on an error"
        line = f"the run in {self.path} {what}; {samples}: {self.resume_hint()}"
        if status == "failed":
            line += " once the error is fixed"
        if not self.is_main or not self.results_path.is_file():
            return line
        try:
            record = json.loads(self.results_path.read_text(encoding="utf-8"))
            reason = "KeyboardInterrupt" if status == "interrupted" else f"{type(exc).__name__}: {str(exc)[:500]}"
            session = {"status": status, "reason": reason, "stopped": now_iso(), "argv": sys.argv[1:]}
            session["wall_s"] = round(time.time() - self.started, 3)
            record.update(status=status, resume=self.resume_hint(), stopped=session)
            record["sessions"] = list(record.get("sessions", [])) + [session]
            write_json_atomic(self.results_path, record)
        except (OSError, ValueError, TypeError):
            pass
        return line

    def base_record(self, extra: dict, status: str) -> dict:
        record = {
            "attnsteer_results": RESULTS_SCHEMA,
            "task": self.task,
            "status": status,
            "identity": self.identity,
            "data_identity": {**((self.previous or {}).get("data_identity") or {}), **self.data},
        }
        record.update(extra)
        return record

    # ---- samples ------------------------------------------------------------------------------
    def finished(self) -> dict[str, dict]:
        """Every finished sample of the run (all processes' files), by key; the first line of a
        key wins."""
        if self._done is None:
            done: dict[str, dict] = {}
            files = [self.samples_path] + sorted(self.path.glob("samples.rank*.jsonl"))
            for file in files:
                for rec in read_jsonl(file, repair=file == self._own_samples):
                    key = rec.get("key")
                    if key is not None and key not in done:
                        done[key] = rec
            self._done = done
        return self._done

    def append(self, record: dict) -> None:
        """Append one finished sample (must carry ``key``); flushed and fsynced before returning."""
        if "key" not in record:
            raise ValueError("a sample record needs a 'key' (see sample_key)")
        if self._fh is None:
            self.finished()  # repairs a half-written last line of our own file first
            self.path.mkdir(parents=True, exist_ok=True)
            self._fh = open(self._own_samples, "a", encoding="utf-8")
        self._fh.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        if self._done is not None:
            self._done.setdefault(record["key"], record)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def merge_shards(self) -> int:
        """Main process, after every process finished: move the lines of ``samples.rank*.jsonl``
        into ``samples.jsonl`` (skipping keys already there) and delete those files. Returns the
        number of lines moved."""
        if not self.is_main:
            return 0
        self.close()
        shards = sorted(self.path.glob("samples.rank*.jsonl"))
        if not shards:
            return 0
        have = {rec.get("key") for rec in read_jsonl(self.samples_path, repair=True)}
        moved = 0
        with open(self.samples_path, "a", encoding="utf-8") as out:
            for shard in shards:
                for rec in read_jsonl(shard):
                    if rec.get("key") in have:
                        continue
                    have.add(rec.get("key"))
                    out.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
                    moved += 1
            out.flush()
            os.fsync(out.fileno())
        for shard in shards:
            shard.unlink()
        self._done = None
        return moved

    def records(self, keys: Iterable[str]) -> Iterator[dict]:
        """The finished samples for ``keys`` in that order (missing keys are skipped)."""
        done = self.finished()
        for key in keys:
            if key in done:
                yield done[key]

    # ---- results ------------------------------------------------------------------------------
    def write_results(self, payload: dict, status: str = "complete") -> dict:
        """Main process: write ``results.json`` (identity + payload + provenance), keeping the
        earlier sessions' entries. Returns what was written."""
        sessions = list((self.previous or {}).get("sessions", []))
        session = dict(payload.pop("session", {}))
        session.setdefault("finished", now_iso())
        session.setdefault("wall_s", round(time.time() - self.started, 3))
        session.setdefault("world_size", self.world_size)
        session.setdefault("argv", sys.argv[1:])
        sessions.append(session)
        record = self.base_record({}, status)
        record.update(payload)
        record.setdefault("versions", library_versions())
        record.setdefault("git", git_info())
        record.setdefault("machine", machine_info())
        record["sessions"] = sessions
        record["written"] = now_iso()
        write_json_atomic(self.results_path, record)
        self.previous = record
        return record


def load_results(path: str | Path) -> dict:
    """``results.json`` of a run directory (or the file itself)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / RESULTS_FILE
    if not p.is_file():
        raise RunDirError(f"{path}: no {RESULTS_FILE} there. Fix: pass a folder written by `attnsteer eval ...`")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RunDirError(f"{p}: not valid JSON ({exc})") from None
