"""The probe of a QLoRA merge: the one number users compare, the largest logit difference.

The model is built by transformers from the config and run on a few fixed token ids three times:
with the merged weights as written, with the model as trained (quantized base + delta, fp32) and
with the naive merge (16-bit base + delta, fp32). The trained model's logits are those of the 4-bit
model with its adapter unmerged, up to fp32 summation order, with no bitsandbytes needed. The whole
model is held in fp32 while probing: it is meant for models that fit in memory.
"""

from __future__ import annotations

from typing import Callable

import torch

from surgeon.errors import SurgeonError
from surgeon.ops.apply import apply_deltas
from surgeon.quantize import causal_lm

#: Fixed token ids (taken modulo the vocabulary), so probes of one model compare across runs.
PROBE_IDS = (1, 5, 9, 42, 100, 7, 3, 11, 200, 64)


def _sources(model: torch.nn.Module, keys: set[str], where: object) -> dict[str, str]:
    """{name in ``model``: the checkpoint key it is read from} for every weight ``model`` saves (a
    bare base model's checkpoint names them without the prefix); refused where one is missing."""
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    prefix = model.base_model_prefix + "."
    found = {}
    for key in model.state_dict():
        source = next((k for k in (key, key.removeprefix(prefix)) if k in keys), None)
        if source is None and key not in tied:
            raise SurgeonError(
                f"{where}: the causal language model transformers builds has {key!r}, which the checkpoint "
                "lacks; the probe needs every weight of it, the output head included."
            )
        if source is not None:
            found[key] = source
    return found


def _logits(
    model: torch.nn.Module, weight: Callable[[str], torch.Tensor], ids: torch.Tensor, sources: dict[str, str]
) -> torch.Tensor:
    """``model``'s logits on ``ids`` with every parameter and buffer it saves taken from ``weight``."""
    state = model.state_dict()
    with torch.no_grad():
        for key, source in sources.items():
            state[key].copy_(weight(source))
        return model(input_ids=ids).logits.float()


def check_probe(base, where: object) -> None:
    """Refuse, before any work, a probe of a checkpoint that lacks a weight of its causal LM (a bare base model)."""
    _sources(causal_lm(base.config(), where, torch.device("meta")), set(base.keys()), where)


def probe(base, plan: dict, merged, where: object) -> dict:
    """Max absolute logit difference of the merged model and of the naive merge from the model as
    trained; ``base`` is a :class:`surgeon.ops.qlora.QuantizedBase`, ``merged`` the written checkpoint."""
    model = causal_lm(merged.config(), where, torch.device("cpu")).eval()  # its vocabulary grows with a prompt
    vocabulary = model.get_input_embeddings().weight.shape[0]
    ids = torch.tensor([[i % vocabulary for i in PROBE_IDS]])

    def trained(key: str) -> torch.Tensor:
        return apply_deltas(base.get(key).float(), plan.get(key, []))

    def naive(key: str) -> torch.Tensor:
        return apply_deltas(base.original.get(key).float(), plan.get(key, []))

    sources = _sources(model, set(base.keys()), where)
    reference = _logits(model, trained, ids, sources)
    ours = _logits(model, lambda key: merged.get(key).float(), ids, sources)
    theirs = _logits(model, naive, ids, sources)
    return {
        "token_ids": ids[0].tolist(),
        "max_logit_difference": float((ours - reference).abs().max()),
        "naive_max_logit_difference": float((theirs - reference).abs().max()),
    }
