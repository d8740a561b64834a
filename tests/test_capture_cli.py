"""`gradfree capture` and `gradfree capture combine` end to end on tiny model folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gradfree.capture import load_capture
from gradfree.testing.tiny import save_tiny, tiny_tokenizer


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    save_tiny(root / "teacher", "qwen3", num_hidden_layers=3)
    save_tiny(root / "student", "qwen3", seed=1, hidden_size=48, head_dim=12)
    other = save_tiny(root / "other", "qwen3", seed=2)
    tok = tiny_tokenizer()
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    lines = [
        json.dumps({"id": f"t{i}", "text": "A tour of the old town. " * (i + 1)}) for i in range(6)
    ]
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    (root / "a.jsonl").write_text("\n".join(lines[:3]) + "\n")
    (root / "b.jsonl").write_text("\n".join(lines[3:]) + "\n")
    (root / "empty.txt").write_text("\n\n")
    return root


def test_paired_capture_and_merge(work: Path, run_cli) -> None:
    common = ["--teacher", str(work / "teacher"), "--student", str(work / "student")]
    common += ["--max-length", "32", "--batch-size", "1", "--sites", "resid_pre,v,final.normed"]
    common += ["--no-progress"]
    code, out, err = run_cli(
        ["capture", *common, "--corpus", str(work / "docs.jsonl"), "--out", str(work / "all")]
    )
    assert code == 0, err
    assert out.strip() == str(work / "all") and "cross pairs" in err and "teacher" in err
    cap = load_capture(work / "all")
    assert cap.manifest["corpus"]["n_docs"] == 6 and cap.layer_map == [0, 2]
    assert cap.manifest["roles"]["student"]["name"] and cap.keys("student")[-1] == "final.normed"
    for part in ("a", "b"):
        out_dir = str(work / part)
        code, _, err = run_cli(
            ["capture", *common, "--corpus", str(work / f"{part}.jsonl"), "--out", out_dir]
        )
        assert code == 0, err
    code, out, err = run_cli(
        ["capture", "combine", str(work / "a"), str(work / "b"), "--out", str(work / "ab")]
    )
    assert code == 0, err
    merged = load_capture(work / "ab")
    for tk, sk in cap.cross_pairs():
        want = cap.cross(tk, sk).m_ab
        torch.testing.assert_close(merged.cross(tk, sk).m_ab, want, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sites", "resid_pre,oops"], "Unknown site 'oops'; valid sites are:"),
        (["--out", "EXISTING"], "already exists; choose another path or pass --overwrite."),
        (["--corpus", "EMPTY"], "has no documents."),
        (["--model", "MISSING"], "is not a known model name, a local folder"),
        (["--student", "OTHER"], "The teacher and student tokenizers differ"),
        (["--teacher", None], "Pass --model, or both --teacher and --student."),
    ],
)
def test_errors_are_one_line(
    work: Path,
    run_cli,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str | None],
    message: str,
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (work / "existing").mkdir(exist_ok=True)
    subst = {
        "EXISTING": str(work / "existing"),
        "EMPTY": str(work / "empty.txt"),
        "MISSING": str(work / "no-such-model"),
        "OTHER": str(work / "other"),
    }
    opts: dict[str, str | None] = {
        "--teacher": str(work / "teacher"),
        "--student": str(work / "student"),
        "--corpus": str(work / "docs.jsonl"),
        "--out": str(work / "never"),
    }
    if args[0] == "--model":
        opts.pop("--teacher"), opts.pop("--student")
    opts[str(args[0])] = subst.get(str(args[1]), args[1])
    argv = ["capture", "--no-progress"] + [x for k, v in opts.items() if v for x in (k, v)]
    argv += [str(a) for a in args[2:]]
    code, _, err = run_cli(argv)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert not (work / "never").exists()
