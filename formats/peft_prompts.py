"""PEFT's prompt-learning adapters: soft prompts, read from the same ``adapter_config.json`` +
``adapter_model`` layout as LoRA, whose one tensor ``prompt_embeddings`` is not keyed by a module.

- Prompt tuning and P-tuning: PEFT prepends ``prompt_embeddings`` ([virtual tokens, hidden]) to
  the input embeddings at run time. PEFT saves P-tuning's prompt *after* its encoder (and loads it
  in inference mode as is), so both are the final vectors. They become vocabulary entries: rows
  appended to the input embedding (:class:`surgeon.delta.AppendRows`), named ``<|prompt_i|>``;
  feeding those ids first reproduces the prompt-tuned model in any runtime.
- Multi-task prompt tuning: the prompt of task t is ``prompt_embeddings ⊙ (cols[t] @ rows[t])``
  (peft ``tuners/multitask_prompt_tuning/model.py``); one task is read so, several are refused.
- Prefix tuning and adaption prompts add keys and values (or gated prompts) inside attention at
  run time; no weight delta expresses them, so reading them describes them and refuses.

The grown vocabulary must stay consistent: every other parameter sized by it (an untied output
embedding, an output bias) grows by as many rows. Those rows are zeros for an untied head (a
documented choice: PEFT never scores the virtual tokens; zeros keep the logits of the real
vocabulary exact) and the prompt itself for a head tied to the input embedding.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from surgeon.delta import FACTOR_DTYPES, Adapter, AppendRows
from surgeon.errors import NotWeightDeltas, SurgeonError
from surgeon.formats.peft import load_tensors
from surgeon.keys import embedding_name

PROMPTS = ("PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING")
#: Prompt-learning types that are read to be described and refused: what they do, as a clause.
RUN_TIME = {
    "PREFIX_TUNING": "adds learned keys and values to the attention cache of every layer at run time",
    "ADAPTION_PROMPT": "adds gated attention over learned prompts inside the top layers at run time",
}
TYPES = (*PROMPTS, *RUN_TIME)
#: What an adapter is keyed by when no base names its input embedding (inspect without --base).
UNBOUND_EMBEDDING = "<input embedding>"
#: The tensors each type saves (an adaption prompt saves two per adapted layer, named by its module).
_SAVED = {
    "MULTITASK_PROMPT_TUNING": ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows"),
    "ADAPTION_PROMPT": (".adaption_prompt", ".adaption_gate"),
}
_FACT_FIELDS = (
    "task_type",
    "num_virtual_tokens",
    "num_layers",
    "token_dim",
    "num_attention_heads",
    "prefix_projection",
    "encoder_hidden_size",
    "adapter_len",
    "adapter_layers",
    "target_modules",
)


_IN_LAYER = re.compile(r"(^|\.)\d+\.")


def token_names(count: int) -> tuple[str, ...]:
    """The vocabulary entries the virtual tokens become."""
    return tuple(f"<|prompt_{i}|>" for i in range(count))


def read(path: Path, config: dict, base=None) -> Adapter:
    """A PEFT soft prompt as rows appended to the base's vocabulary; prefix tuning refused."""
    peft_type = str(config["peft_type"]).upper()
    tensors, metadata, file = load_tensors(path)
    _check_saved(peft_type, tensors, file)
    if peft_type in RUN_TIME:
        raise _run_time_refusal(peft_type, config, tensors, file)
    prompts = final_prompts(peft_type, tensors, config, file)
    adapter = Adapter(
        source_format=f"peft-{peft_type.lower().replace('_', '-')}",
        base_model=config.get("base_model_name_or_path"),
        config=dict(config),
        metadata=metadata,
    )
    if base is None:
        adapter.add(UNBOUND_EMBEDDING, AppendRows(prompts, token_names(len(prompts))), "embedding")
        return adapter
    check_made_for(config, base.config(), file)
    embedding, outputs, tied = vocabulary_keys(base, prompts.shape[1], file)
    adapter.add(embedding, AppendRows(prompts, token_names(len(prompts))), "embedding")
    for key in outputs:
        shape = base.info(key).shape
        rows = prompts if tied and len(shape) == 2 else torch.zeros((len(prompts), *shape[1:]), dtype=prompts.dtype)
        adapter.add(key, AppendRows(rows, derived=True), "other")
    return adapter


def _check_saved(peft_type: str, tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Only the tensors ``peft_type`` saves: a file of another type's tensors is a config that does not belong."""
    saved = _SAVED.get(peft_type, ("prompt_embeddings",))
    other = next((k for k in tensors if k not in saved and not any(s[0] == "." and k.endswith(s) for s in saved)), None)
    if other is not None:
        raise SurgeonError(
            f"{file}: holds {other!r}, which a PEFT {peft_type} adapter does not save; the config does "
            "not belong to these weights."
        )


def final_prompts(peft_type: str, tensors: dict[str, torch.Tensor], config: dict, file: Path) -> torch.Tensor:
    """The [virtual tokens, hidden] vectors PEFT prepends to the input embeddings at inference."""
    prompts = tensors.get("prompt_embeddings")
    if prompts is None or prompts.dim() != 2 or prompts.dtype not in FACTOR_DTYPES:
        raise SurgeonError(
            f"{file}: a PEFT {peft_type} adapter holds a 2-D float prompt_embeddings tensor, and this "
            "file does not; restore the file PEFT saved."
        )
    stacks = config.get("num_transformer_submodules") or 1
    if stacks != 1:
        raise SurgeonError(
            f"{file}: the prompt is for {stacks} transformer stacks (an encoder-decoder model's "
            "encoder and decoder), and surgeon merges a prompt for one input embedding only; use PEFT "
            "to run it."
        )
    if peft_type != "MULTITASK_PROMPT_TUNING":
        return prompts
    cols, rows = tensors.get("prefix_task_cols"), tensors.get("prefix_task_rows")
    if cols is None or rows is None or cols.dim() != 3 or rows.dim() != 3:
        raise SurgeonError(
            f"{file}: a multi-task prompt needs prefix_task_cols and prefix_task_rows, and this file "
            "lacks them; restore the file PEFT saved."
        )
    if cols.shape[0] != 1:
        raise SurgeonError(
            f"{file}: the multi-task prompt holds {cols.shape[0]} tasks, chosen by the task id given "
            "with each input, and a merged vocabulary holds one prompt; use PEFT to run it."
        )
    return prompts.float() * (cols[0].float() @ rows[0].float())


#: The base config fields PEFT reads each prompt config field from, in its order of preference
#: (peft ``utils/other.py`` ``_prepare_prompt_learning_config``, which records them in the adapter's config).
_DERIVED_FROM = {
    "num_layers": ("num_hidden_layers", "num_layers", "n_layer"),
    "token_dim": ("hidden_size", "n_embd", "d_model"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
}


def check_made_for(config: dict, base_config: dict, file: Path) -> None:
    """A soft prompt fits any base of its width, so a prompt for another model would merge without a
    word: refuse where the sizes PEFT recorded from its base, or that base's own model type, differ."""
    language = base_config.get("text_config") or base_config
    for field, sources in _DERIVED_FROM.items():
        ours = next((language[s] for s in sources if s in language), None)
        if config.get(field) is not None and ours is not None and config[field] != ours:
            raise SurgeonError(
                f"{file}: the prompt was made for a model with {field} = {config[field]}, and the base has {ours}; "
                "merge it into the model it was trained on."
            )
    theirs, ours = _recorded_model_type(config.get("base_model_name_or_path")), base_config.get("model_type")
    if theirs and ours and theirs != ours:
        raise SurgeonError(
            f"{file}: the prompt was made for {config['base_model_name_or_path']} (a {theirs} model), and the base "
            f"is a {ours} model; merge it into the model it was trained on."
        )


def _recorded_model_type(origin: str | None) -> str | None:
    """The model type of the base PEFT recorded, where its config is at hand: a local folder, or the
    Hub cache (never the network)."""
    from surgeon.hub import recorded_config

    found = recorded_config(origin)
    try:
        return json.loads(found.read_text()).get("model_type") if found else None
    except (OSError, ValueError, AttributeError):
        return None


def vocabulary_keys(base, width: int, file: Path) -> tuple[str, list[str], bool]:
    """The base's input embedding, the other parameters sized by the vocabulary (output embedding
    [vocab, hidden], output biases [vocab]), and whether the output embedding is tied to the input."""
    config = base.config()
    vocab = config.get("vocab_size")
    found = [
        k
        for k in base.keys()
        if embedding_name(k.rpartition(".")[0])
        and len(base.info(k).shape) == 2
        and base.info(k).shape[1] == width
        and (not isinstance(vocab, int) or base.info(k).shape[0] == vocab)
    ]
    if len(found) != 1:
        what = f"{len(found)} candidates ({', '.join(found[:3])})" if found else "none"
        raise SurgeonError(
            f"{file}: the prompt is {width} wide, and the base's input embedding of that width could "
            f"not be told apart ({what}); check that the adapter belongs to this base."
        )
    rows = base.info(found[0]).shape[0]
    # an output head is never inside a numbered layer, where a feed-forward block can be as wide as the vocabulary
    outputs = [
        k
        for k in base.keys()
        if k != found[0]
        and not _IN_LAYER.search(k)
        and base.info(k).shape in ((rows, width), (rows,))
        and (len(base.info(k).shape) == 2 or k.endswith("bias"))
    ]
    return found[0], outputs, bool(config.get("tie_word_embeddings", True))


def _run_time_refusal(peft_type: str, config: dict, tensors: dict[str, torch.Tensor], file: Path) -> NotWeightDeltas:
    family = peft_type.lower().replace("_", " ")
    facts = {
        "family": f"PEFT {family}",
        **{name: config[name] for name in _FACT_FIELDS if config.get(name) not in (None, [], {})},
        "params": sum(t.numel() for t in tensors.values()),
        "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        "config": dict(config),
        "modules": [{"target": k, "delta": "x".join(map(str, t.shape)), "count": 1} for k, t in tensors.items()],
    }
    traced = peft_type == "PREFIX_TUNING"
    instead = "run it with PEFT (PeftModel.from_pretrained)" + (
        ", or trace it into an ONNX graph (surgeon export-onnx --adapter)" if traced else ", or train a LoRA instead"
    )
    message = (
        f"{file}: a PEFT {family} adapter {RUN_TIME[peft_type]}, which no change to the weights can express, "
        f"so surgeon cannot merge or convert it; {instead}."
    )
    return NotWeightDeltas(message, facts, peft_runs_it=traced)
