"""The name-based module types of known architectures (surgeon/architectures.py) against the
model transformers builds from the same config: they must agree key for key, so skipping
transformers costs nothing in accuracy; and extract's first tensor no longer waits for it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from surgeon import architectures
from surgeon.checkpoint import Checkpoint
from surgeon.ops.extract import module_types

transformers = pytest.importorskip("transformers")
TINY = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    vocab_size=64,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny random model of each known architecture, saved by transformers' save_pretrained."""
    out = {}
    for architecture in sorted(architectures.LINEAR_DECODERS):
        model_type = architecture.removesuffix("ForCausalLM").lower()
        config = transformers.AutoConfig.for_model(model_type, **TINY)
        config.tie_word_embeddings = model_type != "llama"  # both layouts: lm_head saved and tied away
        torch.manual_seed(0)
        model = getattr(transformers, architecture)(config)
        out[architecture] = tmp_path_factory.mktemp(model_type)
        model.save_pretrained(out[architecture])
    return out


@pytest.mark.parametrize("architecture", sorted(architectures.LINEAR_DECODERS))
def test_known_layout_agrees_with_the_built_model(saved, monkeypatch, architecture):
    checkpoint = Checkpoint(saved[architecture])
    types, embeddings, tied, source = module_types(checkpoint)
    assert source == f"read from {architecture} (known layout)"
    monkeypatch.setattr(architectures, "LINEAR_DECODERS", frozenset())
    built_types, built_embeddings, built_tied, built_source = module_types(checkpoint)
    assert built_source == f"read from {architecture} (transformers)"
    assert types == built_types and embeddings == built_embeddings and tied == built_tied
    assert "embedding" in types.values() and "linear" in types.values()


def test_extract_of_a_known_architecture_does_not_import_transformers(fixtures_dir):
    code = (
        "import sys; from surgeon.checkpoint import Checkpoint; from surgeon.ops.extract import module_types; "
        f"module_types(Checkpoint({str(fixtures_dir / 'tiny-llama')!r})); print('transformers' in sys.modules)"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "False"
