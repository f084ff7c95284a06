"""``survey-proc validate OUT``: check a run's outputs against the contract, with DuckDB.

Checks, each reported as one line naming the file or key:

1. ``run.json`` exists and is readable;
2. every Parquet file of ``sources/``, ``objects/``, ``lightcurves/`` carries the contract's
   columns (DESIGN.md, :data:`survey_proc.catalog.schema.SCHEMAS`) with their types;
3. unique keys: ``sources.source_id``; ``objects.object_id``; ``(object_id, epoch)`` of
   ``lightcurves``;
4. referential integrity: every light-curve object is in ``objects``, every light-curve
   ``source_id`` (non-null) is in ``sources``, and ``objects.n_epochs`` equals the object's
   light-curve length;
5. counts against ``run.json``: sources, objects, light-curve points, epochs written;
6. no light-curve point comes from an epoch ``run.json`` lists as failed;
7. every light-curve point of an epoch that fell back says so: ``ZP_MODEL`` where
   ``epochs.parquet`` has a model zero point, ``ZP_RELATIVE`` where it has no absolute level;
8. forced points are what they say: the ``FORCED`` flag exactly where ``source_id`` is null,
   and ``objects.n_forced`` (when present) equals the object's number of forced points.

``OUT`` may be an object-store URL (``s3://...``): DuckDB then reads through the same fsspec
filesystem as the run (``DuckDBPyConnection.register_filesystem``), so no DuckDB extension
and no second set of credentials is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

from survey_proc import storage
from survey_proc import vocab as F
from survey_proc.catalog.schema import SCHEMAS
from survey_proc.storage import Location


def _files(out: Location, kind: str) -> list[Location]:
    return storage.find(storage.join(out, kind), ".parquet")


def validate_output(out: str | Path, max_examples: int = 3) -> list[str]:
    """Problems found in the run output ``out`` (empty: valid).

    Parameters
    ----------
    out
        The run's output directory (``run.json``, ``sources/``, ``objects/``, ``lightcurves/``).
    max_examples
        Offending keys quoted per problem.

    Returns
    -------
    list of str
        One message per problem, naming the file or key.
    """
    import duckdb

    out = storage.location(out, "OUT")
    run_json = storage.join(out, "run.json")
    problems: list[str] = []
    try:
        run = json.loads(storage.read_text(run_json))
    except FileNotFoundError:
        return [f"{run_json}: missing; {out} is not a survey-proc output (or the run never started)"]
    except json.JSONDecodeError as exc:
        return [f"{run_json}: not valid JSON ({exc}); the run was interrupted while writing it"]
    files = {k: _files(out, k) for k in SCHEMAS}
    for kind, schema in SCHEMAS.items():
        for f in files[kind]:
            try:
                have = storage.read_schema(f)
            except Exception as exc:
                problems.append(f"{f}: unreadable Parquet ({exc})")
                continue
            for field in schema:
                if field.name not in have.names:
                    problems.append(f"{f}: column {field.name!r} ({field.type}) is missing")
                elif not have.field(field.name).type.equals(field.type) and not (
                        str(field.type) == "string" and str(have.field(field.name).type).startswith("dictionary")):
                    problems.append(f"{f}: column {field.name!r} has type {have.field(field.name).type}, "
                                    f"the contract says {field.type}")
    if problems:
        return problems  # the queries below need the columns
    con = duckdb.connect()
    if storage.is_remote(out):
        con.register_filesystem(storage.filesystem(out)[0])

    def rel(kind: str) -> str:
        return "read_parquet([" + ", ".join(f"'{p}'" for p in files[kind]) + "], hive_partitioning = false)"

    def q(sql: str) -> list[tuple]:
        return con.execute(sql).fetchall()

    n = {k: (q(f"select count(*) from {rel(k)}")[0][0] if files[k] else 0) for k in SCHEMAS}
    for kind, key in (("sources", "source_id"), ("objects", "object_id"), ("lightcurves", "object_id, epoch")):
        if not files[kind]:
            continue
        dup = q(f"select {key}, count(*) c from {rel(kind)} group by all having c > 1 order by c desc "
                f"limit {max_examples}")
        if dup:
            n_dup = q(f"select count(*) from (select {key} from {rel(kind)} group by all having count(*) > 1)")[0][0]
            problems.append(f"{kind}: {n_dup} duplicated key(s) ({key}), e.g. {dup[0][:-1]} x{dup[0][-1]}")
    if files["lightcurves"]:
        if files["objects"]:
            orphans = q(f"select count(distinct l.object_id), min(l.object_id) from {rel('lightcurves')} l "
                        f"anti join {rel('objects')} o using (object_id)")[0]
        else:
            orphans = q(f"select count(distinct object_id), min(object_id) from {rel('lightcurves')}")[0]
        if orphans[0]:
            problems.append(f"lightcurves: {orphans[0]} object_id(s) not in objects/, e.g. {orphans[1]}")
        if files["sources"]:
            miss = q(f"select count(*), min(l.source_id) from {rel('lightcurves')} l where l.source_id is not null "
                     f"and l.source_id not in (select source_id from {rel('sources')})")[0]
            if miss[0]:
                problems.append(f"lightcurves: {miss[0]} source_id(s) not in sources/, e.g. {miss[1]}")
        counts = None
        if files["objects"]:
            # one pass over the light curves: each object's points, and its forced points when objects count them
            forced_col = "n_forced" in storage.read_schema(files["objects"][0]).names
            f_bad = "o.n_forced != l.f" if forced_col else "false"
            counts = q(f"select count(*) filter (where o.n_epochs != l.m), min(o.object_id) filter (where "
                       f"o.n_epochs != l.m), count(*) filter (where {f_bad}), min(o.object_id) filter (where {f_bad}) "
                       f"from {rel('objects')} o join (select object_id, count(*) m, count(*) filter (where "
                       f"source_id is null) f from {rel('lightcurves')} group by 1) l using (object_id)")[0]
            if counts[0]:
                problems.append(f"objects: {counts[0]} object(s) whose n_epochs differs from their light-curve "
                                f"length, e.g. {counts[1]}")
        forced = q(f"select count(*), min(object_id) from {rel('lightcurves')} "
                   f"where ((flags & {F.FORCED}) != 0) != (source_id is null)")[0]
        if forced[0]:
            problems.append(f"lightcurves: {forced[0]} point(s) whose FORCED flag disagrees with a null source_id, "
                            f"e.g. object {forced[1]}")
        if counts is not None and counts[2]:
            problems.append(f"objects: {counts[2]} object(s) whose n_forced differs from their forced points, "
                            f"e.g. {counts[3]}")
    failed = sorted({(str(f["field"]), int(f["epoch"])) for f in run.get("failures", []) if "epoch" in f})
    if failed and files["lightcurves"]:
        values = ", ".join(f"('{fi}', {e})" for fi, e in failed)
        leak = q(f"select count(*), min(field), min(epoch) from {rel('lightcurves')} "
                 f"where (field, epoch) in (select * from (values {values}))")[0]
        if leak[0]:
            problems.append(f"lightcurves: {leak[0]} point(s) from epochs run.json lists as failed, e.g. field "
                            f"{leak[1]} epoch {leak[2]}; a failed epoch must not reach the light curves")
    epochs_table = storage.join(out, "epochs.parquet")
    if files["lightcurves"] and storage.exists(epochs_table):
        names = storage.read_schema(epochs_table).names
        # a point of an epoch that fell back (model zero point, no absolute level) must say so
        for cond, bit, what in (("e.zp_status = 'model'", F.ZP_MODEL, "a model zero point"),
                                ("not e.zp_absolute" if "zp_absolute" in names else "false", F.ZP_RELATIVE,
                                 "no absolute calibration")):
            unflagged = q(f"select count(*), min(l.field), min(l.epoch) from {rel('lightcurves')} l "
                          f"join read_parquet('{epochs_table}') e on l.field = e.field and l.epoch = e.epoch "
                          f"where {cond} and (l.flags & {bit}) = 0")[0]
            if unflagged[0]:
                problems.append(f"lightcurves: {unflagged[0]} point(s) of epochs with {what} lack the "
                                f"{F.NAMES[bit]} flag, e.g. field {unflagged[1]} epoch {unflagged[2]}")
    counts = run.get("counts", {})
    for key, have in (("sources", n["sources"]), ("objects", n["objects"]), ("lightcurve_points", n["lightcurves"]),
                      ("epochs_written", len(files["sources"]))):
        if key in counts and counts[key] != have:
            problems.append(f"run.json counts.{key} = {counts[key]} but the output has {have}")
    return problems


DIGEST_KEYS = {"sources": ["source_id"], "objects": ["object_id"], "lightcurves": ["object_id", "epoch"]}


def content_digest(out: str | Path) -> dict[str, tuple[int, str]]:
    """Row count and content checksum of each output table, independent of file layout.

    Rows are put in key order and columns in name order, then hashed (pandas' row hashes,
    SHA-256 over them), so two runs with the same rows give the same digest whatever their
    task order or the number of files. Used to compare a disturbed run with an undisturbed
    one (``benchmarks/faults.py``, ``tests/test_faults.py``).

    Returns
    -------
    dict
        Table name -> (rows, hex SHA-256).

    Parameters
    ----------
    out
        The run's output directory.
    """
    import hashlib

    import pandas as pd

    out = storage.location(out, "OUT")
    digest = {}
    for kind, key in DIGEST_KEYS.items():
        files = _files(out, kind)
        df = (pd.concat([storage.read_table(f).to_pandas() for f in files], ignore_index=True) if files
              else pd.DataFrame())
        if len(df):
            df = df.sort_values(key).reset_index(drop=True)[sorted(df.columns)]
        rows = pd.util.hash_pandas_object(df, index=False).to_numpy() if len(df) else b""
        digest[kind] = (len(df), hashlib.sha256(bytes(rows)).hexdigest())
    return digest
