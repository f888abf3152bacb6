"""Where audio comes from: directories, JSONL and fairseq TSV manifests, path lists, URIs -> Utterances.

``read_source(spec)`` accepts

* a directory (local or URI): every file under it with one of ``extensions``, recursively;
* a JSONL manifest (``.jsonl``/``.json``): one ``{"path", "duration", "text"?, "speaker"?, "id"?,
  "start"?, "end"?}`` a line, ``path`` relative to the manifest's folder (or absolute, or a URI);
* a fairseq TSV manifest (``.tsv``): the root on the first line, then ``rel_path<TAB>num_samples``
  (durations = num_samples / ``tsv_sample_rate``); transcripts from a ``.wrd`` file beside it, if any;
* a text file of paths (any other suffix), one a line, relative to the file's folder;
* a decoded-audio cache folder written by ``speech-ssl cache`` (:mod:`speech_ssl.data.cache`): its rows
  read from the cache's index, their audio from its shards;
* an audio file, or a list of any of these.

URIs are anything pyarrow's filesystems read (``s3://``, ``gs://``, ``file://``, ...).

Durations come from the manifest, or from file headers (``soundfile`` through the pyarrow filesystem
for URIs; no full decode), read by a small thread pool. A file whose header cannot be read is not
returned as an utterance but listed in the result's ``quarantined`` (path, reason, detail), which a
:class:`~speech_ssl.data.stream.BatchStream` adds to its report. Files named in a manifest are not
checked here: a missing one is quarantined as ``missing`` when it is read.
"""

from __future__ import annotations

import json
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from speech_ssl.data.config import AUDIO_EXTENSIONS
from speech_ssl.data.audio import is_uri, probe_header, split_uri, within_timeout
from speech_ssl.data.report import QuarantineError
from speech_ssl.errors import SpeechSSLError

MANIFEST_SUFFIXES = (".jsonl", ".json")
PROBE_THREADS = 8


@dataclass
class Utterance:
    """One row of a corpus.

    id: unique within the corpus (relative path without extension, or the manifest's ``id``).
    path: resolved location that opens as is (absolute local path or URI).
    source_path: the path as the user gave it (manifest entry, list line, scanned file).
    duration: seconds (of the segment when ``end`` is set).
    start / end: a segment [start, end) seconds of a longer recording (end None: to the end of the file).
    columns: a JSONL manifest's other columns as strings (e.g. ``label`` for ``speech-ssl probe task=classify``).
    """

    id: str
    path: str
    source_path: str
    duration: float
    text: Optional[str] = None
    speaker: Optional[str] = None
    start: float = 0.0
    end: Optional[float] = None
    cache_row: Optional[int] = None  # a row of a decoded-audio cache: ``path`` is its shard (data.cache)
    columns: dict[str, str] = field(default_factory=dict)


class UtteranceList(list):
    """A list of Utterances, plus the files that could not be read while listing them.

    ``quarantined``: list of ``{"path", "reason", "detail"}``. ``caches``: the decoded-audio caches its
    rows come from (:class:`~speech_ssl.data.cache.CacheInfo`; their features must fit the model).
    """

    def __init__(self, items: Iterable[Utterance] = (), quarantined: Optional[list[dict]] = None,
                 caches: Optional[list] = None):
        super().__init__(items)
        self.quarantined: list[dict] = list(quarantined or [])
        self.caches: list = list(caches or [])

    def with_rows(self, rows: Iterable[Utterance]) -> "UtteranceList":
        """A subset (e.g. after a caller's own filtering) that still carries the scan-time quarantine."""
        return UtteranceList(rows, self.quarantined, self.caches)


# ---------------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------------

def _join(base_dir: str, rel: str) -> str:
    """``rel`` resolved against a local folder or a URI folder (absolute paths and URIs kept)."""
    if is_uri(rel):
        return rel
    if is_uri(base_dir):
        scheme, rest = base_dir.split("://", 1)
        if rel.startswith("/"):
            return f"file://{rel}" if scheme == "file" else f"{scheme}://{rel.lstrip('/')}"
        joined = posixpath.normpath(posixpath.join(rest, rel))
        return f"{scheme}://{joined}"
    return os.path.abspath(os.path.join(base_dir, os.path.expanduser(rel)))


def _dirname(path: str) -> str:
    if is_uri(path):
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest)}"
    return os.path.dirname(os.path.abspath(path))


def _has_extension(path: str, extensions: Sequence[str]) -> bool:
    return path.lower().endswith(tuple(e.lower() for e in extensions))


def _strip_extension(path: str, extensions: Sequence[str]) -> str:
    """``spk/utt.opus.ogg`` -> ``spk/utt`` (every trailing audio extension removed)."""
    stripped = True
    while stripped:
        stripped = False
        for ext in sorted(set(extensions) | set(AUDIO_EXTENSIONS), key=len, reverse=True):
            if path.lower().endswith(ext.lower()) and len(path) > len(ext):
                path, stripped = path[: len(path) - len(ext)], True
                break
    return path


def _read_text(path: str) -> str:
    try:
        if is_uri(path):
            fs, inner = split_uri(path)
            with fs.open_input_stream(inner) as f:
                return f.read().decode("utf-8")
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise SpeechSSLError(f"input {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SpeechSSLError(f"cannot read {path}: {err}") from None


def _kind_of(path: str) -> str:
    """``dir`` | ``file`` | ``missing`` for a local path or a URI."""
    if is_uri(path):
        import pyarrow.fs as pafs

        def kind() -> str:
            fs, inner = split_uri(path)
            info = fs.get_file_info(inner)
            return {pafs.FileType.Directory: "dir", pafs.FileType.File: "file"}.get(info.type, "missing")

        try:
            return within_timeout(path, kind)
        except OSError as err:
            raise SpeechSSLError(f"cannot read {path}: {err}") from None
    if os.path.isdir(path):
        return "dir"
    return "file" if os.path.exists(path) else "missing"


def _list_directory(root: str, extensions: Sequence[str]) -> list[str]:
    if is_uri(root):
        import pyarrow.fs as pafs

        fs, inner = split_uri(root)
        scheme = root.split("://", 1)[0]
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
        found = []
        for info in infos:
            if info.type == pafs.FileType.File and _has_extension(info.path, extensions):
                found.append(f"{scheme}://{info.path}" if scheme == "file" else
                             f"{scheme}://{info.path.lstrip('/')}")
        return sorted(found)
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in filenames:
            if _has_extension(name, extensions):
                found.append(os.path.join(dirpath, name))
    return sorted(found)


# ---------------------------------------------------------------------------------------------------
# Readers of each kind of source. They return rows whose duration may be None (read from the header).
# ---------------------------------------------------------------------------------------------------

def _from_directory(root: str, extensions: Sequence[str]) -> list[Utterance]:
    root_clean = root.rstrip("/") if not root.endswith("://") else root
    rows = []
    for path in _list_directory(root_clean, extensions):
        rel = path[len(root_clean):].lstrip("/") if path.startswith(root_clean) else os.path.basename(path)
        rows.append(Utterance(id=_strip_extension(rel, extensions), path=path if is_uri(path) else os.path.abspath(path),
                              source_path=path, duration=None))  # type: ignore[arg-type]
    return rows


def _opt_float(value, where: str, key: str) -> Optional[float]:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SpeechSSLError(f"{where}: '{key}' must be a number of seconds, got {value!r}") from None


_MANIFEST_KEYS = ("path", "id", "duration", "start", "end", "text", "speaker")


def _from_jsonl(manifest: str, extensions: Sequence[str]) -> list[Utterance]:
    base = _dirname(manifest)
    rows = []
    for lineno, line in enumerate(_read_text(manifest).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{manifest}:{lineno}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise SpeechSSLError(f"{where}: not valid JSON ({err.msg}); each line must be one JSON object") from None
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            raise SpeechSSLError(f"{where}: each line needs a string 'path' (relative to the manifest's folder)")
        rel = item["path"]
        start = _opt_float(item.get("start"), where, "start") or 0.0
        end = _opt_float(item.get("end"), where, "end")
        duration = _opt_float(item.get("duration"), where, "duration")
        if duration is None and end is not None:
            duration = end - start
        text = item.get("text")
        speaker = item.get("speaker")
        columns = {str(k): str(v) for k, v in item.items() if k not in _MANIFEST_KEYS and v is not None}
        rows.append(Utterance(id=str(item.get("id") or _strip_extension(rel, extensions)), path=_join(base, rel),
                              source_path=rel, duration=duration,  # type: ignore[arg-type]
                              text=None if text is None else str(text),
                              speaker=None if speaker is None else str(speaker), start=start, end=end,
                              columns=columns))
    return rows


def _from_tsv(manifest: str, extensions: Sequence[str], tsv_sample_rate: int) -> list[Utterance]:
    lines = _read_text(manifest).splitlines()
    if not lines:
        raise SpeechSSLError(f"{manifest}: empty TSV manifest (the first line must be the audio root)")
    root = lines[0].strip()
    base = _join(_dirname(manifest), root) if root else _dirname(manifest)
    words_path = os.path.splitext(manifest)[0] + ".wrd"
    words = None
    if _kind_of(words_path) == "file":
        words = [w.strip() for w in _read_text(words_path).splitlines()]
    rows = []
    entries = [ln for ln in lines[1:] if ln.strip()]
    if words is not None and len(words) != len(entries):
        raise SpeechSSLError(f"{words_path} has {len(words)} lines but {manifest} lists {len(entries)} files")
    for i, line in enumerate(entries):
        parts = line.split("\t")
        rel = parts[0]
        duration = None
        if len(parts) > 1 and parts[1].strip():
            try:
                duration = int(parts[1]) / tsv_sample_rate
            except ValueError:
                raise SpeechSSLError(f"{manifest}:{i + 2}: expected rel_path<TAB>num_samples, got {line!r}") from None
        rows.append(Utterance(id=_strip_extension(rel, extensions), path=_join(base, rel), source_path=rel,
                              duration=duration, text=words[i] if words is not None else None))  # type: ignore[arg-type]
    return rows


def _from_path_list(list_file: str, extensions: Sequence[str]) -> list[str]:
    base = _dirname(list_file)
    return [_join(base, ln.strip()) for ln in _read_text(list_file).splitlines() if ln.strip()
            and not ln.lstrip().startswith("#")]


def _audio_file(path: str, extensions: Sequence[str], given: Optional[str] = None) -> Utterance:
    resolved = path if is_uri(path) else os.path.abspath(os.path.expanduser(path))
    name = posixpath.basename(path) if is_uri(path) else os.path.basename(path)
    return Utterance(id=_strip_extension(name, extensions), path=resolved, source_path=given or path,
                     duration=None)  # type: ignore[arg-type]


def _from_cache(root: str, caches: Optional[list]) -> list[Utterance]:
    from speech_ssl.data import cache

    meta = cache.load_meta(root)
    if caches is None:
        raise SpeechSSLError(f"{root} is a decoded-audio cache, which this command cannot take as input: give "
                             "the original audio")
    caches.append(cache.CacheInfo(root, meta))
    shards = cache.join(root if is_uri(root) else os.path.abspath(root), cache.SHARD_DIR)
    return [Utterance(id=r["id"], path=f"{shards}/{r['shard']:05d}.arrow", source_path=r["source_path"],
                      duration=r["duration"], text=r["text"], speaker=r["speaker"], cache_row=r["row"])
            for r in cache.read_index(root, meta)]


def list_source(spec: str | Sequence[str], extensions: Sequence[str] = AUDIO_EXTENSIONS, *,
                tsv_sample_rate: int = 16000, caches: Optional[list] = None) -> list[Utterance]:
    """Rows of ``spec`` without touching the audio (durations None where no manifest gives them). A
    decoded-audio cache folder is read from its index; its :class:`CacheInfo` is appended to ``caches``
    (a caller that passes no list does not take caches)."""
    if isinstance(spec, (list, tuple)):
        rows: list[Utterance] = []
        for item in spec:
            rows.extend(list_source(str(item), extensions, tsv_sample_rate=tsv_sample_rate, caches=caches))
        return rows
    spec = str(spec)
    if not spec:
        raise SpeechSSLError("no input given (an empty path)")
    path = spec if is_uri(spec) else os.path.expanduser(spec)
    kind = _kind_of(path)
    if kind == "missing":
        if _has_extension(path, extensions):  # a named audio file that is gone: quarantined when read
            return [_audio_file(path, extensions, spec)]
        raise SpeechSSLError(f"input {spec} does not exist")
    if kind == "dir":
        from speech_ssl.data.cache import is_cache

        if is_cache(path):
            return _from_cache(path, caches)
        return _from_directory(path, extensions)
    lower = path.lower()
    if lower.endswith(MANIFEST_SUFFIXES):
        return _from_jsonl(path, extensions)
    if lower.endswith(".tsv"):
        return _from_tsv(path, extensions, tsv_sample_rate)
    if _has_extension(path, extensions):
        return [_audio_file(path, extensions, spec)]
    rows = []
    for line_path in _from_path_list(path, extensions):
        if _has_extension(line_path, extensions):
            rows.append(_audio_file(line_path, extensions))
        else:
            rows.extend(list_source(line_path, extensions, tsv_sample_rate=tsv_sample_rate, caches=caches))
    return rows


def unique_ids(rows: list[Utterance]) -> None:
    """Make ids unique in place: repeats get ``#2``, ``#3``, ... (in order of appearance)."""
    seen: dict[str, int] = {}
    for row in rows:
        n = seen.get(row.id, 0) + 1
        seen[row.id] = n
        if n > 1:
            row.id = f"{row.id}#{n}"


def probe_rows(rows: list[Utterance], threads: int = PROBE_THREADS) -> tuple[list[Utterance], list[dict]]:
    """Fill in missing durations from file headers; rows whose header fails are returned as quarantined."""
    todo = [i for i, r in enumerate(rows) if r.duration is None]

    def probe(i: int):
        try:
            return i, probe_header(rows[i].path), None
        except QuarantineError as err:
            return i, None, err

    results = {}
    if todo:
        if len(todo) == 1 or threads <= 1:
            results = {i: (h, e) for i, h, e in map(probe, todo)}
        else:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                results = {i: (h, e) for i, h, e in pool.map(probe, todo)}
    kept, bad = [], []
    for i, row in enumerate(rows):
        if i in results:
            header, err = results[i]
            if err is not None:
                bad.append({"path": row.path, "reason": err.reason, "detail": err.detail, "id": row.id})
                continue
            row.duration = header.duration if row.end is None else min(row.end, header.duration) - row.start
        kept.append(row)
    return kept, bad


def read_source(spec: str | Sequence[str], extensions: Sequence[str] = AUDIO_EXTENSIONS, *,
                tsv_sample_rate: int = 16000) -> UtteranceList:
    """The utterances of a directory, manifest, path list, URI or list of those (see the module doc)."""
    extensions = [e if e.startswith(".") else "." + e for e in extensions]
    caches: list = []
    rows = list_source(spec, extensions, tsv_sample_rate=tsv_sample_rate, caches=caches)
    unique_ids(rows)
    kept, bad = probe_rows(rows)
    return UtteranceList(kept, bad, caches)
