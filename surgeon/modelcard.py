"""The model card ``surgeon push`` writes: what the directory is (an adapter, a checkpoint, an ONNX
export), said in the Hub's metadata so the Hub can link it to its base model, and in a table a
reader can check; plus how it was made, when surgeon recorded that in the files themselves.

"How it was made" is read from the outputs, never guessed: the safetensors ``__metadata__`` or ONNX
``metadata_props`` entries that :func:`surgeon.cli.provenance` writes (``surgeon_command``,
``surgeon_version``), and ``surgeon_report`` (a JSON string) where a command records its report.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from surgeon.errors import SurgeonError
from surgeon.summary import adapter_summary, checkpoint_summary, human_bytes

RECORD_KEYS = ("surgeon_command", "surgeon_version", "surgeon_report")
# The unfilled template that PEFT and transformers save: such a README says nothing worth keeping.
TEMPLATE_MARKER = "[More Information Needed]"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def recorded(directory: Path) -> dict[str, str]:
    """The ``surgeon_*`` entries recorded in the directory's safetensors headers or ONNX graphs."""
    from surgeon.checkpoint import open_safetensors

    found: dict[str, str] = {}
    for weights in sorted(directory.glob("*.safetensors")):
        with open_safetensors(weights) as handle:
            found.update({k: v for k, v in (handle.metadata() or {}).items() if k in RECORD_KEYS})
    for graph in sorted(directory.glob("*.onnx")):
        import onnx

        found.update(
            {
                p.key: p.value
                for p in onnx.load(str(graph), load_external_data=False).metadata_props
                if p.key in RECORD_KEYS
            }
        )
    return found


def keeps_own_card(directory: Path) -> bool:
    """Whether the directory's README.md should be uploaded as it is: one someone wrote, not
    PEFT's unfilled template, and not a card copied along from the inputs of a surgeon command
    (merge copies the base's files, README.md included)."""
    readme = directory / "README.md"
    if not readme.is_file() or TEMPLATE_MARKER in readme.read_text(errors="replace"):
        return False
    return "surgeon_command" not in recorded(directory)


def hub_model_id(name: str | None) -> str | None:
    """``name`` when it can be a Hub model id (``org/name``, not a local folder), else None."""
    if not name:
        return None
    name = name.removeprefix("hf://").split("@")[0]
    if not _REPO_ID.match(name) or Path(name).exists():
        return None
    return name


def _cached_hub_model(recorded_name: str | None) -> str | None:
    """The base an adapter recorded, as a Hub id only where the Hub cache holds that model: PEFT records
    the path the base was loaded from, and a relative local path such as ``out/base`` reads as an id."""
    from surgeon.hub import cached_config

    name = hub_model_id(recorded_name)
    return name if name and cached_config(name) else None


def _yaml(**fields) -> str:
    from huggingface_hub import ModelCardData

    return ModelCardData(**{k: v for k, v in fields.items() if v}).to_yaml()


def _table(rows: list[tuple[str, object]]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows if value not in (None, "", [], {})]
    return "\n".join(lines)


def _how_made(record: dict[str, str]) -> str:
    if not record.get("surgeon_command"):
        return ""
    version = f" (surgeon {record['surgeon_version']})" if record.get("surgeon_version") else ""
    text = f"\n## How it was made\n\nWith{version}:\n\n```\n{record['surgeon_command']}\n```\n"
    if record.get("surgeon_report"):
        try:
            report = json.dumps(json.loads(record["surgeon_report"]), indent=2)
        except json.JSONDecodeError:
            report = record["surgeon_report"]
        text += f"\nReport:\n\n```json\n{report}\n```\n"
    return text


def _value(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return f"{value:,}" if isinstance(value, int) else str(value)


def adapter_card(directory: Path, module, repo_id: str, base_model: str | None) -> str:
    adapter = module.read(directory)
    summary = adapter_summary(adapter, directory, module.description)
    base = hub_model_id(base_model) if base_model else _cached_hub_model(adapter.base_model)
    kinds = sorted({"dora" if "DoRA" in m["delta"] else m["delta"].split()[0].lower() for m in summary["modules"]})
    is_peft = module.name == "peft"
    header = _yaml(
        base_model=base,
        base_model_relation="adapter" if base else None,
        library_name="peft" if is_peft else None,
        tags=["surgeon", *kinds, *([f"base_model:adapter:{base}"] if base else [])],
    )
    base_text = (
        f"[{base}](https://huggingface.co/{base})"
        if base
        else (f"`{adapter.base_model}`" if adapter.base_model else "its base model")
    )
    rows = [
        ("format", module.description),
        ("base model", base_text),
        ("rank", _value(summary["rank"]) if summary["rank"] else None),
        ("alpha", summary["alpha"]),
        ("scale", _value(summary["scale"]) if summary["scale"] else None),
        ("targets", f"{summary['targets']} weights"),
        ("parameters", f"{summary['params']:,}"),
        ("size", human_bytes(summary["bytes"])),
    ]
    targets = ["| target | count | delta |", "|---|---|---|"]
    targets += [f"| `{m['target']}` | {m['count']} | {m['delta']} |" for m in summary["modules"]]
    text = (
        f"---\n{header}\n---\n\n# {repo_id}\n\nAn adapter for {base_text}.\n\n{_table(rows)}\n\n## Targets\n\n"
        + "\n".join(targets)
        + "\n"
    )
    if is_peft and base:
        text += (
            "\n## Use\n\n```python\nfrom peft import AutoPeftModel\n\nmodel = "
            f'AutoPeftModel.from_pretrained("{repo_id}")\n```\n'
            f"\nOr merge it into the base with surgeon: `surgeon merge hf://{base} hf://{repo_id} -o merged/`.\n"
        )
    return text + _how_made(recorded(directory))


def checkpoint_card(directory: Path, repo_id: str, base_model: str | None) -> str:
    summary = checkpoint_summary(directory)
    base = hub_model_id(base_model)
    has_config = (directory / "config.json").is_file()
    header = _yaml(base_model=base, library_name="transformers" if has_config else None, tags=["surgeon"])
    rows = [
        ("architecture", summary["architecture"]),
        ("base model", f"[{base}](https://huggingface.co/{base})" if base else None),
        ("parameters", f"{summary['params']:,}"),
        ("dtypes", ", ".join(summary["dtypes"])),
        ("size", human_bytes(summary["bytes"])),
        ("files", ", ".join(summary["files"])),
    ]
    return f"---\n{header}\n---\n\n# {repo_id}\n\nA model checkpoint in safetensors.\n\n{_table(rows)}\n" + _how_made(
        recorded(directory)
    )


def onnx_card(directory: Path, graphs: list[Path], repo_id: str, base_model: str | None) -> str:
    import onnx

    rows: list[tuple[str, object]] = []
    for graph in graphs:
        model = onnx.load(str(graph), load_external_data=False)
        inputs = ", ".join(i.name for i in model.graph.input)
        outputs = ", ".join(o.name for o in model.graph.output)
        opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None)
        rows.append((f"`{graph.relative_to(directory)}`", f"opset {opset}; inputs {inputs}; outputs {outputs}"))
    base = hub_model_id(base_model)
    header = _yaml(base_model=base, library_name="onnx", tags=["onnx", "surgeon"])
    return f"---\n{header}\n---\n\n# {repo_id}\n\nAn ONNX export.\n\n{_table(rows)}\n" + _how_made(recorded(directory))


def generate(directory: Path, repo_id: str, base_model: str | None = None) -> str:
    """A README.md for ``directory`` as it will be on ``repo_id``."""
    from surgeon import formats

    module = formats.detect(directory)
    if module is not None:
        return adapter_card(directory, module, repo_id, base_model)
    graphs = sorted(directory.glob("*.onnx"))
    if graphs:
        return onnx_card(directory, graphs, repo_id, base_model)
    try:
        return checkpoint_card(directory, repo_id, base_model)
    except SurgeonError:
        files = sorted(p.name for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
        return f"---\n{_yaml(tags=['surgeon'])}\n---\n\n# {repo_id}\n\nFiles: {', '.join(files)}.\n"
