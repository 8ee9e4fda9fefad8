"""Truncated SVD of one weight delta, by the cheapest method that is accurate enough.

Three methods, all returning the leading singular triplets of ``A`` (m×n, k = min(m, n)):

``exact``
    ``torch.linalg.svd`` (reduced) in the requested precision, of the tall orientation (Aᵀ when
    m < n: twice as fast with LAPACK's gesdd on CPU, which this is, and required by gesvda).
    On CUDA the driver is chosen: fp32 uses cuSOLVER's ``gesvda`` on the tall orientation (≈8×
    faster than the default ``gesvdj`` on a 4096² matrix, approximate only in the trailing
    triplets, which truncation drops; the residual extract reports is measured, not assumed),
    checked, and replaced by ``gesvd`` where it fails or is inaccurate (ill-conditioned or
    rank-deficient matrices); fp64 uses ``gesvd`` (QR based, the most accurate).
``gram``
    Eigen-decomposition of the k×k Gram matrix (AᵀA or AAᵀ) formed and decomposed in fp64, then
    the other factor as A·V/σ. Squaring the spectrum costs accuracy only for σᵢ/σ₁ below ~1e-8
    in fp64, far under fp32 round-off of the weights, and it is 2–3× faster than ``exact`` on CPU
    and about as fast as ``gesvda`` on a GPU. Full spectrum, like ``exact``.
``randomized``
    A randomized block Krylov method (Musco & Musco 2015; Halko, Martinsson & Tropp 2011 §4.6):
    block Golub–Kahan–Lanczos from a Gaussian start, blocks of r/2 columns (at least 16), full
    reorthogonalisation, Rayleigh–Ritz on the Krylov basis. Cost O(mn·d) for a basis of
    d ≤ 6·max(r, 16) columns instead of O(mnk). On a flat noise tail (the hard case: rank-32 signal
    plus noise, rank 64) it is within 0.01% of the Eckart–Young error where Halko's subspace
    iteration with the same number of matrix products is 0.2% above it. It stops when a step no
    longer adds ``KRYLOV_TOLERANCE`` of the residual energy, so decaying spectra cost fewer steps;
    where the Krylov space turns invariant early (repeated singular values) it continues from
    fresh random directions. It needs the rank up front and yields only the top d singular values,
    so it serves fixed ``--rank``.

``auto`` picks ``randomized`` for a fixed rank small against the matrix (8r ≤ k, k ≥ 256, where
the Krylov basis is much smaller than the matrix) and ``gram`` otherwise (energy / error budgets
need the whole spectrum). Small matrices (k < 64) go to ``exact``, where speed does not matter
and it is the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from surgeon.choices import SVD_METHODS as METHODS
from surgeon.errors import SurgeonError
from surgeon.ops.norms import frobenius_norm
from surgeon.ops.rank import RankRule

SPLITS = ("balanced", "left", "right")
KRYLOV_TOLERANCE = 3e-5  # stop when a step adds less than this fraction of the residual energy
KRYLOV_DIMENSIONS = 6  # the Krylov basis holds at most this many times the rank


@dataclass
class Factorization:
    """The kept triplets of A ≈ u·diag(s)·vh, with what is needed to judge them.

    ``spectrum`` holds every singular value the method computed (all k for exact/gram, the Ritz
    values of the Krylov basis for randomized), descending, in fp64 on the CPU; ``total_energy`` is ‖A‖²_F.
    """

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    spectrum: torch.Tensor
    total_energy: float
    method: str

    @property
    def rank(self) -> int:
        return int(self.s.numel())

    @property
    def energy_kept(self) -> float:
        """Fraction of ‖A‖²_F that the kept triplets carry."""
        kept = float(self.s.double().square().sum())
        return min(1.0, kept / self.total_energy) if self.total_energy else 1.0


def choose_method(shape: tuple[int, int], rule: RankRule) -> str:
    """The method ``auto`` resolves to for a matrix of ``shape`` (see the module docstring)."""
    k = min(shape)
    if k < 64:
        return "exact"
    if rule.rank is not None and k >= 256 and 8 * rule.rank <= k:
        return "randomized"
    return "gram"


def truncated_svd(
    matrix: torch.Tensor,
    rule: RankRule | int,
    method: str = "auto",
    precision: torch.dtype = torch.float32,
    tolerance: float = KRYLOV_TOLERANCE,
    generator: torch.Generator | None = None,
) -> Factorization:
    """The leading singular triplets of a 2-D ``matrix``, as many as ``rule`` admits.

    ``rule`` is a :class:`RankRule` or a plain rank. The factors come back in ``precision`` on
    the matrix's device; ranks above the numerical rank are cut to the non-zero singular values.
    """
    if matrix.dim() != 2:
        raise SurgeonError(f"truncated_svd takes a matrix; got a tensor of shape {tuple(matrix.shape)}.")
    if isinstance(rule, int):
        rule = RankRule(rank=rule, min_rank=0)
    if method not in METHODS:
        raise SurgeonError(f"unknown SVD method {method!r}; choose one of {', '.join(METHODS)}.")
    if method == "auto":
        method = choose_method(tuple(matrix.shape), rule)
    a = matrix.to(precision)
    total = frobenius_norm(a) ** 2
    if method == "randomized":
        if rule.rank is None:
            raise SurgeonError(
                "the randomized SVD needs a fixed rank; use method exact or gram with energy or max_error."
            )
        u, s, vh = _randomized(a, rule.rank, total, generator, tolerance)
    elif method == "gram":
        u, s, vh = _gram(a)
    else:
        u, s, vh = _exact(a)
    spectrum = s.detach().double().cpu()
    rank = min(rule.choose(spectrum), numerical_rank(spectrum, tuple(a.shape), precision, squared=method != "exact"))
    return Factorization(
        u[:, :rank].contiguous(), s[:rank].contiguous(), vh[:rank].contiguous(), spectrum, total, method
    )


def factor_split(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, split: str = "balanced"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(left m×r, right r×n) with left @ right = u·diag(s)·vh.

    ``balanced`` gives each side √s, so both factors have the same scale (what LoRA training
    expects of its A and B); ``left``/``right`` put all of s on that side, leaving the other
    orthonormal.
    """
    if split == "balanced":
        root = s.sqrt()
        return u * root, root[:, None] * vh
    if split == "left":
        return u * s, vh.clone()
    if split == "right":
        return u.clone(), s[:, None] * vh
    raise SurgeonError(f"unknown factor split {split!r}; choose one of {', '.join(SPLITS)}.")


def round_off(shape: tuple[int, int], precision: torch.dtype, squared: bool = False) -> float:
    """The relative level, against σ₁, below which a computed singular value is round-off.

    A backward-stable SVD of an m×n matrix in precision ε perturbs it by about ε·√max(m, n)·σ₁;
    this takes four times that. (``torch.linalg.matrix_rank``'s ε·max(m, n) is a worst case that
    reaches 1.5% of σ₁ on a 128k-row lm_head and would discard real signal.) Methods that square
    the spectrum (``gram``, ``randomized``) resolve σ only down to √(ε₆₄·max(m, n))·σ₁, which
    matters with fp64 precision only.
    """
    level = 4 * torch.finfo(precision).eps * max(shape) ** 0.5
    return max(level, (torch.finfo(torch.float64).eps * max(shape)) ** 0.5) if squared else level


def numerical_rank(
    spectrum: torch.Tensor, shape: tuple[int, int], precision: torch.dtype, squared: bool = False
) -> int:
    """How many singular values stand above :func:`round_off`: triplets below it are noise, and a
    fixed rank above the numerical rank is cut to it rather than filled with noise."""
    if spectrum.numel() == 0 or float(spectrum[0]) == 0.0:
        return 0
    return int((spectrum > spectrum[0] * round_off(shape, precision, squared)).sum())


def _exact(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if a.shape[0] < a.shape[1]:  # decompose Aᵀ = V S Uᵀ: LAPACK's gesdd is ~2× faster on the tall side, gesvda needs it
        v, s, uh = _exact(a.T)
        return uh.T, s, v.T
    *fast, reliable = svd_drivers(a)
    for driver in fast:
        try:
            found = torch.linalg.svd(a, full_matrices=False, driver=driver)
        except torch.linalg.LinAlgError:  # gesvda reports non-convergence (cuSOLVER info > 0) on ill-conditioned input
            continue
        if _reconstructs(a, *found):
            return found
    return torch.linalg.svd(a, full_matrices=False, driver=reliable)


def svd_drivers(a: torch.Tensor) -> tuple[str | None, ...]:
    """The ``torch.linalg.svd`` drivers to try on the tall matrix ``a``, fastest first; all but
    the last are checked and may be passed over (see :func:`_reconstructs`).

    On CUDA fp32, cuSOLVER's ``gesvda`` first: ≈8× faster than the default on a 4096² matrix, but
    an approximate method for tall, well-conditioned matrices that fails to converge (or comes
    back inaccurate) on others, so QR-based ``gesvd`` stands behind it. fp64 goes to ``gesvd``
    alone, and CPU to LAPACK's default (no driver choice there).
    """
    if a.device.type != "cuda":
        return (None,)
    return ("gesvd",) if a.dtype == torch.float64 else ("gesvda", "gesvd")


def _reconstructs(a: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> bool:
    """Whether an approximate driver's answer is an SVD of A: finite, descending singular values,
    ‖A − u·diag(s)·vh‖_F within 16× :func:`round_off` of ‖A‖_F (a backward-stable SVD's error), and
    orthonormal singular vectors (columns for small σ barely show in the reconstruction, but the
    truncated factors keep them). A few matrix products, far cheaper than the SVD; torch does not
    pass on gesvda's own residual."""
    if not bool(torch.isfinite(s).all()) or bool((s[1:] > s[:-1] * (1 + 1e-5)).any()):
        return False
    level = 16 * round_off(tuple(a.shape), a.dtype)
    error = frobenius_norm(a - (u * s) @ vh)
    if not (math.isfinite(error) and error <= level * frobenius_norm(a)):
        return False
    eye = torch.eye(s.numel(), dtype=u.dtype, device=u.device)
    bound = level * math.sqrt(s.numel())
    return frobenius_norm(u.mT @ u - eye) <= bound and frobenius_norm(vh @ vh.mT - eye) <= bound


def _gram(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    wide = a.shape[0] < a.shape[1]
    x = a.double()
    x = x.T if wide else x  # now tall: m ≥ n, and the Gram matrix is n×n
    values, vectors = torch.linalg.eigh(x.T @ x)
    values, vectors = values.flip(0), vectors.flip(1)  # descending
    s = values.clamp_min(0).sqrt()
    keep = numerical_rank(s.cpu(), tuple(a.shape), a.dtype, squared=True)
    s, vectors = s[:keep], vectors[:, :keep]
    left = (x @ vectors) / s
    u, vh = (vectors, left.T) if wide else (left, vectors.T)
    return u.to(a.dtype), s.to(a.dtype), vh.to(a.dtype)


def _orthonormal_block(y: torch.Tensor, basis: torch.Tensor, recent: int, floor: float) -> torch.Tensor:
    """An orthonormal basis of the part of y's columns orthogonal to ``basis`` (orthonormal
    columns), leaving out directions shorter than ``floor``: those are round-off, and keeping
    them would fill the basis with noise.

    In exact arithmetic a Lanczos block is orthogonal to all of the basis but its ``recent``
    last columns; projecting those out first leaves only round-off for the one pass against the
    whole basis. The block itself is orthonormalised twice through the eigen-decomposition of its
    small Gram matrix (SVQB: matrix products only, several times cheaper than Householder QR on
    CPU; the second round repairs what the first lost to round-off). When the block came out much
    shorter than it went in, scaling it magnified what round-off left of the basis in it, so the
    second round projects again.
    """
    if recent:
        last = basis[:, -recent:]
        y = y - last @ (last.T @ y)
    before = float(torch.linalg.vector_norm(y, dim=0).max()) if y.numel() else 0.0
    if basis.shape[1]:
        y = y - basis @ (basis.T @ y)
    for round_ in range(2):
        scale = float(y.abs().max()) if y.numel() else 0.0
        if scale == 0.0:
            return y[:, :0]
        y = y / scale  # the Gram matrix is formed in the working precision: keep it clear of overflow and underflow
        values, vectors = torch.linalg.eigh((y.T @ y).double())
        keep = values > (floor / scale) ** 2
        if not keep.any():
            return y[:, :0]
        shortest = scale * float(values[keep][0]) ** 0.5
        y = y @ (vectors[:, keep] / values[keep].sqrt()).to(y.dtype)
        if round_ == 0 and basis.shape[1] and shortest < 1e-2 * before:
            y = y - basis @ (basis.T @ y)
        floor = 0.5  # the second round sees an almost orthonormal block: only a collapse is dropped
    return y


def krylov_block(rank: int) -> int:
    """Columns per Krylov block: half the rank (at least 16). Halko et al.'s subspace iteration
    uses r + p columns and few steps; more, narrower steps reach a given error with far fewer
    matrix products, since the polynomial degree is what counts on a flat spectral tail."""
    return max(16, -(-rank // 2))


class _Convergence:
    """When to stop the Krylov iteration: once a step adds less than ``tolerance`` of the
    residual energy to the top-r Ritz values.

    Each test is an eigenvalue decomposition of the growing Gram matrix (a third of a step's
    cost at rank 64), so tests are spaced: gains fall about geometrically, and two tests on
    consecutive steps give the rate at which to predict the step where the gain will reach the
    tolerance; testing resumes there. Until the basis holds 3r columns no test is made: every
    step gains much there.
    """

    def __init__(self, rank: int, block: int, total_energy: float, tolerance: float):
        self.rank, self.block, self.total, self.tolerance = rank, block, total_energy, tolerance
        self.next_test, self.captured, self.last_gain, self.last_columns = 3 * rank, None, None, None

    def converged(self, gram: torch.Tensor) -> bool:
        columns = gram.shape[0]
        if columns < self.next_test:
            return False
        captured = float(torch.linalg.eigvalsh(gram)[-self.rank :].sum())
        target = self.tolerance * max(self.total - captured, 0.0)
        gain = None if self.captured is None else captured - self.captured
        if gain is not None and gain <= target:
            return True
        self.next_test = columns + self.block
        consecutive = self.last_columns is not None and columns - self.last_columns <= self.block
        if gain is not None and consecutive and self.last_gain and 0 < gain < self.last_gain and target > 0:
            rate = gain / self.last_gain
            self.next_test = columns + self.block * max(1, math.ceil(math.log(target / gain) / math.log(rate)) - 1)
        self.captured, self.last_gain, self.last_columns = captured, gain, columns
        return False


def _randomized(
    a: torch.Tensor, rank: int, total_energy: float, generator: torch.Generator | None, tolerance: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized block Krylov SVD: block Golub–Kahan–Lanczos from a Gaussian start with full
    reorthogonalisation, then Rayleigh–Ritz on the left Krylov basis Q.

    Every step costs one product with A and one with Aᵀ on a block of b columns; the products
    AᵀQᵢ are the rows of B = QᵀA, so the projection needs no pass of its own. It stops once a
    step adds less than ``tolerance`` of the residual energy ‖A‖² − Σθᵢ² to the top-r Ritz
    values θ (early on decaying spectra, later on flat noise tails), at a basis of
    ``KRYLOV_DIMENSIONS``·max(r, b) columns, or when the basis holds all but ``tolerance`` of ‖A‖².
    Where the Krylov space turns invariant before that (repeated or nearly equal singular values
    in a cluster wider than a block), the next block is filled up with fresh random directions.
    """
    m, n = a.shape
    if rank == 0:
        return a.new_zeros(m, 0), a.new_zeros(0), a.new_zeros(0, n)
    if m < n:  # the tall orientation keeps the Gram matrices small (n×n at most)
        v, s, uh = _randomized(a.T, rank, total_energy, generator, tolerance)
        return uh.T, s, v.T
    block = min(krylov_block(rank), n)
    width = min(KRYLOV_DIMENSIONS * max(rank, block), n)
    left = a.new_empty(m, width)  # Q: the left Krylov basis
    right = a.new_empty(n, width)  # the right Krylov basis
    rows = torch.empty(n, width, dtype=torch.float64, device=a.device)  # Bᵀ = AᵀQ
    gram = torch.zeros(width, width, dtype=torch.float64, device=a.device)  # B·Bᵀ, grown a block at a time
    v = a.new_empty(n, 0)
    floor, done_left, done_right, fresh = 0.0, 0, 0, False
    convergence = _Convergence(rank, block, total_energy, tolerance)
    while done_left < width and done_right < width:
        if (
            v.shape[1] < block
        ):  # part of the Krylov space is invariant (or this is the start): go on from random directions
            outside = total_energy - float(gram.diagonal()[:done_left].sum())  # ‖A‖² − ‖QᵀA‖²
            if done_left and outside <= tolerance * total_energy:
                break
            random = torch.randn(n, block - v.shape[1], dtype=a.dtype, device="cpu", generator=generator).to(a.device)
            v = torch.cat([v, _orthonormal_block(random, torch.cat([right[:, :done_right], v], 1), 0, 0.0)], 1)
            fresh = True
        v = v[:, : width - done_right]
        if not v.shape[1]:
            break
        right[:, done_right : done_right + v.shape[1]] = v
        done_right += v.shape[1]
        y = a @ v
        if not done_left:  # directions shorter than this are round-off
            floor = float(torch.linalg.matrix_norm(y, 2)) * round_off((m, n), a.dtype)
        u = _orthonormal_block(y, left[:, :done_left], block if done_left else 0, floor)[:, : width - done_left]
        if not u.shape[1]:
            if fresh:  # even random directions add nothing above round-off
                break
            v = v[:, :0]
            continue
        fresh = False
        step = slice(done_left, done_left + u.shape[1])
        w = (u.T @ a).T  # as uᵀA: MKL is ~25% faster on this layout than on Aᵀu
        left[:, step], rows[:, step] = u, w
        gram[step, : step.stop] = rows[:, step].T @ rows[:, : step.stop]
        gram[: step.start, step] = gram[step, : step.start].T  # the diagonal block is already whole
        done_left = step.stop
        if convergence.converged(gram[:done_left, :done_left]):
            break
        v = _orthonormal_block(w, right[:, :done_right], v.shape[1], floor)
    values, vectors = torch.linalg.eigh(gram[:done_left, :done_left])
    s = values.flip(0).clamp_min(0).sqrt()
    top = vectors.flip(1)[:, :rank]
    vh = ((rows[:, :done_left] @ top) / s[: top.shape[1]].clamp_min(torch.finfo(torch.float64).tiny)).T
    return left[:, :done_left] @ top.to(a.dtype), s.to(a.dtype), vh.to(a.dtype)
