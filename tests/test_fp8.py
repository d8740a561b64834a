"""FP8 checkpoints in the format Qwen publishes for Qwen3 (e4m3 weights, float32
``weight_scale_inv`` per block, ``quantization_config.quant_method: fp8``): written here by the
test itself (no hub), loaded by gradfree on the CPU, written by ``save_checkpoint(...,
weight_format="fp8")`` and read back; malformed ones are one sentence.

The round-trip bound. e4m3fn keeps 3 mantissa bits: a scaled value q = w/s in its normal range
[2^-6, 448] is rounded with relative error at most 2^-4; below 2^-6 (subnormals, spacing 2^-9)
with absolute error at most 2^-10. With s = amax(block)/448 that is, per element,
|ŵ - w| <= max(2^-4 |w|, 2^-10 s), plus float32 rounding of the product (2^-24 relative).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gradfree.base.errors import GradfreeError
from gradfree.models import load_model, save_checkpoint
from gradfree.testing.tiny import HARBOUR_DOCS, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

QWEN_FP8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8"}
PROJ = "model.layers.0.self_attn.q_proj.weight"


def _quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The test's own block quantiser: zero-pad to whole blocks, scale = amax / 448."""
    bm, bn = block
    rows, cols = w.shape
    r, c = math.ceil(rows / bm), math.ceil(cols / bn)
    padded = torch.zeros(r * bm, c * bn)
    padded[:rows, :cols] = w.float()
    blocks = padded.view(r, bm, c, bn)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).view(r * bm, c * bn)[:rows, :cols]
    return q.to(torch.float8_e4m3fn), scale


def _dequantized(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    full = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return q.float() * full[: q.shape[0], : q.shape[1]]


def write_fp8_checkpoint(
    folder: Path, block: tuple[int, int] = (128, 128), seed: int = 3, **config: Any
) -> Any:
    """A tiny Qwen3 in Qwen's FP8 layout (every Linear but the LM head in e4m3); returns the
    float32 model whose Linear weights are the dequantised ones (the reference)."""
    model = tiny_model("qwen3", seed=seed, tie_word_embeddings=False)
    with torch.no_grad():  # what is not FP8 is stored in bf16: the reference holds the same
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            q, scale = _quantize(module.weight.detach(), block)
            tensors[f"{name}.weight"], tensors[f"{name}.weight_scale_inv"] = q, scale
            with torch.no_grad():
                module.weight.copy_(_dequantized(q, scale, block))
    sd = model.state_dict()
    tensors.update({k: v.to(torch.bfloat16) for k, v in sd.items() if k not in tensors})
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {**QWEN_FP8, "weight_block_size": list(block), **config}
    (folder / "config.json").write_text(json.dumps(cfg))
    return model


def _logits(model: Any) -> torch.Tensor:
    ids = torch.tensor([tiny_tokenizer()(HARBOUR_DOCS[0])["input_ids"][:48]])
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("block", [(128, 128), (48, 40)])  # Qwen's; partial edge blocks
def test_an_fp8_checkpoint_loads_on_the_cpu_with_the_dequantised_weights(
    tmp_path: Path, block: tuple[int, int]
) -> None:
    ref = write_fp8_checkpoint(tmp_path / "fp8", block)
    got = load_model(str(tmp_path / "fp8"), dtype="float32")
    assert got.fingerprint["weight_format"] == "fp8"
    assert not hasattr(got.model.config, "quantization_config")
    sd, ref_sd = got.model.state_dict(), ref.state_dict()
    assert torch.equal(sd[PROJ], ref_sd[PROJ])  # fp8 × float32 scale is exact in float32
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert torch.allclose(_logits(got.model), _logits(ref), rtol=1e-5, atol=1e-5)
    half = load_model(str(tmp_path / "fp8"), dtype="bfloat16").model
    assert torch.equal(half.state_dict()[PROJ], ref_sd[PROJ].to(torch.bfloat16))


def test_save_fp8_round_trip_is_within_the_e4m3_bound(tmp_path: Path) -> None:
    model = tiny_model("qwen3", seed=4)  # tied embeddings: the head stays dense
    block = (32, 32)
    save_checkpoint(model, tiny_tokenizer(), tmp_path / "out", weight_format="fp8", block=block)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert {k: cfg[k] for k in QWEN_FP8} == QWEN_FP8 and cfg["weight_block_size"] == [32, 32]
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert stored[PROJ].dtype == torch.float8_e4m3fn
    assert stored[PROJ + "_scale_inv"].dtype == torch.float32
    assert tuple(stored[PROJ + "_scale_inv"].shape) == (2, 2)  # 64 × 64 in 32 × 32 blocks
    back = load_model(str(tmp_path / "out"), dtype="float32").model.state_dict()
    quantised = [k for k, v in stored.items() if v.dtype == torch.float8_e4m3fn]
    assert len(quantised) == 7 * 2  # q, k, v, o, gate, up, down in each of two blocks
    for key, w in model.state_dict().items():
        if key not in quantised:
            assert torch.equal(back[key], w), key  # norms, embedding, head: untouched
            continue
        scale = stored[key + "_scale_inv"].repeat_interleave(32, 0).repeat_interleave(32, 1)
        bound = torch.maximum(w.abs() * 2.0**-4, scale * 2.0**-10) * (1 + 2.0**-20) + 1e-30
        err = (back[key] - w).abs()
        assert (err <= bound).all(), key
        assert err.max() > 0  # it really went through e4m3
    rel = float((back[PROJ] - model.state_dict()[PROJ]).norm() / model.state_dict()[PROJ].norm())
    assert rel < 2.0**-4


def test_transformers_reads_gradfrees_fp8_output_to_the_same_weights(tmp_path: Path) -> None:
    pytest.importorskip("accelerate")  # transformers' FP8 loader needs it
    from transformers import AutoModelForCausalLM

    model = tiny_model("qwen3", seed=5)
    save_checkpoint(model, tiny_tokenizer(), tmp_path / "out", weight_format="fp8", block=(32, 32))
    ours = load_model(str(tmp_path / "out"), dtype="float32").model
    # Without a GPU transformers dequantises the FP8 weights itself: an independent reader.
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    a, b = ours.state_dict(), theirs.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k].to(a[k].dtype)) for k in a)


def _one_sentence(folder: Path, match: str) -> None:
    with pytest.raises(GradfreeError, match=match) as e:
        load_model(str(folder))
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith(".") and msg.count(". ") == 0, msg


def test_a_missing_scale_is_one_sentence(tmp_path: Path) -> None:
    write_fp8_checkpoint(tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != PROJ + "_scale_inv"}  # noqa: SIM118
    save_file(tensors, str(path))
    _one_sentence(tmp_path / "m", r"stores .*q_proj\.weight in float8 without its .*_scale_inv\.")


def test_a_scale_of_the_wrong_shape_or_block_size_is_one_sentence(tmp_path: Path) -> None:
    write_fp8_checkpoint(tmp_path / "s", block=(32, 32))  # 64 × 64 weights: 2 × 2 scales
    cfg_path = tmp_path / "s" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["weight_block_size"] = [128, 128]  # scales say 32 × 32
    cfg_path.write_text(json.dumps(cfg))
    _one_sentence(
        tmp_path / "s",
        r"has shape \(2, [23]\), but a 64×(64|96) weight in 128×128 blocks needs 1×1",
    )
    for bad in ([128], [0, 128], "128x128"):
        cfg["quantization_config"]["weight_block_size"] = bad
        cfg_path.write_text(json.dumps(cfg))
        _one_sentence(tmp_path / "s", r"weight_block_size .* must be two positive integers")


def test_an_unknown_fmt_is_one_sentence_also_on_the_command_line(
    tmp_path: Path, run_cli: Callable[[list[str]], Any], capsys: pytest.CaptureFixture[str]
) -> None:
    write_fp8_checkpoint(tmp_path / "f", fmt="e5m2")
    capsys.readouterr()  # transformers' save bars are not the command's output
    _one_sentence(tmp_path / "f", r"declares FP8 format 'e5m2', but only 'e4m3'")
    docs = tmp_path / "docs.txt"
    docs.write_text(HARBOUR_DOCS[0], encoding="utf-8")
    argv = [
        "eval",
        "--model",
        str(tmp_path / "f"),
        "--corpus",
        str(docs),
        "--out",
        str(tmp_path / "o"),
    ]
    code, _, err = run_cli([*argv, "--no-questions"])
    assert code == 2 and err.count("\n") == 1 and "'e5m2'" in err, err
    assert not (tmp_path / "o").exists()


def test_save_format_is_checked_before_anything_is_written(
    tmp_path: Path, run_cli: Callable[[list[str]], Any]
) -> None:
    argv = ["compress", "--teacher", "t", "--student", "s", "--corpus", "c"]
    code, _, err = run_cli([*argv, "--out", str(tmp_path / "o"), "--save-format", "fp4"])
    assert code == 2 and err.startswith("error: Unknown save format 'fp4'; choose one of"), err
    assert list(tmp_path.iterdir()) == []


def test_distill_head_writes_an_fp8_checkpoint_on_request(
    tmp_path: Path, run_cli: Callable[[list[str]], Any]
) -> None:
    from gradfree.models.fp8 import Fp8Reader
    from gradfree.testing.tiny import save_tiny

    teacher = save_tiny(tmp_path / "t", "qwen3", seed=1)
    student = save_tiny(tmp_path / "s", "qwen3", seed=2, hidden_size=48, num_attention_heads=4)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in HARBOUR_DOCS * 2))
    out = tmp_path / "out"
    argv = ["distill-head", "--teacher", str(teacher), "--student", str(student), "--out", str(out)]
    argv += ["--corpus", str(docs), "--fit", "8", "--val", "4", "--max-length", "32"]
    code, _, err = run_cli([*argv, "--lambdas", "1", "--save-format", "fp8", "--dtype", "bfloat16"])
    assert code == 0, err
    assert json.loads((out / "head.json").read_text())["save_format"] == "fp8"
    reader = Fp8Reader(out, torch.bfloat16)
    assert reader.fmt.block == (128, 128) and PROJ + "_scale_inv" not in reader.names()
    assert reader.stored(PROJ).dtype == torch.float8_e4m3fn
    assert reader.stored("lm_head.weight").dtype == torch.bfloat16  # the distilled head, dense
    back = load_model(str(out), dtype="bfloat16").model
    assert torch.equal(back.state_dict()[PROJ], reader.get(PROJ))
    assert torch.isfinite(_logits(back)).all()
