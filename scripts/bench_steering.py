"""Steering benchmark for issue 16: our concept directions against the steering-vectors package's
contrastive (CAA-style) vectors, and directions transferred from the 1.5B to the 0.5B.

    python scripts/bench_steering.py                 # every stage, each cached under runs/
    python scripts/bench_steering.py --stage steer   # one stage (setup, prepare, caa, steer,
                                                     # capture, transfer, report)

Stages (each resumes from what earlier runs left in runs/bench-steering/):

- setup: creates runs/venv-steering once (torch==2.13.0 CPU, transformers==4.57.6,
  steering-vectors==0.12.2: the package pins transformers < 5, so it cannot share the project's
  venv).
- prepare: reads the extracted directions (runs/directions/qwen0.5b-50k and qwen1.5b-20k), picks the
  layer, the concepts to steer (held-out test split, single-token words), related words (nearest
  single-token concepts by the model's input-embedding cosine, independent of either method),
  and measures the median residual norm at the layer on neutral text: every vector is steered
  as unit vector × strength × that norm, so strengths mean the same for every method (equal norm).
- caa (in runs/venv-steering): CAA vectors with ``steering_vectors.train_steering_vector`` at
  the same block output (decoder_block, last token): positive prompts are the extraction's
  templates with the concept, negative ones the same templates with neutral words. Saved as
  .npy; also checks that the package's own ``apply`` and our hook give the same logits.
- steer: ``gradfree.directions.steer.steering_effect`` for ours (mean and last pooling) and CAA.
- capture: a paired capture (1.5B teacher, 0.5B student) of the residual streams at the chosen
  layers on news text (calibration split to fit, held-out split to choose λ / ε / k).
- transfer: maps fitted from the capture's cross-moments (ridge, whitened Procrustes, PCA
  Procrustes) and, for comparison, from paired train-split directions; (a) held-out cosine of
  transferred 1.5B directions to the 0.5B's own on test concepts; (b) steering effect of the
  transferred directions against the native ones at equal norm.
- report: tables on stdout, JSON to docs/results/data/directions-steering-2026-12-07.json, curves
  to docs/results/directions-steering.png.

Only the stdlib is imported at module level: the caa stage runs this file in the other venv.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs"
WORK = Path(os.environ.get("BENCH_STEERING_WORK", RUNS / "bench-steering"))
VENV = RUNS / "venv-steering"
PINS = ["torch==2.13.0", "transformers==4.57.6", "steering-vectors==0.12.2"]
STUDENT = "qwen2.5-coder-0.5b-instruct"
TEACHER = "qwen2.5-coder-1.5b-instruct"
STUDENT_DIRS = RUNS / "directions" / "qwen0.5b-50k"
TEACHER_DIRS = RUNS / "directions" / "qwen1.5b-20k"
OUT_JSON = ROOT / "docs" / "results" / "data" / "directions-steering-2026-12-07.json"
OUT_PNG = ROOT / "docs" / "results" / "directions-steering.png"
NEUTRAL_WORDS = ("thing", "stuff", "something")
PROMPTS = [
    "I want to tell you about the",
    "Yesterday I saw a",
    "The most important thing is the",
    "She looked at the",
    "In the morning we talked about the",
    "He could not stop thinking about the",
    "The picture showed a",
    "Let me describe the",
    "They were looking for a",
    "It reminded me of the",
    "The article was about the",
    "On the table there was a",
    "I have never seen such a",
    "Everyone was talking about the",
    "My favourite thing in the world is the",
    "The next chapter is about the",
]
# Dense below 0.5: the equal-cost table reads perplexity ratios up to 2, which every method
# reaches by strength 0.5-0.75 (1.5 costs x100 or more and told nothing).
STRENGTHS = [0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0]
COSTS = [1.05, 1.1, 1.25, 1.5, 2.0]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read(path: Path) -> Any:
    return json.loads(path.read_text())


def write(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


# setup ------------------------------------------------------------------------------------------


def stage_setup(_: argparse.Namespace) -> None:
    marker = VENV / "gradfree-pins.txt"
    if marker.exists() and marker.read_text().split() == PINS:
        log(f"venv ready: {VENV}")
        return
    t0 = time.time()
    if not (VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", *PINS], check=True)
    marker.write_text("\n".join(PINS) + "\n")
    log(f"venv created in {time.time() - t0:.0f} s: {VENV}")


# prepare ----------------------------------------------------------------------------------------


def _model_dir(name: str) -> Path:
    from gradfree.models.fetch import known_model_dir

    return Path(name) if Path(name).is_dir() else known_model_dir(name)


def _neutral_docs(n: int, chars: int) -> list[str]:
    from gradfree.texts.corpora import load_corpus

    docs = load_corpus("news", split="heldout", limit=n)
    return [d.text[:chars] for d in docs]


def _nearest(layers: list[int], target: float) -> int:
    return min(layers, key=lambda x: (abs(x - target), x))


def stage_prepare(a: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from gradfree.adapters import get_adapter
    from gradfree.directions.concepts import split_concepts
    from gradfree.directions.steer import word_token
    from gradfree.directions.store import load_directions
    from gradfree.models import load_model

    out = WORK / "plan.json"
    if out.exists():
        log("plan exists")
        return
    ds, dt = load_directions(STUDENT_DIRS), load_directions(TEACHER_DIRS)
    lm = load_model(STUDENT, "cpu", "float32")
    adapter = get_adapter(lm.model)
    n_s = adapter.num_layers
    n_t = int(dt.model.get("num_layers") or 28)
    layer = a.layer if a.layer is not None else _nearest(ds.layers, (n_s - 1) / 2)
    from gradfree.solvers.layermap import proportional_map

    # the teacher layer the capture pairs with it (proportional map), or the nearest extracted
    t_layer = _nearest(dt.layers, proportional_map(n_t, n_s)[layer + 1] - 1)
    tok = lm.tokenizer
    split = split_concepts(ds.concepts, seed=0)
    t_index = {c: i for i, c in enumerate(dt.concepts)}

    def single(w: str) -> bool:
        n = len(tok(" " + w, add_special_tokens=False)["input_ids"])
        return w.isalpha() and (n == 1 or a.multi_token_ok)

    # Candidates: held-out content words (no stop words, not the most common, one token). They
    # are ranked by how plausible the model finds them after the prompts (which all end in "the"
    # or "a", so nouns rank first), a choice made by the model alone, before either method runs.
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    cands = [
        i
        for i in split["test"]
        if a.skip_common <= i < a.max_index
        and ds.concepts[i] not in ENGLISH_STOP_WORDS
        and len(ds.concepts[i]) >= 4
        and single(ds.concepts[i])
        and ds.concepts[i] in t_index
    ]
    cand_ids = torch.tensor([word_token(tok, ds.concepts[i]) for i in cands])
    score = torch.zeros(len(cands), dtype=torch.float64)
    with torch.inference_mode():
        for prompt in PROMPTS:
            logits = lm.model(**tok(prompt, return_tensors="pt"), use_cache=False).logits[0, -1]
            score += torch.log_softmax(logits.double(), dim=-1)[cand_ids] / len(PROMPTS)
    order = torch.argsort(score, descending=True).tolist()
    chosen = sorted(cands[j] for j in order[: a.concepts])
    # related words: nearest single-token concepts by input-embedding cosine (neither method's)
    emb = adapter.embed_tokens.weight.detach().double()
    pool = [i for i in range(len(ds.concepts)) if single(ds.concepts[i])][:8000]
    pool_ids = torch.tensor([word_token(tok, ds.concepts[i]) for i in pool])
    pe = torch.nn.functional.normalize(emb[pool_ids], dim=1)
    related = {}
    for i in chosen:
        e = torch.nn.functional.normalize(emb[word_token(tok, ds.concepts[i])], dim=0)
        order = torch.argsort(pe @ e, descending=True).tolist()
        cw = ds.concepts[i].lower()
        words = [ds.concepts[pool[j]] for j in order if ds.concepts[pool[j]].lower() != cw]
        related[ds.concepts[i]] = words[:3]
    # median residual norm after block `layer` on the neutral text (first tokens left out)
    docs = _neutral_docs(a.docs, a.doc_chars)
    norms: list[float] = []

    def hook(_m: Any, _i: Any, o: Any) -> None:
        h = o[0] if isinstance(o, tuple) else o
        norms.extend(h[0, 1:].norm(dim=-1).tolist())

    handle = adapter.layer_modules[layer].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            for d in docs:
                lm.model(**tok(d, return_tensors="pt"), use_cache=False)
    finally:
        handle.remove()
    plan = {
        "student": STUDENT,
        "teacher": TEACHER,
        "student_dirs": str(STUDENT_DIRS),
        "teacher_dirs": str(TEACHER_DIRS),
        "layer": layer,
        "teacher_layer": t_layer,
        "student_layers": n_s,
        "teacher_layers": n_t,
        "concept_index": chosen,
        "concepts": [ds.concepts[i] for i in chosen],
        "teacher_index": [t_index[ds.concepts[i]] for i in chosen],
        "related": related,
        "templates": list(ds.templates),
        "neutral_words": list(NEUTRAL_WORDS),
        "prompts": PROMPTS,
        "neutral_docs": {
            "corpus": "news",
            "split": "heldout",
            "n": len(docs),
            "chars": a.doc_chars,
        },
        "residual_norm_median": float(np.median(norms)),
        "strengths_rel": STRENGTHS,
        "concept_selection": (
            f"test split of split_concepts(seed=0), list index in [{a.skip_common}, "
            f"{a.max_index}), alphabetic, >= 4 letters, not in scikit-learn's "
            "ENGLISH_STOP_WORDS, one token as ' '+word, in the teacher's list; the "
            f"{a.concepts} with the highest mean log-probability after the prompts "
            "(unsteered), in list order"
        ),
    }
    write(out, plan)
    log(
        f"plan: layer {layer} (teacher {t_layer}), concepts {plan['concepts']}, "
        f"|h| median {plan['residual_norm_median']:.2f}"
    )


# caa (runs inside runs/venv-steering) -----------------------------------------------------------


def stage_caa(a: argparse.Namespace) -> None:
    if (WORK / "caa.npy").exists():
        log("caa vectors exist")
        return
    stage_setup(a)
    t0 = time.time()
    env = dict(os.environ, PYTHONNOUSERSITE="1")
    env.pop("PYTHONPATH", None)
    subprocess.run(
        [
            str(VENV / "bin" / "python"),
            __file__,
            "--stage",
            "caa-worker",
            "--model-dir",
            str(_model_dir(STUDENT)),
        ],
        check=True,
        env=env,
    )
    log(f"caa done in {time.time() - t0:.0f} s")


def _worker_tokenizer(transformers: Any, folder: Path) -> Any:
    """The folder's tokenizer under transformers 4.57: folders written by transformers 5 name
    the class ``TokenizersBackend``, which 4.57 lacks, so the same tokenizer.json is wrapped
    in a PreTrainedTokenizerFast with the special tokens of tokenizer_config.json."""
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder))
    except ValueError:
        cfg = read(folder / "tokenizer_config.json")
        special = {
            k: cfg[k]
            for k in ("bos_token", "eos_token", "pad_token", "unk_token")
            if isinstance(cfg.get(k), str)
        }
        return transformers.PreTrainedTokenizerFast(
            tokenizer_file=str(folder / "tokenizer.json"), **special
        )


def caa_worker(a: argparse.Namespace) -> None:
    from importlib import metadata

    import numpy as np
    import steering_vectors
    import torch
    import transformers
    from steering_vectors import train_steering_vector

    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    plan = read(WORK / "plan.json")
    layer = int(plan["layer"])
    tok = _worker_tokenizer(transformers, Path(a.model_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    model.eval()
    vecs, times = [], []
    for concept in plan["concepts"]:
        samples = [
            (t.replace("{concept}", concept), t.replace("{concept}", w))
            for t in plan["templates"]
            for w in plan["neutral_words"]
        ]
        t0 = time.time()
        sv = train_steering_vector(
            model, tok, samples, layers=[layer], layer_type="decoder_block", read_token_index=-1
        )
        times.append(time.time() - t0)
        vecs.append(sv.layer_activations[layer].detach().double().cpu().numpy())
    # Same steering as ours? The package's own apply against a plain hook on the block output.
    ids = tok(plan["prompts"][0], return_tensors="pt")
    v = torch.tensor(vecs[0], dtype=torch.float32)
    mult = 2.0

    def hook(_m: Any, _i: Any, o: Any) -> Any:
        return (o[0] + mult * v, *o[1:]) if isinstance(o, tuple) else o + mult * v

    with torch.inference_mode():
        sv0 = steering_vectors.SteeringVector({layer: v}, "decoder_block")
        with sv0.apply(model, multiplier=mult):
            theirs = model(**ids).logits
        h = model.model.layers[layer].register_forward_hook(hook)
        try:
            ours = model(**ids).logits
        finally:
            h.remove()
        base = model(**ids).logits
    np.save(WORK / "caa.npy", np.stack(vecs))
    write(
        WORK / "caa.json",
        {
            "package": "steering-vectors",
            "version": metadata.version("steering-vectors"),
            "tokenizer_class": type(tok).__name__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "layer": layer,
            "layer_type": "decoder_block",
            "read_token_index": -1,
            "pairs_per_concept": len(plan["templates"]) * len(plan["neutral_words"]),
            "seconds_per_concept": times,
            "apply_vs_hook_max_abs_logit_diff": float((theirs - ours).abs().max()),
            "apply_changes_logits_by": float((theirs - base).abs().max()),
            "norms": [float(np.linalg.norm(x)) for x in vecs],
        },
    )


# steering measurements ----------------------------------------------------------------------


class _Ctx:
    """The student model, neutral docs and the steering measurement, loaded once per stage."""

    def __init__(self, a: argparse.Namespace) -> None:
        from gradfree.models import load_model

        self.plan = read(WORK / "plan.json")
        self.lm = load_model(STUDENT, "cpu", "float32")
        p = self.plan["neutral_docs"]
        self.docs = _neutral_docs(p["n"], p["chars"])
        self.scale = float(self.plan["residual_norm_median"])
        self.strengths = [s * self.scale for s in self.plan["strengths_rel"]]
        self.deadline = time.time() + a.budget_s
        self.base: dict[str, Any] = {}

    def curve(self, name: str, concept: str, vector: Any) -> list[dict[str, Any]] | None:
        """Cached steering curve of one unit-normalised vector, or None when out of time."""
        import numpy as np

        from gradfree.directions.steer import steering_effect

        path = WORK / "steer" / f"{name}.{concept}.json"
        if path.exists():
            return read(path)  # type: ignore[no-any-return]
        if time.time() > self.deadline:
            return None
        v = np.asarray(vector, dtype=np.float64)
        v = v / np.linalg.norm(v)
        t0 = time.time()
        rows = steering_effect(
            self.lm.model,
            self.lm.tokenizer,
            v,
            int(self.plan["layer"]),
            self.strengths,
            self.plan["prompts"],
            [concept],
            self.docs,
            "cpu",
            related_words=self.plan["related"][concept],
            max_length=128,
            baseline=self.base.get(concept),
        )
        self.base.setdefault(concept, rows[0]["base"])
        for r, rel in zip(rows, self.plan["strengths_rel"], strict=True):
            r["strength_rel"] = rel
        rows[0]["seconds"] = time.time() - t0
        write(path, rows)
        log(
            f"{name} {concept}: rise@max {rows[-1]['rise']:.3f}, ppl x{rows[-1]['ppl_ratio']:.2f}"
            f" ({time.time() - t0:.0f} s)"
        )
        return rows


def _directions_rows(folder: Path, index: list[int], layer: int, pooling: str) -> Any:
    from gradfree.directions.store import load_directions

    d = load_directions(folder)
    return d.get(layer, pooling)[index]


def stage_steer(a: argparse.Namespace) -> None:
    import numpy as np

    ctx = _Ctx(a)
    plan = ctx.plan
    caa = np.load(WORK / "caa.npy")
    ours = {
        p: _directions_rows(STUDENT_DIRS, plan["concept_index"], plan["layer"], p)
        for p in a.poolings
    }
    for k, concept in enumerate(plan["concepts"]):
        for p in a.poolings:
            ctx.curve(f"ours-{p}", concept, ours[p][k])
        ctx.curve("caa", concept, caa[k])
    log("steer stage done" if time.time() <= ctx.deadline else "steer stage stopped (budget)")


# transfer ---------------------------------------------------------------------------------------


def _layer_map(layer: int, t_layer: int, n_s: int, n_t: int) -> list[int]:
    from gradfree.solvers.layermap import proportional_map

    m = proportional_map(n_t, n_s)
    j = layer + 1
    return [
        min(x, t_layer + 1) if i < j else t_layer + 1 if i == j else max(x, t_layer + 1)
        for i, x in enumerate(m)
    ]


def stage_capture(a: argparse.Namespace) -> None:
    from gradfree.capture import make_config, run_capture
    from gradfree.models import load_model
    from gradfree.texts.corpora import load_corpus

    if a.capture_layers:
        # Before the plan exists: student block outputs given, teacher blocks proportional.
        layers = [x + 1 for x in a.capture_layers]
        layer_map: Any = "proportional"
    else:
        plan = read(WORK / "plan.json")
        layer, t_layer = int(plan["layer"]), int(plan["teacher_layer"])
        if layer + 1 >= plan["student_layers"] or t_layer + 1 >= plan["teacher_layers"]:
            raise SystemExit("the transfer capture needs layers below the last block")
        layers = [layer + 1]
        layer_map = _layer_map(layer, t_layer, plan["student_layers"], plan["teacher_layers"])
    subjects = None
    for split, n_docs in (("calibration", a.capture_docs), ("heldout", a.capture_docs_heldout)):
        out = WORK / f"capture-{split}"
        if (out / "manifest.json").exists():
            log(f"capture {split} exists")
            continue
        if subjects is None:
            subjects = {
                "teacher": load_model(TEACHER, "cpu", "float32"),
                "student": load_model(STUDENT, "cpu", "float32"),
            }
        docs = load_corpus("news", split=split, limit=n_docs)
        cfg = make_config(
            sites=["resid_pre"],
            layers=layers,
            layer_map=layer_map,
            max_length=a.capture_len,
            batch_size=4,
        )
        t0 = time.time()
        run_capture(subjects, docs, out, cfg, progress=False, overwrite=False)
        log(f"capture {split}: {len(docs)} docs in {time.time() - t0:.0f} s")


def _cos_summary(c: Any) -> dict[str, float]:
    import numpy as np

    return {
        "mean": float(np.mean(c)),
        "median": float(np.median(c)),
        "p10": float(np.percentile(c, 10)),
    }


def stage_transfer(a: argparse.Namespace) -> None:
    import numpy as np

    from gradfree.capture import load_capture
    from gradfree.directions.concepts import split_concepts
    from gradfree.directions.store import load_directions
    from gradfree.directions.transfer import (
        PairedMoments,
        cosines,
        fit_transfer,
        transfer_directions,
    )

    plan = read(WORK / "plan.json")
    layer, t_layer = int(plan["layer"]), int(plan["teacher_layer"])
    out = WORK / "transfer.json"
    if out.exists():
        result = read(out)
    else:
        ds, dt = load_directions(STUDENT_DIRS), load_directions(TEACHER_DIRS)
        t_index = {c: i for i, c in enumerate(dt.concepts)}
        split = split_concepts(ds.concepts, seed=0)
        sel = {k: [i for i in v if ds.concepts[i] in t_index] for k, v in split.items()}
        tsel = {k: [t_index[ds.concepts[i]] for i in v] for k, v in sel.items()}
        sk = f"blocks.{layer + 1}.resid_pre"
        cap_fit, cap_held = (
            load_capture(WORK / "capture-calibration"),
            load_capture(WORK / "capture-heldout"),
        )
        pairs = dict((b, t) for t, b in cap_fit.cross_pairs())
        if sk not in pairs:
            raise SystemExit(f"the capture has no student site {sk}; rerun the capture stage")
        tk = pairs[sk]  # the teacher site paired with it (noted when not the directions' layer)
        fit = PairedMoments.from_capture(cap_fit, tk, sk)
        held = PairedMoments.from_capture(cap_held, tk, sk)
        maps: dict[str, Any] = {}
        t0 = time.time()
        maps["capture-ridge"] = fit_transfer(fit, "ridge", heldout=held)
        maps["capture-procrustes-whitened"] = fit_transfer(fit, "procrustes", heldout=held)
        maps["capture-procrustes-pca"] = fit_transfer(fit, "procrustes", space="pca", heldout=held)
        fit_s = time.time() - t0
        result = {
            "capture_sites": {
                "student": sk,
                "teacher": tk,
                "teacher_directions_layer_output": t_layer,
            },
            "capture_tokens": {"fit": fit.count, "heldout": held.count},
            "fit_seconds": fit_s,
            "maps": {},
            "cosine": {},
        }
        for pooling in a.poolings:
            xs, xt = ds.get(layer, pooling), dt.get(t_layer, pooling)
            pm = {k: PairedMoments.from_arrays(xt[tsel[k]], xs[sel[k]]) for k in ("train", "val")}
            maps[f"concepts-ridge.{pooling}"] = fit_transfer(
                pm["train"], "ridge", heldout=pm["val"]
            )
            maps[f"concepts-procrustes-whitened.{pooling}"] = fit_transfer(
                pm["train"], "procrustes", heldout=pm["val"]
            )
            for name, m in maps.items():
                if name.startswith("concepts-") and not name.endswith("." + pooling):
                    continue
                c = cosines(transfer_directions(xt, m, rows=tsel["test"]), xs[sel["test"]])
                result["cosine"][f"{name.split('.')[0]}.{pooling}"] = _cos_summary(c)
            # the steered concepts' transferred vectors, for part (b)
            for name, m in maps.items():
                if name.startswith("concepts-") and not name.endswith("." + pooling):
                    continue
                np.save(
                    WORK / f"transfer-{name.split('.')[0]}.{pooling}.npy",
                    transfer_directions(xt, m, rows=plan["teacher_index"]),
                )
        result["maps"] = {k: m.to_json() for k, m in maps.items()}
        result["test_concepts"] = len(sel["test"])
        write(out, result)
    for key, c in result["cosine"].items():
        log(f"(a) held-out cosine {key}: mean {c['mean']:.4f}")
    # (b) steering: transferred vs native at equal norm (all vectors unit × strength × |h|)
    ctx = _Ctx(a)
    native = {
        p: _directions_rows(STUDENT_DIRS, plan["concept_index"], layer, p) for p in a.poolings
    }
    best = a.transfer_steer or _best_maps(result, a.transfer_poolings)
    for k, concept in enumerate(plan["concepts"]):
        for p in a.transfer_poolings:
            ctx.curve(f"ours-{p}", concept, native[p][k])
            for name in best:
                vec = np.load(WORK / f"transfer-{name}.{p}.npy")[k]
                ctx.curve(f"transfer-{name}.{p}", concept, vec)
    log("transfer stage done" if time.time() <= ctx.deadline else "transfer stopped (budget)")


def _best_maps(result: dict[str, Any], poolings: list[str]) -> list[str]:
    """The capture map and the concept-pair map with the best held-out cosine (mean pooling)."""
    p = poolings[0]
    names = {k.split(".")[0] for k in result["cosine"]}
    out = []
    for prefix in ("capture-", "concepts-"):
        cands = [n for n in names if n.startswith(prefix)]
        if cands:
            out.append(max(cands, key=lambda n: result["cosine"][f"{n}.{p}"]["mean"]))
    return out


# report -----------------------------------------------------------------------------------------


def _curves(prefix: str) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for f in sorted((WORK / "steer").glob(f"{prefix}.*.json")):
        out[f.name[len(prefix) + 1 : -5]] = read(f)
    return out


def _mean_curve(curves: dict[str, list[dict[str, Any]]], concepts: list[str]) -> list[dict]:
    import numpy as np

    have = [curves[c] for c in concepts if c in curves]
    if not have:
        return []
    rows = []
    for i in range(len(have[0])):
        r = {"strength": have[0][i]["strength_rel"]}
        for key in ("rise", "related_rise", "ppl_ratio"):
            vals = [h[i][key] for h in have if h[i][key] is not None]
            r[key] = float(np.mean(vals)) if vals else None
        rows.append(r)
    return rows


def _nanmean(vals: list[float]) -> float | None:
    """Mean over the concepts whose curve reached the cost (None when none did)."""
    ok = [v for v in vals if v == v]
    return sum(ok) / len(ok) if ok else None


def _report(a: argparse.Namespace) -> None:
    import numpy as np

    from gradfree.directions.steer import plot_steering, rise_at_cost

    for out in (OUT_JSON, OUT_PNG):
        if out.exists() and not a.overwrite:
            raise SystemExit(f"{out} exists; pass --overwrite to replace it")
    plan = read(WORK / "plan.json")
    concepts = plan["concepts"]
    names = sorted(
        {
            f.name.split(".")[0]
            if not f.name.startswith("transfer-")
            else ".".join(f.name.split(".")[:2])
            for f in (WORK / "steer").glob("*.json")
        }
    )
    series = {n: _curves(n) for n in names}
    # concepts measured by every method, so means compare like with like
    common = [c for c in concepts if all(c in s for s in series.values())]
    table = []
    for n in names:
        per = series[n]
        row: dict[str, Any] = {"method": n, "concepts": len([c for c in common if c in per])}
        caa_per = series.get("caa", {})
        for cost in COSTS:
            vals = [rise_at_cost(per[c], cost) for c in common]
            row[f"rise@ppl x{cost}"] = _nanmean(vals)
            row[f"reached@x{cost}"] = int(np.sum(~np.isnan(vals)))
            rel = [rise_at_cost(per[c], cost, "related_rise") for c in common]
            row[f"related@ppl x{cost}"] = _nanmean(rel)
            if caa_per and n != "caa":
                # per concept: does this method rise at least as much as CAA at this cost?
                theirs = [rise_at_cost(caa_per[c], cost) for c in common]
                pairs = [(v, w) for v, w in zip(vals, theirs, strict=True) if v == v and w == w]
                row[f"wins_vs_caa@x{cost}"] = f"{sum(v >= w for v, w in pairs)}/{len(pairs)}"
        mc = _mean_curve(per, common)
        row["curve"] = mc
        table.append(row)
    print(
        "\n== steering at equal perplexity cost (mean log-prob rise of the concept word, "
        f"{len(common)} concepts, layer {plan['layer']}) =="
    )
    hdr = ["method", *[f"x{c}" for c in COSTS]]
    print(" | ".join(f"{h:>28}" if i == 0 else f"{h:>8}" for i, h in enumerate(hdr)))
    for r in table:
        cells = [f"{r['method']:>28}"]
        for c in COSTS:
            v = r[f"rise@ppl x{c}"]
            cells.append(f"{v:8.3f}" if v is not None else f"{'—':>8}")
        print(" | ".join(cells))
    print("\n== the same for the related words (nearest by input embedding), and wins vs CAA ==")
    for r in table:
        cells = [f"{r['method']:>28}"]
        for c in COSTS:
            v = r[f"related@ppl x{c}"]
            w = r.get(f"wins_vs_caa@x{c}", "")
            cells.append((f"{v:6.3f}" if v is not None else f"{'—':>6}") + f" {w:>5}")
        print(" | ".join(cells))
    print("\n== mean curves (strength × median |h|: rise / related rise / ppl ratio) ==")
    for r in table:
        pts = ", ".join(
            f"{p['strength']:.2f}: {p['rise']:.2f}/"
            f"{(p['related_rise'] if p['related_rise'] is not None else float('nan')):.2f}/"
            f"{p['ppl_ratio']:.2f}"
            for p in r["curve"]
        )
        print(f"{r['method']:>28}: {pts}")
    transfer = read(WORK / "transfer.json") if (WORK / "transfer.json").exists() else None
    ratios: dict[str, Any] = {}
    if transfer is not None:
        print("\n== (a) held-out cosine of transferred 1.5B directions to the 0.5B's own ==")
        for k, c in transfer["cosine"].items():
            print(f"{k:>40}: mean {c['mean']:.4f}  median {c['median']:.4f}  p10 {c['p10']:.4f}")
        print("\n== (b) steering effect, transferred / native at equal norm ==")
        for n in names:
            if not n.startswith("transfer-"):
                continue
            pooling = n.rsplit(".", 1)[1]
            nat, tr = series.get(f"ours-{pooling}", {}), series[n]
            both = [c for c in concepts if c in nat and c in tr]
            if not both:
                continue
            per_s = []
            for i, s in enumerate(plan["strengths_rel"]):
                if s == 0:
                    continue
                rn = float(np.mean([nat[c][i]["rise"] for c in both]))
                rt = float(np.mean([tr[c][i]["rise"] for c in both]))
                per_s.append(
                    {
                        "strength": s,
                        "native": rn,
                        "transferred": rt,
                        "ratio": rt / rn if rn else None,
                    }
                )
            at_cost = {}
            for cost in COSTS:
                vn = _nanmean([rise_at_cost(nat[c], cost) for c in both])
                vt = _nanmean([rise_at_cost(tr[c], cost) for c in both])
                at_cost[str(cost)] = vt / vn if vn and vt is not None else None
            ratios[n] = {"concepts": len(both), "by_strength": per_s, "at_equal_cost": at_cost}
            txt = ", ".join(f"{p['strength']}: {p['ratio']:.2f}" for p in per_s if p["ratio"])
            print(f"{n:>40}: {txt}")
    caa = read(WORK / "caa.json") if (WORK / "caa.json").exists() else None
    result = {
        "issue": 16,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "command": "python scripts/bench_steering.py " + " ".join(sys.argv[1:]),
        "plan": plan,
        "caa": caa,
        "equal_cost_table": table,
        "transfer": transfer,
        "transfer_steering_ratio": ratios,
        "raw_curves": {n: series[n] for n in names},
    }
    write(OUT_JSON, result)
    plot_curves = {
        f"{n} (mean of {len(common)})": r["curve"] for n, r in zip(names, table, strict=True)
    }
    plot_steering(
        {k: v for k, v in plot_curves.items() if v},
        OUT_PNG,
        title=f"{STUDENT}, layer {plan['layer']}",
    )
    log(f"wrote {OUT_JSON} and {OUT_PNG}")


STAGES = ["setup", "prepare", "caa", "steer", "capture", "transfer", "report"]


def main() -> None:
    global STUDENT, TEACHER, STUDENT_DIRS, TEACHER_DIRS, OUT_JSON, OUT_PNG
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", default="all", choices=["all", *STAGES, "caa-worker"])
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--concepts", type=int, default=12)
    ap.add_argument("--skip-common", type=int, default=1000)
    ap.add_argument("--max-index", type=int, default=10000, help="concepts past it are too rare")
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--doc-chars", type=int, default=500)
    ap.add_argument("--poolings", nargs="+", default=["mean", "last"])
    ap.add_argument("--budget-s", type=float, default=540.0, help="steering time per stage")
    ap.add_argument("--capture-docs", type=int, default=40)
    ap.add_argument("--capture-docs-heldout", type=int, default=12)
    ap.add_argument("--capture-len", type=int, default=256)
    ap.add_argument(
        "--capture-layers",
        type=int,
        nargs="*",
        default=None,
        help="student block outputs to capture before the plan exists",
    )
    ap.add_argument("--transfer-steer", nargs="*", default=None)
    ap.add_argument("--transfer-poolings", nargs="+", default=["mean"])
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--multi-token-ok", action="store_true", help="smoke tests on tiny models")
    ap.add_argument("--student", default=STUDENT)
    ap.add_argument("--teacher", default=TEACHER)
    ap.add_argument("--student-dirs", type=Path, default=STUDENT_DIRS)
    ap.add_argument("--teacher-dirs", type=Path, default=TEACHER_DIRS)
    ap.add_argument("--out-json", type=Path, default=OUT_JSON)
    ap.add_argument("--out-png", type=Path, default=OUT_PNG)
    ap.add_argument("--overwrite", action="store_true", help="replace the report's JSON/PNG")
    a = ap.parse_args()
    STUDENT, TEACHER = a.student, a.teacher
    STUDENT_DIRS, TEACHER_DIRS = a.student_dirs, a.teacher_dirs
    OUT_JSON, OUT_PNG = a.out_json, a.out_png
    if a.stage == "caa-worker":
        caa_worker(a)
        return
    import torch

    torch.manual_seed(0)
    WORK.mkdir(parents=True, exist_ok=True)
    funcs = {
        "setup": stage_setup,
        "prepare": stage_prepare,
        "caa": stage_caa,
        "steer": stage_steer,
        "capture": stage_capture,
        "transfer": stage_transfer,
        "report": _report,
    }
    for s in STAGES if a.stage == "all" else [a.stage]:
        log(f"stage {s}")
        funcs[s](a)


if __name__ == "__main__":
    main()
