"""diffusers LoRA files: one ``.safetensors`` (``pytorch_lora_weights.safetensors``) whose keys
start with the pipeline component they patch (``unet.``, ``transformer.``, ``text_encoder.``,
``text_encoder_2.``, ``text_encoder_3.``).

Read, in every layout diffusers has saved (``utils/state_dict_utils.py``):

- PEFT: ``<component>.<module>.lora_A.weight`` (r×in) / ``.lora_B.weight`` (out×r), optional
  ``lora_B.bias`` and ``lora_magnitude_vector`` (DoRA); the per-component PEFT config in the
  header's ``lora_adapter_metadata`` (``"unet.r"``, ``"unet.lora_alpha"``, patterns) gives
  the scale; without it, alpha = r (scale 1), as diffusers loads it;
- the older ``….lora.down.weight`` / ``.lora.up.weight`` and ``.lora_linear_layer.down/up``;
- the oldest attention-processor layout ``….processor.to_q_lora.down.weight`` (``to_out_lora``
  is ``to_out.0`` in a U-Net, ``out_proj`` in a text encoder, as diffusers maps them);
- ``<component>.<module>.alpha`` network alphas, scale alpha/r.

Written in the PEFT layout with ``lora_adapter_metadata``, which diffusers' ``load_lora_weights``
reads back with the same per-module ranks and alphas. Canonical keys keep the component prefix
(``unet.down_blocks.0….to_q.weight``); merging into one component's checkpoint drops it.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from surgeon.checkpoint import load_pickle_weights, read_safetensors
from surgeon.delta import Adapter
from surgeon.errors import SurgeonError
from surgeon.formats import kohya_names
from surgeon.formats.adapter_config import check_peft
from surgeon.formats.layouts import DIFFUSERS_COMPONENTS as COMPONENTS
from surgeon.formats.layouts import DIFFUSERS_WEIGHTS as WEIGHT_FILES
from surgeon.formats.layouts import diffusers_file as weight_file
from surgeon.formats.lora_only import metadata_note, pick_targets
from surgeon.formats.peft import check_part, peft_factors, rank_alpha_config, read_module

NAME = "diffusers"
METADATA_KEY = "lora_adapter_metadata"

_PART = re.compile(
    r"^(?P<module>.+?)\.(?:(?P<peft>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector(?:\.weight)?)"
    r"|(?:lora|lora_linear_layer)\.(?P<new>down|up)\.weight|(?P<alpha>alpha))$"
)
_OLD = re.compile(r"^(?P<parent>.+?)(?:\.processor)?\.to_(?P<proj>q|k|v|out)_lora\.(?P<side>down|up)\.weight$")
_OLD_MODULES = {
    False: {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"},
    True: {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"},
}
_SIDES = {"down": "lora_A", "up": "lora_B"}


def _load(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if file.suffix == ".bin":
        return load_pickle_weights(file), {}
    return read_safetensors(file)


def _component_configs(metadata: dict[str, str], file: Path) -> dict[str, dict]:
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError as error:
        raise SurgeonError(f"{file}: the {METADATA_KEY} header entry is not JSON ({error}).") from None
    if not isinstance(packed, dict):
        raise SurgeonError(f"{file}: the {METADATA_KEY} header entry is not a JSON object; the file is damaged.")
    configs: dict[str, dict] = defaultdict(dict)
    for key, value in packed.items():
        component, _, field = key.partition(".")
        configs[component][field] = value
    for config in configs.values():
        check_peft({**config, "peft_type": "LORA"}, file)
    return configs


def _normalise(component: str, rest: str, file: Path) -> tuple[str, str]:
    """(module path inside the component, part name in PEFT's terms) of one tensor name."""
    old = _OLD.match(rest)
    if old:
        projection = _OLD_MODULES[component.startswith("text_encoder")][old["proj"]]
        return f"{old['parent']}.{projection}", _SIDES[old["side"]]
    match = _PART.match(rest)
    if match is None:
        raise SurgeonError(
            f"{file}: tensor '{component}.{rest}' is not a LoRA part surgeon knows in diffusers files; refusing rather "
            "than dropping it."
        )
    if match["peft"]:
        part = match["peft"]
        part = "lora_magnitude_vector" if part.startswith("lora_magnitude_vector") else part.replace(".weight", "")
        return match["module"], part
    return match["module"], _SIDES[match["new"]] if match["new"] else "alpha"


def read(path: Path, base=None) -> Adapter:
    """A diffusers LoRA file as canonical deltas keyed ``<component>.<module>.weight``."""
    path = Path(path)
    file = weight_file(path)
    if file is None:
        raise SurgeonError(f"{path}: no {' or '.join(WEIGHT_FILES)} here.")
    tensors, metadata = _load(file)
    configs = _component_configs(metadata, file)
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        if component not in COMPONENTS or not rest:
            raise SurgeonError(
                f"{file}: tensor {key!r} does not start with a pipeline component ({', '.join(COMPONENTS)}); the file "
                "is not a diffusers LoRA."
            )
        module, part = _normalise(component, rest, file)
        if part == "alpha" and tensor.numel() != 1:
            raise SurgeonError(
                f"{file}: tensor {key!r} has shape {tuple(tensor.shape)} instead of one number; the file is damaged."
            )
        if part != "alpha":
            check_part(file, key, tensor, 1 if part in ("lora_magnitude_vector", "lora_B.bias") else 2)
        modules[f"{component}.{module}"][part] = tensor

    adapter = Adapter(source_format=NAME, metadata=metadata, config={"components": configs})
    for module, parts in modules.items():
        component, local = module.split(".", 1)
        if "lora_A" not in parts:
            raise SurgeonError(f"{file}: module {module!r} has no down (lora_A) factor; the file is incomplete.")
        rank = int(parts["lora_A"].shape[0])
        if "alpha" in parts:
            config = {"r": rank, "lora_alpha": float(parts.pop("alpha"))}
        elif component in configs:
            config = configs[component]
        else:
            config = {"r": rank, "lora_alpha": rank}
        read_module(adapter, module, parts, config, bool(config.get("use_rslora", False)), False, file)
    return adapter


def write(adapter: Adapter, staging: Path) -> list[str]:
    """Write ``adapter`` as a diffusers LoRA file in the PEFT layout, with each component's
    ranks and alphas in ``lora_adapter_metadata`` so that diffusers applies the same scales."""
    picked = pick_targets(adapter, NAME, ("linear", "conv"), allow_dora=True)
    targets = picked.targets
    where = kohya_names.components(adapter, [t.module for t in targets])
    tensors: dict[str, torch.Tensor] = {}
    per_component: dict[str, dict[str, list]] = defaultdict(lambda: {"ranks": {}, "scales": {}, "dora": False})
    for target in targets:
        component, local = where[target.module]
        component = component or "unet"
        for part, tensor in peft_factors(target.key, target.delta, target.module_type).items():
            tensors[f"{component}.{local}.{part}"] = tensor.contiguous()
        if target.delta.magnitude is not None:
            tensors[f"{component}.{local}.lora_magnitude_vector"] = target.delta.magnitude.contiguous()
        entry = per_component[component]
        entry["ranks"][local], entry["scales"][local] = target.delta.rank, target.delta.scale
        entry["dora"] = entry["dora"] or target.delta.magnitude is not None
    packed = {}
    for component, entry in per_component.items():
        config = rank_alpha_config(entry["ranks"], entry["scales"], False)
        config.update(target_modules=sorted(entry["ranks"]), use_dora=entry["dora"], lora_bias=False)
        packed.update({f"{component}.{k}": v for k, v in config.items()})
    save_file(tensors, staging, metadata={"format": "pt", METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)})
    return picked.notes + metadata_note(adapter, "a diffusers file (it keeps only the LoRA config)", {METADATA_KEY})
