"""Export a transformers checkpoint to ONNX, then prove the graph computes what the checkpoint does.

An exporter that runs without error can still produce a graph that computes something else (the
legacy TorchScript exporter did so on BERT under transformers 5), so the export is not done
until onnxruntime and torch agree on the same inputs: batch and sequence of at least 2 (torch.export
specialises dimensions of size 0 and 1), one padded row per input, compared at unmasked positions
only (what a graph computes for padding is not defined). The architecture comes from the
checkpoint's own config.json, read by transformers; nothing is fetched.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from surgeon.choices import EXPORT_TASKS as TASKS
from surgeon.choices import EXPORTERS as EXPORTERS  # noqa: F401 (re-exported: export's own choices)
from surgeon.errors import NotWeightDeltas, SurgeonError, missing_extra

if TYPE_CHECKING:
    from surgeon.delta import Adapter

_TASK_BY_SUFFIX = (
    ("ForCausalLM", "causal-lm"),
    ("LMHeadModel", "causal-lm"),
    ("ForMaskedLM", "masked-lm"),
    ("ForSequenceClassification", "sequence-classification"),
)
INPUT_NAMES = ("input_ids", "attention_mask")
LEGACY_OPSET = 17
# Protobuf cannot hold a message over 2 GiB; weights above this go to a `.data` file beside the graph.
EXTERNAL_DATA_ABOVE = 2 * 10**9
EXPORT_SHAPE = (2, 8)
# (batch, sequence, which side the last row is padded on)
VERIFY_CASES = ((2, 8, "right"), (3, 13, "left"))


def require_extra(exporter: str) -> None:
    """Refuse early, naming what to install, when the optional ``onnx`` extra is missing."""
    needed = ["transformers", "onnxruntime"] + (["onnxscript"] if exporter != "legacy" else [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise SurgeonError(missing_extra("onnx", missing, "export-onnx"))


# config.json fields that mark a model whose forward takes more than token ids and a mask, or whose
# experts no exporter traces here, with what to say about it.
_UNEXPORTABLE = (
    ("is_encoder_decoder", "an encoder-decoder model (T5, BART, Whisper, ...), whose graphs need decoder inputs too"),
    ("vision_config", "a model with a vision tower (CLIP, LLaVA, ...), whose graphs take images"),
    ("image_size", "a vision model, whose graphs take images"),
    ("num_mel_bins", "a speech model, whose graphs take audio features"),
    ("num_local_experts", "a mixture of experts, whose expert routing neither exporter traces here"),
    ("num_experts", "a mixture of experts, whose expert routing neither exporter traces here"),
)


def refuse_unexportable(source: Path, config: dict) -> None:
    """One sentence, before any model is built, for what export-onnx cannot export yet: it feeds
    ``input_ids`` and ``attention_mask`` alone, and other models failed deep inside the exporters."""
    sections = [config, config.get("text_config") or {}]
    reason = next((why for field, why in _UNEXPORTABLE if any(s.get(field) for s in sections)), None)
    if reason is not None:
        raise SurgeonError(
            f"{source}: is {reason}; export-onnx exports text models that take token ids and an attention mask "
            f"(tasks {', '.join(TASKS)})."
        )


def default_task(config: dict) -> str:
    """causal LM -> logits, masked LM and classifiers -> logits, anything else -> last hidden state."""
    for architecture in config.get("architectures") or []:
        for suffix, task in _TASK_BY_SUFFIX:
            if architecture.endswith(suffix):
                return task
    return "feature-extraction"


class _Head(torch.nn.Module):
    """The model as a function of (input_ids, attention_mask) returning one tensor, without KV cache:
    what an exporter can trace and what verification compares."""

    def __init__(self, model: torch.nn.Module, output: str):
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)[self.output]


def split_adapters(
    paths: list[Path], weights: list[float] | None, format_name: str | None, base
) -> tuple[list[tuple["Adapter", str]], list[float], Path | None]:
    """The adapters to merge into ``base`` before the export (with their weights), and the one that
    no weight delta expresses but that runs with the model (PEFT prefix tuning, an AdapterHub
    bottleneck adapter or prefix tuning), to be traced into the graph with it."""
    from surgeon import formats
    from surgeon.formats import layouts
    from surgeon.ops.merge import one_weight_each

    merged, merged_weights, run_time = [], [], []
    for path, weight in zip(paths, one_weight_each(weights, paths)):
        try:
            merged.append((formats.read_adapter(path, format_name, base=base), str(path)))
            merged_weights.append(weight)
        except NotWeightDeltas as refusal:
            if not (refusal.peft_runs_it or layouts.is_adapterhub(Path(path))):
                raise
            if weight != 1.0:
                raise SurgeonError(
                    f"{path}: a prefix-tuning or bottleneck adapter is run, not added, so a weight other than 1 has "
                    "no meaning; give it weight 1."
                ) from None
            run_time.append(Path(path))
    if len(run_time) > 1:
        raise SurgeonError(
            f"{run_time[1]}: export-onnx traces one prefix-tuning or bottleneck adapter with the model; give one."
        )
    return merged, merged_weights, run_time[0] if run_time else None


def _with_prefix(model: torch.nn.Module, adapter: Path) -> torch.nn.Module:
    """The model with a prefix-tuning adapter attached as PEFT runs it: its learned keys and values
    are constants of the traced forward pass, so they become initializers of the graph. An AdapterHub
    adapter is run by surgeon's own wrappers (:mod:`surgeon.adapterhub_run`)."""
    from surgeon.formats import layouts

    if layouts.is_adapterhub(adapter):
        from surgeon.adapterhub_run import attach

        return attach(model, adapter)
    try:
        from peft import PeftModel
    except ImportError:
        raise SurgeonError(missing_extra("test", ["peft"], "export-onnx with a prefix-tuning adapter")) from None
    attached = PeftModel.from_pretrained(model, adapter, is_trainable=False).eval()
    try:  # keys and values of another model's shape fail in attention, which would be a traceback mid-export
        with torch.no_grad():
            attached(input_ids=torch.zeros((1, 2), dtype=torch.long))
    except (RuntimeError, ValueError, IndexError) as error:
        raise SurgeonError(
            f"{adapter}: the prefix-tuning adapter does not fit this model ({str(error).splitlines()[0]}); "
            "give the model it was trained on."
        ) from None
    return attached


def load_head(directory: Path, task: str, prefix: Path | None = None) -> tuple[_Head, dict]:
    """The checkpoint in fp32 on CPU (with ``prefix`` attached), as the export and verification see
    it, and its config."""
    import transformers

    class_name, output = TASKS[task]
    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
        model = getattr(transformers, class_name).from_pretrained(
            directory, config=config, dtype=torch.float32, local_files_only=True
        )
    except (OSError, ValueError, KeyError) as error:
        raise SurgeonError(
            f"{directory}: transformers cannot build a {task} model from its config.json "
            f"({str(error).splitlines()[0]}); pass --task, or check the checkpoint."
        ) from None
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return _Head(_with_prefix(model, prefix) if prefix else model, output).eval(), config.to_dict()


def _limits(config: dict) -> tuple[int, int | None]:
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size") or 2
    positions = config.get("max_position_embeddings") or config.get("n_positions")
    return int(vocab), int(positions) if positions else None


def sample_inputs(config: dict, batch: int, sequence: int, padded: str | None, seed: int) -> dict[str, torch.Tensor]:
    """Random token ids and an attention mask; the last row padded (half its length) on ``padded``'s side."""
    vocab, positions = _limits(config)
    sequence = min(sequence, positions) if positions else sequence
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, sequence), generator=generator)
    mask = torch.ones_like(ids)
    if padded == "right":
        mask[-1, sequence // 2 :] = 0
    elif padded == "left":
        mask[-1, : sequence // 2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _dynamo(head: _Head, example: dict, dest: Path, opset: int | None, external: bool, config: dict) -> None:
    _, positions = _limits(config)
    batch = torch.export.Dim("batch", min=1)
    sequence = torch.export.Dim("sequence", min=1, max=positions) if positions else torch.export.Dim("sequence", min=1)
    axes = {0: batch, 1: sequence}
    program = torch.onnx.export(
        head,
        (),
        kwargs=example,
        dynamo=True,
        verbose=False,
        opset_version=opset,
        input_names=list(INPUT_NAMES),
        output_names=[head.output],
        dynamic_shapes={name: axes for name in INPUT_NAMES},
    )
    program.save(str(dest), external_data=external)


def _legacy(head: _Head, example: dict, dest: Path, opset: int | None, external: bool) -> None:
    axes = {0: "batch", 1: "sequence"}
    scratch = dest.parent / "legacy"
    scratch.mkdir()
    torch.onnx.export(
        head,
        tuple(example[name] for name in INPUT_NAMES),
        str(scratch / dest.name),
        dynamo=False,
        opset_version=opset or LEGACY_OPSET,
        input_names=list(INPUT_NAMES),
        output_names=[head.output],
        dynamic_axes={**{name: axes for name in INPUT_NAMES}, head.output: axes},
    )
    if external:  # the legacy exporter spills large weights one file per tensor; gather them in one
        import onnx

        onnx.save_model(
            onnx.load(str(scratch / dest.name)),
            str(dest),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=dest.name + ".data",
            size_threshold=1024,
        )
    else:
        os.replace(scratch / dest.name, dest)
    shutil.rmtree(scratch)


def export_graph(head: _Head, config: dict, dest: Path, exporter: str, opset: int | None, external: bool) -> str:
    """Write the graph to ``dest`` (and ``dest.data`` with ``external``); return the exporter used.
    ``auto`` is the dynamo exporter, with the legacy one as a fallback when dynamo fails."""
    example = sample_inputs(config, *EXPORT_SHAPE, padded=None, seed=0)
    # Exporters print progress and warn freely; stdout stays clean for --json, and verification,
    # not the exporter's warnings, decides whether the graph is right.
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter in ("auto", "dynamo"):
            try:
                _dynamo(head, example, dest, opset, external, config)
                return "dynamo"
            except Exception as error:  # any exporter failure: report it, or fall back when allowed
                if exporter == "dynamo":
                    raise SurgeonError(
                        f"the dynamo exporter failed ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''}); try --exporter legacy."
                    ) from None
                print(
                    f"surgeon: the dynamo exporter failed ({type(error).__name__}); falling back to the legacy "
                    "exporter.",
                    file=sys.stderr,
                )
                for leftover in (dest, dest.with_name(dest.name + ".data")):
                    leftover.unlink(missing_ok=True)
        _legacy(head, example, dest, opset, external)
        return "legacy"


def check_graph(path: Path) -> int:
    """Run the ONNX checker on the path (it reads external data from there); return the opset."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as error:
        raise SurgeonError(f"{path}: the exported graph fails onnx.checker ({str(error).splitlines()[0]}).") from None
    model = onnx.load(str(path), load_external_data=False)
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


@dataclass
class Verification:
    runtime: str
    atol: float
    cases: list[dict] = field(default_factory=list)
    max_abs_diff: float = 0.0
    max_relative_diff: float = 0.0
    compared_values: int = 0
    passed: bool = False


def verify(graph: Path, head: _Head, config: dict, atol: float) -> Verification:
    """Run ``graph`` in onnxruntime and ``head`` in torch on the same inputs; compare unmasked positions."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # initializer-as-input and similar notices are not the user's concern
    session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    wanted = [i.name for i in session.get_inputs()]
    result = Verification(runtime=f"onnxruntime {onnxruntime.__version__}", atol=atol)
    worst_reference = 0.0
    for seed, (batch, sequence, padded) in enumerate(VERIFY_CASES, start=1):
        feed = sample_inputs(config, batch, sequence, padded, seed)
        with torch.no_grad():
            reference = head(**feed).float().numpy()
        got = session.run(None, {name: feed[name].numpy() for name in wanted})[0]
        if got.shape != reference.shape:
            raise SurgeonError(
                f"{graph}: onnxruntime returned shape {got.shape} where torch gives {reference.shape} for inputs "
                f"{tuple(feed['input_ids'].shape)}; the export is wrong."
            )
        mask = feed["attention_mask"].numpy().astype(bool)
        if reference.ndim >= 2 and reference.shape[:2] == mask.shape:
            reference, got = reference[mask], got[mask]
        difference = float(np.abs(reference.astype(np.float64) - got).max()) if reference.size else 0.0
        magnitude = float(np.abs(reference).max()) if reference.size else 0.0
        result.cases.append(
            {"batch": batch, "sequence": feed["input_ids"].shape[1], "padded_row": padded, "max_abs_diff": difference}
        )
        result.max_abs_diff = difference if np.isnan(difference) else max(result.max_abs_diff, difference)
        worst_reference = max(worst_reference, magnitude)
        result.compared_values += int(reference.size)
    result.max_relative_diff = result.max_abs_diff / worst_reference if worst_reference else result.max_abs_diff
    result.passed = bool(result.max_abs_diff <= atol)
    return result


def data_file(graph: Path) -> Path:
    return graph.with_name(graph.name + ".data")


def finish(staged: Path, final: Path, metadata: dict[str, str]) -> list[Path]:
    """Move a staged graph (and its external data) to ``final``, pointing the graph at the data's
    new name and recording ``metadata`` in its ``metadata_props``; return the files written."""
    import onnx

    model = onnx.load(str(staged), load_external_data=False)
    for key, value in metadata.items():
        entry = next((p for p in model.metadata_props if p.key == key), None) or model.metadata_props.add()
        entry.key, entry.value = key, value
    moved = []
    if data_file(staged).exists():
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = data_file(final).name
        os.replace(data_file(staged), data_file(final))
        moved.append(data_file(final))
    elif data_file(final).exists():
        data_file(final).unlink()  # a stale companion of an earlier, larger export at this path
    onnx.save_model(model, str(staged))  # the proto only: external weights stay where they are
    os.replace(staged, final)
    for path in (final, *moved):
        os.chmod(path, 0o644)  # files made inside the private staging directory are private
    return [final, *moved]


@dataclass
class ExportReport:
    source: str
    output: str
    task: str
    graph_output: str
    architecture: str | None
    exporter: str = ""
    opset: int = 0
    external_data: bool = False
    files: list[str] = field(default_factory=list)
    bytes: int = 0
    export_seconds: float = 0.0
    adapters: list[str] = field(default_factory=list)
    verification: dict | None = None
    verified: bool | None = None


@contextlib.contextmanager
def dependencies_quiet(verbose: bool):
    """Silence transformers' loading bars and the exporter's notes about optional operators
    (torchvision's, which no language model uses) unless asked for: the report says what matters."""
    if verbose:
        yield
        return
    from transformers.utils import logging as transformers_logging

    level, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    exporter_log = logging.getLogger("torch.onnx")
    exporter_level = exporter_log.level
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    exporter_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        transformers_logging.set_verbosity(level)
        if bars:
            transformers_logging.enable_progress_bar()
        exporter_log.setLevel(exporter_level)


def export(
    source: Path,
    output: Path,
    *,
    task: str | None = None,
    opset: int | None = None,
    exporter: str = "auto",
    atol: float = 1e-4,
    check: bool = True,
    force: bool = False,
    provenance: dict[str, str] | None = None,
    adapters: list[str] | None = None,
    verbose: bool = False,
    prefix: Path | None = None,
) -> ExportReport:
    """Export the checkpoint at ``source`` to ``output`` and verify it (unless ``check`` is off).

    A graph that fails verification is kept beside the output as ``<output>.unverified`` (with
    ``.unverified.data``), never at the output path; the report says so with ``verified: False``.
    ``provenance`` (how the export was asked for) and the report go into the graph's metadata_props.
    ``prefix``: an adapter traced with the model, PEFT prefix tuning or an AdapterHub bottleneck or
    prefix-tuning adapter (see :func:`split_adapters`).
    """
    from surgeon.output import claimed, scratch_beside

    require_extra(exporter)
    with (
        dependencies_quiet(verbose),
        claimed(output, inputs=[source], force=force, directory=False),
        scratch_beside(output) as staging,
    ):
        return _export_in(staging, source, output, task, opset, exporter, atol, check, provenance, adapters, prefix)


def _dequantized(checkpoint, staging: Path) -> Path:
    """A float copy of a bitsandbytes checkpoint, streamed into the scratch folder: transformers would
    build bitsandbytes layers from the original, and no ONNX exporter can trace those."""
    from surgeon.ops.merge import transform_checkpoint

    copy = staging / "dequantized"
    copy.mkdir()
    transform_checkpoint(checkpoint, {}, copy, dtype=torch.float32)
    return copy


def _export_in(
    staging: Path, source: Path, output: Path, task, opset, exporter, atol, check, provenance, adapters, prefix
) -> ExportReport:
    from surgeon.checkpoint import Checkpoint

    checkpoint = Checkpoint(source)
    config = checkpoint.config()
    if not config:
        raise SurgeonError(
            f"{source}: no config.json; export-onnx needs a transformers checkpoint directory (config.json beside the "
            "weights)."
        )
    refuse_unexportable(source, config)
    task = task or default_task(config)
    report = ExportReport(
        str(source),
        str(output),
        task,
        TASKS[task][1],
        (config.get("architectures") or [None])[0],
        adapters=adapters or [],
    )
    report.external_data = checkpoint.num_params() * 4 > EXTERNAL_DATA_ABOVE  # exported in fp32
    head, full_config = load_head(_dequantized(checkpoint, staging) if checkpoint.quantized else source, task, prefix)
    staged = staging / output.name
    started = time.perf_counter()
    report.exporter = export_graph(head, full_config, staged, exporter, opset, report.external_data)
    report.export_seconds = round(time.perf_counter() - started, 3)
    report.opset = check_graph(staged)
    if check:
        result = verify(staged, head, full_config, atol)
        report.verification, report.verified = asdict(result), result.passed
    final = output if report.verified is not False else output.with_name(output.name + ".unverified")
    report.output = str(final)
    summary = {k: v for k, v in asdict(report).items() if k not in ("files", "bytes")}  # not known until written
    written = finish(staged, final, {**(provenance or {}), "surgeon_report": json.dumps(summary)})
    report.files = [str(p) for p in written]
    report.bytes = sum(p.stat().st_size for p in written)
    return report
