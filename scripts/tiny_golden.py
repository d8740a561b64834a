"""Behaviour check for refactors: run the demo and an experiment on tiny models, compare two runs.

    python scripts/tiny_golden.py run OUT      # at one commit
    python scripts/tiny_golden.py compare A B  # every float of every JSON file, every tensor

The demo (capture, distilled head, scoring, spectra), a four-variant alignment ablation and a
seven-row ``gradfree experiment`` (α sweep, data efficiency) run on two ``save_tiny`` models
in one thread, seeded. ``compare`` ignores times, memory, paths and run ids; it reports every
other float that is not bit-identical and every differing safetensors tensor.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

TIMING = re.compile(r"second|rss|time|wall|elapsed")


def run(out: Path) -> None:
    import torch

    from gradfree.align import run_ablation
    from gradfree.align.config import AblateConfig, AlignConfig
    from gradfree.experiment import make_experiment, run_experiment
    from gradfree.experiment.demo import DemoConfig, run_demo
    from gradfree.models import load_model
    from gradfree.testing.tiny import save_tiny

    torch.set_num_threads(1)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    torch.manual_seed(0)
    d = out / "pair"
    teacher = save_tiny(d / "t", "qwen2", seed=1, hidden_size=96, num_attention_heads=6)
    student = save_tiny(d / "s", "qwen2", seed=2)
    demo = DemoConfig(
        teacher=str(teacher),
        student=str(student),
        calibration_limit=4,
        validation_limit=2,
        heldout_limit=3,
        public_corpus="tourguide",
        public_limit=2,
        max_length=48,
        head_lambdas=[1.0],
        head_blends=[0.5, 1.0],
    )
    torch.manual_seed(0)
    run_demo(demo, out / "demo", say=lambda _: None)
    ablation = AblateConfig(
        align=AlignConfig(
            limit=3,
            max_length=32,
            dump_max=64,
            pattern_docs=1,
            pattern_max_length=16,
            ridge_head=True,
            style_places=2,
            style_tokens=4,
        ),
        variants=["base", "perm", "perm+rot", "style"],
        heldout_limit=2,
        questions=2,
        max_new_tokens=3,
        prompt_places=2,
        prompt_tokens=4,
    )
    torch.manual_seed(0)
    pair = [load_model(str(p)) for p in (teacher, student)]
    run_ablation(*pair, ablation, out / "ablation")
    heldout = {"corpus": "tourguide", "split": "heldout"}
    ecfg = {
        "teacher": str(teacher),
        "student": str(student),
        "calibration": {"corpus": "tourguide", "split": "calibration", "limit": 4},
        "validation": {"corpus": "tourguide", "split": "calibration", "skip": 4, "limit": 2},
        "task": {**heldout, "limit": 3},
        "out_of_task": [{**heldout, "skip": 3, "limit": 2}],
        "questions": 2,
        "max_length": 40,
        "recipe": {"dump_rate": 1.0},
        "head_lambdas": [1.0],
        "head_blends": [0.5, 1.0],
        "rows": [
            {"name": "student", "kind": "student"},
            {"name": "joint/none", "recipe": {"merge": "none"}},
            {"name": "svd/optimal", "recipe": {"basis": "svd", "merge": "optimal"}},
            {"name": "joint/measured", "recipe": {"merge": "measured", "alpha_grid": [0.5, 1]}},
            {"name": "student+head", "kind": "student", "head": True},
            {"name": "joint/none+head", "recipe": {"merge": "none"}, "head": True},
            {"name": "cka/ridge", "recipe": {"layer_map": "cka", "merge": "ridge"}},
        ],
        "studies": {
            "alpha_sweep": {"layers": [1], "alphas": [0.0, 1.0]},
            "data_efficiency": {"sizes": [2], "rows": ["joint/none", "student+head"]},
        },
    }
    torch.manual_seed(0)
    run_experiment(make_experiment(ecfg), out / "exp")


def _flat(x: Any, p: str = "") -> dict[str, Any]:
    if isinstance(x, dict):
        return {k: v for key, val in x.items() for k, v in _flat(val, f"{p}.{key}").items()}
    if isinstance(x, list):
        return {k: v for i, val in enumerate(x) for k, v in _flat(val, f"{p}[{i}]").items()}
    return {p: x}


def _twin(a: Path, b: Path, f: Path) -> Path:
    rel = f.relative_to(a)
    if "rotations" in rel.parts:  # the ledger folder is named by the run's random id
        i = rel.parts.index("rotations")
        found = sorted((b / Path(*rel.parts[: i + 1])).glob("*"))
        return found[0] / Path(*rel.parts[i + 2 :]) if found else b / rel
    return b / rel


def compare(a: Path, b: Path) -> int:
    import torch
    from safetensors.torch import load_file

    floats = same = tensors = 0
    problems: list[str] = []
    for f in sorted(a.rglob("*.json")):
        if "pair" in f.relative_to(a).parts or f.name == "manifest.json":
            continue
        g = _twin(a, b, f)
        if not g.exists():
            problems.append(f"{g} is missing")
            continue
        x, y = _flat(json.loads(f.read_text())), _flat(json.loads(g.read_text()))
        for k, v in x.items():
            if isinstance(v, float) and not TIMING.search(k):
                floats += 1
                same += y.get(k) == v
                if y.get(k) != v:
                    problems.append(f"{f.relative_to(a)}{k}: {v!r} vs {y.get(k)!r}")
    for f in sorted(a.rglob("*.safetensors")):
        if "pair" in f.relative_to(a).parts:
            continue
        g = _twin(a, b, f)
        x, y = load_file(str(f)), load_file(str(g)) if g.exists() else {}
        tensors += len(x)
        problems += [
            f"{f.relative_to(a)}: {k}" for k in x if k not in y or not torch.equal(x[k], y[k])
        ]
    print(f"{same} of {floats} floats bit-identical; {tensors} tensors compared")
    for line in problems[:50]:
        print("  " + line)
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "run":
        run(Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        sys.exit(__doc__)
