"""Where outputs go: one home for "open / write / rename / list" under a local path or a filesystem URI.

A *location* is a local path (``runs/pt``, ``/mnt/nfs/runs/pt``; ``~`` expanded, made absolute) or a URI
that ``pyarrow.fs`` reads (``s3://bucket/prefix``, ``gs://bucket/prefix``, ``hdfs://...``, ``file:///...``;
S3 options ride in the query string, e.g. ``s3://bucket/x?endpoint_override=host:9000&scheme=http``, or in
the usual AWS environment variables such as ``AWS_ENDPOINT_URL``). Every command's outputs go through here.

Writes are atomic, so a reader (a resume scan, the head after a job) never sees half a file:

* local and NFS paths, and filesystems that rename (HDFS): the bytes go to a hidden temporary name in the
  destination folder (``.<name>.tmp-<random>``), which is then renamed onto the final name;
* object stores (``s3://``, ``gs://``): the bytes are first written completely to a local temporary file,
  then sent as the final object in one upload; S3 and GCS make an object visible only once its upload
  (single or multipart) has completed, so the final name never holds a partial object. There are no
  temporary objects to clean up after a crash.

Nothing here imports torch: the PyTorch core (``speech_ssl.models``) does not depend on this module; the
stages and the trainer hand it local files.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pyarrow.fs as pafs

OBJECT_STORES = ("s3", "gcs")  # pyarrow filesystem type names without a rename of their own


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def normalize(location: str | os.PathLike) -> str:
    """A location in its canonical spelling: URIs without a trailing ``/``; local paths absolute."""
    text = str(location)
    if is_uri(text):
        return text.rstrip("/") if not text.endswith(":///") else text
    return os.path.abspath(os.path.expanduser(text))


@functools.lru_cache(maxsize=32)
def _filesystem(base: str) -> pafs.FileSystem:
    fs, _ = pafs.FileSystem.from_uri(base)
    return fs


def filesystem(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or a URI; one filesystem object per bucket."""
    text = str(location)
    if not is_uri(text):
        return pafs.LocalFileSystem(), normalize(text)
    scheme, rest = text.split("://", 1)
    if scheme == "file":
        return pafs.LocalFileSystem(), "/" + rest.split("?", 1)[0].lstrip("/")
    query = ("?" + rest.split("?", 1)[1]) if "?" in rest else ""
    host = rest.split("?", 1)[0].split("/", 1)[0]
    fs = _filesystem(f"{scheme}://{host}/{query}")
    _, path = pafs.FileSystem.from_uri(text)
    return fs, path.rstrip("/")


def _split_query(text: str) -> tuple[str, str]:
    """A URI's query string (``?endpoint_override=...``) apart from its path, to keep at the end."""
    if is_uri(text) and "?" in text:
        text, query = text.split("?", 1)
        return text, "?" + query
    return text, ""


def join(location: str | os.PathLike, *parts: str) -> str:
    """``location/part/...`` (a URI's query string stays at the end)."""
    text, query = _split_query(str(location))
    if not is_uri(text):
        text = normalize(text)
    for part in parts:
        text = text.rstrip("/") + "/" + str(part).strip("/")
    return text + query


def name_of(location: str | os.PathLike) -> str:
    """The last component (``s3://b/runs/pt`` -> ``pt``)."""
    return str(location).split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def parent_of(location: str | os.PathLike) -> str:
    text, query = _split_query(str(location))
    if not is_uri(text):
        return str(Path(normalize(text)).parent)
    return text.rstrip("/").rsplit("/", 1)[0] + query


def is_object_store(fs: pafs.FileSystem) -> bool:
    return fs.type_name in OBJECT_STORES


# --------------------------------------------------------------------------------------------------
# Reading and listing


def info(location: str | os.PathLike) -> pafs.FileInfo:
    fs, path = filesystem(location)
    return fs.get_file_info(path)


def exists(location: str | os.PathLike) -> bool:
    return info(location).type != pafs.FileType.NotFound


def is_file(location: str | os.PathLike) -> bool:
    return info(location).type == pafs.FileType.File


def is_dir(location: str | os.PathLike) -> bool:
    return info(location).type == pafs.FileType.Directory


def read_bytes(location: str | os.PathLike) -> bytes:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode("utf-8")


def listdir(location: str | os.PathLike) -> list[pafs.FileInfo]:
    """The entries directly under ``location`` (none when it does not exist), sorted by name."""
    fs, path = filesystem(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(infos, key=lambda i: i.base_name)


def walk_files(location: str | os.PathLike) -> list[str]:
    """Paths (relative to ``location``, ``/``-separated) of every file below it, sorted."""
    fs, path = filesystem(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return []
    prefix = path.rstrip("/") + "/"
    return sorted(i.path[len(prefix):] for i in infos if i.type == pafs.FileType.File and i.path.startswith(prefix))


# --------------------------------------------------------------------------------------------------
# Writing (atomically, see the module doc)


def makedirs(location: str | os.PathLike) -> None:
    fs, path = filesystem(location)
    fs.create_dir(path, recursive=True)


def _temp_name(path: str) -> str:
    head, _, name = path.rpartition("/")
    return f"{head}/.{name}.tmp-{uuid.uuid4().hex[:12]}"


def _replace_locally(path: str, fill: Callable[[str], Any]) -> None:
    """Write a local file through a temporary name beside it (``fill(tmp)``), then rename it into place."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _temp_name(path)
    try:
        fill(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        _silently(os.remove, tmp)
        raise


def put_file(local_file: str | os.PathLike, location: str | os.PathLike) -> str:
    """Copy a complete local file to ``location`` atomically; returns ``location``."""
    fs, path = filesystem(location)
    if isinstance(fs, pafs.LocalFileSystem):
        _replace_locally(path, lambda tmp: shutil.copyfile(local_file, tmp))
        return str(location)
    if is_object_store(fs):  # one upload of the whole object: visible only once complete
        with open(local_file, "rb") as src, fs.open_output_stream(path) as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
        return str(location)
    fs.create_dir(path.rpartition("/")[0], recursive=True)  # a filesystem with a rename (HDFS, ...)
    tmp = _temp_name(path)
    try:
        with open(local_file, "rb") as src, fs.open_output_stream(tmp) as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
        fs.move(tmp, path)
    except BaseException:
        _silently(fs.delete_file, tmp)
        raise
    return str(location)


def write_bytes(location: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``location`` atomically (see the module doc); returns ``location``."""
    fs, path = filesystem(location)
    if isinstance(fs, pafs.LocalFileSystem):
        _replace_locally(path, lambda tmp: Path(tmp).write_bytes(data))
        return str(location)
    with tempfile.NamedTemporaryFile(prefix="speech-ssl-put-") as f:
        f.write(data)
        f.flush()
        return put_file(f.name, location)


def write_text(location: str | os.PathLike, text: str) -> str:
    return write_bytes(location, text.encode("utf-8"))


def put_tree(local_dir: str | os.PathLike, location: str | os.PathLike,
             skip: tuple[str, ...] = (), exclude=None) -> list[str]:
    """Copy every file below ``local_dir`` to the same relative path under ``location`` (each one atomically).
    Top-level names in ``skip`` are left out. Returns the relative paths copied."""
    local_dir = Path(local_dir)
    copied = []
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(local_dir).as_posix()
        if rel.split("/", 1)[0] in skip or ".tmp-" in path.name or (exclude and exclude(rel)):
            continue
        put_file(path, join(location, rel))
        copied.append(rel)
    return copied


def get_tree(location: str | os.PathLike, local_dir: str | os.PathLike,
             skip: tuple[str, ...] = (), exclude=None) -> list[str]:
    """Copy every file below ``location`` into ``local_dir`` (top-level names in ``skip``, and relative paths
    for which ``exclude(rel)`` is true, left out)."""
    fs, root = filesystem(location)
    copied = []
    for rel in walk_files(location):
        if rel.split("/", 1)[0] in skip or ".tmp-" in rel.rsplit("/", 1)[-1] or (exclude and exclude(rel)):
            continue
        dest = Path(local_dir) / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}")
        with fs.open_input_stream(f"{root}/{rel}") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
        os.replace(tmp, dest)
        copied.append(rel)
    return copied


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a folder between any two locations (each file atomically at the destination)."""
    if not is_uri(src):
        put_tree(normalize(src), dst)
        return
    if not is_uri(dst):
        get_tree(src, normalize(dst))
        return
    with tempfile.TemporaryDirectory(prefix="speech-ssl-copy-") as tmp:
        get_tree(src, tmp)
        put_tree(tmp, dst)


def delete_dir(location: str | os.PathLike, missing_ok: bool = True) -> None:
    fs, path = filesystem(location)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            shutil.rmtree(path)
        else:
            fs.delete_dir(path)
    except FileNotFoundError:
        if not missing_ok:
            raise
    except OSError:
        if exists(location) or not missing_ok:
            raise


def delete_file(location: str | os.PathLike) -> None:
    fs, path = filesystem(location)
    _silently(fs.delete_file, path)


def _silently(fn, *args) -> None:
    try:
        fn(*args)
    except (FileNotFoundError, OSError):
        pass


# --------------------------------------------------------------------------------------------------
# Local work folders for remote outputs


def _work_base() -> Path:
    return Path(os.environ.get("SPEECH_SSL_WORK_DIR", Path.home() / ".cache" / "speech-ssl" / "work"))


def local_work_dir(location: str | os.PathLike) -> Path:
    """A local folder for writing what goes to ``location``: the location itself when it is a local path,
    else a per-location folder under ``$SPEECH_SSL_WORK_DIR`` (default ``~/.cache/speech-ssl/work``) that
    outlives the process (a driver's staging area; everything in it is also under ``location``)."""
    if not is_uri(location):
        return Path(normalize(location))
    import hashlib

    digest = hashlib.sha1(str(location).encode()).hexdigest()[:12]
    folder = _work_base() / digest / name_of(location)  # the same last name as the location (runs key things by it)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def fetched(location: str | os.PathLike) -> Path:
    """A local path holding what ``location`` holds, for readers that take only local files (loading a
    model: ``speech_ssl.models`` stays free of this module). A local path is returned as it is; a URI is
    downloaded once per content into ``$SPEECH_SSL_WORK_DIR/fetched/`` and reused while the files under
    it (names, sizes, modification times) stay the same.

    Safe to call from many processes on one node at once (Ray Train workers, embed actors): each downloads
    into its own temporary folder and renames it into place; a loser of that race uses the winner's copy."""
    if not is_uri(location):
        return Path(normalize(location))
    import hashlib
    import json

    uri = normalize(location)
    fs, path = filesystem(uri)
    info_ = fs.get_file_info(path)
    if info_.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"nothing at {uri}")
    if info_.type == pafs.FileType.File:
        listing = [(info_.size, info_.mtime_ns)]
    else:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        listing = sorted((i.path, i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File)
    key = hashlib.sha1(json.dumps([uri, listing]).encode()).hexdigest()[:16]
    base = _work_base() / "fetched"
    final = base / key / name_of(uri)  # the same last name: messages and run-folder logic read it
    if final.exists():
        return final
    tmp = base / f".{key}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        target = tmp / name_of(uri)
        if info_.type == pafs.FileType.File:
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(path) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
        else:
            target.mkdir(parents=True)
            get_tree(uri, target)
        try:
            os.rename(tmp, base / key)
        except OSError:  # another process got there first: its copy is the same content
            if not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def iter_locations(location: str | os.PathLike) -> Iterator[str]:  # pragma: no cover - convenience
    for rel in walk_files(location):
        yield join(location, rel)
