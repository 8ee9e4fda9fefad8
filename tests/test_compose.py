"""compose and resize: exactness against the materialised sums, optimality against a dense SVD,
agreement with PEFT's own add_weighted_adapter, DARE's statistics, and the memory bound."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch.utils._python_dispatch import TorchDispatchMode

from fixtures.make_fixtures import load_base, make_base, make_lora
from surgeon.cli import main
from surgeon.delta import Adapter, Dense, LowRank, Replace, Sparse
from surgeon.errors import SurgeonError
from surgeon.formats import peft as peft_format
from surgeon.ops.compose import ComposeOptions, combine_dense, compose, resize
from surgeon.ops.rank import RankRule

ROOT = Path(__file__).resolve().parent.parent
LLAMA = ROOT / "fixtures" / "tiny-llama"
LORA_A = ROOT / "fixtures" / "tiny-llama-lora"


@pytest.fixture(scope="module")
def lora_b(tmp_path_factory) -> Path:
    """A second LoRA on the same base, same rank, another alpha and other values."""
    return make_lora("llama", LLAMA, tmp_path_factory.mktemp("b") / "lora", seed=7, r=8, lora_alpha=32)


@pytest.fixture(scope="module")
def lora_c(tmp_path_factory) -> Path:
    """A rank-4 LoRA on only some of the modules A targets, plus one A lacks (lm_head)."""
    return make_lora(
        "llama",
        LLAMA,
        tmp_path_factory.mktemp("c") / "lora",
        seed=11,
        r=4,
        lora_alpha=4,
        target_modules=["q_proj", "v_proj", "lm_head"],
    )


def read(path: Path) -> Adapter:
    return peft_format.read(path)


def delta_of(adapter: Adapter, key: str) -> torch.Tensor:
    return sum(d.materialize(dtype=torch.float64) for d in adapter.deltas[key] if not isinstance(d, Replace))


def weighted_sum(adapters, weights, key) -> torch.Tensor:
    return sum(w * delta_of(a, key) for a, w in zip(adapters, weights) if key in a.deltas)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def optimal(delta: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


# --- exactness and optimality --------------------------------------------------------------


def test_cat_is_the_exact_weighted_sum_over_the_union_of_targets(lora_b, lora_c):
    adapters = [read(LORA_A), read(lora_b), read(lora_c)]
    weights = [0.7, -0.3, 1.5]
    out, report = compose([(a, str(i)) for i, a in enumerate(adapters)], weights, ComposeOptions(method="cat"))
    assert set(out.deltas) == set().union(*(a.deltas for a in adapters))
    assert "lm_head.weight" in out.deltas
    for key in out.deltas:
        assert relative(delta_of(out, key), weighted_sum(adapters, weights, key)) < 1e-6
        ranks = [d.rank for a in adapters for d in a.deltas.get(key, []) if isinstance(d, LowRank)]
        assert [d.rank for d in out.deltas[key] if isinstance(d, LowRank)] == [sum(ranks)]
    assert {m.rank for m in report.modules if m.key.endswith("q_proj.weight")} == {20}


def test_svd_is_the_optimal_truncation_of_the_sum(lora_b, lora_c):
    adapters = [read(LORA_A), read(lora_b), read(lora_c)]
    weights = [1.0, 0.5, -2.0]
    rank = 5
    out, report = compose(
        [(a, str(i)) for i, a in enumerate(adapters)], weights, ComposeOptions(method="svd", rule=RankRule(rank=rank))
    )
    errors = {m.key: m.relative_error for m in report.modules}
    for key in out.deltas:
        exact = weighted_sum(adapters, weights, key)
        got = delta_of(out, key)
        spectrum = torch.linalg.svdvals(exact)
        torch.testing.assert_close(torch.linalg.svdvals(got)[:rank], spectrum[:rank], rtol=1e-4, atol=1e-6)
        assert relative(got, optimal(exact, rank)) < 1e-4
        tail = math.sqrt(float(spectrum[rank:].square().sum() / spectrum.square().sum()))
        assert errors[key] == pytest.approx(tail, rel=1e-4, abs=1e-6)
        assert relative(got, exact) == pytest.approx(tail, rel=1e-3, abs=1e-6)


def test_resize_error_is_the_tail_energy_and_energy_picks_the_smallest_rank():
    adapter = read(LORA_A)
    out, report = resize(adapter, RankRule(energy=0.8))
    for module in report.modules:
        exact = delta_of(adapter, module.key)
        energy = torch.linalg.svdvals(exact).square()
        kept = torch.cumsum(energy, 0) / energy.sum()
        assert kept[module.rank - 1] >= 0.8 - 1e-9 and (module.rank == 1 or kept[module.rank - 2] < 0.8)
        assert relative(delta_of(out, module.key), exact) == pytest.approx(
            math.sqrt(1 - float(kept[module.rank - 1])), rel=1e-3
        )
        assert out.deltas[module.key][0].rank == module.rank


def test_resize_to_a_larger_rank_keeps_the_adapter_exactly():
    adapter = read(LORA_A)
    out, report = resize(adapter, RankRule(rank=64))
    for key in adapter.deltas:
        assert out.deltas[key][0].rank == 8
        assert relative(delta_of(out, key), delta_of(adapter, key)) < 1e-5


def test_sparse_deltas_compose_with_lora_into_lora_plus_sparse():
    adapter = read(LORA_A)
    key = next(iter(adapter.deltas))
    shape = adapter.deltas[key][0].shape
    generator = torch.Generator().manual_seed(0)
    sparse = Adapter(base_model=adapter.base_model)
    sparse.add(
        key,
        Sparse(torch.randperm(math.prod(shape), generator=generator)[:50], torch.randn(50, generator=generator), shape),
    )
    for method in ("cat", "svd"):
        out, _ = compose(
            [(adapter, "lora"), (sparse, "diff")],
            [0.5, 2.0],
            ComposeOptions(method=method, rule=RankRule(rank=8) if method == "svd" else None),
        )
        assert sorted(type(d).__name__ for d in out.deltas[key]) == ["LowRank", "Sparse"]
        assert relative(delta_of(out, key), weighted_sum([adapter, sparse], [0.5, 2.0], key)) < 1e-6


def test_negate_gives_minus_the_delta_and_keeps_alpha(tmp_path):
    result = CliRunner().invoke(main, ["compose", str(LORA_A), "--negate", "-o", str(tmp_path / "neg")])
    assert result.exit_code == 0, result.output
    original, negated = read(LORA_A), read(tmp_path / "neg")
    for key in original.deltas:
        assert torch.equal(delta_of(negated, key), -delta_of(original, key))
    config = json.loads((tmp_path / "neg" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 16 and config["r"] == 8


# --- agreement with PEFT's add_weighted_adapter -------------------------------------------


def peft_deltas(arch: str, base: Path, loras: list[Path], weights: list[float], **kwargs) -> dict[str, torch.Tensor]:
    """Delta weights of PEFT's own add_weighted_adapter result, keyed by base parameter name."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = PeftModel.from_pretrained(load_base(arch, base), loras[0], adapter_name="a0")
    for i, path in enumerate(loras[1:], 1):
        model.load_adapter(path, adapter_name=f"a{i}")
    model.add_weighted_adapter([f"a{i}" for i in range(len(loras))], weights, "mix", **kwargs)
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "mix" in module.lora_A:
            found[name.removeprefix("base_model.model.") + ".weight"] = module.get_delta_weight("mix").detach().double()
    return found


PEFT_CASES = [
    ("cat", dict(combination_type="cat"), ComposeOptions(method="cat")),
    ("svd", dict(combination_type="svd", svd_rank=6), ComposeOptions(method="svd", rule=RankRule(rank=6))),
    ("linear", dict(combination_type="linear"), ComposeOptions(method="linear")),
    (
        "ties_svd",
        dict(combination_type="ties_svd", density=0.3, svd_rank=8),
        ComposeOptions(method="ties", density=0.3, rule=RankRule(rank=8)),
    ),
    (
        "ties_svd_frequency",
        dict(combination_type="ties_svd", density=0.5, majority_sign_method="frequency"),
        ComposeOptions(method="ties", density=0.5, majority_sign="frequency"),
    ),
    (
        "magnitude_prune_svd",
        dict(combination_type="magnitude_prune_svd", density=0.4, svd_rank=7),
        ComposeOptions(method="magnitude_prune", density=0.4, rule=RankRule(rank=7)),
    ),
]


@pytest.mark.parametrize("name,peft_kwargs,options", PEFT_CASES, ids=[c[0] for c in PEFT_CASES])
def test_agrees_with_peft_add_weighted_adapter(name, peft_kwargs, options, lora_b):
    weights = [0.8, -0.6]
    expected = peft_deltas("llama", LLAMA, [LORA_A, lora_b], weights, **peft_kwargs)
    out, _ = compose([(read(LORA_A), "a"), (read(lora_b), "b")], weights, options)
    assert set(out.deltas) == set(expected)
    for key, delta in expected.items():
        assert relative(delta_of(out, key), delta) < 1e-4, key


def test_svd_agrees_with_peft_on_gpt2_conv1d(tmp_path):
    """GPT-2 stores Conv1D weights in×out (fan_in_fan_out): orientation must survive the SVD."""
    base = ROOT / "fixtures" / "tiny-gpt2"
    other = make_lora("gpt2", base, tmp_path / "other", seed=5, fan_in_fan_out=True)
    loras = [ROOT / "fixtures" / "tiny-gpt2-lora", other]
    expected = peft_deltas("gpt2", base, loras, [1.0, 1.0], combination_type="svd", svd_rank=4)
    out, _ = compose(
        [(read(p), str(p)) for p in loras], [1.0, 1.0], ComposeOptions(method="svd", rule=RankRule(rank=4))
    )
    for key, delta in expected.items():
        assert relative(delta_of(out, key), delta) < 1e-4, key


def test_cli_output_loads_in_peft_with_the_composed_delta(tmp_path, lora_b):
    from peft import PeftModel

    out = tmp_path / "mix"
    result = CliRunner().invoke(
        main,
        [
            "compose",
            str(LORA_A),
            str(lora_b),
            "-w",
            "0.7",
            "-w",
            "0.3",
            "--method",
            "svd",
            "--rank",
            "6",
            "-o",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["method"] == "svd"
    model = PeftModel.from_pretrained(load_base("llama", LLAMA), out)
    composed = read(out)
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            key = name.removeprefix("base_model.model.") + ".weight"
            assert relative(module.get_delta_weight("default").double(), delta_of(composed, key)) < 1e-6
    exact = weighted_sum([read(LORA_A), read(lora_b)], [0.7, 0.3], key)
    assert relative(delta_of(composed, key), optimal(exact, 6)) < 1e-4


# --- DARE --------------------------------------------------------------------------------------


def test_dare_keeps_each_entry_with_probability_density_and_rescales_it():
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(64, 128, generator=generator, dtype=torch.float64)
    density, weight = 0.3, 0.5
    options = ComposeOptions(method="dare_linear", density=density)
    draws = torch.stack(
        [combine_dense([delta], [weight], options, torch.Generator().manual_seed(s)) for s in range(400)]
    )
    kept = draws != 0
    # every kept entry is the weighted entry divided by the density; the rest are dropped
    torch.testing.assert_close(draws[kept], (weight * delta / density).expand_as(draws)[kept])
    assert abs(float(kept.double().mean()) - density) < 5 * math.sqrt(density * (1 - density) / kept.numel())
    # unbiased: the mean over draws converges to the weighted delta (std of the estimate ≈ 0.076 here)
    assert relative(draws.mean(0), weight * delta) < 0.12
    assert relative(draws.mean(0) * density, weight * delta) > 0.5  # an unrescaled drop would be caught


def test_dare_is_reproducible_by_seed_and_dare_ties_at_density_one_is_ties(lora_b):
    pair = [(read(LORA_A), "a"), (read(lora_b), "b")]
    run = lambda **kw: compose(pair, [1.0, 0.5], ComposeOptions(keep="dense", **kw))[0]  # noqa: E731
    first, again, other = (
        run(method="dare_ties", density=0.3, seed=1),
        run(method="dare_ties", density=0.3, seed=1),
        run(method="dare_ties", density=0.3, seed=2),
    )
    key = next(iter(first.deltas))
    assert torch.equal(delta_of(first, key), delta_of(again, key))
    assert not torch.equal(delta_of(first, key), delta_of(other, key))
    assert torch.equal(
        delta_of(run(method="dare_ties", density=1.0), key), delta_of(run(method="ties", density=1.0), key)
    )


# --- memory ------------------------------------------------------------------------------------


class ShapeRecorder(TorchDispatchMode):
    """Records the size of every tensor an ATen op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(result):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return result


def test_svd_on_4096_targets_never_allocates_a_dense_matrix():
    n, r = 4096, 16
    generator = torch.Generator().manual_seed(0)
    adapters = []
    for i in range(2):
        adapter = Adapter(base_model="m")
        for key in ("q.weight", "o.weight"):
            adapter.add(
                key,
                LowRank(
                    down=torch.randn(r, n, generator=generator), up=torch.randn(n, r, generator=generator), scale=0.5
                ),
            )
        adapters.append((adapter, f"a{i}"))
    with ShapeRecorder() as recorder:
        out, _ = compose(adapters, [1.0, -1.0], ComposeOptions(method="svd", rule=RankRule(rank=r)))
        resize(out, RankRule(rank=4))
    assert recorder.largest <= n * 2 * r
    with ShapeRecorder() as recorder:  # the hook sees a dense ΔW when one is made
        out.deltas["q.weight"][0].materialize()
    assert recorder.largest == n * n


# --- refusals ----------------------------------------------------------------------------------


def test_refusals(lora_c, tmp_path):
    a, c = read(LORA_A), read(lora_c)
    with pytest.raises(SurgeonError, match="equal ranks"):
        compose([(a, "a"), (c, "c")], None, ComposeOptions(method="linear"))
    other = Adapter(base_model="someone/else", deltas=a.deltas, module_types=a.module_types)
    with pytest.raises(SurgeonError, match="different bases|--force"):
        compose([(a, "a"), (other, "other")], None, ComposeOptions())
    compose([(a, "a"), (other, "other")], None, ComposeOptions(), force=True)
    wrong = Adapter(base_model=a.base_model)
    key = next(iter(a.deltas))
    wrong.add(key, Dense(torch.zeros(3, 3)))
    with pytest.raises(SurgeonError, match="different models"):
        compose([(a, "a"), (wrong, "wrong")], None, ComposeOptions())
    with pytest.raises(SurgeonError, match="density"):
        ComposeOptions(method="ties")
    with pytest.raises(SurgeonError, match="method svd"):
        ComposeOptions(method="cat", rule=RankRule(rank=4))
    mixed = CliRunner().invoke(
        main, ["compose", "--base", str(LLAMA), str(LORA_A), str(LLAMA), "-o", str(tmp_path / "x")]
    )
    assert mixed.exit_code == 1 and "not both" in mixed.output and not (tmp_path / "x").exists()


def test_dora_resizes_alone_but_does_not_add(tmp_path):
    dora = make_lora("llama", LLAMA, tmp_path / "dora", seed=3, use_dora=True)
    adapter = read(dora)
    out, _ = resize(adapter, RankRule(rank=4))
    key = next(iter(adapter.deltas))
    assert torch.equal(out.deltas[key][0].magnitude, adapter.deltas[key][0].magnitude)
    with pytest.raises(SurgeonError, match="DoRA"):
        compose([(adapter, "d"), (read(LORA_A), "a")], None, ComposeOptions(method="svd"))


# --- full fine-tunes (task arithmetic) ---------------------------------------------------------


def test_task_arithmetic_on_full_checkpoints_matches_merge_and_peft_ties(tmp_path, lora_b):
    from peft.utils.merge_utils import ties

    from surgeon.checkpoint import Checkpoint

    runner = CliRunner()
    base = make_base("llama", tmp_path / "base")
    for name, lora in (("t1", LORA_A), ("t2", lora_b)):
        assert runner.invoke(main, ["merge", str(base), str(lora), "-o", str(tmp_path / name)]).exit_code == 0
    args = [str(tmp_path / "t1"), str(tmp_path / "t2"), "-w", "0.5", "-w", "0.5", "--base", str(base)]
    result = runner.invoke(main, ["compose", *args, "--method", "linear", "-o", str(tmp_path / "sum")])
    assert result.exit_code == 0, result.output
    both = runner.invoke(
        main, ["merge", str(base), str(LORA_A), str(lora_b), "-w", "0.5", "-w", "0.5", "-o", str(tmp_path / "merged")]
    )
    assert both.exit_code == 0
    summed, merged = Checkpoint(tmp_path / "sum"), Checkpoint(tmp_path / "merged")
    for key in merged.keys():
        torch.testing.assert_close(summed.get(key), merged.get(key), rtol=1e-5, atol=1e-6)

    result = runner.invoke(
        main, ["compose", *args, "--method", "ties", "--density", "0.3", "-o", str(tmp_path / "ties")]
    )
    assert result.exit_code == 0, result.output
    original, tied = Checkpoint(base), Checkpoint(tmp_path / "ties")
    tuned = [Checkpoint(tmp_path / "t1"), Checkpoint(tmp_path / "t2")]
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        deltas = [t.get(key) - original.get(key) for t in tuned]
        expected = original.get(key) + ties(deltas, torch.tensor([0.5, 0.5]), 0.3, "total")
        torch.testing.assert_close(tied.get(key), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(tied.get("model.norm.weight"), original.get("model.norm.weight"))


# --- sparse diffs in and out -------------------------------------------------------------------


def test_cli_composes_a_lora_with_a_sparse_diff_and_merge_applies_both(tmp_path):
    from surgeon.checkpoint import Checkpoint
    from surgeon.formats import sparse as sparse_format

    lora = read(LORA_A)
    diff = Adapter(base_model=lora.base_model)
    generator = torch.Generator().manual_seed(0)
    for key in list(lora.deltas)[:3] + ["model.norm.weight"]:
        shape = lora.deltas[key][0].shape if key in lora.deltas else (64,)
        positions = torch.randperm(math.prod(shape), generator=generator)[:40]
        diff.add(key, Sparse(positions, torch.randn(40, generator=generator), shape), "other")
    sparse_format.write(diff, tmp_path / "diff")
    runner = CliRunner()
    result = runner.invoke(
        main, ["compose", str(LORA_A), str(tmp_path / "diff"), "-w", "0.5", "-w", "2", "-o", str(tmp_path / "mixed")]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "mixed" / "adapter_config.json").is_file() and (
        tmp_path / "mixed" / "sparse" / "sparse_config.json"
    ).is_file()
    for args, out in (
        ([str(tmp_path / "mixed"), str(tmp_path / "mixed" / "sparse")], "m1"),
        ([str(LORA_A), str(tmp_path / "diff"), "-w", "0.5", "-w", "2"], "m2"),
    ):
        merged = runner.invoke(main, ["merge", str(LLAMA), *args, "-o", str(tmp_path / out)])
        assert merged.exit_code == 0, merged.output
    first, second = Checkpoint(tmp_path / "m1"), Checkpoint(tmp_path / "m2")
    for key in second.keys():
        torch.testing.assert_close(first.get(key), second.get(key), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_ties_kept_sparse_or_dense_is_peft_ties_of_the_deltas(tmp_path, lora_b, kind):
    from peft.utils.merge_utils import ties

    out = tmp_path / kind
    result = CliRunner().invoke(
        main,
        [
            "compose",
            str(LORA_A),
            str(lora_b),
            "-w",
            "1",
            "-w",
            "0.4",
            "--method",
            "ties",
            "--density",
            "0.25",
            "--as",
            kind,
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    got = peft_format_any(out)
    adapters = [read(LORA_A), read(lora_b)]
    for key in adapters[0].deltas:
        expected = ties([delta_of(a, key).float() for a in adapters], torch.tensor([1.0, 0.4]), 0.25, "total")
        torch.testing.assert_close(delta_of(got, key).float(), expected, rtol=1e-5, atol=1e-7)
        stored = got.deltas[key][0]
        assert isinstance(stored, Sparse) and stored.indices.numel() == (
            int((expected != 0).sum()) if kind == "sparse" else expected.numel()
        )


def peft_format_any(path: Path) -> Adapter:
    from surgeon import formats

    return formats.read_adapter(path)


def test_compose_base_keeps_an_infinity_both_checkpoints_hold(fixtures_dir, tmp_path):
    """A -inf mask buffer in base and fine-tunes made T − B NaN, and compose had no --allow-nonfinite."""
    import shutil

    from safetensors.torch import load_file, save_file

    for name, shift in (("base", 0.0), ("t1", 0.01), ("t2", -0.02)):
        shutil.copytree(fixtures_dir / "tiny-llama", tmp_path / name)
        tensors = load_file(tmp_path / name / "model.safetensors")
        tensors["mask.bias"] = torch.tensor([0.0, float("-inf"), 1.0])
        tensors["model.layers.0.mlp.up_proj.weight"] += shift
        save_file(tensors, tmp_path / name / "model.safetensors", metadata={"format": "pt"})
    args = ["compose", str(tmp_path / "t1"), str(tmp_path / "t2"), "--base", str(tmp_path / "base")]
    refused = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "refused")])
    assert refused.exit_code == 1 and "compose --base write it anyway with --allow-nonfinite" in refused.output
    for method in (["--method", "linear"], ["--method", "ties", "--density", "0.5"]):
        out = tmp_path / method[1]
        result = CliRunner().invoke(main, [*args, "-o", str(out), *method, "--allow-nonfinite"])
        assert result.exit_code == 0, result.output
        assert torch.equal(load_file(out / "model.safetensors")["mask.bias"], torch.tensor([0.0, float("-inf"), 1.0]))
    adapters = CliRunner().invoke(main, ["compose", str(fixtures_dir / "tiny-llama-lora"), "-o", str(tmp_path / "a")])
    assert adapters.exit_code == 0
    flagged = ["compose", str(fixtures_dir / "tiny-llama-lora"), "-o", str(tmp_path / "b"), "--allow-nonfinite"]
    assert "applies when composing full fine-tuned checkpoints" in CliRunner().invoke(main, flagged).output
