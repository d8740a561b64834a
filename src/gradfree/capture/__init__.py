"""Activation capture into streaming sufficient statistics (``gradfree capture``).

One model, or a teacher and a student on the same tokens, is run over documents with hooks at
canonical sites (:mod:`.sites`); every site streams into float64 :class:`MomentStats` (and, for
paired runs, teacher×student :class:`CrossStats`), saved as safetensors shards with a manifest
(:mod:`.store`). Captures resume after interruption and combine associatively over disjoint
documents. ``run_capture(..., sequential=True)`` (or lazy models, :mod:`gradfree.models.lazy`)
runs one decoder block at a time with its weights read only when it runs (:mod:`.sequential`).
``capture_distributed`` shards the batches over torch.distributed ranks (``torchrun``, or N local
workers) and reduces every statistic onto rank 0, which writes the capture (:mod:`.distributed`).

    cap = run_capture(subject, docs, "out/cap", CaptureConfig(sites=["resid_pre", "v"]))
    cov = cap.stats("model", "blocks.3.resid_pre", part="body").covariance()
"""

from __future__ import annotations

from gradfree.capture.combine import combine_captures
from gradfree.capture.config import CaptureConfig, make_config
from gradfree.capture.hooks import hook_count, site_hooks
from gradfree.capture.launch import capture_distributed
from gradfree.capture.plan import Subject
from gradfree.capture.runner import run_capture
from gradfree.capture.sequential import run_sequential
from gradfree.capture.sites import DEFAULT_SITES, SITES, Site, parse_layers, parse_sites
from gradfree.capture.stats import CrossStats, MomentStats
from gradfree.capture.store import Capture, load_capture

__all__ = [
    "DEFAULT_SITES",
    "SITES",
    "Capture",
    "CaptureConfig",
    "CrossStats",
    "MomentStats",
    "Site",
    "Subject",
    "capture_distributed",
    "combine_captures",
    "hook_count",
    "load_capture",
    "make_config",
    "parse_layers",
    "parse_sites",
    "run_capture",
    "run_sequential",
    "site_hooks",
]
