"""The empirical PSF (:mod:`survey_proc.photometry.epsf`) against truth and against PSFEx.

    python -m benchmarks.epsf [--out DIR] [--parts sim,decam] [--quick]

(a) ``sim``: simulated fields (the simulator's own renderer and true effective PSF: Moffat
beta 3 and Kolmogorov, FWHM 1.2 / 2.5 / 6 px; bright stars (S/N 100-2000) or moderate ones
(S/N 50-300), Poisson + read noise, 100 stars on a jittered grid, detector-like positions
(true + 0.05 px noise) and fluxes (+-20 %)). Per case: the ePSF's max and rms
``|ePSF - true| / peak`` per pixel over a 15 x 15 stamp at 4 sub-pixel phases; then the
fluxes of the stars brighter than the median, fitted by weighted linear least squares at the
true positions on stamps of radius max(7, 3 FWHM) with four PSF models: the ePSF, the true
PSF, the current analytic model of ``psffit`` (pixel-integrated Moffat beta 3 of the true
FWHM) and photutils' ``EPSFBuilder`` PSF (oversampling 4, its defaults, built from the same
stars' stamps); bias (median of F_fit / F - 1) and RMS/CRLB (the Cramér-Rao bound of each
star's flux with the true PSF, :mod:`survey_proc.photometry.crlb`).

(b) ``decam``: the legacypipe DECam cutouts (``../shared/data/real/legacypipe_decam``,
100 x 100 px, one exposure each): sep detections on the sep background, the ePSF built from
each cutout's stars (``min_stars`` 3, constant: a 100 px cutout has only a handful of
bright isolated stars), compared with the PSFEx model shipped with the exposure (its
polynomial evaluated at the cutout centre in the cutout's own pixel coordinates; the
constant term is reported too), both centred by a fitted sub-pixel shift and normalised
over the 63 x 63 PSFEx stamp: max and rms difference per pixel / peak, FWHM of each.

Outputs: ``OUT/epsf.json`` and ``OUT/epsf.md``.
"""

from __future__ import annotations

import argparse
import glob
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage, optimize

from survey_proc.photometry.crlb import fisher_matrix
from survey_proc.photometry.epsf import build_epsf, measure_fwhm
from survey_proc.photometry.psffit import moffat_alpha, moffat_pixel

REAL = Path(__file__).resolve().parents[1].parent / "shared/data/real/legacypipe_decam"
SKY, GAIN, RN, K_TRUE = 200.0, 2.0, 5.0, 11


def simulate(profile: str, fwhm: float, n: int, snr: tuple[float, float], seed: int) -> dict[str, Any]:
    from survey_proc.simulate.psf import build_bank
    from survey_proc.simulate.stamps import render_stars

    rng = np.random.default_rng(seed)
    sp = max(14, int(np.ceil(7 * fwhm)))
    g = int(np.ceil(np.sqrt(n)))
    size = sp * g + 2 * sp
    xx, yy = np.meshgrid(np.arange(g) * sp + 1.5 * sp, np.arange(g) * sp + 1.5 * sp)
    x = xx.ravel()[:n] + rng.uniform(-0.15, 0.15, n) * sp
    y = yy.ravel()[:n] + rng.uniform(-0.15, 0.15, n) * sp
    sig2 = SKY / GAIN + (RN / GAIN) ** 2
    sigp = np.sqrt((fwhm / 2.355) ** 2 + 1 / 12)
    s = np.exp(rng.uniform(np.log(snr[0]), np.log(snr[1]), n))
    flux = (s**2 / GAIN + np.sqrt(s**4 / GAIN**2 + 4 * s**2 * sig2 * 4 * np.pi * sigp**2)) / 2
    img = render_stars((size, size), x, y, flux, build_bank(profile, fwhm), np.sqrt(sig2))
    noisy = rng.poisson(np.clip(img + SKY, 0, None) * GAIN) / GAIN + rng.normal(0, RN / GAIN, img.shape)
    return {"img": noisy, "x": x, "y": y, "flux": flux, "noise": float(np.sqrt(sig2))}


def _lsq(img: np.ndarray, x: np.ndarray, y: np.ndarray, r: int, p: np.ndarray) -> np.ndarray:
    j = np.arange(-r, r + 1)
    ix, iy = np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int)
    d = img[iy[:, None, None] + j[None, :, None], ix[:, None, None] + j[None, None, :]] - SKY
    w = 1.0 / (RN**2 / GAIN**2 + (np.clip(d, 0, None) + SKY) / GAIN)
    return (w * p * d).sum((1, 2)) / (w * p * p).sum((1, 2))


def _photutils_psf(img: np.ndarray, x: np.ndarray, y: np.ndarray, r: int) -> Any:
    from astropy.nddata import NDData
    from astropy.table import Table
    from photutils.psf import EPSFBuilder, extract_stars

    stars = extract_stars(NDData(img - SKY), Table({"x": x, "y": y}), size=2 * r + 1)
    epsf, _ = EPSFBuilder(oversampling=4, maxiters=10, progress_bar=False)(stars)
    return epsf


def sim_case(profile: str, fwhm: float, snr: tuple[float, float], seed: int = 1, n: int = 100) -> dict[str, Any]:
    from survey_proc.simulate.psf import effective_psf

    f = simulate(profile, fwhm, n, snr, seed)
    img, x, y, flux = f["img"], f["x"], f["y"], f["flux"]
    rng = np.random.default_rng(seed + 100)
    t = time.perf_counter()
    psf = build_epsf(img, None, SKY, f["noise"], x + rng.normal(0, 0.05, n), y + rng.normal(0, 0.05, n),
                     flux * rng.uniform(0.8, 1.2, n), fwhm, None, gain_e_per_adu=GAIN)
    t_build = time.perf_counter() - t
    true = effective_psf(profile, fwhm, oversample=K_TRUE, radius_px=40)
    c = (true.shape[0] - 1) // 2

    def true_fn(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        u, v = np.broadcast_arrays(np.asarray(u, float), np.asarray(v, float))
        return ndimage.map_coordinates(true, [v * K_TRUE + c, u * K_TRUE + c], order=3)

    j = np.arange(-7, 8)
    dmax, drms = 0.0, []
    for px, py in [(0, 0), (3, -5), (5, 5), (-4, 2)]:
        tru = true[c + K_TRUE * j[:, None] - py, c + K_TRUE * j[None, :] - px]
        diff = (psf.stamp(7, px / K_TRUE, py / K_TRUE) - tru) / tru.max()
        dmax = max(dmax, float(np.abs(diff).max()))
        drms.append(float(np.sqrt((diff**2).mean())))
    r = max(7, int(np.ceil(3 * fwhm)))
    jr = np.arange(-r, r + 1)
    ix, iy = np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int)
    du = ix[:, None, None] + jr[None, None, :] - x[:, None, None]
    dv = iy[:, None, None] + jr[None, :, None] - y[:, None, None]
    models = {"epsf": psf.evaluate(du, dv, x, y), "true": true_fn(du, dv),
              "moffat3": moffat_pixel(du, dv, moffat_alpha(fwhm, 3.0), 3.0)}
    try:
        ep = _photutils_psf(img, x, y, r)
        models["photutils_epsf"] = np.stack([ep.evaluate(du[k] + x[k], dv[k] + y[k], 1.0, x[k], y[k])
                                             for k in range(n)])
    except Exception as e:
        print("photutils EPSFBuilder failed:", e)
    bright = flux > np.median(flux)
    sig = np.empty(n)
    for k in range(n):
        def psf_k(ox: float, oy: float, k: int = k) -> np.ndarray:
            return true_fn(jr[None, :] + ix[k] - x[k] - ox, jr[:, None] + iy[k] - y[k] - oy)

        info = fisher_matrix(psf_k, float(flux[k]), 0.0, 0.0, SKY, GAIN, RN)
        sig[k] = np.sqrt(np.linalg.inv(info)[0, 0])
    out: dict[str, Any] = {"profile": profile, "fwhm_px": fwhm, "snr": list(snr), "n_stars": n,
                           "n_used": psf.meta["n_used"], "order": psf.order, "build_s": round(t_build, 2),
                           "max_diff_over_peak": dmax, "rms_diff_over_peak": float(np.mean(drms)),
                           "fwhm_epsf": psf.fwhm_px, "fwhm_true": measure_fwhm(true_fn, fwhm), "flux": {}}
    for name, p in models.items():
        fit = _lsq(img, x, y, r, p)
        out["flux"][name] = {"bias": float(np.median(fit[bright] / flux[bright] - 1)),
                             "rms_over_crlb": float(np.sqrt(np.mean(((fit[bright] - flux[bright])
                                                                      / sig[bright]) ** 2))),
                             "rms_over_crlb_bias_removed": float(np.std((fit[bright] - flux[bright]) / sig[bright]))}
    return out


def _psfex(path: str, x: float, y: float) -> tuple[np.ndarray, np.ndarray, float]:
    from astropy.io import fits

    t = fits.getdata(path, 1)
    comp = np.asarray(t["psf_mask"][0], float)
    dx = (x - float(t["polzero1"][0])) / float(t["polscal1"][0])
    dy = (y - float(t["polzero2"][0])) / float(t["polscal2"][0])
    terms = [1.0, dx, dx * dx, dy, dx * dy, dy * dy]  # PSFEx order for degree 2: x^i y^j, i fastest
    psf = sum(c * tm for c, tm in zip(comp, terms, strict=True))
    return np.asarray(psf), comp[0], float(t["psf_fwhm"][0])


def _compare(a: np.ndarray, model: Any) -> dict[str, float]:
    """a: PSFEx stamp (centre pixel (S-1)/2); model(dx, dy) -> stamp of the same size; best sub-pixel shift."""
    a = np.clip(a, 0, None) / np.clip(a, 0, None).sum()

    def diff(s: np.ndarray) -> np.ndarray:
        b = model(s[0], s[1])
        return a - b / b.sum()

    sol = optimize.least_squares(lambda s: diff(s).ravel(), [0.0, 0.0], bounds=([-1, -1], [1, 1]))
    d = diff(sol.x) / a.max()
    d0 = diff(np.zeros(2)) / a.max()
    return {"max": float(np.abs(d).max()), "rms_core": float(np.sqrt((d[a > 0.01 * a.max()] ** 2).mean())),
            "max_unshifted": float(np.abs(d0).max()), "shift_x": float(sol.x[0]), "shift_y": float(sol.x[1])}


def _psfex_injected(pe: np.ndarray, fwhm: float, rms: float, gain: float, n: int = 49, seed: int = 3) -> Any:
    """ePSF built from n stars rendered with the PSFEx stamp (cubic-spline shifted) in noise of the cutout's level."""
    rng = np.random.default_rng(seed)
    half = pe.shape[0] // 2
    p = np.clip(pe, 0, None) / np.clip(pe, 0, None).sum()
    sp = int(max(2 * half + 2, np.ceil(8 * fwhm)))
    g = int(np.ceil(np.sqrt(n)))
    size = sp * (g + 1)
    img = np.zeros((size, size))
    xs, ys, fs = [], [], []
    for k in range(n):
        cx, cy = sp * (1 + k % g), sp * (1 + k // g)
        dx, dy = rng.uniform(-0.5, 0.5, 2)
        snr = np.exp(rng.uniform(np.log(100), np.log(1000)))
        n_eff = 1.0 / (p**2).sum()
        f = (snr**2 / gain + np.sqrt(snr**4 / gain**2 + 4 * snr**2 * rms**2 * n_eff)) / 2
        img[cy - half:cy + half + 1, cx - half:cx + half + 1] += f * ndimage.shift(p, (dy, dx), order=3)
        xs.append(cx + dx)
        ys.append(cy + dy)
        fs.append(f)
    noisy = img + rng.normal(0, 1, img.shape) * np.sqrt(rms**2 + np.clip(img, 0, None) / gain)
    return build_epsf(noisy, None, 0.0, rms, np.array(xs), np.array(ys), np.array(fs), fwhm, None,
                      gain_e_per_adu=gain, order=0)


def _grid_fn(pe: np.ndarray) -> Any:
    half = pe.shape[0] // 2
    return lambda u, v: ndimage.map_coordinates(pe, [np.asarray(v) + half, np.asarray(u) + half], order=3)


def _stamp_fn(psf: Any, jj: np.ndarray) -> Any:
    return lambda dx, dy: psf.evaluate(jj[None, :] - dx, jj[:, None] - dy)


def decam() -> list[dict[str, Any]]:
    import sep
    from astropy.io import fits

    out = []
    for p in sorted(glob.glob(str(REAL / "images/*_ooi_*.fits"))):
        name = Path(p).name.split(".fits")[0]
        with fits.open(p) as h:
            img = np.asarray(h[1].data, np.float64)
            hd = h[1].header
        ood = np.asarray(fits.getdata(p.replace("_ooi_", "_ood_"), 1))
        bad = (ood != 0) | ~np.isfinite(img)
        bkg = sep.Background(np.ascontiguousarray(np.where(bad, 0.0, img)), mask=bad, bw=32, bh=32)
        data = img - bkg.back()
        objs = sep.extract(np.ascontiguousarray(np.where(bad, 0.0, data)), 3.0, err=bkg.globalrms, mask=bad)
        psfex_path = str(REAL / "psfex" / (Path(p).name.split(".")[0] + "-psfex.fits"))
        ny, nx = img.shape
        pe, pe0, pe_fwhm = _psfex(psfex_path, (nx + 1) / 2.0, (ny + 1) / 2.0)
        rec: dict[str, Any] = {"exposure": name, "detections": len(objs), "psfex_fwhm_px": pe_fwhm}
        try:
            psf = build_epsf(img, bad, bkg.back(), bkg.globalrms, objs["x"], objs["y"], objs["flux"],
                             pe_fwhm, float(hd["SATURATA"]), gain_e_per_adu=float(hd["GAINA"]), min_stars=3,
                             order=0)
        except ValueError as e:
            rec["error"] = str(e)
            print(name, "no ePSF from the cutout's own stars:", e)
            # what can honestly be measured: the builder on stars rendered with this exposure's PSFEx
            # model (a real DECam PSF shape) into noise of this cutout's level (background rms, gain)
            psf = None
        half = pe.shape[0] // 2
        jj = np.arange(-half, half + 1, dtype=float)
        pe_fwhm_meas = measure_fwhm(_grid_fn(pe), pe_fwhm)
        rec["psfex_fwhm_measured_px"] = pe_fwhm_meas
        src = "cutout"
        if psf is None:
            src = "psfex_injected"
            psf = _psfex_injected(pe, pe_fwhm, float(bkg.globalrms), float(hd["GAINA"]))
        rec.update({"epsf_from": src, "n_used": psf.meta["n_used"], "epsf_fwhm_px": psf.fwhm_px})
        rec["vs_psfex"] = _compare(pe, _stamp_fn(psf, jj))
        rec["vs_psfex_constant_term"] = _compare(pe0, _stamp_fn(psf, jj))
        out.append(rec)
        print(name, json.dumps(rec)[:400], flush=True)
    return out


def markdown(res: dict[str, Any]) -> str:
    lines = []
    if "sim" in res:
        lines += ["### ePSF against the simulator's true PSF", "",
                  "| profile | FWHM | S/N | stars used | order | build s | max / peak | rms / peak | FWHM ePSF / true |"
                  " bias ePSF | bias true | bias Moffat3 | bias photutils |"
                  " RMS/CRLB ePSF | true | Moffat3 | photutils |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["sim"]:
            fl = r["flux"]
            pu = fl.get("photutils_epsf", {"bias": float("nan"), "rms_over_crlb": float("nan")})
            lines.append(
                f"| {r['profile']} | {r['fwhm_px']} | {r['snr'][0]:g}-{r['snr'][1]:g} | {r['n_used']} | {r['order']} "
                f"| {r['build_s']:.1f} | {r['max_diff_over_peak']:.4f} | {r['rms_diff_over_peak']:.4f} "
                f"| {r['fwhm_epsf']:.3f} / {r['fwhm_true']:.3f} | {fl['epsf']['bias']:+.4f} "
                f"| {fl['true']['bias']:+.4f} "
                f"| {fl['moffat3']['bias']:+.4f} | {pu['bias']:+.4f} | {fl['epsf']['rms_over_crlb']:.2f} "
                f"| {fl['true']['rms_over_crlb']:.2f} | {fl['moffat3']['rms_over_crlb']:.2f} "
                f"| {pu['rms_over_crlb']:.2f} |")
    if "decam" in res:
        lines += ["", "### DECam cutouts: ePSF against the exposure's PSFEx model", "",
                  "| exposure | detections | ePSF from | stars | FWHM ePSF | FWHM PSFEx (measured / header) |"
                  " max / peak | rms / peak (core) | max / peak, no shift | vs constant term max |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["decam"]:
            v = r["vs_psfex"]
            lines.append(f"| {r['exposure']} | {r['detections']} | {r['epsf_from']} | {r['n_used']} | "
                         f"{r['epsf_fwhm_px']:.2f} | {r['psfex_fwhm_measured_px']:.2f} / {r['psfex_fwhm_px']:.2f} | "
                         f"{v['max']:.3f} | {v['rms_core']:.4f} | {v['max_unshifted']:.3f} | "
                         f"{r['vs_psfex_constant_term']['max']:.3f} |")
            if "error" in r:
                lines.append(f"|  | cutout's own stars: {r['error'][:200]} | | | | | | | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/epsf"))
    ap.add_argument("--parts", default="sim,decam")
    ap.add_argument("--quick", action="store_true", help="one simulated case per FWHM, bright stars only")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {}
    parts = a.parts.split(",")
    if "sim" in parts:
        res["sim"] = []
        snrs = [(100.0, 2000.0)] if a.quick else [(100.0, 2000.0), (50.0, 300.0)]
        for profile in ("moffat", "kolmogorov"):
            for fwhm in (1.2, 2.5, 6.0):
                for snr in snrs:
                    r = sim_case(profile, fwhm, snr)
                    print(json.dumps(r), flush=True)
                    res["sim"].append(r)
    if "decam" in parts:
        res["decam"] = decam()
    (a.out / "epsf.json").write_text(json.dumps(res, indent=1))
    (a.out / "epsf.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
