"""Draws docs/figures/architecture.svg: the data / task / model / frozen-block split of frozenlm (docs/architecture.md).

    python docs/figures/architecture.py            # rewrites docs/figures/architecture.svg
    python docs/figures/architecture.py --output x.png

Matplotlib only; the SVG keeps its text as text and carries no date, so a rerun writes the same file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUTPUT = Path(__file__).with_suffix(".svg")

# One colour per layer of the split.
DATA, TASK, MODEL, BLOCK, USER = "#dbeafe", "#fef3c7", "#dcfce7", "#fce7f3", "#ede9fe"
EDGE = "#374151"


def box(ax, x, y, w, h, colour, title=None, lines=(), size=9, title_size=10.5, dashed=False):
    """A rounded box with a bold title at its top and lines of text under it."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.12", facecolor=colour,
                                edgecolor=EDGE, linewidth=1.2, linestyle="--" if dashed else "-"))  # fmt: skip
    top = y + h - 0.22
    if title:
        ax.text(x + w / 2, top, title, ha="center", va="top", fontsize=title_size, fontweight="bold", color="#111827")
        top -= 0.36
    for line in lines:
        ax.text(x + w / 2, top, line, ha="center", va="top", fontsize=size, color="#1f2937", family="monospace"
                if line.startswith(("`", "self.", "frozenlm.", "apply_block", "model(")) else None)  # fmt: skip
        top -= 0.3


def arrow(ax, start, end, text=None, offset=(0, 0.12), style="-|>", colour=EDGE, dashed=False, rad=0.0, size=8.5):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=13, color=colour, linewidth=1.3,
                                 linestyle="--" if dashed else "-", connectionstyle=f"arc3,rad={rad}"))  # fmt: skip
    if text:
        x, y = (start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1]
        ax.text(x, y, text, ha="center", va="bottom", fontsize=size, color="#374151", style="italic")


def draw() -> plt.Figure:
    fig, ax = plt.subplots(figsize=(13, 7.4))
    ax.set_xlim(0, 13)
    ax.set_ylim(0, 7.4)
    ax.axis("off")

    # Data: what a batch is.
    box(ax, 0.2, 3.3, 2.5, 2.6, DATA, "DataModule", [
        "frozenlm.data", "datasets, transforms,", "splits, batches:", "images, clips, points,", "scenes, image + text",
    ])  # fmt: skip

    # The task: the recipe around self.model.
    box(ax, 3.2, 0.45, 6.6, 6.75, TASK)
    ax.text(6.5, 6.98, "Task  (LightningModule, frozenlm.tasks)", ha="center", va="top", fontsize=11, fontweight="bold")
    ax.text(6.5, 6.6, "the recipe: losses (main + auxiliary, one helper), metrics, optimiser groups,",
            ha="center", va="top", fontsize=9)  # fmt: skip
    ax.text(6.5, 6.32, "logging, the monitored metric; holds the network as self.model", ha="center", va="top", fontsize=9)

    # The model: a plain nn.Module built from a config.
    box(ax, 3.5, 0.75, 6.0, 5.25, MODEL)
    ax.text(6.5, 5.82, "self.model  (plain nn.Module, frozenlm.models)", ha="center", va="top", fontsize=10.5,
            fontweight="bold")  # fmt: skip
    ax.text(6.5, 5.46, "built from a <Name>Config; its forward shows where the block runs", ha="center", va="top",
            fontsize=8.5)  # fmt: skip

    # The forward path: trunk, the block's place, the rest, the head.
    box(ax, 3.8, 4.15, 1.7, 0.9, "white", None, ["trunk blocks", "0 .. p"], size=9)
    box(ax, 5.8, 4.05, 2.2, 1.1, BLOCK, None, ["apply_block(block, x)", "inline: x through it", "auxiliary: x + branch"],
        size=8)  # fmt: skip
    box(ax, 8.3, 4.15, 1.0, 0.9, "white", None, ["blocks", "p+1 .."], size=9)
    box(ax, 8.3, 2.85, 1.0, 0.8, "white", None, ["head"], size=9)
    arrow(ax, (5.5, 4.6), (5.8, 4.6))
    arrow(ax, (8.0, 4.6), (8.3, 4.6))
    arrow(ax, (8.8, 4.15), (8.8, 3.65))
    arrow(ax, (8.8, 2.85), (8.8, 2.55))
    ax.text(8.8, 2.5, "logits", ha="center", va="top", fontsize=9)

    # The frozen block itself.
    box(ax, 4.05, 1.05, 3.6, 1.75, BLOCK, "frozen LM block", [
        "Linear -> frozen LM layer(s)", "-> Linear   (llm_block)", "frozenlm.llm.create_block",
    ], size=8.5)  # fmt: skip
    arrow(ax, (6.9, 4.05), (6.3, 2.8), dashed=True, rad=0.0)
    ax.text(6.75, 3.45, "runs the block", fontsize=8.5, color="#374151", style="italic")

    # GCR: the auxiliary branch, training only.
    box(ax, 8.0, 1.2, 1.35, 0.95, "white", None, ["aux head", "(GCR, training)"], size=8, dashed=True)
    arrow(ax, (7.65, 1.65), (8.0, 1.65), dashed=True)
    ax.text(7.83, 1.72, "branch", ha="center", va="bottom", fontsize=8, color="#374151", style="italic")
    ax.text(8.67, 1.12, "aux logits", ha="center", va="top", fontsize=8.5)

    # Data into the task; the Trainer / CLI runs both.
    arrow(ax, (2.7, 4.6), (3.8, 4.6), "batch", offset=(-0.35, 0.1))
    box(ax, 0.2, 0.45, 2.5, 2.2, "#f3f4f6", "Trainer / CLI", [
        "frozenlm fit|validate|", "test|predict --config", "checkpoints (.ckpt)",
    ], size=8.5)  # fmt: skip
    arrow(ax, (1.45, 2.65), (1.45, 3.3), dashed=True)
    arrow(ax, (2.7, 1.5), (3.2, 1.5), dashed=True)

    # Taking the model away.
    box(ax, 10.35, 3.6, 2.45, 2.6, USER, "your own code", [
        "frozenlm.create_model(", '  "deit_small_llama")', "frozenlm.load_model(", '  "last.ckpt")', "-> the plain model",
    ], size=8.5)  # fmt: skip
    arrow(ax, (9.5, 4.9), (10.35, 4.9), "take it", offset=(0, 0.1))
    box(ax, 10.35, 1.45, 2.45, 1.6, "white", None, [
        "model(x): inference", "model.forward_features(x)", "-> (tokens, GCR branch)", "no Lightning, no trainer",
    ], size=8.5)  # fmt: skip
    arrow(ax, (11.57, 3.6), (11.57, 3.05))
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=OUTPUT, help="the file to write (.svg or .png)")
    args = parser.parse_args()
    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "frozenlm-architecture", "font.size": 9})
    fig = draw()
    fig.savefig(args.output, bbox_inches="tight", metadata={"Date": None} if args.output.suffix == ".svg" else None)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
