"""The human-readable page of ``gradfree eval`` (``eval.md``), rendered from the result dict
that :func:`gradfree.evaluation.run.evaluate` returns and ``eval.json`` stores."""

from __future__ import annotations

from typing import Any


def _cell(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x).replace("|", "\\|").replace("\n", " ⏎ ")


def _name(result: dict[str, Any], key: str) -> str:
    info = result.get(key) or {}
    return str(info.get("name") or info.get("spec") or "the model")


def render_markdown(result: dict[str, Any]) -> str:
    ppl = result["perplexity"]
    settings = result["settings"]
    lines = [
        f"# Evaluation of `{_name(result, 'model')}`",
        "",
        f"Corpus: `{(result.get('corpus') or {}).get('name', 'documents given')}`; windows of "
        f"{settings['max_length']} tokens, stride {settings['stride']}; {settings['dtype']} on "
        f"{settings['device']}.",
        "",
        "| metric | value |",
        "|---|---:|",
        f"| perplexity | {_cell(ppl['ppl'])} |",
        f"| mean NLL (nats/token) | {_cell(ppl['nll_mean'])} |",
        f"| scored tokens | {ppl['tokens']} |",
        f"| documents / windows | {ppl['documents']} / {ppl['windows']} |",
    ]
    teacher = result.get("teacher")
    if teacher:
        lines += [
            "",
            f"## Agreement with the teacher `{_name(result, 'teacher_model')}`",
            "",
            "| KL(teacher ‖ model) per token | top-1 agreement | tokens |",
            "|---:|---:|---:|",
            f"| {_cell(teacher['kl_mean'])} | {_cell(teacher['top1_agreement'])} | "
            f"{teacher['tokens']} |",
            "",
            "Hidden states at mapped layers (block inputs, then the final normed states), without "
            "each document's first token; cosine only where the widths match.",
            "",
            "| model layer | teacher layer | site | cosine | linear CKA | tokens |",
            "|---:|---:|---|---:|---:|---:|",
        ]
        for row in teacher["layers"]:
            lines.append(
                f"| {row['student_layer']} | {row['teacher_layer']} | {row['site']} | "
                f"{_cell(row['cosine'])} | {_cell(row['cka'])} | {row['tokens']} |"
            )
    qa = result.get("qa")
    if qa:
        langs = ", ".join(
            f"{lang}: {v['matched']}/{v['n']}" for lang, v in sorted(qa["by_lang"].items())
        )
        lines += [
            "",
            f"## Questions: {qa['matched']}/{qa['n']} matched (score {qa['score']:.3f})",
            "",
            f"Greedy answers of at most {qa['max_new_tokens']} new tokens, prompt format "
            f"'{qa['prompt_format']}'. By language: {langs}.",
            "",
            "| id | question | accepted answers | answer | matched |",
            "|---|---|---|---|---|",
        ]
        for it in qa["items"]:
            lines.append(
                f"| {_cell(it['id'])} | {_cell(it['question'])} | "
                f"{_cell(' / '.join(it['answers']))} | {_cell(it['answer'])} | "
                f"{_cell(it['matched'])} |"
            )
    return "\n".join(lines) + "\n"
