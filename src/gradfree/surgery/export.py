"""``gradfree rotate`` and ``gradfree slice`` as library calls: surgery on a real model, exported
as a plain Hugging Face checkpoint, with the proof measured on the user's own model.

rotate: fuse norms + untie (:mod:`.fold`), then one orthogonal basis for the whole residual
stream (:func:`~gradfree.surgery.rotate.rotate_residual_`): the PCA basis of a capture
(:mod:`.basis`), a Haar-random one, or a given matrix. The function is unchanged.

slice (SliceGPT, Ashkboos et al. 2024): the PCA basis of calibration statistics, then
:func:`~gradfree.surgery.slicing.slice_` to the width closest to ``round((1-F)·d)`` that the
config allows. One global basis, so the output is a plain checkpoint of the same family.
``recompute``: SliceGPT measures each layer's statistics through the layers already sliced;
with one global basis that is not possible in one pass (every layer shares the basis), so we
slice in ``steps`` stages ``d > k_1 > … > k`` and re-measure the statistics through the model as
sliced so far before each stage (a measured approximation of SliceGPT's scheme, reported as such).

Output folder: the checkpoint + tokenizer, ``gradfree_surgery.json`` (resolved config,
versions, input fingerprints, ledger, measurements), ``rotation_ledger.json`` and ``report.md``.
The check reloads the saved folder with vanilla ``AutoModelForCausalLM.from_pretrained`` and
compares its logits with the original model's on real text windows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gradfree.adapters import get_adapter
from gradfree.base.errors import GradfreeError
from gradfree.base.io import atomic_dir, check_new_output, sha256_file, write_json_atomic
from gradfree.base.provenance import Stopwatch, versions
from gradfree.models.fetch import save_checkpoint
from gradfree.surgery import basis as B
from gradfree.surgery.config import SurgeryConfig
from gradfree.surgery.fold import fuse_norms_, untie_
from gradfree.surgery.ledger import rotation_entry
from gradfree.surgery.maths import check_orthogonal, random_orthogonal
from gradfree.surgery.prune import check_shape, mlp_keep_for_params
from gradfree.surgery.reconstruct import REL_LAMBDA, PrunePlan, dense_reference, reconstruct_
from gradfree.surgery.report import write_report
from gradfree.surgery.rotate import rotate_residual_
from gradfree.surgery.slicing import nearest_allowed_width, slice_

Log = Callable[[str], None]


def _quiet(_msg: str) -> None:
    return None


def read_matrix(path: str | Path) -> torch.Tensor:
    """The one tensor in a .safetensors file (or the one named ``rotation``/``Q``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise GradfreeError(f"The matrix file {p} does not exist.")
    try:
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise GradfreeError(f"The matrix file {p} is not a readable safetensors file.") from e
    for name in ("rotation", "Q"):
        if name in tensors:
            return tensors[name]
    if len(tensors) != 1:
        raise GradfreeError(f"The matrix file {p} must hold one tensor (or one named 'rotation').")
    return next(iter(tensors.values()))


def check_windows(tokenizer: Any, docs: list[Any], n: int, length: int) -> torch.Tensor:
    """``n`` consecutive windows of ``length`` tokens from the documents (joined in order)."""
    from gradfree.texts.windows import document_text, encode

    ids: list[int] = []
    for d in docs:
        ids.extend(encode(tokenizer, document_text(d)))
        if len(ids) >= n * length:
            break
    n = min(n, len(ids) // length)
    if n < 1:
        raise GradfreeError(f"The check texts have fewer than {length} tokens.")
    return torch.tensor(ids[: n * length]).view(n, length)


@torch.no_grad()
def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    dev = next(model.parameters()).device
    return torch.cat([model(ids[i : i + 1].to(dev)).logits.float().cpu() for i in range(len(ids))])


def rel_diff(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """max |Δ| / max |ref| and ‖Δ‖_F / ‖ref‖_F, in float64."""
    d = (out.double() - ref.double()).cpu()
    r = ref.double().cpu()
    return {
        "max_rel": float(d.abs().max() / r.abs().max()),
        "fro_rel": float(torch.linalg.norm(d) / torch.linalg.norm(r)),
    }


def _ppl(model: Any, tok: Any, docs: list[Any], cfg: SurgeryConfig) -> dict[str, Any]:
    from gradfree.evaluation.run import evaluate

    r = evaluate(
        model, tok, docs, max_length=cfg.max_length, stride=cfg.max_length, device=cfg.device
    )
    return dict(r["perplexity"])


def _ppl_key(cfg: SurgeryConfig) -> str:
    """Where the record keeps the output's held-out perplexity."""
    return "pruned_perplexity" if cfg.command == "prune" else "sliced_perplexity"


def _params(model: Any) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def plan_widths(config: Any, d: int, fraction: float, steps: int) -> list[int]:
    """The allowed widths of each slicing stage, ending at the target (the nearest allowed width
    to round((1-F)·d)); stages interpolate linearly from d and duplicates are dropped."""
    target = nearest_allowed_width(config, round((1.0 - fraction) * d))
    out: list[int] = []
    for s in range(1, steps + 1):
        k = nearest_allowed_width(config, round(d - (d - target) * s / steps))
        k = target if s == steps else max(k, target)
        if not out or k < out[-1]:
            out.append(k)
    return out or [target]


class _Inputs:
    """Everything read before the model is loaded, so bad input fails fast and cheaply."""

    def __init__(self, cfg: SurgeryConfig) -> None:
        from gradfree.capture import load_capture
        from gradfree.texts.corpora import corpus_manifest, load_corpus

        self.cap = load_capture(cfg.capture) if cfg.capture is not None else None
        self.matrix = read_matrix(cfg.matrix) if cfg.matrix is not None else None
        self.calib = (
            load_corpus(cfg.corpus, split=cfg.split, limit=cfg.limit) if cfg.corpus else None
        )
        self.check = load_corpus(cfg.check_corpus, split=cfg.check_split)
        self.eval = None
        eval_name = cfg.eval_corpus or cfg.corpus or cfg.check_corpus
        if cfg.command in ("slice", "prune"):
            self.eval = load_corpus(eval_name, split=cfg.eval_split, limit=cfg.eval_limit)
        self.manifests: dict[str, Any] = {"check": corpus_manifest(self.check, cfg.check_corpus)}
        if self.calib is not None:
            self.manifests["calibration"] = corpus_manifest(self.calib, str(cfg.corpus))
        if self.eval is not None:
            self.manifests["eval"] = corpus_manifest(self.eval, eval_name)
        if self.matrix is not None and cfg.matrix is not None:
            self.manifests["matrix_sha256"] = sha256_file(cfg.matrix)
        if self.cap is not None:
            self.manifests["capture"] = {
                "path": str(cfg.capture),
                "run": self.cap.manifest.get("run_id"),
            }


def _basis(
    cfg: SurgeryConfig, inp: _Inputs, loaded: Any, scales: dict[str, torch.Tensor], log: Log
) -> tuple[torch.Tensor, dict[str, Any], dict[str, torch.Tensor] | None]:
    """(d x d orthogonal basis, how it was made, the per-site moments when it is a PCA basis)."""
    a = get_adapter(loaded.model)
    d = a.hidden_size
    if inp.matrix is not None:
        q = check_orthogonal(inp.matrix, d, "given matrix")
        return q, {"kind": "matrix", "path": cfg.matrix}, None
    if cfg.random_seed is not None:
        return (
            random_orthogonal(d, cfg.random_seed),
            {"kind": "random", "seed": cfg.random_seed},
            None,
        )
    if inp.cap is not None:
        B.check_capture_model(inp.cap, B.capture_role(inp.cap), a, loaded.fingerprint)
        moments, statistic = B.capture_moments(inp.cap, loaded.model, scales)
        tokens = inp.cap.tokens(B.capture_role(inp.cap))
    else:
        assert inp.calib is not None
        log(f"calibrating on {len(inp.calib)} documents")
        moments, info = B.calibration_moments(loaded, inp.calib, cfg.max_length, cfg.batch_size)
        statistic, tokens = info["statistic"], info["tokens"]
    q, vals = B.pca_rotation(B.global_moment(moments), cfg.damping)
    info = {
        "kind": "pca",
        "statistic": statistic,
        "sites": len(moments),
        "tokens": tokens,
        "damping": cfg.damping,
        "centered": False,
        "eigenvalues_top": [float(v) for v in vals[:8]],
    }
    return q, info, moments


def _slice(
    cfg: SurgeryConfig, inp: _Inputs, loaded: Any, q: torch.Tensor, moments: Any, log: Log
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    model = loaded.model
    a = get_adapter(model)
    d = a.hidden_size
    assert cfg.fraction is not None
    widths = plan_widths(a.config, d, cfg.fraction, cfg.steps if cfg.recompute else 1)
    requested = round((1.0 - cfg.fraction) * d)
    glob = B.global_moment(moments)
    stages = []
    ledger = []
    reconstruction: dict[str, Any] | None = None
    for s, k in enumerate(widths):
        if s > 0:  # re-measure through the model as sliced so far
            assert inp.calib is not None
            log(f"recomputing statistics through the {a.hidden_size}-wide model")
            moments, _ = B.calibration_moments(loaded, inp.calib, cfg.max_length, cfg.batch_size)
            glob = B.global_moment(moments)
            q, _ = B.pca_rotation(glob, cfg.damping)
        kept = B.kept_energy(glob, q, k)
        log(f"slicing {a.hidden_size} -> {k} (keeps {kept:.4f} of the calibration energy)")
        ref = dense_reference(model, q) if cfg.reconstruct else None
        plan = prune_plan(cfg, model) if cfg.reconstruct else None
        info = slice_(model, k, q)
        if ref is not None:
            assert inp.calib is not None  # the config requires --corpus with --reconstruct
            log(f"reconstructing the {k}-wide model against the dense one")
            reconstruction = _reconstruct(cfg, model, ref, loaded.tokenizer, inp.calib, plan, log)
            del ref
        ledger.append(rotation_entry(q, f"Q_stage{s}" if len(widths) > 1 else "Q"))
        ledger.append(rotation_entry(q[:, :k], f"kept_stage{s}" if len(widths) > 1 else "kept"))
        stages.append(
            {
                "from": info["from"],
                "to": k,
                "kept_energy": kept,
                **{key: info[key] for key in ("reader_scale", "rms_norm_eps", "untied")},
            }
        )
    result = {
        "requested_fraction": cfg.fraction,
        "requested_width": requested,
        "width": widths[-1],
        "actual_fraction": 1.0 - widths[-1] / d,
        "width_note": (
            "as requested"
            if widths[-1] == requested
            else f"{requested} is not allowed by the config; nearest allowed width {widths[-1]}"
        ),
        "stages": stages,
        "reconstruction": reconstruction,
        "recompute": (
            f"approximation of SliceGPT's per-layer recomputation: {len(widths)} global stages"
            if cfg.recompute
            else None
        ),
    }
    return result, ledger


def prune_plan(cfg: SurgeryConfig, model: Any) -> PrunePlan:
    """The neurons and heads ``cfg`` asks to keep, for ``model`` as it is before pruning."""
    a = get_adapter(model)
    mlp_keep = None
    if cfg.mlp_fraction is not None:
        mlp_keep = max(1, round((1.0 - cfg.mlp_fraction) * a.intermediate_size))
    elif cfg.params_fraction is not None:
        target = int((1.0 - cfg.params_fraction) * _params(model))
        mlp_keep = mlp_keep_for_params(model, target, cfg.heads_keep)
    return PrunePlan(mlp_keep=mlp_keep, heads_keep=cfg.heads_keep, steps=cfg.prune_steps)


def _reconstruct(
    cfg: SurgeryConfig,
    model: Any,
    ref: Any,
    tok: Any,
    calib: list[Any],
    plan: PrunePlan | None,
    log: Log,
) -> dict[str, Any]:
    """Run :func:`reconstruct_` as ``cfg`` says; return what the record keeps of its ledger."""
    rec = reconstruct_(
        model,
        ref,
        tok,
        calib,
        rel_lam=REL_LAMBDA if cfg.reconstruct_lambda is None else cfg.reconstruct_lambda,
        head=not get_adapter(model).tied,
        max_length=cfg.max_length,
        progress=log,
        prune=plan,
    )
    keys = ("rel_lambda", "head", "windows", "tokens", "seconds", "prune")
    out = {k: rec[k] for k in keys}
    out["fitted_sites"] = len(rec["fits"])
    pruned = [r["pruned"] for r in rec["fits"] if "pruned" in r]
    if pruned:
        out["pruned_sites"] = len(pruned)
        out["predicted_error"] = sum(float(p["predicted_error"]) for p in pruned)
    return out


def _prune(cfg: SurgeryConfig, inp: _Inputs, loaded: Any, log: Log) -> dict[str, Any]:
    """Structured pruning of the untouched model against a copy of itself."""
    import copy

    model = loaded.model
    a = get_adapter(model)
    before = {"num_attention_heads": a.geometry.num_heads, "intermediate_size": a.intermediate_size}
    plan = prune_plan(cfg, model)
    check_shape(model, plan.mlp_keep, plan.heads_keep)
    ref = copy.deepcopy(model)
    assert inp.calib is not None  # the config requires --corpus
    log(
        f"pruning to {plan.mlp_keep or before['intermediate_size']} MLP neurons and "
        f"{plan.heads_keep or a.geometry.group_size} query heads per KV group"
    )
    rec = _reconstruct(cfg, model, ref, loaded.tokenizer, inp.calib, plan, log)
    del ref
    return {"before": before, "after": rec["prune"], "reconstruction": rec}


def _reload(folder: Path, cfg: SurgeryConfig) -> Any:
    from transformers import AutoModelForCausalLM

    from gradfree.models import resolve_dtype
    from gradfree.models.fetch import quiet_transformers
    from gradfree.models.fp8 import load_fp8_model

    with quiet_transformers(progress=False):
        if cfg.save_format == "fp8":  # dequantised by gradfree: transformers' path wants a GPU
            m = load_fp8_model(folder, resolve_dtype(cfg.dtype))
        else:
            m = AutoModelForCausalLM.from_pretrained(folder, dtype=resolve_dtype(cfg.dtype))
    m.eval()
    if cfg.device != "cpu":
        m.to(cfg.device)  # type: ignore[arg-type]
    return m


def _rotate_or_slice(
    cfg: SurgeryConfig,
    inp: _Inputs,
    loaded: Any,
    ids: torch.Tensor,
    result: dict[str, Any],
    watch: Stopwatch,
    log: Log,
) -> list[dict[str, Any]]:
    """Fuse, untie, find the basis and rotate or slice; fills ``result``, returns the ledger."""
    from gradfree.surgery.transitions import transition_study

    model = loaded.model
    scales = B.reader_scales(model)  # before fusion: what a capture of the original saw
    with watch.stage("fuse + untie"):
        fused = fuse_norms_(model)
        untied = untie_(model)["untied"] or fused["untied"]
    with watch.stage("basis"):
        q, basis_info, moments = _basis(cfg, inp, loaded, scales, log)
    result["basis"] = basis_info
    if cfg.per_layer and moments is not None:
        with watch.stage("per-layer study"):
            result["per_layer"] = transition_study(
                model, B.layer_moments(moments, len(get_adapter(model).layers)), ids, cfg.damping
            )
    with watch.stage("rotate" if cfg.command == "rotate" else "slice"):
        if cfg.command == "rotate":
            ledger = rotate_residual_(model, q)["rotations"]
        else:
            result["slice"], ledger = _slice(cfg, inp, loaded, q, moments, log)
    result["fuse"] = {
        "folded": len(fused["folded"]),
        "untied": untied,
        "max_norm_weight_deviation": fused["max_weight_deviation"],
    }
    return ledger


def run_surgery(
    cfg: SurgeryConfig, *, overwrite: bool = False, log: Log = _quiet
) -> dict[str, Any]:
    """Run ``cfg`` (rotate, slice or prune) and write its output folder; return the recorded
    result."""
    from gradfree.models import load_model

    out = check_new_output(cfg.out, overwrite)
    watch = Stopwatch()
    inp = _Inputs(cfg)
    with watch.stage("load"):
        loaded = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    model, tok, fingerprint = loaded.model, loaded.tokenizer, dict(loaded.fingerprint)
    d = get_adapter(model).hidden_size
    params_before = _params(model)
    ids = check_windows(tok, inp.check, cfg.check_windows, cfg.check_tokens)
    with watch.stage("reference logits"):
        ref = _logits(model, ids)
    result: dict[str, Any] = {"command": cfg.command}
    if inp.eval is not None:
        with watch.stage("dense perplexity"):
            result["dense_perplexity"] = _ppl(model, tok, inp.eval, cfg)
    if cfg.command == "prune":  # no fusion or basis: the checkpoint keeps its norms and tie
        with watch.stage("prune"):
            result["prune"] = _prune(cfg, inp, loaded, log)
        ledger: list[dict[str, Any]] = []
    else:
        ledger = _rotate_or_slice(cfg, inp, loaded, ids, result, watch, log)
    with watch.stage("in-memory logits"):
        mem = _logits(model, ids)
    with atomic_dir(out, overwrite) as tmp:
        with watch.stage("save"):
            save_checkpoint(model, tok, tmp, weight_format=cfg.save_format)
        del model, loaded
        with watch.stage("reload (plain transformers)"):
            back = _reload(tmp, cfg)
            got = _logits(back, ids)
        result["check"] = {
            "windows": int(ids.shape[0]),
            "tokens_per_window": int(ids.shape[1]),
            "reloaded_vs_original": rel_diff(got, ref),
            "reloaded_vs_in_memory": rel_diff(got, mem),
            "reloaded_equals_in_memory": bool(torch.equal(got, mem)),
            "kind": "exact"
            if cfg.command == "rotate" or (cfg.fraction == 0 and not cfg.reconstruct)
            else "approximation",
        }
        if inp.eval is not None:
            with watch.stage("compressed perplexity"):
                result[_ppl_key(cfg)] = _ppl(back, tok, inp.eval, cfg)
            dense, sl = result["dense_perplexity"]["ppl"], result[_ppl_key(cfg)]["ppl"]
            result["relative_perplexity_change"] = sl / dense - 1.0
        result["params"] = {
            "before": params_before,
            "after": _params(back),
            "hidden_before": d,
            "hidden_after": get_adapter(back).hidden_size,
            "num_attention_heads_after": get_adapter(back).geometry.num_heads,
            "intermediate_size_after": get_adapter(back).intermediate_size,
        }
        del back
        record = {
            "format": "gradfree.surgery/1",
            "config": cfg.model_dump(mode="json"),
            "versions": versions(),
            "inputs": {"model": {"spec": cfg.model, **fingerprint}, **inp.manifests},
            "ledger": ledger,
            "result": result,
            "timing": watch.rows,
        }
        write_json_atomic(tmp / "rotation_ledger.json", ledger)
        write_json_atomic(tmp / "gradfree_surgery.json", record)
        write_report(tmp / "report.md", record, watch.table())
    return record
