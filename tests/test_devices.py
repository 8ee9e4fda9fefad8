"""Every operation that takes a device, on each device at hand, against a reference computed
independently on the CPU in fp64 (PEFT's own merge, numpy's SVD, the rules restated).

On CPU these exercise the device code paths (prefetching reader, workspace, driver choice);
with a GPU the CUDA cases run too, and agreeing with the same reference is agreeing with the
CPU. Merge covers each delta kind PEFT writes (LoRA, DoRA, LoHa, LoKr, IA3, VeRA), extract
every method and rank rule and the sparse residual, compose svd, ties and dare, and resize.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fixtures import make_image_fixtures as fx
from surgeon import formats
from surgeon.checkpoint import Checkpoint
from surgeon.delta import Adapter, LowRank
from surgeon.keys import key_generator
from surgeon.ops.compose import ComposeOptions, compose, resize
from surgeon.ops.extract import ExtractOptions, extract
from surgeon.ops.merge import merge, unmerge
from surgeon.ops.rank import RankRule

peft = pytest.importorskip("peft")

DEVICES = [
    pytest.param("cpu"),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
TARGETS = ["fc1", "fc2", "conv", "pw"]
TUNERS = {
    "lora": lambda: peft.LoraConfig(r=3, lora_alpha=6, target_modules=TARGETS),
    "dora": lambda: peft.LoraConfig(r=3, lora_alpha=6, target_modules=["fc1", "fc2"], use_dora=True),
    "loha": lambda: peft.LoHaConfig(r=2, alpha=3, target_modules=TARGETS),
    "lokr": lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=TARGETS, decompose_both=True, decompose_factor=2),
    "ia3": lambda: peft.IA3Config(target_modules=TARGETS, feedforward_modules=["fc2", "pw"]),
    "vera": lambda: peft.VeraConfig(r=4, target_modules=["fc1", "fc2"]),
}
FACTORS = ("lora_A", "lora_B", "lora_magnitude", "hada_", "lokr_", "ia3_", "vera_lambda")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with fx.single_thread():
        yield


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """(base dir, {kind: (adapter dir, PEFT's merged state dict)}) for each tuner kind."""
    root = tmp_path_factory.mktemp("devices")
    base = fx.save_module(fx.TinyNet(), root / "base")
    made = {}
    for kind, config in TUNERS.items():
        model = peft.get_peft_model(fx.TinyNet(), config())
        fx.randomise(model, lambda n: any(t in n for t in FACTORS), seed=3)
        model.save_pretrained(root / kind)
        made[kind] = (root / kind, {k: v.detach().double() for k, v in model.merge_and_unload().state_dict().items()})
    return base, made


def assert_close_to(path: Path, reference: dict[str, torch.Tensor], rtol: float = 1e-5) -> None:
    out = Checkpoint(path)
    assert set(out.keys()) == set(reference)
    for key, expected in reference.items():
        scale = float(expected.abs().max())
        assert float((out.get(key).double() - expected).abs().max()) <= rtol * scale + 1e-7, key


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(TUNERS))
def test_merge_and_unmerge_on_device(tuned, tmp_path, device, kind):
    base_dir, made = tuned
    adapter_dir, reference = made[kind]
    base = Checkpoint(base_dir)
    adapter = formats.read_adapter(adapter_dir, base=base)
    (tmp_path / "merged").mkdir()
    report = merge(base, [(adapter, kind)], tmp_path / "merged", device=torch.device(device))
    assert report.device == device
    assert_close_to(tmp_path / "merged", reference)
    if kind in ("dora", "ia3", "vera"):
        return  # not invertible from the merged weights alone (row norms, zero scales); unmerge refuses them
    (tmp_path / "base").mkdir()
    unmerge(Checkpoint(tmp_path / "merged"), [(adapter, kind)], tmp_path / "base", device=torch.device(device))
    assert_close_to(tmp_path / "base", {k: v.double() for k, v in fx.TinyNet().state_dict().items()})


# --- extract ---------------------------------------------------------------------------------


def decaying_delta(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A delta with singular values 1/(i+1): every rank rule has a clear answer on it."""
    gen = torch.Generator().manual_seed(seed)
    m, n = shape[0], math.prod(shape[1:])
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q
    return ((u / (torch.arange(k) + 1.0)) @ v.T * 0.05).float().reshape(shape)


EXTRACT_SHAPES = {"wide.weight": (96, 160), "tall.weight": (160, 96), "conv.weight": (24, 8, 3, 3)}


@pytest.fixture(scope="module")
def extract_pair(tmp_path_factory):
    """(base dir, tuned dir, true deltas): fp32 weights, one changed norm."""
    root = tmp_path_factory.mktemp("extract")
    gen = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=gen) * 0.1 for k, s in EXTRACT_SHAPES.items()}
    base["norm.weight"] = torch.ones(96)
    deltas = {k: decaying_delta(s, i) for i, (k, s) in enumerate(EXTRACT_SHAPES.items())}
    tuned = {k: v + deltas[k] if k in deltas else v + 0.01 for k, v in base.items()}
    for name, tensors in (("base", base), ("tuned", tuned)):
        (root / name).mkdir()
        save_file(tensors, root / name / "model.safetensors")
    true = {k: (tuned[k].double() - base[k].double()).reshape(s[0], -1) for k, s in EXTRACT_SHAPES.items()}
    return root / "base", root / "tuned", true


def smallest_rank(spectrum: np.ndarray, energy: float | None = None, max_error: float | None = None) -> int:
    kept = np.cumsum(spectrum**2) / (spectrum**2).sum()
    if energy is not None:
        return int(np.argmax(kept >= energy - 1e-12)) + 1
    return int(np.argmax(np.sqrt(np.clip(1 - kept, 0, None)) <= max_error)) + 1


EXTRACTIONS = {
    "exact": dict(rule=RankRule(rank=6), method="exact"),
    "gram": dict(rule=RankRule(rank=6), method="gram"),
    "randomized": dict(rule=RankRule(rank=6), method="randomized"),
    "energy": dict(rule=RankRule(energy=0.9), method="auto"),
    "max-error": dict(rule=RankRule(max_error=0.3), method="gram"),
    "sparse": dict(rule=RankRule(rank=4), method="exact", sparse_density=0.05),
    "prefetch": dict(rule=RankRule(rank=6), method="auto", prefetch=2),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(EXTRACTIONS))
def test_extract_on_device_is_the_optimal_truncation(extract_pair, device, case):
    base, tuned, true = extract_pair
    options = ExtractOptions(device=torch.device(device), **EXTRACTIONS[case])
    found = extract(Checkpoint(base), Checkpoint(tuned), options)
    rows = {r.key: r for r in found.rows}
    assert rows["norm.weight"].delta_norm == pytest.approx(0.01 * math.sqrt(96), rel=1e-4)
    for key, delta in true.items():
        u, s, vh = np.linalg.svd(delta.numpy(), full_matrices=False)
        rule = options.rule
        rank = rule.rank if rule.rank is not None else smallest_rank(s, rule.energy, rule.max_error)
        assert rows[key].rank == rank, key
        optimal = (u[:, :rank] * s[:rank]) @ vh[:rank]
        ours = found.lora.deltas[key][0].materialize(dtype=torch.float64).reshape(delta.shape).numpy()
        tolerance = 2e-2 if options.method == "randomized" else 1e-4
        assert np.linalg.norm(ours - optimal) <= tolerance * np.linalg.norm(s[rank:]), key
        assert rows[key].relative_error == pytest.approx(np.linalg.norm(s[rank:]) / np.linalg.norm(s), rel=1e-3)
        if options.sparse_density:
            residual = np.sort(np.abs(delta.numpy() - optimal).ravel())[::-1]
            kept = math.ceil(options.sparse_density * residual.size)
            expected = np.sqrt((residual[kept:] ** 2).sum()) / np.linalg.norm(s)
            assert rows[key].relative_error_with_sparse == pytest.approx(expected, rel=1e-3)
            sparse = found.sparse.deltas[key][0].materialize(dtype=torch.float64).reshape(delta.shape).numpy()
            left = np.linalg.norm(delta.numpy() - optimal - sparse) / np.linalg.norm(s)
            assert left == pytest.approx(expected, rel=1e-3)


# --- compose and resize ----------------------------------------------------------------------


def random_lora(seed: int, rank: int, shapes: dict[str, tuple[int, int]]) -> Adapter:
    gen = torch.Generator().manual_seed(seed)
    adapter = Adapter(source_format="test", base_model="base")
    for key, (m, n) in shapes.items():
        adapter.add(
            key,
            LowRank(
                down=torch.randn(rank, n, generator=gen),
                up=torch.randn(m, rank, generator=gen) * 0.1,
                scale=0.5,
                shape=(m, n),
            ),
        )
    return adapter


COMPOSE_SHAPES = {"q.weight": (48, 40), "o.weight": (40, 48)}


def dense(adapter: Adapter, key: str) -> torch.Tensor:
    return sum(d.materialize(dtype=torch.float64) for d in adapter.deltas[key])


def truncated(delta: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def ties_reference(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """PEFT's TIES restated: trim each delta to its top entries, elect a sign by total mass, average the agreeing."""
    trimmed = []
    for d in deltas:
        keep = int(density * d.numel())
        threshold = d.abs().reshape(-1).topk(keep).values[-1]
        trimmed.append(d * (d.abs() >= threshold))
    stacked = torch.stack(trimmed)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).double()
    agree = stacked.sign() == sign
    weighted = stacked * torch.tensor(weights, dtype=torch.float64)[:, None, None]
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def dare_reference(
    deltas: list[torch.Tensor], weights: list[float], density: float, key: str, seed: int
) -> torch.Tensor:
    """DARE restated: each delta's entries kept by the key's CPU random stream, rescaled, summed by weight."""
    generator = key_generator(seed, key)
    total = 0
    for d, w in zip(deltas, weights):
        keep = torch.rand(d.shape, generator=generator, dtype=torch.float32) < density
        total = total + w * d * keep / density
    return total


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["svd", "ties", "dare_linear"])
def test_compose_on_device_matches_the_rule(device, method):
    adapters = [random_lora(1, 4, COMPOSE_SHAPES), random_lora(2, 4, COMPOSE_SHAPES)]
    weights = [1.0, -0.7]
    density = None if method == "svd" else 0.5
    rule = RankRule(rank=5) if method == "svd" else None
    options = ComposeOptions(
        method=method,
        rule=rule,
        density=density,
        keep="dense" if density else "lora",
        device=torch.device(device),
        seed=3,
    )
    out, _ = compose([(a, f"a{i}") for i, a in enumerate(adapters)], weights, options)
    for key in COMPOSE_SHAPES:
        deltas = [dense(a, key).float().double() for a in adapters]
        if method == "svd":
            expected = truncated(sum(w * d for d, w in zip(deltas, weights)), 5)
        elif method == "ties":
            expected = ties_reference(deltas, weights, density)
        else:
            expected = dare_reference([d.float() for d in deltas], weights, density, key, seed=3).double()
        torch.testing.assert_close(dense(out, key), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
def test_resize_on_device_is_the_optimal_truncation(device):
    adapter = random_lora(5, 8, COMPOSE_SHAPES)
    out, report = resize(adapter, RankRule(rank=3), device=torch.device(device))
    for key in COMPOSE_SHAPES:
        assert out.deltas[key][0].rank == 3
        expected = truncated(dense(adapter, key), 3)  # fp32 on the device: tolerance relative to the largest entry
        torch.testing.assert_close(dense(out, key), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
