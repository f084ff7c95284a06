"""The output directory of ``survey-proc run``: layout, atomic Parquet units, resume bookkeeping.

Layout (DESIGN.md)::

    OUT/run.json
    OUT/sources/field=<f>/epoch=<e>.parquet
    OUT/objects/field=<f>/region=<r>.parquet
    OUT/lightcurves/field=<f>/region=<r>.parquet
    OUT/epochs.parquet                      (addition: one row per field x epoch, zero points etc.)
    OUT/calibration/field=<f>/band=<b>/stars.parquet   (addition: the ensemble stars of a field and band)
    OUT/calibration/field=<f>/detrend.parquet          (addition: the field's SysRem components, classify)
    OUT/calibration/field=<f>/frames/region=<r>.parquet (addition: the region's frame maps per epoch, forced)

Every unit is written so that it is either complete or absent: on a POSIX filesystem to a
hidden temporary name in the same directory and renamed into place; on an object store
(``s3://``...) in one upload (:mod:`survey_proc.storage`). The unit's record (its
row count, the config fingerprint, what it measured) lives in the Parquet footer under
the key ``survey_proc``: the file *is* the record, so there is no second ledger to fall
out of step with the data. A resumed run reads the footers and skips complete units.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from survey_proc import storage
from survey_proc.errors import SurveyProcError
from survey_proc.storage import Location

META_KEY = b"survey_proc"
ROW_GROUP_ROWS = 128 * 1024  # close to DuckDB's own row-group size (122 880): good parallel scans
OUTPUT_MARKERS = ("run.json", "sources", "objects", "lightcurves")


class OutputLayout:
    """Paths inside an output directory."""

    def __init__(self, out: Location):
        self.root: Location = out if storage.is_remote(out) else Path(out)

    @property
    def run_json(self) -> Location:
        """``OUT/run.json``."""
        return storage.join(self.root, "run.json")

    @property
    def epochs_table(self) -> Location:
        """``OUT/epochs.parquet`` (one row per field x epoch)."""
        return storage.join(self.root, "epochs.parquet")

    def sources(self, field: str, epoch: int) -> Location:
        """The sources unit of (field, epoch)."""
        return storage.join(self.root, "sources", f"field={field}", f"epoch={epoch}.parquet")

    def objects(self, field: str, region: int) -> Location:
        """The objects unit of (field, region)."""
        return storage.join(self.root, "objects", f"field={field}", f"region={region}.parquet")

    def lightcurves(self, field: str, region: int) -> Location:
        """The light-curve unit of (field, region)."""
        return storage.join(self.root, "lightcurves", f"field={field}", f"region={region}.parquet")

    def ensemble_stars(self, field: str, band: str) -> Location:
        """The ensemble stars of a field and band (``band`` "none" for a single-band store)."""
        return storage.join(self.root, "calibration", f"field={field}", f"band={band}", "stars.parquet")


def prepare(out: Location, mode: str, fingerprint: str,
            owned: list[str] | tuple[str, ...] = (*OUTPUT_MARKERS, "epochs.parquet", "calibration")
            ) -> dict[str, Any] | None:
    """Make ``out`` ready for a run; returns the previous run.json (resume) or None.

    ``overwrite`` removes a previous survey-proc output (only if the directory looks like
    one: it refuses to delete anything else), i.e. the top-level names in ``owned`` (the
    orchestrator passes those of every stage's output units). ``resume`` refuses an output
    written with a different processing configuration; which units are complete is each
    stage's done-check (:meth:`survey_proc.stages.base.Stage.done`). ``out`` may be a local
    directory or an fsspec URL (an object-store prefix).
    """
    layout = OutputLayout(out)
    root = layout.root
    try:
        if storage.is_file(root):
            raise SurveyProcError(f"--out {root} exists and is not a directory")
        previous = None
        present = storage.children(root)
        if present:
            looks_like_output = any(m in present for m in OUTPUT_MARKERS)
            if not looks_like_output:
                raise SurveyProcError(f"--out {root} is a non-empty directory that is not a survey-proc output; "
                                      "choose an empty or new directory")
            if mode == "overwrite":
                for name in owned:
                    if name in present:
                        storage.remove(storage.join(root, name))
            elif "run.json" in present:
                try:
                    previous = json.loads(storage.read_text(layout.run_json))
                except (OSError, json.JSONDecodeError):
                    previous = None  # an interrupted write: the units' footers still hold the truth
                old = (previous or {}).get("fingerprint")
                if old and old != fingerprint:
                    raise SurveyProcError(
                        f"--out {root} holds a run made with a different processing configuration "
                        f"(fingerprint {old}, now {fingerprint}); use --overwrite to start clean or choose another "
                        "--out")
    except SurveyProcError:
        raise
    except Exception as exc:  # an unreachable or refusing object store (botocore, aiohttp, OSError), a lost mount
        raise SurveyProcError(f"--out {root}: cannot read it ({type(exc).__name__}: {exc}); check the path, and for "
                              "a URL the endpoint and credentials (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID... for "
                              "s3://)") from None
    try:
        if not storage.is_remote(root):
            Path(root).mkdir(parents=True, exist_ok=True)
        probe = storage.join(root, f".write-test-{uuid.uuid4().hex[:8]}.tmp")
        storage.write_bytes_atomic(b"", probe)
        storage.remove(probe)
    except OSError as exc:
        raise SurveyProcError(f"--out {root}: cannot write there ({getattr(exc, 'strerror', None) or exc}); choose a "
                              "directory you can write to, or fix its permissions (or the bucket's policy)") from None
    return previous


def write_parquet_atomic(df: pd.DataFrame, schema: pa.Schema, path: Location, meta: dict[str, Any] | None = None,
                         row_group_rows: int = ROW_GROUP_ROWS) -> int:
    """Write ``df`` (cast to ``schema``) as zstd Parquet, whole or not at all; returns the row count.

    Local: temp file + rename; object store: one upload (:func:`survey_proc.storage.write_table_atomic`).
    Extra columns of ``df`` not in the schema are dropped; missing ones are an error.
    """
    missing = [n for n in schema.names if n not in df.columns]
    if missing:
        raise SurveyProcError(f"internal error: {storage.name(path)} lacks columns {missing}")
    table = pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)
    if meta is not None:
        table = table.replace_schema_metadata({META_KEY: json.dumps(meta, default=_json_default).encode()})
    try:
        storage.write_table_atomic(table, path, compression="zstd", row_group_size=row_group_rows)
    except OSError as exc:  # disk full, quota, permissions, a vanished mount, a failed upload
        raise SurveyProcError(f"cannot write {path}: {exc}; nothing of this unit was kept (the previous version, "
                              "if any, is intact). Free space or fix the output filesystem, then run the same "
                              "command again to resume") from None
    return table.num_rows


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def meta_from(metadata: dict[bytes, bytes] | None) -> dict[str, Any] | None:
    """The ``survey_proc`` record in Parquet key-value metadata; None when it has none or it is not JSON.

    ``metadata``: a footer's, or a table's schema's as read (no second read of the file).
    """
    try:
        return json.loads((metadata or {})[META_KEY])
    except (KeyError, ValueError):
        return None


def read_meta(path: Location) -> dict[str, Any] | None:
    """The ``survey_proc`` record in a unit's footer; None when the file is missing or unreadable."""
    try:
        return meta_from(storage.read_metadata(path).metadata)
    except (OSError, pa.ArrowException):
        return None


def write_json_atomic(data: dict[str, Any], path: Location) -> None:
    """Write JSON whole or not at all (temp file + rename, or one upload)."""
    text = json.dumps(data, indent=2, default=_json_default, allow_nan=True) + "\n"
    storage.write_bytes_atomic(text.encode(), path)


def clean_temporaries(out: Location) -> int:
    """Remove leftover ``.*.tmp`` files of an interrupted run; returns how many.

    Only a local output can hold them: an object store never shows an unfinished upload.
    """
    if storage.is_remote(out):
        return 0
    n = 0
    for p in Path(out).rglob(".*.tmp"):
        p.unlink(missing_ok=True)
        n += 1
    return n
