"""``survey-proc export OUT --hats DIR``: the objects as a HATS catalogue with their light curves nested.

HATS (HEALPix Adaptive Tiling Scheme) is the layout lsdb reads: Parquet partitioned by
HEALPix pixel with ``_metadata``, ``properties`` and margin catalogues. The export is a HATS
*collection* written by hats-import (not by hand):

    DIR/collection.properties
    DIR/objects/                 the object catalogue: one row per object, every objects/ column,
                                 plus ``lightcurve``, a nested column (nested-pandas) holding the
                                 object's light-curve points (epoch, mjd, mag, mag_err, flux, flux_err,
                                 flags, source_id, band, ...: every lightcurves/ column but
                                 object_id and field, which are the row's)
    DIR/objects_<N>arcs/         the margin catalogue (objects within N arcsec of each partition's
                                 border, default 10, and some a little beyond: the HEALPix pixels of
                                 the order N implies; hats-import 0.11 has no exact distance filter),
                                 the collection's default margin

``lsdb.open_catalog(DIR)`` opens the catalogue with its margin. The hive-partitioned output is
left as it is. hats-import reads the run's output unit by unit: each ``objects/field=f/region=r``
file is read together with its ``lightcurves/field=f/region=r`` file and nested there
(:class:`RegionNestingReader`), so memory holds one region at a time, whatever the survey's size.

Objects without ra/dec (a field without a WCS) have no place on the sky and so none in HATS:
the export refuses such an output and names the fields.

The packages (hats, hats-import, lsdb, nested-pandas) are the optional extra ``hats``
(``pip install 'survey-proc[hats]'``): lsdb needs a newer dask than the range the core keeps
open for dask-cuda.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from survey_proc.errors import SurveyProcError

CATALOG_NAME = "objects"
NESTED_COLUMN = "lightcurve"
PARENT_KEYS = ("object_id", "field")  # light-curve columns that are the row's own, not nested

_MISSING = ("HATS export needs the optional packages hats, hats-import, lsdb and nested-pandas ({name} is not "
            "installed): pip install 'survey-proc[hats]'")


def require_hats() -> None:
    """Raise a :class:`SurveyProcError` naming the missing package when the hats extra is not installed."""
    for mod, name in (("hats", "hats"), ("hats_import", "hats-import"), ("lsdb", "lsdb"),
                      ("nested_pandas", "nested-pandas")):
        try:
            __import__(mod)
        except ImportError:
            raise SurveyProcError(_MISSING.format(name=name)) from None


def _plain(table: pa.Table) -> pa.Table:
    """Dictionary-encoded columns (``field``, ``band``) as plain strings: partitions mix their dictionaries."""
    cols = []
    for name in table.column_names:
        col = table[name]
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        cols.append(col)
    return pa.table(cols, names=table.column_names)


def _region_files(out: Path) -> list[tuple[Path, Path]]:
    """(objects unit, light-curve unit) of every region of a run."""
    pairs = []
    for obj in sorted((out / "objects").glob("field=*/region=*.parquet")):
        pairs.append((obj, out / "lightcurves" / obj.parent.name / obj.name))
    return pairs


try:  # the reader subclasses hats-import's; without the extra the module still imports (and says what to install)
    from hats_import.catalog.file_readers.input_reader import InputReader
except ImportError:  # pragma: no cover - exercised only without the hats extra
    InputReader = object  # type: ignore[assignment,misc]


class RegionNestingReader(InputReader):
    """hats-import file reader: one objects unit in, its objects with their light curves nested out.

    Parameters
    ----------
    out
        The run's output directory (the light-curve unit of ``OUT/objects/field=f/region=r.parquet``
        is ``OUT/lightcurves/field=f/region=r.parquet``).
    """

    def __init__(self, out: str | Path):
        self.out = str(out)

    def read(self, input_file: Any, read_columns: list[str] | None = None) -> Iterator[Any]:
        """Yield the objects of one region as a NestedFrame with the column ``lightcurve``.

        Parameters
        ----------
        input_file
            An objects unit, ``OUT/objects/field=f/region=r.parquet``.
        read_columns
            Ignored (every column is exported).

        Yields
        ------
        nested_pandas.NestedFrame
            One row per object (index: a range), ``lightcurve`` holding its points sorted by mjd.
        """
        import nested_pandas as npd

        obj_path = Path(str(input_file))
        objects = _plain(pq.read_table(obj_path)).to_pandas(types_mapper=pd.ArrowDtype)
        lc_path = Path(self.out) / "lightcurves" / obj_path.parent.name / obj_path.name
        lc_table = _plain(pq.read_table(lc_path)) if lc_path.is_file() else None
        nf = npd.NestedFrame(objects.set_index(objects["object_id"].astype("int64").to_numpy()))
        if lc_table is not None and lc_table.num_rows:
            lc = lc_table.to_pandas(types_mapper=pd.ArrowDtype)
            lc = lc.sort_values(["object_id", "mjd"], kind="stable")
            index = lc["object_id"].astype("int64").to_numpy()
            lc = lc.drop(columns=[c for c in PARENT_KEYS if c in lc.columns])
            nf = nf.join_nested(lc.set_index(index), NESTED_COLUMN, how="left")
        yield nf.reset_index(drop=True)


def check_sky_positions(out: str | Path) -> int:
    """Refuse an output whose objects lack ra/dec; returns the number of objects.

    Parameters
    ----------
    out
        The run's output directory.

    Returns
    -------
    int
        Objects in ``OUT/objects``.

    Raises
    ------
    SurveyProcError
        When there are no objects, or some have a non-finite ra or dec (their field has no WCS):
        the message names each such field and its count.
    """
    out = Path(out)
    files = [o for o, _ in _region_files(out)]
    if not files:
        raise SurveyProcError(f"{out}/objects holds no objects unit: nothing to export (is {out} the --out of a "
                              "finished `survey-proc run`?)")
    bad: dict[str, int] = {}
    n = 0
    for f in files:
        t = pq.read_table(f, columns=["ra", "dec"])
        n += t.num_rows
        ra = t["ra"].to_numpy(zero_copy_only=False).astype(float)
        dec = t["dec"].to_numpy(zero_copy_only=False).astype(float)
        k = int((~(np.isfinite(ra) & np.isfinite(dec))).sum())
        if k:
            fid = f.parent.name.split("=", 1)[1]
            bad[fid] = bad.get(fid, 0) + k
    if bad:
        where = "; ".join(f"field {fid}: {k} object(s)" for fid, k in sorted(bad.items()))
        raise SurveyProcError(
            f"cannot export {out} to HATS: objects without ra/dec ({where}); HATS partitions by sky position, so "
            "every object needs one. Those fields' epochs have no WCS: ingest their images with WCS headers (or "
            "solve them) and run again")
    return n


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def export_hats(out: str | Path, dest: str | Path, *, overwrite: bool = False, margin_arcsec: float = 10.0,
                workers: int = 1, client: Any = None, highest_order: int = 8,
                pixel_threshold: int = 1_000_000) -> dict[str, Any]:
    """Write a run's objects, with their light curves nested, as a HATS collection with a margin catalogue.

    Parameters
    ----------
    out
        The run's output directory.
    dest
        The collection directory to create (``lsdb.open_catalog(dest)`` opens it).
    overwrite
        Replace an existing HATS collection at ``dest`` (anything else there is refused).
    margin_arcsec
        Margin catalogue threshold (arcsec): objects this close to a partition's border are copied
        into the margin, so crossmatches within that radius see their neighbours across it.
    workers
        Dask worker processes started for hats-import when ``client`` is None.
    client
        An existing Dask client to run hats-import on (None: a LocalCluster of ``workers`` processes).
    highest_order
        Deepest HEALPix order of a partition.
    pixel_threshold
        Most objects in one partition (a dense sky region is split until it holds fewer).

    Returns
    -------
    dict
        ``path`` (the collection), ``catalog_path``, ``margin_path``, ``rows`` (objects),
        ``lightcurve_points``, ``margin_rows``, ``partitions``, ``wall_s`` (s), ``rows_per_s``
        (objects + light-curve points per second), ``bytes`` (on disk).

    Raises
    ------
    SurveyProcError
        Without the ``hats`` extra; without objects; with objects lacking ra/dec (names the
        fields); when ``dest`` exists and is not empty (without ``overwrite``, or when it is not a
        HATS collection).
    """
    require_hats()
    import hats
    from hats.catalog.healpix_dataset.healpix_dataset import HealpixDataset
    from hats_import.collection.arguments import CollectionArguments
    from hats_import.pipeline import pipeline_with_client

    out, dest = Path(out), Path(dest)
    n_objects = check_sky_positions(out)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        if not overwrite:
            raise SurveyProcError(f"--hats {dest} exists and is not empty; pass --overwrite to replace it or choose "
                                  "another directory")
        if not (dest / "collection.properties").is_file():
            raise SurveyProcError(f"--hats {dest} is not a HATS collection (no collection.properties): refusing to "
                                  "delete it; choose another directory")
        shutil.rmtree(dest)
    pairs = _region_files(out)
    n_points = sum(pq.read_metadata(lc).num_rows for _, lc in pairs if lc.is_file())
    t0 = time.perf_counter()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".hats-tmp-", dir=dest.parent) as tmp:
        args = (CollectionArguments(output_path=dest.parent, output_artifact_name=dest.name, tmp_dir=tmp,
                                    progress_bar=False, resume=False, dask_n_workers=workers)
                .catalog(input_file_list=[str(o) for o, _ in pairs], file_reader=RegionNestingReader(out),
                         ra_column="ra", dec_column="dec", catalog_type="object", output_artifact_name=CATALOG_NAME,
                         highest_healpix_order=highest_order, pixel_threshold=pixel_threshold,
                         sort_columns="object_id")
                .add_margin(margin_threshold=float(margin_arcsec), is_default=True))
        try:
            if client is not None:
                pipeline_with_client(args, client)
            else:
                from survey_proc.distributed.cluster import local_client

                with local_client(max(1, workers), quiet=True) as c:
                    pipeline_with_client(args, c)
        except BaseException:  # a half-written collection is not left behind to be mistaken for an export
            shutil.rmtree(dest, ignore_errors=True)
            raise
    wall = time.perf_counter() - t0
    cat = hats.read_hats(dest / CATALOG_NAME)
    if not isinstance(cat, HealpixDataset):
        raise SurveyProcError(f"{dest / CATALOG_NAME} is not a HATS catalogue after the export; run it again with "
                              "--overwrite")
    margins = sorted(p for p in dest.iterdir() if p.is_dir() and p.name.startswith(f"{CATALOG_NAME}_"))
    margin = hats.read_hats(margins[0]) if margins else None
    margin_rows = int(margin.catalog_info.total_rows or 0) if isinstance(margin, HealpixDataset) else 0
    rows = int(cat.catalog_info.total_rows or 0)
    if rows != n_objects:
        raise SurveyProcError(f"HATS export of {out} wrote {rows} objects, expected {n_objects}: the catalogue at "
                              f"{dest} is incomplete; run the export again with --overwrite")
    return {"path": dest, "catalog_path": dest / CATALOG_NAME, "margin_path": margins[0] if margins else None,
            "rows": rows, "lightcurve_points": n_points, "margin_rows": margin_rows,
            "partitions": len(cat.get_healpix_pixels()), "wall_s": wall,
            "rows_per_s": (rows + n_points) / wall if wall > 0 else float("nan"), "bytes": _dir_bytes(dest)}
