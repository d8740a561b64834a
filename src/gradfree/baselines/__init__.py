"""Baselines that gradfree's own methods are measured against, reimplemented in process.

:mod:`gradfree.baselines.slicegpt`: SliceGPT (Ashkboos et al. 2024) with per-block PCA bases and
the shortcut matrices on the residual path; not a plain checkpoint, so it is evaluated in memory.
"""

from gradfree.baselines.slicegpt import (
    SliceGPTResult,
    calibration_windows,
    param_count,
    slicegpt_,
    slicegpt_fraction_for_params,
    slicegpt_param_formula,
    slicegpt_width,
)

__all__ = [
    "SliceGPTResult",
    "calibration_windows",
    "param_count",
    "slicegpt_",
    "slicegpt_fraction_for_params",
    "slicegpt_param_formula",
    "slicegpt_width",
]
