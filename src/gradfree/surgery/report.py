"""report.md of a ``gradfree rotate`` / ``slice`` / ``prune`` output: what was done, the proof
measured on the model's own text, the ledger, timing. Numbers come from the JSON record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gradfree.base.io import write_text_atomic


def _ppl_row(name: str, p: dict[str, Any]) -> str:
    return f"| {name} | {p['ppl']:.4f} | {p['tokens']} |"


def _ppl_table(res: dict[str, Any], name: str) -> list[str]:
    """Held-out perplexity of the dense and the ``name`` (sliced, pruned) model."""
    return [
        "",
        "| model | held-out perplexity | tokens |",
        "|---|---:|---:|",
        _ppl_row("dense", res["dense_perplexity"]),
        _ppl_row(name, res[f"{name}_perplexity"]),
        "",
        f"Relative change: {100 * res['relative_perplexity_change']:+.2f}%.",
    ]


def _summary(cfg: dict[str, Any], res: dict[str, Any]) -> list[str]:
    """Title, the basis and the norm fusion."""
    lines = [f"# gradfree {cfg['command']}: {cfg['model']}", ""]
    if "basis" not in res:  # prune: no basis, no fusion
        lines.append("No rotation or norm fusion: the checkpoint keeps its norms and its tie.")
        return lines
    b = res["basis"]
    if b["kind"] == "pca":
        lines.append(
            f"Basis: PCA of the un-centered second moment ({b['statistic']} statistic, "
            f"{b['sites']} sites, {b['tokens']} tokens, damping {b['damping']})."
        )
    else:
        lines.append(
            f"Basis: {b['kind']} ({', '.join(f'{k}={v}' for k, v in b.items() if k != 'kind')})."
        )
    f = res["fuse"]
    lines.append(
        f"Norms fused: {f['folded']} (max |w - 1| was {f['max_norm_weight_deviation']:.3g}); "
        f"head untied: {f['untied']}."
    )
    return lines


def _check(cfg: dict[str, Any], chk: dict[str, Any]) -> list[str]:
    """The reload check on real text and whether the output is exact."""
    lines = ["", "## Check on real text", ""]
    lines.append(
        f"{chk['windows']} windows of {chk['tokens_per_window']} tokens from "
        f"`{cfg['check_corpus']}` ({cfg['check_split']}); the output folder reloaded with plain "
        "`AutoModelForCausalLM.from_pretrained`."
    )
    lines += [
        "",
        "| comparison | max abs diff / max abs logit | Frobenius relative |",
        "|---|---:|---:|",
    ]
    for key, name in (
        ("reloaded_vs_original", "reloaded vs original model"),
        ("reloaded_vs_in_memory", "reloaded vs edited model in memory"),
    ):
        lines.append(f"| {name} | {chk[key]['max_rel']:.3g} | {chk[key]['fro_rel']:.3g} |")
    kind = chk["kind"]
    lines += [
        "",
        f"This output is **{'exact' if kind == 'exact' else 'an approximation'}**: "
        + (
            "the function is preserved up to float rounding."
            if kind == "exact"
            else "removing dimensions, neurons or heads changes the logits."
        ),
    ]
    return lines


def _slicing(res: dict[str, Any]) -> list[str]:
    """Widths, stages, parameters and held-out perplexity of a slice."""
    s = res["slice"]
    lines = [
        "",
        "## Slicing",
        "",
        f"Requested fraction {s['requested_fraction']} → width {s['requested_width']}; "
        f"used width {s['width']} ({s['width_note']}); actual fraction "
        f"{s['actual_fraction']:.4f}.",
    ]
    for st in s["stages"]:
        lines.append(
            f"- {st['from']} → {st['to']}: keeps {st['kept_energy']:.4f} of the "
            f"calibration energy; reader scale {st['reader_scale']:.4f}"
        )
    if s["recompute"]:
        lines.append(f"- recompute: {s['recompute']}")
    p = res["params"]
    lines += [
        "",
        f"Parameters {p['before']:,} → {p['after']:,} ({p['after'] / p['before']:.3f}).",
        *_ppl_table(res, "sliced"),
    ]
    return lines


def _reconstruction(rec: dict[str, Any] | None) -> list[str]:
    """The least-squares re-fit (and the pruning decided inside it)."""
    if not rec:
        return []
    lines = [
        "",
        "## Least-squares reconstruction",
        "",
        f"{rec['fitted_sites']} sites re-fitted block by block toward the dense model on "
        f"{rec['tokens']} calibration tokens ({rec['windows']} windows), ridge λ "
        f"{rec['rel_lambda']} relative to tr(C)/k, head re-fitted: {rec['head']}; "
        f"{rec['seconds']:.1f} s.",
    ]
    if rec.get("prune"):
        p = rec["prune"]
        lines.append(
            f"Pruned inside it ({rec.get('pruned_sites', 0)} selections, structured OBS in up to "
            f"{p['steps']} rounds each): {p['num_attention_heads']} query heads, "
            f"{p['intermediate_size']} MLP neurons per block; predicted added squared error "
            f"{rec.get('predicted_error', 0.0):.4g}."
        )
    return lines


def _pruning(res: dict[str, Any]) -> list[str]:
    """Widths before and after, parameters and held-out perplexity of a prune."""
    pr = res["prune"]
    b, a, p = pr["before"], pr["after"], res["params"]
    lines = [
        "",
        "## Pruning",
        "",
        f"Query heads {b['num_attention_heads']} → {a['num_attention_heads']}, MLP neurons "
        f"{b['intermediate_size']} → {a['intermediate_size']} per block.",
        f"Parameters {p['before']:,} → {p['after']:,} ({p['after'] / p['before']:.3f}).",
    ]
    if "pruned_perplexity" in res:
        lines += _ppl_table(res, "pruned")
    return lines + _reconstruction(pr["reconstruction"])


def _per_layer(pl: dict[str, Any]) -> list[str]:
    """The per-layer bases study (simulated: no checkpoint)."""
    return [
        "",
        "## Per-layer bases (simulation, not a checkpoint)",
        "",
        f"- transitions kept ({pl['with_transitions']['kind']}): max rel logits diff "
        f"{pl['with_transitions']['max_rel']:.3g}",
        f"- transitions dropped (**approximation**): max rel "
        f"{pl['without_transitions']['max_rel']:.3g}, Frobenius rel "
        f"{pl['without_transitions']['fro_rel']:.3g}",
        f"- cost of keeping them: {pl['extra_params']:,} extra parameters "
        f"({100 * pl['extra_params_share']:.1f}% of the model), "
        f"{pl['extra_flops_per_token']:,} extra FLOPs per token",
        f"- transition cost ‖Q_{{l+1}}ᵀQ_l − I‖_F/√d: max "
        f"{max(pl['transition_cost'] or [0.0]):.3f}",
    ]


def _ledger(ledger: list[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "## Rotation ledger",
        "",
        "| name | layer | shape | max abs(RᵀR − I) | σ min | σ max | sha256 |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for e in ledger:
        lines.append(
            f"| {e['name']} | {e['layer']} | {e['shape'][0]}x{e['shape'][1]} | "
            f"{e['orthogonality_error']:.2e} | {e['sv_min']:.6f} | {e['sv_max']:.6f} | "
            f"`{e['sha256'][:16]}` |"
        )
    return lines


def render(record: dict[str, Any], timing: str) -> str:
    cfg, res = record["config"], record["result"]
    lines = _summary(cfg, res) + _check(cfg, res["check"])
    if "slice" in res:
        lines += _slicing(res) + _reconstruction(res["slice"].get("reconstruction"))
    if "prune" in res:
        lines += _pruning(res)
    if "per_layer" in res:
        lines += _per_layer(res["per_layer"])
    if record["ledger"]:
        lines += _ledger(record["ledger"])
    lines += ["", "## Time and memory", "", timing, ""]
    return "\n".join(lines)


def write_report(path: Path, record: dict[str, Any], timing: str) -> None:
    write_text_atomic(path, render(record, timing))
