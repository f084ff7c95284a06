"""The output directory of ``survey-proc run``: layout, atomic Parquet units, resume bookkeeping.

Layout (DESIGN.md)::

    OUT/run.json
    OUT/sources/field=<f>/epoch=<e>.parquet
    OUT/objects/field=<f>/region=<r>.parquet
    OUT/lightcurves/field=<f>/region=<r>.parquet
    OUT/epochs.parquet                      (addition: one row per field x epoch, zero points etc.)
    OUT/calibration/field=<f>/band=<b>/stars.parquet   (addition: the ensemble stars of a field and band)

Every unit is written to a hidden temporary name in the same directory and renamed into
place (atomic on POSIX), so a unit is either complete or absent. The unit's record (its
row count, the config fingerprint, what it measured) lives in the Parquet footer under
the key ``survey_proc``: the file *is* the record, so there is no second ledger to fall
out of step with the data. A resumed run reads the footers and skips complete units.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from survey_proc.errors import SurveyProcError

META_KEY = b"survey_proc"
ROW_GROUP_ROWS = 128 * 1024  # close to DuckDB's own row-group size (122 880): good parallel scans
OUTPUT_MARKERS = ("run.json", "sources", "objects", "lightcurves")


class OutputLayout:
    """Paths inside an output directory."""

    def __init__(self, out: str | Path):
        self.root = Path(out)

    @property
    def run_json(self) -> Path:
        """``OUT/run.json``."""
        return self.root / "run.json"

    @property
    def epochs_table(self) -> Path:
        """``OUT/epochs.parquet`` (one row per field x epoch)."""
        return self.root / "epochs.parquet"

    def sources(self, field: str, epoch: int) -> Path:
        """The sources unit of (field, epoch)."""
        return self.root / "sources" / f"field={field}" / f"epoch={epoch}.parquet"

    def objects(self, field: str, region: int) -> Path:
        """The objects unit of (field, region)."""
        return self.root / "objects" / f"field={field}" / f"region={region}.parquet"

    def lightcurves(self, field: str, region: int) -> Path:
        """The light-curve unit of (field, region)."""
        return self.root / "lightcurves" / f"field={field}" / f"region={region}.parquet"

    def ensemble_stars(self, field: str, band: str) -> Path:
        """The ensemble stars of a field and band (``band`` "none" for a single-band store)."""
        return self.root / "calibration" / f"field={field}" / f"band={band}" / "stars.parquet"


def prepare(out: str | Path, mode: str, fingerprint: str,
            owned: list[str] | tuple[str, ...] = (*OUTPUT_MARKERS, "epochs.parquet", "calibration")
            ) -> dict[str, Any] | None:
    """Make ``out`` ready for a run; returns the previous run.json (resume) or None.

    ``overwrite`` removes a previous survey-proc output (only if the directory looks like
    one: it refuses to delete anything else), i.e. the top-level names in ``owned`` (the
    orchestrator passes those of every stage's output units). ``resume`` refuses an output
    written with a different processing configuration; which units are complete is each
    stage's done-check (:meth:`survey_proc.stages.base.Stage.done`).
    """
    layout = OutputLayout(out)
    root = layout.root
    if root.exists() and not root.is_dir():
        raise SurveyProcError(f"--out {root} exists and is not a directory")
    previous = None
    if root.exists() and any(root.iterdir()):
        looks_like_output = any((root / m).exists() for m in OUTPUT_MARKERS)
        if not looks_like_output:
            raise SurveyProcError(f"--out {root} is a non-empty directory that is not a survey-proc output; "
                                  "choose an empty or new directory")
        if mode == "overwrite":
            for name in owned:
                p = root / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        elif layout.run_json.exists():
            try:
                previous = json.loads(layout.run_json.read_text())
            except (OSError, json.JSONDecodeError):
                previous = None  # an interrupted write: the units' footers still hold the truth
            old = (previous or {}).get("fingerprint")
            if old and old != fingerprint:
                raise SurveyProcError(
                    f"--out {root} holds a run made with a different processing configuration "
                    f"(fingerprint {old}, now {fingerprint}); use --overwrite to start clean or choose another --out")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{uuid.uuid4().hex[:8]}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SurveyProcError(f"--out {root}: cannot write there ({exc.strerror or exc}); choose a directory you "
                              "can write to, or fix its permissions") from None
    return previous


def write_parquet_atomic(df: pd.DataFrame, schema: pa.Schema, path: str | Path, meta: dict[str, Any] | None = None,
                         row_group_rows: int = ROW_GROUP_ROWS) -> int:
    """Write ``df`` (cast to ``schema``) as zstd Parquet via temp file + rename; returns the row count.

    Extra columns of ``df`` not in the schema are dropped; missing ones are an error.
    """
    path = Path(path)
    missing = [n for n in schema.names if n not in df.columns]
    if missing:
        raise SurveyProcError(f"internal error: {path.name} lacks columns {missing}")
    table = pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)
    if meta is not None:
        table = table.replace_schema_metadata({META_KEY: json.dumps(meta, default=_json_default).encode()})
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_rows)
        os.replace(tmp, path)
    except OSError as exc:  # disk full, quota, permissions, a vanished mount
        raise SurveyProcError(f"cannot write {path}: {exc}; nothing of this unit was kept (the previous version, "
                              "if any, is intact). Free space or fix the output filesystem, then run the same "
                              "command again to resume") from None
    finally:
        if tmp.exists():
            tmp.unlink()
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


def read_meta(path: str | Path) -> dict[str, Any] | None:
    """The ``survey_proc`` record in a unit's footer; None when the file is missing or unreadable."""
    try:
        md = pq.read_metadata(path).metadata or {}
        return json.loads(md[META_KEY])
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None


def write_json_atomic(data: dict[str, Any], path: str | Path) -> None:
    """Write JSON via temp file + rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default, allow_nan=True) + "\n")
    os.replace(tmp, path)


def clean_temporaries(out: str | Path) -> int:
    """Remove leftover ``.*.tmp`` files of an interrupted run; returns how many."""
    n = 0
    for p in Path(out).rglob(".*.tmp"):
        p.unlink(missing_ok=True)
        n += 1
    return n
