"""Layer maps between a teacher with L_t blocks and a student with L_s blocks.

A layer map gives, for each student block j, the teacher block i whose *input* residual stream
(``blocks.{i}.resid_pre``) is paired with the student's ``blocks.{j}.resid_pre``. The default is
proportional depth, i = round(j · L_t / L_s), which pairs block inputs at the same relative depth
and maps 0 → 0. Explicit maps must be monotone non-decreasing and within range.

Data-driven maps: linear CKA from (cross-)covariances and the best monotone student→teacher map.

Linear CKA (Kornblith et al. 2019, "Similarity of neural network representations revisited")
between two representations of the same tokens, from centered (cross-)covariances:
CKA = ‖C_xy‖_F² / (‖C_xx‖_F ‖C_yy‖_F). It is invariant to orthogonal transforms and isotropic
scaling of either side and allows different widths, so it compares a student layer with a
teacher layer directly.

Given a score S[j, i] for student layer j against teacher layer i, :func:`monotone_layer_map`
finds the non-decreasing (or strictly increasing) map j → m(j) that maximises Σ_j S[j, m(j)] by
dynamic programming, the monotone alignment used for sequence alignment (dynamic time warping,
Sakoe & Chiba 1978) restricted to one teacher layer per student layer.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from gradfree.base.errors import GradfreeError
from gradfree.base.numerics import f64


def linear_cka_from_moments(cxx: torch.Tensor, cyy: torch.Tensor, cxy: torch.Tensor) -> float:
    """‖C_xy‖_F² / (‖C_xx‖_F ‖C_yy‖_F) for centered covariances C_xx (dx×dx), C_yy (dy×dy) and
    the centered cross-covariance C_xy (dx×dy) of the same tokens. In [0, 1].

    A ValueError when a side has zero variance (CKA is undefined there). From streamed
    statistics: :func:`gradfree.capture.similarity.linear_cka_from_stats`.
    """
    if cxy.shape != (cxx.shape[0], cyy.shape[0]):
        raise ValueError(f"cxy must be {cxx.shape[0]}×{cyy.shape[0]}, got {tuple(cxy.shape)}")
    denom = float(torch.linalg.matrix_norm(f64(cxx))) * float(torch.linalg.matrix_norm(f64(cyy)))
    if denom <= 0:
        raise ValueError("a representation has zero variance; CKA is undefined")
    c = f64(cxy)
    return float((c * c).sum()) / denom  # the sum of squares, not a rounded norm squared


def monotone_layer_map(
    score: torch.Tensor | np.ndarray, strict: bool = False, anchor_ends: bool = False
) -> list[int]:
    """The map j → m(j) (student layer j → teacher layer) maximising Σ_j S[j, m(j)] for a score
    matrix S of shape (L_s, L_t), with m non-decreasing (``strict``: strictly increasing, which
    needs L_t >= L_s). ``anchor_ends`` forces m(0) = 0 and m(L_s − 1) = L_t − 1.

    O(L_s · L_t) dynamic programming: best[j, i] = S[j, i] + max_{i' <= i} best[j − 1, i']
    (i' < i when strict). Ties go to the smaller teacher index.
    """
    s = score.detach().cpu().double().numpy() if isinstance(score, torch.Tensor) else score
    s = np.asarray(s, dtype=np.float64)
    if s.ndim != 2 or 0 in s.shape or not np.isfinite(s).all():
        raise ValueError("the score matrix must be a finite, non-empty L_s×L_t matrix")
    n_s, n_t = s.shape
    if strict and n_t < n_s:
        raise ValueError(f"a strictly increasing map needs L_t >= L_s, got {n_t} < {n_s}")
    best = np.full((n_s, n_t), -np.inf)
    back = np.zeros((n_s, n_t), dtype=np.int64)
    best[0] = s[0]
    if anchor_ends:
        best[0, 1:] = -np.inf
    for j in range(1, n_s):
        run_val, run_idx = -np.inf, 0  # running max of best[j-1, :i] (strict) or [: i + 1]
        for i in range(n_t):
            if not strict and best[j - 1, i] > run_val:
                run_val, run_idx = best[j - 1, i], i
            best[j, i], back[j, i] = s[j, i] + run_val, run_idx
            if strict and best[j - 1, i] > run_val:
                run_val, run_idx = best[j - 1, i], i
    last = n_t - 1 if anchor_ends else int(np.argmax(best[-1]))  # argmax: first of ties
    if not np.isfinite(best[-1, last]):
        raise ValueError("no monotone map satisfies the constraints")
    path = [last]
    for j in range(n_s - 1, 0, -1):
        path.append(int(back[j, path[-1]]))
    return path[::-1]


def proportional_map(n_teacher: int, n_student: int) -> list[int]:
    """Student block j → teacher block round(j · n_teacher / n_student) (half rounds up)."""
    if n_teacher < 1 or n_student < 1:
        raise GradfreeError("Layer counts must be positive to build a layer map.")
    return [
        min(n_teacher - 1, (2 * j * n_teacher + n_student) // (2 * n_student))
        for j in range(n_student)
    ]


def validate_map(layer_map: list[int], n_teacher: int, n_student: int) -> list[int]:
    """Check an explicit map: one teacher layer per student layer, in range, monotone."""
    if len(layer_map) != n_student:
        raise GradfreeError(
            f"The layer map has {len(layer_map)} entries but the student has {n_student} layers."
        )
    if any(not 0 <= i < n_teacher for i in layer_map):
        raise GradfreeError(f"The layer map names a teacher layer outside 0..{n_teacher - 1}.")
    if any(b < a for a, b in itertools.pairwise(layer_map)):
        raise GradfreeError("The layer map must be monotone non-decreasing.")
    return list(layer_map)


def resolve_map(spec: str | list[int] | None, n_teacher: int, n_student: int) -> list[int]:
    """None/"proportional" → proportional_map; a list or "0,2,4" → a validated explicit map."""
    if spec is None or spec == "proportional":
        return proportional_map(n_teacher, n_student)
    if isinstance(spec, str):
        try:
            spec = [int(p) for p in spec.split(",") if p.strip()]
        except ValueError:
            raise GradfreeError(
                "A layer map is 'proportional' or comma-separated teacher layer indices."
            ) from None
    return validate_map(list(spec), n_teacher, n_student)
