"""``gradfree kv fit`` end to end on a tiny model: the folder it writes, what kv.json records
(measured, not assumed), and the one-sentence refusals that leave nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradfree.kv.fit import SUMMARY_KEYS
from gradfree.testing.tiny import save_tiny


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kvcli")
    save_tiny(root / "model", "qwen2")
    save_tiny(root / "other", "qwen2", num_hidden_layers=3)
    lines = [
        json.dumps(
            {
                "id": f"d{i}",
                "split": "calibration" if i < 8 else "heldout",
                "text": f"Stop {i}: the harbour is {3 * i} steps from the tower. " * 4,
            }
        )
        for i in range(11)
    ]
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "kv", "fit", "--model", str(root / "model"), "--corpus", str(root / "docs.jsonl"),
        "--split", "calibration", "--max-length", "48", "--chunk", "8", "--no-progress",
        "--out", str(out), *extra,
    ]  # fmt: skip


def test_kv_fit_writes_bases_and_measured_numbers(inputs: Path, run_cli) -> None:
    from gradfree.kv import KVBases
    from gradfree.models import load_model

    out = inputs / "fit"
    code, stdout, err = run_cli(_args(inputs, out, "--budget", "0.5"))
    assert code == 0, err
    assert stdout.strip() == str(out)
    record = json.loads((out / "kv.json").read_text())
    assert all(k in record for k in SUMMARY_KEYS)
    assert record["budget"] == 0.5 and 0 < record["bytes_ratio"] <= 0.55
    assert record["cache_bytes"] == pytest.approx(
        record["bytes_ratio"] * record["dense_cache_bytes"]
    )
    assert record["ppl_kv"] > 0 and record["ppl_dense"] > 0 and record["kl"] >= 0
    assert (out / "report.md").read_text().startswith("# Low-rank KV cache")
    assert not (out / ".scratch").exists()
    model = load_model(str(inputs / "model")).model
    bases = KVBases.load(out, model)
    assert bases.kept_share() == pytest.approx(record["kept_share"])
    # the defaults: pre-RoPE keys in the attention metric, latents in the model's dtype
    assert (record["key_mode"], record["metric"], record["latent_bits"]) == (
        "pre_rope",
        "attention",
        None,
    )
    assert (bases.key_mode, bases.metric) == ("pre_rope", "attention")
    assert record["ranks"] == bases.ranks()
    assert "metric: attention" in (out / "report.md").read_text()
    # At full budget the cache is the model: the same perplexity to float rounding.
    full = inputs / "full"
    code, _, err = run_cli(_args(inputs, full, "--budget", "1"))
    assert code == 0, err
    r = json.loads((full / "kv.json").read_text())
    assert r["ppl_kv"] == pytest.approx(r["ppl_dense"], rel=1e-5) and r["kl"] < 1e-6


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--budget", "0"], "budget must be in (0, 1]"),
        (["--budget", "1.5"], "budget must be in (0, 1]"),
        (["--budget", "0.5", "--key-mode", "rotated"], "--key-mode must be one of"),
        (["--budget", "0.5", "--allocation", "greedy"], "--allocation must be waterfill"),
        (["--budget", "0.5", "--metric", "cosine"], "--metric must be one of"),
        (["--budget", "0.5", "--latent-bits", "3"], "--latent-bits must be 8"),
    ],
)
def test_bad_input_is_one_sentence_and_writes_nothing(
    inputs: Path, run_cli, extra: list[str], message: str
) -> None:
    out = inputs / "bad"
    code, _, err = run_cli(_args(inputs, out, *extra))
    assert code != 0 and message in err and err.strip().count("\n") == 0
    assert not out.exists()


@pytest.mark.parametrize(
    ("mode", "metric", "bits"), [("complex", "none", "8"), ("pairs", "attention", None)]
)
def test_kv_fit_records_key_mode_metric_and_latent_bits(
    inputs: Path, run_cli, mode: str, metric: str, bits: str | None
) -> None:
    from gradfree.kv import KVBases

    out = inputs / f"fit-{mode}-{metric}"
    extra = ["--budget", "0.5", "--key-mode", mode, "--metric", metric]
    extra += ["--latent-bits", bits] if bits else []
    code, _, err = run_cli(_args(inputs, out, *extra))
    assert code == 0, err
    record = json.loads((out / "kv.json").read_text())
    want_bits = None if bits is None else int(bits)
    assert (record["key_mode"], record["metric"], record["latent_bits"]) == (
        mode,
        metric,
        want_bits,
    )
    bases = KVBases.load(out)
    assert (bases.key_mode, bases.metric) == (mode, metric)
    report = (out / "report.md").read_text()
    assert f"Keys: {mode}; metric: {metric}; latents: {'int8' if bits else 'float32'}" in report
    # the bytes measured per token: R (+ 2 per head block with int8) against 4 per dense entry
    coders = bases.keys + bases.values
    dims = sum(bases.num_kv_heads * bases.head_dim for _ in coders)
    if bits:
        held = sum(c.rank + 2 * (1 if c.head_ranks is None else len(c.head_ranks)) for c in coders)
    else:
        held = 4 * sum(c.rank for c in coders)
    assert record["bytes_ratio"] == pytest.approx(held / (4 * dims), rel=1e-12)
    assert record["kl"] > 0 and record["ppl_kv"] > 0
    if mode == "complex":
        assert all(c.head_ranks is None for c in bases.keys)


def test_bases_for_another_model_are_refused(inputs: Path, run_cli) -> None:
    from gradfree.base.errors import GradfreeError
    from gradfree.kv import LowRankCache
    from gradfree.models import load_model

    out = inputs / "for-other"
    if not out.exists():
        code, _, err = run_cli(_args(inputs, out, "--budget", "0.5"))
        assert code == 0, err
    other = load_model(str(inputs / "other")).model
    with pytest.raises(GradfreeError) as e:
        LowRankCache.from_dir(out, other)
    assert "\n" not in str(e.value)
