"""Teacher-written calibration text: greedy continuations of the opening of each document (seed
001's "short continuations", issue 17 part 4).

A distilled student learns the teacher's distribution only where it sees the teacher's inputs;
text the teacher wrote itself is where that distribution is sharpest. Each document gives its
first ``prompt_tokens`` tokens as a prompt; the teacher continues it greedily for
``new_tokens`` tokens; the new document is the prompt followed by the continuation (one text, so
that a capture sees the continuation in its context). Documents are generated ``batch_size`` at a
time, padded on the left (the attention mask and the position ids transformers derives from it
make the padding invisible), so the result does not depend on the batch size up to rounding.
Greedy decoding: the same model and documents give the same texts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gradfree.base.errors import GradfreeError
from gradfree.base.progress import ProgressFn, silent
from gradfree.texts.corpora import Document
from gradfree.texts.windows import encode, pad_id


def continuations(
    model: Any,
    tokenizer: Any,
    documents: Sequence[Any],
    *,
    prompt_tokens: int = 32,
    new_tokens: int = 96,
    batch_size: int = 8,
    progress: ProgressFn = silent,
) -> list[Document]:
    """One teacher-written document per input document (ids ``<id>+cont``, split
    ``continuation``; ``meta`` records the prompt's length and the tokens generated)."""
    import torch
    from transformers import GenerationConfig

    if prompt_tokens < 1 or new_tokens < 1 or batch_size < 1:
        raise GradfreeError("Continuations need prompt_tokens, new_tokens and batch_size >= 1.")
    if not documents:
        raise GradfreeError("Continuations need at least one document to take prompts from.")
    pad = pad_id(tokenizer, model)
    gen = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # the same length for every document: a fixed token budget
        pad_token_id=pad,
        eos_token_id=None,
    )
    prompts = [encode(tokenizer, d.text)[:prompt_tokens] for d in documents]
    stops = {pad} | _ids(getattr(model.generation_config, "eos_token_id", None))
    stops |= _ids(tokenizer.eos_token_id)
    device = next(model.parameters()).device
    generate: Any = model.generate  # typed through nn.Module.__getattr__ in the stubs
    out: list[Document] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        with torch.inference_mode():
            res = generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen
            )
        for i, p in enumerate(chunk):
            doc = documents[start + i]
            new = res[i, width:].tolist()
            # a model whose defaults still stop at an end token pads after it: cut there
            cut = next((k for k, t in enumerate(new) if t in stops), len(new))
            new = new[:cut]
            text = tokenizer.decode(p + new, skip_special_tokens=True)
            out.append(
                Document(
                    id=f"{getattr(doc, 'id', start + i)}+cont",
                    text=text,
                    lang=getattr(doc, "lang", "en"),
                    split="continuation",
                    source="teacher greedy continuation",
                    meta={"prompt_tokens": len(p), "new_tokens": len(new)},
                )
            )
        progress("continuations", len(out), len(prompts), "documents")
    return out


def _ids(value: Any) -> set[int]:
    """Token ids from a config field that holds one id, a list of them, or None."""
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, list | tuple) else {int(value)}
