"""GGUF LoRA adapters for llama.cpp (``--lora adapter.gguf``), as ``convert_lora_to_gguf.py`` writes them.

Metadata ``general.type = adapter``, ``general.architecture`` (the base's), ``adapter.type =
lora``, ``adapter.lora.alpha``. Tensors ``<gguf name>.lora_a`` / ``.lora_b``, named by gguf-py's
own map for the architecture (``blk.0.attn_q.weight.lora_a``), in PEFT's orientation (numpy
r×in and out×r) except ``token_embd``, whose lora_a is num_embeddings×r. llama.cpp scales each
pair by alpha/rank (rank read from lora_b), or by 1 when alpha is 0; so one alpha serves every
module whose PEFT scale is alpha/rank, and any other scale is folded into that module's lora_b.

What llama.cpp's converter does to each weight beyond renaming it (the Llama Q/K row
permutation, the fused-QKV reorderings of GPT-NeoX, BLOOM and Falcon, GPT-2's Conv1D transpose) is
applied to the factors too, so that ΔW in GGUF is the converter's transform of ΔW
(formats/gguf_names.py); without it attention would be silently wrong. The base's
``config.json`` gives the architecture, layer and head counts, so both reading and writing need
``--base``.

MoE experts: the converter stacks a layer's per-expert tensors into one ``ffn_{gate,up,down}_exps``
(experts × out × in; :func:`gguf_names.stacked_expert`), and ``convert_lora_to_gguf.py``'s
``LoraTorchTensor`` follows ``torch.stack`` by stacking A and B apart: lora_a is experts × r × in and
lora_b experts × out × r (numpy order), one r for all experts. llama.cpp's ``build_lora_mm_id``
(src/llama-graph.cpp) computes ``mul_mat_id(b, mul_mat_id(a, x, ids), ids)`` scaled by alpha / b->ne[0],
so ΔW[e] = alpha/r · lora_b[e] @ lora_a[e]; ``llama_adapter_lora_init_impl`` (src/llama-adapter.cpp) checks
only in, out and r, so every expert of the base is written (zero where the adapter has none). The router
(``ffn_gate_inp``) and a shared expert's gate are multiplied with ``build_lora_mm`` in ``build_moe_ffn``
and the model builders: plain 2-D LoRA.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from surgeon.delta import Adapter, LowRank
from surgeon.errors import SurgeonError, missing_extra
from surgeon.experts import ExpertLowRank, gather_experts
from surgeon.formats import gguf_names
from surgeon.formats.lora_only import Picked, differs, fold, most_common, pick_targets

NAME = "gguf"
METADATA_PREFIX = "surgeon.metadata."
BASE_MODEL_KEY = "surgeon.base_model"


def _gguf():
    try:
        import gguf
    except ImportError:
        raise SurgeonError(missing_extra("gguf", ["gguf"], "reading or writing GGUF")) from None
    return gguf


class _Layout:
    """What the base's config decides: the gguf architecture, the name map, and the converter's
    per-tensor transforms."""

    def __init__(self, base, where: str):
        if base is None:
            raise SurgeonError(
                f"{where}: GGUF needs the base model (surgeon convert --base BASE; surgeon merge BASE ...): tensor "
                "names and llama.cpp's row reorderings come from its config.json."
            )
        config = base.config()
        config = {**config, **config.get("text_config", {})}
        gguf = _gguf()
        arch, self.recipe = gguf_names.architecture(config, where)
        self.arch_name = gguf.MODEL_ARCH_NAMES[arch]
        self.counts = gguf_names.Counts(config, where)
        self.names = gguf.get_tensor_name_map(arch, self.counts(*gguf_names.LAYER_FIELDS))
        self.tied = bool(config.get("tie_word_embeddings", False))
        self.where = where
        self.experts = self._stacked(base.keys())

    def _stacked(self, keys) -> dict[str, tuple[str, int]]:
        """checkpoint key → (GGUF name, expert) for the per-expert tensors the converter stacks into ``*_exps``."""
        found = {}
        for key in keys:
            split = gguf_names.stacked_expert(key)
            kind = self.kind(split[0]) if split else None
            if kind is not None and kind[1] in gguf_names.EXPERTS:
                found[key] = (kind[0], split[1])
        return found

    def expert_keys(self, name: str) -> list[tuple[int, str]]:
        """(expert, checkpoint key) of every expert stacked into the GGUF tensor ``name``, in expert order."""
        return self._expert_keys.get(name, [])

    @functools.cached_property
    def _expert_keys(self) -> dict[str, list[tuple[int, str]]]:
        found: dict[str, list[tuple[int, str]]] = {}
        for key, (name, expert) in sorted(self.experts.items(), key=lambda item: item[1]):
            found.setdefault(name, []).append((expert, key))
        return found

    def kind(self, key: str) -> tuple[str, str] | None:
        """The GGUF name of a base parameter and its MODEL_TENSOR member name, as gguf-py maps it."""
        found = self.names.get_type_and_name(key, try_suffixes=(".weight", ".bias"))
        return None if found is None else (found[1], found[0].name)

    def name(self, key: str) -> tuple[str, str]:
        """The GGUF name and tensor kind a LoRA on ``key`` is written under, or the refusal why none is."""
        found = self.kind(key)
        if found is None:
            raise SurgeonError(
                f"{self.where}: {key!r} has no tensor in llama.cpp's {self.arch_name} layout (gguf-py's name map), "
                "so a GGUF LoRA cannot target it."
            )
        name, kind = found
        if name == "output.weight" and self.tied:
            raise SurgeonError(
                f"{self.where}: {key!r} targets the output head of a base with tied embeddings, which llama.cpp "
                "ignores; target the embedding instead."
            )
        if kind in gguf_names.EXPERTS:
            raise SurgeonError(
                f"{self.where}: {key!r} is llama.cpp's {self.arch_name} {name!r} (stacked experts), which surgeon "
                "writes only from the base's per-expert tensors (experts.N...), as llama.cpp's converter stacks them; "
                "merge it into the base instead (surgeon merge)."
            )
        if kind in self.recipe.ignored:
            raise SurgeonError(
                f"{self.where}: {key!r} is llama.cpp's {self.arch_name} {name!r} (multiplied without adapters by "
                "llama.cpp), where llama.cpp would not apply a GGUF LoRA; leave it out of the adapter or merge it "
                "into the base (surgeon merge)."
            )
        return name, kind

    def rows(self, kind: str, rows: int, key: str) -> torch.Tensor | None:
        """The converter's row order for the weight (GGUF row i is row order[i] of ``key``), or None."""
        return gguf_names.row_order(self.recipe, kind, rows, self.counts, repr(key))

    def transposed(self, kind: str, module_type: str, key: str) -> bool:
        """Whether the checkpoint stores ``key`` in×out (GPT-2's Conv1D) where GGUF stores out×in."""
        transposed = kind in self.recipe.transposed
        if transposed != (module_type == "conv1d"):
            raise SurgeonError(
                f"{self.where}: {key!r} is a {module_type} LoRA, but llama.cpp's converter "
                f"{'transposes' if transposed else 'keeps'} that {self.arch_name} weight; the adapter was made for "
                "another model."
            )
        return transposed


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


@dataclass(frozen=True)
class _Pair:
    """One GGUF lora_a/lora_b pair before the runtime scale is settled: ``scale`` is the delta's own,
    and llama.cpp's rank is lora_b's last numpy axis (``b->ne[0]``)."""

    name: str
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    reordered: bool = False

    @property
    def rank(self) -> int:
        return int(self.b.shape[-1])


def _pair(layout: _Layout, target) -> _Pair:
    """A 2-D target as llama.cpp computes it: ΔW = lora_b @ lora_a in its own layout (out×in), and
    ``get_rows(lora_a)`` then lora_b for the token embedding."""
    name, kind = layout.name(target.key)
    delta = target.delta
    if target.module_type == "embedding":
        return _Pair(name, delta.up, delta.down.T, delta.scale)
    if layout.transposed(kind, target.module_type, target.key):  # ΔW stored in×out: (up @ down)ᵀ
        return _Pair(name, delta.up.T, delta.down.T, delta.scale)
    order = layout.rows(kind, delta.up.shape[0], target.key)
    return _Pair(name, delta.down, delta.up if order is None else delta.up[order], delta.scale, order is not None)


def _pairs(layout: _Layout, adapter: Adapter) -> tuple[list[_Pair], list[str]]:
    """Every pair the adapter becomes, and the notes on fitting it: per-expert deltas stacked as the
    converter stacks their tensors (lora_a experts×r×in, lora_b experts×out×r), the rest one pair each."""
    experts, rest = gather_experts(adapter, layout.experts, "cannot write GGUF")
    if rest.deltas or not experts:
        picked = pick_targets(rest, NAME, ("linear", "conv1d", "embedding"))
    else:
        picked = Picked([], [], [])
    pairs = [_pair(layout, t) for t in picked.targets]
    pairs += [_Pair(name, delta.down, delta.up, delta.scale) for name, delta in sorted(experts.items())]
    return pairs, picked.notes


def write(adapter: Adapter, staging: Path, base=None) -> list[str]:
    """Write a llama.cpp LoRA adapter; per-module scales that one alpha cannot give are folded
    into lora_b, and the notes say so."""
    gguf = _gguf()
    layout = _Layout(base, "cannot write GGUF")
    pairs, notes = _pairs(layout, adapter)
    alpha = most_common(p.scale * p.rank for p in pairs)
    writer = gguf.GGUFWriter(str(staging), layout.arch_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    if adapter.base_model:
        writer.add_string(BASE_MODEL_KEY, adapter.base_model)
    for key, value in sorted(adapter.metadata.items()):
        if key != "format":
            writer.add_string(METADATA_PREFIX + key, value)
    folded = 0
    for pair in pairs:
        factor = pair.scale * pair.rank / float(np.float32(alpha))
        factor = factor if differs(factor, 1.0) else 1.0
        folded += factor != 1.0
        for suffix, tensor in ((".lora_a", pair.a), (".lora_b", fold(pair.b, factor))):
            array, raw_dtype = _to_numpy(tensor, gguf)
            writer.add_tensor(pair.name + suffix, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    if folded:
        notes.append(
            f"{folded} of {len(pairs)} modules have a scale other than alpha/rank with alpha={float(alpha):g} "
            "(rsLoRA or per-module alphas); it is folded into their lora_b."
        )
    reordered = sum(p.reordered for p in pairs)
    if reordered:
        notes.append(
            f"lora_b of {reordered} modules reordered by rows, as llama.cpp's converter reorders those "
            f"{layout.arch_name} weights (rotary or fused QKV layout)."
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


def _delta(layout: _Layout, key: str, a: torch.Tensor, b: torch.Tensor, scale: float) -> tuple[LowRank, str]:
    """The canonical delta and module type of one GGUF pair: :func:`_factors` undone."""
    name, kind = layout.name(key)
    if name.startswith("token_embd."):
        return LowRank(down=b.T.contiguous(), up=a, scale=scale), "embedding"
    order = layout.rows(kind, b.shape[0], key)
    b = b if order is None else b[torch.argsort(order)]
    if kind in layout.recipe.transposed:
        return LowRank(down=b.T.contiguous(), up=a.T.contiguous(), scale=scale), "conv1d"
    return LowRank(down=a, up=b.contiguous(), scale=scale), "linear"


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
    keys = {layout.kind(k)[0]: k for k in base.keys() if k.endswith(".weight") and layout.kind(k)}
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
        experts = layout.expert_keys(stem)
        if stem not in keys and not experts:
            raise SurgeonError(
                f"{path}: tensor {stem!r} matches no parameter of the base model; the adapter was made for another "
                "model."
            )
        if len(pair) != 2:
            raise SurgeonError(f"{path}: {stem!r} has only one of lora_a and lora_b; the file is incomplete.")
        a, b = pair["lora_a"], pair["lora_b"]
        if experts:
            _read_experts(adapter, experts, stem, a, b, alpha, path)
            continue
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] < 1:
            raise SurgeonError(
                f"{path}: {stem!r} has factors of shapes {tuple(a.shape)} and {tuple(b.shape)}, not matrices "
                "of a positive rank; the file is damaged."
            )
        key = keys[stem]
        adapter.add(key, *_delta(layout, key, a, b, _scale(alpha, b)))
    return adapter


def _scale(alpha: float, b: torch.Tensor) -> float:
    """llama.cpp's runtime scale: alpha / rank (lora_b's last numpy axis, ``b->ne[0]``), or 1 without alpha."""
    return alpha / int(b.shape[-1]) if alpha else 1.0


def _read_experts(adapter: Adapter, experts: list[tuple[int, str]], stem: str, a, b, alpha: float, path: Path) -> None:
    """A stacked ``*_exps`` pair as each expert's delta on its own checkpoint tensor (``experts``: (expert,
    key) in order), the converter's stacking undone."""
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != len(experts) or b.shape[0] != len(experts) or b.shape[2] < 1:
        raise SurgeonError(
            f"{path}: {stem!r} has factors of shapes {tuple(a.shape)} and {tuple(b.shape)}, not {len(experts)} "
            "experts' stacked factors of a positive rank (experts×r×in and experts×out×r); the file is damaged."
        )
    if a.shape[1] != b.shape[2]:
        raise SurgeonError(
            f"{path}: {stem!r} has lora_a of rank {a.shape[1]} but lora_b of rank {b.shape[2]}; the file is damaged."
        )
    delta = ExpertLowRank(down=a.contiguous(), up=b.contiguous(), scale=_scale(alpha, b))
    for expert, key in experts:
        adapter.add(key, delta.expert_rows(expert, 0, delta.shape[1]), "MoE expert")
