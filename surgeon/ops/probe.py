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


def _logits(
    model: torch.nn.Module, weight: Callable[[str], torch.Tensor], ids: torch.Tensor, where: object
) -> torch.Tensor:
    """``model``'s logits on ``ids`` with every parameter and buffer it saves taken from ``weight``."""
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            try:
                tensor.copy_(weight(key))
            except KeyError:
                if key not in tied:
                    raise SurgeonError(
                        f"{where}: the model transformers builds has {key!r}, which the checkpoint "
                        "lacks; the probe needs every weight of the model."
                    ) from None
        return model(input_ids=ids).logits.float()


def probe(base, plan: dict, merged, where: object) -> dict:
    """Max absolute logit difference of the merged model and of the naive merge from the model as
    trained; ``base`` is a :class:`surgeon.ops.qlora.QuantizedBase`, ``merged`` the written checkpoint."""
    model = causal_lm(base.config(), where, torch.device("cpu")).eval()
    vocabulary = model.get_input_embeddings().weight.shape[0]
    ids = torch.tensor([[i % vocabulary for i in PROBE_IDS]])

    def trained(key: str) -> torch.Tensor:
        return apply_deltas(base.get(key).float(), plan.get(key, []))

    def naive(key: str) -> torch.Tensor:
        return apply_deltas(base.original.get(key).float(), plan.get(key, []))

    keys = set(base.keys())
    reference = _logits(model, _checked(keys, trained), ids, where)
    ours = _logits(model, _checked(keys, lambda key: merged.get(key).float()), ids, where)
    theirs = _logits(model, _checked(keys, naive), ids, where)
    return {
        "token_ids": ids[0].tolist(),
        "max_logit_difference": float((ours - reference).abs().max()),
        "naive_max_logit_difference": float((theirs - reference).abs().max()),
    }


def _checked(keys: set[str], weight: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """``weight`` for the checkpoint's ``keys``; a KeyError for the others (see :func:`_logits`)."""

    def get(key: str) -> torch.Tensor:
        if key not in keys:
            raise KeyError(key)
        return weight(key)

    return get
