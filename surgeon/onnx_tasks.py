"""What export-onnx exports for each task: the graphs, their inputs built from config.json, and how
onnxruntime runs them one after another so that the result compares with the model's own forward pass.

Graphs, names and files follow what optimum (``optimum-cli export onnx``) writes and what its
onnxruntime classes load, so that a user of either finds what they expect:

- text, vision and CLIP-like models: one graph. CLIP's takes ``input_ids``, ``attention_mask`` and
  ``pixel_values`` and returns ``logits_per_image``, ``logits_per_text``, ``text_embeds``,
  ``image_embeds`` (optimum's ``zero-shot-image-classification``).
- encoder-decoder models (T5, BART, Whisper): ``encoder_model.onnx`` (``input_ids`` and
  ``attention_mask``, or Whisper's ``input_features`` -> ``last_hidden_state``) and
  ``decoder_model.onnx`` (``input_ids``, ``encoder_attention_mask`` where the encoder takes a mask,
  ``encoder_hidden_states`` -> ``logits``), without KV cache, in one folder.

Which models a task takes is read from transformers' auto mappings (model type -> class), never a
hand list; the inputs' shapes come from the config (vocabulary, image size and channels, mel bins,
source positions).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from surgeon.errors import SurgeonError


def _call_model(model: torch.nn.Module, **inputs: torch.Tensor):
    return model(**inputs, return_dict=True)


def _call_encoder(model: torch.nn.Module, **inputs: torch.Tensor):
    return model.get_encoder()(**inputs, return_dict=True)


def _call_decoder(model: torch.nn.Module, encoder_hidden_states: torch.Tensor, **inputs: torch.Tensor):
    """The decoder given the encoder's states. Its mask of ones says what no mask says, and keeps
    transformers from checking the positions for packed sequences (``aten::diff``, which neither
    exporter converts)."""
    ones = torch.ones_like(inputs["decoder_input_ids"])
    return model(encoder_outputs=(encoder_hidden_states,), decoder_attention_mask=ones, **inputs, return_dict=True)


@dataclass(frozen=True)
class Graph:
    """One ONNX graph: the model call it traces; its inputs as (graph input name, keyword of the call,
    the value it is fed from: an input of the task or an output of an earlier graph); its outputs."""

    file: str  # within the output folder; "" for a task's only graph, which is the output itself
    call: Callable
    inputs: tuple[tuple[str, str, str], ...]
    outputs: tuple[str, ...]


def _same(*names: str) -> tuple[tuple[str, str, str], ...]:
    return tuple((name, name, name) for name in names)


def _encoder(*names: str) -> Graph:
    return Graph("encoder_model.onnx", _call_encoder, _same(*names), ("last_hidden_state",))


def _decoder(masked: bool) -> Graph:
    inputs = [("input_ids", "decoder_input_ids", "decoder_input_ids")]
    inputs += [("encoder_attention_mask", "attention_mask", "attention_mask")] if masked else []
    inputs += [("encoder_hidden_states", "encoder_hidden_states", "last_hidden_state")]
    return Graph("decoder_model.onnx", _call_decoder, tuple(inputs), ("logits",))


def _one(inputs: tuple[str, ...], outputs: tuple[str, ...]) -> Graph:
    return Graph("", _call_model, _same(*inputs), outputs)


# --- inputs built from the config ----------------------------------------------------------------


def _section(config: dict, name: str) -> dict:
    """A sub-config (CLIP's ``text_config``), or the config itself where the model has none."""
    return config.get(name) or config


def _ids(config: dict, axis: str, batch: int, sequence: int, generator) -> torch.Tensor:
    """Random ids below the vocabulary size, no longer than the position table of ``axis`` allows."""
    vocab = int(_section(config, "text_config").get("vocab_size") or 2)
    limit = dimension_limit(config, axis)
    return torch.randint(0, vocab, (batch, min(sequence, limit) if limit else sequence), generator=generator)


def _tokens(config: dict, batch: int, sequence: int, padded: str | None, generator) -> dict:
    """Token ids and a mask whose last row is padded half-way on ``padded``'s side."""
    ids = _ids(config, "sequence", batch, sequence, generator)
    mask = torch.ones_like(ids)
    half = ids.shape[1] // 2
    if padded == "right":
        mask[-1, half:] = 0
    elif padded == "left":
        mask[-1, :half] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _decoder_ids(config: dict, batch: int, sequence: int, generator) -> dict:
    """Decoder ids, causal and never padded, not as long as the encoder's: a graph that confused the
    two axes would fail verification."""
    return {"decoder_input_ids": _ids(config, "decoder_sequence", batch, max(2, sequence - 3), generator)}


def _pixels(config: dict, batch: int, generator) -> dict:
    size = config["image_size"]
    height, width = (size, size) if isinstance(size, int) else size
    shape = (batch, int(config.get("num_channels") or 3), int(height), int(width))
    return {"pixel_values": torch.randn(shape, generator=generator)}


def image_inputs(config: dict, batch: int, sequence: int, padded: str | None, generator) -> dict:
    return _pixels(config, batch, generator)


def _ended(texts: dict, config: dict) -> dict:
    """Each row's last real token made the end-of-text token that CLIP-like models pool at, padding
    after it, as their tokenizers write texts: a pooled padding position computes nothing defined."""
    ids, mask = texts["input_ids"], texts["attention_mask"]
    vocab, eos = int(config["vocab_size"]), config.get("eos_token_id")
    if eos == 2:  # CLIP's configs before transformers#24773 pool at the highest id instead
        ids, eos = ids % (vocab - 1), vocab - 1
    if isinstance(eos, int) and 0 <= eos < vocab:
        ids[torch.arange(ids.shape[0]), mask.sum(-1) - 1] = eos
    return {"input_ids": ids, "attention_mask": mask}


def image_text_inputs(config: dict, batch: int, sequence: int, padded: str | None, generator) -> dict:
    """Texts padded on the right, ended as a tokenizer ends them; one image more than texts:
    logits_per_image is images x texts, and a graph that mixed the two batch axes up would fail."""
    texts = _tokens(config, batch, sequence, padded and "right", generator)
    return {**_ended(texts, config["text_config"]), **_pixels(config["vision_config"], batch + 1, generator)}


def seq2seq_inputs(config: dict, batch: int, sequence: int, padded: str | None, generator) -> dict:
    return {**_tokens(config, batch, sequence, padded, generator), **_decoder_ids(config, batch, sequence, generator)}


def speech_inputs(config: dict, batch: int, sequence: int, padded: str | None, generator) -> dict:
    """Log-mel features of the one length the encoder takes (twice its source positions: one
    stride-2 convolution), and decoder ids."""
    frames = 2 * int(config["max_source_positions"])
    features = torch.randn((batch, int(config["num_mel_bins"]), frames), generator=generator)
    return {"input_features": features, **_decoder_ids(config, batch, sequence, generator)}


# --- the tasks -------------------------------------------------------------------------------------

_TEXT = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
_DECODER = {"decoder_input_ids": {0: "batch", 1: "decoder_sequence"}, "logits": {0: "batch", 1: "decoder_sequence"}}


@dataclass(frozen=True)
class Task:
    """An export-onnx task: the transformers auto class that builds the model; which models it takes
    (``modality``, see :func:`modality`); its graphs; the outputs compared with the model's forward
    pass, at unmasked positions only where ``masked``; the dynamic axes of every value by name."""

    name: str
    auto_class: str
    modality: str
    inputs: Callable[..., dict]
    graphs: tuple[Graph, ...]
    compared: tuple[str, ...]
    axes: dict[str, dict[int, str]]
    masked: bool = False
    needs: tuple[str, ...] = ()  # config fields the inputs are built from

    @property
    def folder(self) -> bool:
        """Whether the output is a folder of graphs rather than one ``.onnx`` file."""
        return len(self.graphs) > 1


def _text_task(name: str, auto_class: str, output: str) -> Task:
    axes = {**_TEXT, output: {0: "batch", 1: "sequence"}}
    graph = _one(("input_ids", "attention_mask"), (output,))
    return Task(name, auto_class, "text", _tokens, (graph,), (output,), axes, masked=True)


def _image_task(name: str, auto_class: str, output: str) -> Task:
    graph = _one(("pixel_values",), (output,))
    values = {"pixel_values": {0: "batch"}, output: {0: "batch"}}
    return Task(name, auto_class, "image", image_inputs, (graph,), (output,), values, needs=("image_size",))


_CLIP_OUTPUTS = ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds")
_CLIP_AXES = {
    **_TEXT,
    "pixel_values": {0: "image_batch"},
    "logits_per_image": {0: "image_batch", 1: "batch"},
    "logits_per_text": {0: "batch", 1: "image_batch"},
    "text_embeds": {0: "batch"},
    "image_embeds": {0: "image_batch"},
}
_SEQ2SEQ_AXES = {**_TEXT, **_DECODER, "last_hidden_state": {0: "batch", 1: "sequence"}}
_SPEECH_AXES = {"input_features": {0: "batch"}, **_DECODER, "last_hidden_state": {0: "batch"}}

TASKS = {
    task.name: task
    for task in (
        _text_task("causal-lm", "AutoModelForCausalLM", "logits"),
        _text_task("masked-lm", "AutoModelForMaskedLM", "logits"),
        _text_task("sequence-classification", "AutoModelForSequenceClassification", "logits"),
        _text_task("feature-extraction", "AutoModel", "last_hidden_state"),
        _image_task("image-classification", "AutoModelForImageClassification", "logits"),
        _image_task("image-feature-extraction", "AutoModel", "last_hidden_state"),
        Task(
            "zero-shot-image-classification",
            "AutoModelForZeroShotImageClassification",
            "image-text",
            image_text_inputs,
            (_one(("input_ids", "attention_mask", "pixel_values"), _CLIP_OUTPUTS),),
            _CLIP_OUTPUTS,
            _CLIP_AXES,
        ),
        Task(
            "text2text-generation",
            "AutoModelForSeq2SeqLM",
            "seq2seq",
            seq2seq_inputs,
            (_encoder("input_ids", "attention_mask"), _decoder(masked=True)),
            ("logits",),
            _SEQ2SEQ_AXES,
            needs=("vocab_size",),
        ),
        Task(
            "automatic-speech-recognition",
            "AutoModelForSpeechSeq2Seq",
            "speech",
            speech_inputs,
            (_encoder("input_features"), _decoder(masked=False)),
            ("logits",),
            _SPEECH_AXES,
            needs=("num_mel_bins", "max_source_positions", "vocab_size"),
        ),
    )
}

# modality -> (what the models are called in a refusal, examples of those the tasks take)
_MODALITIES = {
    "text": ("a text model", "text models"),
    "image": ("a vision model", "ViT, DeiT, Dinov2, Swin, ..."),
    "image-text": ("a vision-language model", "CLIP, SigLIP, ..."),
    "seq2seq": ("an encoder-decoder model", "T5, BART, ..."),
    "speech": ("a speech encoder-decoder model", "Whisper"),
    "audio": ("an audio model", ""),
    "other": ("a model whose inputs no export-onnx task builds", ""),
}


def modality(config: dict) -> str:
    """What a model's graphs take, from config.json and transformers' tables of vision and audio models:
    decides which tasks can build its inputs."""
    from transformers.models.auto import modeling_auto as tables

    kind = config.get("model_type")
    if config.get("is_encoder_decoder"):
        return "speech" if config.get("num_mel_bins") else "seq2seq"
    if config.get("text_config") and config.get("vision_config"):
        return "image-text"
    if kind in tables.MODEL_FOR_IMAGE_MAPPING_NAMES or config.get("image_size"):  # CLIP's vision tower alone
        return "image"
    if kind in tables.MODEL_FOR_CTC_MAPPING_NAMES or kind in tables.MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES:
        return "audio"
    nested = [key for key in config if key.endswith("_config") and key not in ("text_config", "quantization_config")]
    return "other" if nested else "text"


def _mapped(auto_class: str) -> dict:
    """transformers' own table for ``auto_class``: model type -> class name(s)."""
    import transformers

    return getattr(transformers, auto_class)._model_mapping._model_mapping


def fits(task: Task, config: dict) -> bool:
    """Whether ``task`` builds this model and its inputs: the modality matches, transformers maps the
    model type to the task's auto class, and the config holds the fields the inputs are built from."""
    sections = (config, config.get("text_config") or {}, config.get("vision_config") or {})
    return (
        task.modality == modality(config)
        and config.get("model_type") in _mapped(task.auto_class)
        and all(any(name in section for section in sections) for name in task.needs)
    )


def _class_names(auto_class: str) -> set[str]:
    names = set()
    for value in _mapped(auto_class).values():
        names.update([value] if isinstance(value, str) else value)
    return names


def fitting(config: dict) -> list[str]:
    """The tasks this model can be exported as; the one its architecture names first."""
    found = [name for name, task in TASKS.items() if fits(task, config)]
    architectures = set(config.get("architectures") or [])
    named = [name for name in found if architectures & _class_names(TASKS[name].auto_class)]
    return named + [name for name in found if name not in named]


def described(config: dict) -> str:
    """What kind of model this is, for a refusal: "a vision-language model (llava)"."""
    return f"{_MODALITIES[modality(config)][0]} ({config.get('model_type') or 'no model_type'})"


def summary() -> str:
    """Every task with the models it takes, for a refusal to name what works."""
    groups = {}
    for task in TASKS.values():
        groups.setdefault(task.modality, []).append(task.name)
    return "; ".join(f"{', '.join(names)} ({_MODALITIES[kind][1]})" for kind, names in groups.items())


def choose(source: Path, config: dict, task: str | None) -> str:
    """``task``, or the one the model's architecture names; one sentence, before any model is built,
    where no task builds this model's inputs (other models failed deep inside the exporters)."""
    found = fitting(config)
    if task is None and found:
        return found[0]
    if task in found:
        return task
    if found:
        raise SurgeonError(
            f"{source}: {described(config)} cannot be exported as {task}; choose task {' or '.join(found)}."
        )
    raise SurgeonError(
        f"{source}: is {described(config)}, whose inputs no export-onnx task builds; export-onnx exports {summary()}."
    )


# --- running the graphs -------------------------------------------------------------------------


class Traced(torch.nn.Module):
    """One graph's function of positional tensors, returning a tuple: what both exporters trace."""

    def __init__(self, model: torch.nn.Module, graph: Graph):
        super().__init__()
        self.model = model
        self.graph = graph

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.graph.call(self.model, **{keyword: a for (_, keyword, _), a in zip(self.graph.inputs, args)})
        return tuple(out[name] for name in self.graph.outputs)


def traced(task: Task, model: torch.nn.Module, feed: dict) -> Iterator[tuple[Graph, Traced, tuple]]:
    """Each graph with its module and example arguments, the later ones fed by the earlier ones'
    outputs as computed by torch."""
    values = dict(feed)
    for graph in task.graphs:
        module = Traced(model, graph).eval()
        args = tuple(values[source] for _, _, source in graph.inputs)
        yield graph, module, args
        with torch.no_grad():
            values.update(zip(graph.outputs, module(*args)))


def graph_path(output: Path, graph: Graph) -> Path:
    """Where a graph is written: the output itself, or its file in the output folder."""
    return output / graph.file if graph.file else output


def sessions(output: Path, task: Task) -> list:
    """An onnxruntime session per graph, on CPU."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4  # its notices, and errors that surgeon reports in one sentence itself
    paths = [graph_path(output, graph) for graph in task.graphs]
    return [onnxruntime.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for p in paths]


def run(output: Path, task: Task, opened: list, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the graphs in onnxruntime in order, each fed the task's inputs and earlier graphs' outputs
    (only the inputs the exporter kept: an unused one may be dropped). A graph that fails to run is a
    wrong export, said in one sentence."""
    values = dict(feed)
    try:
        for graph, session in zip(task.graphs, opened):
            kept = {i.name for i in session.get_inputs()}
            fed = {name: values[source] for name, _, source in graph.inputs if name in kept}
            values.update(zip(graph.outputs, session.run(list(graph.outputs), fed)))
    except Exception as error:  # onnxruntime raises its own exception types, one per failure kind
        shapes = ", ".join(f"{name} {tuple(value.shape)}" for name, value in feed.items())
        raise SurgeonError(
            f"{output}: onnxruntime fails to run the exported graph on {shapes} ({str(error).splitlines()[0]}); "
            "the export is wrong."
        ) from None
    return values


def sample(task: Task, config: dict, batch: int, sequence: int, padded: str | None, seed: int) -> dict:
    """The task's inputs for one verification case (``sequence`` and ``padded`` where it takes text)."""
    return task.inputs(config, batch, sequence, padded, torch.Generator().manual_seed(seed))


def dimension_limit(config: dict, axis: str) -> int | None:
    """The most a dynamic axis may grow: position tables bound a sequence; nothing bounds a batch."""
    text = _section(config, "text_config")
    limits = {
        "sequence": text.get("max_position_embeddings") or text.get("n_positions"),
        "decoder_sequence": config.get("max_target_positions") or config.get("max_position_embeddings"),
    }
    value = limits.get(axis)
    return int(value) if value else None
