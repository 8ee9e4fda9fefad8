"""Tiny vision models whose checkpoint keys transformers 5 renames on load, for the naming tests."""

from __future__ import annotations

import torch


def tiny_vit(num_labels: int = 3):
    """A ViT classifier: ``vit.encoder.layer.N.attention.attention.query`` is ``vit.layers.N.attention.q_proj``."""
    import transformers

    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        image_size=16,
        patch_size=8,
        num_labels=num_labels,
    )
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(config)


def tiny_swiglu_dinov2():
    """A Dinov2 with SwiGLU: its checkpoint's ``mlp.weights_in`` is cut in rows into gate_proj and up_proj."""
    import transformers

    config = transformers.Dinov2Config(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=8,
        patch_size=4,
        use_swiglu_ffn=True,
        mlp_ratio=2,
        num_labels=2,
    )
    torch.manual_seed(0)
    return transformers.Dinov2ForImageClassification(config)
