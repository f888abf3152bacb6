"""Chained stages: each in ``<output_dir>/<stage>/``, skipped when finished, resumed when interrupted.

A pipeline (``pipelines/``) is a list of :class:`Stage`: a name, the stage's library function (one of
``speech_ssl.stages.<command>.run``), its fully wired typed config, the earlier stages whose outputs it
reads (by path) and the paths it provides to later stages. :func:`run_pipeline` walks them in order and
keeps one record per stage, ``<output_dir>/<stage>/stage.json`` (written atomically):

    status        running | failed | interrupted | done   (done is the completion marker)
    config        the stage's resolved configuration; config_hash its digest (Ray settings left out)
    inputs        digest of each earlier stage's outputs at the time this stage ran
    outputs_digest  digest of the paths this stage provides (what later stages compare against)
    started, finished, wall_seconds, attempts, result (the stage's summary), error

and decides, stage by stage:

    force=true                                     -> fresh: the stage's folder is emptied, then it runs
    no record                                      -> run on the folder as it is (nothing is deleted)
    an input changed (an earlier stage ran again
      and produced different outputs)              -> fresh
    done, same config                              -> skip (its recorded result is reused)
    same config, not done (killed, failed)         -> resume: run again on the same folder; training
                                                      continues from its newest complete checkpoint,
                                                      embedding from its finished shards
    config changed                                 -> resume for stages that continue (training: e.g. a
                                                      larger max_updates), fresh for the others

A pipeline whose later stages depend on what earlier ones found (a calibrated length, a sweep's winner)
puts a *phase* in the list: a function of the results so far that returns the next stages, called when the
runner reaches it (see :data:`Phase`). Everything stays one run: one lock, one record per stage, one summary.

A failed stage stops the pipeline with :class:`StageFailed` (the stage, its error, its log and folder);
stages before it are never touched. Everything a stage prints and logs also goes to
``<output_dir>/<stage>/stage.log`` (appended across attempts). One run at a time per ``output_dir``
(a lock file). The summary (``summary.json`` / ``summary.md``) lists every stage's status and wall time
plus what the pipeline reports (results, where outputs are).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from speech_ssl.config import ConfigError, to_dict
from speech_ssl.errors import SpeechSSLError
from speech_ssl.logs import PlainFormatter, strip_ansi

log = logging.getLogger("speech_ssl.pipeline")

RECORD = "stage.json"
STAGE_LOG = "stage.log"
LOCK = ".pipeline.lock"

# The stage running now in this process (None outside a pipeline).
_current_stage: Optional[str] = None


def in_stage() -> Optional[str]:
    """The name of the pipeline stage running now in this process, or None (a command run on its own)."""
    return _current_stage


@dataclasses.dataclass
class Stage:
    """One step of a pipeline.

    name: also its folder, ``<output_dir>/<name>/``.
    fn: the library function that does the work (``config -> summary dict``).
    config: its typed configuration, with every path wired (a dataclass, or a dict of them).
    needs: earlier stages whose outputs it reads; when those change, this stage starts afresh.
    provides: paths inside the folder that later stages read (``best``, ``train.jsonl``); their digest
        tells later stages whether this stage's outputs changed.
    continues: a re-run with a changed config continues the existing folder (training) instead of
        starting afresh.
    storage: where the stage keeps state outside its folder (a training run's checkpoints on ``s3://``),
        emptied together with the folder when the stage starts afresh.
    """

    name: str
    fn: Callable[[Any], Any]
    config: Any
    needs: Sequence[str] = ()
    provides: Sequence[str] = ()
    continues: bool = False
    storage: Optional[str] = None


# A phase: ``{stage name: result}`` of every stage so far -> the stages that come next. On a re-run the
# earlier stages are skipped with their recorded results, so the phase builds the same stages again.
Phase = Callable[[dict[str, Any]], Sequence[Stage]]


class StageFailed(SpeechSSLError):
    """A stage raised: the pipeline stopped there; earlier stages are finished and kept."""

    def __init__(self, stage: str, folder: Path, cause: BaseException, finished: Sequence[str]):
        self.stage, self.folder, self.cause = stage, folder, cause
        kept = f"finished stages are kept ({', '.join(finished)}); " if finished else ""
        message = (f"stage '{stage}' failed: {type(cause).__name__}: {cause}\n"
                   f"  log: {folder / STAGE_LOG}\n  outputs: {folder}/\n"
                   f"  {kept}fix the cause and run the same command again: finished stages are skipped and "
                   f"'{stage}' runs again on its folder (training resumes from its newest checkpoint, embedding "
                   "keeps its finished shards); force=true starts every stage afresh.")
        super().__init__(message)
        if isinstance(cause, (ConfigError,)):
            self.exit_code = 2


# --------------------------------------------------------------------------------------------------
# Records, digests


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def read_record(folder: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads((Path(folder) / RECORD).read_text())
    except (OSError, ValueError):
        return None


def _without_ray(data: Any) -> Any:
    """The config minus its Ray settings: where a stage runs is not what it computes."""
    if isinstance(data, dict):
        return {k: _without_ray(v) for k, v in data.items() if k != "ray"}
    if isinstance(data, list):
        return [_without_ray(v) for v in data]
    return data


def config_data(config: Any) -> Any:
    return to_dict(config)


def config_hash(config: Any) -> str:
    text = json.dumps(_without_ray(config_data(config)), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def outputs_digest(folder: Path, provides: Sequence[str]) -> str:
    """A digest of the paths a stage provides: names, sizes and modification times of every file under
    them (symlinks such as ``best`` resolved, so a new best checkpoint changes it); small files by content."""
    h = hashlib.sha256()
    for rel in provides:
        path = (folder / rel)
        target = path.resolve()
        h.update(f"{rel}->{target.name}\n".encode())
        if target.is_file():
            files = [target]
        elif target.is_dir():
            files = sorted(p for p in target.rglob("*") if p.is_file())
        else:
            h.update(b"missing\n")
            continue
        for f in files:
            st = f.stat()
            h.update(f"{f.relative_to(target) if f != target else f.name} {st.st_size}".encode())
            if st.st_size <= 4 << 20:
                h.update(hashlib.sha256(f.read_bytes()).digest())
            else:
                h.update(str(st.st_mtime_ns).encode())
    return h.hexdigest()[:16]


def decide(stage: Stage, record: Optional[dict[str, Any]], inputs: dict[str, str], digest: str,
           force: bool) -> str:
    """``skip``, ``resume`` (run on the existing folder) or ``fresh`` (empty the folder first)."""
    if force:
        return "fresh"
    if record is None:
        return "resume"
    if record.get("inputs") != inputs:
        return "fresh"
    if record.get("config_hash") == digest:
        return "skip" if record.get("status") == "done" else "resume"
    return "resume" if stage.continues else "fresh"


def _empty(folder: Path, storage: Optional[str]) -> None:
    if folder.exists():
        for child in folder.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    if storage and "://" in storage:
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(storage)
        fs.delete_dir_contents(path, missing_dir_ok=True)
    elif storage and Path(storage).resolve() != folder.resolve() and Path(storage).exists():
        shutil.rmtree(storage)


# --------------------------------------------------------------------------------------------------
# A stage's log: everything printed and logged while it runs, also in <folder>/stage.log


class _Tee(io.TextIOBase):
    """Writes to the console stream and to the stage log (plain text: ANSI colour codes are stripped)."""

    def __init__(self, stream, log_file):
        self._stream, self._file = stream, log_file

    def write(self, text: str) -> int:
        self._stream.write(text)
        with contextlib.suppress(ValueError):  # log closed by a late write from a Ray thread
            self._file.write(strip_ansi(text))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()
        with contextlib.suppress(ValueError):
            self._file.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self):  # type: ignore[override]
        return getattr(self._stream, "encoding", "utf-8")


@contextlib.contextmanager
def stage_log(path: Path, header: str) -> Iterator[Any]:
    log_file = open(path, "a", encoding="utf-8", buffering=1)
    log_file.write(f"\n===== {_now()} {header} =====\n")
    handler = logging.StreamHandler(log_file)
    handler.setFormatter(PlainFormatter())
    loggers = [logging.getLogger(n) for n in ("speech_ssl", "pipelines")]
    for lg in loggers:
        lg.addHandler(handler)
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(saved[0], log_file), _Tee(saved[1], log_file)
    try:
        yield log_file
    finally:
        sys.stdout, sys.stderr = saved
        for lg in loggers:
            lg.removeHandler(handler)
        log_file.close()


@contextlib.contextmanager
def _locked(output_dir: Path) -> Iterator[None]:
    with open(output_dir / LOCK, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SpeechSSLError(f"another pipeline run is using {output_dir} (lock {output_dir / LOCK}); "
                                 "wait for it or choose another output_dir") from None
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------
# The runner


def run_pipeline(name: str, stages: Sequence[Stage | Phase], output_dir: str | Path, force: bool = False,
                 summarize: Optional[Callable[[Path, dict[str, Any]], dict[str, Any]]] = None) -> dict[str, Any]:
    """Run ``stages`` in order under ``output_dir``; returns the summary (also written as summary.json/md).
    A :data:`Phase` among them is called when reached, with the results so far; its stages run next."""
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    pending = list(stages)
    _check_needs(pending, [])
    started = time.monotonic()
    records: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    with _locked(output_dir):
        while pending:
            stage = pending.pop(0)
            if not isinstance(stage, Stage):  # a phase: its stages come next
                pending[:0] = stage({n: r.get("result") for n, r in records.items()})
                _check_needs(pending, list(records))
                continue
            known = len(rows) + 1 + sum(isinstance(s, Stage) for s in pending)
            more = "" if all(isinstance(s, Stage) for s in pending) else "+"  # a phase still to come
            tag = f"{stage.name} ({len(rows) + 1}/{known}{more})"
            folder = output_dir / stage.name
            record = read_record(folder)
            inputs = {n: records[n]["outputs_digest"] for n in stage.needs}
            digest = config_hash(stage.config)
            action = decide(stage, record, inputs, digest, force)
            if action == "skip":
                log.info("stage %s: finished earlier with this configuration, skipped (%s)", tag, folder)
                records[stage.name] = record
                rows.append({"stage": stage.name, "status": "skipped", "wall_seconds": record.get("wall_seconds"),
                             "folder": str(folder)})
                continue
            record = _run_stage(stage, folder, record, action, inputs, digest, [r["stage"] for r in rows], tag,
                                started)
            records[stage.name] = record
            rows.append({"stage": stage.name, "status": "ran" if action == "fresh" or record["attempts"] == 1
                         else "resumed", "wall_seconds": record["wall_seconds"], "folder": str(folder)})
    summary: dict[str, Any] = {
        "pipeline": name, "output_dir": str(output_dir), "finished": _now(),
        "wall_seconds": round(time.monotonic() - started, 2), "stages": rows,
    }
    if summarize is not None:
        summary.update(summarize(output_dir, {n: r.get("result") for n, r in records.items()}))
    write_json(output_dir / "summary.json", summary)
    (output_dir / "summary.md").write_text(render_markdown(summary))
    return summary


def _check_needs(stages: Sequence[Stage | Phase], before: Sequence[str]) -> None:
    """Every stage's needs run before it, and no two stages share a name; checked up to the first phase
    (the stages after it may need the ones it returns: they are checked when it has run)."""
    seen = list(before)
    for stage in stages:
        if not isinstance(stage, Stage):
            return
        unknown = [n for n in stage.needs if n not in seen]
        if unknown:
            raise ValueError(f"stage {stage.name} needs {unknown}, which do not run before it")
        if stage.name in seen:
            raise ValueError(f"two stages are named {stage.name}")
        seen.append(stage.name)


def _run_stage(stage: Stage, folder: Path, previous: Optional[dict[str, Any]], action: str,
               inputs: dict[str, str], digest: str, finished: list[str], tag: Optional[str] = None,
               pipeline_started: Optional[float] = None) -> dict[str, Any]:
    tag = tag or stage.name
    if action == "fresh" and (folder.exists() or stage.storage):
        why = "forced" if previous is not None and previous.get("inputs") == inputs else "its inputs changed"
        if previous is not None and previous.get("inputs") == inputs and previous.get("config_hash") != digest:
            why = "its configuration changed"
        log.info("stage %s: starting afresh (%s); emptying %s", tag, why, folder)
        _empty(folder, stage.storage)
    folder.mkdir(parents=True, exist_ok=True)
    attempts = 1 if action == "fresh" or previous is None else int(previous.get("attempts", 0)) + 1
    record = {"stage": stage.name, "status": "running", "config_hash": digest, "inputs": inputs,
              "attempts": attempts, "started": _now(), "pid": os.getpid(), "config": config_data(stage.config)}
    write_json(folder / RECORD, record)
    verb = "running" if attempts == 1 else f"resuming (attempt {attempts})"
    log.info("stage %s: %s in %s", tag, verb, folder)
    t0 = time.monotonic()
    global _current_stage
    with stage_log(folder / STAGE_LOG, f"{stage.name}: {verb}") as log_file:
        try:
            _current_stage = stage.name
            result = stage.fn(stage.config)
        except KeyboardInterrupt:
            record.update(status="interrupted", wall_seconds=round(time.monotonic() - t0, 2), finished=_now())
            write_json(folder / RECORD, record)
            raise
        except Exception as err:  # noqa: BLE001 - every failure of a stage stops the pipeline the same way
            log_file.write(traceback.format_exc())
            record.update(status="failed", error=f"{type(err).__name__}: {err}",
                          wall_seconds=round(time.monotonic() - t0, 2), finished=_now())
            write_json(folder / RECORD, record)
            raise StageFailed(stage.name, folder, err, finished) from err
        finally:
            _current_stage = None
    record.update(status="done", finished=_now(), wall_seconds=round(time.monotonic() - t0, 2),
                  result=json.loads(json.dumps(result if result is not None else {}, default=str)),
                  outputs_digest=outputs_digest(folder, stage.provides) if stage.provides else uuid.uuid4().hex[:16])
    write_json(folder / RECORD, record)
    elapsed = (f"; pipeline {format_seconds(time.monotonic() - pipeline_started)} so far"
               if pipeline_started is not None else "")
    log.info("stage %s: done in %s%s", tag, format_seconds(record["wall_seconds"]), elapsed)
    return record


# --------------------------------------------------------------------------------------------------
# The summary


def format_seconds(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def render_console(summary: dict[str, Any], width: int = 110) -> str:
    """The summary for the console: short (the stage table in one line, the places wrapped); the full
    Markdown is in ``summary.md``."""
    import textwrap

    out = Path(summary["output_dir"])

    def rel(path: Any) -> str:
        return os.path.relpath(path, out) if isinstance(path, str) and path.startswith(str(out)) else str(path)

    stages = ", ".join(f"{row['stage']} {format_seconds(row['wall_seconds'])}"
                       + (" (earlier run)" if row["status"] == "skipped" else "") for row in summary["stages"])
    lines = [f"speech-ssl run {summary['pipeline']}: done in {format_seconds(summary['wall_seconds'])} "
             f"(summary: {out / 'summary.md'})", f"  stages: {stages}"]
    if summary.get("highlights"):
        lines += ["  results:"] + [f"  - {h.replace('**', '')}" for h in summary["highlights"]]
    if summary.get("outputs"):  # the paths only (summary.md says what each is)
        places = ", ".join(rel(path) for path in summary["outputs"].values())
        lines += textwrap.wrap(f"where (in {out}/): {places}", width, initial_indent="  ",
                               subsequent_indent="    ", break_on_hyphens=False, break_long_words=False)
    return "\n".join(lines) + "\n"


def render_markdown(summary: dict[str, Any]) -> str:
    """The summary as short Markdown: stage table, results, where the outputs are."""
    out = Path(summary["output_dir"])
    lines = [f"# speech-ssl run: {summary['pipeline']}", "",
             f"Output folder `{out}`; this run took {format_seconds(summary['wall_seconds'])}.", "",
             "| stage | status | wall time | folder |", "|---|---|---|---|"]
    for row in summary["stages"]:
        note = " (earlier run)" if row["status"] == "skipped" else ""
        lines.append(f"| {row['stage']} | {row['status']} | {format_seconds(row['wall_seconds'])}{note} | "
                     f"`{os.path.relpath(row['folder'], out)}/` |")
    if summary.get("highlights"):
        lines += ["", "## Results", ""] + [f"- {h}" for h in summary["highlights"]]
    if summary.get("outputs"):
        lines += ["", "## Where things are", ""]
        for label, path in summary["outputs"].items():
            shown = os.path.relpath(path, out) if isinstance(path, str) and path.startswith(str(out)) else path
            lines.append(f"- {label}: `{shown}`")
    return "\n".join(lines) + "\n"
