"""``survey-proc``: the command line. Thin: it parses, calls the API, prints, sets the exit code.

Errors a user can cause (:class:`survey_proc.errors.SurveyProcError`) are printed as one
message without a traceback and exit with status 1; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from survey_proc import __version__, storage
from survey_proc.errors import ConfigError, SurveyProcError
from survey_proc.storage import Location
from survey_proc.vocab import DETECTOR_SECTIONS

DEFAULT_SCENARIO = "dense"
DEFAULT_SIZE_PX = 512  # PNet on 2 CPU cores: 1000 epochs of 512^2 fit the make-run budget (benchmarks/RESULTS.md)
DEFAULT_SEED = 0


def cache_dir() -> Path:
    """Where ``survey-proc run`` without a STORE keeps the default simulated survey.

    ``$SURVEY_PROC_CACHE`` if set, else ``$XDG_CACHE_HOME/survey-proc``, else ``~/.cache/survey-proc``.

    Returns
    -------
    Path
        The cache directory (not created here).
    """
    if os.environ.get("SURVEY_PROC_CACHE"):
        return Path(os.environ["SURVEY_PROC_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "survey-proc"


def default_survey_prefix() -> str:
    """The start of the cached default survey's name, and so of its output folder's.

    Returns
    -------
    str
        ``default-<scenario>-<size>px-seed<seed>-sim<version>-`` (the epochs and ``ep.zarr``
        follow; the version is :data:`survey_proc.simulate.SIMULATOR_VERSION`).
    """
    from survey_proc.simulate import SIMULATOR_VERSION

    return f"default-{DEFAULT_SCENARIO}-{DEFAULT_SIZE_PX}px-seed{DEFAULT_SEED}-sim{SIMULATOR_VERSION}-"


def default_survey(n_epochs: int, *, workers: int | None, directory: Path | None = None) -> Path:
    """The default simulated survey with at least ``n_epochs`` epochs, simulating it once if needed.

    A cached default survey with more epochs is reused (the run then uses its first epochs);
    one simulated by another version of the renderer (in the name: :func:`default_survey_prefix`)
    is not.

    Parameters
    ----------
    n_epochs
        Epochs needed.
    workers
        Dask workers for the simulation (None: one per core).
    directory
        Where the default surveys live; None: :func:`cache_dir`.

    Returns
    -------
    Path
        The store (:func:`default_survey_prefix` ``<epochs>ep.zarr``).
    """
    from survey_proc.simulate import load_scenario, simulate_survey

    directory = directory or cache_dir()
    prefix = default_survey_prefix()
    candidates = []
    for p in directory.glob(f"{prefix}*ep.zarr"):
        try:
            candidates.append((int(p.name[len(prefix) : -len("ep.zarr")]), p))
        except ValueError:
            continue
    usable = sorted(c for c in candidates if c[0] >= n_epochs)
    if usable:
        print(f"Using the cached default survey {usable[0][1]} ({usable[0][0]} epochs)")
        return usable[0][1]
    out = directory / f"{prefix}{n_epochs}ep.zarr"
    print(f"Simulating the default survey ({DEFAULT_SCENARIO}, {DEFAULT_SIZE_PX}x{DEFAULT_SIZE_PX} px, "
          f"{n_epochs} epochs) into {out}; later runs reuse it")
    scn = load_scenario(DEFAULT_SCENARIO, {"n_epochs": n_epochs, "size_px": DEFAULT_SIZE_PX, "seed": DEFAULT_SEED})
    summary = simulate_survey(scn, out, workers=workers)
    _print_summary(summary)
    return out


def _print_summary(s: dict) -> None:
    print(
        f"  {s['n_stars_in_frame']} stars on the detector ({s['stars_per_px2_in_frame']:.4f}/px^2), "
        f"{s['n_detectable_in_frame']} brighter than the 5-sigma limit i={s['limiting_mag_5sigma_psf_crlb']:.2f}; "
        f"saturation at i={s['saturation_mag']:.2f}\n"
        f"  {100 * s['neighbour_frac_2fwhm_all']:.1f}% of stars have a neighbour within 2 FWHM "
        f"({100 * s['neighbour_frac_2fwhm_detectable']:.1f}% among detectable ones); "
        f"baseline {s['baseline_days']:.2f} d; {s['wall_s']:.1f} s"
    )


def _cmd_simulate(args: argparse.Namespace) -> int:
    from survey_proc.simulate import SurveyPaths, load_scenario, parse_overrides, simulate_survey

    overrides = parse_overrides(args.set)
    for key, value in (("n_epochs", args.epochs), ("size_px", args.size), ("n_fields", args.fields),
                       ("seed", args.seed)):
        if value is not None:
            overrides[key] = value
    scn = load_scenario(args.scenario, overrides)
    summary = simulate_survey(scn, args.out, overwrite=args.overwrite, workers=args.workers, progress=not args.quiet)
    paths = SurveyPaths.for_store(args.out)
    print(f"Wrote {paths.store} ({scn.n_fields} field(s) x {scn.n_epochs} epochs of {scn.size_px}x{scn.size_px} px)")
    print(f"  truth: {paths.truth}/  reference: {paths.reference}")
    _print_summary(summary)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from survey_proc import store

    attrs = store.store_attrs(args.store)
    problems = store.validate_store(args.store, raise_on_error=False)
    info: dict = {"store": str(args.store), "format": attrs.get("survey_proc_format"), "band": attrs.get("band"),
                  "bands": store.store_bands(args.store), "bands_per_epoch": store.bands_per_epoch(args.store),
                  "pixel_scale_arcsec": attrs.get("pixel_scale_arcsec"),
                  "reference_catalog": str(store.reference_catalog_path(args.store) or ""), "fields": {}}
    for fid in store.list_fields(args.store):
        ds = store.open_field(args.store, fid)
        mjd = ds["mjd"].values
        info["fields"][fid] = {"epochs": int(ds.sizes["epoch"]), "ny": int(ds.sizes["y"]), "nx": int(ds.sizes["x"]),
                               "mjd_first": float(mjd[0]) if len(mjd) else None,
                               "mjd_last": float(mjd[-1]) if len(mjd) else None,
                               "chunks": list(ds["image"].encoding.get("chunks") or ds["image"].data.chunksize)}
    info["problems"] = problems
    print(json.dumps(info, indent=2))
    return 1 if problems else 0


def _cmd_ingest(args: argparse.Namespace) -> int:
    import glob

    from survey_proc.ingest import IngestError, ingest, read_epoch_table

    paths: list[str] = []
    for pattern in args.paths:
        hits = sorted(glob.glob(pattern))
        if not hits:
            raise IngestError(f"{pattern}: matches no file")
        paths.extend(hits)
    hdus = [int(h) for h in args.hdu.split(",")] if args.hdu else None
    kw = dict(field_key=args.field_key, hdus=hdus, append=args.append, gain=args.gain,
              read_noise=args.read_noise, saturation=args.saturation, band=args.band,
              site=tuple(float(v) for v in args.site.split(",")) if args.site else None,
              pixel_scale_arcsec=args.pixel_scale if args.pixel_scale is not None else float("nan"),
              zeropoint_nominal=args.zeropoint, progress=not args.quiet,
              epoch_table=read_epoch_table(args.epoch_table) if args.epoch_table else None,
              psfex=args.psfex)
    if not args.workers or len(paths) == 1:
        report = ingest(paths, args.out, **kw)
    else:
        from survey_proc.distributed.cluster import local_client

        with local_client(args.workers, quiet=args.quiet) as client:
            report = ingest(paths, args.out, client=client, **kw)
    for fid, r in report["fields"].items():
        bands = ", ".join(b or "unknown" for b in r.get("bands", []))
        print(f"field {fid}: {r['added']} epoch(s) added, {r['skipped_already_ingested']} already ingested"
              + (f"; band(s) {bands}" if bands else ""))
        src = r.get("saturation_source", "")
        if r["added"] and src and not src.startswith(("header", "option")):
            level = "none" if r["saturation_adu"] >= 3e38 else f"{r['saturation_adu']:.6g} ADU"
            hint = " (--saturation overrides it)" if src.startswith("estimated") else ""
            print(f"  saturation {level}: {src}{hint}")
    for path, keys in report["missing"].items():
        unknown = [k for k in keys if k != "SATURATE"]
        print(f"  {path}: missing " + "; ".join(
            ([f"{', '.join(unknown)} (stored as unknown)"] if unknown else [])
            + (["SATURATE (the field's saturation is above)"] if "SATURATE" in keys else [])))
    if "psfex" in report:
        print(f"  PSFEx aperture correction from {len(report['psfex'])} model(s)"
              + (f"; no model for {len(report['psfex_missing'])} file(s): "
                 + ", ".join(Path(f).name for f in report["psfex_missing"][:5]) if report["psfex_missing"] else ""))
        for where, why in report["psfex_not_computed"].items():
            print(f"  {where}: PSFEx correction {why}")
    print(f"Wrote {args.out}: {report['files']} file(s), {report['bytes'] / 1e6:.1f} MB in {report['wall_s']:.1f} s "
          f"({report['mb_per_s']:.1f} MB/s)")
    if report["rejected"]:
        print(f"{len(report['rejected'])} file(s) could not be read and were left out:", file=sys.stderr)
        for reason in report["rejected"].values():
            print(f"  {' '.join(reason.split())}", file=sys.stderr)
        print("Fix or replace them and ingest them with --append (a file earlier than its field's last epoch needs a "
              "new store: the store keeps time order)", file=sys.stderr)
        return 1
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from survey_proc.validate import validate_output

    problems = validate_output(args.out)
    if problems:
        print(f"{args.out}: {len(problems)} problem(s)")
        for p in problems:
            print(f"  - {p}")
        return 1
    print(f"{args.out}: valid (schemas, unique keys, references, counts against run.json)")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from survey_proc.report_html import write_report

    rep = write_report(args.out, args.dest, top=args.top, store=args.store)
    print(f"Wrote {rep.html} ({len(rep.plots)} plots; sections: {', '.join(rep.sections)}"
          f"{'; compared with the simulated truth' if rep.simulated else ''})")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from survey_proc.export_hats import export_hats

    res = export_hats(args.out, args.hats, overwrite=args.overwrite, margin_arcsec=args.margin_arcsec,
                      workers=args.workers)
    print(f"Wrote the HATS catalogue {res['path']}: {res['rows']} objects with {res['lightcurve_points']} nested "
          f"light-curve points in {res['partitions']} partition(s), margin catalogue {res['margin_path']} "
          f"({res['margin_rows']} rows); {res['wall_s']:.1f} s, {res['bytes'] / 1e6:.1f} MB")
    return 0


def default_out(store_path: Location) -> Path:
    """Default ``--out``: ``./survey-proc-out/<store name without .zarr>``.

    Parameters
    ----------
    store_path
        The input store.

    Returns
    -------
    Path
        The output directory (relative to the working directory).
    """
    base = storage.name(store_path)
    return Path("survey-proc-out") / (base[: -len(".zarr")] if base.endswith(".zarr") else base)


def _export_after_run(run: dict, out: Location, args: argparse.Namespace) -> None:
    """``run --hats DIR``: the HATS export of a complete run, recorded in run.json (``hats_export``)."""
    from survey_proc.export_hats import export_hats
    from survey_proc.outputs import write_json_atomic

    if run["status"] != "complete" and not args.allow_failures:
        run["hats_export"] = {"path": str(args.hats), "skipped": f"the run is {run['status']}; resume it (or pass "
                              "--allow-failures) and the export follows"}
        print(f"Warning: no HATS export to {args.hats}: {run['hats_export']['skipped']}", file=sys.stderr)
    else:
        res = export_hats(out, args.hats, overwrite=True, workers=1)
        run["hats_export"] = {"path": str(res["path"]), "rows": res["rows"], "run_status": run["status"],
                              "lightcurve_points": res["lightcurve_points"], "margin_rows": res["margin_rows"],
                              "partitions": res["partitions"], "wall_s": res["wall_s"], "bytes": res["bytes"]}
        print(f"Wrote the HATS catalogue {res['path']}: {res['rows']} objects, {res['lightcurve_points']} nested "
              f"light-curve points; {res['wall_s']:.1f} s")
    write_json_atomic(run, storage.join(out, "run.json"))


def _cmd_run(args: argparse.Namespace) -> int:
    from survey_proc.config import load_config
    from survey_proc.distributed.pipeline import run_pipeline
    from survey_proc.outputs import write_json_atomic
    from survey_proc.report import summary_lines

    if args.epochs is not None and args.epochs < 1:
        raise SurveyProcError(f"--epochs must be a positive number of epochs, got {args.epochs}")
    path = storage.location(args.store, "store") if args.store else default_survey(args.epochs or 1000,
                                                                                  workers=args.workers)
    if args.store is None and args.epochs is None:
        args.epochs = 1000
    fields = tuple(f for item in (args.fields or []) for f in item.split(",") if f) or None
    out = storage.location(args.out, "--out") if args.out else default_out(path)
    if args.hats:
        from survey_proc.export_hats import require_hats

        require_hats()  # before the run, not after it
    if args.hats and storage.is_remote(out):
        raise ConfigError(f"--hats: the HATS export reads a local output, and --out {out} is not local; run "
                          "`survey-proc export` on a local copy of the output instead")
    overrides = {"store": str(path), "out": str(out), "epochs": args.epochs, "fields": fields,
                 "detector": args.detector, "cluster": args.cluster, "scheduler": args.scheduler,
                 "workers": args.workers, "tile_px": args.tile_px, "halo_px": args.halo_px,
                 "reference": args.reference, "mode": "overwrite" if args.overwrite else None, "retries": args.retries}
    if args.quiet:
        overrides["progress"] = False
    if args.photometry:
        overrides["bpnn"] = {"enabled": args.photometry == "bpnn"}
    if args.no_evaluate:
        overrides["evaluate"] = False
    if args.no_classify:
        overrides["classify"] = {"enabled": False}
    cfg = load_config(args.config, overrides)
    print(f"Processing {path} -> {out} (fields: {', '.join(cfg.fields) if cfg.fields else 'all'}; "
          f"epochs: {cfg.epochs or 'all'}; detector {cfg.detector}; mode {cfg.mode})")
    run = run_pipeline(cfg)
    if cfg.evaluate:
        from survey_proc.evaluate import evaluate_run, truth_paths

        try:
            truth_paths(path)
        except SurveyProcError:
            pass  # not a simulated survey: nothing to compare with
        else:
            try:
                run["evaluation"] = evaluate_run(out, path)
            except Exception as exc:  # optional: a comparison that cannot run never fails the run
                run["evaluation"] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"Warning: the comparison with truth could not run ({type(exc).__name__}: {exc}); it is "
                      "skipped (the run's outputs are complete). Pass --no-evaluate to skip it", file=sys.stderr)
            write_json_atomic(run, storage.join(out, "run.json"))
    if args.hats:
        _export_after_run(run, out, args)
    print("\n".join(summary_lines(run)))
    if run["status"] != "complete" and args.allow_failures:
        print(f"{len(run['failures'])} failed unit(s) allowed by --allow-failures; the rest of the run is complete")
        return 0
    return 0 if run["status"] == "complete" else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``survey-proc``."""
    p = argparse.ArgumentParser(prog="survey-proc", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"survey-proc {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("simulate", help="simulate a survey store with truth and a reference catalogue")
    s.add_argument("--out", required=True, help="store path DIR/NAME.zarr (truth goes to DIR/NAME.truth/)")
    s.add_argument("--scenario", default="dense", help="preset (dense, sparse) or a scenario .toml file")
    s.add_argument("--epochs", type=int, help="number of epochs (scenario parameter n_epochs)")
    s.add_argument("--size", type=int, help="detector size in pixels (size_px)")
    s.add_argument("--fields", type=int, help="number of fields (n_fields)")
    s.add_argument("--seed", type=int, help="random seed (seed)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any scenario parameter (repeatable)")
    s.add_argument("--workers", type=int, help="Dask worker processes (default: one per core; 0: no cluster)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing simulated survey at --out")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_simulate)

    i = sub.add_parser("info", help="summarise and validate a survey store")
    i.add_argument("store")
    i.set_defaults(func=_cmd_info)

    g = sub.add_parser("ingest", help="FITS exposures -> survey store (append with --append)")
    g.add_argument("paths", nargs="+",
                   help="FITS files or globs (.fits, .fits.fz, .fits.gz; single or multi-extension)")
    g.add_argument("--out", required=True, help="survey store to create (or extend with --append)")
    g.add_argument("--field-key", help="header keyword naming the field (e.g. OBJECT); default: pointing + detector")
    g.add_argument("--hdu", help="comma-separated HDU indices to read (default: every image HDU)")
    g.add_argument("--append", action="store_true", help="add to an existing store; already ingested files are skipped")
    g.add_argument("--gain", type=float, help="e/ADU, overrides GAIN/EGAIN/CCDGAIN")
    g.add_argument("--read-noise", type=float, help="electrons, overrides RDNOISE/READNOIS/RON")
    g.add_argument("--saturation", type=float, help="ADU, overrides SATURATE/SATLEVEL")
    g.add_argument("--site", metavar="LAT,LON", help="observatory latitude,longitude (deg) for the airmass when "
                   "headers have none")
    g.add_argument("--band", help="photometric band of every file, overriding the headers' BAND/FILTER/FILTNAM/"
                   "FILTER1 (an epoch table's band column overrides it); default: from the headers")
    g.add_argument("--epoch-table", metavar="CSV",
                   help="per-file times, exposures and bands that replace the headers' (columns: file, and any "
                        "of mjd_mid, exptime_s, timescale, band); for headers without them, or copied between files")
    g.add_argument("--psfex", action="append", metavar="PATH_OR_GLOB",
                   help="PSFEx models (files, a folder of *-psfex.fits / *.psf, or a glob; repeatable): an image's "
                        "model is the one named like it (c4d_X_ooi_z_ls9-psfex.fits for c4d_X_ooi_z_ls9.S4.fits), "
                        "its row the HDU's EXTNAME; its aperture correction replaces the Moffat model's where a "
                        "block has too few stars to measure one (docs/ingest.md)")
    g.add_argument("--workers", type=int, default=0,
                   help="worker processes reading files in parallel (default 0: in-process, measured faster here "
                        "because the store is written by one process; see benchmarks/RESULTS.md)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--pixel-scale", type=float, help="arcsec per pixel")
    g.add_argument("--zeropoint", type=float, default=25.0, help="nominal zero point (mag for 1 ADU per exposure)")
    g.set_defaults(func=_cmd_ingest)

    v = sub.add_parser("validate", help="check a run's outputs: schemas, unique keys, references, counts")
    v.add_argument("out", help="the output directory of survey-proc run")
    v.set_defaults(func=_cmd_validate)

    h = sub.add_parser("report", help="an HTML page with plots of a finished run (OUT/report/index.html)")
    h.add_argument("out", help="the output directory of survey-proc run")
    h.add_argument("--dest", help="folder of the page and its PNGs (default: OUT/report)")
    h.add_argument("--top", type=int, default=6, help="periodic-variable candidates plotted (highest p_periodic)")
    h.add_argument("--store", help="the survey store, to find a simulated survey's truth (default: run.json's)")
    h.set_defaults(func=_cmd_report)

    x = sub.add_parser("export", help="export a run's objects and light curves (HATS catalogue for lsdb)")
    x.add_argument("out", help="the output directory of survey-proc run")
    x.add_argument("--hats", required=True, metavar="DIR",
                   help="write a HATS catalogue of the objects with their light curves nested, and its margin "
                        "catalogue, under DIR (needs the hats extra: pip install 'survey-proc[hats]')")
    x.add_argument("--margin-arcsec", type=float, default=10.0, help="margin catalogue threshold (arcsec)")
    x.add_argument("--workers", type=int, default=1, help="Dask worker processes for hats-import (default 1)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing catalogue in DIR")
    x.set_defaults(func=_cmd_export)

    r = sub.add_parser("run", help="process a survey (without STORE: the default simulated survey)")
    r.add_argument("store", nargs="?", help="survey store (default: simulate/reuse the default survey)")
    r.add_argument("--out", help="output directory (default: ./survey-proc-out/<store name>)")
    r.add_argument("--epochs", type=int, help="process the first N epochs (default: all; 1000 for the default survey)")
    r.add_argument("--fields", action="append", metavar="F1,F2", help="fields to process (default: all)")
    r.add_argument("--detector", choices=tuple(DETECTOR_SECTIONS),
                   help="source detector: sep (classical, default: the winner on real images, benchmarks/"
                        "RESULTS.md) or pnet (learned; trusted inside its training seeing only, docs/pnet.md)")
    r.add_argument("--photometry", choices=("bpnn", "classical"),
                   help="magnitudes from the detector's own photometry (classical, default: sep's aperture, pnet's "
                        "PSF fit; the measured winner, benchmarks/RESULTS.md issue 21) or the BPNN (aleatoric + "
                        "epistemic errors)")
    r.add_argument("--hats", metavar="DIR", help="when the run is complete, export its objects with their light "
                   "curves nested as a HATS catalogue under DIR (as `survey-proc export OUT --hats DIR`; replaces "
                   "an earlier export there)")
    r.add_argument("--allow-failures", action="store_true",
                   help="exit 0 even when some units failed (they are listed and recorded in run.json)")
    r.add_argument("--retries", type=int, help="times a failed unit is submitted again before it is quarantined "
                   "(default 1)")
    r.add_argument("--no-classify", action="store_true",
                   help="skip the periodic-variable search and classifier (objects keep NaN periods and classes)")
    r.add_argument("--cluster", choices=("local", "cuda"), help="start a local CPU or dask-cuda cluster")
    r.add_argument("--scheduler", metavar="ADDR", help="attach to a running Dask scheduler (tcp://host:8786)")
    r.add_argument("--workers", type=int, help="worker processes (default: one per core / GPU)")
    r.add_argument("--tile-px", type=int, help="tile core size in pixels (default 512)")
    r.add_argument("--halo-px", type=int, help="tile halo in pixels (default 32)")
    r.add_argument("--reference", help="reference catalogue Parquet (ra, dec, mag, mag_err); default: the store's; "
                        "'none': calibrate relative to a reference epoch")
    mode = r.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="skip units already written (the default)")
    mode.add_argument("--overwrite", action="store_true", help="delete a previous output in --out and start clean")
    r.add_argument("--config", help="run configuration TOML (command-line options override it)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument("--no-evaluate", action="store_true", help="skip the comparison with truth for simulated stores")
    r.set_defaults(func=_cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``survey-proc`` console script.

    Parameters
    ----------
    argv
        Command-line arguments without the program name; None: ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit status: 0 success; 1 a user error, failed units or validation problems; 130 Ctrl-C.
    """
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SurveyProcError as exc:
        print(f"survey-proc {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        hint = ("; the units written so far are kept: run the same command again to resume"
                if args.command == "run" else "")
        print(f"survey-proc {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
