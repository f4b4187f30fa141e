"""The report's plots, drawn from report_data's numbers into PNG files. matplotlib's object API (Figure, no
pyplot): no display, no global state."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from ..methods import method_named, method_names

PAIR_PANELS = 8  # layers shown as (dropped, kept) matrices: the ones that moved the most segments
DPI = 110


def draw_plots(data: dict, directory: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Draw every plot the data allows into `directory`: ({plot: file name}, {plot: why not drawn})."""
    images, missing = {}, {}
    plots: dict[str, Callable[[dict], Figure | str]] = {  # report.PLOTS, in this order
        "importance": importance_heatmap,
        "reassigned": reassigned_per_layer,
        "pairs": reassigned_pairs,
        "similarity": similarity_histograms,
        "clusters": cluster_sizes,
        "error": output_error,
    }
    for name, draw in plots.items():
        figure = draw(data)
        if isinstance(figure, str):
            missing[name] = figure
            continue
        images[name] = f"{name}.png"
        figure.savefig(directory / images[name], dpi=DPI)  # the constrained layout already fits the labels
    return images, missing


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def importance_heatmap(data: dict) -> Figure | str:
    """Layers x experts, each layer's importance as a share of its total; the kept experts ringed."""
    layers = [entry for entry in data["layers"] if entry["importance"]]
    if not layers:
        return "no layer was ranked (every expert kept, nothing to choose)"
    width = max(len(entry["importance"]) for entry in layers)
    share = np.full((len(layers), width), np.nan)
    for row, entry in enumerate(layers):
        scores = np.asarray(entry["importance"], dtype=float)
        total = scores.sum()
        share[row, :scores.size] = scores / total if total > 0 else scores
    fig = _figure(min(4 + width * 0.12, 18), min(2 + len(layers) * 0.25, 14))
    ax = fig.add_subplot()
    shown = ax.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(shown, ax=ax, label="share of the layer's importance")
    rows = [row for row, entry in enumerate(layers) for _ in entry["kept"]]
    cols = [expert for entry in layers for expert in entry["kept"]]
    ax.scatter(cols, rows, s=max(4, 60 - width // 2), facecolors="none", edgecolors="white", linewidths=0.8,
               label="kept")
    ax.set_yticks(range(len(layers)), [str(entry["layer"]) for entry in layers])
    ax.set_xlabel("expert (original index)")
    ax.set_ylabel("layer")
    method = data["method"]
    own = method in method_names() and method_named(method).keeps_from_outputs
    chooser = f", chosen by {method}'s own criterion" if own else ""
    ax.set_title(f"Expert importance ({layers[0]['importance_source']}); rings: the {data['experts_after']} kept"
                 + chooser)
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.08), fontsize="small", facecolor="0.4", labelcolor="white")
    return fig


def reassigned_per_layer(data: dict) -> Figure | str:
    """Segments each layer moved from dropped experts into kept ones, against all it pooled."""
    layers = data["layers"]
    if not layers:
        return "the record has no MoE layers"
    if not any(e["segments_reassigned"] or e["similarity_histogram"] for e in layers):
        return f"no segment moved, and none was compared (method {data['method']}, or alpha = 1, or every expert kept)"
    fig = _figure(min(4 + len(layers) * 0.3, 18), 3.5)
    ax = fig.add_subplot()
    ax.bar(np.arange(len(layers)), [entry["segments_reassigned"] for entry in layers], color="tab:blue")
    _ticks(ax.set_xticks, [entry["layer"] for entry in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("segments reassigned")
    ax.set_title("Segments moved into kept experts, per layer")
    if not any(entry["segments_reassigned"] for entry in layers):
        ax.set_ylim(0, 1)
        ax.text(0.5, 0.5, "no pooled segment was similar enough to move\n(see the similarity plot)",
                transform=ax.transAxes, ha="center")
    return fig


def reassigned_pairs(data: dict) -> Figure | str:
    """(dropped, kept) matrices of segments moved, for the layers that moved the most."""
    busy = sorted((entry for entry in data["layers"] if entry["transfers"]),
                  key=lambda entry: -entry["segments_reassigned"])[:PAIR_PANELS]
    if not busy:
        return "no segment moved between experts"
    busy.sort(key=lambda entry: entry["layer"])
    cols = min(4, len(busy))
    rows = -(-len(busy) // cols)
    fig = _figure(4 * cols, 3.4 * rows)
    for panel, entry in enumerate(busy):
        dropped = sorted({source for source, _, _ in entry["transfers"]})
        kept = entry["kept"]
        matrix = np.zeros((len(dropped), len(kept)))
        for source, target, count in entry["transfers"]:
            matrix[dropped.index(source), kept.index(target)] = count
        ax = fig.add_subplot(rows, cols, panel + 1)
        shown = ax.imshow(matrix, aspect="auto", cmap="magma", interpolation="nearest")
        fig.colorbar(shown, ax=ax)
        ax.set_title(f"layer {entry['layer']}: {entry['segments_reassigned']} segments", fontsize="medium")
        _ticks(ax.set_xticks, kept)
        _ticks(ax.set_yticks, dropped)
        ax.set_xlabel("kept expert")
        ax.set_ylabel("dropped expert")
    fig.suptitle("Segments moved per (dropped, kept) pair" + (f" (the {len(busy)} layers that moved the most)"
                                                              if len(busy) < len(data["layers"]) else ""))
    return fig


def _ticks(set_ticks, labels: list[int]) -> None:
    step = max(1, len(labels) // 16)
    set_ticks(range(0, len(labels), step), [str(x) for x in labels[::step]])


def similarity_histograms(data: dict) -> Figure | str:
    """Every pooled segment's best cosine to a kept expert: all layers together, and layer by layer;
    the segments right of alpha move."""
    layers = [entry for entry in data["layers"] if entry["similarity_histogram"]]
    if not layers:
        return ("no similarities were computed (the method does not compare segments, no expert was dropped, or "
                "alpha = 1 moves nothing)")
    counts = np.asarray([entry["similarity_histogram"] for entry in layers], dtype=float)
    edges = np.linspace(-1.0, 1.0, counts.shape[1] + 1)  # the record's bins span [-1, 1]
    fig = _figure(9, 3 + min(len(layers) * 0.22, 9))
    top, bottom = fig.subplots(2, 1, height_ratios=[1, 2], sharex=True)
    top.stairs(counts.sum(axis=0), edges, fill=True, color="tab:blue", alpha=0.7)
    top.set_ylabel("segments")
    top.set_title("Best similarity of each pooled segment to the kept experts")
    masked = np.ma.masked_equal(counts, 0)
    shown = bottom.pcolormesh(edges, np.arange(len(layers) + 1), masked, cmap="viridis",
                              norm=LogNorm(vmin=1, vmax=max(1.0, counts.max())))
    fig.colorbar(shown, ax=bottom, label="segments")
    bottom.set_yticks(np.arange(len(layers)) + 0.5, [str(entry["layer"]) for entry in layers])
    bottom.set_ylabel("layer")
    bottom.set_xlabel("cosine similarity")
    used = np.nonzero(counts.sum(axis=0))[0]
    low = min(edges[used[0]], *data["alphas"]) - 0.05
    high = max(edges[used[-1] + 1], *data["alphas"]) + 0.05
    bottom.set_xlim(max(-1.0, low), min(1.0, high))
    label = f"alpha = {', '.join(f'{a:g}' for a in data['alphas'])}"
    for ax in (top, bottom):
        for n, alpha in enumerate(data["alphas"]):
            ax.axvline(alpha, color="tab:red", linestyle="--", linewidth=1.2, label=label if n == 0 else None)
    top.legend(loc="upper right", fontsize="small")
    return fig


def cluster_sizes(data: dict) -> Figure | str:
    """Members per k-means cluster of the rebuilt experts (1: a neuron kept as it was)."""
    pairs = [pair for entry in data["layers"] for pair in entry["cluster_sizes"]]
    if not pairs:
        return "no expert was rebuilt by k-means"
    sizes = np.asarray([size for size, _ in pairs])
    weights = np.asarray([count for _, count in pairs])
    fig = _figure(7, 3.5)
    ax = fig.add_subplot()
    top = int(sizes.max())
    ax.hist(sizes, bins=np.arange(-0.5, top + 1.5, max(1, (top + 1) // 60)), weights=weights, color="tab:green")
    ax.set_yscale("log")
    ax.set_xlabel("members per cluster")
    ax.set_ylabel("clusters")
    rebuilt = sum(len(entry["rebuilt_experts"]) for entry in data["layers"])
    ax.set_title(f"k-means cluster sizes over {rebuilt} rebuilt experts")
    return fig


def output_error(data: dict) -> Figure | str:
    """Each layer's relative output error on held cached inputs, before and after the refit."""
    layers = [entry for entry in data["layers"] if entry["error_before_refit"] is not None]
    if not layers:
        return ("not measured by this rewrite: the options did not fit on the cached inputs (--refit, "
                "--alpha-candidates, --recipe best do); `dern-stream eval OUT --reference IN --calib DUMP` measures "
                "each layer's error afterwards")
    x = np.arange(len(layers))
    after = [entry["error_after_refit"] for entry in layers]
    fig = _figure(min(7 + len(layers) * 0.35, 18), 3.8)
    ax = fig.add_subplot()
    width = 0.4 if any(a is not None for a in after) else 0.8
    ax.bar(x - (width / 2 if width < 0.8 else 0), [entry["error_before_refit"] for entry in layers], width,
           label="before the refit" if width < 0.8 else "output error", color="tab:orange")
    if width < 0.8:
        ax.bar(x + width / 2, [a if a is not None else np.nan for a in after], width, label="after the refit",
               color="tab:blue")
    _ticks(ax.set_xticks, [entry["layer"] for entry in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("relative error of the MoE output")
    held_out = any(entry["error_held_out"] for entry in layers)
    ax.set_title("Per-layer output error on held-out cached inputs (--holdout)" if held_out
                 else "Per-layer output error on the fit sample of cached inputs (in-sample)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig
