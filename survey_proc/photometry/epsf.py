"""An empirical PSF per epoch (block): built from the image's own stars, DAOPHOT-style.

Model
-----
The *pixel-integrated* PSF ``P(du, dv; x, y)`` (the fraction of a unit-flux star's light
falling in a pixel whose centre is ``(du, dv)`` px from the star at ``(x, y)``) is

    P = A(du, dv) + sum_t c_t(x, y) R_t(du, dv)

- ``A``: a circular Moffat (``alpha``, ``beta`` fitted to all stars at once) integrated
  over the square pixel by Gauss-Legendre quadrature; unit integral. It carries the bulk of
  the profile and the far wings beyond the residual table.
- ``R_t``: residual tables (cubic B-spline coefficients on a grid oversampled ``K`` times,
  ``K`` = 1-4 chosen from the FWHM so an undersampled PSF gets ``K`` = 3-4), each with zero
  integral and zero first moments (so the model has unit integral and its centroid is the
  star's position: the centre convention is the centroid). ``c_t`` is a polynomial in the
  normalised field position: order 0, 1 or 2 (1, 3 or 6 tables), chosen from the number of
  stars (< 12: constant, < 30: linear) unless given.

Building (:func:`build_epsf`): select bright (S/N >= 50), isolated (no neighbour brighter
than 5 % of the star within 3 FWHM), unsaturated stars whose stamp (radius 4 FWHM, >= 6 px)
lies in the image; then (1) alternate per-star Gauss-Newton steps of (flux, x, y) with a
fit of the analytic part to the 25 brightest stars at once (fluxes profiled out): a core
Moffat plus a wider Moffat "wing" (its alpha <= 3 x the core's, beta >= 1.6, so its light
stays where the stamps see it: Kolmogorov-like seeing has ~1 % of its light beyond 3 FWHM,
which a single Moffat fitted to the core misses, -1.3 to -1.8 % in flux, measured);
(2) alternate a regularised weighted least-squares fit of the residual tables to every
star's pixel residuals ``(data - F A) / F`` at their sub-pixel offsets (second-difference
smoothing, 10x weaker for the spatial terms; the moment constraints exactly, by Lagrange
multipliers) with per-star Gauss-Newton steps of (flux, x, y) on the full model, dropping
stars whose fit is poor (chi^2 per pixel > 3x the median and 5 robust sigma above it:
unseen neighbours, cosmics, binaries). Weights ``1 / (noise^2 + model / gain)``.
Neighbours: every other detection near a PSF star is subtracted (the current analytic model
at its position and flux, refined for PSF stars) before each fit, and pixels where a
neighbour's rough model exceeds 2 % of the star's own (and 0.2 sigma) are left out; without
the subtraction their faint wings, summed over many stars, were fitted as a spurious wide
wing (+0.5 to +1.4 % in flux at FWHM 6 px, measured).

The caller may keep detections out of the PSF stars (``psf_candidate``: the pipeline leaves
out the detector's extended sources, galaxies and unresolved blends); they still count as
neighbours (the isolation test, the subtraction).

Evaluation (:meth:`EmpiricalPSF.evaluate`, :meth:`EmpiricalPSF.gradient`): the constant part
``A + R_0`` (and its exact derivatives) is tabulated once on a finer grid (``K_e`` samples
per pixel, ``K_e`` about 4 / sigma of the pixel-integrated PSF) and interpolated with cubic
B-splines (``scipy.ndimage.map_coordinates``, C code); the spatial terms (a few % of the
peak) bilinearly. Beyond the table the Moffat sampled at the pixel centre. 10^4 stamps of
15 x 15: ~0.3 s for the values, ~0.6 s more for the two derivatives (2 CPU cores). The
fitters' stamps, whose pixels all share their star's sub-pixel phase, come faster from
tables per phase (:meth:`EmpiricalPSF.stamp_values`: 24x, within 4.2e-4 of the peak).

Why not photutils' EPSFBuilder as is: measured in this repository (issue 21), its default
(oversampling 4, quartic smoothing kernel, a table of the whole PSF) gave sub-pixel-phase
flux errors of +-0.05-0.1 mag on an undersampled PSF (FWHM ~1.7 px); a table of the whole
profile must be smoothed to be filled from few samples per phase, and that smoothing
broadens a sharp core. With the analytic Moffat carrying the core, the table only holds a
residual of a few % of the peak, so its smoothing and interpolation errors are a few % of
a few %. This is the DAOPHOT (Stetson 1987) construction. ``benchmarks/epsf.py`` measures
both against the simulator's true PSF (the figures are in its output and the issue).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage, sparse
from scipy.optimize import least_squares
from scipy.sparse.linalg import spsolve
from scipy.spatial import cKDTree

__all__ = ["EmpiricalPSF", "build_epsf", "measure_fwhm", "moffat_pixel_gl"]

_MAX_ORDER = 2
#: Sub-pixel phases per pixel of :meth:`EmpiricalPSF.stamp_values`' tables (32: 4.2e-4 of the peak, measured).
PHASE_STEPS = 32


# ---------------------------------------------------------------------------------------------- analytic part
@functools.lru_cache(maxsize=16)
def _gl(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and weights on [-0.5, 0.5] (cached: half the cost of a build was ``leggauss``)."""
    t, w = np.polynomial.legendre.leggauss(n)
    t, w = 0.5 * t, 0.5 * w
    t.flags.writeable = False
    w.flags.writeable = False
    return t, w


def moffat_pixel_gl(du: np.ndarray, dv: np.ndarray, alpha: float, beta: float, n_gl: int = 4,
                    grad: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit-integral circular Moffat integrated over pixels centred at ``(du, dv)`` (Gauss-Legendre).

    Parameters
    ----------
    du, dv
        Pixel-centre offsets from the star (px), broadcastable.
    alpha, beta
        The Moffat (alpha in px).
    n_gl
        Quadrature points per axis.
    grad
        Also return the derivatives with respect to ``du`` and ``dv`` (else zeros).

    Returns
    -------
    p, dp_du, dp_dv
        Pixel fractions and their derivatives (per px).
    """
    du, dv = np.broadcast_arrays(np.asarray(du, float), np.asarray(dv, float))
    t, w = _gl(n_gl)
    a2 = alpha * alpha
    norm = (beta - 1.0) / (np.pi * a2)
    p = np.zeros(du.shape)
    gu = np.zeros(du.shape) if grad else p
    gv = np.zeros(du.shape) if grad else p
    for ty, wy in zip(t, w, strict=True):
        v = dv + ty
        for tx, wx in zip(t, w, strict=True):
            u = du + tx
            q = 1.0 + (u * u + v * v) / a2
            m = np.exp(-beta * np.log(q))  # q ** -beta, 2x faster (the build's inner loop)
            p += (wx * wy) * m
            if grad:
                dm = (wx * wy) * m / q
                gu += u * dm
                gv += v * dm
    if grad:
        k = -2.0 * beta / a2 * norm
        return p * norm, gu * k, gv * k
    z = np.zeros(0)
    return p * norm, z, z


def _moffat_point(du: np.ndarray, dv: np.ndarray, alpha: float, beta: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a2 = alpha * alpha
    q = 1.0 + (du * du + dv * dv) / a2
    norm = (beta - 1.0) / (np.pi * a2)
    m = norm * q ** (-beta)
    k = -2.0 * beta / a2 * m / q
    return m, k * du, k * dv


def _analytic(du: np.ndarray, dv: np.ndarray, comps: list[tuple[float, float, float]], n_gl: int,
              grad: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum of weighted pixel-integrated Moffats ``[(weight, alpha, beta), ...]`` (and derivatives)."""
    p = gu = gv = None
    for wt, a, b in comps:
        if wt == 0.0:
            continue
        q, qu, qv = moffat_pixel_gl(du, dv, a, b, n_gl, grad)
        p = wt * q if p is None else p + wt * q
        if grad:
            gu = wt * qu if gu is None else gu + wt * qu
            gv = wt * qv if gv is None else gv + wt * qv
    assert p is not None
    z = np.zeros(0)
    return p, (gu if gu is not None else z), (gv if gv is not None else z)


def _alpha_from_fwhm(fwhm: float, beta: float) -> float:
    return fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))


# ----------------------------------------------------------------------------------------------- B-splines
def _bspline_weights(q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cubic B-spline taps: first index ``floor(q) - 1``, weights and derivatives (4 along the last axis)."""
    iq = np.floor(q)
    f = q - iq
    f2, f3 = f * f, f * f * f
    w = np.stack([(1 - f) ** 3 / 6, (3 * f3 - 6 * f2 + 4) / 6, (-3 * f3 + 3 * f2 + 3 * f + 1) / 6, f3 / 6], -1)
    d = np.stack([-((1 - f) ** 2) / 2, (3 * f2 - 4 * f) / 2, (-3 * f2 + 2 * f + 1) / 2, f2 / 2], -1)
    return iq.astype(np.int64) - 1, w, d


def _bspline_matrix(q: np.ndarray, n: int, deriv: bool = False) -> np.ndarray:
    """Dense (len(q), n) matrix evaluating a 1-D cubic B-spline of n coefficients at q (taps off the grid dropped)."""
    i0, w, d = _bspline_weights(q)
    out = np.zeros((len(q), n))
    vals = d if deriv else w
    for a in range(4):
        idx = i0 + a
        ok = (idx >= 0) & (idx < n)
        out[np.flatnonzero(ok), idx[ok]] += vals[ok, a]
    return out


def _poly_basis(xn: np.ndarray, yn: np.ndarray, order: int) -> np.ndarray:
    """Spatial polynomial terms (..., T): 1; x, y; x^2, xy, y^2 (normalised coordinates)."""
    terms = [np.ones_like(xn)]
    if order >= 1:
        terms += [xn, yn]
    if order >= 2:
        terms += [xn * xn, xn * yn, yn * yn]
    return np.stack(terms, -1)


# ------------------------------------------------------------------------------------------------ the model
@dataclass
class _Tables:
    k: int
    c: int
    c0: np.ndarray  # spline coefficients of A + R_0
    g0u: np.ndarray  # spline coefficients of d(A + R_0)/du
    g0v: np.ndarray
    var: np.ndarray  # (T-1, M, M) raw values of R_t, t >= 1
    varu: np.ndarray
    varv: np.ndarray


@dataclass
class EmpiricalPSF:
    """A pixel-integrated empirical PSF varying across the field (see the module docstring).

    Attributes
    ----------
    alpha, beta
        The analytic Moffat (alpha in px).
    oversample
        ``K``: residual-grid nodes per pixel (under 1 for wide PSFs).
    resid_radius_px
        The residual tables cover ``|du|, |dv| <= resid_radius_px`` (their grid has 2 px more).
    resid
        (T, M, M) cubic B-spline coefficients of the residual tables, ``M = 2 ceil(K (r + 2)) + 1``.
    order
        Spatial polynomial order (0, 1, 2); ``T`` = 1, 3, 6.
    x_centre, y_centre, x_scale, y_scale
        Normalisation of field positions (px): ``xn = (x - x_centre) / x_scale``.
    eval_oversample
        Samples per pixel of the evaluation table.
    table_radius_px
        The evaluation table covers ``|du|, |dv| <= table_radius_px``; the Moffat beyond.
    n_gl
        Gauss-Legendre points per axis of the Moffat's pixel integral.
    wing_frac, wing_alpha, wing_beta
        A second, wide Moffat carrying ``wing_frac`` of the light (the core has ``1 - wing_frac``).
    meta
        How it was built (JSON-able): stars used, chi^2, inputs.
    """

    alpha: float
    beta: float
    oversample: float
    resid_radius_px: int
    resid: np.ndarray
    order: int = 0
    x_centre: float = 0.0
    y_centre: float = 0.0
    x_scale: float = 1.0
    y_scale: float = 1.0
    eval_oversample: int = 4
    table_radius_px: int = 8
    n_gl: int = 6
    wing_frac: float = 0.0
    wing_alpha: float = 1.0
    wing_beta: float = 2.0
    meta: dict[str, Any] = field(default_factory=dict)
    _tab: _Tables | None = field(default=None, init=False, repr=False, compare=False)
    _phase: tuple[int, np.ndarray] | None = field(default=None, init=False, repr=False, compare=False)
    _phase_demand: int = field(default=0, init=False, repr=False, compare=False)

    # ----------------------------------------------------------------------------------- persistence
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tab"] = None  # rebuilt on first use: keeps pickles small
        state["_phase"] = None
        state["_phase_demand"] = 0
        return state

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (floats and lists), for storing per epoch.

        Returns
        -------
        dict
            Everything :meth:`from_dict` needs.
        """
        return {"kind": "survey_proc.epsf", "version": 1, "alpha": float(self.alpha), "beta": float(self.beta),
                "oversample": float(self.oversample), "resid_radius_px": int(self.resid_radius_px),
                "resid": np.asarray(self.resid, float).tolist(), "order": int(self.order),
                "x_centre": float(self.x_centre), "y_centre": float(self.y_centre),
                "x_scale": float(self.x_scale), "y_scale": float(self.y_scale),
                "eval_oversample": int(self.eval_oversample), "table_radius_px": int(self.table_radius_px),
                "n_gl": int(self.n_gl), "wing_frac": float(self.wing_frac), "wing_alpha": float(self.wing_alpha),
                "wing_beta": float(self.wing_beta), "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EmpiricalPSF:
        """The model from :meth:`to_dict`'s output.

        Parameters
        ----------
        d
            The dictionary.

        Returns
        -------
        EmpiricalPSF
        """
        if d.get("kind") != "survey_proc.epsf" or d.get("version") != 1:
            raise ValueError("not an empirical-PSF dictionary of version 1 (made by EmpiricalPSF.to_dict)")
        return cls(alpha=float(d["alpha"]), beta=float(d["beta"]), oversample=float(d["oversample"]),
                   resid_radius_px=int(d["resid_radius_px"]), resid=np.asarray(d["resid"], float),
                   order=int(d["order"]), x_centre=float(d["x_centre"]), y_centre=float(d["y_centre"]),
                   x_scale=float(d["x_scale"]), y_scale=float(d["y_scale"]),
                   eval_oversample=int(d["eval_oversample"]), table_radius_px=int(d["table_radius_px"]),
                   n_gl=int(d["n_gl"]), wing_frac=float(d.get("wing_frac", 0.0)),
                   wing_alpha=float(d.get("wing_alpha", 1.0)), wing_beta=float(d.get("wing_beta", 2.0)),
                   meta=dict(d.get("meta", {})))

    @property
    def components(self) -> list[tuple[float, float, float]]:
        """The analytic part: ``[(weight, alpha, beta), ...]`` of unit-integral Moffats.

        Returns
        -------
        list of tuple
        """
        return [(1.0 - self.wing_frac, self.alpha, self.beta), (self.wing_frac, self.wing_alpha, self.wing_beta)]

    # ------------------------------------------------------------------------------------------ tables
    def _tables(self) -> _Tables:
        if self._tab is not None:
            return self._tab
        k = int(self.eval_oversample)
        c = k * (int(self.table_radius_px) + 2)
        u = (np.arange(2 * c + 1) - c) / k
        uu, vv = np.meshgrid(u, u)
        a, au, av = _analytic(uu, vv, self.components, self.n_gl, grad=True)
        kb = float(self.oversample)
        mb = self.resid.shape[-1]
        cb = (mb - 1) // 2
        q = u * kb + cb
        w = _bspline_matrix(q, mb)
        dw = _bspline_matrix(q, mb, deriv=True) * kb
        res = np.einsum("im,tmn,jn->tij", w, self.resid, w)
        resu = np.einsum("im,tmn,jn->tij", w, self.resid, dw)
        resv = np.einsum("im,tmn,jn->tij", dw, self.resid, w)
        t0, t0u, t0v = a + res[0], au + resu[0], av + resv[0]
        self._tab = _Tables(k, c, ndimage.spline_filter(t0, order=3), ndimage.spline_filter(t0u, order=3),
                            ndimage.spline_filter(t0v, order=3), res[1:], resu[1:], resv[1:])
        return self._tab

    def _coeffs(self, x0: Any, y0: Any, shape: tuple[int, ...]) -> np.ndarray | None:
        if self.order == 0 or x0 is None or y0 is None:
            return None
        x0a, y0a = np.asarray(x0, float), np.asarray(y0, float)
        if x0a.ndim == 1 and len(shape) > 1 and x0a.shape[0] == shape[0]:
            x0a = x0a.reshape((-1,) + (1,) * (len(shape) - 1))
            y0a = y0a.reshape((-1,) + (1,) * (len(shape) - 1))
        xn = (np.broadcast_to(x0a, shape) - self.x_centre) / self.x_scale
        yn = (np.broadcast_to(y0a, shape) - self.y_centre) / self.y_scale
        return _poly_basis(xn, yn, self.order)[..., 1:]

    def _eval(self, du: Any, dv: Any, x0: Any, y0: Any, which: tuple[str, ...]) -> list[np.ndarray]:
        du, dv = np.broadcast_arrays(np.asarray(du, float), np.asarray(dv, float))
        shape = du.shape
        tab = self._tables()
        r = float(self.table_radius_px)
        inside = (np.abs(du) <= r) & (np.abs(dv) <= r)
        ii = np.flatnonzero(inside.ravel())
        oo = np.flatnonzero(~inside.ravel())
        coords = np.stack([dv.ravel()[ii] * tab.k + tab.c, du.ravel()[ii] * tab.k + tab.c])
        coef = self._coeffs(x0, y0, shape)
        cf = coef.reshape(-1, coef.shape[-1])[ii] if coef is not None else None
        tail = None
        if len(oo):
            parts = [_moffat_point(du.ravel()[oo], dv.ravel()[oo], a, b) for _, a, b in self.components]
            tail = tuple(sum(wt * pt[m] for (wt, _, _), pt in zip(self.components, parts, strict=True))
                         for m in range(3))
        out = []
        for j, name in enumerate(("p", "u", "v")):
            if name not in which:
                continue
            spl = (tab.c0, tab.g0u, tab.g0v)[j]
            var = (tab.var, tab.varu, tab.varv)[j]
            res = np.empty(du.size)
            val = ndimage.map_coordinates(spl, coords, order=3, prefilter=False, mode="nearest")
            if cf is not None:
                for t in range(cf.shape[1]):
                    val += cf[:, t] * ndimage.map_coordinates(var[t], coords, order=1, mode="nearest")
            res[ii] = val
            if tail is not None:
                res[oo] = tail[j]
            out.append(res.reshape(shape))
        return out

    # -------------------------------------------------------------------------------------------- public
    def evaluate(self, du: Any, dv: Any, x0: Any = None, y0: Any = None) -> np.ndarray:
        """Fraction of a unit-flux star's light in pixels centred ``(du, dv)`` px from the star.

        Parameters
        ----------
        du, dv
            Pixel-centre offsets from the star (px), broadcastable arrays (e.g. (N, S, S)).
        x0, y0
            The stars' field positions (px) for the spatial variation: scalars, arrays
            broadcastable with ``du``, or length-N vectors taken along ``du``'s first axis.
            None: the PSF at the field centre.

        Returns
        -------
        ndarray
            Pixel fractions, the broadcast shape.
        """
        return self._eval(du, dv, x0, y0, ("p",))[0]

    def gradient(self, du: Any, dv: Any, x0: Any = None, y0: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Derivatives of :meth:`evaluate` with respect to ``du`` and ``dv`` (per px).

        A star's position derivative is minus these (``du = x_pixel - x_star``).

        Parameters
        ----------
        du, dv, x0, y0
            As :meth:`evaluate`.

        Returns
        -------
        d_du, d_dv
            The derivatives, the broadcast shape.
        """
        gu, gv = self._eval(du, dv, x0, y0, ("u", "v"))
        return gu, gv

    def evaluate_with_gradient(self, du: Any, dv: Any, x0: Any = None, y0: Any = None
                               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`evaluate` and :meth:`gradient` at once.

        Parameters
        ----------
        du, dv, x0, y0
            As :meth:`evaluate`.

        Returns
        -------
        p, d_du, d_dv
        """
        p, gu, gv = self._eval(du, dv, x0, y0, ("p", "u", "v"))
        return p, gu, gv

    def fwhm_at(self, x0: float | None = None, y0: float | None = None) -> float:
        """FWHM (px) of the pixel-integrated PSF at a field position (see :func:`measure_fwhm`).

        Parameters
        ----------
        x0, y0
            Field position (px); None: the field centre.

        Returns
        -------
        float
        """
        return measure_fwhm(lambda u, v: self.evaluate(u, v, x0, y0), self.moffat_fwhm_px)

    @property
    def fwhm_px(self) -> float:
        """FWHM (px) of the pixel-integrated PSF at the field centre (what a detector measures on pixels).

        Returns
        -------
        float
        """
        return self.fwhm_at()

    @property
    def moffat_fwhm_px(self) -> float:
        """FWHM (px) of the analytic core Moffat, before pixel integration.

        Returns
        -------
        float
        """
        return float(2.0 * self.alpha * np.sqrt(2.0 ** (1.0 / self.beta) - 1.0))

    def stamp(self, radius: int, dx: float = 0.0, dy: float = 0.0, x0: float | None = None,
              y0: float | None = None) -> np.ndarray:
        """A (2 radius + 1)^2 stamp of the PSF for a star at ``(dx, dy)`` px from the centre pixel.

        Parameters
        ----------
        radius
            Half-size (px).
        dx, dy
            Sub-pixel offset of the star from the centre pixel (px).
        x0, y0
            Field position for the spatial variation.

        Returns
        -------
        ndarray
        """
        j = np.arange(-radius, radius + 1, dtype=float)
        return self.evaluate(j[None, :] - dx, j[:, None] - dy, x0, y0)

    def stamp_values(self, frac_x: np.ndarray, frac_y: np.ndarray, radius: int, grad: bool = False
                     ) -> tuple[np.ndarray, ...]:
        """Many stars' (2 radius + 1)^2 stamps at once, from tables per sub-pixel phase (the fitters' fast path).

        Star ``n`` sits ``frac_x[n], frac_y[n]`` px (in [-0.5, 0.5]) from its stamp's centre
        pixel, so stamp pixel ``(i, j)`` has ``du = j - radius - frac_x``, ``dv = i - radius -
        frac_y``: the grid :func:`~survey_proc.photometry.psffit.render_psf` and the fitters use.
        Every pixel of a stamp shares the star's phase, so instead of evaluating each pixel
        (:meth:`evaluate`: cubic B-splines, ~100 ns per value) the stamps are tabulated once at
        :data:`PHASE_STEPS` phases per pixel and each star's stamp is interpolated bilinearly
        across phase from four of them (single-precision tables). Measured on a dense-survey ePSF
        (FWHM 1.85 px), 2 x 10^4 stamps of 13 x 13 with both derivatives: 24x faster than
        :meth:`evaluate_with_gradient`, within 4.2e-4 of the peak (values) and 7.7e-4 of the
        largest derivative; the stamps' sums within 5e-6. The tables (``(P + 1)^2`` stamps of the
        radius asked for) are built once the stamp pixels asked for so far add up to as many; until
        then the stamps are evaluated exactly, so a few stars never pay for them. The constant part only: a
        field-varying model (``order`` > 0) is refused.

        Parameters
        ----------
        frac_x, frac_y
            Each star's offset from its stamp's centre pixel (px), in [-0.5, 0.5].
        radius
            The stamps' half-size (px).
        grad
            Also the derivatives with respect to ``du`` and ``dv`` (as :meth:`gradient`).

        Returns
        -------
        tuple of ndarray
            ``(values,)`` or ``(values, d_du, d_dv)``, each (N, 2 radius + 1, 2 radius + 1).
        """
        if self.order != 0:
            raise ValueError("stamp_values serves the constant PSF only (order 0); use evaluate for a "
                             "field-varying one")
        fx = np.asarray(frac_x, float).ravel()
        fy = np.asarray(frac_y, float).ravel()
        if fx.shape != fy.shape:
            raise ValueError(f"frac_x and frac_y must have one entry per star, got {fx.shape} and {fy.shape}")
        if len(fx) and not (np.abs(fx).max() <= 0.5 + 1e-9 and np.abs(fy).max() <= 0.5 + 1e-9):
            raise ValueError("frac_x and frac_y must lie in [-0.5, 0.5] px (the offset from the nearest pixel)")
        radius = int(radius)
        side = 2 * radius + 1
        if self._phase is None or self._phase[0] < radius:
            # the tables cost (P + 1)^2 stamps: until the stamps asked for add up to that, evaluate them directly
            # (a frame of a few stars with a wide PSF would pay more for the tables than they save)
            self._phase_demand += len(fx) * side * side
            if self._phase_demand < (PHASE_STEPS + 1) ** 2 * side * side:
                j = np.arange(-radius, radius + 1, dtype=float)
                du = np.broadcast_to(j[None, None, :] - fx[:, None, None], (len(fx), side, side))
                dv = np.broadcast_to(j[None, :, None] - fy[:, None, None], (len(fx), side, side))
                return tuple(self.evaluate_with_gradient(du, dv)) if grad else (self.evaluate(du, dv),)
            self._phase = (radius, self._phase_tables(radius))
        r_tab, tabs = self._phase
        c = slice(r_tab - radius, r_tab + radius + 1)
        tab = tabs[:, :, : 3 if grad else 1, c, c]
        steps = PHASE_STEPS
        sx, sy = (fx + 0.5) * steps, (fy + 0.5) * steps  # node index space (node 0 is phase -0.5)
        ix = np.clip(np.floor(sx).astype(np.int64), 0, steps - 1)
        iy = np.clip(np.floor(sy).astype(np.int64), 0, steps - 1)
        tx, ty = (sx - ix).astype(np.float32), (sy - iy).astype(np.float32)
        out = np.empty((len(fx), *tab.shape[2:]))
        for s0 in range(0, len(fx), 2048):
            sl = slice(s0, s0 + 2048)
            a, b = iy[sl], ix[sl]
            u, v = tx[sl, None, None, None], ty[sl, None, None, None]
            out[sl] = ((1 - v) * ((1 - u) * tab[a, b] + u * tab[a, b + 1])
                       + v * ((1 - u) * tab[a + 1, b] + u * tab[a + 1, b + 1]))
        return tuple(out[:, t] for t in range(out.shape[1]))

    def _phase_tables(self, radius: int) -> np.ndarray:
        """(P + 1, P + 1, 3, S, S) float32: values and du, dv derivatives of stamps at phases -0.5 + k / P."""
        q = -0.5 + np.arange(PHASE_STEPS + 1) / PHASE_STEPS
        j = np.arange(-radius, radius + 1, dtype=float)
        n, s = len(q), len(j)
        du = np.broadcast_to(j[None, None, None, :] - q[None, :, None, None], (n, n, s, s))
        dv = np.broadcast_to(j[None, None, :, None] - q[:, None, None, None], (n, n, s, s))
        return np.ascontiguousarray(np.stack(self.evaluate_with_gradient(du, dv), axis=2), dtype=np.float32)


def measure_fwhm(psf: Any, guess_px: float = 2.0, n_dir: int = 16) -> float:
    """FWHM (px) of a PSF callable ``psf(du, dv)``: twice the mean half-maximum radius over directions.

    Parameters
    ----------
    psf
        Callable of pixel-centre offsets (arrays) returning values; its maximum is taken at 0.
    guess_px
        A rough FWHM, to set the search range.
    n_dir
        Directions averaged.

    Returns
    -------
    float
    """
    r = np.linspace(0.0, max(4.0, 4.0 * guess_px), 801)
    th = np.arange(n_dir) * np.pi / n_dir
    vals = np.asarray(psf(np.cos(th)[:, None] * r[None, :], np.sin(th)[:, None] * r[None, :]))
    peak = float(np.asarray(psf(np.zeros(1), np.zeros(1)))[0])
    out = []
    for row in vals:
        below = np.flatnonzero(row < 0.5 * peak)
        if not len(below) or below[0] == 0:
            continue
        i = below[0]
        f = (row[i - 1] - 0.5 * peak) / (row[i - 1] - row[i])
        out.append(r[i - 1] + f * (r[i] - r[i - 1]))
    return float(2.0 * np.mean(out)) if out else float("nan")


# --------------------------------------------------------------------------------------------- building
def _choose_sampling(fwhm_px: float) -> tuple[float, int, int, int, int]:
    """(K residual oversampling, fit radius, residual radius, K_e, table radius) for a FWHM (px)."""
    sig = np.sqrt((fwhm_px / 2.3548) ** 2 + 1.0 / 12.0)  # sigma of the pixel-integrated PSF
    # residual nodes per pixel: ~1.6 per sigma (1-4 per px for sharp PSFs; under 1 for wide ones)
    k = float(np.clip(np.ceil(1.6 / sig), 1, 4)) if sig <= 1.6 else 1.6 / sig
    r_fit = int(np.clip(np.ceil(4.0 * fwhm_px), 6, 30))
    r_res = int(np.clip(np.ceil(2.5 * fwhm_px), 4, 25))
    k_e = int(np.clip(np.ceil(4.0 / sig), max(int(np.ceil(k)), 2), 12))
    r_tab = int(max(r_fit + 1, np.ceil(4.0 * fwhm_px), 7))
    return k, r_fit, r_res, k_e, r_tab


def _as_map(v: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    a = np.asarray(v, float)
    if a.ndim == 0:
        return np.full(shape, float(a))
    if a.shape != shape:
        raise ValueError(f"{name} must be a scalar or an array of the image's shape {shape}, got {a.shape}")
    return a


@dataclass
class _Stars:
    x: np.ndarray
    y: np.ndarray
    f: np.ndarray
    gx: np.ndarray  # (N, S, S) pixel x
    gy: np.ndarray
    d: np.ndarray  # data (background subtracted)
    ok_px: np.ndarray  # usable pixels
    noise2: np.ndarray


def _weights(st: _Stars, model: np.ndarray, gain: float | None) -> np.ndarray:
    var = st.noise2 + (np.clip(model, 0, None) / gain if gain else 0.0)
    return st.ok_px / var


def _star_steps(st: _Stars, psf_fn: Any, gain: float | None, n_steps: int, max_step: float = 0.3) -> np.ndarray:
    """Gauss-Newton steps of (flux, x, y) per star; returns the chi^2 per usable pixel."""
    chi = np.zeros(len(st.x))
    for _ in range(n_steps + 1):
        du = st.gx - st.x[:, None, None]
        dv = st.gy - st.y[:, None, None]
        p, gu, gv = psf_fn(du, dv, st.x, st.y)
        model = st.f[:, None, None] * p
        w = _weights(st, model, gain)
        resid = st.d - model
        chi = (w * resid**2).sum(axis=(1, 2)) / np.maximum(st.ok_px.sum(axis=(1, 2)), 1)
        if _ == n_steps:
            break
        cols = np.stack([p, -st.f[:, None, None] * gu, -st.f[:, None, None] * gv], 1).reshape(len(st.x), 3, -1)
        wv = w.reshape(len(st.x), 1, -1)
        a = np.einsum("nis,njs->nij", cols * wv, cols) + np.eye(3)[None] * 1e-12
        b = np.einsum("nis,ns->ni", cols * wv, resid.reshape(len(st.x), -1))
        try:
            sol = np.linalg.solve(a, b[..., None])[..., 0]
        except np.linalg.LinAlgError:
            sol = np.zeros((len(st.x), 3))
        sol[~np.isfinite(sol).all(1)] = 0.0
        st.f = np.maximum(st.f + sol[:, 0], 1e-6 * np.abs(st.f))
        st.x = st.x + np.clip(sol[:, 1], -max_step, max_step)
        st.y = st.y + np.clip(sol[:, 2], -max_step, max_step)
    return chi


def _comps(par: np.ndarray) -> list[tuple[float, float, float]]:
    """Analytic components from the fit parameters (log a1, log(b1 - 1), f, log(a2 / a1), log(b2 - 1))."""
    a1, b1 = float(np.exp(par[0])), 1.0 + float(np.exp(par[1]))
    f, a2, b2 = float(par[2]), a1 * float(np.exp(par[3])), 1.0 + float(np.exp(par[4]))
    return [(1.0 - f, a1, b1), (f, a2, b2)]


def _light_beyond(comps: list[tuple[float, float, float]], radius: float) -> float:
    """Fraction of the analytic model's light outside a circle of ``radius`` px (Moffat tails, exact)."""
    return float(sum(wt * (1.0 + radius * radius / (a * a)) ** (1.0 - b) for wt, a, b in comps))


def _fit_analytic(st: _Stars, par0: np.ndarray, n_gl: int, gain: float | None, r_max: float,
                  n_max: int = 25, sky: bool = False, max_wing: float = 0.5) -> np.ndarray:
    """Core + wing Moffat fitted to the brightest stars at once (positions fixed).

    Per star the flux, and with ``sky`` a local sky level, are profiled out; the wing carries
    at most ``max_wing`` of the light.
    """
    sel = np.argsort(-st.f)[:n_max]
    du = st.gx[sel] - st.x[sel, None, None]
    dv = st.gy[sel] - st.y[sel, None, None]
    d = st.d[sel]
    p0, _, _ = _analytic(du, dv, _comps(par0), n_gl)
    sub = _subset(st, np.isin(np.arange(len(st.x)), sel))
    w = _weights(sub, st.f[sel, None, None] * p0, gain) * (du * du + dv * dv <= r_max * r_max)
    # only the used pixels, as (stars, pixels) with zero padding
    n_px = int((w > 0).sum(axis=(1, 2)).max())
    order = np.argsort(w.reshape(len(sel), -1) <= 0, axis=1, kind="stable")[:, :n_px]
    du, dv, d, w = (np.take_along_axis(a.reshape(len(sel), -1), order, 1)[:, :, None] for a in (du, dv, d, w))
    sw = np.sqrt(w)

    def resid(par: np.ndarray) -> np.ndarray:
        p, _, _ = _analytic(du, dv, _comps(par), n_gl)
        # per star the flux (and with ``sky`` a local sky level) profiled out: weighted linear least squares
        a11, a12, a22 = (w * p * p).sum(axis=(1, 2)), (w * p).sum(axis=(1, 2)), w.sum(axis=(1, 2))
        b1, b2 = (w * p * d).sum(axis=(1, 2)), (w * d).sum(axis=(1, 2))
        if sky:
            det = np.maximum(a11 * a22 - a12 * a12, 1e-300)
            f, s0 = (b1 * a22 - b2 * a12) / det, (a11 * b2 - a12 * b1) / det
        else:
            f, s0 = b1 / np.maximum(a11, 1e-300), np.zeros(len(sel))
        return (sw * (d - f[:, None, None] * p - s0[:, None, None])).ravel() / np.sqrt(len(sel))

    # the wing is kept where the stamps see it (alpha2 <= 3 alpha1, beta2 >= 1.6): a wider or flatter
    # wing would put light outside every stamp, where nothing constrains it
    lo = [np.log(0.05), np.log(0.3), 0.0, np.log(0.5), np.log(0.6)]
    hi = [np.log(100.0), np.log(30.0), max(max_wing, 1e-6), np.log(3.0), np.log(3.0)]
    par0 = np.clip(par0, np.add(lo, 1e-6), np.subtract(hi, 1e-6))
    sol = least_squares(resid, par0, bounds=(lo, hi), x_scale=[0.1, 0.1, 0.05, 0.1, 0.1], max_nfev=40)
    return np.asarray(sol.x)


def _second_diff(m: int) -> sparse.csr_matrix:
    """Second differences along both axes of an m x m grid (rows: penalties)."""
    d1 = sparse.diags([np.ones(m - 2), -2 * np.ones(m - 2), np.ones(m - 2)], [0, 1, 2], shape=(m - 2, m))
    eye = sparse.identity(m)
    return sparse.vstack([sparse.kron(eye, d1), sparse.kron(d1, eye)]).tocsr()


def _flux_rows(mb: int, cb: int, kb: float) -> list[np.ndarray]:
    """Rows of the residual tables' flux constraints: the light a table adds sums to 0 over the pixels.

    A star's pixels sum to its flux at every sub-pixel phase, so a residual table ``R`` must
    have ``sum_k R(k - phase) = 0`` over the pixel lattice for *every* phase, not only zero
    integral (the phase average). For ``K`` (integer) nodes per pixel, the lattice sum of the
    B-spline at node ``c`` depends on ``c`` only through ``(c - cb) mod K``; so the sum of the
    coefficients of each of the ``K^2`` residue classes must vanish. Without it the fit of
    per-star fluxes cannot see a phase-dependent normalisation (flux and normalisation are
    degenerate star by star) and the regularisation leaves one: measured +-4 % on SDSS frames
    of FWHM 1.2 px, the injected stars' flux ratio 1.17. A non-integer ``K`` (< 1: PSFs of
    FWHM > 3.6 px, well sampled) keeps the single integral constraint.
    """
    k = round(kb)
    if k < 2 or abs(kb - k) > 1e-9:
        return [np.ones(mb * mb)]
    res = (np.arange(mb) - cb) % k
    return [((res[:, None] == rv) & (res[None, :] == ru)).ravel().astype(float) for rv in range(k) for ru in range(k)]


def _fit_residual(st: _Stars, comps: list[tuple[float, float, float]], n_gl: int, gain: float | None, kb: float,
                  r_res: int, basis: np.ndarray, smooth: float) -> np.ndarray:
    """Residual tables (T, M, M) fitted to every star's pixels (see the module docstring)."""
    n_t = basis.shape[1]
    cb = int(np.ceil(kb * (r_res + 2)))
    mb = 2 * cb + 1
    du = st.gx - st.x[:, None, None]
    dv = st.gy - st.y[:, None, None]
    use = st.ok_px & (np.abs(du) <= r_res) & (np.abs(dv) <= r_res)
    a, _, _ = _analytic(du, dv, comps, n_gl)
    w = _weights(st, st.f[:, None, None] * a, gain) * use * st.f[:, None, None] ** 2
    yv = (st.d - st.f[:, None, None] * a) / st.f[:, None, None]
    n_idx, iy, ix = np.nonzero(use)
    su, sv = du[n_idx, iy, ix], dv[n_idx, iy, ix]
    ws, ys = w[n_idx, iy, ix], yv[n_idx, iy, ix]
    iu, wu, _ = _bspline_weights(su * kb + cb)
    iv, wv, _ = _bspline_weights(sv * kb + cb)
    rows, cols, vals = [], [], []
    ns = len(su)
    ar = np.arange(ns)
    for t in range(n_t):
        bt = basis[n_idx, t]
        for aa in range(4):
            for bb in range(4):
                rows.append(ar)
                cols.append(t * mb * mb + (iv + aa) * mb + (iu + bb))
                vals.append(wv[:, aa] * wu[:, bb] * bt)
    design = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                               shape=(ns, n_t * mb * mb))
    dw = design.multiply(ws[:, None]).tocsr()
    normal = (design.T @ dw).tocsr()
    rhs = dw.T @ ys
    scale = float(normal.diagonal().mean()) or 1.0
    # smoothness, a taper to zero outside the residual radius, and the moment constraints, per table
    node = (np.arange(mb) - cb) / kb
    nu, nv = np.meshgrid(node, node)
    outside = ((np.abs(nu) > r_res) | (np.abs(nv) > r_res)).ravel().astype(float)
    d2 = _second_diff(mb)
    ridge = sparse.diags(1e-6 * scale + 1e-1 * scale * outside)
    pen_one = smooth * scale * (d2.T @ d2) + ridge
    pen_var = 0.1 * smooth * scale * (d2.T @ d2) + ridge  # spatial terms: less smoothing (measured)
    cons = sparse.csr_matrix(np.stack([*_flux_rows(mb, cb, kb), nu.ravel(), nv.ravel()]))
    pen = sparse.block_diag([pen_one] + [pen_var] * (n_t - 1)).tocsr()
    # the moment constraints exactly (Lagrange multipliers): the KKT system stays sparse
    cmat = sparse.block_diag([cons] * n_t).tocsr()
    kkt = sparse.bmat([[normal + pen, cmat.T], [cmat, None]]).tocsc()
    sol = spsolve(kkt, np.concatenate([rhs, np.zeros(cmat.shape[0])]), permc_spec="MMD_AT_PLUS_A")[: n_t * mb * mb]
    return np.asarray(sol).reshape(n_t, mb, mb)


def build_epsf(image_adu: np.ndarray, mask: np.ndarray | None, background_adu: Any, noise_adu: Any,
               x: np.ndarray, y: np.ndarray, flux_adu: np.ndarray, fwhm_px: float, saturation_adu: float | None,
               *, gain_e_per_adu: float | None = None, min_snr: float = 50.0, isolation_fwhm: float = 3.0,
               isolation_frac: float = 0.05, min_stars: int = 5, max_stars: int = 150, order: int | None = None,
               n_iter: int = 3, smooth: float = 0.03, reject_chi: float = 3.0,
               max_unseen: float = 0.015, psf_candidate: np.ndarray | None = None) -> EmpiricalPSF:
    """Build the epoch's (block's) empirical PSF from its bright isolated stars (see the module docstring).

    Parameters
    ----------
    image_adu
        The image (ADU), sky not subtracted (for the saturation test).
    mask
        Non-zero (or True) where pixels are unusable (bad, saturated, cosmic); None: none.
    background_adu
        Background (ADU): a scalar or a map of the image's shape.
    noise_adu
        Background noise per pixel (ADU): a scalar or a map.
    x, y
        Every detection's position (px, 0-based, pixel centres at integers): the neighbours
        of the candidates count for the isolation test.
    flux_adu
        Their fluxes (ADU), rough is fine (an aperture or a detector's flux).
    fwhm_px
        The block's measured FWHM (px): sets the stamp sizes and the oversampling.
    saturation_adu
        Saturation level of the raw image (ADU); None or inf: none.
    gain_e_per_adu
        For the stars' own Poisson noise in the weights and the S/N (None: background only).
    min_snr, isolation_fwhm, isolation_frac
        Selection: S/N >= ``min_snr`` and no neighbour brighter than ``isolation_frac`` x the
        star within ``isolation_fwhm`` FWHM.
    min_stars
        Fewer usable stars raise ``ValueError``.
    max_stars
        The brightest this many candidates are used.
    order
        Spatial polynomial order (0-2); None: from the number of stars.
    n_iter
        Residual-table iterations.
    smooth
        Second-difference regularisation of the residual tables (relative to the data's weight).
    reject_chi
        Stars with chi^2 per pixel above this multiple of the median (and 5 robust sigma above
        it) are dropped.
    max_unseen
        When the fitted analytic part puts more than this fraction of the light beyond the
        stamps' radius (where no pixel constrains it), it is refitted with a local sky level
        per star, and if that still does, without the wing (``meta["wing_fit"]`` says which).
    psf_candidate
        Per detection (like ``x``), False for those that must not build the PSF (a detector's
        extended sources: galaxies, unresolved blends); they still count as neighbours for the
        isolation test and are subtracted from the stars' stamps. None: every detection may.

    Returns
    -------
    EmpiricalPSF
    """
    img = np.asarray(image_adu, float)
    if img.ndim != 2:
        raise ValueError(f"image_adu must be a 2-D image, got shape {img.shape}")
    shape = img.shape
    if not (np.isfinite(fwhm_px) and fwhm_px >= 0.5):
        raise ValueError(f"fwhm_px must be a finite FWHM >= 0.5 px, got {fwhm_px}: measure the block's FWHM first")
    x, y, flux = (np.asarray(v, float).ravel() for v in (x, y, flux_adu))
    if not (len(x) == len(y) == len(flux)):
        raise ValueError(f"x, y and flux_adu must have the same length, got {len(x)}, {len(y)}, {len(flux)}")
    if order is not None and not (0 <= order <= _MAX_ORDER):
        raise ValueError(f"order must be 0, 1 or 2 (a polynomial in x, y), got {order}")
    bad = np.zeros(shape, bool) if mask is None else np.asarray(mask).astype(bool)
    if bad.shape != shape:
        raise ValueError(f"mask must have the image's shape {shape}, got {bad.shape}")
    bkg = _as_map(background_adu, shape, "background_adu")
    noise = _as_map(noise_adu, shape, "noise_adu")
    bad = bad | ~np.isfinite(img) | ~np.isfinite(bkg) | ~np.isfinite(noise) | (noise <= 0)
    data = np.where(bad, 0.0, img - bkg)
    kb, r_fit, r_res, k_e, r_tab = _choose_sampling(float(fwhm_px))
    sat = np.inf if saturation_adu is None else float(saturation_adu)

    # ---- selection
    fin = np.isfinite(x) & np.isfinite(y) & np.isfinite(flux)
    ix = np.floor(np.where(fin, x, -1e9) + 0.5).astype(np.int64)
    iy = np.floor(np.where(fin, y, -1e9) + 0.5).astype(np.int64)
    edge = (ix >= r_fit) & (iy >= r_fit) & (ix < shape[1] - r_fit) & (iy < shape[0] - r_fit)
    cand = fin & edge & (flux > 0)
    if psf_candidate is not None:
        pc = np.asarray(psf_candidate, bool).ravel()
        if pc.shape != x.shape:
            raise ValueError(f"psf_candidate must have one entry per detection ({len(x)}), got {pc.shape}")
        cand &= pc
    sig_pix = np.sqrt((fwhm_px / 2.3548) ** 2 + 1.0 / 12.0)
    n_eff = 4.0 * np.pi * sig_pix**2
    nz = noise[np.clip(iy, 0, shape[0] - 1), np.clip(ix, 0, shape[1] - 1)]
    snr = flux / np.sqrt(nz**2 * n_eff + (np.clip(flux, 0, None) / gain_e_per_adu if gain_e_per_adu else 0.0))
    cand &= snr >= min_snr
    reasons = {"detections": len(x), "in_image": int((fin & edge).sum()), "bright": int(cand.sum())}
    if psf_candidate is not None:
        reasons["not_candidate"] = int((fin & edge & ~pc).sum())
    if len(x):
        tree = cKDTree(np.c_[np.where(fin, x, 1e12), np.where(fin, y, 1e12)])
        for i in np.flatnonzero(cand):
            nb = tree.query_ball_point((x[i], y[i]), isolation_fwhm * fwhm_px)
            if any(j != i and flux[j] > isolation_frac * flux[i] for j in nb):
                cand[i] = False
    reasons["isolated"] = int(cand.sum())
    rc = int(max(1, np.ceil(fwhm_px)))
    for i in np.flatnonzero(cand):
        core = (slice(iy[i] - rc, iy[i] + rc + 1), slice(ix[i] - rc, ix[i] + rc + 1))
        if bad[core].any() or np.nanmax(img[core]) >= 0.9 * sat:
            cand[i] = False
    reasons["unsaturated"] = int(cand.sum())
    sel = np.flatnonzero(cand)
    sel = sel[np.argsort(-flux[sel])][:max_stars]
    if len(sel) < min_stars:
        raise ValueError(
            f"build_epsf: only {len(sel)} usable PSF stars (of {reasons['detections']} detections: "
            f"{reasons['in_image']} with a {2 * r_fit + 1} px stamp inside the image, {reasons['bright']} of S/N >= "
            f"{min_snr:g}{' and point-like' if psf_candidate is not None else ''}, {reasons['isolated']} isolated, "
            f"{reasons['unsaturated']} unsaturated and unmasked); "
            f"need at least {min_stars}. Pass every detection of a larger block, lower min_snr/min_stars, "
            "or fall back to an analytic PSF of the measured FWHM")
    # Gauss-Legendre points per axis of the Moffat's pixel integral, against 16 points (measured, beta 2-10): 4
    # points are within 3.5e-5 of the peak from FWHM 1.5 px up (1e-6 at 2.3 px), 6 points within 4e-6 at 1.0 px
    n_gl = 6 if sig_pix < 0.66 else (4 if sig_pix < 2.0 else 3)
    if order is None:
        order = 0 if len(sel) < 12 else (1 if len(sel) < 30 else 2)
    xc, yc = (shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0
    xs, ys = max(shape[1] / 2.0, 1.0), max(shape[0] / 2.0, 1.0)

    # ---- stamps
    j = np.arange(-r_fit, r_fit + 1)
    gy = (iy[sel][:, None, None] + j[None, :, None]) * np.ones((1, 1, len(j)))
    gx = (ix[sel][:, None, None] + j[None, None, :]) * np.ones((1, len(j), 1))
    gyi, gxi = gy.astype(np.int64), gx.astype(np.int64)
    ok_px = ~bad[gyi, gxi]
    # neighbours: pixels where another detection's rough model (Moffat beta 2.5 of the input FWHM) exceeds
    # 2 % of the star's own and 0.2 sigma are left out (their wings would bias the PSF's wings)
    a25 = _alpha_from_fwhm(float(fwhm_px), 2.5)
    tree_all = cKDTree(np.c_[np.where(fin, x, 1e12), np.where(fin, y, 1e12)])
    nbrs: list[list[int]] = []
    for n, i in enumerate(sel):
        own = flux[i] * _moffat_point(gx[n] - x[i], gy[n] - y[i], a25, 2.5)[0]
        nbrs.append([])
        for jn in tree_all.query_ball_point((x[i], y[i]), r_fit * 1.5 + 4 * fwhm_px):
            if jn == i or flux[jn] <= 0:
                continue
            nbrs[n].append(jn)
            nbm = flux[jn] * _moffat_point(gx[n] - x[jn], gy[n] - y[jn], a25, 2.5)[0]
            ok_px[n] &= ~((nbm > 0.02 * own) & (nbm > 0.2 * np.sqrt(noise[gyi[n], gxi[n]] ** 2)))
    st = _Stars(x[sel].copy(), y[sel].copy(), flux[sel].copy(), gx, gy, data[gyi, gxi], ok_px, noise[gyi, gxi] ** 2)
    d_raw = st.d.copy()
    pos_in_sel = {int(i): n for n, i in enumerate(sel)}

    # every (PSF star, neighbour) pair, in the order the subtraction takes them
    pair_n = np.array([n for n in range(len(sel)) for _ in nbrs[n]], np.int64)
    pair_j = np.array([jn for n in range(len(sel)) for jn in nbrs[n]], np.int64)
    pair_m = np.array([pos_in_sel.get(int(jn), -1) for jn in pair_j], np.int64)

    def subtract_neighbours(comps: list[tuple[float, float, float]]) -> None:
        """The stamps less every neighbour's light (the analytic model; refined fluxes for PSF stars)."""
        d = d_raw.copy()
        if len(pair_n):
            own = pair_m >= 0
            mm = np.where(own, pair_m, 0)
            fj = np.where(own, st.f[mm], flux[pair_j])
            xj = np.where(own, st.x[mm], x[pair_j])
            yj = np.where(own, st.y[mm], y[pair_j])
            for s0 in range(0, len(pair_n), 512):  # all pairs' models at once, in chunks
                sl = slice(s0, s0 + 512)
                light = fj[sl, None, None] * _analytic(gx[pair_n[sl]] - xj[sl, None, None],
                                                      gy[pair_n[sl]] - yj[sl, None, None], comps, 2)[0]
                np.subtract.at(d, pair_n[sl], light)
        st.d = d

    # ---- (1) the analytic core + wing Moffat
    beta = 3.0
    par = np.array([np.log(_alpha_from_fwhm(float(fwhm_px), beta)), np.log(beta - 1.0), 0.05, np.log(2.0),
                    np.log(1.0)])

    def analytic_fn(du: np.ndarray, dv: np.ndarray, _x: Any, _y: Any) -> tuple[np.ndarray, ...]:
        return _analytic(du, dv, _comps(par), n_gl, grad=True)

    par_start = par.copy()
    for _ in range(3):
        subtract_neighbours(_comps(par))
        _star_steps(st, analytic_fn, gain_e_per_adu, 2)
        par = _fit_analytic(st, par, n_gl, gain_e_per_adu, float(r_fit))
    beyond = _light_beyond(_comps(par), float(r_fit))
    wing_fit = "no local sky"
    if beyond > max_unseen:
        # the wing puts light where no stamp sees it: a sky error around the stars (a background mesh,
        # faint neighbours, nebulosity) fitted as a wide wing. Measured on SDSS frames: the wing at its
        # bounds, 16 % of the light beyond the stamps, injected stars recovered at 1.17 x their flux.
        # Refit with a local sky per star, which takes the pedestal (and a faint true wing with it)
        # with the wing, then (when it still reaches beyond the stamps) without; of the fits, the one that
        # puts the least light beyond the stamps (a core alone can go to beta ~1.3: SDSS i, worse than either)
        tried = [(beyond, par, "no local sky")]
        for max_wing in (0.5, 0.0):
            par = par_start.copy()
            par[2] = min(par[2], max_wing)
            for _ in range(3):
                subtract_neighbours(_comps(par))
                _star_steps(st, analytic_fn, gain_e_per_adu, 2)
                par = _fit_analytic(st, par, n_gl, gain_e_per_adu, float(r_fit), sky=True, max_wing=max_wing)
            b_now = _light_beyond(_comps(par), float(r_fit))
            tried.append((b_now, par, f"local sky per star{'' if max_wing else ', no wing'} ({beyond:.3f} of the "
                                      f"light beyond {r_fit} px without)"))
            if b_now <= max_unseen:
                break
        _, par, wing_fit = min(tried, key=lambda t: t[0])
    comps = _comps(par)
    subtract_neighbours(comps)
    (_, alpha, beta), (wing_frac, wing_alpha, wing_beta) = comps

    # ---- (2) residual tables
    keep = np.ones(len(st.x), bool)
    psf = None
    chi = np.zeros(len(st.x))
    for it in range(n_iter):
        sub = _subset(st, keep)
        basis = _poly_basis((sub.x - xc) / xs, (sub.y - yc) / ys, order)
        resid = _fit_residual(sub, comps, n_gl, gain_e_per_adu, kb, r_res, basis, smooth)
        psf = EmpiricalPSF(alpha, beta, kb, r_res, resid, order, xc, yc, xs, ys, k_e, r_tab, n_gl,
                           wing_frac, wing_alpha, wing_beta)
        chi = _star_steps(st, psf.evaluate_with_gradient, gain_e_per_adu, 2)
        if it < n_iter - 1:
            med = float(np.median(chi[keep]))
            mad = 1.4826 * float(np.median(np.abs(chi[keep] - med)))
            new = keep & (chi <= max(reject_chi * med, med + 5.0 * mad))
            if new.sum() >= min_stars:
                keep = new
    assert psf is not None
    psf.meta = {"n_candidates": len(sel), "n_used": int(keep.sum()), "order": int(order),
                "fwhm_in_px": float(fwhm_px), "median_chi2_per_px": float(np.median(chi[keep])),
                "selection": reasons, "image_shape": list(shape), "min_snr": float(min_snr),
                "wing_fit": wing_fit, "light_beyond_stamp": _light_beyond(comps, float(r_fit))}
    return psf


def _subset(st: _Stars, keep: np.ndarray) -> _Stars:
    return _Stars(st.x[keep], st.y[keep], st.f[keep], st.gx[keep], st.gy[keep], st.d[keep], st.ok_px[keep],
                  st.noise2[keep])
