"""Ingest speed (MB/s): FITS written from a simulated store, then ``survey-proc ingest``.

    PYTHONPATH=. python benchmarks/ingest_speed.py --store bench-out/throughput-dense-1024px-40ep.zarr

Writes every epoch of the store's first field as a single-HDU FITS (float32, with its WCS and
the usual keywords) and as a tile-compressed ``.fits.fz``, then times the ingest of each set
in-process and with a local cluster of worker processes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from astropy.io import fits

from survey_proc import store
from survey_proc.ingest import ingest


def write_fits(src: str, out_dir: Path, compressed: bool) -> list[Path]:
    """One FITS per epoch of the store's first field."""
    fid = store.list_fields(src)[0]
    ds = store.open_field(src, fid)
    t = store.read_epoch_table(src, fid)
    attrs = store.field_attrs(src, fid)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for e in range(ds.sizes["epoch"]):
        h = fits.Header.fromstring(str(t["wcs"][e]).strip(), sep="\n")
        h["MJD-OBS"] = float(t["mjd"][e]) - float(t["exptime"][e]) / 2 / 86400
        h["EXPTIME"], h["GAIN"], h["RDNOISE"] = float(t["exptime"][e]), attrs["gain_e_per_adu"], attrs["read_noise_e"]
        h["SATURATE"], h["OBJECT"] = attrs["saturation_adu"], "BENCH"
        img = ds["image"].values[e]
        p = out_dir / (f"e{e:04d}.fits.fz" if compressed else f"e{e:04d}.fits")
        hdus = [fits.PrimaryHDU(), fits.CompImageHDU(img, header=h)] if compressed else [fits.PrimaryHDU(img, header=h)]
        fits.HDUList(hdus).writeto(p, overwrite=True)
        paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--work", default="bench-out/ingest")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    from survey_proc.distributed.cluster import local_client

    work = Path(args.work)
    res = {}
    for compressed in (False, True):
        paths = write_fits(args.store, work / ("fz" if compressed else "plain"), compressed)
        for mode in ("in-process", f"{args.workers} workers"):
            out = work / f"out-{compressed}-{mode.replace(' ', '')}.zarr"
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            if mode == "in-process":
                rep = ingest(paths, out, field_key="OBJECT", progress=False)
            else:
                with local_client(args.workers, quiet=True) as client:
                    t = time.perf_counter()  # cluster start not counted
                    rep = ingest(paths, out, field_key="OBJECT", progress=False, client=client)
            wall = time.perf_counter() - t
            res[f"{'fits.fz' if compressed else 'fits'} {mode}"] = {
                "files": len(paths), "MB_on_disk": rep["bytes"] / 1e6, "wall_s": wall, "read_s": rep["read_s"],
                "MB_per_s_on_disk": rep["bytes"] / 1e6 / wall,
                "Mpix_per_s": len(paths) * store.image_shape(out, store.list_fields(out)[0])[1] ** 2 / 1e6 / wall}
            print(json.dumps({k: res[k]}, default=float), flush=True) if (k := next(reversed(res))) else None
    (work / "ingest_speed.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
