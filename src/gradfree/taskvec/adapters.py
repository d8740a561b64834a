"""Data preparation for the task-vector experiments: eight small LoRA adapters trained with peft.

No LoRA adapters install offline, so ``gradfree taskvec make-adapters`` makes its own: one adapter
per task in :data:`TASKS`, each trained on windows of its task's calibration documents (packed
token blocks, seeded order) and checked on its held-out documents with the project's perplexity
(:func:`gradfree.evaluation.run.evaluate`) before and after training. An adapter counts as a task
vector only if it lowers its own task's held-out perplexity; the table says by how much.

Each adapter is a plain PEFT folder ``<out>/<task>/`` (``adapter_config.json``,
``adapter_model.safetensors``) plus ``README.md`` (model card) and ``train.json`` (settings, base
fingerprint, corpus hashes, losses, perplexities, time, memory), written atomically. A complete
folder made with the same settings is reused, as fetched models are; one made with other settings
is an error unless ``overwrite``. The method itself stays gradient-free: gradients are used here
only to manufacture its inputs. torch and peft are imported inside functions.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradfree.base import paths
from gradfree.base.errors import GradfreeError
from gradfree.base.io import atomic_dir, share_folder, write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from gradfree.texts.corpora import Document

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md", "train.json")
TABLE_JSON = "adapters.json"
TABLE_MD = "adapters.md"

# Defaults measured on the 2-core CPU with SmolLM2-135M (float32): a step of 4 x 256 tokens takes
# ~7.4 s, so 16 steps train in ~2 min and, with the two held-out passes, a task takes < 3 min.
STEPS = 16
SEQ_LEN = 256
BATCH_SIZE = 4
LR = 1e-3
EVAL_TOKENS = 4096
EVAL_MAX_LENGTH = 512
EVAL_STRIDE = 256
LOG_EVERY = 8


@dataclass(frozen=True)
class TaskSpec:
    """One task: the documents of ``corpus`` (a known corpus name or a local path), optionally
    only those in language ``lang`` or only those not in ``exclude_lang``."""

    name: str
    corpus: str
    description: str
    lang: str | None = None
    exclude_lang: str | None = None

    def select(self, docs: Sequence[Document]) -> list[Document]:
        return [
            d
            for d in docs
            if (self.lang is None or d.lang == self.lang)
            and (self.exclude_lang is None or d.lang != self.exclude_lang)
        ]


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("tourguide", "tourguide", "English tour-guide texts about places", lang="en"),
        TaskSpec(
            "tourguide-intl",
            "tourguide",
            "tour-guide texts in 13 languages other than English (fr, es, pt, de, zh, ja...)",
            exclude_lang="en",
        ),
        TaskSpec("news", "news", "ABC news articles (Lee corpus)"),
        TaskSpec("botchan", "botchan", "Botchan by Natsume Soseki, English translation"),
        TaskSpec("shakespeare", "shakespeare", "Shakespeare's plays and poems"),
        TaskSpec("milton", "milton", "Milton's Paradise Lost, Paradise Regained, poems, prose"),
        TaskSpec("pydocs", "pydocs", "Python language reference topics (pydoc)"),
        TaskSpec("chatterbot", "chatterbot", "short English question/answer conversations"),
    )
}


def adapters_dir(model: str) -> Path:
    """Where the adapters of base model ``model`` live by default: ``<cache>/adapters/<model>``."""
    return paths.cache_dir() / "adapters" / Path(model).name


def _resolve_tasks(tasks: Sequence[str | TaskSpec] | None) -> list[TaskSpec]:
    if tasks is None:
        return list(TASKS.values())
    out: list[TaskSpec] = []
    for t in tasks:
        if isinstance(t, TaskSpec):
            out.append(t)
        elif t in TASKS:
            out.append(TASKS[t])
        else:
            raise GradfreeError(f"Unknown task '{t}': use one of {', '.join(TASKS)}.")
    if not out:
        raise GradfreeError("No task was given; name at least one of " + ", ".join(TASKS) + ".")
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise GradfreeError("A task is named twice; name each task once.")
    return out


def _check_settings(
    rank: int, alpha: float, targets: Sequence[str], steps: int, seq_len: int, bs: int, lr: float
) -> None:
    checks = [
        (rank >= 1, f"The LoRA rank must be at least 1, not {rank}."),
        (alpha > 0, f"The LoRA alpha must be positive, not {alpha}."),
        (len(targets) > 0, "At least one target module type is needed."),
        (steps >= 1, f"The number of training steps must be at least 1, not {steps}."),
        (seq_len >= 2, f"The training sequence length must be at least 2 tokens, not {seq_len}."),
        (bs >= 1, f"The batch size must be at least 1, not {bs}."),
        (lr > 0, f"The learning rate must be positive, not {lr}."),
    ]
    for ok, message in checks:
        if not ok:
            raise GradfreeError(message)


def _task_docs(
    task: TaskSpec, cache: str | Path | None
) -> tuple[list[Document], list[Document], str]:
    """(calibration docs, held-out docs, the whole corpus's manifest sha256) of ``task``."""
    from gradfree.texts.corpora import corpus_manifest, load_corpus

    docs = load_corpus(task.corpus, cache=cache)
    chosen = task.select(docs)
    calib = [d for d in chosen if d.split == "calibration"]
    held = [d for d in chosen if d.split == "heldout"]
    for split, part in (("calibration", calib), ("heldout", held)):
        if not part:
            raise GradfreeError(
                f"The task '{task.name}' has no {split} documents in the corpus '{task.corpus}'."
            )
    return calib, held, str(corpus_manifest(docs, task.corpus)["sha256"])


def _separator(tokenizer: Any) -> int | None:
    """The token that ends each packed document (end-of-text), or None when there is none."""
    tid = tokenizer.eos_token_id
    return int(tid) if isinstance(tid, int) else None


def training_blocks(
    tokenizer: Any, docs: Sequence[Document], seq_len: int, n_blocks: int, seed: int
) -> tuple[list[list[int]], dict[str, Any]]:
    """Up to ``n_blocks`` blocks of ``seq_len`` tokens: the documents in a seeded order,
    tokenized as every command does, each followed by end-of-text, packed and cut. Only as many
    documents are read as the blocks need. Returns the blocks and a record of what went in."""
    import numpy as np

    from gradfree.texts.windows import encode

    order = np.random.default_rng(seed).permutation(len(docs))
    sep = _separator(tokenizer)
    stream: list[int] = []
    used: list[str] = []
    for i in order:
        stream += encode(tokenizer, docs[int(i)].text)
        if sep is not None:
            stream.append(sep)
        used.append(docs[int(i)].id)
        if len(stream) >= n_blocks * seq_len:
            break
    starts = range(0, len(stream) - seq_len + 1, seq_len)
    blocks = [stream[s : s + seq_len] for s in starts][:n_blocks]
    record = {
        "documents_used": len(used),
        "documents_available": len(docs),
        "tokens_used": len(blocks) * seq_len,
        "blocks": len(blocks),
    }
    return blocks, record


def eval_sample(tokenizer: Any, docs: Sequence[Document], max_tokens: int) -> list[Document]:
    """Held-out documents for a quick perplexity: all of them if they hold at most
    ``max_tokens`` tokens, else about that many tokens' worth, evenly spaced through the split
    (so every part of the corpus is represented)."""
    import numpy as np

    from gradfree.texts.windows import encode

    counts = [len(encode(tokenizer, d.text)) for d in docs]
    if sum(counts) <= max_tokens:
        return list(docs)
    m = max(1, min(len(docs), round(max_tokens * len(docs) / sum(counts))))
    picks = sorted({int(x) for x in np.rint(np.linspace(0, len(docs) - 1, m))})
    return [docs[i] for i in picks]


def eval_window(model: Any) -> tuple[int, int]:
    """(max_length, stride) of the held-out perplexity: ``gradfree eval``'s 512/256, shortened
    to the model's context when that is shorter."""
    limit = getattr(model.config, "max_position_embeddings", None) or EVAL_MAX_LENGTH
    max_length = min(EVAL_MAX_LENGTH, int(limit))
    return max_length, min(EVAL_STRIDE, max(1, max_length // 2))


def _ppl(model: Any, tokenizer: Any, docs: Sequence[Document], device: str) -> dict[str, Any]:
    from gradfree.evaluation.run import evaluate

    max_length, stride = eval_window(model)
    result = evaluate(
        model, tokenizer, docs, max_length=max_length, stride=stride, batch_size=4, device=device
    )
    return dict(result["perplexity"])


def _schedule(n_blocks: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Block indices of each step: seeded permutations of all blocks, one after another (a new
    permutation each epoch), cut into batches."""
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order += [int(i) for i in rng.permutation(n_blocks)]
    return [order[s * batch_size : (s + 1) * batch_size] for s in range(steps)]


def _is_complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in ADAPTER_FILES)


def _read_train(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / "train.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "settings" in data else None


def _summary(task: str, folder: Path, record: dict[str, Any], cached: bool) -> dict[str, Any]:
    ev = record["eval"]
    return {
        "task": task,
        "path": str(folder),
        "corpus": record["task"]["corpus"],
        "ppl_base": ev["ppl_base"],
        "ppl_adapter": ev["ppl_adapter"],
        "improvement": ev["improvement"],
        "relative_change": ev["relative_change"],
        "eval_tokens": ev["tokens"],
        "train_loss_first": record["train"]["loss_first"],
        "train_loss_last": record["train"]["loss_last"],
        "train_seconds": record["train"]["seconds"],
        "seconds": record["seconds"],
        "peak_rss_gib": record["peak_rss_gib"],
        "cached": cached,
    }


def _model_card(record: dict[str, Any]) -> str:
    s, t, ev, base = record["settings"], record["task"], record["eval"], record["base_model"]
    fp = base["fingerprint"]
    rows = [
        ("task", f"`{t['name']}`: {t['description']}"),
        ("corpus", f"`{t['corpus']}` (manifest sha256 `{t['corpus_sha256']}`)"),
        ("language filter", t["filter"] or "none"),
        ("base model", f"`{base['name']}` ({fp.get('architecture')}, {s['dtype']})"),
        ("base weights digest", f"`{base['weights_digest']}`"),
        ("base config sha256", f"`{fp.get('config_sha256')}`"),
        ("LoRA", f"rank {s['rank']}, alpha {s['alpha']}, dropout 0, targets {s['targets']}"),
        (
            "training",
            f"AdamW lr {s['lr']} (constant), {s['steps']} steps x {s['batch_size']} blocks x "
            f"{s['seq_len']} tokens, seed {s['seed']}",
        ),
        ("training data", f"{record['data']['tokens_used']} tokens of calibration documents"),
        (
            "training loss",
            f"{record['train']['loss_first']:.4f} -> {record['train']['loss_last']:.4f}",
        ),
        (
            "held-out perplexity",
            f"{ev['ppl_base']:.3f} -> {ev['ppl_adapter']:.3f} ({100 * ev['relative_change']:+.1f}%)"
            f" on {ev['documents']} documents, {ev['tokens']} tokens",
        ),
        ("wall time", f"{record['seconds']:.1f} s (training {record['train']['seconds']:.1f} s)"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (
        f"---\nlibrary_name: peft\nbase_model: {base['name']}\n"
        "tags: [lora, gradfree, task-vector]\n"
        f"---\n\n# LoRA adapter `{t['name']}` for {base['name']}\n\n"
        "Made by `gradfree taskvec make-adapters` as data for the task-vector experiments "
        "(issue 15): a small LoRA adapter that lowers the base model's perplexity on one kind "
        "of text. Settings and measurements are in `train.json`.\n\n"
        f"| | |\n|---|---|\n{table}\n\n"
        "Load it with `peft.PeftModel.from_pretrained(base_model, this_folder)`.\n"
    )


def _write_table(out: Path) -> list[dict[str, Any]]:
    """Rewrite ``<out>/adapters.json`` and ``adapters.md``: one row per complete adapter."""
    rows = []
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")):
        record = _read_train(folder)
        if record is not None and _is_complete(folder):
            rows.append(_summary(folder.name, folder, record, cached=False))
    for r in rows:
        r.pop("cached")
    write_json_atomic(out / TABLE_JSON, {"adapters": rows})
    lines = [
        "| task | ppl base | ppl adapter | change | train s | peak RSS GiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['ppl_base']:.3f} | {r['ppl_adapter']:.3f} | "
            f"{100 * r['relative_change']:+.1f}% | {r['train_seconds']:.1f} | "
            f"{r['peak_rss_gib']:.2f} |"
        )
    write_text_atomic(out / TABLE_MD, "\n".join(lines) + "\n")
    return rows


def _train_one(
    loaded: Any,
    task: TaskSpec,
    calib: list[Document],
    held: list[Document],
    settings: dict[str, Any],
    *,
    device: str,
    eval_tokens: int,
    log: Callable[[str], None],
    log_every: int,
) -> tuple[Any, dict[str, Any]]:
    """Train one adapter on ``loaded.model`` (LoRA layers injected in place). Returns the PEFT
    model and the record of the run (without the settings keys the caller adds)."""
    import torch

    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise GradfreeError(
            "Training adapters needs peft: pip install -e '.[taskvec]' (reading them does not)."
        ) from None

    model, tok = loaded.model, loaded.tokenizer
    seq_len, batch_size, steps = settings["seq_len"], settings["batch_size"], settings["steps"]
    blocks, data = training_blocks(tok, calib, seq_len, steps * batch_size, settings["seed"])
    if not blocks:
        raise GradfreeError(
            f"The task '{task.name}' has fewer than {seq_len} calibration tokens; "
            "lower the sequence length."
        )
    sample = eval_sample(tok, held, eval_tokens)
    base_ppl = _ppl(model, tok, sample, device)
    log(
        f"{task.name}: base perplexity {base_ppl['ppl']:.3f} on {len(sample)} held-out documents "
        f"({base_ppl['tokens']} tokens); training on {data['blocks']} blocks of {seq_len} tokens"
    )
    config = LoraConfig(
        r=settings["rank"],
        lora_alpha=settings["alpha"],
        lora_dropout=0.0,
        target_modules=list(settings["targets"]),
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(settings["seed"])  # the A matrices' initialisation
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:
        raise GradfreeError(
            f"The target modules {list(settings['targets'])} do not all exist in the model "
            f"{loaded.name}."
        ) from e
    peft_model.peft_config["default"].base_model_name_or_path = loaded.name
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings["lr"], weight_decay=0.0)
    data_tensor = torch.tensor(blocks, dtype=torch.long)
    losses: list[float] = []
    t0 = time.perf_counter()
    peft_model.train()
    for step, idx in enumerate(_schedule(len(blocks), steps, batch_size, settings["seed"]), 1):
        ids = data_tensor[idx].to(device)
        loss = peft_model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if step % log_every == 0 or step == steps:
            recent = losses[-log_every:]
            log(
                f"{task.name}: step {step}/{steps} loss {sum(recent) / len(recent):.4f} "
                f"({time.perf_counter() - t0:.0f} s)"
            )
    train_seconds = time.perf_counter() - t0
    peft_model.eval()
    after = _ppl(peft_model.get_base_model(), tok, sample, device)
    k = max(1, steps // 10)
    record = {
        "data": data,
        "train": {
            "seconds": round(train_seconds, 2),
            "losses": [round(x, 5) for x in losses],
            "loss_first": sum(losses[:k]) / k,
            "loss_last": sum(losses[-k:]) / k,
            "trainable_parameters": sum(p.numel() for p in params),
        },
        "eval": {
            "documents": len(sample),
            "document_ids": [d.id for d in sample],
            "tokens": base_ppl["tokens"],
            "max_length": eval_window(model)[0],
            "stride": eval_window(model)[1],
            "ppl_base": base_ppl["ppl"],
            "ppl_adapter": after["ppl"],
            "relative_change": after["ppl"] / base_ppl["ppl"] - 1.0,
            "improvement": 1.0 - after["ppl"] / base_ppl["ppl"],
        },
    }
    return peft_model, record


def make_adapters(
    model: str = "smollm2-135m-instruct",
    tasks: Sequence[str | TaskSpec] | None = None,
    out: str | Path | None = None,
    *,
    rank: int = 16,
    alpha: float = 32,
    targets: Sequence[str] = TARGETS,
    steps: int = STEPS,
    seq_len: int = SEQ_LEN,
    batch_size: int = BATCH_SIZE,
    lr: float = LR,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
    eval_tokens: int = EVAL_TOKENS,
    cache: str | Path | None = None,
) -> dict[str, Any]:
    """Train (or reuse) one LoRA adapter per task on base ``model`` into ``out``/<task>/.

    ``tasks``: names from :data:`TASKS` (default: all 8) or :class:`TaskSpec` objects.
    ``cache``: where fetched corpora are read (default: the gradfree cache). Returns
    ``{"model", "out", "base_fingerprint", "adapters": {task: summary}}``, where each summary has
    ``path``, ``ppl_base``, ``ppl_adapter``, ``improvement`` (1 − ppl_adapter/ppl_base),
    ``relative_change``, ``seconds``, ``train_seconds``, ``peak_rss_gib`` and ``cached``.
    """
    from gradfree.base.provenance import versions
    from gradfree.models import load_model
    from gradfree.models.load import weights_digest

    specs = _resolve_tasks(tasks)
    _check_settings(rank, alpha, targets, steps, seq_len, batch_size, lr)
    if eval_tokens < 1:
        raise GradfreeError(f"The evaluation token budget must be at least 1, not {eval_tokens}.")
    root = Path(out) if out is not None else adapters_dir(model)

    def log(message: str) -> None:
        if progress:
            print(message, file=sys.stderr, flush=True)

    # Cheap checks first: every task's documents load before the model does.
    task_docs = {t.name: _task_docs(t, cache) for t in specs}
    for t in specs:
        folder = root / t.name
        if folder.exists() and not overwrite and not _is_complete(folder):
            raise GradfreeError(
                f"The folder {folder} exists but is not a complete adapter; remove it or pass "
                "overwrite."
            )
    loaded = load_model(model, device=device, dtype=dtype)
    digest = weights_digest(loaded.fingerprint)
    result: dict[str, Any] = {
        "model": loaded.name,
        "out": str(root),
        "base_fingerprint": loaded.fingerprint,
        "adapters": {},
    }
    for t in specs:
        calib, held, corpus_sha = task_docs[t.name]
        folder = root / t.name
        settings = {
            "base_weights_digest": digest,
            "corpus_sha256": corpus_sha,
            "rank": rank,
            "alpha": alpha,
            "targets": list(targets),
            "steps": steps,
            "seq_len": seq_len,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "dtype": dtype,
            "eval_tokens": eval_tokens,
        }
        if folder.exists() and not overwrite:
            old = _read_train(folder)
            if old is None or old["settings"] != settings:
                raise GradfreeError(
                    f"The adapter {folder} was made with other settings, base model or corpus; "
                    "pass overwrite to retrain it."
                )
            summary = _summary(t.name, folder, old, cached=True)
            log(
                f"{t.name}: cached in {folder} (perplexity {summary['ppl_base']:.3f} -> "
                f"{summary['ppl_adapter']:.3f})"
            )
            result["adapters"][t.name] = summary
            continue
        start = time.perf_counter()
        with _PeakRss() as rss:
            peft_model, record = _train_one(
                loaded,
                t,
                calib,
                held,
                settings,
                device=device,
                eval_tokens=eval_tokens,
                log=log,
                log_every=LOG_EVERY,
            )
            record = {
                "settings": settings,
                "task": {**asdict(t), "filter": _filter_text(t), "corpus_sha256": corpus_sha},
                "base_model": {
                    "spec": model,
                    "name": loaded.name,
                    "weights_digest": digest,
                    "fingerprint": loaded.fingerprint,
                },
                "device": device,
                **record,
                "seconds": round(time.perf_counter() - start, 2),
                "peak_rss_gib": round(rss.peak / 2**30, 3),
                "versions": {**versions(), "peft": _peft_version()},
            }
            with atomic_dir(folder, overwrite=overwrite) as work:
                peft_model.save_pretrained(str(work), save_embedding_layers=False)
                # peft writes a generic README; ours says what the adapter is and how it did.
                write_text_atomic(work / "README.md", _model_card(record))
                write_json_atomic(work / "train.json", record)
                share_folder(work)  # safetensors writes 0600; a cached adapter is for every user
            loaded.model = peft_model.unload()  # the base model again, LoRA layers removed
        summary = _summary(t.name, folder, record, cached=False)
        ev = record["eval"]
        log(
            f"{t.name}: perplexity {ev['ppl_base']:.3f} -> {ev['ppl_adapter']:.3f} "
            f"({100 * ev['relative_change']:+.1f}%) in {record['seconds']:.0f} s; saved {folder}"
        )
        result["adapters"][t.name] = summary
    result["table"] = _write_table(root)
    return result


def _filter_text(t: TaskSpec) -> str | None:
    if t.lang is not None:
        return f"lang = {t.lang}"
    return f"lang != {t.exclude_lang}" if t.exclude_lang is not None else None


class _PeakRss:
    """The peak resident memory of this process while the block runs, sampled by a thread (so
    it can be read before the block ends, unlike :class:`~gradfree.base.provenance.Stopwatch`)."""

    def __init__(self, interval: float = 0.2) -> None:
        import threading

        self.interval, self._stop, self._peak = interval, threading.Event(), 0
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak  # noqa: B018 (updates the maximum)

    @property
    def peak(self) -> int:
        from gradfree.base.provenance import rss_bytes

        self._peak = max(self._peak, rss_bytes())
        return self._peak

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _peft_version() -> str:
    from importlib.metadata import version

    return version("peft")
