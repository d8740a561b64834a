"""Unmerging: which task vectors a merged model was made from, and with what weights.

Pure maths on float64 numpy arrays (no torch). ``D`` (n, t) is the dictionary: column i is task
i's compressed task vector (its values at the mask's entries); ``y`` (n,) is the merged model's
compressed delta from the base. A task-arithmetic merge is y = D w, so recovering w is a
(non-negative) sparse regression; :func:`recover` runs one solver and :func:`recover_all` several:

* ``nnls``: :func:`scipy.optimize.nnls` (w ≥ 0; with ``nonnegative=False`` plain least squares).
* ``omp``: scikit-learn's :func:`~sklearn.linear_model.orthogonal_mp`. With ``n_nonzero`` it takes
  that many atoms; otherwise it walks the greedy path and stops before the first atom that lowers
  the relative residual ‖y − D w‖/‖y‖ by less than ``omp_tol`` (default 1e-3, i.e. an atom must
  explain at least 0.1 % of ‖y‖ beyond the atoms already chosen), so a task that is not in the
  dictionary stays in the residual instead of being spread over false atoms. OMP picks atoms by
  |correlation| and has no sign constraint; with ``nonnegative`` the chosen atoms are refit by NNLS.
* ``lasso``: scikit-learn's :class:`~sklearn.linear_model.Lasso` (``positive=nonnegative``, no
  intercept) on the column-normalised dictionary with alpha = ``alpha_ratio`` · alpha_max,
  alpha_max = ‖Dₙᵀy‖∞ / n (the smallest alpha giving w = 0), default ratio 1e-3. The reported
  weights are *debiased*: a least-squares (NNLS when ``nonnegative``) refit on the Lasso's support;
  the Lasso's own shrunk weights are kept in ``params["raw_weights"]`` (``debias=False`` reports
  them instead).
* ``ridge``: closed form (Dₙᵀ Dₙ + λ I)⁻¹ Dₙᵀ y with λ = ``ridge_ratio`` · tr(Dₙᵀ Dₙ) / t (a
  fraction of the mean eigenvalue of the column-normalised Gram, which is 1 as its columns have
  unit norm), default ratio 1e-3. Unconstrained: ``nonnegative`` does not apply (recorded in
  params). For y = D w exactly, the error is −λ (G + λI)⁻¹ v in normalised units, so
  ‖Δv‖ ≤ λ/(σ_min(G) + λ) ‖v‖.

Every solver works on the column-normalised Dₙ = D / ‖Dᵢ‖ (task vectors differ a lot in norm, which
would bias OMP's and Lasso's choices) and maps the weights back, wᵢ = vᵢ / ‖Dᵢ‖, so weights are in
units of the task vectors (1.0 = the whole task vector). A zero column (a task that is empty at the
mask) gets weight 0 and is listed in ``params["zero_columns"]``. ``support`` is |w| > threshold
(for non-negative weights, w > threshold). ``residual`` is ‖y − D w‖ / ‖y‖, how much of the delta
the dictionary does not explain; for y = 0 all weights are 0 and the residual is defined as 0.0
(there is nothing to explain), with ``params["zero_target"] = True``.

:func:`recover_ties` models TIES / DARE-TIES merges, which are not linear in the task vectors
(trimming, sign election, disjoint mean); see its docstring for the model and what is identifiable.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import nnls as _scipy_nnls

from gradfree.base.errors import GradfreeError

SOLVERS = ("nnls", "omp", "lasso", "ridge")
MAX_REFITS = 5  # forward least-squares fits of recover_ties once the support is chosen
COMMON_OPTIONS = ("threshold", "nonnegative")
# Solver-specific options and their defaults; names are unique across solvers so that
# recover_all can route each option to the solvers that take it.
OPTIONS: dict[str, dict[str, Any]] = {
    "nnls": {},
    "omp": {"n_nonzero": None, "omp_tol": 1e-3},
    "lasso": {"alpha_ratio": 1e-3, "lasso_tol": 1e-10, "max_iter": 100_000, "debias": True},
    "ridge": {"ridge_ratio": 1e-3},
}
# A column whose norm is below this fraction of the largest is treated as empty (a task with
# nothing at the mask); exact zeros are the expected case, the margin covers float round-off.
ZERO_COLUMN = 1e-12


@dataclass
class Recovery:
    """One solver's answer: weights in task-vector units, their support and the residual."""

    solver: str
    weights: np.ndarray
    support: np.ndarray
    residual: float
    params: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self, names: Sequence[str]) -> dict[str, Any]:
        """The recovery keyed by task name (plain JSON types)."""
        names = list(names)
        if len(names) != len(self.weights):
            raise GradfreeError(
                f"Got {len(names)} task names for {len(self.weights)} recovered weights."
            )
        return {
            "solver": self.solver,
            "weights": {n: float(w) for n, w in zip(names, self.weights, strict=True)},
            "support": [n for n, s in zip(names, self.support, strict=True) if s],
            "residual": float(self.residual),
            "params": _jsonable(self.params),
            "seconds": float(self.seconds),
        }


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    return x


# ---------------------------------------------------------------------------------------------
# Input checks and shared pieces


def _check_problem(D: Any, y: Any, what: str = "D") -> tuple[np.ndarray, np.ndarray]:
    D = np.asarray(D, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if D.ndim != 2:
        raise GradfreeError(f"The dictionary {what} must be a 2-D (entries, tasks) array.")
    if D.shape[1] == 0:
        raise GradfreeError(f"The dictionary {what} has no tasks (columns).")
    if y.ndim != 1 or y.shape[0] != D.shape[0]:
        raise GradfreeError(
            f"The merged delta y has shape {y.shape} but {what} has {D.shape[0]} entries (rows)."
        )
    if D.shape[0] == 0:
        raise GradfreeError("The problem has no entries (rows): the mask is empty.")
    if not np.isfinite(D).all():
        raise GradfreeError(f"The dictionary {what} contains NaN or infinite values.")
    if not np.isfinite(y).all():
        raise GradfreeError("The merged delta y contains NaN or infinite values.")
    return D, y


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not np.isfinite(threshold) or threshold < 0:
        raise GradfreeError(f"The support threshold must be a finite number ≥ 0, got {threshold}.")
    return threshold


def _normalise(D: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Dₙ of the non-empty columns, their norms, their indices)."""
    norms = np.linalg.norm(D, axis=0)
    top = float(norms.max()) if norms.size else 0.0
    keep = np.flatnonzero(norms > ZERO_COLUMN * top) if top > 0 else np.array([], dtype=int)
    return D[:, keep] / norms[keep], norms[keep], keep


def _relres(y: np.ndarray, fit: np.ndarray, ynorm: float) -> float:
    return float(np.linalg.norm(y - fit) / ynorm) if ynorm > 0 else 0.0


def _nnls(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    if A.shape[1] == 0:
        return np.zeros(0)
    # scipy's default iteration cap (3·t) can be short on correlated atoms; 50·t is ample.
    x, _ = _scipy_nnls(A, b, maxiter=50 * A.shape[1] + 50)
    return np.asarray(x, dtype=np.float64)


def _lstsq(A: np.ndarray, b: np.ndarray, nonnegative: bool) -> np.ndarray:
    if A.shape[1] == 0:
        return np.zeros(0)
    if nonnegative:
        return _nnls(A, b)
    return np.linalg.lstsq(A, b, rcond=None)[0]


# ---------------------------------------------------------------------------------------------
# The solvers: each gets (Dₙ, y, nonnegative, options) and returns (v, params) in normalised units.


def _solve_nnls(Dn: np.ndarray, y: np.ndarray, nonnegative: bool, o: dict) -> tuple:
    return _lstsq(Dn, y, nonnegative), {}


def _solve_omp(Dn: np.ndarray, y: np.ndarray, nonnegative: bool, o: dict) -> tuple:
    from sklearn.linear_model import orthogonal_mp

    t = Dn.shape[1]
    ynorm = float(np.linalg.norm(y))
    n_nonzero = o["n_nonzero"]
    tol = float(o["omp_tol"])
    if n_nonzero is not None and (int(n_nonzero) != n_nonzero or not n_nonzero >= 0):
        raise GradfreeError(f"OMP's n_nonzero must be a whole number ≥ 0, got {n_nonzero}.")
    if not np.isfinite(tol) or tol < 0:
        raise GradfreeError(f"OMP's omp_tol must be a finite number ≥ 0, got {tol}.")
    steps = t if n_nonzero is None else min(int(n_nonzero), t)
    params: dict[str, Any] = {"rule": "n_nonzero" if n_nonzero is not None else "residual_gain"}
    if steps == 0:
        return np.zeros(t), {**params, "atoms": 0, "path_residuals": [1.0]}
    with warnings.catch_warnings():
        # sklearn warns when the path ends early (residual already ~0, or dependent atoms).
        warnings.simplefilter("ignore", RuntimeWarning)
        path = orthogonal_mp(Dn, y, n_nonzero_coefs=steps, return_path=True)
    path = np.asarray(path, dtype=np.float64).reshape(t, -1)
    residuals = [1.0] + [_relres(y, Dn @ path[:, k], ynorm) for k in range(path.shape[1])]
    if n_nonzero is None:
        atoms = len(residuals) - 1
        for k in range(len(residuals) - 1):
            if residuals[k] - residuals[k + 1] < tol:
                atoms = k
                break
    else:
        atoms = path.shape[1]
    v = path[:, atoms - 1].copy() if atoms > 0 else np.zeros(t)
    chosen = np.flatnonzero(v != 0)
    params.update(atoms=int(atoms), path_residuals=residuals, omp_tol=tol)
    if nonnegative and (v < 0).any():
        # Refit the chosen atoms with w ≥ 0; an atom wanted with a negative sign drops to 0.
        v = np.zeros(t)
        v[chosen] = _nnls(Dn[:, chosen], y)
        params["nnls_refit"] = True
    return v, params


def _solve_lasso(Dn: np.ndarray, y: np.ndarray, nonnegative: bool, o: dict) -> tuple:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import Lasso

    n, t = Dn.shape
    ratio = float(o["alpha_ratio"])
    if not np.isfinite(ratio) or not 0 < ratio < 1:
        raise GradfreeError(f"Lasso's alpha_ratio must lie strictly between 0 and 1, got {ratio}.")
    corr = Dn.T @ y
    # With w ≥ 0 only positive correlations can enter, so alpha_max is the largest of those.
    alpha_max = float((np.maximum(corr, 0.0) if nonnegative else np.abs(corr)).max()) / n
    params: dict[str, Any] = {"alpha_ratio": ratio, "alpha_max": alpha_max}
    if alpha_max <= 0:
        # No atom correlates (positively) with y: the Lasso's answer is w = 0 for any alpha.
        return np.zeros(t), {**params, "alpha": 0.0, "raw_weights": [0.0] * t, "debiased": False}
    alpha = ratio * alpha_max
    model = Lasso(
        alpha=alpha,
        fit_intercept=False,
        positive=nonnegative,
        precompute=True,  # n ≫ t: coordinate descent on the t × t Gram
        tol=float(o["lasso_tol"]),
        max_iter=int(o["max_iter"]),
        selection="cyclic",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(Dn, y)
    raw = np.asarray(model.coef_, dtype=np.float64).reshape(t)
    params.update(
        alpha=alpha,
        n_iter=int(np.max(model.n_iter_)),
        converged=not any(issubclass(w.category, ConvergenceWarning) for w in caught),
    )
    params["_raw_v"] = raw
    if not o["debias"]:
        return raw, {**params, "debiased": False}
    active = np.flatnonzero(raw != 0)
    v = np.zeros(t)
    v[active] = _lstsq(Dn[:, active], y, nonnegative)
    return v, {**params, "debiased": True, "lasso_support": len(active)}


def _solve_ridge(Dn: np.ndarray, y: np.ndarray, nonnegative: bool, o: dict) -> tuple:
    ratio = float(o["ridge_ratio"])
    if not np.isfinite(ratio) or ratio < 0:
        raise GradfreeError(f"Ridge's ridge_ratio must be a finite number ≥ 0, got {ratio}.")
    t = Dn.shape[1]
    G = Dn.T @ Dn
    lam = ratio * float(np.trace(G)) / t
    v = np.linalg.lstsq(G + lam * np.eye(t), Dn.T @ y, rcond=None)[0]
    return v, {"ridge_ratio": ratio, "lambda": lam, "nonnegative_applied": False}


_SOLVE: dict[str, Callable[..., tuple[np.ndarray, dict[str, Any]]]] = {
    "nnls": _solve_nnls,
    "omp": _solve_omp,
    "lasso": _solve_lasso,
    "ridge": _solve_ridge,
}


def recover(
    D: Any,
    y: Any,
    solver: str,
    *,
    threshold: float = 0.05,
    nonnegative: bool = True,
    **options: Any,
) -> Recovery:
    """Recover w in y ≈ D w with one solver (see the module docstring for each solver's rule).

    ``options`` are the solver's own (:data:`OPTIONS`): omp ``n_nonzero``, ``omp_tol``; lasso
    ``alpha_ratio``, ``lasso_tol``, ``max_iter``, ``debias``; ridge ``ridge_ratio``."""
    start = time.perf_counter()
    if solver not in _SOLVE:
        raise GradfreeError(f"Unknown solver '{solver}'; choose one of {', '.join(SOLVERS)}.")
    unknown = sorted(set(options) - set(OPTIONS[solver]))
    if unknown:
        raise GradfreeError(
            f"Solver '{solver}' has no option {', '.join(unknown)}; "
            f"it takes {', '.join(OPTIONS[solver]) or 'none'}."
        )
    threshold = _check_threshold(threshold)
    D, y = _check_problem(D, y)
    t = D.shape[1]
    o = {**OPTIONS[solver], **options}
    Dn, norms, keep = _normalise(D)
    zero_cols = sorted(set(range(t)) - set(keep.tolist()))
    params: dict[str, Any] = {"nonnegative": bool(nonnegative), "zero_columns": zero_cols}
    ynorm = float(np.linalg.norm(y))
    w = np.zeros(t)
    if ynorm == 0:
        params["zero_target"] = True
        residual = 0.0
    else:
        if keep.size:
            v, extra = _SOLVE[solver](Dn, y, bool(nonnegative), o)
            raw = extra.pop("_raw_v", None)
            if raw is not None:
                # The Lasso's own (shrunk) weights, mapped back like the reported ones.
                full = np.zeros(t)
                full[keep] = raw / norms
                extra["raw_weights"] = full.tolist()
            params.update(extra)
            w[keep] = v / norms
        residual = _relres(y, D @ w, ynorm)
    return Recovery(
        solver=solver,
        weights=w,
        support=np.abs(w) > threshold,
        residual=residual,
        params=params,
        seconds=time.perf_counter() - start,
    )


def recover_all(
    D: Any,
    y: Any,
    solvers: Sequence[str] = SOLVERS,
    *,
    threshold: float = 0.05,
    nonnegative: bool = True,
    **options: Any,
) -> dict[str, Recovery]:
    """:func:`recover` with every solver in ``solvers``; each option goes to the solvers that
    take it (an option none of them takes is an error)."""
    solvers = list(solvers)
    for s in solvers:
        if s not in _SOLVE:
            raise GradfreeError(f"Unknown solver '{s}'; choose one of {', '.join(SOLVERS)}.")
    unused = sorted(k for k in options if not any(k in OPTIONS[s] for s in solvers))
    if unused:
        raise GradfreeError(f"No chosen solver takes the option {', '.join(unused)}.")
    D, y = _check_problem(D, y)
    return {
        s: recover(
            D,
            y,
            s,
            threshold=threshold,
            nonnegative=nonnegative,
            **{k: v for k, v in options.items() if k in OPTIONS[s]},
        )
        for s in solvers
    }


# ---------------------------------------------------------------------------------------------
# TIES


def _ties_forward(T: np.ndarray, w: np.ndarray, scaling: float, normalize: bool) -> np.ndarray:
    """λ · (TIES elect + disjoint merge) of trimmed T with weights w (as in merge/sparse.py)."""
    weighted = T * w
    elected = np.sign(weighted.sum(axis=1))
    agree = (np.sign(weighted) == elected[:, None]) & (weighted != 0)
    mixed = (weighted * agree).sum(axis=1)
    if normalize:
        div = (agree * w).sum(axis=1)
        mixed = np.where(div != 0, mixed / np.where(div != 0, div, 1.0), 0.0)
    return scaling * mixed


def recover_ties(
    T: Any,
    y: Any,
    *,
    normalize: bool = True,
    threshold: float = 0.05,
    iterations: int = 50,
) -> Recovery:
    """Sign-aware recovery of a TIES (or DARE-TIES) merge from the trimmed task vectors T (n, t).

    Merge model, per entry j, with weights w ≥ 0 and scaling λ > 0: the elected sign is
    s_j = sign(Σ_k w_k T_kj), the agree set A_j = {i: T_ij ≠ 0, w_i > 0, sign(T_ij) = s_j}, and
    y_j = λ Σ_{A_j} w_i T_ij / Σ_{A_j} w_i (``normalize``) or λ Σ_{A_j} w_i T_ij (not).

    Identifiability. Scaling w by c > 0 changes neither the elected signs nor the agree sets, so:
    with ``normalize``, y depends on w only through w/Σw, and λ is separately identifiable (on
    an entry where one task agrees alone, y_j = λ T_ij); without it only the products λ wᵢ are.
    Either way the reported ``weights`` are w/Σw and ``params["scaling"]`` is the λ that goes with
    them (without ``normalize`` that is λ·Σw, and ``params["effective_weights"]`` = λ wᵢ, in
    task-vector units like a task-arithmetic merge). ``support`` = weights > threshold, i.e. a
    task's *share* of the weights. A task that never agrees on any entry (always trimmed away or
    outvoted) leaves no trace in y and gets weight 0; λ > 0 is assumed.

    Algorithm. Given elected signs s (first s = sign(y), as λ > 0; then those of the current w),
    take A_j = {i : sign(T_ij) = s_j} (an absent task with w_i = 0 adds nothing to A_j's sums, so
    it may be listed; this lets tasks enter and leave). Then
    * normalize: Σ_{A_j} (a_i y_j − b_i T_ij) = 0 for a = w/Σw, b = λ a is linear in (a, b); one
      NNLS over (a, b) ≥ 0 with a heavy row Σa = 1 gives w = a, and λ is then the closed-form
      least-squares scale of the forward model, λ = ⟨y, m⟩/⟨m, m⟩ with m the merge at λ = 1;
    * not normalize: y_j = Σ_{A_j} (λ w_i) T_ij is linear: NNLS on T masked to the agree sets.
    The signs are recomputed from the new w and the two steps alternate until they are stable
    (``params["converged"]``), at most ``iterations`` times. Noise-free and with the right signs
    this is exact; ``residual`` is that of the forward model with the recovered w and λ."""
    start = time.perf_counter()
    threshold = _check_threshold(threshold)
    if int(iterations) != iterations or iterations < 1:
        raise GradfreeError(
            f"recover_ties needs iterations ≥ 1 (a whole number), got {iterations}."
        )
    T, y = _check_problem(T, y, what="T")
    n, t = T.shape
    norms = np.linalg.norm(T, axis=0)
    top = float(norms.max())
    keep = np.flatnonzero(norms > ZERO_COLUMN * top) if top > 0 else np.array([], dtype=int)
    params: dict[str, Any] = {
        "normalize": bool(normalize),
        "zero_columns": sorted(set(range(t)) - set(keep.tolist())),
    }
    ynorm = float(np.linalg.norm(y))
    w = np.zeros(t)
    scaling = 0.0
    if ynorm == 0 or keep.size == 0:
        if ynorm == 0:
            params["zero_target"] = True
        params.update(scaling=0.0, iterations=0, converged=True)
        return Recovery(
            "ties",
            w,
            w > threshold,
            0.0 if ynorm == 0 else 1.0,
            params,
            time.perf_counter() - start,
        )
    # Work on unit-norm columns (their weights are rescaled back below) so the NNLS is balanced.
    Tn = T[:, keep] / norms[keep]
    signs = np.sign(Tn)
    Tk = T[:, keep]

    def solve(cols: np.ndarray, s: np.ndarray) -> np.ndarray:
        """NNLS for the columns ``cols`` (of ``keep``) with agree sets from the signs s."""
        agree = (signs[:, cols] == s[:, None]) & (signs[:, cols] != 0)
        u = np.zeros(keep.size)
        if normalize:
            # Unknowns (a, b'): a = w of the original columns (it multiplies y_j, which does not
            # depend on the column scaling) and b'_i = λ a_i ‖T_i‖ (it multiplies a unit column).
            A_part = agree * y[:, None]
            B_part = -(agree * Tn[:, cols])
            heavy = 1e3 * max(float(np.linalg.norm(A_part)), float(np.linalg.norm(B_part)), 1.0)
            k = cols.size
            M = np.vstack(
                [
                    np.hstack([A_part, B_part]),
                    np.concatenate([np.full(k, heavy), np.zeros(k)])[None, :],
                ]
            )
            u[cols] = _nnls(M, np.concatenate([np.zeros(n), [heavy]]))[:k]  # w, up to scale
        else:
            u[cols] = _nnls(agree * Tn[:, cols], y) / norms[keep][cols]  # λ w, original columns
        return u

    def shares(u: np.ndarray) -> np.ndarray:
        """w/Σw with the tasks whose share is ≤ threshold removed (and the rest renormalised):
        in the normalised merge a task with a tiny weight still sets y_j = λ T_ij wherever it
        agrees alone, so a below-threshold task must be absent from the model, not small."""
        total = float(u.sum())
        if total <= 0:
            return np.zeros_like(u)
        share = u / total
        share[share <= threshold] = 0.0
        total = float(share.sum())
        return share / total if total > 0 else share

    def refine(cols: np.ndarray, s: np.ndarray, share: np.ndarray) -> np.ndarray:
        """Forward least squares of the normalised model on fixed agree sets: minimise
        Σ_j (y_j − λ Σ_{A_j} w_i T_ij / Σ_{A_j} w_i)² over w ≥ 0 (Σw = 1 by a heavy residual)
        and λ, from the linear step's answer. The linear step minimises an equation error that
        noise weights unevenly, so under noise it is only a starting point."""
        from scipy.optimize import least_squares

        agree = (signs[:, cols] == s[:, None]) & (signs[:, cols] != 0)
        Ta = Tk[:, cols] * agree
        k = cols.size
        heavy = 1e3 * float(np.linalg.norm(y))

        # Shares sum to 1, so an agree set whose weights sum below 1e-12 holds no task: treat
        # it as empty (dividing by such an S overflowed in the search's trial steps).
        tiny = 1e-12

        def parts(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            total = agree @ x[:k]
            m = np.where(total > tiny, (Ta @ x[:k]) / np.where(total > tiny, total, 1.0), 0.0)
            return total, m, x[k] * m

        def fun(x: np.ndarray) -> np.ndarray:
            return np.concatenate([parts(x)[2] - y, [heavy * (x[:k].sum() - 1.0)]])

        def jac(x: np.ndarray) -> np.ndarray:
            total, m, _ = parts(x)
            inv = np.where(total > tiny, 1.0 / np.where(total > tiny, total, 1.0), 0.0)
            J = np.empty((n + 1, k + 1))
            J[:n, :k] = x[k] * agree * (Tk[:, cols] - m[:, None]) * inv[:, None]
            J[:n, k] = m
            J[n, :k] = heavy
            J[n, k] = 0.0
            return J

        m0 = parts(np.concatenate([share[cols], [1.0]]))[1]
        lam0 = float(m0 @ y) / float(m0 @ m0) if float(m0 @ m0) > 0 else 1.0
        x0 = np.concatenate([share[cols], [lam0]])
        lower = np.concatenate([np.zeros(k), [-np.inf]])
        fit = least_squares(
            fun,
            x0,
            jac=jac,
            bounds=(lower, np.inf),
            xtol=1e-15,
            ftol=1e-15,
            gtol=1e-15,
            max_nfev=200,
        )
        out = np.zeros(keep.size)
        out[cols] = fit.x[:k]
        return out

    # Phase "all": every task may enter; once the signs are stable, phase "support" refits on
    # the tasks kept, so the removed ones do not bias the others (noise leaves them small > 0).
    cols = np.arange(keep.size)
    s = np.sign(y)
    phase = "all"
    converged = False
    it = 0
    share = np.zeros(keep.size)
    refits = 0
    while it < int(iterations):
        it += 1
        if normalize and phase == "support":
            # Each forward fit costs up to 200 evaluations over all n entries; when the signs
            # keep flipping (DARE's random drops are outside the model) more do not help.
            if refits == MAX_REFITS:
                break
            refits += 1
            u = refine(cols, s, share)
        else:
            u = solve(cols, s)
        share = shares(u)
        if share.sum() == 0:
            break
        new_s = np.sign(Tk @ share)
        stable = bool(np.array_equal(new_s, s))
        s = new_s
        if phase == "all" and (normalize or stable):
            # Normalised: the linear step is exact without noise but unstable under it, so it
            # only starts the forward fit. Otherwise: refit once the signs are stable.
            support_cols = np.flatnonzero(share > 0)
            if normalize or support_cols.size < cols.size:
                phase, cols = "support", support_cols
                continue
        if stable:
            converged = True
            break
    params["pruned"] = [int(keep[i]) for i in np.flatnonzero((u > 0) & (share == 0))]
    w = np.zeros(t)
    w[keep] = share
    if share.sum() > 0:
        m = _ties_forward(T, w, 1.0, bool(normalize))
        mm = float(m @ m)
        scaling = float(m @ y) / mm if mm > 0 else 0.0
    if not normalize:
        params["effective_weights"] = (scaling * w).tolist()
    params.update(scaling=scaling, iterations=it, refits=refits, converged=converged)
    residual = _relres(y, _ties_forward(T, w, scaling, bool(normalize)), ynorm)
    return Recovery("ties", w, w > threshold, residual, params, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Scoring and test data


def _weight_pair(true: Any, est: Any, verb: str) -> tuple[np.ndarray, np.ndarray]:
    """True and estimated weights as float64 1-D arrays of one length, all finite."""
    true = np.asarray(true, dtype=np.float64)
    est = np.asarray(est, dtype=np.float64)
    if true.ndim != 1 or true.shape != est.shape:
        raise GradfreeError(
            f"True and estimated weights must be 1-D of one length, got {true.shape}, {est.shape}."
        )
    if not (np.isfinite(true).all() and np.isfinite(est).all()):
        raise GradfreeError(f"The weights to {verb} contain NaN or infinite values.")
    return true, est


def support_metrics(true: Any, est: Any, threshold: float = 0.05) -> dict[str, Any]:
    """Precision, recall and F1 of the estimated support {i: |estᵢ| > threshold} against the true
    one {i: trueᵢ ≠ 0} (the tasks that went into the merge).

    Empty-set conventions: no task claimed → precision 1 (no false claim); no task present →
    recall 1 (none missed); F1 = 2PR/(P + R), 0 when P + R = 0 (so both sets empty gives 1)."""
    threshold = _check_threshold(threshold)
    true, est = _weight_pair(true, est, "score")
    t_set = true != 0
    e_set = np.abs(est) > threshold
    tp = int((t_set & e_set).sum())
    fp = int((~t_set & e_set).sum())
    fn = int((t_set & ~e_set).sum())
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "true_positives": tp,
        "false_positives": fp,
        "false_negatives": fn,
        "threshold": threshold,
    }


def coef_error(true: Any, est: Any) -> dict[str, float]:
    """max |true − est| and ‖true − est‖ / ‖true‖ (rel_l2 is 0 when both are 0, inf when only
    true is 0)."""
    true, est = _weight_pair(true, est, "compare")
    diff = true - est
    tn = float(np.linalg.norm(true))
    dn = float(np.linalg.norm(diff))
    rel = dn / tn if tn > 0 else (0.0 if dn == 0 else float("inf"))
    return {"max_abs": float(np.abs(diff).max()) if diff.size else 0.0, "rel_l2": rel}


def noisy(y: Any, rel_noise: float, seed: int) -> np.ndarray:
    """y plus Gaussian noise of standard deviation rel_noise · rms(y) (numpy Generator(seed))."""
    y = np.asarray(y, dtype=np.float64)
    rel_noise = float(rel_noise)
    if not np.isfinite(rel_noise) or rel_noise < 0:
        raise GradfreeError(f"The relative noise must be a finite number ≥ 0, got {rel_noise}.")
    if not np.isfinite(y).all():
        raise GradfreeError("The delta to add noise to contains NaN or infinite values.")
    rms = float(np.sqrt(np.mean(y**2))) if y.size else 0.0
    rng = np.random.default_rng(seed)
    return y + rng.normal(0.0, rel_noise * rms, size=y.shape)
