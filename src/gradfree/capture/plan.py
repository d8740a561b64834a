"""Resolve a capture request into a plan: roles, layers, keys, widths, pairs, documents, hashes.

Nothing here runs a model. The plan fixes everything the statistics depend on, so that its
``run_hash`` (config + model fingerprints + dtypes + documents) decides whether an interrupted
capture may resume, and its ``settings_hash`` (the same without documents) whether two captures
may be combined.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from gradfree.adapters import ModelAdapter, get_adapter
from gradfree.base.errors import GradfreeError
from gradfree.base.io import sha256_text
from gradfree.capture.config import CaptureConfig
from gradfree.capture.sites import SITES, is_full, keys_for, site_key, split_key
from gradfree.solvers.layermap import resolve_map
from gradfree.texts.windows import document_texts, encode


@dataclass
class Subject:
    """A model to capture with its tokenizer and identity (``LoadedModel`` has the same fields)."""

    model: Any
    tokenizer: Any
    name: str = ""
    source: str = ""
    fingerprint: dict[str, Any] = field(default_factory=dict)


def as_subject(obj: Any) -> Subject:
    if isinstance(obj, Subject):
        return obj
    if not hasattr(obj, "model") or not hasattr(obj, "tokenizer"):
        raise GradfreeError("A capture subject needs a .model and a .tokenizer.")
    return Subject(
        obj.model,
        obj.tokenizer,
        str(getattr(obj, "name", "") or ""),
        str(getattr(obj, "source", "") or ""),
        dict(getattr(obj, "fingerprint", None) or {}),
    )


def _vocab_hash(tokenizer: Any) -> str:
    return sha256_text(json.dumps(sorted(tokenizer.get_vocab().items())))


def fingerprint(subject: Subject) -> dict[str, Any]:
    """The caller's fingerprint, or a cheap one: a strided sample of every weight + the vocab."""
    if subject.fingerprint:
        return dict(subject.fingerprint)
    h = hashlib.sha256()
    for name, p in subject.model.named_parameters():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096]
        h.update(f"{name}:{tuple(p.shape)}".encode())
        h.update(sample.to("cpu", torch.float64).numpy().tobytes())
    return {
        "weights_sample_sha256": h.hexdigest(),
        "tokenizer_sha256": _vocab_hash(subject.tokenizer),
    }


@dataclass
class RolePlan:
    role: str
    subject: Subject
    adapter: ModelAdapter
    device: torch.device
    dtype: torch.dtype
    layers: list[int]
    keys: list[str]
    widths: dict[str, int]
    full: dict[str, bool]
    dump_keys: list[str]
    identity: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        """The role's entry in the manifest (token counts are added by the runner)."""
        config = self.subject.model.config.to_dict()
        return {
            "name": self.subject.name,
            **self.identity,
            "source": self.subject.source,
            "device": str(self.device),
            "config": json.loads(json.dumps(config, default=str)),
            "layers": self.layers,
            "keys": self.keys,
            "widths": self.widths,
            "full": self.full,
        }


@dataclass
class Plan:
    config: CaptureConfig
    roles: dict[str, RolePlan]  # "model", or "teacher" then "student"
    layer_map: list[int] | None
    cross_pairs: list[tuple[str, str]]
    documents: list[dict[str, Any]]  # {"id", "sha256", "tokens"}
    texts: list[str]
    tokenizer: Any
    pad_id: int

    @property
    def paired(self) -> bool:
        return "teacher" in self.roles

    @property
    def n_windows(self) -> int:
        m = self.config.max_length
        return sum(-(-d["tokens"] // m) for d in self.documents)

    @property
    def n_batches(self) -> int:
        return -(-self.n_windows // self.config.batch_size)

    def encode(self, text: str) -> list[int]:
        return encode(self.tokenizer, text, self.config.add_special_tokens)

    def iter_token_ids(self) -> Iterator[list[int]]:
        """Token ids of each document in order, tokenized on demand (never all held at once)."""
        for text in self.texts:
            yield self.encode(text)

    def settings(self) -> dict[str, Any]:
        return {
            "config": self.config.model_dump(mode="json"),
            "roles": {r: rp.identity for r, rp in self.roles.items()},
            "layer_map": self.layer_map,
        }

    def settings_hash(self) -> str:
        return sha256_text(json.dumps(self.settings(), sort_keys=True))

    def run_hash(self) -> str:
        docs = sha256_text(json.dumps(self.documents, sort_keys=True))
        return sha256_text(self.settings_hash() + docs)


def _role_plan(
    role: str, subject: Subject, layers: list[int], cfg: CaptureConfig, extra: Sequence[str] = ()
) -> RolePlan:
    adapter = get_adapter(subject.model)
    param = next(subject.model.parameters())
    keys = keys_for(cfg.sites, layers)
    keys += [k for k in extra if k not in keys]
    widths = {k: SITES[split_key(k)[1]].width(adapter) for k in keys}
    full = {k: is_full(split_key(k)[1], cfg.full, cfg.diagonal) for k in keys}
    dump_keys = [k for k in keys if split_key(k)[1] in cfg.dump_sites]
    identity = {  # what the statistics depend on (hashed for resume and combine checks)
        "fingerprint": fingerprint(subject),
        "model_type": adapter.model_type,
        "num_layers": adapter.num_layers,
        "dtype": str(param.dtype).removeprefix("torch."),
    }
    return RolePlan(
        role,
        subject,
        adapter,
        param.device,
        param.dtype,
        layers,
        keys,
        widths,
        full,
        dump_keys,
        identity,
    )


def _check_layers(layers: list[int] | None, n: int, role: str) -> list[int]:
    if layers is None:
        return list(range(n))
    bad = [i for i in layers if i >= n]
    if bad:
        raise GradfreeError(f"Layer {bad[0]} is out of range for the {role} ({n} layers).")
    return list(layers)


def make_plan(subjects: Mapping[str, Any], documents: Sequence[Any], cfg: CaptureConfig) -> Plan:
    """Resolve roles ({"model"} or {"teacher", "student"}), layers, keys, pairs and documents."""
    subs = {r: as_subject(s) for r, s in subjects.items()}
    if set(subs) not in ({"model"}, {"teacher", "student"}):
        raise GradfreeError("Capture one model, or a teacher and a student.")
    ids, texts = document_texts(documents)
    if not texts:
        raise GradfreeError("There are no documents to capture.")
    tok = next(iter(subs.values())).tokenizer
    if (
        "teacher" in subs
        and subs["teacher"].tokenizer.get_vocab() != subs["student"].tokenizer.get_vocab()
    ):
        raise GradfreeError(
            "The teacher and student tokenizers differ; paired capture needs one tokenizer."
        )
    roles: dict[str, RolePlan] = {}
    layer_map: list[int] | None = None
    pairs: list[tuple[str, str]] = []
    if "model" in subs:
        n = get_adapter(subs["model"].model).num_layers
        roles["model"] = _role_plan(
            "model", subs["model"], _check_layers(cfg.layers, n, "model"), cfg
        )
    else:
        n_t = get_adapter(subs["teacher"].model).num_layers
        n_s = get_adapter(subs["student"].model).num_layers
        s_layers = _check_layers(cfg.layers, n_s, "student")
        layer_map = resolve_map(cfg.layer_map, n_t, n_s)
        t_layers = (
            list(range(n_t)) if cfg.layers is None else sorted({layer_map[j] for j in s_layers})
        )
        for site in cfg.paired_sites():
            if SITES[site].is_block:
                pairs += [(site_key(site, layer_map[j]), site_key(site, j)) for j in s_layers]
            else:
                pairs.append((site, site))
        roles["teacher"] = _role_plan(
            "teacher", subs["teacher"], t_layers, cfg, extra=[t for t, _ in pairs]
        )
        roles["student"] = _role_plan("student", subs["student"], s_layers, cfg)
    docs = [
        {"id": i, "sha256": sha256_text(t), "tokens": 0} for i, t in zip(ids, texts, strict=True)
    ]
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    plan = Plan(cfg, roles, layer_map, pairs, docs, texts, tok, int(pad))
    for d, text in zip(docs, texts, strict=True):
        d["tokens"] = len(plan.encode(text))
    if not any(d["tokens"] for d in docs):
        raise GradfreeError("The documents hold no tokens; there is nothing to capture.")
    return plan
