"""Greedy soup (Wortsman et al. 2022, "Model soups", https://arxiv.org/abs/2203.05482, Recipe 1).

Ingredients are ranked by their own held-out score; the soup starts with the best one, and each
next ingredient is kept only if the uniform average of the soup plus it scores at least as well
on the held-out metric as the soup without it. The metric (lower is better) is the perplexity on
a corpus split, or KL(teacher ‖ soup), both from :func:`gradfree.evaluation.run.evaluate`; the
selection text should be held out from anything the ingredients were tuned on.

Candidates are evaluated in one model instance whose parameters are overwritten with each
candidate average (tensors streamed from the inputs' safetensors), so the selection holds one
model in memory (plus the teacher for KL). The output is the uniform average of the selected
ingredients; when only the best is kept it is that model, exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from gradfree.merge.linear import linear_combination
from gradfree.merge.registry import NoParams, TensorwiseMethod, register

if TYPE_CHECKING:
    import torch
    from pydantic import BaseModel

    from gradfree.merge.context import MergeContext


@register
class GreedySoup(TensorwiseMethod):
    name = "greedy_soup"
    reference_url = "https://arxiv.org/abs/2203.05482"
    description = "uniform soup of the ingredients that improve a held-out metric, greedily"
    Params = NoParams
    ModelParams = NoParams
    needs_selection = True
    min_models = 1

    def __init__(self, params: BaseModel, model_params: Sequence[BaseModel]) -> None:
        super().__init__(params, model_params)
        self.selected: list[int] = []

    def prepare(self, ctx: MergeContext) -> None:
        import torch

        from gradfree.merge.recipe import measure
        from gradfree.models import load_model

        spec = ctx.recipe.selection
        assert spec is not None
        docs = ctx.documents(spec)
        work = ctx.load(0)
        teacher = (
            load_model(spec.teacher, device=ctx.device, dtype=ctx.compute_dtype)
            if spec.metric == "kl" and spec.teacher is not None
            else None
        )
        params = dict(work.model.named_parameters())
        cache: dict[tuple[int, ...], float] = {}

        def score(members: list[int]) -> float:
            key = tuple(sorted(members))
            if key in cache:
                return cache[key]
            with torch.no_grad():
                for n, p in params.items():
                    xs = [ctx.sources[i].get(n).to(p.device, torch.float64) for i in key]
                    p.copy_(linear_combination(xs, [1.0] * len(xs)).to(p.dtype))
            r = measure(work.model, work.tokenizer, docs, spec, teacher, ctx.device)
            value = float(r["ppl"] if teacher is None else r["kl_mean"])
            cache[key] = value
            ctx.say(
                f"greedy soup: {spec.metric} of {[ctx.models[i].label for i in key]}: {value:.4f}"
            )
            return value

        n = len(ctx.models)
        individual = [score([i]) for i in range(n)]
        order = sorted(range(n), key=lambda i: (individual[i], i))
        soup, best = [order[0]], individual[order[0]]
        trace = [{"candidate": order[0], "score": best, "accepted": True}]
        for i in order[1:]:
            s = score([*soup, i])
            accepted = s <= best
            trace.append({"candidate": i, "score": s, "accepted": accepted})
            if accepted:
                soup, best = [*soup, i], s
        self.selected = sorted(soup)
        self.stats = {
            "metric": spec.metric,
            "individual": individual,
            "order": order,
            "trace": trace,
            "selected": self.selected,
            "selected_labels": [ctx.models[i].label for i in self.selected],
            "soup_score": best,
        }

    def merge_tensor(
        self, name: str, xs: list[torch.Tensor], base: torch.Tensor | None
    ) -> torch.Tensor:
        weights = [1.0 if i in self.selected else 0.0 for i in range(len(xs))]
        return linear_combination(xs, weights)

    def summary(self) -> dict[str, Any]:
        return dict(self.stats)


__all__ = ["GreedySoup"]
