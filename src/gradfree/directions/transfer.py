"""Transfer of concept directions between model sizes through a linear map of residual streams.

A map x_s ≈ A x_t + b from a teacher's residual stream (width d_t, e.g. the 1.5B's 1536) to a
student's (d_s, the 0.5B's 896) at chosen layers is fitted in closed form from paired
activations (the same tokens through both models), given either as arrays or as a paired
capture's streamed float64 statistics (:class:`~gradfree.capture.stats.MomentStats` of each
stream and their :class:`~gradfree.capture.stats.CrossStats`). Everything is a function of the
means and the (cross-)covariances, collected in :class:`PairedMoments`.

A direction is a difference of means (concept mean − global mean), so the offset b cancels and a
direction transfers by the linear part alone: d_s = A d_t (:func:`transfer_directions`).

Methods (all float64):

- ``ridge``: A = C_st (C_tt + λI)⁻¹ on centred moments (:func:`gradfree.solvers.ridge.
  ridge_from_stats`), λ relative to the mean teacher variance and chosen on held-out pairs by the
  fraction of held-out student variance left unexplained (computed from the held-out moments).
- ``procrustes`` with ``space="whitened"``: both streams are whitened (C + εI)^(-1/2) with ε
  relative to the mean variance, the semi-orthogonal polar factor Q of the whitened cross-
  covariance is taken (:func:`gradfree.solvers.procrustes.semi_orthogonal_map`; an orthogonal
  map between whitened spaces, i.e. every canonical pair kept at unit gain), and the student side
  is un-whitened: A = (C_ss + εI)^(1/2) Q (C_tt + εI)^(-1/2). ε is chosen on held-out pairs.
- ``procrustes`` with ``space="pca"``: both centred streams are projected onto their own top-k
  principal axes, an orthogonal k×k rotation with Gower's scale is fitted there
  (:func:`gradfree.solvers.procrustes.procrustes_from_cross`, :func:`procrustes_scale`), and
  A = P_s · s Rᵀ · P_tᵀ; k is chosen on held-out pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from gradfree.base.errors import GradfreeError

if TYPE_CHECKING:
    import torch

    from gradfree.capture.stats import CrossStats, MomentStats
    from gradfree.capture.store import Capture
    from gradfree.directions.store import Directions

DEFAULT_REL_LAMBDAS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
DEFAULT_WHITEN_EPS = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)
DEFAULT_PCA_FRACTIONS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)
METHODS = ("ridge", "procrustes")
SPACES = ("whitened", "pca")


@dataclass
class PairedMoments:
    """Means and covariances of paired teacher (t) and student (s) vectors, float64."""

    count: int
    mean_t: np.ndarray  # (d_t,)
    mean_s: np.ndarray  # (d_s,)
    cov_tt: np.ndarray  # (d_t, d_t)
    cov_ss: np.ndarray  # (d_s, d_s)
    cov_ts: np.ndarray  # (d_t, d_s) = E[(t − μ_t)(s − μ_s)ᵀ]

    @property
    def dim_t(self) -> int:
        return int(self.mean_t.shape[0])

    @property
    def dim_s(self) -> int:
        return int(self.mean_s.shape[0])

    @classmethod
    def from_arrays(cls, xt: Any, xs: Any) -> PairedMoments:
        """From paired rows: xt (n, d_t) teacher, xs (n, d_s) student."""
        t = np.asarray(xt, dtype=np.float64)
        s = np.asarray(xs, dtype=np.float64)
        if t.ndim != 2 or s.ndim != 2 or t.shape[0] != s.shape[0]:
            raise GradfreeError(
                f"Paired activations must be (n, d) arrays with equal n, got {t.shape} and "
                f"{s.shape}."
            )
        if t.shape[0] < 2:
            raise GradfreeError("At least two paired activations are needed to fit a map.")
        mt, ms = t.mean(0), s.mean(0)
        tc, sc = t - mt, s - ms
        n = t.shape[0]
        return cls(n, mt, ms, tc.T @ tc / n, sc.T @ sc / n, tc.T @ sc / n)

    @classmethod
    def from_stats(cls, t: MomentStats, s: MomentStats, cross: CrossStats) -> PairedMoments:
        """From a paired capture's statistics: teacher and student moments (full Σxxᵀ) and their
        teacher×student cross moments, all over the same tokens."""
        if not (t.full and s.full):
            raise GradfreeError("Fitting a map needs full second moments of both streams.")
        if not (t.count == s.count == cross.count) or t.count < 2:
            raise GradfreeError(
                "The teacher, student and cross statistics must cover the same tokens (two or "
                "more)."
            )
        if (cross.dim_a, cross.dim_b) != (t.dim, s.dim):
            raise GradfreeError("The cross statistics' widths do not match the two streams.")

        def np64(x: torch.Tensor) -> np.ndarray:
            return x.detach().cpu().double().numpy()

        return cls(
            int(t.count),
            np64(t.mean()),
            np64(s.mean()),
            np64(t.covariance()),
            np64(s.covariance()),
            np64(cross.cross_covariance(centered=True)),
        )

    @classmethod
    def from_capture(
        cls, cap: Capture, teacher_key: str, student_key: str, part: str = "body"
    ) -> PairedMoments:
        """From a paired capture (roles ``teacher`` and ``student``) at one pair of sites, e.g.
        ``blocks.12.resid_pre``; ``part="body"`` leaves out each window's first token, whose
        massive activations would otherwise dominate the covariances."""
        return cls.from_stats(
            cap.stats("teacher", teacher_key, part=part),
            cap.stats("student", student_key, part=part),
            cap.cross(teacher_key, student_key, part=part),
        )


@dataclass
class TransferMap:
    """x_s ≈ A x_t + b (A: (d_s, d_t), b: (d_s,), float64) and how it was chosen."""

    method: str
    A: np.ndarray
    b: np.ndarray
    param: float | None = None  # λ (relative), ε (relative) or k, whichever the method uses
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def dim_t(self) -> int:
        return int(self.A.shape[1])

    @property
    def dim_s(self) -> int:
        return int(self.A.shape[0])

    def apply(self, xt: Any) -> np.ndarray:
        """Student-space activations predicted from teacher activations (n, d_t) or (d_t,)."""
        x = np.asarray(xt, dtype=np.float64)
        self._check(x)
        return x @ self.A.T + self.b

    def transfer(self, directions: Any) -> np.ndarray:
        """Student-space directions from teacher directions (n, d_t) or (d_t,): the linear part
        only, since offsets cancel in differences of means."""
        x = np.asarray(directions, dtype=np.float64)
        self._check(x)
        return x @ self.A.T

    def _check(self, x: np.ndarray) -> None:
        if x.ndim not in (1, 2) or x.shape[-1] != self.dim_t:
            raise GradfreeError(
                f"The map reads teacher vectors of width {self.dim_t}, not shape {x.shape}."
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "param": self.param,
            "dim_t": self.dim_t,
            "dim_s": self.dim_s,
            **self.info,
        }


# maths ------------------------------------------------------------------------------------------


def heldout_fvu(A: np.ndarray, b: np.ndarray, h: PairedMoments) -> float:
    """Fraction of held-out student variance that A t + b leaves unexplained, from the held-out
    moments only: E‖s − A t − b‖² / tr(C_ss), with E‖e‖² = ‖μ_s − Aμ_t − b‖² + tr(C_ss)
    − 2 tr(A C_ts) + tr(A C_tt Aᵀ)."""
    m = h.mean_s - A @ h.mean_t - b
    tr_ss = float(np.trace(h.cov_ss))
    err = (
        float(m @ m)
        + tr_ss
        - 2.0 * float(np.sum(A * h.cov_ts.T))
        + float(np.sum((A @ h.cov_tt) * A))
    )
    return err / tr_ss if tr_ss > 0 else float("nan")


def _t(x: np.ndarray) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))


def _ridge(p: PairedMoments, rel_lam: float) -> np.ndarray:
    from gradfree.solvers.ridge import ridge_from_stats

    # Centred moments: the intercept is b = μ_s − A μ_t, so no constant feature is needed.
    w = ridge_from_stats(_t(p.cov_tt), _t(p.cov_ts), rel_lam=rel_lam)
    return w.numpy()


class _Eig:
    """Eigen-decompositions of the two covariances, computed once per fit: damping by ε·mean(diag)
    shifts the eigenvalues only, so every ε and every k of a grid reuses them."""

    def __init__(self, p: PairedMoments) -> None:
        self.p = p
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def get(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        from gradfree.base.numerics import sym_eigh

        if which not in self._cache:
            c = self.p.cov_tt if which == "t" else self.p.cov_ss
            vals, vecs = sym_eigh(_t(c))
            self._cache[which] = (vals.numpy(), vecs.numpy())
        return self._cache[which]

    def power(self, which: str, eps: float, power: float) -> np.ndarray:
        """(C + ε·mean(diag C)·I)^power."""
        vals, vecs = self.get(which)
        c = self.p.cov_tt if which == "t" else self.p.cov_ss
        shifted = vals + eps * float(np.mean(np.diag(c)))
        floor = max(float(shifted.max()), 1e-300) * 1e-12
        return (vecs * np.maximum(shifted, floor) ** power) @ vecs.T


def _polar_ts(m: np.ndarray) -> np.ndarray:
    """Q (d_s, d_t) with orthonormal rows or columns maximising tr(Qᵀ Mᵀ) for M (d_t, d_s)."""
    from gradfree.solvers.procrustes import semi_orthogonal_map

    if m.shape[0] >= m.shape[1]:
        return np.asarray(semi_orthogonal_map(_t(m)).numpy()).T
    return np.asarray(semi_orthogonal_map(_t(m.T)).numpy())


def _procrustes_whitened(p: PairedMoments, eig: _Eig, eps: float) -> np.ndarray:
    wt = eig.power("t", eps, -0.5)
    ws_inv = eig.power("s", eps, 0.5)
    ws = eig.power("s", eps, -0.5)
    q = _polar_ts(wt @ p.cov_ts @ ws)  # whitened student ≈ Q · whitened teacher
    return ws_inv @ q @ wt


def _procrustes_pca(p: PairedMoments, eig: _Eig, k: int) -> np.ndarray:
    from gradfree.solvers.procrustes import procrustes_from_cross, procrustes_scale

    pt, ps = eig.get("t")[1][:, :k], eig.get("s")[1][:, :k]
    c = pt.T @ p.cov_ts @ ps  # k×k cross-covariance of the projected streams
    r = procrustes_from_cross(_t(c))  # t_k R ≈ s_k (rows), i.e. s_k ≈ Rᵀ t_k
    scale = procrustes_scale(_t(c), r, float(np.trace(pt.T @ p.cov_tt @ pt)))
    return ps @ (scale * r.numpy().T) @ pt.T


def _check_pairs(pairs: PairedMoments, heldout: PairedMoments | None) -> None:
    if heldout is not None and (heldout.dim_t, heldout.dim_s) != (pairs.dim_t, pairs.dim_s):
        raise GradfreeError("The held-out pairs' widths differ from the fitting pairs' widths.")


def as_moments(pairs: Any) -> PairedMoments:
    """A :class:`PairedMoments` from itself, a (teacher_rows, student_rows) pair of arrays, or a
    (teacher MomentStats, student MomentStats, CrossStats) triple."""
    if isinstance(pairs, PairedMoments):
        return pairs
    if isinstance(pairs, tuple | list) and len(pairs) == 2:
        return PairedMoments.from_arrays(pairs[0], pairs[1])
    if isinstance(pairs, tuple | list) and len(pairs) == 3:
        return PairedMoments.from_stats(pairs[0], pairs[1], pairs[2])
    raise GradfreeError(
        "Paired data must be PairedMoments, (teacher, student) arrays or (teacher stats, "
        "student stats, cross stats)."
    )


def split_pairs(
    xt: Any, xs: Any, heldout_fraction: float = 0.2, seed: int = 0
) -> tuple[PairedMoments, PairedMoments]:
    """Fitting and held-out :class:`PairedMoments` from paired rows, split at random (seeded)."""
    t = np.asarray(xt, dtype=np.float64)
    s = np.asarray(xs, dtype=np.float64)
    n = t.shape[0]
    if not 0.0 < heldout_fraction < 1.0:
        raise GradfreeError("The held-out fraction must lie strictly between 0 and 1.")
    order = np.random.default_rng(seed).permutation(n)
    n_h = max(2, round(n * heldout_fraction))
    if n - n_h < 2:
        raise GradfreeError(f"{n} paired rows are too few to split into fitting and held-out.")
    h, f = order[:n_h], order[n_h:]
    return PairedMoments.from_arrays(t[f], s[f]), PairedMoments.from_arrays(t[h], s[h])


def fit_transfer(
    pairs: Any,
    method: str = "ridge",
    *,
    heldout: Any = None,
    lam: float | None = None,
    lambdas: Sequence[float] = DEFAULT_REL_LAMBDAS,
    space: str = "whitened",
    eps: float | None = None,
    eps_grid: Sequence[float] = DEFAULT_WHITEN_EPS,
    k: int | None = None,
    k_fractions: Sequence[float] = DEFAULT_PCA_FRACTIONS,
) -> TransferMap:
    """Fit x_s ≈ A x_t + b from paired teacher/student activations (see the module docstring).

    ``pairs`` and ``heldout`` are :class:`PairedMoments`, (teacher rows, student rows) arrays or
    (MomentStats, MomentStats, CrossStats). The method's parameter (ridge: relative λ;
    whitened Procrustes: relative ε; PCA Procrustes: k) is taken as given (``lam``, ``eps``,
    ``k``) or chosen from its grid by the held-out fraction of variance unexplained, which then
    needs ``heldout``. The scores of the whole grid are kept in ``info["grid"]``.
    """
    if method not in METHODS:
        raise GradfreeError(f"Unknown transfer method '{method}'; use one of {', '.join(METHODS)}.")
    p = as_moments(pairs)
    h = as_moments(heldout) if heldout is not None else None
    _check_pairs(p, h)
    if method == "ridge":
        name, fixed, grid = "ridge", lam, list(lambdas)
    elif space == "whitened":
        name, fixed, grid = "procrustes-whitened", eps, list(eps_grid)
    elif space == "pca":
        kmax = min(p.dim_t, p.dim_s)
        grid = sorted({max(1, min(kmax, round(f * kmax))) for f in k_fractions})
        name, fixed = "procrustes-pca", (None if k is None else float(k))
        if k is not None and not 1 <= k <= kmax:
            raise GradfreeError(f"The PCA subspace size must lie in 1..{kmax}, not {k}.")
    else:
        raise GradfreeError(f"Unknown Procrustes space '{space}'; use one of {', '.join(SPACES)}.")

    eig = _Eig(p)

    def solve(param: float) -> np.ndarray:
        if name == "ridge":
            return _ridge(p, param)
        if name == "procrustes-whitened":
            return _procrustes_whitened(p, eig, param)
        return _procrustes_pca(p, eig, int(param))

    if fixed is not None:
        candidates = [float(fixed)]
    elif h is None:
        raise GradfreeError(
            f"Choosing the {name} parameter needs held-out pairs; pass heldout= or fix it."
        )
    else:
        candidates = [float(g) for g in grid]
    scores = []
    best: tuple[float, float, np.ndarray] | None = None
    for param in candidates:
        a = solve(param)
        b = p.mean_s - a @ p.mean_t
        score = heldout_fvu(a, b, h) if h is not None else float("nan")
        scores.append({"param": param, "heldout_fvu": score})
        if best is None or (np.isfinite(score) and not score >= best[0]):
            best = (score, param, a)
    assert best is not None
    score, param, a = best
    info: dict[str, Any] = {
        "fit_count": p.count,
        "heldout_count": h.count if h is not None else None,
        "heldout_fvu": score,
        "grid": scores,
        "fit_fvu": heldout_fvu(a, p.mean_s - a @ p.mean_t, p),
    }
    return TransferMap(name, a, p.mean_s - a @ p.mean_t, param, info)


def cosines(a: Any, b: Any) -> np.ndarray:
    """Row-wise cosine of two (n, d) arrays (float64; 0 where a row is zero)."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise GradfreeError(f"Cannot compare vectors of shapes {x.shape} and {y.shape}.")
    num = (x * y).sum(-1)
    den = np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def transfer_directions(
    d_teacher: Directions | Any,
    tmap: TransferMap,
    layer: int | None = None,
    pooling: str = "mean",
    rows: Sequence[int] | None = None,
) -> np.ndarray:
    """Student-space directions (n, d_s) float32 from a teacher's directions: a
    :class:`~gradfree.directions.store.Directions` (read at ``layer``/``pooling``) or an (n, d_t)
    array; ``rows`` selects concepts."""
    if hasattr(d_teacher, "get") and hasattr(d_teacher, "layers"):
        if layer is None:
            if len(d_teacher.layers) != 1:
                raise GradfreeError("The directions hold several layers; say which to transfer.")
            layer = int(d_teacher.layers[0])
        x = np.asarray(d_teacher.get(layer, pooling))
    else:
        x = np.asarray(d_teacher)
    if rows is not None:
        x = x[np.asarray(list(rows), dtype=np.int64)]
    if x.ndim != 2:
        raise GradfreeError(f"Teacher directions must be an (n, d) array, not shape {x.shape}.")
    return tmap.transfer(x).astype(np.float32)
