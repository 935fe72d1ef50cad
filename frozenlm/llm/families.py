"""Language-model families whose transformer layers can be used as frozen visual-encoder blocks.

Each family names transformers' own layer class (never a re-implementation) and how its checkpoints
lay out the layer stack, keyed by the ``model_type`` of the checkpoint's ``config.json``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch.nn as nn
from transformers import PretrainedConfig


@dataclass(frozen=True)
class LMFamily:
    """How to build and address one layer of a language-model family.

    Attributes:
        layer_class: ``module:ClassName`` of transformers' layer class.
        container: name of the ``ModuleList`` holding the layers in checkpoint keys
            (``model.layers.31.mlp...`` -> ``layers``).
        attention_output: ``(submodule, "input" | "output")`` of a layer where the residual stream
            after its attention sub-layer can be read (activation maps): pre-norm layers add the
            attention output to the stream and normalise it for the FFN, so it is that norm's input;
            BERT's ``attention`` module already ends with the add & LayerNorm.
        lora_attention: the attention maps LoRA adapts by default (query and value, as Hu et al.),
            as paths inside one layer.
        lora_mlp: the MLP maps LoRA also adapts with ``llm.lora.mlp``.
        rotary: the layer takes ``position_embeddings=(cos, sin)``; we pass the identity rotation
            because the visual tokens carry their own positions.
    """

    layer_class: str
    container: str
    attention_output: tuple[str, str]
    lora_attention: tuple[str, ...]
    lora_mlp: tuple[str, ...]
    rotary: bool = False

    def build_layer(self, config: PretrainedConfig, layer_idx: int) -> nn.Module:
        """Layer ``layer_idx`` of this family: transformers' own layer class, built from ``config``."""
        module_name, class_name = self.layer_class.split(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        return cls(config, layer_idx=layer_idx)


_DECODER = "transformers.models.{0}.modeling_{0}:{1}"

_PRE_FFN_NORM = ("post_attention_layernorm", "input")

_QV = ("self_attn.q_proj", "self_attn.v_proj")
_GATED_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

def _family(family: str, layer_class: str, container: str = "layers", **kwargs) -> LMFamily:
    """A layer class of ``transformers.models.<family>``; LLaMA-like (pre-norm, rotary, gated MLP) unless overridden."""
    defaults = {"attention_output": _PRE_FFN_NORM, "lora_attention": _QV, "lora_mlp": _GATED_MLP, "rotary": True}
    return LMFamily(_DECODER.format(family, layer_class), container, **{**defaults, **kwargs})


FAMILIES: dict[str, LMFamily] = {
    "llama": _family("llama", "LlamaDecoderLayer"),
    "mistral": _family("mistral", "MistralDecoderLayer"),
    "qwen2": _family("qwen2", "Qwen2DecoderLayer"),
    # Pre-norm OPT (do_layer_norm_before: all sizes but 350m); post-norm OPT is handled by the reader.
    "opt": _family(
        "opt", "OPTDecoderLayer", attention_output=("final_layer_norm", "input"), lora_mlp=("fc1", "fc2"), rotary=False
    ),
    # GPT-2 computes query, key and value with one fused map.
    "gpt2": _family(
        "gpt2", "GPT2Block", "h", attention_output=("ln_2", "input"), lora_attention=("attn.c_attn",),
        lora_mlp=("mlp.c_fc", "mlp.c_proj"), rotary=False,
    ),  # fmt: skip
    "bert": _family(
        "bert", "BertLayer", "layer", attention_output=("attention", "output"),
        lora_attention=("attention.self.query", "attention.self.value"),
        lora_mlp=("intermediate.dense", "output.dense"), rotary=False,
    ),  # fmt: skip
}


def get_family(model_type: str) -> LMFamily:
    """The family for a checkpoint's ``model_type``, or a clear error listing the supported ones."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"Unsupported language-model family model_type={model_type!r} in config.json; "
            f"supported: {', '.join(sorted(FAMILIES))}."
        ) from None
