"""Where a store and an output live: a local path or an fsspec URL (``s3://``, ``gs://``, ``memory://``...).

fsspec provides the filesystems (s3fs for S3 and S3-compatible servers, gcsfs...); this module
adds what survey-proc needs on top of them, in one place:

- **one spelling for locations.** A local location is a :class:`pathlib.Path`; a remote one
  stays a URL string (``Path("s3://b/k")`` would collapse the ``//``). :func:`join` builds
  both, so an :class:`~survey_proc.stages.base.OutputUnit` knows nothing of the backend.
- **how a unit appears whole or not at all** (:func:`write_bytes_atomic`). On a POSIX
  filesystem: a hidden temporary file in the same directory, then ``os.replace`` (atomic
  rename). An object store has no rename, but it needs none: an object becomes visible
  only when its single PUT (or its multipart upload's CompleteMultipartUpload) succeeds, so
  the unit is serialised in memory and uploaded in one request. A writer killed mid-upload
  leaves nothing (an unfinished multipart upload is invisible, and the bucket's lifecycle
  rule removes it), so resume needs no clean-up there.
- **reading Parquet from either** (:func:`read_table`, :func:`read_schema`,
  :func:`read_metadata`) with the fsspec filesystem passed to pyarrow, so that the endpoint
  and credentials come from the same place for every reader: the standard AWS variables
  (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...; read by botocore in every worker) or
  fsspec's own configuration (``FSSPEC_S3_ENDPOINT_URL``...).

Credentials never travel through Dask: every worker reads its own environment.
"""

from __future__ import annotations

import io
import os
import posixpath
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from survey_proc.errors import ConfigError

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

Location = str | Path
"""A local path (:class:`~pathlib.Path` or str) or a remote URL (str)."""


def is_remote(loc: Location) -> bool:
    """Whether ``loc`` is a URL of a filesystem other than the local one (``file://`` is local)."""
    s = str(loc)
    return "://" in s and not s.startswith("file://")


def location(value: str | Path, name: str = "path") -> Location:
    """A run's store or output location from a path or URL; refuses a URL nothing here can open.

    ``file://`` URLs become local paths. Other URLs are kept as they are if fsspec knows the
    protocol and its implementation is installed (``s3://`` needs s3fs: ``pip install
    survey-proc[s3]``).

    Parameters
    ----------
    value
        A path or a URL.
    name
        The setting's name, for the error message.

    Returns
    -------
    Path or str
        The local path, or the URL without a trailing slash.

    Raises
    ------
    ConfigError
        For a URL scheme fsspec does not know or cannot load.
    """
    s = str(value)
    if "://" not in s:
        return Path(s)
    from urllib.parse import unquote, urlparse

    url = urlparse(s)
    if url.scheme == "file":
        if url.netloc not in ("", "localhost"):
            raise ConfigError(f"{name} {s!r}: a file:// URL names a host ({url.netloc}); use a local path")
        return Path(unquote(url.path))
    import fsspec

    try:
        fsspec.get_filesystem_class(url.scheme)
    except (ValueError, ImportError) as exc:
        extra = " (pip install 'survey-proc[s3]' installs s3fs)" if url.scheme in ("s3", "s3a") else ""
        raise ConfigError(f"{name} {s!r}: cannot open {url.scheme}:// URLs here ({exc}){extra}; use a local path, "
                          "a file:// URL or an installed fsspec filesystem") from None
    return s.rstrip("/")


def join(root: Location, *parts: str) -> Location:
    """``root`` joined with ``/``-separated ``parts``: a Path for a local root, a URL for a remote one."""
    if is_remote(root):
        return posixpath.join(str(root).rstrip("/"), *parts)
    return Path(root).joinpath(*parts)


def parent(loc: Location) -> Location:
    """The location that holds ``loc``."""
    if is_remote(loc):
        return posixpath.dirname(str(loc).rstrip("/"))
    return Path(loc).parent


def name(loc: Location) -> str:
    """The last component of ``loc``."""
    return posixpath.basename(str(loc).rstrip("/")) if is_remote(loc) else Path(loc).name


def filesystem(loc: Location) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem of ``loc`` and the path inside it (for pyarrow, zarr or DuckDB).

    The filesystem's listing cache is emptied first: other processes (the workers) write
    units, and a listing cached by this process would hide them from a done-check.
    """
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(str(loc))
    fs.invalidate_cache()
    return fs, path


def exists(loc: Location) -> bool:
    """Whether a file or directory exists at ``loc`` (a prefix counts as a directory on object stores)."""
    if not is_remote(loc):
        return Path(loc).exists()
    fs, path = filesystem(loc)
    return bool(fs.exists(path))


def is_dir(loc: Location) -> bool:
    """Whether ``loc`` is a directory (on an object store: a prefix with objects under it)."""
    if not is_remote(loc):
        return Path(loc).is_dir()
    fs, path = filesystem(loc)
    return bool(fs.isdir(path))


def is_file(loc: Location) -> bool:
    """Whether ``loc`` is a file (an object)."""
    if not is_remote(loc):
        return Path(loc).is_file()
    fs, path = filesystem(loc)
    return bool(fs.isfile(path))


def _url(fs: AbstractFileSystem, path: str) -> str:
    return str(fs.unstrip_protocol(path))


def find(loc: Location, suffix: str = "") -> list[Location]:
    """Every file under ``loc`` whose name ends with ``suffix`` (hidden files included), sorted; [] if none."""
    if not is_remote(loc):
        root = Path(loc)
        return sorted(p for p in root.rglob(f"*{suffix}") if p.is_file()) if root.is_dir() else []
    fs, path = filesystem(loc)
    if not fs.isdir(path):
        return []
    return sorted(_url(fs, p) for p in fs.find(path) if p.endswith(suffix))


def children(loc: Location) -> list[str]:
    """The names directly under ``loc`` ([] when it does not exist)."""
    if not is_remote(loc):
        root = Path(loc)
        return sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    fs, path = filesystem(loc)
    if not fs.isdir(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def remove(loc: Location) -> None:
    """Remove the file or the whole directory (prefix) at ``loc``; nothing there is fine."""
    if not is_remote(loc):
        import shutil

        p = Path(loc)
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
        return
    fs, path = filesystem(loc)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def read_bytes(loc: Location) -> bytes:
    """The content of the file at ``loc``."""
    if not is_remote(loc):
        return Path(loc).read_bytes()
    fs, path = filesystem(loc)
    return bytes(fs.cat_file(path))


def read_text(loc: Location) -> str:
    """The file at ``loc`` as UTF-8 text."""
    return read_bytes(loc).decode()


def write_bytes_atomic(data: bytes, loc: Location) -> None:
    """Write ``data`` to ``loc`` so that readers see the previous content or the new one, never a part.

    Local: a hidden temporary file in the same directory, renamed over ``loc``
    (``os.replace``); the temporary file is removed if anything fails. Remote: one upload
    of the whole content (see the module docstring).

    Raises
    ------
    OSError
        When the write fails (disk full, permissions, a network error); nothing was kept.
    """
    if is_remote(loc):
        fs, key = filesystem(loc)
        fs.pipe_file(key, data)
        return
    _replace_atomically(Path(loc), lambda tmp: tmp.write_bytes(data))


def write_table_atomic(table: pa.Table, loc: Location, **write_options: Any) -> None:
    """Write ``table`` as Parquet at ``loc`` atomically (:func:`write_bytes_atomic`'s rule).

    Local files are written by pyarrow straight to the temporary file (no copy in memory);
    remote ones are serialised in memory and uploaded in one request.
    """
    if is_remote(loc):
        buf = io.BytesIO()
        pq.write_table(table, buf, **write_options)
        write_bytes_atomic(buf.getvalue(), loc)
        return
    _replace_atomically(Path(loc), lambda tmp: pq.write_table(table, tmp, **write_options))


def _replace_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """``write`` a hidden temporary file beside ``path``, then rename it over ``path``; no temporary is left."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _arrow_args(loc: Location) -> tuple[str, Any]:
    if not is_remote(loc):
        return str(loc), None
    fs, path = filesystem(loc)
    return path, fs


def read_table(loc: Location, **kwargs: Any) -> pa.Table:
    """:func:`pyarrow.parquet.read_table` of the file at ``loc`` (``columns=``, ``filters=``... pass through)."""
    path, fs = _arrow_args(loc)
    return pq.read_table(path, filesystem=fs, **kwargs)


def read_schema(loc: Location) -> pa.Schema:
    """The Arrow schema of the Parquet file at ``loc``."""
    path, fs = _arrow_args(loc)
    return pq.read_schema(path, filesystem=fs)


def read_metadata(loc: Location) -> pq.FileMetaData:
    """The Parquet footer of the file at ``loc``."""
    path, fs = _arrow_args(loc)
    return pq.read_metadata(path, filesystem=fs)
