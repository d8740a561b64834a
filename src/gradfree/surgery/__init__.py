"""Function-preserving model surgery: the exact transforms that compression and alignment build on.

Every transform edits a Hugging Face causal LM in place (names end in ``_``), reaches the model
only through :mod:`gradfree.adapters`, computes in float64 and casts back once, and returns a
JSON-ready ledger of what it did. The test suite proves each one leaves the logits unchanged on
every supported family (tied embeddings, biases, GQA and Qwen3's q/k norms included).

* :func:`untie_`, :func:`fuse_norms_` — give the head its own weight; fold RMSNorm weights into
  the linears that read them (the SliceGPT/QuaRot preliminary; no mean-centring for RMSNorm).
* :func:`rotate_residual_` — one orthogonal basis for the whole residual stream (SliceGPT's
  computational invariance); :func:`per_layer_rotation_error` measures per-layer bases and
  :func:`rotate_per_layer_` applies them (an approximation: no transitions).
* :func:`permute_heads_`, :func:`permute_kv_groups_`, :func:`permute_neurons_` — GQA-safe
  permutations of heads, KV groups and MLP neurons.
* :func:`rotate_head_values_`, :func:`rotate_qk_pairs_` — orthogonal maps inside heads: values
  freely, queries/keys per RoPE frequency pair.
* :func:`slice_` — keep the leading ``k`` residual dimensions; exact when the rest is empty.
* :func:`exact_rmsnorm` — float64 RMSNorm for exactness tests (HF's computes in float32).

The commands built on these live in their own modules (not imported here): :mod:`.basis` (PCA
bases from captured statistics), :mod:`.export` (``gradfree rotate`` / ``gradfree slice``: plain
checkpoint, reload check, ledger, report), :mod:`.transitions` (per-layer bases, simulated).
"""

from gradfree.surgery.exact import exact_rmsnorm
from gradfree.surgery.fold import fuse_norms_, untie_
from gradfree.surgery.heads import rotate_head_values_, rotate_qk_pairs_
from gradfree.surgery.ledger import orthogonality, rotation_entry, rotation_hash, rotation_ledger
from gradfree.surgery.maths import (
    as_permutation,
    check_orthogonal,
    invert_permutation,
    is_orthogonal,
    orthogonality_error,
    random_orthogonal,
    random_permutation,
)
from gradfree.surgery.permute import permute_heads_, permute_kv_groups_, permute_neurons_
from gradfree.surgery.rotate import per_layer_rotation_error, rotate_per_layer_, rotate_residual_
from gradfree.surgery.slicing import slice_

__all__ = [
    "as_permutation",
    "check_orthogonal",
    "exact_rmsnorm",
    "fuse_norms_",
    "invert_permutation",
    "is_orthogonal",
    "orthogonality",
    "orthogonality_error",
    "per_layer_rotation_error",
    "permute_heads_",
    "permute_kv_groups_",
    "permute_neurons_",
    "random_orthogonal",
    "random_permutation",
    "rotate_head_values_",
    "rotate_per_layer_",
    "rotate_qk_pairs_",
    "rotate_residual_",
    "rotation_entry",
    "rotation_hash",
    "rotation_ledger",
    "slice_",
    "untie_",
]
