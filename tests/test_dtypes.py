"""Half-precision models with float64 statistics: a bf16 or fp16 capture, evaluation, compression
and head distillation on tiny models agree with float32 within a stated tolerance, and write
checkpoints in the model's dtype that load back; ``--device cuda`` without a GPU is one sentence
and touches no CUDA.

Tolerances. A format with p significant bits (bf16: 8, fp16: 11, the implicit bit included)
rounds each operation with relative error at most u = 2^-p (bf16 3.9e-3, fp16 4.9e-4). The
weights are rounded once when loaded, then every matmul output and activation once more per
layer; on these two-block models the measured relative Frobenius error of the float64 moments is
0.5u-1.7u (growing with depth), so the tests allow 4u. The statistics themselves are float64
in every case: only the activations they are summed from carry the model dtype's rounding.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from gradfree.capture import Subject, run_capture
from gradfree.models import load_model
from gradfree.testing.tiny import HARBOUR_DOCS, save_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11}
TOL = 4.0  # in units of the format's unit roundoff; see the module docstring
SITES = ("blocks.0.resid_pre", "blocks.1.resid_pre", "final.normed")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pair")
    teacher = save_tiny(root / "t", "qwen3", seed=1)
    student = save_tiny(root / "s", "qwen3", seed=2, hidden_size=48, num_attention_heads=4)
    return teacher, student


def _capture(pair: tuple[Path, Path], dtype: str, folder: Path) -> Any:
    t, s = (load_model(str(p), dtype=dtype) for p in pair)
    assert next(t.model.parameters()).dtype == getattr(torch, dtype)
    return run_capture(
        {"teacher": Subject(t.model, t.tokenizer), "student": Subject(s.model, s.tokenizer)},
        HARBOUR_DOCS,
        folder,
        {"sites": ["resid_pre", "final.normed"], "max_length": 64, "batch_size": 4},
        progress=False,
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_precision_capture_has_float64_statistics_close_to_float32(
    pair: tuple[Path, Path], tmp_path: Path, dtype: str
) -> None:
    ref = _capture(pair, "float32", tmp_path / "f32")
    got = _capture(pair, dtype, tmp_path / dtype)
    tol = TOL * UNIT_ROUNDOFF[dtype]
    for role in ("teacher", "student"):
        for key in SITES:
            a, b = got.stats(role, key), ref.stats(role, key)
            assert a.second_moment().dtype == torch.float64 and a.count == b.count
            assert _rel(a.second_moment(), b.second_moment()) <= tol, (role, key)
            assert _rel(a.mean(), b.mean()) <= tol, (role, key)
    cross, cross_ref = got.cross("final.normed", "final.normed"), ref.cross(*["final.normed"] * 2)
    assert cross.m_ab.dtype == torch.float64
    assert _rel(cross.m_ab, cross_ref.m_ab) <= tol
    # The rounding is real (a half-precision capture is not secretly float32).
    assert (
        _rel(
            got.stats("teacher", "final.normed").second_moment(),
            ref.stats("teacher", "final.normed").second_moment(),
        )
        > 0
    )


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_perplexity_and_kl_are_close_to_float32(
    pair: tuple[Path, Path], dtype: str
) -> None:
    from gradfree.evaluation.run import evaluate

    def run(dt: str) -> dict[str, Any]:
        t, s = (load_model(str(p), dtype=dt) for p in pair)
        return evaluate(
            s.model, s.tokenizer, HARBOUR_DOCS, teacher=t.model, max_length=64, stride=32
        )

    ref, got = run("float32"), run(dtype)
    tol = TOL * UNIT_ROUNDOFF[dtype]
    # The mean NLL and the KL are sums of log-softmax terms of upcast logits: relative tolerance.
    nll, nll_ref = got["perplexity"]["nll_mean"], ref["perplexity"]["nll_mean"]
    assert abs(nll - nll_ref) <= tol * nll_ref
    kl, kl_ref = got["teacher"]["kl_mean"], ref["teacher"]["kl_mean"]
    assert abs(kl - kl_ref) <= tol * kl_ref
    assert got["perplexity"]["tokens"] == ref["perplexity"]["tokens"]


def _float_dtypes(folder: Path) -> set[torch.dtype]:
    from safetensors import safe_open

    seen = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            seen |= {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118
    return seen


def _reloads_in_bf16(folder: Path) -> None:
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    assert _float_dtypes(folder) == {torch.bfloat16}
    back = load_model(str(folder), dtype="bfloat16")
    ids = torch.tensor([back.tokenizer(HARBOUR_DOCS[0])["input_ids"][:32]])
    with torch.no_grad():
        logits = back.model(ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def _corpus(tmp_path: Path) -> Path:
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"id": f"d{i}", "text": t}) for i, t in enumerate(HARBOUR_DOCS * 2)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_compress_in_bf16_writes_a_bf16_checkpoint_that_reloads(
    pair: tuple[Path, Path], tmp_path: Path, run_cli: Callable[[list[str]], Any]
) -> None:
    out = tmp_path / "out"
    t, s = pair
    argv = [
        "compress",
        "--teacher",
        str(t),
        "--student",
        str(s),
        "--corpus",
        str(_corpus(tmp_path)),
    ]
    argv += ["--out", str(out), "--dtype", "bfloat16", "--max-length", "32", "--no-progress"]
    code, _, err = run_cli(argv)
    assert code == 0, err
    _reloads_in_bf16(out)


def test_distill_head_in_bf16_writes_a_bf16_checkpoint_that_reloads(
    pair: tuple[Path, Path], tmp_path: Path, run_cli: Callable[[list[str]], Any]
) -> None:
    out = tmp_path / "out"
    t, s = pair
    argv = ["distill-head", "--teacher", str(t), "--student", str(s), "--out", str(out)]
    argv += ["--corpus", str(_corpus(tmp_path)), "--fit", "8", "--val", "4", "--dtype", "bfloat16"]
    argv += ["--max-length", "32", "--lambdas", "0.1,1", "--no-progress"]
    code, _, err = run_cli(argv)
    assert code == 0, err
    record = json.loads((out / "head.json").read_text())
    assert record["inputs"]["dtype"] == "bfloat16"
    assert record["validation_chosen"]["kl"] <= record["validation_student"]["kl"]
    _reloads_in_bf16(out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_one_sentence_and_initialises_no_cuda(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    code = (
        "import sys, torch\n"
        "from gradfree.cli import main\n"
        "try:\n"
        f"    main(['eval', '--model', {str(pair[1])!r}, '--corpus', {str(_corpus(tmp_path))!r},"
        f" '--out', {str(out)!r}, '--device', 'cuda', '--no-questions'])\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code)\n"
        "print('cuda initialised', torch.cuda.is_initialized())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.splitlines()[-2:] == ["exit 2", "cuda initialised False"], proc.stdout
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert err == ["error: Device 'cuda' was requested but CUDA is not available here."], err
    assert not out.exists()
