"""The short summary ``survey-proc run`` prints at the end (from run.json)."""

from __future__ import annotations

from typing import Any


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def summary_lines(run: dict[str, Any]) -> list[str]:
    """Human-readable lines: detections, objects, light curves, zero points, timings, truth.

    Parameters
    ----------
    run
        The parsed ``run.json`` of a finished run.

    Returns
    -------
    list of str
        The lines, without newlines.
    """
    c = run["counts"]
    t = run["timings_s"]
    spe = c["sources_per_epoch"]
    lines = [
        f"Output: {run['config']['out']}  ({run['status']})",
        f"  epochs: {c['epochs_written']}/{c['epochs_total']} written ({c.get('epochs_skipped_resume', 0)} already "
        f"done); detections per epoch: median {spe['median']:.0f} (min {spe['min']}, max {spe['max']}); "
        f"{c['border_duplicates_removed']} border duplicates removed",
        f"  objects: {c['objects']}; light-curve points: {c['lightcurve_points']} "
        f"(mean length {c['lightcurve_points'] / max(1, c['objects']):.0f} epochs)",
    ]
    if run.get("classify_fingerprint"):
        lines.append(f"  variables: {c.get('periodic_variables', 0)} periodic among {c.get('objects_classified', 0)} "
                     "classified light curves (objects/: period, var_class, p_periodic)")
    for fid, z in run["zeropoints"].items():
        model = z.get("model", {})
        k = model.get("k_mag_per_airmass")
        lines.append(f"  zero point {fid}: median {_fmt(z['median'])} mag, scatter over epochs {_fmt(z['std'])} mag; "
                     f"model residual rms {_fmt(model.get('scatter'))}, extinction k "
                     f"{'n/a (no airmass)' if k is None or k != k else format(k, '.3f')}; "
                     f"{z.get('n_model_epochs', 0)} epoch(s) from the model; reference: {z.get('reference')}")
    if run.get("domain_actions"):
        acts = run["domain_actions"]
        lines.append(f"  outside a model's training range: {len(acts)} epoch(s), e.g. field {acts[0]['field']} epoch "
                     f"{acts[0]['epoch']}: {acts[0]['action']} (run.json domain_actions, epochs.parquet domain)")
    if run.get("extraction_fallbacks"):
        lines.append(f"  sep overflow fallbacks: {len(run['extraction_fallbacks'])} epoch(s) (see run.json)")
    lines.append("  wall time: " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in t.items()))
    ev = run.get("evaluation")
    if ev and "error" in ev:
        lines.append(f"  vs truth: not compared ({' '.join(str(ev['error']).split())})")
    elif ev:
        for fid, e in ev["fields"].items():
            lines.append(
                f"  vs truth {fid} ({len(e['sample_epochs'])} epochs): recall {e['recall']:.3f} "
                f"(stars < i={ev['mag_limit']:.2f}), "
                f"precision {e['precision']:.3f}, F1 {e['f1']:.3f}; zero point - truth rms "
                f"{_fmt(e['zp_minus_truth_rms'], '.4f')} mag (max {_fmt(e['zp_minus_truth_max_abs'], '.4f')}); "
                f"|mag - true| median {e['mag_abs_err_median']:.4f} and astrometry rms {e['astrom_rms_px']:.3f} px "
                f"for stars < i={ev['mag_limit'] - 3:.2f}")
    if run["failures"]:
        lines.append(f"  FAILED units: {len(run['failures'])}, quarantined after their retries (details in run.json); "
                     "fix the input and re-run the same command to retry them:")
        for f in run["failures"]:
            where = ", ".join(f"{k} {v}" for k, v in f.items() if k in ("field", "epoch", "region"))
            tries = f" ({f['attempts']} attempts)" if f.get("attempts", 1) > 1 else ""
            error = " ".join(str(f["error"]).split())  # one line, whatever the library's message looked like
            lines.append(f"    {f['stage']} {where}{tries}: {error}")
    return lines
