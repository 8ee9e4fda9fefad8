"""extract's ``--plot``: the normalised singular-value spectra of a fine-tune's deltas, drawn by
matplotlib (the plot extra), checked before any work so that a long extract never ends in a failed plot."""

from __future__ import annotations

from pathlib import Path

from surgeon.errors import SurgeonError, missing_extra


def check_plot(plot_path: Path, report_path: Path | None) -> None:
    """Refuse, before any work, a plot that could not be written: no matplotlib, a file type it
    does not draw, or the report's own file."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise SurgeonError(missing_extra("plot", ["matplotlib"], "--plot")) from None
    if plot_path.suffix[1:] and plot_path.suffix[1:] not in FigureCanvasBase.get_supported_filetypes():
        raise SurgeonError(
            f"{plot_path}: matplotlib draws no {plot_path.suffix} files; name the plot .png, .svg or .pdf."
        )
    if report_path is not None and plot_path.resolve() == report_path.resolve():
        raise SurgeonError(f"{plot_path}: named by both --report and --plot; give each its own file.")


def plot_spectra(result, path: Path, image_format: str = "png") -> None:
    """σᵢ/σ₁ against i for every factored module (log scale), coloured by module name, with the
    kept rank marked: where the spectra flatten is where more rank stops paying."""
    import matplotlib
    import torch

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = {r.key: r.rank for r in result.rows}
    figure, axes = plt.subplots(figsize=(8, 5))
    colours: dict[str, object] = {}
    for key, spectrum in result.spectra.items():
        name = key.rsplit(".", 2)[-2] if key.count(".") >= 2 else key
        label = None if name in colours else name
        colour = colours.setdefault(name, f"C{len(colours) % 10}")
        x = torch.arange(1, spectrum.numel() + 1)
        axes.semilogy(x.numpy(), spectrum.clamp_min(1e-12).numpy(), color=colour, alpha=0.5, linewidth=0.8, label=label)
        kept = ranks.get(key, 0)
        if 0 < kept <= spectrum.numel():
            axes.plot([kept], [max(float(spectrum[kept - 1]), 1e-12)], "o", color=colour, markersize=3)
    axes.set_xlabel("singular value index i")
    axes.set_ylabel("σᵢ / σ₁")
    axes.set_title("Spectra of the fine-tuning deltas (dots: kept rank)")
    if colours:
        axes.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120, format=image_format)
    plt.close(figure)
