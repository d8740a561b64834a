"""Planted teachers for tests: a student embedded in a wider residual stream and rotated.

``embed_student(student, d_teacher)`` returns a teacher that computes exactly the student's
function: its residual stream is x_T = Q [x_S; 0] for a random orthogonal Q (d_T×d_T), its readers
are √(d_S/d_T) [W, 0] Qᵀ diag(1/w) behind random positive norm weights w, its writers Q [W; 0],
its epsilon eps_S·d_S/d_T (so that rms_T and rms_S agree exactly, see :mod:`.project`).
Optionally heads are permuted within KV groups and MLP neurons permuted, so that the compression
must also recover those (Hungarian matching). Compression should return the student exactly,
with V = Q[:, :d_S].
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from gradfree.adapters import config_for_width, get_adapter, untie_config_
from gradfree.base.numerics import f64
from gradfree.surgery import fuse_norms_, permute_heads_, permute_neurons_
from gradfree.surgery.edit import assign_, maybe_param, param, set_norm_eps_
from gradfree.surgery.maths import random_orthogonal, random_permutation


@torch.no_grad()
def embed_student(
    student: nn.Module, d_teacher: int, seed: int = 0, permute: bool = True
) -> tuple[nn.Module, torch.Tensor]:
    """(teacher, Q): the planted teacher and its rotation (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    src = copy.deepcopy(student)
    fuse_norms_(src)
    s = get_adapter(src)
    d_s = s.hidden_size
    q = random_orthogonal(d_teacher, seed)
    qs = q[:, :d_s]  # x_T = Q [x_S; 0] = Qs x_S
    eps = s.norm_eps * d_s / d_teacher
    cfg: Any = untie_config_(config_for_width(src.config, d_teacher, eps))
    teacher = AutoModelForCausalLM.from_config(cfg, dtype=param(s.embed_tokens).dtype).eval()
    t = get_adapter(teacher)
    g = torch.Generator().manual_seed(seed + 7)
    r = math.sqrt(d_s / d_teacher)

    def norm_weight() -> torch.Tensor:
        return 0.5 + torch.rand(d_teacher, generator=g, dtype=torch.float64)

    def reader(dst: nn.Module, srcl: nn.Module, w: torch.Tensor) -> None:
        assign_(dst, "weight", r * f64(param(srcl)) @ qs.T / w)
        b = maybe_param(srcl, "bias")
        if b is not None:
            assign_(dst, "bias", f64(b))

    def writer(dst: nn.Module, srcl: nn.Module) -> None:
        assign_(dst, "weight", qs @ f64(param(srcl)))
        b = maybe_param(srcl, "bias")
        if b is not None:
            assign_(dst, "bias", qs @ f64(b))

    assign_(t.embed_tokens, "weight", f64(param(s.embed_tokens)) @ qs.T)
    for j in range(s.num_layers):
        ls, lt = s.layer(j), t.layer(j)
        for norm, readers in (
            ("attn_norm", ("q_proj", "k_proj", "v_proj")),
            ("mlp_norm", ("gate_proj", "up_proj")),
        ):
            w = norm_weight()
            assign_(getattr(lt, norm), "weight", w)
            set_norm_eps_(getattr(lt, norm), cfg.rms_norm_eps)
            for name in readers:
                reader(getattr(lt, name), getattr(ls, name), w)
        writer(lt.o_proj, ls.o_proj)
        writer(lt.down_proj, ls.down_proj)
        for name in ("q_norm", "k_norm"):
            if getattr(ls, name) is not None:
                assign_(getattr(lt, name), "weight", f64(param(getattr(ls, name))))
    w = norm_weight()
    assign_(t.final_norm, "weight", w)
    set_norm_eps_(t.final_norm, cfg.rms_norm_eps)
    reader(t.lm_head, s.lm_head, w)
    if permute:
        geo = t.geometry
        for j in range(t.num_layers):
            perm = torch.cat(
                [
                    torch.as_tensor(list(geo.heads_in_group(k)))[
                        random_permutation(geo.group_size, seed + 100 * j + k)
                    ]
                    for k in range(geo.num_kv_heads)
                ]
            )
            permute_heads_(teacher, j, perm)
            permute_neurons_(teacher, j, random_permutation(t.intermediate_size, seed + j))
    return teacher, q
