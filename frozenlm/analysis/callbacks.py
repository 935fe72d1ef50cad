"""Lightning callback that tracks gradient coherence during training (GCR, Bai et al., AAAI 2025)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.func import functional_call

from frozenlm.analysis.coherence import m_coherence, mean_pairwise_cosine, per_sample_gradients

LOG_PREFIX = "grad_coherence"


class _ProbeLossModule(nn.Module):
    """Routes `forward` to `probe_loss` so that `functional_call` can swap the tensors it reads."""

    def __init__(self, module: L.LightningModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.module.probe_loss(batch)


def parameter_group(name: str) -> str:
    """Group of a parameter for `parameters="per_block"`.

    The name up to its first numeric component, i.e. one block of a `ModuleList`/`Sequential`
    (`model.blocks.3.attn.qkv.weight` -> `model.blocks.3`); otherwise the module that owns it
    (`model.head.weight` -> `model.head`); a parameter of the root module is its own group.
    """
    parts = name.split(".")
    for index, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: index + 1])
    return ".".join(parts[:-1]) or name


class GradientCoherenceCallback(L.Callback):
    """Logs the gradient coherence of a fixed probe batch every `every_n_steps` optimizer steps.

    GCR (Bai et al., "Frozen Language Models Are Gradient Coherence Rectifiers in Vision
    Transformers", AAAI 2025) attributes the gain of a frozen LLM block to more aligned per-sample
    gradients. This callback measures that alignment on the first `probe_size` samples of the first
    training batch (kept on the module's device) and writes to every logger, at `trainer.global_step`:

    * `grad_coherence/m_coherence`: `||sum_i g_i||^2 / sum_i ||g_i||^2` (1 orthogonal .. m identical);
    * `grad_coherence/m_coherence_normalized`: the same divided by `m` (comparable across probe sizes);
    * `grad_coherence/mean_cosine`: mean of `cos(g_i, g_j)` over pairs `i != j`.

    With `parameters="per_block"` the same keys are also written per group (see `parameter_group`)
    as `grad_coherence/<group>/<measure>`.

    Measurements happen at step 0 (initial weights, before the first update) and after every
    `every_n_steps`-th update. Each one runs `pl_module.probe_loss` on the probe with every
    submodule in eval mode (dropout, drop-path and BatchNorm updates off; each submodule's own mode is
    restored after), outside the trainer's autocast (in the parameters' own dtype), through
    `torch.func.functional_call` on detached parameters and buffers, so neither `.grad` fields nor
    the optimizer state change.

    Contract: the LightningModule defines `probe_loss(batch: dict) -> Tensor`, the mean training
    loss of a batch dict without mixup/cutmix, that is vmap-compatible (no `.item()`, no
    `self.log`, no data-dependent Python control flow, no in-place updates of buffers). The
    probe keeps the tensor entries of the batch; other entries are dropped. The probe is not
    checkpointed: a resumed run takes a new one from its first batch.

    Cost: one vmapped forward and backward of `probe_size` samples; memory peaks at about two copies
    of the per-sample gradients (`2 * probe_size * P` values) plus a float64 copy of each measured
    slice. Bound it with `probe_size`, a list of prefixes and `max_params`. Only global rank 0
    measures; the other ranks skip the hook.

    Args:
        every_n_steps: measure every this many optimizer steps.
        probe_size: number of probe samples `m` (fewer if the first batch is smaller).
        parameters: `"trainable"` (all parameters with `requires_grad`), `"per_block"` (the same,
            plus per-group logs), or a list of parameter-name prefixes matched at `.` boundaries
            (`"model.blocks.1"` does not match `model.blocks.10`), trainable or not.
        max_params: upper bound on the number of selected parameter elements `P`; exceeding it raises
            a `ValueError` (subsampling coordinates would not save the per-sample backward cost).

    Examples:
        >>> from frozenlm.analysis import GradientCoherenceCallback
        >>> callback = GradientCoherenceCallback(every_n_steps=100, probe_size=16)

        In a config: `trainer.callbacks: [{class_path: frozenlm.analysis.GradientCoherenceCallback}]`.
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        probe_size: int = 16,
        parameters: str | list[str] = "trainable",
        max_params: int | None = None,
    ) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1; got {every_n_steps}.")
        if probe_size < 2:
            raise ValueError(f"probe_size must be >= 2 (coherence compares samples); got {probe_size}.")
        if isinstance(parameters, str) and parameters not in ("trainable", "per_block"):
            raise ValueError(f"parameters must be 'trainable', 'per_block' or a list of prefixes; got {parameters!r}.")
        self.every_n_steps = every_n_steps
        self.probe_size = probe_size
        self.parameters = parameters
        self.max_params = max_params
        self._probe: dict[str, Tensor] | None = None
        self._last_measured_step: int | None = None
        self.history: dict[int, dict[str, float]] = {}  # global step -> the measures logged there

    def select_parameters(self, pl_module: L.LightningModule) -> dict[str, Tensor]:
        """The parameters measured, by name, as chosen by `parameters` and bounded by `max_params`."""
        named = dict(pl_module.named_parameters())
        if isinstance(self.parameters, str):
            selected = {name: p for name, p in named.items() if p.requires_grad}
        else:
            prefixes = [prefix.rstrip(".") for prefix in self.parameters]
            selected = {
                name: p
                for name, p in named.items()
                if any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)
            }
        if not selected:
            raise ValueError(f"GradientCoherenceCallback: no parameters selected by {self.parameters!r}.")
        count = sum(p.numel() for p in selected.values())
        if self.max_params is not None and count > self.max_params:
            raise ValueError(
                f"GradientCoherenceCallback: {count} selected parameter elements exceed max_params="
                f"{self.max_params}; pass a list of name prefixes or raise max_params."
            )
        return selected

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not callable(getattr(pl_module, "probe_loss", None)):
            raise TypeError(
                f"GradientCoherenceCallback needs {type(pl_module).__name__}.probe_loss(batch) -> mean loss without mixup."
            )
        self.select_parameters(pl_module)  # fail fast on an empty or oversized selection
        if not trainer.loggers:
            rank_zero_warn("GradientCoherenceCallback: the trainer has no logger, so nothing will be recorded.")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._probe is None:
            self._probe = self._take_probe(batch, pl_module.device)
        self._maybe_measure(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._maybe_measure(trainer, pl_module)

    def _take_probe(self, batch: Any, device: torch.device) -> dict[str, Tensor]:
        if not isinstance(batch, Mapping):
            raise TypeError(f"GradientCoherenceCallback expects dict batches; got {type(batch).__name__}.")
        # Cloned so that later in-place edits of the training batch cannot change the probe.
        probe = {
            key: value[: self.probe_size].detach().clone().to(device)
            for key, value in batch.items()
            if isinstance(value, Tensor) and value.ndim > 0
        }
        sizes = {value.shape[0] for value in probe.values()}
        if not sizes or sizes != {min(sizes)} or min(sizes) < 2:
            raise ValueError(f"The probe needs >= 2 samples in every tensor entry; got sizes {sorted(sizes)}.")
        if min(sizes) < self.probe_size:
            rank_zero_warn(f"GradientCoherenceCallback: the first batch has {min(sizes)} < probe_size samples.")
        return probe

    def _maybe_measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        # Gradient accumulation repeats a global step over several batches: measure it once.
        if step % self.every_n_steps or step == self._last_measured_step:
            return
        self._last_measured_step = step
        if not trainer.is_global_zero or not trainer.loggers:
            return
        metrics = self.measure(pl_module)
        self.history[step] = metrics
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    @torch.no_grad()  # torch.func.grad still differentiates; this only keeps the outer graph empty
    def measure(self, pl_module: L.LightningModule, batch: Mapping[str, Any] | None = None) -> dict[str, float]:
        """Coherence measures for the current weights, keyed as they are logged.

        Uses the stored probe, or all samples of `batch` (e.g. from a notebook, on a checkpoint).
        """
        probe = self._probe if batch is None else batch
        if probe is None:
            raise RuntimeError("No probe batch yet: it is taken from the first training batch.")
        selected = self.select_parameters(pl_module)
        wrapper = _ProbeLossModule(pl_module)
        constants = {
            f"module.{name}": p.detach() for name, p in pl_module.named_parameters() if name not in selected
        }
        constants.update({f"module.{name}": b for name, b in pl_module.named_buffers()})
        differentiated = {f"module.{name}": p.detach() for name, p in selected.items()}

        def probe_loss(params: dict[str, Tensor], sample_batch: dict[str, Tensor]) -> Tensor:
            return functional_call(wrapper, (constants, params), (sample_batch,))

        modes = [(module, module.training) for module in pl_module.modules()]
        pl_module.eval()
        try:
            gradients = per_sample_gradients(probe_loss, differentiated, probe)
        finally:
            for module, training in modes:
                module.training = training

        metrics = _coherence_metrics(f"{LOG_PREFIX}/", gradients)
        if self.parameters == "per_block":
            columns, start = {}, 0
            for name, p in selected.items():
                columns.setdefault(parameter_group(name), []).append(gradients[:, start : start + p.numel()])
                start += p.numel()
            for group, blocks in columns.items():
                metrics.update(_coherence_metrics(f"{LOG_PREFIX}/{group}/", torch.cat(blocks, dim=1)))
        return metrics


def _coherence_metrics(prefix: str, gradients: Tensor) -> dict[str, float]:
    coherence = m_coherence(gradients).item()
    return {
        f"{prefix}m_coherence": coherence,
        f"{prefix}m_coherence_normalized": coherence / gradients.shape[0],
        f"{prefix}mean_cosine": mean_pairwise_cosine(gradients).item(),
    }
