"""Module types of well-known decoder architectures, read off tensor names: no transformers.

extract must tell embeddings (left out by default) and GPT-2's transposed ``Conv1D`` from
Linear weights. In general that takes building the model class on the meta device, and
importing a transformers model class costs 3–9 s before the first tensor is read (it pulls in
the generation stack, and scikit-learn where that is installed). In the architectures listed
here every 2-D weight is an ``nn.Linear`` but the token embedding, so names answer the same
question at no cost; tests/test_architectures_known.py checks each entry against the model
transformers builds.
"""

from __future__ import annotations

import re
from typing import Mapping

#: ``architectures[0]`` of config.json for which every 2-D weight is Linear but ``embed_tokens``.
LINEAR_DECODERS = frozenset(
    {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "GemmaForCausalLM",
        "Gemma2ForCausalLM",
        "Phi3ForCausalLM",
    }
)
_INPUT_EMBEDDING = re.compile(r"(^|\.)embed_tokens\.weight$")
_OUTPUT_EMBEDDING = re.compile(r"(^|\.)lm_head\.weight$")


def known_module_types(
    config: Mapping, shapes: Mapping[str, tuple[int, ...]]
) -> tuple[dict[str, str], set[str], set[str], str] | None:
    """(module type per key, embedding keys, tied keys, source) as :func:`surgeon.ops.extract.module_types`
    gives them, for a config naming one of :data:`LINEAR_DECODERS`; None for any other. The
    embeddings are tied where the checkpoint stores no ``lm_head`` (the head is the embedding) or
    the config says ``tie_word_embeddings``."""
    architecture = (config.get("architectures") or [None])[0]
    if architecture not in LINEAR_DECODERS:
        return None
    types, embeddings = {}, set()
    for key, shape in shapes.items():
        types[key] = "conv" if len(shape) >= 3 else "linear" if len(shape) == 2 else "other"
        if len(shape) == 2 and _INPUT_EMBEDDING.search(key):
            types[key] = "embedding"
        if types[key] == "embedding" or _OUTPUT_EMBEDDING.search(key):
            embeddings.add(key)
    stores_head = any(_OUTPUT_EMBEDDING.search(key) for key in shapes)
    tied = embeddings if not stores_head or config.get("tie_word_embeddings") is True else set()
    return types, embeddings, set(tied), f"read from {architecture} (known layout)"
