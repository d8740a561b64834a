"""`gradfree align`, `gradfree ablate` and `gradfree ledger check` on tiny model folders: one
end-to-end run, and error paths that give one sentence and leave no output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gradfree.testing.tiny import save_tiny

TEXTS = [
    "The old bridge crosses the river near the market square.",
    "Visitors climb the tower at dawn to see the mountains.",
    "The museum keeps maps, coins and letters from the harbour.",
]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("align_cli")
    save_tiny(root / "teacher", "qwen2.5-1.5b-like", seed=1)
    save_tiny(root / "student", "qwen2.5-0.5b-like", seed=2)
    lines = [json.dumps({"id": f"c{i}", "text": t}) for i, t in enumerate(TEXTS)]
    (root / "calib.jsonl").write_text("\n".join(lines) + "\n")
    recipe = {
        "corpus": str(root / "calib.jsonl"),
        "split": None,
        "max_length": 32,
        "dump_max": 32,
        "pattern_docs": 1,
        "pattern_max_length": 16,
    }
    import yaml

    (root / "align.yaml").write_text(yaml.safe_dump(recipe))
    (root / "bad.yaml").write_text(yaml.safe_dump({**recipe, "rotatoin": True}))
    (root / "ablate_bad.yaml").write_text(yaml.safe_dump({"variants": ["base", "nonsense"]}))
    return root


def _models(work: Path) -> list[str]:
    return ["--teacher", str(work / "teacher"), "--student", str(work / "student")]


def test_align_end_to_end_is_function_preserving(work: Path, run_cli) -> None:
    out = work / "aligned"
    code, stdout, err = run_cli(
        ["align", *_models(work), "--config", str(work / "align.yaml"), "--out", str(out)]
    )
    assert code == 0, err
    assert stdout.strip().endswith("report.md")
    record = json.loads((out / "align.json").read_text())
    assert record["function_preserving"] and record["max_relative_logit_change"] < 1e-5
    assert "changes nothing the model computes" in (out / "report.md").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["prompts"]) == len(TEXTS) and manifest["run_id"] == record["run_id"]
    # the checkpoint loads with vanilla transformers and computes what the student computes
    ids = torch.tensor([[5, 40, 71, 100, 33, 2]])
    aligned = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    original = AutoModelForCausalLM.from_pretrained(work / "student").eval()
    with torch.no_grad():
        a, b = aligned(ids).logits, original(ids).logits
    assert float((a - b).abs().max() / b.abs().max()) < 1e-5
    # the ledger re-checks from its stored matrices, with plots
    ledger = out / "rotations" / record["run_id"]
    code, _, err = run_cli(["ledger", "check", str(ledger), "--out", str(work / "check")])
    assert code == 0 and "ok" in err
    assert (work / "check" / "orthogonality.png").is_file()
    assert json.loads((work / "check" / "check.json").read_text())["ok"]
    # an existing output is refused, and left as it was
    before = sorted(p.name for p in out.iterdir())
    code, _, err = run_cli(
        ["align", *_models(work), "--config", str(work / "align.yaml"), "--out", str(out)]
    )
    assert code == 2 and "already exists" in err and err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["align", "--config", "{work}/bad.yaml"], "Unknown align option 'rotatoin'"),
        (["align", "--config", "{work}/missing.yaml"], "does not exist"),
        (["ablate", "--config", "{work}/ablate_bad.yaml"], "unknown variant 'nonsense'"),
        (["ablate", "--variants", "base,perm,bogus"], "unknown variant 'bogus'"),
        (["align", "--config", "{work}/align.yaml", "--teacher", "{work}/nowhere"], "not a known"),
    ],
)
def test_cli_errors_are_one_sentence_and_leave_nothing(
    work: Path, run_cli, argv: list[str], message: str
) -> None:
    out = work / "never"
    args = [a.format(work=work) for a in argv]
    if "--teacher" not in args:
        args += _models(work)
    else:
        args += ["--student", str(work / "student")]
    code, _, err = run_cli([*args, "--out", str(out)])
    assert code == 2, err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1
    assert not out.exists()
    assert not list(work.glob(".never*"))


def test_ledger_check_errors(work: Path, run_cli) -> None:
    empty = work / "empty_ledger"
    empty.mkdir()
    code, _, err = run_cli(["ledger", "check", str(empty), "--out", str(work / "c2")])
    assert code == 2 and "holds no layer_<i>.json" in err and err.count("\n") == 1
    assert not (work / "c2").exists()
    code, _, err = run_cli(["ledger", "check", str(work / "absent")])
    assert code == 2 and "does not exist" in err
