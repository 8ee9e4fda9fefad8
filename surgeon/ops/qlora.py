"""Merging a QLoRA adapter into the 16-bit checkpoint it was trained on in 4 bits.

The adapter learned its update against ``dequantize(quantize(W))``, the weight bitsandbytes hands
the forward pass, not against ``W``. The faithful merge is therefore that weight plus the delta:
every weight transformers quantizes on loading is quantized and dequantized here exactly as
bitsandbytes does (:mod:`surgeon.quantize`), then merged as usual. How far that lands from the
naive merge into ``W`` (the number people argue about) is measured per module on request.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from surgeon.checkpoint import Checkpoint
from surgeon.delta import Adapter
from surgeon.errors import SurgeonError
from surgeon.ops.apply import apply_deltas
from surgeon.ops.merge import MergeReport, deltas_by_key, merge, one_weight_each, prepare
from surgeon.ops.probe import check_probe
from surgeon.ops.probe import probe as probe_logits
from surgeon.ops.quantized_output import QUANTIZED_DTYPES, encoder_for, relative_distance
from surgeon.quantize import OutOfRange, Scheme, bnb_linear_weights, roundtrip, shapes_of


class QuantizedBase:
    """A 16-bit checkpoint read as the model bitsandbytes makes of it with ``scheme``: each weight
    transformers would quantize comes back as dequantize(quantize(W)); everything else as stored."""

    def __init__(self, base: Checkpoint, scheme: Scheme):
        if base.quantized:
            raise SurgeonError(
                f"{base.path}: is already bitsandbytes-quantized, so it is the trained-on base "
                "as it is; merge into it without a quantized base."
            )
        if scheme.bits != 4:
            raise SurgeonError(f"a quantized base is nf4 or fp4 (QLoRA's 4-bit schemes), not {scheme.kind}.")
        self.original = base
        self.scheme = scheme
        self.targets = bnb_linear_weights(base.config(), shapes_of(base), base.path)

    def __getattr__(self, name: str):
        return getattr(self.original, name)  # keys, info, path, config, ...: those of the checkpoint

    def get(self, key: str) -> torch.Tensor:
        weight = self.original.get(key)
        if key not in self.targets:
            return weight
        try:
            return roundtrip(weight, self.scheme, conv1d=self.targets[key])
        except OutOfRange as error:
            raise SurgeonError(f"{self.path}: {key!r} {error}") from None


@dataclass
class Distance:
    """Relative Frobenius distances of one merged weight (or all of them, ``module`` "total")."""

    module: str
    to_trained: float  # from quantized base + delta: the model as trained
    to_naive: float  # from 16-bit base + delta: the naive merge
    naive_to_trained: float  # how far the naive merge is from the model as trained


@dataclass
class QLoRAReport(MergeReport):
    quantized_modules: int = 0  # weights quantized and dequantized before merging
    scheme: dict = field(default_factory=dict)  # the base's quantization, if any
    distances: list[dict] = field(default_factory=list)  # with report: asdict of each Distance
    output_scheme: dict = field(default_factory=dict)  # the output's quantization, if any
    quantization_error: list[dict] = field(default_factory=list)  # what writing it quantized cost, per module
    probe: dict = field(default_factory=dict)  # with probe: max logit differences from the model as trained


class _Sums:
    """Squared norms summed over modules, for the totals."""

    def __init__(self):
        self.values = [0.0] * 6

    def add(self, *squares: float) -> None:
        self.values = [a + b for a, b in zip(self.values, squares)]

    def total(self) -> Distance:
        return Distance("total", *(relative_distance(self.values[i], self.values[i + 1]) for i in (0, 2, 4)))


def _squares(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    return float(torch.sum((a - b).double() ** 2)), float(torch.sum(b.double() ** 2))


def distances(base: QuantizedBase, plan: dict, merged: Checkpoint) -> list[Distance]:
    """Per quantized or merged module, and in total, how far ``merged`` is from the adapter on the
    quantized base and from the naive merge, and how far those two are from each other."""
    found, sums = [], _Sums()
    for key in [k for k in base.keys() if k in base.targets or k in plan]:
        deltas = plan.get(key, [])
        trained = apply_deltas(base.get(key).float(), deltas)
        naive = apply_deltas(base.original.get(key).float(), deltas)
        result = merged.get(key).float()
        squares = (*_squares(result, trained), *_squares(result, naive), *_squares(naive, trained))
        sums.add(*squares)
        found.append(
            Distance(key.removesuffix(".weight"), *(relative_distance(squares[i], squares[i + 1]) for i in (0, 2, 4)))
        )
    return [*found, sums.total()]


def qlora_merge(
    base: Checkpoint,
    adapters: Sequence[tuple[Adapter, str]],
    out: Path,
    *,
    scheme: Scheme | None,
    report: bool = False,
    probe: bool = False,
    output: Scheme | None = None,
    weights: Sequence[float] | None = None,
    allow_nonfinite: bool = False,
    **options,
) -> QLoRAReport:
    """:func:`surgeon.ops.merge.merge` into ``base`` as bitsandbytes quantizes it with ``scheme``
    (None: as stored); with ``report``, the result's :class:`Distance` per module and in total;
    with ``probe``, the largest logit differences (:mod:`surgeon.ops.probe`); with ``output``,
    written as a bitsandbytes checkpoint quantized by it, and its error measured."""
    source = QuantizedBase(base, scheme) if scheme else base
    if probe and options.get("untie"):
        raise SurgeonError(
            "probe runs the merged model beside the model as trained, whose output head is still tied to the "
            "embedding; probe without untie."
        )
    if probe:
        check_probe(base, base.path)
    encoder = encoder_for(output.kind, base, output.double_quant, output.blocksize) if output else None
    merged = merge(source, adapters, out, weights=weights, allow_nonfinite=allow_nonfinite, encoder=encoder, **options)
    result = QLoRAReport(**asdict(merged))
    if scheme:
        result.quantized_modules, result.scheme = len(source.targets), asdict(scheme)
    if encoder:
        result.output_scheme, result.quantization_error = asdict(output), encoder.total_error()
    if report or probe:
        plan = deltas_by_key(prepare(adapters, base, allow_nonfinite), one_weight_each(weights, adapters))
    if report:
        result.distances = [asdict(d) for d in distances(source, plan, Checkpoint(out))]
    if probe:
        result.probe = probe_logits(source, plan, Checkpoint(out), base.path)
    return result


def merge_operation(kind: str | None, double_quant: bool, blocksize: int, report: bool, probe: bool, dtype: str):
    """The merge operation for these options: a QLoRA merge into a base quantized by ``kind``
    and/or one written quantized (``dtype`` nf4, fp4 or int8), or None for a plain merge."""
    output = Scheme(dtype, double_quant, blocksize) if dtype in QUANTIZED_DTYPES else None
    _check_options(kind, output, double_quant, blocksize, report or probe)
    if kind is None and output is None:
        return None
    scheme = Scheme(kind, double_quant, blocksize) if kind else None

    def qlora(*args, **kwargs) -> QLoRAReport:
        return qlora_merge(*args, scheme=scheme, report=report, probe=probe, output=output, **kwargs)

    return qlora


def _check_options(kind: str | None, output: Scheme | None, double_quant: bool, blocksize: int, measure: bool):
    """Refuse options that nothing would use: silently ignored, they would look applied."""
    if kind is None and measure:
        raise SurgeonError(
            "report and probe compare a merge into a 16-bit base quantized as in training with the naive merge; "
            "name that quantization (quantized_base nf4 or fp4) too (a base saved by bitsandbytes is already the "
            "model as trained: merge into it without them)."
        )
    four_bit = kind is not None or (output is not None and output.bits == 4)
    if kind is not None and output is not None and output.bits == 4 and (double_quant or blocksize != 64):
        raise SurgeonError(
            "double_quant and blocksize would describe both the quantized base and the 4-bit output; give them "
            "with only one of the two (a quantized base written as bf16, fp16 or fp32, or a 4-bit output of a "
            "16-bit base)."
        )
    if not four_bit and (double_quant or blocksize != 64):
        raise SurgeonError(
            "double_quant and blocksize belong to 4-bit quantization; name a 4-bit quantized base or output "
            "(nf4 or fp4) too, int8 has neither."
        )


def describe(report: MergeReport) -> str:
    """The text lines a QLoRA merge adds to merge's summary: what was quantized, and the distances."""
    if not isinstance(report, QLoRAReport):
        return ""
    text = ""
    if report.scheme:
        text += (
            f"\nmerged into the base as bitsandbytes {report.scheme['kind']} quantizes it "
            f"({report.quantized_modules} weights)"
        )
    if report.output_scheme:
        text += (
            f"\nwritten as bitsandbytes {report.output_scheme['kind']}: relative quantization error "
            f"{report.quantization_error[-1]['relative']:.3g} in total"
        )
    if report.distances:
        width = max(len(d["module"]) for d in report.distances)
        text += (
            f"\nrelative Frobenius distance of the merged weights\n{'module':<{width}}  "
            "to-trained  to-naive  naive-to-trained"
        )
        for d in report.distances:
            text += (
                f"\n{d['module']:<{width}}  {d['to_trained']:10.3g}  {d['to_naive']:8.3g}  "
                f"{d['naive_to_trained']:16.3g}"
            )
    if report.probe:
        text += (
            f"\nmax logit difference from the model as trained on {len(report.probe['token_ids'])} tokens: "
            f"{report.probe['max_logit_difference']:.3g} (naive merge: "
            f"{report.probe['naive_max_logit_difference']:.3g})"
        )
    return text
