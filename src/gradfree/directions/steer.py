"""Steering with concept directions: add strength × vector to the residual stream, and measure it.

:func:`steering` is a context manager that adds ``strength · vector`` to the hidden states that
decoder block ``layer`` outputs (the residual stream after block L, the ``hidden_states[L + 1]``
convention of :mod:`gradfree.directions.extract`), at every position of every forward pass run
inside it (prompt and generated tokens alike). The hook is removed in ``finally``, so an
exception inside the block leaves the model as it was. The block is found through
:mod:`gradfree.adapters`; no Hugging Face module is named here.

:func:`steering_effect` measures, for each strength, (1) the mean rise in log-probability of the
concept's word as the next token after held-out prompts (the first token of ``" " + word``, as a
word follows a space mid-sentence), optionally of related words, against the unsteered model on
the same prompts, and (2) the perplexity on neutral text (the sliding-window pass of
:func:`gradfree.evaluation.perplexity.paired_pass`, run under the hook). :func:`rise_at_cost`
reads a curve at a given perplexity cost, which is how two vectors of different norms are compared
("at equal perplexity cost"). :func:`plot_steering` draws the curves (matplotlib, imported lazily).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gradfree.base.errors import GradfreeError

if TYPE_CHECKING:
    import torch
    from torch import nn


def _check_layer(layer: Any, n_layers: int) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int | np.integer):
        raise GradfreeError(f"The steering layer must be an integer block index, not {layer!r}.")
    if not 0 <= int(layer) < n_layers:
        raise GradfreeError(
            f"The model has no layer {layer}; its decoder blocks are 0..{n_layers - 1}."
        )
    return int(layer)


def _as_vector(vector: Any, width: int) -> np.ndarray:
    v = np.asarray(
        vector.detach().cpu().double().numpy() if hasattr(vector, "detach") else vector,
        dtype=np.float64,
    )
    if v.ndim != 1 or v.shape[0] != width:
        raise GradfreeError(
            f"The steering vector has shape {tuple(v.shape)} but the model's residual stream "
            f"is {width} wide."
        )
    if not np.isfinite(v).all():
        raise GradfreeError("The steering vector has non-finite entries.")
    return v


def _check_strength(strength: Any) -> float:
    s = float(strength)
    if not math.isfinite(s):
        raise GradfreeError(f"The steering strength must be a finite number, not {strength!r}.")
    return s


@contextmanager
def steering(model: nn.Module, layer: int, vector: Any, strength: float) -> Iterator[None]:
    """Add ``strength · vector`` to the output of decoder block ``layer`` while inside the block.

    ``vector`` is a (d,) array or tensor of the residual width. The sum is formed in the hidden
    states' own dtype on their device (the vector is cast once per dtype/device); with strength 0
    nothing is added, so logits stay bit-identical. The hook is removed on exit, also when the
    body raises.
    """
    import torch

    from gradfree.adapters import get_adapter

    adapter = get_adapter(model)
    idx = _check_layer(layer, adapter.num_layers)
    v = _as_vector(vector, adapter.hidden_size)
    s = _check_strength(strength)
    delta64 = torch.from_numpy(s * v)
    cast: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def add(h: torch.Tensor) -> torch.Tensor:
        key = (h.dtype, h.device)
        if key not in cast:
            cast[key] = delta64.to(device=h.device, dtype=h.dtype)
        return h + cast[key]

    def hook(_module: Any, _args: Any, output: Any) -> Any:
        if s == 0.0:
            return None  # keep the block's own output object: bit-identical by construction
        # transformers 5 blocks return the hidden states; 4.x blocks a tuple led by them.
        if isinstance(output, tuple):
            return (add(output[0]), *output[1:])
        return add(output)

    handle = adapter.layer_modules[idx].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# measurement ------------------------------------------------------------------------------------


def word_token(tokenizer: Any, word: str) -> int:
    """The id of the first token of ``" " + word`` (how the word begins mid-sentence)."""
    w = str(word).strip()
    if not w:
        raise GradfreeError("A target word is empty.")
    ids = tokenizer(" " + w, add_special_tokens=False)["input_ids"]
    if not ids:
        raise GradfreeError(f"The word '{w}' gives no tokens.")
    return int(ids[0])


def _prompt_batch(tokenizer: Any, prompts: Sequence[str], pad: int) -> tuple[Any, Any, Any]:
    import torch

    enc = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    if any(len(e) == 0 for e in enc):
        raise GradfreeError("A steering prompt is empty after tokenization.")
    width = max(len(e) for e in enc)
    ids = torch.full((len(enc), width), pad, dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for r, e in enumerate(enc):  # right padding: positions stay 0..len-1 for every prompt
        ids[r, : len(e)] = torch.tensor(e)
        mask[r, : len(e)] = 1
    last = torch.tensor([len(e) - 1 for e in enc], dtype=torch.long)
    return ids, mask, last


def next_token_logprobs(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    token_ids: Sequence[int],
    *,
    device: str = "cpu",
    batch_size: int = 16,
) -> np.ndarray:
    """log p(token | prompt) for every prompt × token: a (P, T) float64 array (the model as it is,
    hooks included)."""
    import torch

    from gradfree.texts.windows import pad_id

    if not prompts:
        raise GradfreeError("At least one steering prompt is needed.")
    from gradfree.adapters import get_adapter

    adapter = get_adapter(model)
    pad = pad_id(tokenizer, model)
    tok = torch.tensor(list(token_ids), dtype=torch.long)
    rows = []
    seen: dict[str, torch.Tensor] = {}

    def keep(_m: Any, _i: Any, output: torch.Tensor) -> None:
        seen["h"] = output

    # The LM head runs on each prompt's last position only, not on every position of the batch.
    handle = adapter.final_norm.register_forward_hook(keep)
    try:
        for b0 in range(0, len(prompts), batch_size):
            ids, mask, last = _prompt_batch(tokenizer, prompts[b0 : b0 + batch_size], pad)
            with torch.inference_mode():
                model(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    use_cache=False,
                    logits_to_keep=1,
                )
                h = seen["h"][torch.arange(ids.shape[0]), last.to(device)]
                logits = adapter.lm_head(h)
                lp = torch.log_softmax(logits.double(), dim=-1)[:, tok.to(device)]
            rows.append(lp.cpu().numpy())
    finally:
        handle.remove()
    return np.concatenate(rows, axis=0)


def neutral_perplexity(
    model: nn.Module,
    tokenizer: Any,
    docs: Sequence[Any],
    *,
    device: str = "cpu",
    max_length: int = 256,
    batch_size: int = 4,
) -> float:
    """Token-weighted perplexity of the model (as it is, hooks included) on ``docs``."""
    from gradfree.evaluation.perplexity import paired_pass

    ppl, _ = paired_pass(
        model,  # type: ignore[arg-type]
        tokenizer,
        docs,
        teacher=None,
        max_length=max_length,
        stride=max_length,
        batch_size=batch_size,
        device=device,
        layer_map=None,
        compare_layers=None,
    )
    return float(ppl["ppl"])


def steering_effect(
    model: nn.Module,
    tokenizer: Any,
    vector: Any,
    layer: int,
    strengths: Sequence[float],
    prompts: Sequence[str],
    target_words: Sequence[str],
    neutral_docs: Sequence[Any],
    device: str = "cpu",
    *,
    related_words: Sequence[str] = (),
    max_length: int = 256,
    batch_size: int = 16,
    baseline: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One row per strength: the mean log-probability rise of the target word(s) as the next token
    after ``prompts`` (and of ``related_words``), and the perplexity on ``neutral_docs``.

    Rises are against the unsteered model on the same prompts, averaged over prompts and words
    (``rise`` for the target words, ``related_rise`` for the related ones); ``prob_ratio`` is
    exp(rise), the factor by which the word's probability grows (geometric mean over prompts).
    ``ppl_ratio`` is the steered perplexity over the unsteered one. ``baseline`` (the ``"base"``
    entry of a previous call's first row, same prompts/words/docs) skips recomputing the
    unsteered pass; the model runs on ``device`` in its own dtype.
    """
    from gradfree.adapters import get_adapter

    if not target_words:
        raise GradfreeError("At least one target word is needed to measure steering.")
    if not strengths:
        raise GradfreeError("At least one steering strength is needed.")
    if not neutral_docs:
        raise GradfreeError("Neutral documents are needed to measure the perplexity cost.")
    adapter = get_adapter(model)
    _check_layer(layer, adapter.num_layers)
    v = _as_vector(vector, adapter.hidden_size)
    tw = [word_token(tokenizer, w) for w in target_words]
    rw = [word_token(tokenizer, w) for w in related_words]
    ids = tw + rw
    if baseline is None:
        base_lp = next_token_logprobs(
            model, tokenizer, prompts, ids, device=device, batch_size=batch_size
        )
        base_ppl = neutral_perplexity(
            model, tokenizer, neutral_docs, device=device, max_length=max_length
        )
        base = {"logprobs": base_lp.tolist(), "ppl": base_ppl}
    else:
        base = dict(baseline)
        base_lp = np.asarray(base["logprobs"], dtype=np.float64)
        base_ppl = float(base["ppl"])
        if base_lp.shape != (len(prompts), len(ids)):
            raise GradfreeError("The baseline given does not match these prompts and words.")
    rows: list[dict[str, Any]] = []
    nt = len(tw)
    for s in strengths:
        with steering(model, layer, v, float(s)):
            lp = next_token_logprobs(
                model, tokenizer, prompts, ids, device=device, batch_size=batch_size
            )
            ppl = neutral_perplexity(
                model, tokenizer, neutral_docs, device=device, max_length=max_length
            )
        d = lp - base_lp
        row: dict[str, Any] = {
            "strength": float(s),
            "vector_norm": float(np.linalg.norm(v)),
            "logprob": float(lp[:, :nt].mean()),
            "rise": float(d[:, :nt].mean()),
            "rise_sd_prompts": float(d[:, :nt].mean(1).std()),
            "prob_ratio": float(np.exp(d[:, :nt].mean())),
            "related_rise": float(d[:, nt:].mean()) if rw else None,
            "ppl": ppl,
            "ppl_ratio": ppl / base_ppl,
        }
        rows.append(row)
    rows[0]["base"] = base
    return rows


def rise_at_cost(curve: Sequence[Mapping[str, Any]], ppl_ratio: float, key: str = "rise") -> float:
    """The ``key`` value of a steering curve where its perplexity ratio first reaches
    ``ppl_ratio``, linearly interpolated between strengths (NaN when the curve never reaches it).

    Strengths are taken in increasing order from the first one (usually 0); a curve whose first
    point already costs more than ``ppl_ratio`` gives NaN too.
    """
    pts = sorted(curve, key=lambda r: float(r["strength"]))
    xs = [float(r["ppl_ratio"]) for r in pts]
    ys = [float(r[key]) for r in pts]
    if not xs or xs[0] > ppl_ratio:
        return float("nan")
    for i in range(1, len(xs)):
        if xs[i] >= ppl_ratio:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            if x1 == x0:
                return y1
            return y0 + (y1 - y0) * (ppl_ratio - x0) / (x1 - x0)
    return float("nan")


def plot_steering(
    curves: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, *, title: str
) -> Path:
    """Two panels as a PNG: the rise against strength, and the rise against the perplexity ratio
    (the equal-cost view), one line per named curve."""
    from gradfree.base.plots import pyplot

    plt = pyplot()
    path = Path(path)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    try:
        for label, curve in curves.items():
            pts = sorted(curve, key=lambda r: float(r["strength"]))
            s = [float(r["strength"]) for r in pts]
            a1.plot(s, [float(r["rise"]) for r in pts], "-o", markersize=3, label=label)
            a2.plot(
                [float(r["ppl_ratio"]) for r in pts],
                [float(r["rise"]) for r in pts],
                "-o",
                markersize=3,
                label=label,
            )
        a1.set(title=title, xlabel="strength", ylabel="mean log-prob rise of the concept word")
        a2.set(
            title="at equal perplexity cost",
            xlabel="neutral-text perplexity / unsteered",
            ylabel="mean log-prob rise",
        )
        for ax in (a1, a2):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path
