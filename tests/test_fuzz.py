"""Fuzzing the readers through the commands: every fixture kind (base safetensors and shard index, a
bitsandbytes 4-bit checkpoint, PEFT LoRA and prompt tuning, mlx, GGUF, ONNX Runtime, sparse diff, kohya,
diffusers, AdapterHub LoRA and (IA)³), mutated byte by byte and field by field with a fixed seed, is
given in-process to each command that makes sense for it: ``inspect``, ``merge``, ``unmerge``,
``extract`` (base kinds), ``convert`` (to PEFT and to another writer), ``compose`` (cat and svd) and
``resize`` (adapter kinds). Whatever the mutation, the command either succeeds or says ``Error: ...``
and exits non-zero: never a traceback, never a hang, nothing left at the output, the inputs
untouched, and a command that succeeds writes only finite numbers.

``SURGEON_FUZZ_SEED`` and ``SURGEON_FUZZ_CASES`` (per kind and command) change the run; a failure
prints the seed and the case, and ``SURGEON_FUZZ_SEED=<seed>`` replays it.
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
from traceback import extract_tb

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from surgeon.checkpoint import Checkpoint, StreamingWriter
from surgeon.cli import main
from surgeon.delta import Adapter, Sparse

SEED = int(os.environ.get("SURGEON_FUZZ_SEED", "20261127"))
CASES = int(os.environ.get("SURGEON_FUZZ_CASES", "5"))
CASE_SECONDS = 20
BASE_COMMANDS = ("inspect", "merge", "unmerge", "extract")
ADAPTER_COMMANDS = (
    "inspect",
    "merge",
    "unmerge",
    "convert-peft",
    "convert-other",
    "compose-cat",
    "compose-svd",
    "resize",
)


@dataclass
class Kind:
    """A fixture kind: its files in ``folder`` (mutation targets), the base model it belongs to, and
    the commands that make sense for it."""

    folder: Path
    target: str  # the path given to the commands, relative to the case's copy
    mutable: list[str]
    base: Path
    commands: tuple[str, ...] = ADAPTER_COMMANDS

    @property
    def is_base(self) -> bool:
        return self.commands == BASE_COMMANDS


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


def _prompt_tuning(base: Path, out: Path) -> Path:
    """A PEFT prompt-tuning adapter on the tiny llama, saved by PEFT."""
    import peft
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    peft.get_peft_model(LlamaForCausalLM.from_pretrained(base), config).save_pretrained(out)
    return out


def _bnb_4bit(base: Path, out: Path) -> Path:
    """The tiny llama quantized to nf4 (double quant) by transformers + bitsandbytes on CPU."""
    import transformers

    transformers.logging.set_verbosity_error()
    options = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        base, quantization_config=transformers.BitsAndBytesConfig(**options), device_map="cpu"
    )
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def kinds(fixtures_dir, tmp_path_factory) -> dict[str, Kind]:
    root = tmp_path_factory.mktemp("fuzz-fixtures")
    base, lora = fixtures_dir / "tiny-llama", fixtures_dir / "tiny-llama-lora"
    copy = lambda source, name: Path(shutil.copytree(source, root / name))  # noqa: E731
    made = {
        "base": Kind(copy(base, "base"), ".", ["model.safetensors", "config.json"], base, BASE_COMMANDS),
        "shards": Kind(
            _sharded(base, root / "shards"),
            ".",
            [
                "model.safetensors.index.json",
                "model-00001-of-00003.safetensors",
                "model-00003-of-00003.safetensors",
                "config.json",
            ],
            base,
            BASE_COMMANDS,
        ),
        "peft": Kind(copy(lora, "peft"), ".", ["adapter_model.safetensors", "adapter_config.json"], base),
        "mlx": Kind(
            _convert(lora, "mlx", root / "mlx", base), ".", ["adapters.safetensors", "adapter_config.json"], base
        ),
        "sparse": Kind(_sparse(base, root / "sparse"), ".", ["sparse_model.safetensors", "sparse_config.json"], base),
        "adapterhub-lora": Kind(
            copy(fixtures_dir / "adapterhub" / "llama-lora", "ah-lora"),
            ".",
            ["adapter.safetensors", "adapter_config.json"],
            base,
        ),
        "adapterhub-ia3": Kind(
            copy(fixtures_dir / "adapterhub" / "llama-ia3", "ah-ia3"),
            ".",
            ["pytorch_adapter.bin", "adapter_config.json", "head_config.json"],
            base,
        ),
        "prompt-tuning": Kind(
            _prompt_tuning(base, root / "prompt"), ".", ["adapter_model.safetensors", "adapter_config.json"], base
        ),
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
        made[name] = Kind(folder, file, [file], base)
    assert Path(made["shards"].folder / "model-00003-of-00003.safetensors").is_file()
    return made


@pytest.fixture(scope="session")
def bnb_kind(fixtures_dir, tmp_path_factory) -> Kind:
    pytest.importorskip("bitsandbytes")
    folder = _bnb_4bit(fixtures_dir / "tiny-llama", tmp_path_factory.mktemp("fuzz-bnb") / "bnb")
    return Kind(folder, ".", ["model.safetensors", "config.json"], fixtures_dir / "tiny-llama", BASE_COMMANDS)


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


def _where(result) -> str:
    """The project's frames of a traceback, to find the defect without replaying it."""
    frames = [f for f in extract_tb(result.exc_info[2]) if "site-packages" not in f.filename]
    return "\n".join(f"  {f.filename}:{f.lineno} in {f.name}: {f.line}" for f in frames)


def _check(result, case: str, out_parent: Path) -> None:
    exception = result.exception
    assert exception is None or isinstance(exception, SystemExit), (
        f"{case}: {type(exception).__name__}: {exception}\n{result.output}\n{_where(result)}"
    )
    assert "Traceback" not in result.output, f"{case}: {result.output}"
    if result.exit_code != 0:
        assert result.output.startswith(("Error: ", "Usage: ")), f"{case}: {result.output}"
        assert result.output.startswith("Usage: ") or result.output.count("\n") == 1, f"{case}: {result.output}"
        assert not any(out_parent.iterdir()), f"{case}: left {[p.name for p in out_parent.iterdir()]} after failing"


def _assert_finite_output(outputs: Path, case: str) -> None:
    for file in outputs.rglob("*.safetensors"):
        for key, tensor in load_file(file).items():
            if tensor.is_floating_point():
                assert torch.isfinite(tensor).all(), f"{case}: exited 0 but {key} in {file.name} holds NaN or Inf"


@dataclass
class Case:
    """What one command is given: the (mutated) input, the pristine base and LoRA beside it, the output."""

    kind: Kind
    target: Path
    lora: Path
    out: Path
    rng: random.Random

    @property
    def base(self) -> Path:
        return self.kind.base

    def dtype(self) -> list[str]:
        """An output dtype the case picks: casts and the config's rewrite are part of what can fail."""
        return ["--dtype", self.rng.choice(["auto", "auto", "fp16", "bf16"])]

    def pair(self) -> list[Path]:
        """(checkpoint, adapter) for merge and unmerge: the mutated one in its place."""
        return [self.target, self.lora] if self.kind.is_base else [self.base, self.target]

    def writer(self) -> list:
        """A writer other than PEFT that writes safetensors, with the output it takes (file or folder)."""
        to = self.rng.choice(["mlx", "kohya", "diffusers", "sparse"])
        return ["--to", to, "-o", self.out.with_suffix(".safetensors") if to in ("kohya", "diffusers") else self.out]


#: Each command as a case calls it; adapter commands get the base, for the kinds only it resolves.
COMMANDS = {
    "inspect": lambda c: ["inspect", c.target] + ([] if c.kind.is_base else ["--base", c.base]),
    "merge": lambda c: ["merge", *c.pair(), "-o", c.out, *c.dtype()],
    "unmerge": lambda c: ["unmerge", *c.pair(), "-o", c.out, *c.dtype()],
    "extract": lambda c: ["extract", c.base, c.target, "--rank", "2", "-o", c.out],
    "convert-peft": lambda c: ["convert", c.target, "--to", "peft", "--base", c.base, "-o", c.out],
    "convert-other": lambda c: ["convert", c.target, "--base", c.base, *c.writer()],
    "compose-cat": lambda c: ["compose", c.target, c.lora, "--method", "cat", "--base", c.base, "-o", c.out],
    "compose-svd": lambda c: ["compose", c.target, "--method", "svd", "--rank", "2", "--base", c.base, "-o", c.out],
    "resize": lambda c: ["resize", c.target, "--rank", "2", "--base", c.base, "-o", c.out],
}
BASE_KINDS = ["base", "shards", "bnb-4bit"]
ADAPTER_KINDS = ["peft", "mlx", "sparse", "gguf", "ort", "kohya", "diffusers"]
ADAPTER_KINDS += ["adapterhub-lora", "adapterhub-ia3", "prompt-tuning"]
PAIRS = [(k, c) for k in BASE_KINDS for c in BASE_COMMANDS] + [(k, c) for k in ADAPTER_KINDS for c in ADAPTER_COMMANDS]


def _kind(request, name: str) -> Kind:
    """The kind's fixture; the bitsandbytes one only where bitsandbytes is installed."""
    return request.getfixturevalue("bnb_kind") if name == "bnb-4bit" else request.getfixturevalue("kinds")[name]


def _pristine(kind: Kind, lora: Path) -> dict[str, str]:
    return {str(folder): _hashes(folder) for folder in (kind.base, lora)}


@pytest.mark.parametrize("name, command", PAIRS)
def test_fuzzed_inputs_never_crash_hang_or_leave_output(request, fixtures_dir, tmp_path, name, command):
    kind, lora = _kind(request, name), fixtures_dir / "tiny-llama-lora"
    rng = random.Random(f"{SEED}-{name}-{command}")
    pristine = _pristine(kind, lora)
    for number in range(CASES):
        case_dir = tmp_path / f"case{number}"
        inputs = Path(shutil.copytree(kind.folder, case_dir / "in"))
        file = inputs / rng.choice(kind.mutable)
        how, data = mutate(rng, file.name, file.read_bytes())
        file.write_bytes(data)
        label = f"seed {SEED}, kind {name}, {command} case {number}: {how} on {file.name}"
        before = _hashes(inputs)
        outputs = case_dir / "outputs"
        outputs.mkdir()
        result = _invoke(COMMANDS[command](Case(kind, inputs / kind.target, lora, outputs / "out", rng)))
        _check(result, label, outputs)
        if result.exit_code == 0:
            _assert_finite_output(outputs, label)
        assert _hashes(inputs) == before, f"{label}: an input was modified"
        shutil.rmtree(case_dir)
    assert _pristine(kind, lora) == pristine, f"{name} {command}: a pristine input was modified"
