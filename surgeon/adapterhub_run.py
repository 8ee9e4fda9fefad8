"""AdapterHub adapters that no weight delta expresses, run inside a transformers 5 model so that
export-onnx traces them into the graph: which method runs how."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from surgeon.errors import SurgeonError


def attach(model: nn.Module, path: Path) -> nn.Module:
    """``model`` with the AdapterHub adapter at ``path`` running inside it (wrapped in place)."""
    from surgeon.checkpoint_files import read_json
    from surgeon.formats import adapterhub

    config = read_json(path / adapterhub.CONFIG_FILE)["config"]
    method = config.get("architecture") or "bottleneck"
    if method == "bottleneck":
        from surgeon.bottleneck import attach as attach_bottleneck

        return attach_bottleneck(model, path)
    raise SurgeonError(
        f"{path}: an AdapterHub {adapterhub.family(config)} runs in the adapters library only; export-onnx bakes "
        "AdapterHub bottleneck adapters into the graph, not this."
    )
