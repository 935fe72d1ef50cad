"""Low-rank adapters on the LM block's layers (LoRA, Hu et al., ICLR 2022), through `peft`.

Between the two ablations the paper has (LM layers fully frozen, or fully fine-tuned), LoRA keeps
the pretrained weights frozen and trains a rank-`r` update `(alpha / r) * B A` beside chosen
linear maps of each layer. `peft.inject_adapter_in_model` wraps those maps in place, so the layers
stay transformers' own classes; `B` starts at zero, so training starts from the frozen block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from frozenlm.llm.families import LMFamily

ADAPTER_NAME = "default"


@dataclass
class LoRAConfig:
    """The `llm.lora` section: `--model.llm.lora '{r: 8, alpha: 16}'`.

    Attributes:
        r: rank of the update.
        alpha: scale numerator: the update is `(alpha / r) * B A`.
        dropout: dropout on the adapters' input (the frozen layers keep theirs off).
        targets: linear maps to adapt, named as inside one layer (`self_attn.q_proj`) or by a dotted
            suffix (`q_proj`, `query`), as peft's `target_modules`. Default: the family's
            attention query and value maps (LLaMA `q_proj`/`v_proj`, BERT `query`/`value`,
            GPT-2's fused `c_attn`), plus its MLP maps with `mlp: true`.
        mlp: also adapt the family's MLP maps (only with the default `targets`).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | None = None
    mlp: bool = False

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"llm.lora.r must be >= 1, got {self.r}.")
        if self.alpha <= 0:
            raise ValueError(f"llm.lora.alpha must be > 0, got {self.alpha}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"llm.lora.dropout must be in [0, 1), got {self.dropout}.")
        if self.targets is not None and self.mlp:
            raise ValueError("llm.lora: give either `targets` or `mlp: true` (which adds the family's MLP maps).")
        if self.targets is not None and not self.targets:
            raise ValueError("llm.lora.targets is empty: name at least one linear map, or leave it unset.")


def lora_target_names(layers: nn.ModuleList, family: LMFamily, config: LoRAConfig) -> list[str]:
    """Full module names in `layers` (`"0.self_attn.q_proj"`) that get adapters."""
    linear = [name for name, module in layers.named_modules() if isinstance(module, (nn.Linear, Conv1D))]
    if config.targets is None:
        paths = family.lora_attention + (family.lora_mlp if config.mlp else ())
        return [f"{index}.{path}" for index in range(len(layers)) for path in paths]
    names = []
    for target in config.targets:
        found = [name for name in linear if name == target or name.endswith(f".{target}")]
        if not found:
            inside = sorted({name.split(".", 1)[1] for name in linear})
            raise ValueError(f"llm.lora.targets: {target!r} names no linear map of the LM layers; they have {inside}.")
        names += [name for name in found if name not in names]
    return names


def add_lora(layers: nn.ModuleList, family: LMFamily, config: LoRAConfig) -> None:
    """Wrap the target maps of `layers` with trainable float32 LoRA adapters, in place; the
    layers' own weights stay frozen, in their dtype."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.tuners_utils import cast_adapter_dtype
    except ImportError as error:
        raise ImportError("llm.lora needs peft: pip install 'frozenlm[lora]' (or pip install peft).") from error
    targets = lora_target_names(layers, family, config)
    # GPT-2 stores its linear maps transposed (Conv1D); peft needs to be told.
    transposed = any(isinstance(layers.get_submodule(name), Conv1D) for name in targets)
    peft_config = LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets,
        fan_in_fan_out=transposed,
    )  # fmt: skip
    layers.requires_grad_(False)
    inject_adapter_in_model(peft_config, layers, adapter_name=ADAPTER_NAME)
    # Adapters of bf16/fp16 layers would be created in that dtype; they train in float32.
    cast_adapter_dtype(layers, ADAPTER_NAME)
