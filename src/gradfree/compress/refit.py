"""Closed-form refits of the student's last MLP writers toward final states that its head maps
closest to the teacher's logits (issue 17 part 4).

The distilled head changes only what the student does with its final states. Here the states
themselves move. For each calibration token, with the student's head ``H`` (V × d), the
teacher's logits ``z_T = H_T x_T`` and the student's normed final state ``x``, the target normed
state is the ridge least-squares fit of the teacher's *centred* logits (softmax ignores a
shift, so the fit should too; ``P = I − 11ᵀ/V``)::

    x* = argmin_x ‖P(H x − z_T)‖² + μ‖x − x_S‖² = (HᵀPH + μI)⁻¹ (HᵀPH_T x_T + μ x_S)

(:func:`state_map`: both matrices once, ``d × d`` and ``d × d_T``; μ relative to tr(HᵀPH)/d).
The final norm is an RMSNorm, ``x = g ⊙ h / rms(h)``: the pre-norm target keeps the current
scale, ``h* = rms(h) · u / rms(u)`` with ``u = x*/g`` (:func:`prenorm_targets`; then
``norm(h*) = x*/rms(u)``, the nearest state the norm can give up to its scale).

A block's output is its residual plus its MLP writer's output, ``h = r + W a``, so moving the
final state by ``δ = h* − h`` through block ``j``'s down projection is the ridge fit (toward no
change) ``ΔW = (Σ δ aᵀ)(Σ a aᵀ + λI)⁻¹`` (:func:`writer_update`), applied with a strength α
chosen on validation KL. Several blocks are refitted from the last one backwards, each on what
the blocks after it left of ``δ`` (recaptured through them). Pure maths here; the plumbing is
:func:`refit_last_writers_`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradfree.adapters import get_adapter
from gradfree.base.errors import GradfreeError
from gradfree.base.numerics import f64
from gradfree.solvers.ridge import resolve_lambda, ridge_from_stats
from gradfree.surgery.edit import norm_eps, param

# --- maths ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StateMap:
    """``x* = A x_T + B x_S`` (float64): the target normed state as a linear map of the
    teacher's and the student's normed states."""

    a: torch.Tensor  # d × d_T
    b: torch.Tensor  # d × d

    def __call__(self, x_t: torch.Tensor, x_s: torch.Tensor) -> torch.Tensor:
        return f64(x_t) @ self.a.T + f64(x_s) @ self.b.T


def _centred_gram(u: torch.Tensor, v: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """``UᵀPV`` for tall U (V × m), V (V × n) in float64, row chunks (a 151,936-row head)."""
    out = torch.zeros(u.shape[1], v.shape[1], dtype=torch.float64, device=u.device)
    su = torch.zeros(u.shape[1], dtype=torch.float64, device=u.device)
    sv = torch.zeros(v.shape[1], dtype=torch.float64, device=u.device)
    for i in range(0, u.shape[0], chunk):
        a, b = f64(u[i : i + chunk]), f64(v[i : i + chunk]).to(u.device)
        out += a.T @ b
        su += a.sum(0)
        sv += b.sum(0)
    return out - torch.outer(su, sv) / u.shape[0]


def state_map(head: torch.Tensor, teacher_head: torch.Tensor, rel_mu: float) -> StateMap:
    """The :class:`StateMap` of ``x* = (HᵀPH + μI)⁻¹ (HᵀPH_T x_T + μ x_S)``,
    ``μ = rel_mu · tr(HᵀPH)/d`` (``rel_mu`` > 0 keeps the system definite)."""
    if head.shape[0] != teacher_head.shape[0]:
        raise GradfreeError("The student's and the teacher's heads must share one vocabulary.")
    if not rel_mu > 0:
        raise GradfreeError(f"The state prior μ must be > 0, not {rel_mu}.")
    g = _centred_gram(head, head)
    k = _centred_gram(head, teacher_head)
    mu = resolve_lambda(g, rel_lam=rel_mu)
    reg = g + mu * torch.eye(g.shape[0], dtype=torch.float64, device=g.device)
    chol = torch.linalg.cholesky(0.5 * (reg + reg.T))
    a = torch.cholesky_solve(k, chol)
    b = mu * torch.cholesky_inverse(chol)
    return StateMap(a, b)


def rms(h: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Root mean square over the last dimension, kept as a (…, 1) column."""
    return (f64(h).pow(2).mean(-1, keepdim=True) + eps).sqrt()


def prenorm_targets(
    x_star: torch.Tensor, h: torch.Tensor, gain: torch.Tensor, eps: float
) -> torch.Tensor:
    """``h* = rms(h) · u / rms(u)``, ``u = x*/g``: a pre-norm state whose RMSNorm (gain ``g``)
    points at ``x*`` and whose scale is the current one (float64)."""
    g = f64(gain).to(x_star.device)
    small = g.abs() < 1e-6 * float(g.abs().max())
    if bool(small.any()):  # a dead gain cannot be inverted: that coordinate is left alone
        g = torch.where(small, torch.ones_like(g), g)
    u = f64(x_star) / g
    u = torch.where(small, f64(h) / rms(h, eps), u)
    return rms(h, eps) * u / rms(u).clamp_min(1e-30)


def writer_update(gram_a: torch.Tensor, cross_da: torch.Tensor, rel_lam: float) -> torch.Tensor:
    """``ΔW = (Σ δ aᵀ)(Σ a aᵀ + λI)⁻¹`` (out × in), λ = rel_lam · tr(Σ a aᵀ)/in."""
    lam = resolve_lambda(gram_a, rel_lam=rel_lam)
    zero = torch.zeros_like(f64(cross_da))
    return ridge_from_stats(f64(gram_a), f64(cross_da).T, lam=lam, prior=zero)


# --- plumbing -------------------------------------------------------------------------------

Say = Callable[[str], None]


@dataclass
class _Pass:
    """Per-token tensors of one pass of the student over the calibration windows."""

    hidden: list[torch.Tensor]  # block j's down_proj input, per window (t × f)
    resid: list[torch.Tensor]  # the final norm's input, per window (t × d)
    normed: list[torch.Tensor]  # the final norm's output, per window (t × d)


@torch.no_grad()
def _student_pass(student: nn.Module, windows: Sequence[torch.Tensor], block: int) -> _Pass:
    from gradfree.capture.hooks import site_hooks

    adapter = get_adapter(student)
    keys = [f"blocks.{block}.mlp_hidden", "final.resid", "final.normed"]
    got: dict[str, torch.Tensor] = {}
    out = _Pass([], [], [])
    device = next(student.parameters()).device
    with site_hooks(adapter, keys, lambda k, x: got.__setitem__(k, x[0])) as hooks:
        for ids in windows:
            got.clear()
            ids = ids.to(device)
            hooks.forward(ids[None], torch.ones_like(ids)[None])
            out.hidden.append(got[keys[0]].detach())
            out.resid.append(got[keys[1]].detach())
            out.normed.append(got[keys[2]].detach())
    return out


@torch.no_grad()
def teacher_states(teacher: nn.Module, windows: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The teacher's normed final states per window (its logits are ``H_T`` times them)."""
    from gradfree.compress.head import final_states

    return [final_states(teacher, ids).detach() for ids in windows]


def refit_last_writers_(
    student: nn.Module,
    teacher_head: torch.Tensor,
    windows: Sequence[torch.Tensor],
    x_teacher: Sequence[torch.Tensor],
    *,
    blocks: int = 1,
    rel_mu: float = 1.0,
    rel_lam: float = 1e-2,
    choose: Callable[[nn.Module, Callable[[float], None]], float] | None = None,
    say: Say = lambda _m: None,
) -> dict[str, Any]:
    """Refit the down projections of the last ``blocks`` blocks of ``student`` in place toward
    the target final states (module docstring) on the calibration ``windows`` (token ids, each
    its own sequence), whose teacher normed states are ``x_teacher``.

    ``choose(student, apply)`` picks each block's strength α: ``apply(α)`` sets
    ``W = W₀ + α ΔW`` and ``choose`` returns the α to keep (None: α = 1). Returns a ledger.
    """
    a = get_adapter(student)
    if not 1 <= blocks <= a.num_layers:
        raise GradfreeError(f"Refit 1 to {a.num_layers} blocks, not {blocks}.")
    if len(windows) != len(x_teacher) or not windows:
        raise GradfreeError("Each calibration window needs the teacher's states on it.")
    head = param(a.lm_head).detach()
    smap = state_map(head, teacher_head, rel_mu)
    gain, eps = param(a.final_norm).detach(), norm_eps(a.final_norm)
    # the targets are fixed once, from the unchanged student (x_S) and the teacher
    first = _student_pass(student, windows, a.num_layers - 1)
    targets = [
        prenorm_targets(smap(xt.to(xs.device), xs), h, gain, eps)
        for xt, xs, h in zip(x_teacher, first.normed, first.resid, strict=True)
    ]
    err0 = _target_error(first.resid, targets)
    rows = []
    for j in range(a.num_layers - 1, a.num_layers - 1 - blocks, -1):
        # block j's inputs and the final states, through the blocks after it as refitted
        cur = first if j == a.num_layers - 1 else _student_pass(student, windows, j)
        gram: torch.Tensor | None = None
        cross: torch.Tensor | None = None
        for hid, h, t in zip(cur.hidden, cur.resid, targets, strict=True):
            x = f64(hid.reshape(-1, hid.shape[-1]))
            d = (t.to(x.device) - f64(h)).reshape(-1, t.shape[-1])
            gram = x.T @ x if gram is None else gram + x.T @ x
            cross = d.T @ x if cross is None else cross + d.T @ x
        assert gram is not None and cross is not None
        lin = a.layer(j).mlp_output()
        w0 = param(lin).detach().clone()
        delta = writer_update(gram, cross, rel_lam).to(w0.device)

        def apply(
            alpha: float, lin: nn.Linear = lin, w0: torch.Tensor = w0, dw: torch.Tensor = delta
        ) -> None:
            with torch.no_grad():
                lin.weight.copy_((f64(w0) + alpha * dw).to(w0.dtype))

        alpha = 1.0 if choose is None else float(choose(student, apply))
        apply(alpha)
        rows.append({"block": j, "alpha": alpha, "update_norm": float(delta.norm() * alpha)})
        say(f"refit block {j} down_proj: alpha {alpha:g}")
    after = _student_pass(student, windows, a.num_layers - 1)
    return {
        "op": "refit_last_writers",
        "blocks": rows,
        "rel_mu": rel_mu,
        "rel_lambda": rel_lam,
        "tokens": int(sum(int(w.numel()) for w in windows)),
        "target_error_before": err0,
        "target_error_after": _target_error(after.resid, targets),
    }


def _target_error(resid: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> float:
    """Mean squared distance of the pre-norm states from their targets."""
    num = sum(
        float((f64(h) - t.to(h.device)).pow(2).sum()) for h, t in zip(resid, targets, strict=True)
    )
    den = sum(int(h.numel()) for h in resid)
    return num / max(den, 1)
