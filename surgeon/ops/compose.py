"""Adapter arithmetic on canonical adapters: weighted sums, their best low-rank approximations,
and the sparsifying merges (TIES, DARE, magnitude pruning), one target at a time.

``cat`` and ``svd`` never form the dense ΔW: a sum of low-rank terms Σ cᵢ·upᵢ·downᵢ is
[c₁up₁ … cₙupₙ]·[down₁; …; downₙ], so its SVD follows from a QR of each stacked factor and the
SVD of the small R×R core between them (R = Σ rᵢ). That costs O((m+k)·R²) instead of the
O(m·k·min(m, k)) of a dense SVD, and it is exact: the core's singular values are those of ΔW.
The sparsifying methods act entry by entry, so they do need each module's dense deltas; they
take one module at a time and factor the result back to a rank (or keep it sparse or dense).
The dense merge rules are PEFT's (``peft.utils.merge_utils``), so results agree with
``add_weighted_adapter``'s ``*_svd`` combinations.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from surgeon.checkpoint import Checkpoint
from surgeon.choices import COMPOSE_METHODS as METHODS
from surgeon.choices import DENSE_METHODS, FACTORED_METHODS, RESULT_KINDS
from surgeon.delta import Adapter, Delta, Dense, LowRank, Sparse, all_finite, exact_sum, promoted_dtype
from surgeon.errors import SurgeonError
from surgeon.keys import key_generator
from surgeon.ops.merge import one_weight_each, prepare, refuse_nonfinite
from surgeon.ops.rank import RankRule, tail_error
from surgeon.ops.svd import factor_split, numerical_rank, truncated_svd


@dataclass
class ModuleReport:
    key: str
    ranks_in: list[int]
    rank: int | None
    relative_error: float | None = None  # of the rank truncation, against the exact combination


@dataclass
class ComposeReport:
    method: str
    adapters: int
    weights: list[float]
    modules: list[ModuleReport] = field(default_factory=list)
    seconds: float = 0.0
    output: str = ""

    @property
    def max_relative_error(self) -> float:
        return max((m.relative_error or 0.0 for m in self.modules), default=0.0)


@dataclass(frozen=True)
class ComposeOptions:
    """``rule`` sets the output rank of svd and of the dense methods kept as LoRA (default: the
    largest input rank of each module, as PEFT does); ``density`` is the fraction of entries each
    sparsifying method keeps; ``seed`` makes DARE's random drop reproducible."""

    method: str = "cat"
    rule: RankRule | None = None
    density: float | None = None
    majority_sign: str = "total"
    seed: int = 0
    keep: str = "lora"
    device: torch.device = torch.device("cpu")

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SurgeonError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}.")
        if self.keep not in RESULT_KINDS:
            raise SurgeonError(f"unknown result kind {self.keep!r}; choose one of {', '.join(RESULT_KINDS)}.")
        if self.majority_sign not in ("total", "frequency"):
            raise SurgeonError(f"majority_sign must be total or frequency; got {self.majority_sign!r}.")
        if self.method in DENSE_METHODS:
            if self.density is None or not 0 < self.density <= 1:
                raise SurgeonError(
                    f"method {self.method} needs a density in (0, 1], the fraction of each delta's entries to keep."
                )
        elif self.density is not None:
            raise SurgeonError(f"density applies to {', '.join(DENSE_METHODS)}, not to method {self.method}.")
        if self.method in ("cat", "linear") and self.rule is not None:
            raise SurgeonError(f"method {self.method} keeps the ranks it is given; use method svd to choose a rank.")
        if self.method in FACTORED_METHODS and self.keep != "lora":
            raise SurgeonError(
                f"keeping the result as {self.keep} applies to {', '.join(DENSE_METHODS)}; method {self.method} gives "
                "a "
                "LoRA."
            )


# ---------------------------------------------------------------------------------------------
# The factored SVD


def factored_svd(
    ups: Sequence[torch.Tensor],
    downs: Sequence[torch.Tensor],
    coefficients: Sequence[float],
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vᵀ) with Σ cᵢ·upᵢ@downᵢ = U·diag(S)·Vᵀ, U m×q, Vᵀ q×k, q ≤ Σ rᵢ, S descending.

    Only m×R, R×k and R×R matrices are formed: up = Qᵤ·Rᵤ and downᵀ = Q_d·R_d give
    ΔW = Qᵤ·(Rᵤ·R_dᵀ)·Q_dᵀ, and the SVD of the core Rᵤ·R_dᵀ rotates the two orthonormal bases.
    A factor's column norm can pass fp32's range while ΔW stays well inside it (a few entries near
    the largest float): then the R's overflow, and the work is done again in fp64.
    """
    up = torch.cat([u.to(dtype) * c for u, c in zip(ups, coefficients)], dim=1)
    down = torch.cat([d.to(dtype) for d in downs], dim=0)
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    core = r_up @ r_down.T
    if dtype != torch.float64 and not (all_finite(core) and all_finite(q_up) and all_finite(q_down)):
        return factored_svd(ups, downs, coefficients, torch.float64)
    u_core, s, vh_core = torch.linalg.svd(core, full_matrices=False)
    return q_up @ u_core, s, vh_core @ q_down.T


# ---------------------------------------------------------------------------------------------
# PEFT's dense merge rules (peft.utils.merge_utils), stacked over the adapters of one module


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ⌊density·n⌋ entries of largest magnitude (PEFT's magnitude_based_pruning)."""
    if density >= 1:
        return delta
    flat = delta.reshape(-1)
    keep = int(density * flat.numel())
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[torch.topk(flat.abs(), k=keep, largest=True).indices] = True
    return (flat * mask).reshape(delta.shape)


def random_drop(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and divide the kept ones by it, so that
    the expectation is the delta itself. The draw is made on the generator's device (the CPU) and
    moved: the same seed drops the same entries on every device."""
    if density >= 1:
        return delta
    drawn = torch.rand(delta.shape, generator=generator, device=generator.device, dtype=delta.dtype)
    keep = drawn.to(delta.device) < density
    return delta * keep / density


def ties_merge(stacked: torch.Tensor, weights: torch.Tensor, method: str) -> torch.Tensor:
    """Elect a sign per entry (by total mass or by count of the unweighted deltas), then average the
    weighted entries that agree with it (PEFT's calculate_majority_sign_mask + disjoint_merge)."""
    sign = stacked.sign()
    mass = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    agree = sign == torch.where(mass >= 0, 1.0, -1.0).to(stacked.dtype)
    weighted = stacked * weights.reshape(-1, *([1] * (stacked.dim() - 1)))
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def combine_dense(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    options: ComposeOptions,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One module's deltas merged by ``options.method`` (a DENSE_METHODS entry)."""
    method, density = options.method, float(options.density)
    if method.startswith("dare"):
        pruned = [random_drop(d, density, generator) for d in deltas]
    else:
        pruned = [magnitude_mask(d, density) for d in deltas]
    stacked = torch.stack(pruned)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    if method in ("ties", "dare_ties"):
        return ties_merge(stacked, w, options.majority_sign)
    return torch.einsum("n,n...->...", w, stacked)


# ---------------------------------------------------------------------------------------------
# Composing adapters


@dataclass
class _Part:
    """One adapter's deltas on one key, by what they are: low-rank factors, other additive deltas
    (summed exactly), whole replacements, and updates that are none of these (DoRA)."""

    weight: float
    low: list[LowRank] = field(default_factory=list)
    exact: list[Delta] = field(default_factory=list)
    replace: list[Delta] = field(default_factory=list)

    @classmethod
    def of(cls, key: str, deltas: Sequence[Delta], weight: float) -> "_Part":
        part = cls(weight)
        for delta in deltas:
            if delta.replaces:
                part.replace.append(delta)
            elif delta.factored() is not None:
                part.low.append(delta.factored())
            elif delta.additive:
                part.exact.append(delta)
            else:  # appended vocabulary rows: nothing to add to another adapter's ΔW
                raise SurgeonError(
                    f"{key!r} has {delta.label}, which are no ΔW to combine with other deltas; merge "
                    "that adapter into the base instead (surgeon merge)."
                )
        return part

    @property
    def additive(self) -> list[Delta]:
        return [*self.low, *self.exact]

    @property
    def sparse(self) -> list[Delta]:
        return [d for d in self.exact if d.sparse_form() is not None]

    @property
    def dense(self) -> list[Delta]:
        return [d for d in self.exact if d.sparse_form() is None]


def _model_name(base: str) -> str:
    """A base model's name without where it was stored: ``org/Llama-2-7b``, ``/models/Llama-2-7b``
    and ``Llama-2-7b/`` are one model, as trainers record local paths and Hub ids alike."""
    return base.replace("\\", "/").rstrip("/").rpartition("/")[2].lower()


def check_compatible(adapters: Sequence[tuple[Adapter, str]], force: bool = False) -> None:
    """Adapters composed together must be made for one base: same base model name (unless
    ``force``) and, on every shared target, the same shape and module type."""
    bases = [(where, a.base_model) for a, where in adapters if a.base_model]
    differing = [(where, base) for where, base in bases if _model_name(base) != _model_name(bases[0][1])]
    if differing and not force:
        (first, one), (second, other) = bases[0], differing[0]
        raise SurgeonError(
            f"{second}: made for base {other!r} but {first} for {one!r}; adapters for different bases do not add up "
            "(force it if they are the same model under two names)."
        )
    _check_one_namespace(adapters)
    seen: dict[str, tuple[tuple[int, ...], str, str]] = {}
    for adapter, where in adapters:
        for key, deltas in adapter.items():
            kind = adapter.module_types.get(key, "linear")
            for delta in deltas:
                if key not in seen:
                    seen[key] = (tuple(delta.shape), kind, where)
                    continue
                shape, other_kind, other = seen[key]
                if kind == "other":  # a format that cannot tell (a sparse diff) agrees with any
                    kind = other_kind
                elif other_kind == "other":
                    seen[key] = (shape, kind, where)
                if tuple(delta.shape) != shape or kind != seen[key][1]:
                    raise SurgeonError(
                        f"{where}: {key!r} is a {kind} delta of shape {tuple(delta.shape)} but in {other} a "
                        f"{other_kind} "
                        f"delta of shape {shape}; the adapters were made for different models."
                    )


def _check_one_namespace(adapters: Sequence[tuple[Adapter, str]]) -> None:
    """Two adapters that name one parameter differently (``unet.model.x`` in a diffusers file,
    ``model.x`` in a PEFT one) would be summed as two targets: refused, as the base names both."""
    for adapter, where in adapters:
        for other, other_where in adapters:
            keys = other.deltas.keys()
            for key in adapter.deltas:
                parts = key.split(".")
                shorter = next((".".join(parts[i:]) for i in range(1, len(parts)) if ".".join(parts[i:]) in keys), None)
                if shorter is not None and key not in keys:
                    raise SurgeonError(
                        f"{where}: names {key!r} where {other_where} names {shorter!r}; "
                        "give the base checkpoint so that both are named by its keys."
                    )


def _common_dtype(deltas: Sequence[Delta]) -> torch.dtype:
    return promoted_dtype(d.stored_dtype for d in deltas)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sum_exact(parts: Sequence[_Part], key_shape: tuple[int, ...]) -> list[Delta]:
    """Σ wᵢ·(additive deltas that are not low-rank), kept exactly."""
    terms = [(d, p.weight) for p in parts for d in p.exact]
    return [exact_sum(terms, key_shape)] if terms else []


def _low_terms(parts: Sequence[_Part]) -> list[tuple[LowRank, float]]:
    return [(low, part.weight) for part in parts for low in part.low]


def _concat(terms: Sequence[tuple[LowRank, float]], shape, magnitude, axis) -> LowRank:
    """Σ w·s·up@down as one LowRank of rank Σr: weights and scales folded into the down factors
    (one common scale is kept when they all share a magnitude, so a negated adapter keeps its alpha)."""
    coefficients = [w * low.scale for low, w in terms]
    common = abs(coefficients[0])
    if common != 0 and all(math.isclose(abs(c), common, rel_tol=1e-12) for c in coefficients):
        factors, scale = [math.copysign(1.0, c) for c in coefficients], common
    else:
        factors, scale = coefficients, 1.0
    dtype = _common_dtype([low for low, _ in terms])
    up = torch.cat([low.up.to(dtype) for low, _ in terms], dim=1)
    down = torch.cat([(low.down.to(_compute_dtype(dtype)) * f).to(dtype) for (low, _), f in zip(terms, factors)], dim=0)
    return LowRank(down=down, up=up, scale=scale, shape=shape, magnitude=magnitude, magnitude_axis=axis)


def _linear(terms: Sequence[tuple[LowRank, float]], key: str, shape) -> LowRank:
    """PEFT's ``linear``: up = Σ √|cᵢ|·upᵢ and down = Σ sign(cᵢ)·√|cᵢ|·downᵢ, scale 1."""
    if len({low.rank for low, _ in terms}) > 1:
        ranks = ", ".join(str(low.rank) for low, _ in terms)
        raise SurgeonError(
            f"method linear adds the factors themselves, so it needs equal ranks, but {key!r} has ranks {ranks}; use "
            "cat or svd."
        )
    dtype = _common_dtype([low for low, _ in terms])
    work = _compute_dtype(dtype)
    up = sum(low.up.to(work) * math.sqrt(abs(w * low.scale)) for low, w in terms)
    down = sum(low.down.to(work) * math.copysign(math.sqrt(abs(w * low.scale)), w * low.scale) for low, w in terms)
    return LowRank(down=down.to(dtype), up=up.to(dtype), scale=1.0, shape=shape)


def _rule(options: ComposeOptions, ranks_in: Sequence[int]) -> RankRule:
    """The rank rule of a module: the one asked for, or PEFT's default of the largest input rank."""
    return options.rule if options.rule is not None else RankRule(rank=max(ranks_in, default=0), min_rank=0)


def _low_rank(u, s, vh, shape, dtype, magnitude=None, axis=0) -> LowRank | None:
    if s.numel() == 0:
        return None
    up, down = factor_split(u, s, vh, "balanced")
    return LowRank(
        down=down.to(dtype).cpu().contiguous(),
        up=up.to(dtype).cpu().contiguous(),
        shape=shape,
        magnitude=magnitude,
        magnitude_axis=axis,
    )


def _dora(terms: Sequence[tuple[LowRank, float]], key: str) -> tuple[torch.Tensor | None, int]:
    """The DoRA magnitude to carry: allowed only for a single adapter at weight 1, where the
    result approximates that adapter's own ΔW and its magnitudes keep their meaning."""
    doras = [low for low, _ in terms if low.is_dora]
    if not doras:
        return None, 0
    if len(terms) != 1 or terms[0][1] != 1.0:
        raise SurgeonError(
            f"{key!r} is a DoRA update, which rescales rows by a learned magnitude; a weighted sum of DoRA adapters "
            "has no defined magnitude, so only resizing a single DoRA adapter at weight 1 is supported."
        )
    return doras[0].magnitude, doras[0].magnitude_axis


def _materialize_part(part: _Part, shape, device, dtype) -> torch.Tensor:
    total = torch.zeros(shape, device=device, dtype=dtype)
    for delta in part.additive:
        if not delta.additive:
            raise SurgeonError(
                "a DoRA update has no additive ΔW for the ties, dare and magnitude_prune methods to act on; resize it "
                "instead."
            )
        total += delta.materialize(device, dtype)
    return total


def _compose_dense(
    key: str, parts: Sequence[_Part], shape, options: ComposeOptions
) -> tuple[list[Delta], ModuleReport]:
    ranks_in = [low.rank for p in parts for low in p.low]
    dtype = _common_dtype([d for p in parts for d in p.additive])
    work = _compute_dtype(dtype)
    deltas = [_materialize_part(p, shape, options.device, work) for p in parts]
    if options.method in DENSE_METHODS:
        merged = combine_dense(deltas, [p.weight for p in parts], options, key_generator(options.seed, key))
    else:  # svd of a module with dense parts: the weighted sum, factored to the rank asked for
        merged = sum(d * p.weight for d, p in zip(deltas, parts))
    del deltas
    report = ModuleReport(key, ranks_in, None)
    if options.keep == "dense" or (merged.dim() < 2 and options.keep == "lora"):
        return [Dense(merged.to(dtype).cpu())], report
    if options.keep == "sparse":
        flat = merged.reshape(-1)
        indices = flat.nonzero().reshape(-1)
        return [Sparse(indices.cpu(), flat[indices].to(dtype).cpu(), shape)], report
    # a randomized SVD (picked for a fixed rank on large modules) is seeded too, so runs repeat
    found = truncated_svd(
        merged.reshape(shape[0], -1), _rule(options, ranks_in), generator=torch.Generator().manual_seed(options.seed)
    )
    report.rank, report.relative_error = found.rank, math.sqrt(max(0.0, 1.0 - found.energy_kept))
    low = _low_rank(found.u, found.s, found.vh, shape, dtype)
    return ([low] if low is not None else []), report


def _compose_factored(
    key: str, parts: Sequence[_Part], shape, options: ComposeOptions
) -> tuple[list[Delta], ModuleReport]:
    if options.method == "svd" and options.rule is not None and any(p.dense for p in parts):
        # dense ΔWs (LoKr, a large LoHa) are factored with the LoRA terms; sparse diffs stay exact
        found, report = _compose_dense(key, [replace(p, exact=p.dense) for p in parts], shape, options)
        return found + _sum_exact([replace(p, low=[], exact=p.sparse) for p in parts], shape), report
    terms = _low_terms(parts)
    ranks_in = [low.rank for low, _ in terms]
    report = ModuleReport(key, ranks_in, sum(ranks_in) if terms else None)
    found: list[Delta] = []
    if terms:
        magnitude, axis = _dora(terms, key)
        if options.method == "cat":
            found.append(_concat(terms, shape, magnitude, axis))
        elif options.method == "linear":
            found.append(_linear(terms, key, shape))
            report.rank = ranks_in[0]
        else:
            dtype = _common_dtype([low for low, _ in terms])
            work = _compute_dtype(dtype)
            u, s, vh = factored_svd(
                [low.up.to(options.device) for low, _ in terms],
                [low.down.to(options.device) for low, _ in terms],
                [w * low.scale for low, w in terms],
                work,
            )
            spectrum = s.double().cpu()
            rank = min(
                _rule(options, ranks_in).choose(spectrum), numerical_rank(spectrum, (u.shape[0], vh.shape[1]), work)
            )
            report.rank, report.relative_error = rank, tail_error(spectrum, rank)
            low = _low_rank(u[:, :rank], s[:rank], vh[:rank], shape, dtype, magnitude, axis)
            found.extend([low] if low is not None else [])
    return found + _sum_exact(parts, shape), report


def compose(
    adapters: Sequence[tuple[Adapter, str]],
    weights: Sequence[float] | None = None,
    options: ComposeOptions = ComposeOptions(),
    *,
    force: bool = False,
    on_key: Callable[[str], None] | None = None,
) -> tuple[Adapter, ComposeReport]:
    """The adapters combined by ``options.method``, each scaled by its weight (negative to subtract).

    Targets are the union of the adapters' targets; a target that only some adapters have is
    combined from those. Whole-module replacements (``modules_to_save``) are carried over as they
    are, whatever the weight, and refused when two adapters replace one module differently.
    """
    started = time.perf_counter()
    weights = one_weight_each(weights, adapters)
    if not adapters:
        raise SurgeonError("give at least one adapter to compose.")
    check_compatible(adapters, force)
    first = adapters[0][0]
    result = Adapter(
        source_format=first.source_format,
        base_model=next((a.base_model for a, _ in adapters if a.base_model), None),
        config=dict(first.config),
    )
    report = ComposeReport(method=options.method, adapters=len(adapters), weights=weights)
    keys = list(dict.fromkeys(k for adapter, _ in adapters for k in adapter.deltas))
    for key in keys:
        parts = [
            (_Part.of(key, a.deltas[key], w), where) for (a, where), w in zip(adapters, weights) if key in a.deltas
        ]
        module_type = min(
            (a.module_types.get(key, "linear") for a, _ in adapters if key in a.deltas), key=lambda t: t == "other"
        )
        shape = tuple(next(iter(a.deltas[key][0] for a, _ in adapters if key in a.deltas)).shape)
        for delta in _replacements(key, parts):
            result.add(key, delta, module_type)
        additive = [p for p, _ in parts if p.additive]
        if additive:
            combine = _compose_dense if options.method in DENSE_METHODS else _compose_factored
            deltas, module = combine(key, additive, shape, options)
            _refuse_overflow(key, deltas)
            for delta in deltas:
                result.add(key, delta, module_type)
            if module.ranks_in or module.rank is not None:
                report.modules.append(module)
        if on_key is not None:
            on_key(key)
    report.seconds = time.perf_counter() - started
    return result, report


def _refuse_overflow(key: str, deltas: Sequence[Delta]) -> None:
    """Finite inputs can still combine past their dtype's range (large weights, fp16 factors): that
    result is refused rather than written."""
    if not all(all_finite(t) for d in deltas for t in d.tensors()):
        raise SurgeonError(
            f"composing {key!r} gives values beyond the range of its dtype (Inf or NaN); use smaller weights or "
            "check the adapters' values."
        )


def _replacements(key: str, parts: Sequence[tuple[_Part, str]]) -> list[Delta]:
    """A whole-module replacement (modules_to_save, or the saved base layer of a targeted embedding)
    is not a delta: weights do not scale it, and it is carried over as it is. Two adapters may
    carry the same one (the base layer both saved); two different ones cannot be combined."""
    holders = [(p, where) for p, where in parts if p.replace]
    for part, where in holders[1:]:
        if len(part.replace) != len(holders[0][0].replace) or not all(
            torch.equal(a.materialize(dtype=a.stored_dtype), b.materialize(dtype=b.stored_dtype))
            for a, b in zip(part.replace, holders[0][0].replace)
        ):
            raise SurgeonError(
                f"{where}: replaces {key!r} whole (modules_to_save) with other values than {holders[0][1]} does; "
                "two replacements cannot be combined, so drop that module from one adapter."
            )
    return holders[0][0].replace if holders else []


def read_adapters(
    paths: Sequence[str | Path], format_name: str | None = None, base: Checkpoint | None = None
) -> list[tuple[Adapter, str]]:
    """The adapters at ``paths`` for :func:`compose` and :func:`resize`, each with where it came
    from. With ``base`` they are read against it and named by its keys: kohya, LyCORIS and GGUF
    names resolve only against the base, and an (IA)³ ΔW is computed from its weights."""
    from surgeon import formats

    loaded = [(formats.read_adapter(Path(p), format_name, base=base), str(p)) for p in paths]
    for adapter, where in loaded:
        refuse_nonfinite(adapter, where)
    if base is None:
        return loaded
    return list(zip(prepare(loaded, base, allow_nonfinite=True), [where for _, where in loaded]))


def resize(
    adapter: Adapter,
    rule: RankRule,
    device: torch.device = torch.device("cpu"),
    on_key: Callable[[str], None] | None = None,
) -> tuple[Adapter, ComposeReport]:
    """The optimal (Eckart–Young) truncation of every low-rank delta of ``adapter`` by ``rule``."""
    return compose([(adapter, "adapter")], [1.0], ComposeOptions(method="svd", rule=rule, device=device), on_key=on_key)
