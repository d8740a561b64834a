"""Layer maps between a teacher with L_t blocks and a student with L_s blocks.

A layer map gives, for each student block j, the teacher block i whose *input* residual stream
(``blocks.{i}.resid_pre``) is paired with the student's ``blocks.{j}.resid_pre``. The default is
proportional depth, i = round(j · L_t / L_s), which pairs block inputs at the same relative depth
and maps 0 → 0. Explicit maps must be monotone non-decreasing and within range.
"""

from __future__ import annotations

import itertools

from gradfree.errors import GradfreeError


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
