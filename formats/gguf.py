"""GGUF LoRA adapters for llama.cpp (``--lora adapter.gguf``), as ``convert_lora_to_gguf.py`` writes them.

Metadata ``general.type = adapter``, ``general.architecture`` (the base's), ``adapter.type =
lora``, ``adapter.lora.alpha``. Tensors ``<gguf name>.lora_a`` / ``.lora_b``, named by gguf-py's
own map for the architecture (``blk.0.attn_q.weight.lora_a``), in PEFT's orientation (numpy
r×in and out×r) except ``token_embd``, whose lora_a is num_embeddings×r. llama.cpp scales each
pair by alpha/rank (rank read from lora_b), or by 1 when alpha is 0; so one alpha serves every
module whose PEFT scale is alpha/rank, and any other scale is folded into that module's lora_b.

llama.cpp's converter permutes the rows of Llama-family q_proj/k_proj weights for its rotary
layout; on a LoRA pair that is a permutation of lora_B's rows, applied here too (k with the number
of KV heads) — without it attention would be silently wrong. The base's ``config.json`` gives the
architecture and head counts, so both reading and writing need ``--base``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from surgeon.delta import Adapter, LowRank
from surgeon.errors import SurgeonError, missing_extra
from surgeon.formats.lora_only import differs, fold, most_common, pick_targets

NAME = "gguf"
METADATA_PREFIX = "surgeon.metadata."
BASE_MODEL_KEY = "surgeon.base_model"

# HF architecture -> (gguf-py MODEL_ARCH member, whether llama.cpp's converter permutes q/k rows).
# Only architectures whose converter does nothing to a LoRA-targetable weight but rename it (and
# the Llama permutation) are listed; others are refused rather than guessed.
ARCHITECTURES = {
    "LlamaForCausalLM": ("LLAMA", True),
    "MistralForCausalLM": ("LLAMA", True),
    "MixtralForCausalLM": ("LLAMA", True),
    "Qwen2ForCausalLM": ("QWEN2", False),
    "Qwen3ForCausalLM": ("QWEN3", False),
}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise SurgeonError(missing_extra("gguf", ["gguf"], "reading or writing GGUF")) from None
    return gguf


def permute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute`` on the rows of ``weight``: within each head, the
    interleaved rotary pairs become two halves."""
    return weight.reshape(heads, 2, _half_head(weight, heads), *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    return weight.reshape(heads, _half_head(weight, heads), 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _half_head(weight: torch.Tensor, heads: int) -> int:
    """Half a head's rows; the rows must split into ``heads`` heads of an even size."""
    if weight.shape[0] % (2 * heads):
        raise SurgeonError(
            f"a q/k LoRA factor has {weight.shape[0]} rows, which do not split into {heads} heads of an even "
            "size; the base's head counts do not fit the adapter."
        )
    return weight.shape[0] // heads // 2


def _count(config: dict, field: str, where: str) -> int:
    """A positive count from the base's config.json (layers, heads): names and permutations depend on it."""
    value = config.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SurgeonError(
            f"{where}: the base's config.json has {field} = {value!r}; GGUF needs it as a positive integer, "
            "so the base's config is broken or not a transformers config."
        )
    return value


class _Layout:
    """What the base's config decides: the gguf architecture, the name map and the q/k heads."""

    def __init__(self, base, where: str):
        if base is None:
            raise SurgeonError(
                f"{where}: GGUF needs the base model (surgeon convert --base BASE; surgeon merge BASE ...): tensor "
                "names and llama's q/k permutation come from its config.json."
            )
        config = base.config()
        config = {**config, **config.get("text_config", {})}
        architecture = (config.get("architectures") or [None])[0]
        if architecture not in ARCHITECTURES:
            raise SurgeonError(
                f"{where}: surgeon writes GGUF LoRA for {', '.join(ARCHITECTURES)}; the base is {architecture!r}, "
                "whose llama.cpp conversion may transform weights beyond renaming them."
            )
        gguf = _gguf()
        member, self.permutes = ARCHITECTURES[architecture]
        self.arch = getattr(gguf.MODEL_ARCH, member)
        self.arch_name = gguf.MODEL_ARCH_NAMES[self.arch]
        self.heads = _count(config, "num_attention_heads", where)
        self.kv_heads = _count(config, "num_key_value_heads", where) if "num_key_value_heads" in config else self.heads
        self.names = gguf.get_tensor_name_map(self.arch, _count(config, "num_hidden_layers", where))
        self.tied = bool(config.get("tie_word_embeddings", False))
        self.where = where

    def name(self, key: str) -> str:
        name = self.names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise SurgeonError(
                f"{self.where}: {key!r} has no tensor in llama.cpp's {self.arch_name} layout (gguf-py's name map), so "
                "a "
                "GGUF LoRA cannot target it."
            )
        if name == "output.weight" and self.tied:
            raise SurgeonError(
                f"{self.where}: {key!r} targets the output head of a base with tied embeddings, which llama.cpp "
                "ignores; target the embedding instead."
            )
        return name

    def row_heads(self, key: str) -> int | None:
        if not self.permutes:
            return None
        if key.endswith("q_proj.weight"):
            return self.heads
        if key.endswith("k_proj.weight"):
            return self.kv_heads
        return None


def _to_numpy(tensor: torch.Tensor, gguf) -> tuple[np.ndarray, object]:
    if tensor.dtype == torch.bfloat16:
        raw = tensor.contiguous().view(torch.int16).numpy().view(np.uint16)
        return raw, gguf.GGMLQuantizationType.BF16
    if tensor.dtype not in (torch.float32, torch.float16):
        raise SurgeonError(
            f"cannot write GGUF: a LoRA factor has dtype {tensor.dtype}; llama.cpp takes f32, f16 or bf16."
        )
    return tensor.contiguous().numpy(), None


def _from_reader(tensor, gguf) -> torch.Tensor:
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims in ggml (reversed) order
    kind = gguf.GGMLQuantizationType(int(tensor.tensor_type))
    if kind == gguf.GGMLQuantizationType.BF16:
        raw = np.array(tensor.data).view(np.int16).reshape(shape)
        return torch.from_numpy(raw).view(torch.bfloat16)
    if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return torch.from_numpy(np.array(tensor.data).reshape(shape))
    raise SurgeonError(
        f"GGUF tensor {tensor.name!r} is {kind.name}; surgeon reads f32, f16 and bf16 LoRA factors (llama.cpp does "
        "too)."
    )


def write(adapter: Adapter, staging: Path, base=None) -> list[str]:
    """Write a llama.cpp LoRA adapter; per-module scales that one alpha cannot give are folded
    into lora_b, and the notes say so."""
    gguf = _gguf()
    layout = _Layout(base, "cannot write GGUF")
    picked = pick_targets(adapter, NAME, ("linear", "embedding"))
    targets = picked.targets
    alpha = most_common(t.delta.scale * t.delta.rank for t in targets)
    writer = gguf.GGUFWriter(str(staging), layout.arch_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    if adapter.base_model:
        writer.add_string(BASE_MODEL_KEY, adapter.base_model)
    for key, value in sorted(adapter.metadata.items()):
        if key != "format":
            writer.add_string(METADATA_PREFIX + key, value)
    folded, permuted = 0, 0
    for t in targets:
        name, delta = layout.name(t.key), t.delta
        factor = delta.scale * delta.rank / float(np.float32(alpha))
        factor = factor if differs(factor, 1.0) else 1.0
        folded += factor != 1.0
        if t.module_type == "embedding":
            lora_a, lora_b = delta.up, fold(delta.down, factor).T
        else:
            lora_a, lora_b = delta.down, fold(delta.up, factor)
            heads = layout.row_heads(t.key)
            if heads is not None:
                lora_b, permuted = permute_rows(lora_b, heads), permuted + 1
        for suffix, tensor in ((".lora_a", lora_a), (".lora_b", lora_b)):
            array, raw_dtype = _to_numpy(tensor, gguf)
            writer.add_tensor(name + suffix, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    notes = picked.notes
    if folded:
        notes.append(
            f"{folded} of {len(targets)} modules have a scale other than alpha/rank with alpha={float(alpha):g} "
            "(rsLoRA or per-module alphas); it is folded into their lora_b."
        )
    if permuted:
        notes.append(
            f"lora_b of {permuted} q_proj/k_proj modules permuted by rows, as llama.cpp permutes those weights for "
            f"{layout.arch_name}."
        )
    return notes


def _load(path: Path, gguf) -> tuple[dict, dict[str, torch.Tensor]]:
    """The file's metadata fields and tensors. gguf-py parses lazily, so a damaged string or
    tensor can fail anywhere in here, with ValueError, UnicodeDecodeError and others."""
    try:
        reader = gguf.GGUFReader(str(path))
        fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
        return fields, {tensor.name: _from_reader(tensor, gguf) for tensor in reader.tensors}
    except SurgeonError:
        raise
    except Exception as error:  # noqa: BLE001 - any parse failure of gguf-py means a damaged file
        raise SurgeonError(f"{path}: not a readable GGUF file ({type(error).__name__}: {error}).") from None


def read(path: Path, base=None) -> Adapter:
    """A llama.cpp LoRA adapter as canonical deltas keyed by the base's parameter names."""
    gguf = _gguf()
    path = Path(path)
    layout = _Layout(base, str(path))
    fields, tensors = _load(path, gguf)
    if fields.get("general.type") != "adapter" or fields.get("adapter.type") != "lora":
        raise SurgeonError(
            f"{path}: a GGUF file but not a LoRA adapter (general.type={fields.get('general.type')!r}, "
            f"adapter.type={fields.get('adapter.type')!r}); a full model is not an adapter."
        )
    if fields.get("general.architecture") != layout.arch_name:
        raise SurgeonError(
            f"{path}: the adapter is for {fields.get('general.architecture')!r} but the base is {layout.arch_name!r}."
        )
    alpha = fields.get("adapter.lora.alpha") or 0.0
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise SurgeonError(f"{path}: adapter.lora.alpha is {alpha!r}, not a finite number; the file is damaged.")
    keys = {
        layout.names.get_name(k, try_suffixes=(".weight", ".bias")): k for k in base.keys() if k.endswith(".weight")
    }
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        stem, _, suffix = name.rpartition(".")
        if suffix not in ("lora_a", "lora_b"):
            raise SurgeonError(
                f"{path}: tensor {name!r} is not a lora_a or lora_b; surgeon reads LoRA-only GGUF adapters."
            )
        pairs.setdefault(stem, {})[suffix] = tensor

    metadata = {k[len(METADATA_PREFIX) :]: str(v) for k, v in fields.items() if k.startswith(METADATA_PREFIX)}
    config = {k: v for k, v in fields.items() if k.startswith(("general.", "adapter.")) and not isinstance(v, list)}
    adapter = Adapter(source_format=NAME, base_model=fields.get(BASE_MODEL_KEY), config=config, metadata=metadata)
    for stem, pair in pairs.items():
        if stem not in keys:
            raise SurgeonError(
                f"{path}: tensor {stem!r} matches no parameter of the base model; the adapter was made for another "
                "model."
            )
        if len(pair) != 2:
            raise SurgeonError(f"{path}: {stem!r} has only one of lora_a and lora_b; the file is incomplete.")
        key, a, b = keys[stem], pair["lora_a"], pair["lora_b"]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] < 1:
            raise SurgeonError(
                f"{path}: {stem!r} has factors of shapes {tuple(a.shape)} and {tuple(b.shape)}, not matrices "
                "of a positive rank; the file is damaged."
            )
        rank = int(b.shape[1])
        scale = alpha / rank if alpha else 1.0
        if stem.startswith("token_embd."):
            adapter.add(key, LowRank(down=b.T.contiguous(), up=a, scale=scale), "embedding")
            continue
        heads = layout.row_heads(key)
        up = b if heads is None else unpermute_rows(b, heads)
        adapter.add(key, LowRank(down=a, up=up.contiguous(), scale=scale), "linear")
    return adapter
