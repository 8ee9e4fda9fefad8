"""surgeon extract against the consumers: PEFT loads the extracted adapter and reproduces the
tuned model, surgeon merge applies LoRA + sparse residual, and the errors are the ones the
spectrum and the kept entries predict."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from fixtures.make_fixtures import load_base, make_base
from surgeon.checkpoint import Checkpoint
from surgeon.cli import main
from surgeon.delta import LowRank, Replace, Sparse
from surgeon.errors import SurgeonError
from surgeon.formats import detect, peft, sparse
from surgeon.ops import extract as extract_module
from surgeon.ops.extract import ExtractOptions, extract
from surgeon.ops.rank import RankRule

ROOT = Path(__file__).resolve().parent.parent


def tune(
    base: Path, out: Path, ranks, scale: float = 0.05, one_d: float = 0.0, seed: int = 0, select=None
) -> dict[str, torch.Tensor]:
    """A 'fine-tune' of ``base``: every selected 2-D weight plus a random delta of rank
    ``ranks(key)`` (1-D tensors moved by ``one_d``); returns the deltas, in fp32."""
    shutil.copytree(base, out)
    weights_file = next(out.glob("*.safetensors"))
    state = load_file(weights_file)
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for key, value in state.items():
        if value.dim() == 2 and (select is None or select(key)):
            rank = ranks(key)
            m, n = value.shape
            deltas[key] = scale * torch.randn(m, rank, generator=gen) @ torch.randn(rank, n, generator=gen)
            state[key] = (value.float() + deltas[key]).to(value.dtype)
        elif value.dim() == 1 and one_d and value.is_floating_point():
            state[key] = value + one_d * torch.randn(value.shape, generator=gen).to(value.dtype)
    save_file(state, weights_file, metadata={"format": "pt"})
    return deltas


def run_cli(*args: str) -> dict:
    result = CliRunner().invoke(main, ["extract", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def cli_error(*args: str) -> str:
    """A refusal: exit code 1 and one `Error:` line, never a traceback."""
    result = CliRunner().invoke(main, ["extract", *map(str, args)])
    assert result.exit_code == 1 and result.output.startswith("Error: ") and "Traceback" not in result.output, (
        result.output
    )
    return result.output


def logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def peft_logits(arch: str, base: Path, adapter: Path) -> torch.Tensor:
    from peft import PeftModel

    return logits(PeftModel.from_pretrained(load_base(arch, base), adapter).eval())


def not_embedding(key: str) -> bool:
    return not any(part in key for part in ("embed", "lm_head", "wte", "wpe"))


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    """tiny-llama tuned by rank-4 deltas on every linear weight, and changed norms."""
    root = tmp_path_factory.mktemp("llama")
    deltas = tune(ROOT / "fixtures" / "tiny-llama", root / "tuned", lambda k: 4, one_d=0.05, select=not_embedding)
    return ROOT / "fixtures" / "tiny-llama", root / "tuned", deltas


def test_rank_r_delta_recovered_and_peft_reproduces_tuned(llama_pair, tmp_path):
    base, tuned, deltas = llama_pair
    report = run_cli(base, tuned, "-o", tmp_path / "adapter", "--rank", "4", "--keep-changed-1d")
    adapter = peft.read(tmp_path / "adapter")
    for key, delta in deltas.items():
        found = adapter.deltas[key][0]
        assert isinstance(found, LowRank) and found.rank == 4 and found.scale == 1.0
        torch.testing.assert_close(found.materialize(), delta, rtol=0, atol=1e-6 * float(delta.abs().max()) * 10)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4
    assert report["max_relative_error"] < 1e-5
    norms = [r for r in report["modules"] if r["key"].endswith("norm.weight")]
    assert norms and all(r["action"] == "replace" for r in norms)
    expected = logits(load_base("llama", tuned))
    torch.testing.assert_close(peft_logits("llama", base, tmp_path / "adapter"), expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits(load_base("llama", base)), expected, atol=1e-3)  # the check can fail


def test_gpt2_conv1d_biases_and_per_module_ranks_load_in_peft(tmp_path):
    """GPT-2's Conv1D is in×out; ranks differ per module (rank_pattern); biases kept whole."""
    base = ROOT / "fixtures" / "tiny-gpt2"
    ranks = lambda key: 2 if "c_attn" in key else 5  # noqa: E731
    deltas = tune(base, tmp_path / "tuned", ranks, one_d=0.05, select=not_embedding)
    report = run_cli(
        base,
        tmp_path / "tuned",
        "-o",
        tmp_path / "adapter",
        "--max-error",
        "1e-4",
        "--keep-changed-1d",
        "--split",
        "up",
    )
    assert {r["key"]: r["rank"] for r in report["modules"] if r["action"] == "lora"} == {k: ranks(k) for k in deltas}
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] and config["rank_pattern"] and config["alpha_pattern"]
    factors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    lora_a = factors[
        "base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight"
    ]  # --split up: S in lora_B, A orthonormal
    torch.testing.assert_close(lora_a @ lora_a.T, torch.eye(lora_a.shape[0]), rtol=0, atol=1e-5)
    expected = logits(load_base("gpt2", tmp_path / "tuned"))
    torch.testing.assert_close(peft_logits("gpt2", base, tmp_path / "adapter"), expected, rtol=1e-4, atol=1e-4)


def test_embeddings_as_lora_load_in_peft(tmp_path):
    base = ROOT / "fixtures" / "tiny-llama"
    deltas = tune(base, tmp_path / "tuned", lambda k: 3)
    report = run_cli(base, tmp_path / "tuned", "-o", tmp_path / "adapter", "--rank", "3", "--embeddings", "lora")
    types = {r["key"]: r["module_type"] for r in report["modules"]}
    assert types["model.embed_tokens.weight"] == "embedding" and types["lm_head.weight"] == "linear"
    assert report["targets"] == len(deltas)
    expected = logits(load_base("llama", tmp_path / "tuned"))
    torch.testing.assert_close(peft_logits("llama", base, tmp_path / "adapter"), expected, rtol=1e-4, atol=1e-4)


def test_report_accounts_for_every_changed_tensor(llama_pair, tmp_path):
    base, tuned, _ = llama_pair
    embedded = tmp_path / "tuned"
    tune(tuned, embedded, lambda k: 2, select=lambda k: "embed" in k or "lm_head" in k, seed=3)
    report = run_cli(
        base,
        embedded,
        "-o",
        tmp_path / "adapter",
        "--rank",
        "4",
        "--exclude",
        r"layers\.1\.mlp",
        "--embeddings",
        "skip",
        "--skip-changed-1d",
    )
    rows = {r["key"]: r for r in report["modules"]}
    changed = [
        k for k in Checkpoint(base).keys() if not torch.equal(Checkpoint(base).get(k), Checkpoint(embedded).get(k))
    ]
    assert sorted(rows) == sorted(changed)
    assert (
        rows["model.embed_tokens.weight"]["action"] == "skipped"
        and "--embeddings" in rows["model.embed_tokens.weight"]["reason"]
    )
    assert rows["lm_head.weight"]["action"] == "skipped"
    assert "--skip-changed-1d" in rows["model.norm.weight"]["reason"] and rows["model.norm.weight"]["delta_norm"] > 0
    assert rows["model.layers.1.mlp.up_proj.weight"]["reason"].startswith("excluded")
    assert report["changed"] == report["targets"] + report["replaced"] + report["skipped"]
    left = {r["key"]: r["delta_norm"] for r in report["left_out"]}  # what is missing, and its share of the change
    assert sorted(left) == sorted(k for k, r in rows.items() if r["action"] == "skipped")
    total = sum(r["delta_norm"] ** 2 for r in rows.values())
    assert report["left_out_share"] == pytest.approx(sum(n**2 for n in left.values()) / total)


def test_lora_plus_sparse_closer_by_the_kept_entries(llama_pair, tmp_path):
    """Rank 2 of a rank-4 delta leaves a residual; the sparse part removes exactly Σ kept²."""
    base, tuned, _ = llama_pair
    run_cli(base, tuned, "-o", tmp_path / "adapter", "--rank", "2", "--sparse-density", "0.05")
    assert detect(tmp_path / "adapter").name == "peft" and detect(tmp_path / "adapter" / "sparse").name == "sparse"
    residual = sparse.read(tmp_path / "adapter" / "sparse")
    runner = CliRunner()
    for outputs in (["adapter"], ["adapter", "adapter/sparse"]):
        result = runner.invoke(
            main,
            ["merge", str(base), *[str(tmp_path / o) for o in outputs], "-o", str(tmp_path / f"merged{len(outputs)}")],
        )
        assert result.exit_code == 0, result.output
    lora_only, both, target = Checkpoint(tmp_path / "merged1"), Checkpoint(tmp_path / "merged2"), Checkpoint(tuned)
    checked = 0
    for key, deltas in residual.items():
        (part,) = deltas
        assert isinstance(part, Sparse) and part.indices.dtype == torch.int32
        assert part.indices.numel() == math.ceil(0.05 * math.prod(part.shape))
        before = float((lora_only.get(key) - target.get(key)).double().square().sum())
        after = float((both.get(key) - target.get(key)).double().square().sum())
        predicted = float(part.values.double().square().sum())
        assert after < before
        assert before - after == pytest.approx(predicted, rel=1e-3)
        checked += 1
    assert checked == 14


def test_pure_sparse_at_full_density_reproduces_tuned_exactly(tmp_path):
    base = make_base("llama", tmp_path / "base", dtype=torch.bfloat16)
    tune(base, tmp_path / "tuned", lambda k: 3, one_d=0.05)
    report = run_cli(
        base,
        tmp_path / "tuned",
        "-o",
        tmp_path / "diff",
        "--rank",
        "0",
        "--sparse-density",
        "1",
        "--keep-changed-1d",
        "--embeddings",
        "lora",
    )
    assert report["written"] == [str(tmp_path / "diff")] and detect(tmp_path / "diff").name == "sparse"
    assert all(r["action"] in ("sparse", "replace") for r in report["modules"])
    result = CliRunner().invoke(main, ["merge", str(base), str(tmp_path / "diff"), "-o", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged, tuned = Checkpoint(tmp_path / "merged"), Checkpoint(tmp_path / "tuned")
    for key in tuned.keys():
        assert torch.equal(merged.get(key), tuned.get(key)), key


def test_sparse_format_round_trip(tmp_path):
    from surgeon.delta import Adapter

    adapter = Adapter(base_model="base")
    adapter.add("a.weight", Sparse(torch.tensor([5, 1, 5]), torch.tensor([1.0, 2.0, 3.0]), (3, 4)))
    adapter.add("b.bias", Replace(torch.arange(4.0)))
    sparse.write(adapter, tmp_path / "diff")
    back = sparse.read(tmp_path / "diff")
    (part,) = back.deltas["a.weight"]
    assert part.indices.tolist() == [1, 5, 5] and part.indices.dtype == torch.int32 and part.shape == (3, 4)
    torch.testing.assert_close(part.materialize(), adapter.deltas["a.weight"][0].materialize())
    torch.testing.assert_close(back.deltas["b.bias"][0].weight, torch.arange(4.0))
    assert sparse.index_dtype((2**16, 2**16)) == torch.int64
    with pytest.raises(SurgeonError, match="LoRA delta"):
        bad = Adapter()
        bad.add("c.weight", LowRank(torch.ones(1, 2), torch.ones(2, 1)))
        sparse.write(bad, tmp_path / "bad")


def test_split_and_alpha(llama_pair):
    base, tuned, deltas = llama_pair
    key = "model.layers.0.self_attn.q_proj.weight"
    for split, orthonormal in (("up", "down"), ("down", "up"), ("balanced", None)):
        options = ExtractOptions(
            rule=RankRule(rank=4), split=split, alpha=16.0, include=(r"layers\.0\.self_attn\.q_proj",)
        )
        found = extract(Checkpoint(base), Checkpoint(tuned), options).lora.deltas[key][0]
        assert found.scale == 4.0
        torch.testing.assert_close(found.materialize(), deltas[key], rtol=0, atol=1e-5)
        if orthonormal == "down":  # S in lora_B: lora_A's rows orthonormal
            torch.testing.assert_close(found.down @ found.down.T, torch.eye(4), rtol=0, atol=1e-5)
        elif orthonormal == "up":
            torch.testing.assert_close(found.up.T @ found.up, torch.eye(4), rtol=0, atol=1e-5)
        else:
            torch.testing.assert_close(found.up.norm(dim=0), found.down.norm(dim=1), rtol=1e-4, atol=0)


def test_prefetch_thread_gives_the_same_result(llama_pair):
    base, tuned, _ = llama_pair
    results = [
        extract(Checkpoint(base), Checkpoint(tuned), ExtractOptions(rule=RankRule(rank=3), prefetch=p)) for p in (0, 2)
    ]
    assert list(results[0].lora.deltas) == list(results[1].lora.deltas)
    for key, (delta,) in results[0].lora.items():
        torch.testing.assert_close(results[1].lora.deltas[key][0].materialize(), delta.materialize(), rtol=0, atol=0)


def test_reader_threads_keep_checkpoint_order_and_pass_errors_on(llama_pair, monkeypatch):
    """Several readers finish out of order (earlier keys read slowest); pairs still come in key
    order, at most ``prefetch`` + 1 loaded ahead, and a failed read raises in the consumer."""
    base, tuned = Checkpoint(llama_pair[0]), Checkpoint(llama_pair[1])
    keys = base.keys()
    delays = {key: 0.002 * (len(keys) - i) for i, key in enumerate(keys)}
    real_get, loaded, consumed = Checkpoint.get, [], []

    def slow_get(self, key):
        time.sleep(delays[key] if self is tuned else 0)
        if key == keys[-2] and self is tuned and delays.get("fail"):
            raise OSError(f"disk error reading {key}")
        if self is tuned:
            loaded.append(key)
        return real_get(self, key)

    monkeypatch.setattr(Checkpoint, "get", slow_get)
    for key, old, new in extract_module._pairs(base, tuned, keys, 3, torch.device("cpu")):
        consumed.append(key)
        assert len(loaded) <= len(consumed) + 3
        torch.testing.assert_close(old, real_get(base, key), rtol=0, atol=0)
    assert consumed == keys and sorted(loaded) == sorted(keys) and loaded != keys  # read out of order, given in order
    delays["fail"] = 1
    with pytest.raises(OSError, match="disk error"):
        list(extract_module._pairs(base, tuned, keys, 3, torch.device("cpu")))


def test_worker_threads_do_not_change_the_result(llama_pair, monkeypatch):
    """Matrices are factored by several workers at once; each draws its own seeded sketch, so
    the report's order is a single worker's and the adapter equal to round-off."""
    base, tuned, _ = llama_pair
    options = ExtractOptions(rule=RankRule(rank=3), method="randomized")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        results = {}
        for workers in (1, 4):
            monkeypatch.setattr(extract_module, "MAX_WORKERS", workers)
            assert extract_module.parallelism(torch.device("cpu"))[0] == min(workers, torch.get_num_threads())
            results[workers] = extract(Checkpoint(base), Checkpoint(tuned), options)
    finally:
        torch.set_num_threads(threads)
    one, many = results[1], results[4]
    assert [r.key for r in one.rows] == [r.key for r in many.rows] and list(one.lora.deltas) == list(many.lora.deltas)
    for key, (delta,) in one.lora.items():
        torch.testing.assert_close(many.lora.deltas[key][0].materialize(), delta.materialize(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        "cpu-whole",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_workspace_delta_is_the_difference_of_the_casts(dtype, device, monkeypatch):
    """Sliced (CPU) or whole (GPU; "cpu-whole" runs that path here), new − old of the casts exactly."""
    monkeypatch.setattr(extract_module._Workspace, "SLICE", 1000)  # several slices and a short last one
    gen = torch.Generator().manual_seed(0)
    old = torch.randn(37, 101, generator=gen).to(dtype)
    new = (old.double() + 0.01 * torch.randn(37, 101, generator=gen, dtype=torch.float64)).to(dtype)
    workspace = extract_module._Workspace(torch.float32, torch.device(device.split("-")[0]))
    assert workspace.sliced == (device != "cuda")
    workspace.sliced = device == "cpu"
    old, new = old.to(workspace._flat.device), new.to(workspace._flat.device)
    assert torch.equal(workspace.delta(old[:2], new[:2]), new[:2].float() - old[:2].float())
    assert torch.equal(workspace.delta(old, new), new.float() - old.float())  # grown
    assert torch.equal(workspace.delta(old[0], new[0]), new[0].float() - old[0].float())  # 1-D, reused
    exact = float(torch.linalg.vector_norm(new.double() - old.double()))
    assert workspace.difference_norm(old, new) == pytest.approx(
        exact, rel=1e-3 if dtype in (torch.bfloat16, torch.float16) else 1e-6
    )


def test_reported_only_tensors_do_not_grow_the_workspace():
    """An embedding left out is only reported: its delta norm is taken a slice at a time."""
    old = torch.randn(3000, 64)
    new = old + 0.01
    workspace = extract_module._Workspace(torch.float32, torch.device("cpu"))
    options = ExtractOptions(rule=RankRule(rank=4), embeddings="skip")
    outcome = extract_module._changed_tensor(
        "embed.weight", old, new, "embedding", "embedding", options, workspace, False
    )
    assert outcome.row.action == "skipped" and "embedding" in outcome.row.reason and not outcome.parts
    assert outcome.row.delta_norm == pytest.approx(0.01 * (3000 * 64) ** 0.5, rel=1e-4)
    assert workspace._flat.numel() == 0


def test_a_non_finite_delta_is_named(llama_pair, tmp_path):
    base, tuned, _ = llama_pair
    broken = tmp_path / "broken"
    shutil.copytree(tuned, broken)
    state = load_file(broken / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, broken / "model.safetensors")
    message = cli_error(base, broken, "-o", tmp_path / "x", "--rank", "4")
    assert "'model.layers.1.mlp.up_proj.weight'" in message and "NaN" in message and not (tmp_path / "x").exists()


def test_conv_weights_flattened_and_loaded_by_peft(tmp_path):
    """A 4-D conv weight is factored as out×(in·kh·kw) and PEFT's conv LoRA reproduces it."""
    from peft import PeftModel

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(6, 8, 3)
            self.proj = torch.nn.Linear(8, 5)

        def forward(self, x):
            return self.proj(self.conv(x).mean(dim=(2, 3)))

    torch.manual_seed(0)
    net = Net()
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "base" / "model.safetensors")
    tune(tmp_path / "base", tmp_path / "tuned", lambda k: 2)
    state = load_file(tmp_path / "tuned" / "model.safetensors")
    gen = torch.Generator().manual_seed(1)
    state["conv.weight"] = state["conv.weight"] + 0.1 * (
        torch.randn(8, 3, generator=gen) @ torch.randn(3, 54, generator=gen)
    ).reshape(8, 6, 3, 3)
    save_file(state, tmp_path / "tuned" / "model.safetensors")
    report = run_cli(tmp_path / "base", tmp_path / "tuned", "-o", tmp_path / "adapter", "--rank", "3")
    assert {r["key"]: (r["module_type"], r["rank"]) for r in report["modules"]} == {
        "conv.weight": ("conv", 3),
        "proj.weight": ("linear", 2),
    }
    tuned_net = Net()
    tuned_net.load_state_dict(state)
    x = torch.randn(2, 6, 7, 7, generator=gen)
    net.load_state_dict(load_file(tmp_path / "base" / "model.safetensors"))
    with torch.no_grad():
        got = PeftModel.from_pretrained(net, tmp_path / "adapter").eval()(x)
        torch.testing.assert_close(got, tuned_net(x), rtol=1e-4, atol=1e-5)


def test_dtype_mismatch_is_computed_in_fp32(tmp_path):
    base = make_base("llama", tmp_path / "base", dtype=torch.bfloat16)
    deltas = tune(base, tmp_path / "tuned32", lambda k: 2, scale=0.2, select=not_embedding)
    state = {k: v.float() for k, v in load_file(tmp_path / "tuned32" / "model.safetensors").items()}
    save_file(state, tmp_path / "tuned32" / "model.safetensors")
    report = run_cli(base, tmp_path / "tuned32", "-o", tmp_path / "adapter", "--rank", "2")
    assert (
        report["targets"] == len(deltas) and report["max_relative_error"] < 1e-2
    )  # bf16 rounding of the tuned weights


def test_bad_inputs(llama_pair, tmp_path):
    base, tuned, _ = llama_pair
    message = cli_error(base, base, "-o", tmp_path / "same", "--rank", "4")
    assert "identical" in message and not (tmp_path / "same").exists()
    gpt2 = ROOT / "fixtures" / "tiny-gpt2"
    assert "different tensors" in cli_error(base, gpt2, "-o", tmp_path / "x", "--rank", "4")
    wide = tmp_path / "wide"
    wide.mkdir()
    state = load_file(tuned / "model.safetensors")
    state["lm_head.weight"] = torch.zeros(300, 64)
    save_file(state, wide / "model.safetensors")
    message = cli_error(base, wide, "-o", tmp_path / "x", "--rank", "4")
    assert "'lm_head.weight'" in message and "(256, 64)" in message and not (tmp_path / "x").exists()
    assert "exactly one of" in cli_error(base, tuned, "-o", tmp_path / "x", "--rank", "4", "--energy", "0.9")
    assert "sparse_density" in cli_error(base, tuned, "-o", tmp_path / "x", "--rank", "0")
    only_norms = tmp_path / "norms"
    tune(base, only_norms, lambda k: 1, one_d=0.1, select=lambda k: False)
    assert "none was extracted" in cli_error(base, only_norms, "-o", tmp_path / "x", "--rank", "4", "--skip-changed-1d")


def test_table_and_plot(llama_pair, tmp_path):
    base, tuned, _ = llama_pair
    result = CliRunner().invoke(
        main,
        [
            "extract",
            str(base),
            str(tuned),
            "-o",
            str(tmp_path / "a"),
            "--energy",
            "0.9",
            "--plot",
            str(tmp_path / "s.png"),
            "--report",
            str(tmp_path / "r.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "model.layers.0.self_attn.q_proj.weight" in result.output and "merge with:" in result.output
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "r.json").read_text())["targets"] == 14


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cpu_and_cuda_agree(llama_pair):
    base, tuned, _ = llama_pair
    for method in ("exact", "gram", "randomized"):
        found = [
            extract(
                Checkpoint(base),
                Checkpoint(tuned),
                ExtractOptions(rule=RankRule(rank=3), method=method, device=torch.device(d)),
            )
            for d in ("cpu", "cuda")
        ]
        for key, (delta,) in found[0].lora.items():
            torch.testing.assert_close(
                found[1].lora.deltas[key][0].materialize(), delta.materialize(), rtol=1e-4, atol=1e-5
            )
