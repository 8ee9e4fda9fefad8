"""Every adapter kind surgeon reads × every command that takes adapters, on the tiny Llama.

Each cell either gives a result checked against the reference — the merged weights the adapter
means, W ⊕ its deltas as surgeon reads them, which the format tests check against each producer
(and which are checked here against PEFT's own merge for the PEFT tuners) — or refuses in one line
(exit 1, ``Error: …``, no traceback). The refusals are pinned in :data:`REFUSED`, with the reason
each must give, so that a cell that starts refusing, or stops, is noticed.

Adapters that only the base resolves (kohya, LyCORIS, GGUF, IA3, VeRA without its shapes) are
composed and resized with ``--base``, as is a diffusers file composed with a PEFT adapter (the base
names both alike).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fixtures import make_image_fixtures as fx
from fixtures.make_fixtures import load_base, make_lora
from surgeon import formats
from surgeon.bundle import SPARSE_SUBDIR
from surgeon.checkpoint import Checkpoint
from surgeon.cli import main
from surgeon.delta import Adapter, Sparse
from surgeon.formats import sparse as sparse_format
from surgeon.keys import bind_to_base
from surgeon.ops.apply import apply_deltas
from surgeon.ops.compose import read_adapters

peft = pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "fixtures" / "tiny-llama"
LORA = ROOT / "fixtures" / "tiny-llama-lora"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
CONVERTS = ["peft", "mlx", "gguf", "ort", "diffusers", "kohya", "sparse"]
COMMANDS = ["inspect", "merge", "unmerge", "compose", "resize"] + [f"convert-{f}" for f in CONVERTS]
#: Kinds whose names or ΔW only the base resolves.
NEEDS_BASE = {"kohya", "lycoris-loha", "lycoris-lokr", "lycoris-full", "gguf", "peft-ia3", "peft-vera"}
#: Kinds composed with a PEFT adapter only through the base, which names both alike (``unet.`` prefix).
COMPOSE_NEEDS_BASE = NEEDS_BASE | {"diffusers"}
#: Output names by format, as each writer expects them (a file or a directory).
OUTPUT_NAMES = {
    "gguf": "out.gguf",
    "ort": "out.onnx_adapter",
    "diffusers": "out.safetensors",
    "kohya": "out.safetensors",
}

_LORA_ONLY = "holds only LoRA factors|cannot hold"
_DENSE = "dense ΔW"
#: (kind, command) → a phrase the one-line refusal must hold.
REFUSED = {
    **{("peft-dora", c): "DoRA" for c in ("unmerge", "compose", "convert-gguf", "convert-ort", "convert-sparse")},
    **{
        (k, c): _DENSE
        for k in ("peft-lokr", "peft-ia3", "lycoris-lokr", "lycoris-full")
        for c in ("convert-peft", "convert-mlx", "convert-gguf", "convert-ort", "convert-diffusers", "convert-kohya")
    },
    ("peft-ia3", "unmerge"): "(IA)³",
    **{
        (k, "convert-sparse"): "LoRA delta"
        for k in ("peft-lora", "peft-loha", "peft-vera", "kohya", "lycoris-loha", "diffusers", "mlx", "gguf", "ort")
    },
    **{("peft-prompt", c): "no ΔW" for c in ("compose", "resize")},
    **{("peft-prompt", f"convert-{f}"): "cannot hold" for f in CONVERTS},
    **{
        (k, c): "sparse ΔW"
        for k in ("sparse",)
        for c in ("convert-peft", "convert-mlx", "convert-gguf", "convert-ort", "convert-diffusers", "convert-kohya")
    },
}


def _peft_tuner(config, out: Path) -> dict[str, torch.Tensor]:
    return fx.peft_tuner(config, load_base("llama", BASE), out).merge_and_unload().state_dict()


def _lycoris(algo: str, out: Path, **kwargs) -> None:
    fx.lycoris_network(load_base("llama", BASE).model, out, algo, **kwargs)


def _convert(source: Path, fmt: str, out: Path) -> None:
    result = CliRunner().invoke(main, ["convert", str(source), "--to", fmt, "--base", str(BASE), "-o", str(out)])
    assert result.exit_code == 0, result.output


def _sparse(out: Path) -> None:
    base = Checkpoint(BASE)
    diff = Adapter(base_model=str(BASE))
    generator = torch.Generator().manual_seed(5)
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        shape = tuple(base.info(key).shape)
        indices = torch.randperm(math.prod(shape), generator=generator)[:40]
        diff.add(key, Sparse(indices, 0.1 * torch.randn(40, generator=generator), shape), "other")
    sparse_format.write(diff, out)


@pytest.fixture(scope="module")
def kinds(tmp_path_factory) -> dict[str, Path]:
    """Every kind of adapter, made by its producer (or by surgeon's checked convert from PEFT's)."""
    root = tmp_path_factory.mktemp("matrix")
    made = {"peft-lora": LORA}
    with fx.single_thread():
        make_lora("llama", BASE, root / "dora", use_dora=True, target_modules=ATTENTION, r=4, lora_alpha=8)
        made["peft-dora"] = root / "dora"
        references = {
            "peft-loha": _peft_tuner(peft.LoHaConfig(r=2, alpha=3, target_modules=ATTENTION), root / "loha"),
            "peft-lokr": _peft_tuner(
                peft.LoKrConfig(r=2, alpha=3, target_modules=ATTENTION, decompose_both=True), root / "lokr"
            ),
            "peft-ia3": _peft_tuner(
                peft.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]), root / "ia3"
            ),
            "peft-vera": _peft_tuner(peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj"]), root / "vera"),
        }
        made.update({kind: root / kind.removeprefix("peft-") for kind in references})
        for algo, kwargs in (("loha", {}), ("lokr", {"factor": 4}), ("full", {})):
            _lycoris(algo, root / f"lycoris-{algo}.safetensors", **kwargs)
            made[f"lycoris-{algo}"] = root / f"lycoris-{algo}.safetensors"
        for fmt, name in (
            ("kohya", "k.safetensors"),
            ("diffusers", "d.safetensors"),
            ("mlx", "mlx"),
            ("gguf", "a.gguf"),
            ("ort", "a.onnx_adapter"),
        ):
            _convert(LORA, fmt, root / name)
            made[fmt] = root / name
        _sparse(root / "sparse")
        made["sparse"] = root / "sparse"
        prompt = peft.get_peft_model(
            load_base("llama", BASE), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
        )
        prompt.save_pretrained(root / "prompt")
        made["peft-prompt"] = root / "prompt"
    base = Checkpoint(BASE)
    for kind, merged in references.items():  # the reference itself, against PEFT's merge_and_unload
        expected = _expected(made[kind], base)
        assert _worst(expected, {k: merged[k] for k in expected}) < 1e-5, kind
    return made


def _read(path: Path, base: Checkpoint) -> Adapter:
    ((adapter, _),) = read_adapters([path], base=base)
    return adapter


def _expected(path: Path, base: Checkpoint, *others: Adapter) -> dict[str, torch.Tensor]:
    """The weights the adapter (then ``others``) means: W ⊕ its deltas, per changed key."""
    plan: dict[str, list] = {}
    for adapter in (_read(path, base), *others):
        for key, deltas in adapter.items():
            plan.setdefault(key, []).extend((d, 1.0) for d in deltas)
    return {key: apply_deltas(base.get(key).double(), deltas) for key, deltas in plan.items()}


def _worst(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    assert set(got) == set(expected), sorted(set(got) ^ set(expected))[:3]
    return max(float((got[k].double() - expected[k].double()).norm() / expected[k].double().norm()) for k in expected)


def _bundle(out: Path, base: Checkpoint) -> Adapter:
    """The adapter a compose/resize output holds: its PEFT LoRA and its sparse part, as one."""
    parts = [out / SPARSE_SUBDIR] if (out / SPARSE_SUBDIR).exists() else []
    parts = ([out] if formats.detect(out) is not None else []) + parts
    combined = Adapter()
    for path in parts:
        for key, deltas in bind_to_base(formats.read_adapter(path, base=base), base.keys(), str(path)).items():
            for delta in deltas:
                combined.add(key, delta)
    return combined


def _applied(adapter: Adapter, base: Checkpoint) -> dict[str, torch.Tensor]:
    return {key: apply_deltas(base.get(key).double(), [(d, 1.0) for d in deltas]) for key, deltas in adapter.items()}


class Cell:
    """One command on one adapter: runs it, and returns None (a checked result) or its one-line refusal."""

    def __init__(self, kind: str, path: Path, tmp: Path):
        self.kind, self.path, self.tmp, self.base = kind, path, tmp, Checkpoint(BASE)
        self.expected = _expected(path, self.base)

    def cli(self, *args) -> str | None:
        result = CliRunner().invoke(main, [str(a) for a in args])
        if result.exit_code == 0:
            return None
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), (
            self.kind,
            args,
            result.output,
        )
        assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
        return lines[0]

    def check(self, got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
        assert _worst(got, expected) < 1e-4

    def inspect(self) -> str | None:
        result = CliRunner().invoke(main, ["inspect", str(self.path), "--base", str(BASE), "--json"])
        assert result.exit_code == 0, result.output
        kinds = {"LoRA", "DoRA", "dense", "sparse", "replacement", "appended rows"}
        assert set(json.loads(result.output)["deltas"]) <= kinds, result.output
        return None

    def merge(self) -> str | None:
        refusal = self.cli("merge", BASE, self.path, "-o", self.tmp / "merged")
        if refusal is None:
            merged = Checkpoint(self.tmp / "merged")
            self.check({k: merged.get(k) for k in self.expected}, self.expected)
        return refusal

    def unmerge(self) -> str | None:
        refusal = self.cli("unmerge", self.tmp / "merged", self.path, "-o", self.tmp / "restored")
        if refusal is None:
            restored = Checkpoint(self.tmp / "restored")
            self.check({k: restored.get(k) for k in self.expected}, {k: self.base.get(k) for k in self.expected})
        return refusal

    def compose(self) -> str | None:
        expected = _expected(self.path, self.base, _read(LORA, self.base))
        out = self.tmp / "composed"
        base = ["--base", BASE] if self.kind in COMPOSE_NEEDS_BASE else []
        refusal = self.cli("compose", self.path, LORA, *base, "-o", out)
        if refusal is None:
            self.check(_applied(_bundle(out, self.base), self.base), expected)
        return refusal

    def resize(self) -> str | None:
        out = self.tmp / "resized"
        base = ["--base", BASE] if self.kind in NEEDS_BASE else []
        refusal = self.cli("resize", self.path, "--rank", 64, *base, "-o", out)
        if refusal is None:
            self.check(_applied(_bundle(out, self.base), self.base), self.expected)
        return refusal

    def convert(self, fmt: str) -> str | None:
        (self.tmp / fmt).mkdir()
        out = self.tmp / fmt / OUTPUT_NAMES.get(fmt, "out")
        refusal = self.cli("convert", self.path, "--to", fmt, "--base", BASE, "-o", out)
        if refusal is None:
            self.check(_applied(_bundle(out, self.base), self.base), self.expected)
        return refusal

    def run(self, command: str) -> str | None:
        if command.startswith("convert-"):
            return self.convert(command.removeprefix("convert-"))
        return getattr(self, command)()


KINDS = [
    "peft-lora",
    "peft-dora",
    "peft-loha",
    "peft-lokr",
    "peft-ia3",
    "peft-vera",
    "kohya",
    "lycoris-loha",
    "lycoris-lokr",
    "lycoris-full",
    "diffusers",
    "mlx",
    "gguf",
    "ort",
    "sparse",
    "peft-prompt",
]


@pytest.mark.parametrize("kind", KINDS)
def test_every_command_takes_the_adapter_or_refuses_in_one_line(kinds, tmp_path, kind):
    cell = Cell(kind, kinds[kind], tmp_path)
    outcomes = {}
    with fx.single_thread():
        for command in COMMANDS:
            try:
                outcomes[command] = cell.run(command)
            except AssertionError as error:  # a wrong result or a bad refusal: listed with the others
                outcomes[command] = f"WRONG {str(error).splitlines()[0][:300]}"
    wrong = []
    for command, outcome in outcomes.items():
        reason = REFUSED.get((kind, command))
        refused = outcome is not None
        if refused != (reason is not None) or (refused and not any(p in outcome for p in reason.split("|"))):
            wrong.append(f"{command}: {outcome or 'ok'} (expected {reason or 'a result'})")
    assert not wrong, f"{kind}: " + "; ".join(wrong)
