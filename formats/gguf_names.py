"""Which llama.cpp architecture a transformers base is, and what llama.cpp does to the weights a
LoRA targets: the knowledge a GGUF LoRA writer needs beyond gguf-py's own tables.

The rule for the architecture: config.json's ``model_type`` names it, matched against gguf-py's
``MODEL_ARCH_NAMES`` with case, ``-`` and ``_`` ignored (``gpt_neox`` is ``gptneox``,
``qwen2_moe`` is ``qwen2moe``); :data:`ALIASES` holds only the model types that llama.cpp's
``convert_hf_to_gguf.py`` registers under an architecture of another name. Tensor names then come
from gguf-py's ``TensorNameMap`` for that architecture, never from a list kept here.

A name is not enough: the converter's ``modify_tensors`` reorders the rows of some weights
(Llama's rotary Q/K, the fused QKV of GPT-NeoX, BLOOM and Falcon) and transposes GPT-2's Conv1D
weights, and llama.cpp's graph multiplies a few tensors without applying adapters, so a LoRA on
them would be silently ignored. :data:`RECIPES` says that per architecture, for the architectures
whose conversion surgeon has checked (tests/test_gguf_archs.py); every other one is refused. The
row reorderings below repeat the converter's own tensor operations on a column of row indices, so
lora_B gets exactly the rows the converter gives the base weight.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from surgeon.errors import SurgeonError

#: model_type -> gguf architecture name, where convert_hf_to_gguf.py's registration differs from the name.
ALIASES = {
    "mistral": "llama",  # LlamaModel registers MistralForCausalLM and MixtralForCausalLM
    "mixtral": "llama",
    "phi": "phi2",  # Phi2Model registers PhiForCausalLM
    "cohere": "command-r",  # CommandR2Model registers CohereForCausalLM
    "gemma3_text": "gemma3",  # Gemma3Model registers Gemma3ForCausalLM
    "deepseek_v2": "deepseek2",  # DeepseekV2Model registers DeepseekV2ForCausalLM and DeepseekV3ForCausalLM
    "deepseek_v3": "deepseek2",
}

#: gguf-py MODEL_TENSOR members holding stacked experts (experts × out × in): llama.cpp's
#: ``build_lora_mm_id`` applies a 3-D LoRA there, which surgeon writes from the checkpoint's
#: per-expert tensors (:func:`stacked_expert`), never from a delta on a stacked tensor itself.
EXPERTS = frozenset({"FFN_GATE_EXP", "FFN_UP_EXP", "FFN_DOWN_EXP", "FFN_GATE_UP_EXP"})

#: A per-expert checkpoint tensor: ``model.layers.0.mlp.experts.3.gate_proj.weight`` (Qwen2/3-MoE, OLMoE,
#: DeepSeek) or ``model.layers.0.block_sparse_moe.experts.3.w1.weight`` (Mixtral).
_PER_EXPERT = re.compile(r"^(?P<stem>.+\.experts)\.(?P<expert>\d+)\.(?P<weight>[^.]+\.weight)$")

LAYER_FIELDS = ("n_layers", "num_hidden_layers", "n_layer", "num_layers")  # TextModel's block_count lookup

Rows = Callable[[torch.Tensor, "Counts"], torch.Tensor]


class Counts:
    """Head and width counts from the base's config.json, read as the converter reads them
    (``find_hparam``: the first field present), each a positive integer or a refusal."""

    def __init__(self, config: dict, where: str):
        self.config, self.where = config, where

    def __call__(self, *fields: str, default: int | None = None) -> int:
        present = next((f for f in fields if self.config.get(f) is not None), None)
        value = self.config[present] if present else default
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SurgeonError(
                f"{self.where}: the base's config.json has {present or fields[0]} = {value!r}; GGUF needs it as a "
                "positive integer, so the base's config is broken or not a transformers config."
            )
        return value


def _llama_permute(index: torch.Tensor, heads: int) -> torch.Tensor:
    """``LlamaModel.permute``: within each head, the interleaved rotary pairs become two halves."""
    return index.reshape(heads, 2, index.shape[0] // heads // 2, 1).swapaxes(1, 2).reshape(index.shape)


def _llama_q(index: torch.Tensor, counts: Counts) -> torch.Tensor:
    return _llama_permute(index, counts("num_attention_heads"))


def _llama_k(index: torch.Tensor, counts: Counts) -> torch.Tensor:
    heads = counts("num_attention_heads")
    return _llama_permute(index, counts("num_key_value_heads", default=heads))


def _per_head_qkv(index: torch.Tensor, counts: Counts) -> torch.Tensor:
    """``GPTNeoXModel.modify_tensors`` and ``BloomModel.modify_tensors``: per-head [q, k, v] rows
    become all q rows, then all k, then all v."""
    n_head = counts("n_head", "num_attention_heads")
    n_embed = counts("hidden_size", "n_embed")
    qkv = index.reshape(n_head, 3, n_embed // n_head, 1)
    return torch.cat([qkv[:, part, :, :].reshape(-1, 1) for part in range(3)], dim=0)


def _falcon_qkv(index: torch.Tensor, counts: Counts) -> torch.Tensor:
    """``FalconModel.modify_tensors``: n_head_kv groups of (queries, one key, one value) become
    all queries, then all keys, then all values."""
    n_head = counts("num_attention_heads", "n_head")
    n_head_kv = counts("num_kv_heads", "n_head_kv", default=1)
    head_dim = counts("hidden_size") // n_head
    qkv = index.view(n_head_kv, n_head // n_head_kv + 2, head_dim, 1)
    q, k, v = qkv[:, :-2].reshape(-1, 1), qkv[:, [-2]].reshape(-1, 1), qkv[:, [-1]].reshape(-1, 1)
    return torch.cat((q, k, v))


@dataclass(frozen=True)
class Recipe:
    """What llama.cpp's conversion does to one architecture's LoRA-targetable weights, keyed by
    gguf-py MODEL_TENSOR member names: ``rows`` reorder the weight's rows, ``transposed`` weights
    are stored in×out in the checkpoint (Conv1D) and out×in in GGUF, ``ignored`` ones are
    multiplied by llama.cpp's graph without the adapter."""

    rows: dict[str, Rows] = field(default_factory=dict)
    transposed: frozenset[str] = frozenset()
    ignored: frozenset[str] = frozenset()


RENAMED_ONLY = Recipe()  # the converter's modify_tensors only renames these weights (or skips norms)

RECIPES: dict[str, Recipe] = {
    "llama": Recipe(rows={"ATTN_Q": _llama_q, "ATTN_K": _llama_k}),  # LlamaModel.modify_tensors (undo_permute)
    "qwen2": RENAMED_ONLY,  # Qwen2Model
    "qwen3": RENAMED_ONLY,  # Qwen3Model
    "qwen2moe": RENAMED_ONLY,  # Qwen2MoeModel: only experts are stacked
    "qwen3moe": RENAMED_ONLY,  # Qwen3MoeModel
    "olmoe": RENAMED_ONLY,  # OlmoeModel: only experts are stacked
    "gemma": RENAMED_ONLY,  # GemmaModel: +1 on norms only
    "gemma2": RENAMED_ONLY,  # Gemma2Model: +1 on norms only
    "gemma3": RENAMED_ONLY,  # Gemma3Model: norm shift, vocab trim of token_embd rows only
    "phi2": RENAMED_ONLY,  # Phi2Model
    "phi3": RENAMED_ONLY,  # Phi3MiniModel: qkv_proj and gate_up_proj stay fused (attn_qkv, ffn_up)
    "starcoder2": RENAMED_ONLY,  # StarCoder2Model
    "command-r": RENAMED_ONLY,  # CommandR2Model (Cohere's rotary is interleaved already, as llama.cpp's)
    "gptneox": Recipe(rows={"ATTN_QKV": _per_head_qkv}),  # GPTNeoXModel.modify_tensors
    "bloom": Recipe(rows={"ATTN_QKV": _per_head_qkv}),  # BloomModel.modify_tensors
    "falcon": Recipe(rows={"ATTN_QKV": _falcon_qkv}),  # FalconModel.modify_tensors
    # GPT2Model.modify_tensors transposes .c_attn, .c_proj and .c_fc: attn_qkv, attn_output, ffn_up, ffn_down
    "gpt2": Recipe(transposed=frozenset({"ATTN_QKV", "ATTN_OUT", "FFN_UP", "FFN_DOWN"})),
    # llama.cpp's llm_build_deepseek2 multiplies the MLA projections and the output head with plain
    # ggml_mul_mat, not build_lora_mm: adapters on them are loaded and never applied
    "deepseek2": Recipe(ignored=frozenset({"ATTN_Q", "ATTN_Q_A", "ATTN_Q_B", "ATTN_KV_A_MQA", "ATTN_KV_B", "OUTPUT"})),
}


def _normal(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def architecture(config: dict, where: str) -> tuple[object, Recipe]:
    """The gguf-py MODEL_ARCH member and the :class:`Recipe` for a base's config.json, or a
    refusal naming the architectures surgeon writes."""
    import gguf

    model_type = str(config.get("model_type"))
    wanted = _normal(ALIASES.get(model_type, model_type))
    arch = next((a for a, name in gguf.MODEL_ARCH_NAMES.items() if _normal(name) == wanted), None)
    name = gguf.MODEL_ARCH_NAMES.get(arch)
    if name not in RECIPES:
        raise SurgeonError(
            f"{where}: surgeon writes GGUF LoRA for the llama.cpp architectures {', '.join(RECIPES)}; the base's "
            f"config.json has model_type {model_type!r} ({'llama.cpp ' + repr(name) if name else 'unknown to gguf-py'}"
            "), whose llama.cpp conversion surgeon has not checked."
        )
    return arch, RECIPES[name]


def row_order(recipe: Recipe, kind: str, rows: int, counts: Counts, what: str) -> torch.Tensor | None:
    """Where each of a weight's GGUF rows comes from (GGUF row i is checkpoint row order[i]), or
    None where the converter keeps the order."""
    reorder = recipe.rows.get(kind)
    if reorder is None:
        return None
    try:
        order = reorder(torch.arange(rows).reshape(rows, 1), counts).reshape(rows)
    except RuntimeError:
        order = None
    if order is None or not torch.equal(order.sort().values, torch.arange(rows)):
        raise SurgeonError(
            f"{counts.where}: {what} has {rows} rows, which do not split into the heads the base's config.json "
            "gives; the base does not fit the adapter."
        )
    return order


def stacked_expert(key: str) -> tuple[str, int] | None:
    """(the stacked tensor's name, the expert) for a per-expert checkpoint key, or None.

    llama.cpp's converter stacks the experts of a layer with ``torch.stack(dim=0)`` (expert e is
    row-block e) and names the stack by the key without the expert number: ``Qwen2MoeModel``,
    ``OlmoeModel`` and ``DeepseekV2Model.modify_tensors`` map ``…mlp.experts.{xid}.{w_name}.weight`` to
    ``…mlp.experts.{w_name}.weight``; ``LlamaModel.modify_tensors`` (Mixtral) maps
    ``…block_sparse_moe.experts.{xid}.{wid}.weight`` to ``layers.{bid}.feed_forward.experts.{wid}.weight``,
    which gguf-py maps to the same tensor as ``…block_sparse_moe.experts.{wid}``. A transformers 5
    ``gate_up_proj`` (experts × 2·I × H) is saved as these per-expert gate and up tensors, and the
    converter splits a fused one the same way (``Qwen2MoeModel``: gate = rows [:I], up = rows [I:])."""
    match = _PER_EXPERT.match(key)
    return None if match is None else (f"{match['stem']}.{match['weight']}", int(match["expert"]))
