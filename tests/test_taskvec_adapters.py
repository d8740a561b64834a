"""Tests of gradfree.taskvec.adapters (``make-adapters``): LoRA training with peft on a tiny model
built in code and a tiny corpus written here. Offline and fast."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gradfree.base.errors import GradfreeError
from gradfree.taskvec import adapters
from gradfree.taskvec.adapters import TASKS, TaskSpec, make_adapters
from gradfree.testing.tiny import save_tiny

FAST: dict[str, Any] = {
    "rank": 4,
    "alpha": 8,
    "steps": 12,
    "seq_len": 32,
    "batch_size": 4,
    "lr": 1e-2,
    "progress": False,
}


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("GRADFREE_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(save_tiny(tmp_path_factory.mktemp("tiny") / "base", "llama", seed=3))


@pytest.fixture
def task(tmp_path: Path) -> TaskSpec:
    """A corpus a tiny model can learn in a few steps: one refrain in varied numbers."""
    rows = []
    for i in range(24):
        text = f"The ferry to island {i % 7} leaves pier {i % 5} at dawn. " * 2
        rows.append(
            {"id": f"d{i}", "text": text, "split": "heldout" if i % 4 == 3 else "calibration"}
        )
    rows.append({"id": "fr", "text": "Le bac part a l'aube.", "lang": "fr", "split": "heldout"})
    path = tmp_path / "ferry.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return TaskSpec("ferry", str(path), "ferry timetables", exclude_lang="fr")


def test_adapter_trains_saves_and_loads(base: Path, task: TaskSpec, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from gradfree.evaluation.run import evaluate
    from gradfree.models import load_model
    from gradfree.texts.corpora import load_corpus

    out = tmp_path / "adapters"
    result = make_adapters(
        str(base), [task], out, targets=("q_proj", "v_proj", "down_proj"), **FAST
    )
    s = result["adapters"]["ferry"]
    folder = out / "ferry"
    assert s["path"] == str(folder) and not s["cached"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(adapters.ADAPTER_FILES)
    record = json.loads((folder / "train.json").read_text())
    assert s["train_loss_last"] < s["train_loss_first"]
    assert s["ppl_adapter"] < s["ppl_base"] and s["improvement"] > 0
    assert s["improvement"] == pytest.approx(1 - s["ppl_adapter"] / s["ppl_base"])
    assert len(record["train"]["losses"]) == FAST["steps"]
    assert "fr" not in record["eval"]["document_ids"]  # the task's language filter applies
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8, "LORA")
    assert set(config["target_modules"]) == {"q_proj", "v_proj", "down_proj"}
    card = (folder / "README.md").read_text()
    assert "ferry" in card and record["task"]["corpus_sha256"] in card
    assert f"{s['ppl_adapter']:.3f}" in card and record["base_model"]["weights_digest"] in card
    assert json.loads((out / "adapters.json").read_text())["adapters"][0]["task"] == "ferry"

    # A plain PEFT folder: peft loads it on a fresh base and gives the recorded perplexity.
    loaded = load_model(str(base))
    fresh = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(fresh, str(folder)).eval()
    names = [n for n, _ in peft_model.named_parameters() if "lora_B" in n]
    assert names and all(any(t in n for t in ("q_proj", "v_proj", "down_proj")) for n in names)
    docs = {d.id: d for d in load_corpus(task.corpus)}
    sample = [docs[i] for i in record["eval"]["document_ids"]]
    ev = record["eval"]
    kw = {"max_length": ev["max_length"], "stride": ev["stride"]}
    after = evaluate(peft_model.get_base_model(), loaded.tokenizer, sample, **kw)
    assert after["perplexity"]["ppl"] == pytest.approx(s["ppl_adapter"], rel=1e-5)
    before = evaluate(loaded.model, loaded.tokenizer, sample, **kw)
    assert before["perplexity"]["ppl"] == pytest.approx(s["ppl_base"], rel=1e-5)


def test_rerun_is_cached_and_other_settings_refused(
    base: Path, task: TaskSpec, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "adapters"
    fast = {**FAST, "progress": True, "steps": 8}
    first = make_adapters(str(base), [task], out, **fast)["adapters"]["ferry"]
    err = capsys.readouterr().err
    assert "ferry: step 8/8 loss" in err and "base perplexity" in err
    config = json.loads((out / "ferry" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == set(adapters.TARGETS)  # all seven by default
    stamp = (out / "ferry" / "adapter_model.safetensors").stat().st_mtime_ns
    again = make_adapters(str(base), [task], out, **fast)["adapters"]["ferry"]
    assert again["cached"] and "cached in" in capsys.readouterr().err
    assert again["ppl_adapter"] == first["ppl_adapter"]
    assert (out / "ferry" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(GradfreeError, match="other settings"):
        make_adapters(str(base), [task], out, **{**fast, "lr": 5e-3})
    redo = make_adapters(str(base), [task], out, overwrite=True, **{**fast, "progress": False})
    assert not redo["adapters"]["ferry"]["cached"]
    # Same seed, same data order: the retrained adapter is the same adapter.
    assert redo["adapters"]["ferry"]["ppl_adapter"] == pytest.approx(first["ppl_adapter"])
    (out / "broken").mkdir()
    broken = TaskSpec("broken", task.corpus, "x")
    with pytest.raises(GradfreeError, match="not a complete adapter"):
        make_adapters(str(base), [broken], out, **FAST)


def test_bad_inputs_are_one_sentence(base: Path, task: TaskSpec, tmp_path: Path) -> None:
    out = tmp_path / "o"
    with pytest.raises(GradfreeError, match=r"Unknown task 'nope': use one of tourguide, "):
        make_adapters(str(base), ["nope"], out, **FAST)
    with pytest.raises(GradfreeError, match="not a known model name"):
        make_adapters("no-such-model", [task], out, **FAST)
    with pytest.raises(GradfreeError, match="not fetched yet; run `gradfree models fetch"):
        make_adapters("smollm2-135m-instruct", [task], out, **FAST)
    with pytest.raises(GradfreeError, match="run `gradfree data fetch news`"):
        make_adapters(str(base), ["news"], out, **FAST)
    with pytest.raises(GradfreeError, match="rank must be at least 1"):
        make_adapters(str(base), [task], out, **{**FAST, "rank": 0})
    with pytest.raises(GradfreeError, match="do not all exist in the model"):
        make_adapters(str(base), [task], out, targets=("nope_proj",), **FAST)
    with pytest.raises(GradfreeError, match="fewer than 4096 calibration tokens"):
        make_adapters(str(base), [task], out, **{**FAST, "seq_len": 4096})
    no_held = TaskSpec("none", task.corpus, "x", lang="xx")
    with pytest.raises(GradfreeError, match="no calibration documents"):
        make_adapters(str(base), [no_held], out, **FAST)
    assert not (out / "ferry").exists()


def test_the_eight_tasks() -> None:
    from gradfree.texts.corpora import CORPORA, load_corpus

    assert len(TASKS) == 8 and all(t.corpus in CORPORA for t in TASKS.values())
    assert len({(t.corpus, t.lang, t.exclude_lang) for t in TASKS.values()}) == 8
    docs = load_corpus("tourguide")
    intl = TASKS["tourguide-intl"].select(docs)
    english = TASKS["tourguide"].select(docs)
    assert intl and english and len(intl) + len(english) == len(docs)
    assert {d.split for d in intl} == {"calibration", "heldout"}
    assert all(d.lang != "en" for d in intl) and all(d.lang == "en" for d in english)


def test_paths_blocks_and_sample(base: Path, _cache: Path) -> None:
    from transformers import AutoTokenizer

    assert adapters.adapters_dir("smollm2-135m-instruct") == (
        _cache / "adapters" / "smollm2-135m-instruct"
    )
    tok = AutoTokenizer.from_pretrained(str(base))
    from gradfree.texts.corpora import Document

    docs = [Document(f"d{i}", "x" * (10 + i), "en", "calibration", "t") for i in range(20)]
    blocks, rec = adapters.training_blocks(tok, docs, 16, 5, seed=1)
    again, _ = adapters.training_blocks(tok, docs, 16, 5, seed=1)
    assert blocks == again and len(blocks) == 5 and all(len(b) == 16 for b in blocks)
    assert rec["tokens_used"] == 80 and rec["documents_used"] < 20  # reads only what it needs
    assert adapters.training_blocks(tok, docs, 16, 5, seed=2)[0] != blocks
    sample = adapters.eval_sample(tok, docs, 100)
    assert 2 <= len(sample) < 20 and sample[0].id == "d0" and sample[-1].id == "d19"
    assert adapters.eval_sample(tok, docs, 10**6) == docs


def test_import_does_not_import_torch() -> None:
    code = "import sys, gradfree.taskvec.adapters; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
