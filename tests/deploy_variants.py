"""PEFT-made variants of the llama fixture adapter, and PEFT's own merged weights for each: the
reference every deployment format (mlx, GGUF, ONNX Runtime) is checked against."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

from fixtures.make_fixtures import load_base, make_lora

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "fixtures" / "tiny-llama"
PLAIN = ROOT / "fixtures" / "tiny-llama-lora"

# name -> LoraConfig kwargs; each exercises one thing a deployment format holds differently.
VARIANTS = {
    "plain": None,
    # rsLoRA with two ranks: scale alpha/√r differs per module, so one alpha/one scale cannot hold it.
    "rslora": dict(use_rslora=True, rank_pattern={"k_proj": 4}),
    # per-module ranks and alphas.
    "patterns": dict(rank_pattern={"q_proj": 4, "down_proj": 12}, alpha_pattern={"v_proj": 5, "o_proj": 40}),
    # embedding and output-head targets (PEFT also saves the embedding's base layer whole).
    "embed": dict(target_modules=["q_proj", "k_proj", "embed_tokens", "lm_head"]),
    "dora": dict(use_dora=True, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]),
    # a trained full copy of a module (modules_to_save): no LoRA-only format can hold it.
    "modules_to_save": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
}


@cache
def variant(name: str, root: Path) -> Path:
    if VARIANTS[name] is None:
        return PLAIN
    return make_lora("llama", BASE, root / name, **VARIANTS[name])


@cache
def base_state() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in load_base("llama", BASE).state_dict().items()}


@cache
def peft_merged(adapter: Path) -> dict[str, torch.Tensor]:
    """The base with ``adapter`` merged by PEFT itself."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base("llama", BASE), adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def peft_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW per changed parameter, as PEFT merges it."""
    base, merged = base_state(), peft_merged(adapter)
    return {k: merged[k] - base[k] for k in merged if not torch.equal(merged[k], base[k])}


def assert_close_relative(got: torch.Tensor, expected: torch.Tensor, what: str, tolerance: float = 1e-5) -> None:
    """``got`` equals ``expected`` up to fp32 round-off relative to the largest entry."""
    got, expected = torch.as_tensor(got).float(), torch.as_tensor(expected).float()
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    error = float((got - expected).abs().max())
    assert error <= tolerance * float(expected.abs().max()), (
        f"{what}: max error {error:.3g} vs max |value| {float(expected.abs().max()):.3g}"
    )
