"""mlx-lm, GGUF (llama.cpp) and ONNX Runtime adapters, checked against PEFT's own merge and the
real consumers: mlx-lm's load_adapters/fuse, gguf-py's GGUFReader with llama.cpp's scale rule and
Q/K permutation, and onnxruntime's AdapterFormat and LoraAdapter running a graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from deploy_variants import BASE, assert_close_relative, base_state, peft_deltas, peft_merged, variant
from surgeon import formats
from surgeon.checkpoint import Checkpoint
from surgeon.convert import convert_adapter
from surgeon.errors import SurgeonError

LLAMA = json.loads((BASE / "config.json").read_text())


@pytest.fixture(scope="session")
def variants_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("variants")


def converted(name: str, fmt: str, root: Path, tmp_path: Path) -> Path:
    out = tmp_path / f"{name}.{fmt}"
    convert_adapter(variant(name, root), fmt, out, base_path=BASE)
    return out


def read_back(path: Path, fmt: str):
    return formats.read_adapter(path, fmt, base=Checkpoint(BASE))


# ---------------------------------------------------------------- round trips against PEFT's merge

ROUND_TRIPS = [
    (fmt, name)
    for fmt in ("mlx", "gguf", "ort")
    for name in ("plain", "rslora", "patterns", "embed")
    if not (fmt == "ort" and name == "embed")
]


@pytest.mark.parametrize(("fmt", "name"), ROUND_TRIPS)
def test_round_trip_reproduces_peft_delta(fmt, name, variants_root, tmp_path):
    out = converted(name, fmt, variants_root, tmp_path)
    assert formats.detect(out).name == fmt
    back = read_back(out, fmt)
    expected = peft_deltas(variant(name, variants_root))
    got = {key: sum(d.materialize() for d in deltas) for key, deltas in back.items()}
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert_close_relative(got[key], expected[key], f"{fmt}/{name} {key}")


def test_metadata_survives_where_the_format_has_room(variants_root, tmp_path):
    adapter = formats.read_adapter(variant("plain", variants_root))
    adapter.metadata = {"ss_network_dim": "8", "modelspec.title": "tiny"}
    for fmt, path in (("mlx", tmp_path / "m"), ("gguf", tmp_path / "g.gguf")):
        formats.write_adapter(adapter, path, fmt, base=Checkpoint(BASE))
        back = read_back(path, fmt)
        assert back.metadata == adapter.metadata, fmt
        assert back.base_model == adapter.base_model, fmt
    notes = formats.write_adapter(adapter, tmp_path / "o.onnx_adapter", "ort")
    assert any("ss_network_dim" in n and "dropped" in n for n in notes)
    assert any(str(adapter.base_model) in n for n in notes)


# ---------------------------------------------------------------- mlx-lm


def test_mlx_layout_as_mlx_lm_documents_it(variants_root, tmp_path):
    """Without mlx: keys, orientations, one rank (padded) and one scale (folded) per adapter."""
    out = converted("patterns", "mlx", variants_root, tmp_path)
    config = json.loads((out / "adapter_config.json").read_text())
    params = config["lora_parameters"]
    assert config["fine_tune_type"] == "lora" and params["rank"] == 12
    assert config["num_layers"] == LLAMA["num_hidden_layers"]
    with safe_open(out / "adapters.safetensors", "pt") as handle:
        a = handle.get_tensor("model.layers.0.self_attn.q_proj.lora_a")
        b = handle.get_tensor("model.layers.0.self_attn.q_proj.lora_b")
    assert a.shape == (64, 12) and b.shape == (12, 64)  # in×r, r×out, rank 4 padded to 12
    assert not a[:, 4:].any() and not b[4:].any()
    # the LoRALinear forward, y += scale·(x @ lora_a) @ lora_b, reproduces PEFT's ΔW
    x = torch.randn(3, 64)
    expected = x @ peft_deltas(variant("patterns", variants_root))["model.layers.0.self_attn.q_proj.weight"].T
    assert_close_relative(params["scale"] * (x @ a) @ b, expected, "LoRALinear forward")
    back = read_back(out, "mlx")
    assert back.low_ranks()["model.layers.0.self_attn.q_proj.weight"].rank == 4  # padding trimmed on read


def test_mlx_keys_cover_every_targeted_block_module(variants_root, tmp_path):
    out = converted("plain", "mlx", variants_root, tmp_path)
    keys = json.loads((out / "adapter_config.json").read_text())["lora_parameters"]["keys"]
    assert sorted(keys) == sorted(
        [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ]
    )


@pytest.mark.parametrize("name", ["plain", "rslora", "patterns", "embed", "dora"])
def test_mlx_lm_loads_and_fuses_to_peft_merge(name, variants_root, tmp_path):
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    from mlx_lm.tuner.utils import load_adapters

    out = converted(name, "mlx", variants_root, tmp_path)
    model, _ = mlx_lm_utils.load_model(BASE)
    load_adapters(model, str(out))
    merged, base = peft_merged(variant(name, variants_root)), base_state()
    fused = {
        f"{path}.weight": np.array(module.fuse().weight)
        for path, module in model.named_modules()
        if hasattr(module, "lora_a")
    }
    changed = {k for k in merged if not torch.equal(merged[k], base[k])}
    assert changed <= set(fused)
    for key, weight in fused.items():
        assert_close_relative(torch.from_numpy(weight) - base[key], merged[key] - base[key], f"mlx {name} {key}")


def test_mlx_reads_an_adapter_mlx_lm_made(tmp_path):
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = mlx_lm_utils.load_model(BASE)
    parameters = {"rank": 4, "scale": 3.5, "dropout": 0.0, "keys": ["self_attn.v_proj", "mlp.down_proj"]}
    model.freeze()  # as mlx_lm.lora does before wrapping
    linear_to_lora_layers(model, 1, parameters)
    for _, module in model.named_modules():
        if hasattr(module, "lora_b"):
            module.lora_b = mx.random.normal(module.lora_b.shape)
    out = tmp_path / "made-by-mlx"
    out.mkdir()
    mx.save_safetensors(
        str(out / "adapters.safetensors"), {k: v for k, v in tree_flatten(model.trainable_parameters())}
    )
    (out / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "lora", "num_layers": 1, "lora_parameters": parameters})
    )
    adapter = formats.read_adapter(out)
    assert adapter.source_format == "mlx"
    fused = {f"{path}.weight": module.fuse() for path, module in model.named_modules() if hasattr(module, "lora_a")}
    base = base_state()
    assert (
        sorted(adapter.deltas)
        == sorted(fused)
        == ["model.layers.1.mlp.down_proj.weight", "model.layers.1.self_attn.v_proj.weight"]
    )
    for key, linear in fused.items():
        assert_close_relative(
            adapter.deltas[key][0].materialize(), torch.from_numpy(np.array(linear.weight)) - base[key], key
        )
    for base_path, where in ((None, tmp_path / "again"), (BASE, tmp_path / "again-with-base")):
        formats.write_adapter(adapter, where, "mlx", base=Checkpoint(base_path) if base_path else None)
        config = json.loads((where / "adapter_config.json").read_text())
        assert config["num_layers"] == 1 and sorted(config["lora_parameters"]["keys"]) == sorted(parameters["keys"])


# ---------------------------------------------------------------- GGUF for llama.cpp


def llama_cpp_permute(weights: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """llama.cpp convert_hf_to_gguf.py ``LlamaModel.permute``, as it is applied to q_proj/k_proj."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def gguf_space(key: str, weight: torch.Tensor) -> torch.Tensor:
    """A base-layout weight as llama.cpp's converter stores it."""
    if key.endswith("q_proj.weight"):
        return llama_cpp_permute(weight, LLAMA["num_attention_heads"], LLAMA["num_attention_heads"])
    if key.endswith("k_proj.weight"):
        return llama_cpp_permute(weight, LLAMA["num_attention_heads"], LLAMA["num_key_value_heads"])
    return weight


def gguf_pairs(path: Path) -> tuple[dict, dict[str, dict]]:
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    pairs: dict[str, dict] = {}
    for tensor in reader.tensors:
        stem, _, suffix = tensor.name.rpartition(".")
        pairs.setdefault(stem, {})[suffix] = (list(tensor.shape), torch.from_numpy(np.array(tensor.data)))
    return fields, pairs


@pytest.mark.parametrize("name", ["plain", "rslora", "patterns", "embed"])
def test_gguf_as_llama_cpp_applies_it(name, variants_root, tmp_path):
    """Names from gguf-py's map, shapes as llama.cpp's loader checks them, and ΔW by llama.cpp's
    runtime rule (scale = alpha/rank, rank = lora_b.ne[0]) equal to PEFT's merge in GGUF layout:
    the Q/K permutation of the merged weight, not of the delta alone."""
    gguf = pytest.importorskip("gguf")
    fields, pairs = gguf_pairs(converted(name, "gguf", variants_root, tmp_path))
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    alpha = float(fields["adapter.lora.alpha"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, LLAMA["num_hidden_layers"])
    merged, base = peft_merged(variant(name, variants_root)), base_state()
    expected = {names.get_name(k, try_suffixes=(".weight",)): k for k in peft_deltas(variant(name, variants_root))}
    assert sorted(pairs) == sorted(expected)
    for stem, pair in pairs.items():
        key = expected[stem]
        (a_ne, a), (b_ne, b) = pair["lora_a"], pair["lora_b"]
        model_ne = list(reversed(base[key].shape))
        scale = alpha / b_ne[0] if alpha else 1.0
        if stem == "token_embd.weight":  # llama.cpp: get_rows(lora_a, tokens) then mul_mat(lora_b, ·)
            assert model_ne[0] == b_ne[1] and model_ne[1] == a_ne[1]
            delta = scale * a @ b.T
        else:
            assert model_ne[0] == a_ne[0] and model_ne[1] == b_ne[1] and a_ne[1] == b_ne[0]
            delta = scale * b @ a
        assert_close_relative(gguf_space(key, base[key]) + delta, gguf_space(key, merged[key]), f"gguf/{name} {stem}")


def test_gguf_unpermuting_recovers_peft_lora_b(variants_root, tmp_path):
    _, pairs = gguf_pairs(converted("plain", "gguf", variants_root, tmp_path))
    with safe_open(variant("plain", variants_root) / "adapter_model.safetensors", "pt") as handle:
        for projection, heads in (("q_proj", LLAMA["num_attention_heads"]), ("k_proj", LLAMA["num_key_value_heads"])):
            peft_b = handle.get_tensor(f"base_model.model.model.layers.1.self_attn.{projection}.lora_B.weight")
            gguf_b = pairs[f"blk.1.attn_{projection[0]}.weight"]["lora_b"][1]
            rows = llama_cpp_permute(torch.arange(peft_b.shape[0]), LLAMA["num_attention_heads"], heads)
            assert not torch.equal(gguf_b, peft_b)  # the permutation is not the identity here
            assert torch.equal(gguf_b[torch.argsort(rows)], peft_b)
            assert torch.equal(
                pairs[f"blk.1.attn_{projection[0]}.weight"]["lora_a"][1],
                handle.get_tensor(f"base_model.model.model.layers.1.self_attn.{projection}.lora_A.weight"),
            )


def test_gguf_bf16_factors_round_trip(variants_root, tmp_path):
    adapter = formats.read_adapter(variant("plain", variants_root))
    for deltas in adapter.deltas.values():
        deltas[0] = type(deltas[0])(
            down=deltas[0].down.bfloat16(), up=deltas[0].up.bfloat16(), scale=deltas[0].scale, shape=deltas[0].shape
        )
    formats.write_adapter(adapter, tmp_path / "a.gguf", "gguf", base=Checkpoint(BASE))
    back = read_back(tmp_path / "a.gguf", "gguf")
    for key, deltas in adapter.items():
        got = back.deltas[key][0]
        assert got.down.dtype == torch.bfloat16 and torch.equal(got.down, deltas[0].down)
        assert torch.equal(got.up, deltas[0].up)


def test_gguf_refuses_a_full_model_file(tmp_path):
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "model.gguf"), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(SurgeonError, match="not a LoRA adapter"):
        read_back(tmp_path / "model.gguf", "gguf")


# ---------------------------------------------------------------- ONNX Runtime


def test_ort_parameters_as_onnx_runtime_reads_them(variants_root, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    out = converted("rslora", "ort", variants_root, tmp_path)
    adapter_file = ort.AdapterFormat.read_adapter(str(out))  # owns the memory the parameters point into
    parameters = {k: v.numpy().copy() for k, v in adapter_file.get_parameters().items()}
    expected = peft_deltas(variant("rslora", variants_root))
    assert sorted(parameters) == sorted(
        f"{k[: -len('.weight')]}.{p}.weight" for k in expected for p in ("lora_A", "lora_B")
    )
    for key, delta in expected.items():
        a, b = (
            parameters[f"{key[: -len('.weight')]}.lora_A.weight"],
            parameters[f"{key[: -len('.weight')]}.lora_B.weight"],
        )
        assert a.shape[0] == delta.shape[1] and b.shape[1] == delta.shape[0]  # A in×r, B r×out
        assert_close_relative(torch.from_numpy(a @ b), delta.T, key)  # scale is inside B


def test_ort_adapter_runs_in_an_onnx_runtime_session(variants_root, tmp_path):
    """A graph with one LoRA MatMul branch per target, fed by the adapter through LoraAdapter."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    out = converted("patterns", "ort", variants_root, tmp_path)
    merged, base = peft_merged(variant("patterns", variants_root)), base_state()
    keys = sorted(peft_deltas(variant("patterns", variants_root)))
    nodes, inputs, outputs, initializers, feeds = [], [], [], [], {}
    for i, key in enumerate(keys):
        module, (rows, cols) = key[: -len(".weight")], base[key].shape
        a, b = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        nodes += [
            helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"base{i}"]),
            helper.make_node("MatMul", [f"x{i}", a], [f"xa{i}"]),
            helper.make_node("MatMul", [f"xa{i}", b], [f"lora{i}"]),
            helper.make_node("Add", [f"base{i}", f"lora{i}"], [f"y{i}"]),
        ]
        inputs += [
            helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [2, cols]),
            helper.make_tensor_value_info(a, TensorProto.FLOAT, [cols, "lora_r"]),
            helper.make_tensor_value_info(b, TensorProto.FLOAT, ["lora_r", rows]),
        ]
        initializers += [
            numpy_helper.from_array(base[key].T.contiguous().numpy(), f"w{i}"),
            numpy_helper.from_array(np.zeros((cols, 0), np.float32), a),
            numpy_helper.from_array(np.zeros((0, rows), np.float32), b),
        ]
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [2, rows]))
        feeds[f"x{i}"] = np.random.default_rng(i).standard_normal((2, cols)).astype(np.float32)
    model = helper.make_model(
        helper.make_graph(nodes, "lora", inputs, outputs, initializers), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 9
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    lora = ort.LoraAdapter()
    lora.Load(str(out))
    options = ort.RunOptions()
    options.add_active_adapter(lora)
    results = session.run(None, feeds, options)
    for i, key in enumerate(keys):
        x = torch.from_numpy(feeds[f"x{i}"])
        assert_close_relative(torch.from_numpy(results[i]), x @ merged[key].T, f"ort session {key}", tolerance=1e-4)


# ---------------------------------------------------------------- refusals and detection


@pytest.mark.parametrize(
    ("fmt", "name", "reason"),
    [
        ("gguf", "dora", "DoRA"),
        ("ort", "dora", "DoRA"),
        ("ort", "embed", "embedding"),
        ("mlx", "modules_to_save", "modules_to_save"),
        ("gguf", "modules_to_save", "modules_to_save"),
        ("ort", "modules_to_save", "modules_to_save"),
    ],
)
def test_what_a_format_cannot_hold_is_refused_with_the_reason(fmt, name, reason, variants_root, tmp_path):
    out = tmp_path / f"out.{fmt}"
    with pytest.raises(SurgeonError, match=reason):
        convert_adapter(variant(name, variants_root), fmt, out, base_path=BASE)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_gguf_needs_the_base_and_a_known_architecture(variants_root, tmp_path):
    with pytest.raises(SurgeonError, match="needs the base"):
        convert_adapter(variant("plain", variants_root), "gguf", tmp_path / "a.gguf")
    bert = BASE.parent / "tiny-bert"
    with pytest.raises(SurgeonError, match="model_type 'bert'"):
        formats.write_adapter(
            formats.read_adapter(BASE.parent / "tiny-bert-lora"), tmp_path / "b.gguf", "gguf", base=Checkpoint(bert)
        )


def test_detection_picks_each_format_and_lists_what_it_looked_for(variants_root, tmp_path):
    made = {"peft": variant("plain", variants_root)}
    for fmt in ("mlx", "gguf", "ort"):
        made[fmt] = converted("plain", fmt, variants_root, tmp_path)
    for fmt, path in made.items():
        assert formats.detect(path).name == fmt
        assert formats.read_adapter(path, base=Checkpoint(BASE)).source_format == fmt
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "weights.bin").write_bytes(b"\0" * 64)
    with pytest.raises(SurgeonError, match="not an adapter") as error:
        formats.read_adapter(unknown)
    assert len(str(error.value)) < 200
    for found in formats.FORMATS.values():
        assert found.looks_for in error.value.details
