"""Checkpoint keys ↔ the parameter names of the model mlx-lm builds from them.

mlx-lm has its own model definitions, and each renames the checkpoint's tensors on load in its
``sanitize``: GPT-NeoX's ``gpt_neox.layers.0.attention.dense`` is ``model.h.0.attention.dense`` there,
GPT-J's ``transformer.h.0`` is ``model.h.0``, Qwen2.5-VL's ``model.layers.0`` is
``language_model.model.layers.0``, and GPT-2's ``Conv1D`` weights are transposed into Linears. An
mlx-lm adapter names modules by mlx-lm's names. This module is the one place that translates, with
mlx-lm's own definitions, never a copied table: the model is built from ``config.json`` the way
``mlx_lm.utils.load_model`` builds it (mlx arrays are lazy, so nothing is allocated), and its
``sanitize`` is run on stand-ins for the checkpoint's tensors. A stand-in that comes out as it went in,
under a new name, is a rename; one that comes out transposed (checked value by value) is a transposed
rename; one that is dropped, cut, stacked or computed on has no mlx-lm module of its own, and a delta
on it is refused. Every written adapter is then loaded by mlx-lm's ``load_adapters`` on a fresh model
before it is published (:func:`check_loads`).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from surgeon.errors import SurgeonError

# A stand-in that sanitize changed is compared with its source value by value, which materialises
# it: above this many elements (a large embedding) it is counted as changed without looking.
_LARGEST_COMPARED = 1 << 26


@dataclass(frozen=True)
class MlxNames:
    """Both directions between a checkpoint's keys and the parameters of mlx-lm's model for it."""

    model_type: str
    to_mlx: dict[str, str]  # checkpoint key → the mlx-lm parameter it is loaded into, as it is or transposed
    transposed: frozenset[str]  # those checkpoint keys mlx-lm transposes on load (GPT-2's Conv1D)
    embeddings: frozenset[str]  # mlx-lm module paths that are embeddings
    blocks: str | None  # the mlx-lm path of the repeated blocks LoRA wraps ("model.layers", "model.h")
    num_blocks: int

    @functools.cached_property
    def to_checkpoint(self) -> dict[str, str]:
        return {name: key for key, name in self.to_mlx.items()}

    def mlx_module(self, key: str, where: str) -> str:
        """The mlx-lm module path for the weight at checkpoint key ``key``."""
        name = self.to_mlx.get(key)
        if name is None or not name.endswith(".weight"):
            raise SurgeonError(
                f"{where}: mlx-lm's {self.model_type} model drops, copies or transforms {key!r} on load, so a delta on "
                "it has no mlx-lm module to go to; merge it into the base (surgeon merge) instead."
            )
        return name.removesuffix(".weight")

    def checkpoint_key(self, module: str, where: str) -> str:
        """The checkpoint key of the weight of mlx-lm module ``module``."""
        key = self.to_checkpoint.get(f"{module}.weight")
        if key is None:
            raise SurgeonError(
                f"{where}: {module!r} is no module of mlx-lm's {self.model_type} model built from the base "
                "checkpoint's config.json; the adapter does not belong to this base."
            )
        return key


def mlx_names(base) -> MlxNames | None:
    """The translation for ``base`` (a :class:`surgeon.checkpoint.Checkpoint`), or None where mlx-lm is
    not installed or the base has no ``config.json`` naming a ``model_type`` (then names are not
    translated, and the writer says so). Raises where mlx-lm does not have or cannot build the model."""
    config = base.config() if base is not None else {}
    if "model_type" not in config or not _mlx_lm_installed():
        return None
    return _names(json.dumps(config, sort_keys=True), _shapes(base), str(base.directory / "config.json"))


def _shapes(base) -> tuple:
    return tuple((key, tuple(base.info(key).shape)) for key in base.keys())


def _mlx_lm_installed() -> bool:
    try:
        import mlx_lm.utils  # noqa: F401
    except ImportError:  # not installed, or no mlx for this platform
        return False
    return True


def _build_model(config: dict, where: str):
    """mlx-lm's model for ``config``, as ``mlx_lm.utils.load_model`` builds it (weights not loaded)."""
    from mlx_lm.utils import _get_classes  # the lookup load_model itself uses (model_type → module)

    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said):  # some definitions print why they cannot be imported
            model_class, args_class = _get_classes(config=config)
    except ValueError:
        raise SurgeonError(
            f"{where}: mlx-lm has no model for model_type {config['model_type']!r}, so it cannot load an adapter for "
            "this base."
        ) from None
    except (ImportError, SystemExit) as error:  # mlx-lm's olmo exits when ai2-olmo is missing
        why = " ".join(said.getvalue().split()) or str(error)
        raise SurgeonError(f"{where}: mlx-lm's {config['model_type']} model cannot be imported ({why}).") from None
    try:
        return model_class(args_class.from_dict(config))
    except (TypeError, KeyError, ValueError, AttributeError) as error:
        raise SurgeonError(
            f"{where}: mlx-lm cannot build its {config['model_type']} model from this config ({error}), so it cannot "
            "load this base or an adapter for it."
        ) from None


def _sanitized(config: dict, shapes: tuple, where: str):
    """mlx-lm's model for ``config``, stand-ins for the checkpoint's tensors, and what the model's
    ``sanitize`` makes of them (as ``load_model`` runs it, which may also settle the model's modules)."""
    model = _build_model(config, where)
    stand_ins = {key: _stand_in(i, shape) for i, (key, shape) in enumerate(shapes)}
    if not hasattr(model, "sanitize"):
        return model, stand_ins, dict(stand_ins)
    try:
        return model, stand_ins, model.sanitize(dict(stand_ins))
    except Exception as error:  # a definition that computes on its weights in a way stand-ins cannot follow
        raise SurgeonError(
            f"{where}: mlx-lm's {config['model_type']} model could not be traced renaming the checkpoint's tensors "
            f"({type(error).__name__}: {error}), so surgeon cannot tell which mlx-lm module each belongs to."
        ) from None


@functools.lru_cache(maxsize=8)
def _names(config_text: str, shapes: tuple, where: str) -> MlxNames:
    from mlx.utils import tree_flatten

    config = json.loads(config_text)
    model, stand_ins, sanitized = _sanitized(config, shapes, where)
    parameters = dict(tree_flatten(model.parameters()))
    by_id = {id(stand_in): key for key, stand_in in stand_ins.items()}
    sources = {name: _source(value, by_id, stand_ins, shapes) for name, value in sanitized.items()}
    found = {name: source for name, source in sources.items() if source is not None and name in parameters}
    uses = Counter(key for key, _ in found.values())
    to_mlx = {key: name for name, (key, _) in found.items() if uses[key] == 1}
    return MlxNames(
        model_type=config["model_type"],
        to_mlx=to_mlx,
        transposed=frozenset(key for key, flipped in found.values() if flipped and key in to_mlx),
        embeddings=frozenset(_embeddings(model)),
        blocks=_blocks(model),
        num_blocks=len(getattr(model, "layers", None) or []),
    )


def _stand_in(index: int, shape: tuple[int, ...]):
    """A lazy int64 tensor whose every element says which key it stands for and where it sits:
    ``index`` in the high 32 bits, the element's flat position in the low ones."""
    import mlx.core as mx

    if len(shape) != 2:
        return mx.zeros(shape, dtype=mx.int64)
    rows, columns = shape
    positions = mx.arange(rows, dtype=mx.int64)[:, None] * columns + mx.arange(columns, dtype=mx.int64)[None, :]
    return positions + (index << 32)


def _source(value, by_id: dict, stand_ins: dict, shapes: tuple) -> tuple[str, bool] | None:
    """(the checkpoint key ``value`` is, whether transposed) for a tensor sanitize returned, or None
    where it is no one stand-in as it was or transposed."""
    if id(value) in by_id and stand_ins[by_id[id(value)]] is value:
        return by_id[id(value)], False
    if value.ndim != 2 or value.size > _LARGEST_COMPARED or value.size == 0:
        return None
    index = int(value[0, 0].item()) >> 32
    if not 0 <= index < len(shapes) or len(shapes[index][1]) != 2:
        return None
    import mlx.core as mx

    key = shapes[index][0]
    source = stand_ins[key]
    if value.shape == source.shape and bool(mx.array_equal(value, source)):
        return key, False
    if value.shape == source.shape[::-1] and bool(mx.array_equal(value, source.T)):
        return key, True
    return None


def _blocks(model) -> str | None:
    """The path of the blocks ``linear_to_lora_layers`` wraps (``model.layers``) in mlx-lm's model."""
    layers = getattr(model, "layers", None) or []
    path = next((name for name, module in model.named_modules() if layers and module is layers[0]), None)
    return path.removesuffix(".0") if path is not None and path.endswith(".0") else None


def _embeddings(model) -> list[str]:
    import mlx.nn as nn

    return [name for name, module in model.named_modules() if isinstance(module, (nn.Embedding, nn.QuantizedEmbedding))]


def check_loads(staging: Path, base, where: str) -> None:
    """Load the adapter written at ``staging`` with mlx-lm's ``load_adapters`` into its model for
    ``base``: what mlx-lm refuses (a name it has no LoRA layer for, a shape that does not fit) is
    refused here, before anything is published."""
    from mlx_lm.tuner.utils import load_adapters

    model, _, _ = _sanitized(base.config(), _shapes(base), where)
    try:
        load_adapters(model, str(staging))
    except ValueError as error:
        first = str(error).splitlines()[1:2] or [str(error)]
        raise SurgeonError(
            f"{where}: mlx-lm would not load the written adapter ({first[0].strip()}); nothing was written."
        ) from None
