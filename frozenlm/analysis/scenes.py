"""Pictures of motion-forecasting scenes: lanes, agents' histories, K forecasts shaded by score, the truth."""

from __future__ import annotations

from matplotlib.figure import Figure
from torch import Tensor

from frozenlm.data.motion import MAP_KINDS, VECTOR_DIM

AGENT_FLAG = VECTOR_DIM - 1 - len(MAP_KINDS)
MAP_COLOURS = {"centreline": "0.75", "boundary": "0.45", "crosswalk": "tab:olive"}


def draw_scene(ax, batch: dict, index: int, trajectories: Tensor, probabilities: Tensor) -> None:
    """Scene `index` of a collated batch in the focal agent's frame (metres): centrelines light grey,
    lane boundaries dark grey, crosswalks olive, other agents' histories blue, the focal history black,
    the K forecasts `[K, T, 2]` orange with opacity by their `probabilities [K]`, the ground truth
    green when the batch has it."""
    for group in ("agent", "map"):
        polylines, mask = batch[f"{group}_vectors"][index].cpu().float(), batch[f"{group}_mask"][index].cpu()
        for p, (vectors, valid) in enumerate(zip(polylines, mask)):
            vectors = vectors[valid]
            if len(vectors) == 0:
                continue
            xs = [vectors[0, 0].item(), *vectors[:, 2].tolist()]
            ys = [vectors[0, 1].item(), *vectors[:, 3].tolist()]
            if group == "map":
                kind = MAP_KINDS[int(vectors[0, AGENT_FLAG + 1 :].argmax())]
                ax.plot(xs, ys, color=MAP_COLOURS[kind], lw=1, zorder=1)
            else:
                ax.plot(xs, ys, color="black" if p == 0 else "tab:blue", lw=2 if p == 0 else 1, zorder=3)
    strongest = probabilities.max().item()
    for trajectory, probability in zip(trajectories.cpu().float(), probabilities.cpu().float()):
        alpha = 0.15 + 0.85 * probability.item() / strongest
        ax.plot(trajectory[:, 0], trajectory[:, 1], color="tab:orange", alpha=alpha, lw=1.5, zorder=4)
    if batch.get("has_target", ["True"])[index] != "False":
        target = batch["target"][index].cpu().float()
        ax.plot(target[:, 0], target[:, 1], color="tab:green", lw=2, ls="--", zorder=5)
    ax.set_aspect("equal")
    ax.set_title(f"{batch['scenario_id'][index]}", fontsize=8)
    ax.tick_params(labelsize=6)


def scenes_figure(batch: dict, trajectories: Tensor, probabilities: Tensor, count: int = 4):
    """A row of `draw_scene` panels for the first `count` scenes of a batch (a pyplot-free
    `Figure`, so training processes draw without touching the user's backend)."""
    count = min(count, len(batch["scenario_id"]))
    figure = Figure(figsize=(4 * count, 4))
    axes = figure.subplots(1, count, squeeze=False)
    for i, ax in enumerate(axes[0]):
        draw_scene(ax, batch, i, trajectories[i], probabilities[i])
    figure.tight_layout()
    return figure
