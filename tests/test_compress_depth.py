"""Depth reduction by folding: a student block draws MLP neurons from every teacher block its
layer map skips. A teacher that splits each student block's MLP over two consecutive blocks
(the second block has no attention) is recovered far better by folding than by picking."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from gradfree.adapters import get_adapter
from gradfree.capture import Subject
from gradfree.compress import compress, make_recipe
from gradfree.compress.mlp import fold_spans
from gradfree.surgery import fuse_norms_
from gradfree.surgery.edit import assign_, param
from gradfree.testing.tiny import HARBOUR_DOCS, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = {"max_length": 48, "batch_size": 4, "dump_rate": 1.0, "attention_kl_windows": 0}


def split_teacher(student: torch.nn.Module) -> torch.nn.Module:
    """2L blocks: block 2j = student block j with the second half of its neurons silenced,
    block 2j+1 = no attention, the MLP of block j with the first half silenced."""
    from transformers import AutoModelForCausalLM

    src = copy.deepcopy(student)
    fuse_norms_(src)
    cfg = copy.deepcopy(src.config)
    cfg.num_hidden_layers = 2 * cfg.num_hidden_layers
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[0]] * cfg.num_hidden_layers
    cfg.tie_word_embeddings = False
    teacher = AutoModelForCausalLM.from_config(cfg).eval()
    s, t = get_adapter(src), get_adapter(teacher)
    with torch.no_grad():
        teacher.model.embed_tokens.weight.copy_(param(s.embed_tokens))
        teacher.lm_head.weight.copy_(param(s.lm_head))
        sd = src.model.layers
        for j in range(s.num_layers):
            for k in (2 * j, 2 * j + 1):
                teacher.model.layers[k].load_state_dict(sd[j].state_dict())
            half = s.intermediate_size // 2
            w0 = param(t.layer(2 * j).down_proj).clone()
            w0[:, half:] = 0
            assign_(t.layer(2 * j).down_proj, "weight", w0)
            w1 = param(t.layer(2 * j + 1).down_proj).clone()
            w1[:, :half] = 0
            assign_(t.layer(2 * j + 1).down_proj, "weight", w1)
            assign_(t.layer(2 * j + 1).o_proj, "weight", torch.zeros_like(param(s.layer(j).o_proj)))
    return teacher


def _kl(teacher: torch.nn.Module, model: torch.nn.Module) -> float:
    ids = torch.tensor([tiny_tokenizer()(" ".join(HARBOUR_DOCS[5:]))["input_ids"][:120]])
    with torch.no_grad():
        lt = torch.log_softmax(teacher(ids).logits.double(), -1)
        lm = torch.log_softmax(model(ids).logits.double(), -1)
    return float((lt.exp() * (lt - lm)).sum(-1).mean())


def test_fold_spans_cover_the_skipped_blocks() -> None:
    assert fold_spans([0, 2, 4], 6) == [[1], [3], [5]]
    assert fold_spans([0, 1, 3], 5) == [[], [2], [4]]
    assert fold_spans([2, 2], 3) == [[], []]


def test_folding_recovers_a_teacher_that_splits_its_mlps(tmp_path: Path) -> None:
    student = tiny_model("qwen2", hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    teacher = split_teacher(student)
    tok = tiny_tokenizer()
    kls = {}
    for depth in ("pick", "fold"):
        sol, _ = compress(
            Subject(copy.deepcopy(teacher), tok),
            Subject(copy.deepcopy(student), tok),
            HARBOUR_DOCS,
            tmp_path / depth,
            make_recipe(merge="none", depth=depth, basis="identity", mlp_match="none", **FAST),
        )
        kls[depth] = _kl(teacher, sol.projected)
        if depth == "fold":
            assert [m.sources for m in sol.mlp] == [[0, 1], [2, 3]]
            # the silenced neurons have no importance: the kept ones are the live halves
            assert all(m.kept_importance > 0.999 for m in sol.mlp)
    assert kls["fold"] < 0.5 * kls["pick"], kls


def duplicated_teacher(student: torch.nn.Module, share: float = 0.97) -> torch.nn.Module:
    """Every student neuron twice (same gate/up rows): one copy writes ``share`` of its output,
    the other the rest. Keeping one copy per neuron loses the other's share."""
    src = copy.deepcopy(student)
    fuse_norms_(src)
    cfg = copy.deepcopy(src.config)
    cfg.intermediate_size = 2 * cfg.intermediate_size
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_config(cfg).eval()
    sd = {k: v for k, v in src.state_dict().items() if "mlp" not in k}
    teacher.load_state_dict(sd, strict=False)
    s, t = get_adapter(src), get_adapter(teacher)
    for j in range(s.num_layers):
        ls, lt = s.layer(j), t.layer(j)
        for name in ("gate_proj", "up_proj"):
            w = param(getattr(ls, name))
            assign_(getattr(lt, name), "weight", torch.cat([w, w]))
        d = param(ls.down_proj)
        assign_(lt.down_proj, "weight", torch.cat([share * d, (1 - share) * d], dim=1))
    return teacher


def test_merging_neuron_clusters_keeps_what_selection_drops(tmp_path: Path) -> None:
    student = tiny_model("qwen2", hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    for layer in student.model.layers:  # a tiny random MLP writes little: make it matter
        layer.mlp.down_proj.weight.data *= 5
    teacher = duplicated_teacher(student)
    tok = tiny_tokenizer()
    ref = _kl(teacher, student)
    assert ref < 1e-10  # the duplicated teacher computes the student's function
    kls = {}
    for reduce in ("select", "cluster"):
        sol, _ = compress(
            Subject(copy.deepcopy(teacher), tok),
            Subject(copy.deepcopy(student), tok),
            HARBOUR_DOCS,
            tmp_path / reduce,
            make_recipe(merge="none", basis="identity", mlp_reduce=reduce, **FAST),
        )
        kls[reduce] = _kl(teacher, sol.projected)
        if reduce == "cluster":
            assert all(m.merged is not None and len(m.merged[0]) == 48 for m in sol.mlp)
    # each dropped copy is merged into its twin (a = share ratio): the function comes back
    assert kls["cluster"] < 1e-3 * kls["select"], kls
