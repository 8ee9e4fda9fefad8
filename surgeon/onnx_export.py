"""Export a transformers checkpoint to ONNX, then prove the graph computes what the checkpoint does.

An exporter that runs without error can still produce a graph that computes something else (the
legacy TorchScript exporter did so on BERT under transformers 5), so the export is not done
until onnxruntime and torch agree on the same inputs: batch and sequence of at least 2 (torch.export
specialises dimensions of size 0 and 1), one padded row per input, compared at unmasked positions
only (what a graph computes for padding is not defined). The architecture comes from the
checkpoint's own config.json, read by transformers; nothing is fetched. What each task exports (its
graphs, their inputs, the outputs compared) is in :mod:`surgeon.onnx_tasks`.
"""

from __future__ import annotations

import contextlib
import fnmatch
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

from surgeon import onnx_tasks
from surgeon.choices import EXPORTERS as EXPORTERS  # noqa: F401 (re-exported: export's own choices)
from surgeon.errors import NotWeightDeltas, SurgeonError, missing_extra
from surgeon.onnx_tasks import TASKS

if TYPE_CHECKING:
    from surgeon.delta import Adapter

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


class _Head(torch.nn.Module):
    """The model without KV cache, with its task: what the exporters trace, graph by graph, and what
    verification runs whole (its forward pass returns the outputs the graphs are compared on)."""

    def __init__(self, model: torch.nn.Module, task: str):
        super().__init__()
        self.model = model
        self.task = TASKS[task]

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(**inputs, return_dict=True)
        return {name: out[name] for name in self.task.compared}


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


# transformers' experts implementation that both exporters trace: each token's top-k experts gathered and
# applied in one batched matmul, whatever the routing (its default, grouped_mm, has no ONNX function under
# dynamo and needs aten::histc under legacy; the eager loop's routing is data-dependent, which tracing
# bakes in). The gather copies each selected expert's weights per token: memory grows with the sequence.
EXPERTS = "batched_mm"


def refuse_untraceable_experts(directory: Path, model) -> None:
    """One sentence for a mixture of experts whose experts ignore ``EXPERTS``: their eager loop would
    be traced for one routing only."""
    sections = [model.config.to_dict(), model.config.to_dict().get("text_config") or {}]
    experts = any(s.get(key) for s in sections for key in ("num_local_experts", "num_experts", "n_routed_experts"))
    if experts and not model._can_set_experts_implementation():
        raise SurgeonError(
            f"{directory}: {type(model).__name__}'s experts do not take transformers' {EXPERTS} experts "
            "implementation, and their routing loop cannot be traced for every input; export-onnx exports mixtures "
            "of experts whose experts do (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, ...)."
        )


def load_head(directory: Path, task: str, prefix: Path | None = None) -> tuple[_Head, dict]:
    """The checkpoint in fp32 on CPU (with ``prefix`` attached), as the export and verification see
    it, and its config."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
        model = getattr(transformers, TASKS[task].auto_class).from_pretrained(
            directory, config=config, dtype=torch.float32, local_files_only=True, experts_implementation=EXPERTS
        )
    except (OSError, ValueError, KeyError) as error:
        raise SurgeonError(
            f"{directory}: transformers cannot build a {task} model from its config.json "
            f"({str(error).splitlines()[0]}); pass --task, or check the checkpoint."
        ) from None
    refuse_untraceable_experts(directory, model)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return _Head(_with_prefix(model, prefix) if prefix else model, task).eval(), config.to_dict()


def _dynamo(module, graph, example: tuple, dest: Path, opset: int | None, external: bool, task, config: dict) -> None:
    dims: dict[str, torch.export.Dim] = {}

    def dim(name: str) -> torch.export.Dim:
        limit = onnx_tasks.dimension_limit(config, name)
        return dims.setdefault(name, torch.export.Dim(name, min=1, **({"max": limit} if limit else {})))

    shapes = tuple(
        {axis: dim(name) for axis, name in task.axes.get(source, {}).items()} for _, _, source in graph.inputs
    )
    program = torch.onnx.export(
        module,
        example,
        dynamo=True,
        verbose=False,
        opset_version=opset,
        input_names=[name for name, _, _ in graph.inputs],
        output_names=list(graph.outputs),
        dynamic_shapes=(shapes,),  # one entry: the graph module takes its inputs as *args
    )
    program.save(str(dest), external_data=external)


def _legacy(module, graph, example: tuple, dest: Path, opset: int | None, external: bool, task) -> None:
    scratch = dest.parent / "legacy"
    scratch.mkdir()
    values = [(name, source) for name, _, source in graph.inputs] + [(name, name) for name in graph.outputs]
    torch.onnx.export(
        module,
        example,
        str(scratch / dest.name),
        dynamo=False,
        opset_version=opset or LEGACY_OPSET,
        input_names=[name for name, _, _ in graph.inputs],
        output_names=list(graph.outputs),
        dynamic_axes={name: task.axes[source] for name, source in values if source in task.axes},
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


def _failure(exporter: str, error: Exception) -> str:
    return (
        f"the {exporter} exporter failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    )


def export_graph(head: _Head, config: dict, dest: Path, exporter: str, opset: int | None, external: bool) -> str:
    """Write the task's graphs to ``dest`` (a folder of them where there are several), with their
    ``.data`` files when ``external``; return the exporters used. ``auto`` is the dynamo exporter, with
    the legacy one as a fallback for a graph where dynamo fails."""
    example = onnx_tasks.sample(head.task, config, *EXPORT_SHAPE, padded=None, seed=0)
    used = [
        _export_one(
            module, graph, args, onnx_tasks.graph_path(dest, graph), exporter, opset, external, head.task, config
        )
        for graph, module, args in onnx_tasks.traced(head.task, head.model, example)
    ]
    return ", ".join(dict.fromkeys(used))


def _export_one(module, graph, example, dest: Path, exporter: str, opset, external: bool, task, config) -> str:
    # Exporters print progress and warn freely; stdout stays clean for --json, and verification,
    # not the exporter's warnings, decides whether the graph is right.
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter in ("auto", "dynamo"):
            try:
                _dynamo(module, graph, example, dest, opset, external, task, config)
                return "dynamo"
            except Exception as error:  # any exporter failure: report it, or fall back when allowed
                if exporter == "dynamo":
                    raise SurgeonError(f"{_failure('dynamo', error)}; try --exporter legacy.") from None
                print(
                    f"surgeon: the dynamo exporter failed ({type(error).__name__}); falling back to the legacy "
                    "exporter.",
                    file=sys.stderr,
                )
                for leftover in (dest, dest.with_name(dest.name + ".data")):
                    leftover.unlink(missing_ok=True)
        try:
            _legacy(module, graph, example, dest, opset, external, task)
        except Exception as error:  # any exporter failure: one sentence, never a traceback
            hint = "try --exporter dynamo" if exporter == "legacy" else "the dynamo exporter failed too"
            raise SurgeonError(f"{_failure('legacy', error)}; {hint}.") from None
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


def _case(feed: dict[str, torch.Tensor], batch: int) -> dict:
    """What one verification case fed: its batch, its (first) token sequence's length, the side its
    last row is padded on."""
    sequence = next((feed[k].shape[1] for k in ("input_ids", "decoder_input_ids") if k in feed), None)
    last = feed["attention_mask"][-1] if "attention_mask" in feed else torch.ones(1)
    padded = "left" if last[0] == 0 else "right" if last[-1] == 0 else None
    return {"batch": batch, "sequence": sequence, "padded_row": padded}


def _compare(graph: Path, name: str, reference: np.ndarray, got: np.ndarray, mask) -> tuple[float, float, int]:
    """The largest difference between one output in torch and in onnxruntime (at ``mask``'s positions
    where given), the reference's largest magnitude, and how many values were compared."""
    if got.shape != reference.shape:
        raise SurgeonError(
            f"{graph}: onnxruntime returned {name} of shape {got.shape} where torch gives {reference.shape}; "
            "the export is wrong."
        )
    if mask is not None:
        reference, got = reference[mask], got[mask]
    if not reference.size:
        return 0.0, 0.0, 0
    return float(np.abs(reference.astype(np.float64) - got).max()), float(np.abs(reference).max()), reference.size


def verify(graph: Path, head: _Head, config: dict, atol: float) -> Verification:
    """Run ``graph`` (the task's graphs, in order) in onnxruntime and ``head`` in torch on the same
    inputs; compare the task's outputs, at unmasked positions only where the task is masked."""
    import onnxruntime

    task = head.task
    sessions = onnx_tasks.sessions(graph, task)
    result = Verification(runtime=f"onnxruntime {onnxruntime.__version__}", atol=atol)
    worst_reference = 0.0
    for seed, (batch, sequence, padded) in enumerate(VERIFY_CASES, start=1):
        feed = onnx_tasks.sample(task, config, batch, sequence, padded, seed)
        with torch.no_grad():
            references = {name: value.float().numpy() for name, value in head(**feed).items()}
        outputs = onnx_tasks.run(graph, task, sessions, {name: value.numpy() for name, value in feed.items()})
        mask = feed["attention_mask"].numpy().astype(bool) if task.masked else None
        difference = 0.0
        for name, reference in references.items():
            gap, magnitude, count = _compare(graph, name, reference, outputs[name], mask)
            difference = gap if np.isnan(gap) else max(difference, gap)  # max() would drop a NaN
            worst_reference = max(worst_reference, magnitude)
            result.compared_values += count
        result.cases.append({**_case(feed, batch), "max_abs_diff": difference})
        result.max_abs_diff = difference if np.isnan(difference) else max(result.max_abs_diff, difference)
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


def _companions(checkpoint) -> list[Path]:
    """The checkpoint's config and tokenizer files, which optimum's onnxruntime classes read beside the
    graphs of a folder (``ORTModelForSeq2SeqLM.from_pretrained(folder)``); not its card or weights."""
    from surgeon.output import SURGEON_WRITES

    kept = [pattern for pattern in SURGEON_WRITES if pattern != "README.md"]
    return [p for p in checkpoint.extra_files() if any(fnmatch.fnmatchcase(p.name, k) for k in kept)]


def finish_folder(staged: Path, final: Path, metadata: dict[str, str], companions: list[Path]) -> list[Path]:
    """Record ``metadata`` in each staged graph, copy the companions beside them, and move the staged
    folder to ``final`` (an earlier export there is replaced only once the new one is complete)."""
    from surgeon.output import publish

    written = [path for graph in sorted(staged.glob("*.onnx")) for path in finish(graph, graph, metadata)]
    for companion in companions:
        shutil.copyfile(companion, staged / companion.name)
        written.append(staged / companion.name)
    publish(staged, final)
    return [final / path.relative_to(staged) for path in written]


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
    task = resolve_task(source, output, task)
    if prefix is not None and TASKS[task].modality != "text":
        raise SurgeonError(
            f"{prefix}: export-onnx traces an adapter that runs with the model (prefix tuning, a bottleneck) into a "
            f"text model's graph only, not into a {task} export; merge a LoRA-like adapter instead."
        )
    with (
        dependencies_quiet(verbose),
        claimed(output, inputs=[source], force=force, directory=TASKS[task].folder),
        scratch_beside(output) as staging,
    ):
        return _export_in(staging, source, output, task, opset, exporter, atol, check, provenance, adapters, prefix)


def resolve_task(source: Path, output: Path, task: str | None) -> str:
    """The task ``source`` is exported as (see :func:`surgeon.onnx_tasks.choose`), checked against ``output``: a task
    of several graphs writes a folder of them."""
    from surgeon.checkpoint_files import model_config

    config = model_config(Path(source))
    if not config:
        raise SurgeonError(
            f"{source}: no config.json; export-onnx needs a transformers checkpoint directory (config.json beside the "
            "weights)."
        )
    task = onnx_tasks.choose(source, config, task)
    files = [graph.file for graph in TASKS[task].graphs if graph.file]
    if files and Path(output).suffix == ".onnx":
        raise SurgeonError(
            f"{output}: a {task} export is {len(files)} graphs ({', '.join(files)}) in a folder; give output a "
            "folder, not a .onnx file."
        )
    return task


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
    report = ExportReport(
        str(source),
        str(output),
        task,
        ", ".join(TASKS[task].compared),
        (config.get("architectures") or [None])[0],
        adapters=adapters or [],
    )
    report.external_data = checkpoint.num_params() * 4 > EXTERNAL_DATA_ABOVE  # exported in fp32
    head, full_config = load_head(_dequantized(checkpoint, staging) if checkpoint.quantized else source, task, prefix)
    staged = staging / output.name
    if head.task.folder:
        staged.mkdir()
    started = time.perf_counter()
    report.exporter = export_graph(head, full_config, staged, exporter, opset, report.external_data)
    report.export_seconds = round(time.perf_counter() - started, 3)
    report.opset = max(check_graph(onnx_tasks.graph_path(staged, graph)) for graph in head.task.graphs)
    if check:
        result = verify(staged, head, full_config, atol)
        report.verification, report.verified = asdict(result), result.passed
    final = output if report.verified is not False else output.with_name(output.name + ".unverified")
    report.output = str(final)
    summary = {k: v for k, v in asdict(report).items() if k not in ("files", "bytes")}  # not known until written
    metadata = {**(provenance or {}), "surgeon_report": json.dumps(summary)}
    if head.task.folder:
        written = finish_folder(staged, final, metadata, _companions(checkpoint))
    else:
        written = finish(staged, final, metadata)
    report.files = [str(p) for p in written]
    report.bytes = sum(p.stat().st_size for p in written)
    return report
