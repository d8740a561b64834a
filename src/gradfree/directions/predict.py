"""Predict a concept's direction from the model's frozen input embeddings, and the reverse.

Seed 004 reports that a concept's direction (its mean activation at a middle layer minus the mean
over concepts) is predicted from text with 0.90+ held-out cosine, and that a linear probe does
almost as well as an MLP. Here the gradient-free primary is closed-form ridge regression from the
concept's mean input embedding (float64, intercept, lambda chosen on a validation split); the
seed's gradient-trained baselines (frozen embeddings + MLP, a linear probe trained by gradient, a
tiny model with its own token embeddings trained from scratch) are reproduced in torch on the CPU
to compare against, and so is the inverse map (direction -> embedding) that the seed found lossy.

Splits are by concept: a concept's direction and its embedding are in exactly one of
train/val/test. The maths (ridge, cosines, splits) is plain numpy; torch is imported lazily inside
the baseline trainers only.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from gradfree.base.errors import GradfreeError
from gradfree.directions.concepts import split_concepts

if TYPE_CHECKING:
    import torch

# Seed 004 split its 50k concepts 35k / 7.5k / 7.5k.
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.7, 0.15, 0.15)
# The lambda grid is relative to the mean eigenvalue of the centred Gram matrix (trace / d), so
# that it does not depend on the scale of the embedding table.
REL_LAMBDAS: tuple[float, ...] = tuple(float(10.0**k) for k in np.arange(-6.0, 2.01, 0.5))
# The seed's table, in the seed's order, plus ridge (our primary) and the inverse map.
DEFAULT_METHODS: tuple[str, ...] = (
    "ridge",
    "mlp_h256",
    "mlp_h64",
    "linear_probe",
    "tiny_e64_h256",
    "inverse",
)
SEED_NUMBERS: dict[str, float] = {
    "mlp_h256": 0.9076,
    "mlp_h128": 0.9071,
    "linear_probe": 0.9062,
    "mlp_h64": 0.9019,
    "tiny_e64_h256": 0.8951,
    "tiny_e64_h128": 0.8858,
    "tiny_e32_h256": 0.8766,
    "tiny_e32_h128": 0.8674,
    "inverse": 0.3588,
}
BYTES_PER_PARAM = 4  # sizes at inference are given for float32 weights, as the seed did


# ----------------------------------------------------------------------------- checks


def _matrix(x: Any, name: str) -> np.ndarray:
    """``x`` as a finite 2-D float64 array with at least one row, or one sentence."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise GradfreeError(f"{name} must be a 2-D array (rows x features), got shape {a.shape}.")
    if a.shape[0] == 0:
        raise GradfreeError(f"There are no rows in {name}: a split needs at least one concept.")
    if not np.isfinite(a).all():
        raise GradfreeError(f"{name} contains NaN or infinite values.")
    return a


def _pair(x: Any, y: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets of one split, with matching row counts."""
    xa, ya = _matrix(x, f"the {what} inputs"), _matrix(y, f"the {what} targets")
    if xa.shape[0] != ya.shape[0]:
        raise GradfreeError(
            f"The {what} inputs have {xa.shape[0]} rows but the targets have {ya.shape[0]}."
        )
    return xa, ya


def _same_width(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise GradfreeError(
            f"The {what} have {b.shape[1]} columns where {a.shape[1]} were expected."
        )


# ----------------------------------------------------------------------------- metrics


def cos_rows(pred: Any, target: Any) -> np.ndarray:
    """Cosine between matching rows of two (n, d) arrays, in float64 (a zero row gives 0)."""
    p, y = _matrix(pred, "the predictions"), _matrix(target, "the targets")
    if p.shape != y.shape:
        raise GradfreeError(f"Predictions of shape {p.shape} do not match targets {y.shape}.")
    den = np.linalg.norm(p, axis=1) * np.linalg.norm(y, axis=1)
    num = np.einsum("ij,ij->i", p, y)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def evaluate_cos(pred: Any, target: Any) -> float:
    """Mean cosine similarity between predicted and true rows (the seed's metric)."""
    return float(cos_rows(pred, target).mean())


# ----------------------------------------------------------------------------- splits


def split_by_concept(
    concepts: Sequence[str],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Disjoint train/val/test row indices, by concept (no concept string in two splits).

    The split is ``gradfree.directions.concepts.split_concepts``'s (one home for it); this adds
    the checks a predictor needs (positive fractions, no empty split).
    """
    concepts = list(concepts)
    if not concepts:
        raise GradfreeError("The concept list is empty.")
    if len(set(concepts)) != len(concepts):
        dup = next(c for i, c in enumerate(concepts) if c in concepts[:i])
        raise GradfreeError(f"The concept list contains {dup!r} more than once.")
    fr = [float(f) for f in fractions]
    if len(fr) != 3 or min(fr) <= 0 or not math.isclose(sum(fr), 1.0, abs_tol=1e-6):
        raise GradfreeError(
            f"Split fractions must be three positive numbers summing to 1, not {fr}."
        )
    if len(concepts) < 3:
        raise GradfreeError(
            f"{len(concepts)} concepts are too few to split into train, val and test."
        )
    raw = split_concepts(concepts, fractions=tuple(fr), seed=seed)
    out = {k: np.asarray(sorted(raw[k]), dtype=np.int64) for k in ("train", "val", "test")}
    seen: dict[str, str] = {}
    for name, idx in out.items():
        if idx.size == 0:
            raise GradfreeError(f"The {name} split is empty; use more concepts.")
        for i in idx.tolist():
            c = concepts[i]
            if c in seen:
                raise GradfreeError(f"Concept {c!r} is in both the {seen[c]} and {name} splits.")
            seen[c] = name
    return out


# ----------------------------------------------------------------------------- inputs


def concept_token_ids(
    tokenizer: Any, concepts: Sequence[str], prefix: str = " "
) -> list[list[int]]:
    """Token ids of ``prefix + concept`` for each concept, without special tokens.

    The default prefix " " is the form in which the concept appears inside the extraction
    templates after a word ("The word {concept}"): byte-level BPE tokenizers (Qwen, GPT-2,
    SmolLM) give a different first token to "apple" and " apple".
    """
    if not concepts:
        raise GradfreeError("The concept list is empty.")
    enc = tokenizer([prefix + c for c in concepts], add_special_tokens=False)["input_ids"]
    ids = [list(map(int, e)) for e in enc]
    for c, e in zip(concepts, ids, strict=True):
        if not e:
            raise GradfreeError(f"Concept {c!r} tokenizes to no tokens.")
    return ids


def concept_embeddings(
    tokenizer: Any, embed_table: Any, concepts: Sequence[str], prefix: str = " "
) -> np.ndarray:
    """(N, d) float64: each concept's mean input-embedding row over its tokens (prefix+concept)."""
    table = np.asarray(embed_table)
    if table.ndim != 2:
        raise GradfreeError(f"The embedding table must be 2-D (vocab x width), got {table.shape}.")
    ids = concept_token_ids(tokenizer, concepts, prefix)
    top = max(max(e) for e in ids)
    if top >= table.shape[0]:
        raise GradfreeError(
            f"Token id {top} is outside the embedding table of {table.shape[0]} rows; "
            "the tokenizer and the table come from different models."
        )
    out = np.empty((len(ids), table.shape[1]), dtype=np.float64)
    for i, e in enumerate(ids):
        out[i] = table[e].astype(np.float64).mean(axis=0)
    return out


# ----------------------------------------------------------------------------- ridge


@dataclass
class RidgeMap:
    """An affine map ``Y ≈ X @ W + b`` fitted in closed form, with its chosen lambda."""

    W: np.ndarray  # (d_in, d_out) float64
    b: np.ndarray  # (d_out,) float64
    lam: float
    val_cos: float
    rel_lam: float = float("nan")  # lam / (trace(XᵀX) / d), the grid's scale-free coordinate
    grid: list[dict[str, float]] = field(default_factory=list)  # {"lam", "rel_lam", "val_cos"}

    def predict(self, X: Any) -> np.ndarray:
        x = _matrix(X, "the inputs")
        if x.shape[1] != self.W.shape[0]:
            raise GradfreeError(
                f"The inputs have {x.shape[1]} columns but the map expects {self.W.shape[0]}."
            )
        return x @ self.W + self.b

    @property
    def n_params(self) -> int:
        return int(self.W.size + self.b.size)


def ridge_solve(X: Any, Y: Any, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """One ridge solve with an unpenalised intercept: argmin |X W + b - Y|² + lam |W|²."""
    x, y = _pair(X, Y, "training")
    if not lam > 0:
        raise GradfreeError(f"The ridge penalty must be positive, not {lam}.")
    mx, my = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - mx, y - my
    g = xc.T @ xc
    g[np.diag_indices_from(g)] += lam
    W = np.linalg.solve(g, xc.T @ yc)
    return W, my - mx @ W


def fit_ridge(
    X_train: Any,
    Y_train: Any,
    X_val: Any,
    Y_val: Any,
    lambdas: Sequence[float] | None = None,
) -> RidgeMap:
    """Closed-form ridge (float64, intercept), lambda chosen by mean cosine on validation.

    One eigendecomposition of the centred Gram matrix serves the whole lambda grid. ``lambdas``
    are absolute penalties; by default the grid is ``REL_LAMBDAS`` times trace(XᵀX)/d.
    Validation picks by cosine because cosine is the reported metric (ties keep the larger lambda).
    """
    x, y = _pair(X_train, Y_train, "training")
    xv, yv = _pair(X_val, Y_val, "validation")
    _same_width(x, xv, "validation inputs")
    _same_width(y, yv, "validation targets")
    mx, my = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - mx, y - my
    evals, vecs = np.linalg.eigh(xc.T @ xc)
    evals = np.clip(evals, 0.0, None)
    scale = float(evals.sum()) / x.shape[1] or 1.0
    if lambdas is None:
        lams = [r * scale for r in REL_LAMBDAS]
    else:
        lams = [float(v) for v in lambdas]
        if not lams or not all(math.isfinite(v) and v > 0 for v in lams):
            raise GradfreeError("The lambda grid must be a non-empty list of positive numbers.")
    vc = vecs.T @ (xc.T @ yc)
    best: tuple[float, float, np.ndarray] | None = None
    grid: list[dict[str, float]] = []
    for lam in sorted(lams):
        W = vecs @ (vc / (evals + lam)[:, None])
        cos = evaluate_cos((xv - mx) @ W + my, yv)
        grid.append({"lam": lam, "rel_lam": lam / scale, "val_cos": cos})
        if best is None or cos >= best[1]:
            best = (lam, cos, W)
    assert best is not None
    lam, cos, W = best
    return RidgeMap(W=W, b=my - mx @ W, lam=lam, val_cos=cos, rel_lam=lam / scale, grid=grid)


def inverse_map(
    Y_train: Any,
    X_train: Any,
    Y_val: Any,
    X_val: Any,
    Y_test: Any,
    X_test: Any,
    forward: RidgeMap | None = None,
    lambdas: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Direction -> embedding: a ridge map fitted that way round, and its held-out cosine.

    With ``forward`` (embedding -> direction) also the seed's route, the pseudo-inverse of the
    forward map: ``X ≈ (Y - b) W⁺``. Cosines are on the raw embeddings (as the seed reported) and
    after removing the training mean embedding ("centred"), which the raw cosine partly rewards.
    """
    inv = fit_ridge(Y_train, X_train, Y_val, X_val, lambdas)
    yt, xt = _pair(Y_test, X_test, "test")
    mean_x = _matrix(X_train, "the training inputs").mean(axis=0)
    pred = inv.predict(yt)
    out: dict[str, Any] = {
        "map": inv,
        "test_cos": evaluate_cos(pred, xt),
        "test_cos_centered": evaluate_cos(pred - mean_x, xt - mean_x),
    }
    if forward is not None:
        ppred = (yt - forward.b) @ np.linalg.pinv(forward.W)
        out["pinv_test_cos"] = evaluate_cos(ppred, xt)
        out["pinv_test_cos_centered"] = evaluate_cos(ppred - mean_x, xt - mean_x)
    return out


# ----------------------------------------------------------------------------- torch baselines


@dataclass
class TrainedPredictor:
    """A torch baseline after training: its best-on-validation weights and its history."""

    model: Any  # torch.nn.Module, in eval mode
    kind: str  # "frozen" (inputs are embedding rows) or "tokens" (inputs are token-id lists)
    n_params: int  # trainable parameters, counted as deployed (the tiny model's full vocabulary)
    history: list[dict[str, float]]  # epoch 0 is before training
    best_epoch: int
    fit_s: float
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)
    _row_of: dict[int, int] = field(default_factory=dict, repr=False)

    def predict(self, inputs: Any, batch_size: int = 4096) -> np.ndarray:
        """Predictions as float64 numpy, for embedding rows or token-id lists (per ``kind``)."""
        import torch

        outs = []
        with torch.no_grad():
            if self.kind == "frozen":
                x = _matrix(inputs, "the inputs")
                for i in range(0, x.shape[0], batch_size):
                    outs.append(self.model(_tensor(x[i : i + batch_size], self)))
            else:
                for i in range(0, len(inputs), batch_size):
                    ids, offs = _bag(inputs[i : i + batch_size], self._row_of, self.device)
                    outs.append(self.model(ids, offs))
        return torch.cat(outs).double().cpu().numpy()


def _tensor(x: np.ndarray, p: TrainedPredictor) -> torch.Tensor:
    import torch

    dtype = next(p.model.parameters()).dtype
    return torch.as_tensor(x, dtype=dtype, device=p.device)


def _bag(
    seqs: Sequence[Sequence[int]], row_of: dict[int, int], device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened embedding-table rows and offsets for ``nn.EmbeddingBag``."""
    import torch

    flat: list[int] = []
    offs: list[int] = []
    for s in seqs:
        offs.append(len(flat))
        try:
            flat.extend(row_of[t] for t in s)
        except KeyError as e:
            raise GradfreeError(
                f"Token {e.args[0]} was not given to the tiny model when it was built."
            ) from None
    return (
        torch.tensor(flat, dtype=torch.long, device=device),
        torch.tensor(offs, dtype=torch.long, device=device),
    )


def _cos_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    return 1.0 - F.cosine_similarity(pred, target, dim=1, eps=1e-8).mean()


@dataclass(frozen=True)
class TrainSettings:
    """How the torch baselines train: the seed's recipe (AdamW on 1 − cosine, batch 128)."""

    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0
    max_steps: int | None = None  # a cap on optimiser steps, for quick tests
    device: str = "cpu"
    dtype: str = "float32"


def _train_loop(
    model: Any,
    n_train: int,
    forward_train: Callable[[Any], torch.Tensor],
    forward_all_train: Callable[[], torch.Tensor],
    forward_val: Callable[[], torch.Tensor],
    y_train: torch.Tensor,
    y_val: torch.Tensor,
    settings: TrainSettings,
    progress: Callable[[str], None] | None,
    name: str,
) -> tuple[list[dict[str, float]], int]:
    """AdamW on 1 − cosine, minibatches in a seeded order; keeps the best-on-validation state."""
    import copy

    import torch

    st = settings
    opt = torch.optim.AdamW(model.parameters(), lr=st.lr, weight_decay=st.weight_decay)
    gen = torch.Generator().manual_seed(st.seed)
    max_steps, batch_size = st.max_steps, st.batch_size

    def evaluate(epoch: int) -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            tr = float(_cos_loss(forward_all_train(), y_train))
            va = float(1.0 - _cos_loss(forward_val(), y_val))
        model.train()
        return {"epoch": epoch, "train_loss": tr, "val_cos": va}

    history = [evaluate(0)]
    best_epoch, best_state = 0, copy.deepcopy(model.state_dict())
    steps = 0
    for epoch in range(1, st.epochs + 1):
        perm = torch.randperm(n_train, generator=gen)
        for i in range(0, n_train, batch_size):
            idx = perm[i : i + batch_size]
            loss = _cos_loss(forward_train(idx), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        history.append(evaluate(epoch))
        if history[-1]["val_cos"] > history[best_epoch]["val_cos"]:
            best_epoch, best_state = epoch, copy.deepcopy(model.state_dict())
        if progress is not None:
            h = history[-1]
            progress(
                f"{name} epoch {epoch}: train loss {h['train_loss']:.4f} val cos {h['val_cos']:.4f}"
            )
        if max_steps is not None and steps >= max_steps:
            break
    model.load_state_dict(best_state)
    model.eval()
    return history, best_epoch


def train_mlp(
    X_train: Any,
    Y_train: Any,
    X_val: Any,
    Y_val: Any,
    *,
    hidden: int | None = 256,
    settings: TrainSettings = TrainSettings(),
    progress: Callable[[str], None] | None = None,
) -> TrainedPredictor:
    """Frozen embeddings -> MLP (Linear, GELU, Linear) or, with ``hidden=None``, a linear probe.

    Trained by gradient as the seed did (AdamW, lr 1e-3, weight decay 0.01, batch 128, 1 − cosine
    loss); the epoch with the best validation cosine is kept. Inputs are centred and scaled by one
    scalar (their training RMS) inside the model: an affine change that the first layer absorbs,
    so the parameter count is the seed's.
    """
    import torch
    from torch import nn

    from gradfree.models.load import resolve_dtype

    x, y = _pair(X_train, Y_train, "training")
    xv, yv = _pair(X_val, Y_val, "validation")
    _same_width(x, xv, "validation inputs")
    _same_width(y, yv, "validation targets")
    t0 = time.perf_counter()
    device, tdtype = settings.device, resolve_dtype(settings.dtype)
    torch.manual_seed(settings.seed)
    d_in, d_out = x.shape[1], y.shape[1]
    core: nn.Module = (
        nn.Linear(d_in, d_out)
        if hidden is None
        else nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))
    )
    mu = x.mean(axis=0)
    rms = float(np.sqrt(((x - mu) ** 2).mean())) or 1.0
    model = _Standardised(core, mu, rms).to(device=device, dtype=tdtype)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    xt, yt, xvt, yvt = (torch.as_tensor(a, dtype=tdtype, device=device) for a in (x, y, xv, yv))
    name = "linear probe" if hidden is None else f"mlp h={hidden}"
    history, best = _train_loop(
        model,
        x.shape[0],
        lambda idx: model(xt[idx]),
        lambda: model(xt),
        lambda: model(xvt),
        yt,
        yvt,
        settings,
        progress,
        name,
    )
    return TrainedPredictor(
        model=model,
        kind="frozen",
        n_params=int(n_params),
        history=history,
        best_epoch=best,
        fit_s=time.perf_counter() - t0,
        device=device,
        extra={"hidden": hidden, **_recipe(settings)},
    )


def _recipe(settings: TrainSettings) -> dict[str, Any]:
    """The training choices recorded with a baseline's row."""
    return {"epochs": settings.epochs, "lr": settings.lr, "batch_size": settings.batch_size}


def _standardised_cls() -> type:
    from torch import nn

    class Standardised(nn.Module):
        """``core((x − mu) / rms)`` with ``mu`` and ``rms`` fixed buffers (not trained)."""

        def __init__(self, core: nn.Module, mu: np.ndarray, rms: float) -> None:
            import torch

            super().__init__()
            self.core = core
            self.register_buffer("mu", torch.as_tensor(mu, dtype=torch.float32))
            self.rms = rms

        def forward(self, x: Any) -> Any:
            return self.core((x - self.mu) / self.rms)

    return Standardised


def _Standardised(core: Any, mu: np.ndarray, rms: float) -> Any:
    return _standardised_cls()(core, mu, rms)


def _tiny_cls() -> type:
    from torch import nn

    class TinyModel(nn.Module):
        """Own token embeddings (mean over the concept's tokens) -> Linear, GELU, Linear."""

        def __init__(self, rows: int, embed_dim: int, hidden: int, d_out: int) -> None:
            super().__init__()
            self.embed = nn.EmbeddingBag(rows, embed_dim, mode="mean")
            nn.init.normal_(self.embed.weight)  # nn.Embedding's default initialisation
            self.mlp = nn.Sequential(
                nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, d_out)
            )

        def forward(self, ids: Any, offsets: Any) -> Any:
            return self.mlp(self.embed(ids, offsets))

    return TinyModel


def train_tiny(
    ids_train: Sequence[Sequence[int]],
    Y_train: Any,
    ids_val: Sequence[Sequence[int]],
    Y_val: Any,
    *,
    vocab_size: int,
    extra_ids: Sequence[Sequence[int]] = (),
    embed_dim: int = 64,
    hidden: int = 256,
    settings: TrainSettings = TrainSettings(),
    progress: Callable[[str], None] | None = None,
) -> TrainedPredictor:
    """The seed's standalone model: its own ``embed_dim`` token embeddings + MLP, from scratch.

    Only the rows of tokens that occur in ``ids_train``, ``ids_val`` or ``extra_ids`` (pass the
    test concepts' ids) are materialised: every other row of a full ``vocab_size`` table never
    meets a concept, so leaving it out changes no prediction and saves the optimiser updating
    ~10M untouched numbers. ``n_params`` still counts the full table, as the seed did (it is what
    a deployed model needs to accept any word).
    """
    import torch

    from gradfree.models.load import resolve_dtype

    y = _matrix(Y_train, "the training targets")
    yv = _matrix(Y_val, "the validation targets")
    _same_width(y, yv, "validation targets")
    for what, ids, ys in (("training", ids_train, y), ("validation", ids_val, yv)):
        if len(ids) != ys.shape[0]:
            raise GradfreeError(
                f"The {what} split has {len(ids)} token lists but {ys.shape[0]} targets."
            )
        if any(len(s) == 0 for s in ids):
            raise GradfreeError(f"A {what} concept has no tokens.")
    t0 = time.perf_counter()
    used = sorted({int(t) for seqs in (ids_train, ids_val, extra_ids) for s in seqs for t in s})
    if used[0] < 0 or used[-1] >= vocab_size:
        raise GradfreeError(f"Token ids must lie in [0, {vocab_size}); got {used[0]}..{used[-1]}.")
    row_of = {t: i for i, t in enumerate(used)}
    device, tdtype = settings.device, resolve_dtype(settings.dtype)
    torch.manual_seed(settings.seed)
    model = _tiny_cls()(len(used), embed_dim, hidden, y.shape[1]).to(device=device, dtype=tdtype)
    n_mlp = sum(p.numel() for p in model.mlp.parameters())
    n_params = vocab_size * embed_dim + n_mlp
    tr_ids, tr_offs = _bag(ids_train, row_of, device)
    va_ids, va_offs = _bag(ids_val, row_of, device)
    yt, yvt = (torch.as_tensor(a, dtype=tdtype, device=device) for a in (y, yv))
    train_seqs = [list(s) for s in ids_train]

    def forward_batch(idx: torch.Tensor) -> torch.Tensor:
        ids, offs = _bag([train_seqs[i] for i in idx.tolist()], row_of, device)
        return model(ids, offs)  # type: ignore[no-any-return]

    history, best = _train_loop(
        model,
        len(train_seqs),
        forward_batch,
        lambda: model(tr_ids, tr_offs),
        lambda: model(va_ids, va_offs),
        yt,
        yvt,
        settings,
        progress,
        f"tiny e={embed_dim} h={hidden}",
    )
    return TrainedPredictor(
        model=model,
        kind="tokens",
        n_params=int(n_params),
        history=history,
        best_epoch=best,
        fit_s=time.perf_counter() - t0,
        device=device,
        extra={
            "embed_dim": embed_dim,
            "hidden": hidden,
            **_recipe(settings),
            "rows_materialised": len(used),
            "vocab_size": vocab_size,
        },
        _row_of=row_of,
    )


# ----------------------------------------------------------------------------- the table


_MLP = re.compile(r"^mlp_h(\d+)$")
_TINY = re.compile(r"^tiny_e(\d+)_h(\d+)$")


def _check_methods(methods: Sequence[str]) -> None:
    if not methods:
        raise GradfreeError("No predictor methods were asked for.")
    for m in methods:
        if m not in ("ridge", "linear_probe", "inverse") and not (_MLP.match(m) or _TINY.match(m)):
            raise GradfreeError(
                f"Unknown predictor method {m!r}; use ridge, linear_probe, mlp_h<H>, "
                "tiny_e<E>_h<H> or inverse."
            )


def predictor_table(
    directions: Any,
    embed_table: Any,
    tokenizer: Any,
    layer: int,
    pooling: str,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    epochs: int = 50,
    lambdas: Sequence[float] | None = None,
    prefix: str = " ",
    max_steps: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per method: parameters, bytes at inference, train/val/test cosine, fit seconds.

    ``directions`` is a ``gradfree.directions.store.Directions``; its vectors at (layer, pooling)
    are the targets, the concepts' mean input embeddings (``concept_embeddings`` with ``prefix``)
    the inputs of every method except the tiny model, which reads the token ids. Frozen methods'
    bytes at inference include the embedding table (V x d float32) that they need; the seed's
    number for the same method is in ``seed_test_cos``.
    """
    _check_methods(methods)
    settings = TrainSettings(
        epochs=epochs, seed=seed, max_steps=max_steps, device=device, dtype=dtype
    )
    concepts = list(directions.concepts)
    Y = _matrix(directions.get(layer, pooling), f"the directions at layer {layer} ({pooling})")
    if Y.shape[0] != len(concepts):
        raise GradfreeError(f"The directions have {Y.shape[0]} rows for {len(concepts)} concepts.")
    table = np.asarray(embed_table)
    split = split_by_concept(concepts, fractions, seed)
    ids = concept_token_ids(tokenizer, concepts, prefix)
    X = concept_embeddings(tokenizer, table, concepts, prefix)
    tr, va, te = split["train"], split["val"], split["test"]
    table_params = int(table.shape[0] * table.shape[1])
    rows: list[dict[str, Any]] = []

    def row(
        method: str,
        params: int,
        frozen_table: bool,
        cos: tuple[float, float, float],
        fit_s: float,
        **details: Any,
    ) -> None:
        inference = params + (table_params if frozen_table else 0)
        rows.append(
            {
                "method": method,
                "input": "frozen input embeddings" if frozen_table else "own token embeddings",
                "params": int(params),
                "params_inference": int(inference),
                "bytes_inference": int(inference * BYTES_PER_PARAM),
                "train_cos": cos[0],
                "val_cos": cos[1],
                "test_cos": cos[2],
                "fit_s": fit_s,
                "seed_test_cos": SEED_NUMBERS.get(method),
                "details": details,
            }
        )
        if progress is not None:
            progress(f"{method}: test cos {cos[2]:.4f} ({fit_s:.1f} s)")

    def cos3(
        predict: Callable[[Any], np.ndarray], inputs: Callable[[np.ndarray], Any]
    ) -> tuple[float, float, float]:
        return tuple(evaluate_cos(predict(inputs(i)), Y[i]) for i in (tr, va, te))  # type: ignore[return-value]

    forward: RidgeMap | None = None
    for m in methods:
        if m == "ridge" or (m == "inverse" and forward is None):
            t0 = time.perf_counter()
            forward = fit_ridge(X[tr], Y[tr], X[va], Y[va], lambdas)
            fit_s = time.perf_counter() - t0
            if m == "ridge":
                row(
                    "ridge",
                    forward.n_params,
                    True,
                    cos3(forward.predict, lambda i: X[i]),
                    fit_s,
                    lam=forward.lam,
                    rel_lam=forward.rel_lam,
                    grid=forward.grid,
                )
        if m == "inverse":
            assert forward is not None
            t0 = time.perf_counter()
            inv = inverse_map(Y[tr], X[tr], Y[va], X[va], Y[te], X[te], forward, lambdas)
            fit_s = time.perf_counter() - t0
            imap: RidgeMap = inv["map"]
            cos = (evaluate_cos(imap.predict(Y[tr]), X[tr]), imap.val_cos, inv["test_cos"])
            rows.append(
                {
                    "method": "inverse",
                    "input": "direction -> concept embedding (ridge)",
                    "params": imap.n_params,
                    "params_inference": imap.n_params,
                    "bytes_inference": imap.n_params * BYTES_PER_PARAM,
                    "train_cos": cos[0],
                    "val_cos": cos[1],
                    "test_cos": cos[2],
                    "fit_s": fit_s,
                    "seed_test_cos": SEED_NUMBERS["inverse"],
                    "details": {
                        "lam": imap.lam,
                        "test_cos_centered": inv["test_cos_centered"],
                        "pinv_test_cos": inv["pinv_test_cos"],
                        "pinv_test_cos_centered": inv["pinv_test_cos_centered"],
                    },
                }
            )
            if progress is not None:
                progress(f"inverse: test cos {cos[2]:.4f} (pinv {inv['pinv_test_cos']:.4f})")
        elif m == "linear_probe" or _MLP.match(m):
            mm = _MLP.match(m)
            hidden = int(mm.group(1)) if mm else None
            p = train_mlp(
                X[tr],
                Y[tr],
                X[va],
                Y[va],
                hidden=hidden,
                settings=settings,
                progress=progress,
            )
            row(
                m,
                p.n_params,
                True,
                cos3(p.predict, lambda i: X[i]),
                p.fit_s,
                best_epoch=p.best_epoch,
                **p.extra,
            )
        elif _TINY.match(m):
            mt = _TINY.match(m)
            assert mt is not None
            e, h = int(mt.group(1)), int(mt.group(2))
            p = train_tiny(
                [ids[i] for i in tr],
                Y[tr],
                [ids[i] for i in va],
                Y[va],
                vocab_size=table.shape[0],
                extra_ids=[ids[i] for i in te],
                embed_dim=e,
                hidden=h,
                settings=settings,
                progress=progress,
            )
            row(
                m,
                p.n_params,
                False,
                cos3(p.predict, lambda i: [ids[j] for j in i]),
                p.fit_s,
                best_epoch=p.best_epoch,
                **p.extra,
            )
    return rows


__all__ = [
    "DEFAULT_FRACTIONS",
    "DEFAULT_METHODS",
    "REL_LAMBDAS",
    "SEED_NUMBERS",
    "RidgeMap",
    "TrainSettings",
    "TrainedPredictor",
    "concept_embeddings",
    "concept_token_ids",
    "cos_rows",
    "evaluate_cos",
    "fit_ridge",
    "inverse_map",
    "predictor_table",
    "ridge_solve",
    "split_by_concept",
    "train_mlp",
    "train_tiny",
]
