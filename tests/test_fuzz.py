"""Fuzzing the readers: every fixture kind (base safetensors and shard index, PEFT, mlx, GGUF, ONNX
Runtime, sparse diff, kohya, diffusers), mutated byte by byte and field by field with a fixed seed, is given to
``inspect`` and ``merge`` in-process. Whatever the mutation, the command either succeeds or says
``Error: ...`` and exits non-zero: never a traceback, never a hang, nothing left at the output, the
inputs untouched, and a merge that succeeds writes only finite numbers.

``SURGEON_FUZZ_SEED`` and ``SURGEON_FUZZ_CASES`` (per kind) change the run; a failure prints the seed
and the case, and ``SURGEON_FUZZ_SEED=<seed>`` replays it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from surgeon.checkpoint import Checkpoint, StreamingWriter
from surgeon.cli import main
from surgeon.delta import Adapter, Sparse

SEED = int(os.environ.get("SURGEON_FUZZ_SEED", "20261127"))
CASES = int(os.environ.get("SURGEON_FUZZ_CASES", "40"))
CASE_SECONDS = 20


@dataclass
class Kind:
    """A fixture kind: its files in ``folder`` (mutation targets), and how to call the commands."""

    folder: Path
    target: str  # the path given to the commands, relative to the case's copy
    mutable: list[str]
    is_base: bool = False


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _convert(adapter: Path, to: str, out: Path, base: Path) -> Path:
    result = run("convert", adapter, "--to", to, "--base", base, "-o", out)
    assert result.exit_code == 0, result.output
    return out


def _sharded(base: Path, out: Path) -> Path:
    checkpoint = Checkpoint(base)
    out.mkdir()
    specs = [(k, checkpoint.info(k)) for k in checkpoint.keys()]
    with StreamingWriter(out, specs, shard_size=150_000) as writer:
        for key, tensor in checkpoint.items():
            writer.write(key, tensor)
    shutil.copy(base / "config.json", out / "config.json")
    return out


def _sparse(base: Path, out: Path) -> Path:
    from surgeon.formats import write_adapter

    checkpoint, adapter = Checkpoint(base), Adapter(source_format="sparse")
    generator = torch.Generator().manual_seed(0)
    for key in [k for k in checkpoint.keys() if k.endswith("proj.weight")][:4]:
        shape = checkpoint.info(key).shape
        indices = torch.randperm(shape[0] * shape[1], generator=generator)[:50].sort().values.to(torch.int32)
        adapter.add(key, Sparse(indices, torch.randn(50, generator=generator) * 0.01, shape))
    write_adapter(adapter, out, "sparse")
    return out


@pytest.fixture(scope="module")
def kinds(fixtures_dir, tmp_path_factory) -> dict[str, Kind]:
    root = tmp_path_factory.mktemp("fuzz-fixtures")
    base, lora = fixtures_dir / "tiny-llama", fixtures_dir / "tiny-llama-lora"
    files = lambda *names: list(names)  # noqa: E731
    made = {
        "base": Kind(Path(shutil.copytree(base, root / "base")), ".", files("model.safetensors", "config.json"), True),
        "shards": Kind(
            _sharded(base, root / "shards"),
            ".",
            files(
                "model.safetensors.index.json",
                "model-00001-of-00003.safetensors",
                "model-00003-of-00003.safetensors",
                "config.json",
            ),
            True,
        ),
        "peft": Kind(
            Path(shutil.copytree(lora, root / "peft")), ".", files("adapter_model.safetensors", "adapter_config.json")
        ),
        "mlx": Kind(
            _convert(lora, "mlx", root / "mlx", base), ".", files("adapters.safetensors", "adapter_config.json")
        ),
        "sparse": Kind(_sparse(base, root / "sparse"), ".", files("sparse_model.safetensors", "sparse_config.json")),
    }
    for name, to, file in (
        ("gguf", "gguf", "adapter.gguf"),
        ("ort", "ort", "adapter.onnx_adapter"),
        ("kohya", "kohya", "lora.safetensors"),
        ("diffusers", "diffusers", "pytorch_lora_weights.safetensors"),
    ):
        folder = root / name
        folder.mkdir()
        _convert(lora, to, folder / file, base)
        made[name] = Kind(folder, file, [file])
    assert Path(made["shards"].folder / "model-00003-of-00003.safetensors").is_file()
    return made


# -- mutations ------------------------------------------------------------------------------------

_ODD_VALUES = [
    None,
    True,
    -1,
    0,
    1,
    2**64,
    1e308,
    -1e-300,
    "",
    "x",
    "..",
    "/etc",
    [],
    {},
    [1, "a"],
    {"a": None},
    float("nan"),
    float("inf"),
]


def _flip(rng: random.Random, raw: bytes) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.randint(1, 8)):
        if data:
            data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def _truncate(rng: random.Random, raw: bytes) -> bytes:
    return raw[: rng.randrange(len(raw) + 1)]


def _splice(rng: random.Random, raw: bytes) -> bytes:
    at, length = rng.randrange(len(raw) + 1), rng.randint(1, 64)
    chunk = rng.choice(
        [bytes(rng.randrange(256) for _ in range(length)), b"\xff" * length, b"\x00" * length, raw[at : at + length]]
    )
    return raw[:at] + chunk + raw[at + rng.choice([0, length]) :]


def _mutate_json_value(rng: random.Random, value):
    """``value`` with one leaf (or one key) replaced by an odd value."""
    if isinstance(value, dict) and value and rng.random() < 0.85:
        key = rng.choice(list(value))
        if rng.random() < 0.1:
            return {k: v for k, v in value.items() if k != key}
        return {**value, key: _mutate_json_value(rng, value[key])}
    if isinstance(value, list) and value and rng.random() < 0.85:
        i = rng.randrange(len(value))
        return value[:i] + [_mutate_json_value(rng, value[i])] + value[i + 1 :]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and rng.random() < 0.5:
        return rng.choice([value * 1000, -value, value + 1, value * 1e30])
    return rng.choice(_ODD_VALUES)


def _json(rng: random.Random, raw: bytes) -> bytes:
    try:
        data = json.loads(raw)
    except ValueError:
        return _flip(rng, raw)
    return json.dumps(_mutate_json_value(rng, data)).encode()


def _safetensors_header(rng: random.Random, raw: bytes) -> bytes:
    """One field of the JSON header changed (dtype, shape, offsets, metadata), the data kept."""
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + size])
    key = rng.choice(list(header))
    if key != "__metadata__" and rng.random() < 0.5:
        field = rng.choice(["dtype", "shape", "data_offsets"])
        entry = header[key]
        entry[field] = {
            "dtype": lambda: rng.choice(
                ["I8", "U8", "I32", "I64", "BOOL", "F8_E4M3", "F8_E5M2", "F16", "BF16", "F64", "F32"]
            ),
            "shape": lambda: rng.choice([[], [0], [1], entry["shape"][::-1], [*entry["shape"], 1], [2**40]]),
            "data_offsets": lambda: [o + rng.choice([-8, -1, 1, 8, 2**40]) for o in entry["data_offsets"]],
        }[field]()
    else:
        header = _mutate_json_value(rng, header)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + raw[8 + size :]


def _values(rng: random.Random, raw: bytes) -> bytes:
    """Tensor values only: large, NaN or Inf floats written over a stretch of the data."""
    size = struct.unpack("<Q", raw[:8])[0]
    start = 8 + size
    if len(raw) - start < 4:
        return raw
    at = start + rng.randrange((len(raw) - start) // 4) * 4
    value = rng.choice([float("nan"), float("inf"), 3e38, 1e20, -65504.0 * 4])
    packed = (struct.pack("<f", value) * rng.randint(1, 4))[: len(raw) - at]
    return raw[:at] + packed + raw[at + len(packed) :]


def mutate(rng: random.Random, name: str, raw: bytes) -> tuple[str, bytes]:
    """(what was done, the mutated bytes) for a file called ``name``."""
    choices = [_flip, _truncate, _splice]
    if name.endswith(".json"):
        choices += [_json] * 4
    if name.endswith(".safetensors") and raw[:8] and struct.unpack("<Q", raw[:8])[0] < len(raw):
        choices += [_safetensors_header] * 3 + [_values] * 2
    how = rng.choice(choices)
    mutated = how(rng, raw)
    return how.__name__.strip("_"), (mutated if mutated != raw else _flip(rng, raw))


# -- the harness ----------------------------------------------------------------------------------


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout(f"a case ran past {CASE_SECONDS} s")


def _invoke(args: list) -> object:
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        return run(*args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _check(result, case: str, out_parent: Path) -> None:
    exception = result.exception
    assert exception is None or isinstance(exception, SystemExit), (
        f"{case}: {type(exception).__name__}: {exception}\n{result.output}"
    )
    assert "Traceback" not in result.output, f"{case}: {result.output}"
    if result.exit_code != 0:
        assert result.output.startswith(("Error: ", "Usage: ")), f"{case}: {result.output}"
        assert not any(out_parent.iterdir()), f"{case}: left {[p.name for p in out_parent.iterdir()]} after failing"


def _assert_finite_output(out: Path, case: str) -> None:
    for file in out.glob("*.safetensors"):
        for key, tensor in load_file(file).items():
            if tensor.is_floating_point():
                assert torch.isfinite(tensor).all(), f"{case}: merge exited 0 but {key} holds NaN or Inf"


def _commands(kind: Kind, target: Path, base: Path, lora: Path, out: Path, dtype: str) -> list[list]:
    """inspect and merge (in an output dtype that the case picks: casts and the config's rewrite are
    part of what can fail)."""
    if kind.is_base:
        return [["inspect", target], ["merge", target, lora, "-o", out, "--dtype", dtype]]
    return [["inspect", target, "--base", base], ["merge", base, target, "-o", out, "--dtype", dtype]]


@pytest.mark.parametrize("name", ["base", "shards", "peft", "mlx", "sparse", "gguf", "ort", "kohya", "diffusers"])
def test_fuzzed_inputs_never_crash_hang_or_leave_output(kinds, fixtures_dir, tmp_path, name):
    kind = kinds[name]
    rng = random.Random(f"{SEED}-{name}")
    base, lora = fixtures_dir / "tiny-llama", fixtures_dir / "tiny-llama-lora"
    for number in range(CASES):
        case_dir = tmp_path / f"case{number}"
        inputs = Path(shutil.copytree(kind.folder, case_dir / "in"))
        file = inputs / rng.choice(kind.mutable)
        how, data = mutate(rng, file.name, file.read_bytes())
        file.write_bytes(data)
        case = f"seed {SEED}, kind {name}, case {number}: {how} on {file.name}"
        before = _hashes(inputs)
        out_parent = case_dir / "outputs"
        out_parent.mkdir()
        dtype = rng.choice(["auto", "auto", "fp16", "bf16"])
        for args in _commands(kind, inputs / kind.target, base, lora, out_parent / "out", dtype):
            result = _invoke(args)
            _check(result, f"{case}, {args[0]}", out_parent)
            if args[0] == "merge" and result.exit_code == 0:
                _assert_finite_output(out_parent / "out", case)
                shutil.rmtree(out_parent / "out")
        assert _hashes(inputs) == before, f"{case}: an input was modified"
        shutil.rmtree(case_dir)
