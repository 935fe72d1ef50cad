"""Pictures of a decomposed ViT ([`learngene`][frozenlm.models.learngene]): the coefficients per block, the size
of each gene, and accuracy against depth and genes from the learngene miniature's sweep."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import torch
from matplotlib.figure import Figure

from frozenlm.models.learngene import BASES, coefficients


def plot_coefficients(depth: int = 12, genes: int = 4) -> Figure:
    """`a(l, n)` against the block `l` for each basis, one line per gene `n`.

    Examples:
        >>> from frozenlm.analysis import plot_coefficients
        >>> figure = plot_coefficients(depth=12, genes=4)  # doctest: +SKIP
    """
    figure = Figure(figsize=(3.2 * len(BASES), 2.8))
    for ax, basis in zip(figure.subplots(1, len(BASES), sharey=True), BASES):
        count = 2 if basis == "linear" else genes
        for n, column in enumerate(coefficients(basis, depth, count).T):
            ax.plot(range(depth), column, marker=".", label=f"gene {n}")
        ax.set_title(basis)
        ax.set_xlabel("block l")
    figure.axes[0].set_ylabel("a(l, n)")
    figure.axes[0].legend(fontsize=7)
    figure.tight_layout()
    return figure


def gene_norms(state: dict[str, torch.Tensor], prefix: str = "learngenes.genes.") -> dict[int, float]:
    """The Frobenius norm of each gene (all its parameters together) in a decomposed model's state dict (the
    model's, or its task's or checkpoint's: `model.learngenes.genes.*`)."""
    squares: dict[int, float] = {}
    for key, value in state.items():
        key = key.removeprefix("model.")
        if key.startswith(prefix):
            gene = int(key[len(prefix) :].split(".", 1)[0])
            squares[gene] = squares.get(gene, 0.0) + float(value.float().square().sum())
    return {gene: squares[gene] ** 0.5 for gene in sorted(squares)}


def plot_accuracy_vs_depth(results_csv: str | Path, metric: str = "val_acc1") -> Figure:
    """From the miniature's `results.csv` (variants `d<depth>_g<genes>` and `scratch_d<depth>`): the
    mean final metric ± sd over seeds against depth, one line per gene count and one for scratch.

    Examples:
        >>> from frozenlm.analysis import plot_accuracy_vs_depth
        >>> plot_accuracy_vs_depth("docs/learngene_demo/results.csv").savefig("depth.png")  # doctest: +SKIP
    """
    lines: dict[str, list[tuple[int, float, float]]] = {}
    with open(results_csv, newline="") as file:
        for row in csv.DictReader(file):
            match = re.fullmatch(r"(?:d(\d+)_g(\d+)|scratch_d(\d+))", row["variant"])
            if match is None:
                continue
            depth = int(match.group(1) or match.group(3))
            label = f"recomposed from {match.group(2)} gene(s)" if match.group(2) else "from scratch"
            lines.setdefault(label, []).append((depth, float(row["final_mean"]), float(row["final_sd"] or 0)))
    figure = Figure(figsize=(5, 3.5))
    ax = figure.subplots()
    for label, points in sorted(lines.items(), key=lambda item: (item[0] == "from scratch", item[0])):
        depths, means, sds = zip(*sorted(points))
        ax.errorbar(depths, means, yerr=sds, marker="o", capsize=4, label=label,
                    linestyle="--" if label == "from scratch" else "-")  # fmt: skip
    ax.set_xticks(sorted({depth for points in lines.values() for depth, _, _ in points}))
    ax.set_xlabel("depth (blocks)")
    ax.set_ylabel(f"final {metric} (mean ± sd)")
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure
