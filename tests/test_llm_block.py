"""FrozenLMBlock: bidirectional frozen LM layers between two trainable adapters, for every family."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from frozenlm.llm.block import FrozenLMBlock, LLMConfig, build_block

IN_DIM = 16


@pytest.fixture(scope="module")
def family_block(lm_checkpoint):
    """``family_block(family, **kwargs)``: the family's last layer between adapters (seeded), cached."""
    cache = {}

    def make(family: str, **kwargs) -> FrozenLMBlock:
        key = (family, repr(sorted(kwargs.items())))
        if key not in cache:
            torch.manual_seed(0)
            cache[key] = FrozenLMBlock.from_pretrained(str(lm_checkpoint(family, "sharded")), in_dim=IN_DIM, **kwargs)
        return cache[key]

    return make


def tokens(batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, length, IN_DIM, generator=torch.Generator().manual_seed(seed))


# -- bidirectional, no positions -------------------------------------------------------------------
@torch.no_grad()
def test_permuting_tokens_permutes_outputs(family_block, lm_family):
    """No causal mask and no positions: the block is permutation-equivariant over tokens."""
    block = family_block(lm_family, layers=[0, -1])
    x = tokens(length=9)
    out = block(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    for seed in range(2):
        perm = torch.randperm(9, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(block(x[:, perm]), out[:, perm], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_first_token_sees_the_last(family_block, lm_family):
    """A causal layer would make token 0 ignore every later token."""
    block = family_block(lm_family)
    x = tokens()
    y = x.clone()
    y[:, -1] += 1.0
    assert (block(x)[:, 0] - block(y)[:, 0]).abs().max() > 1e-4


# -- padding ----------------------------------------------------------------------------------------
@torch.no_grad()
def test_padded_tokens_do_not_change_the_others(family_block, lm_family):
    block = family_block(lm_family)
    x = tokens(length=6)
    reference = block(x)
    # Appended padding, different amounts per sample, with arbitrary (large) values.
    padded = torch.cat([x, 50 * tokens(length=4, seed=1)], dim=1)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 6:] = True
    mask[1, 6:] = True
    out = block(padded, mask)
    torch.testing.assert_close(out[:, :6], reference, atol=1e-5, rtol=1e-4)
    # Padding interleaved with the valid tokens: there are no positions, so this is the same set.
    order = torch.tensor([0, 6, 1, 7, 2, 3, 8, 4, 9, 5])
    out = block(padded[:, order], mask[:, order])
    torch.testing.assert_close(out[:, ~mask[0, order]], reference, atol=1e-5, rtol=1e-4)
    # An all-False mask is no mask.
    torch.testing.assert_close(block(x, torch.zeros(2, 6, dtype=torch.bool)), reference)


@torch.no_grad()
def test_samples_with_different_lengths(family_block, lm_family):
    block = family_block(lm_family)
    short, long = tokens(batch=1, length=3, seed=2), tokens(batch=1, length=8, seed=3)
    batch = torch.cat([torch.cat([short, torch.zeros(1, 5, IN_DIM)], dim=1), long])
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, 3:] = True
    out = block(batch, mask)
    torch.testing.assert_close(out[0, :3], block(short)[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[1], block(long)[0], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_fully_padded_sample_is_finite(family_block, lm_family):
    block = family_block(lm_family)
    x = tokens(length=5)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1] = True
    out = block(x, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], block(x[:1])[0], atol=1e-5, rtol=1e-4)


def test_bad_inputs(family_block):
    block = family_block("llama")
    with pytest.raises(ValueError, match=r"expects tokens \[B, N, 16\], got \(2, 5, 8\)"):
        block(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"expects tokens \[B, N, 16\]"):
        block(torch.randn(5, IN_DIM))
    with pytest.raises(ValueError, match=r"padding_mask must be a bool tensor \[B, N\] = \[2, 5\]"):
        block(tokens(length=5), torch.zeros(2, 5))  # float, not bool
    with pytest.raises(ValueError, match=r"padding_mask must be a bool tensor \[B, N\] = \[2, 5\]"):
        block(tokens(length=5), torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"padding_mask must be a bool tensor"):
        block(tokens(length=5), torch.zeros(2, 5, 1, dtype=torch.bool))


# -- frozen, trainable adapters -----------------------------------------------------------------------
def test_gradients_reach_adapters_and_inputs_but_not_frozen_weights(lm_checkpoint, lm_family):
    block = FrozenLMBlock.from_pretrained(str(lm_checkpoint(lm_family, "sharded")), [-1], in_dim=IN_DIM)
    frozen = list(block.layers.parameters())
    assert frozen and not any(p.requires_grad for p in frozen)
    assert {n.split(".")[0] for n, p in block.named_parameters() if p.requires_grad} == {"adapter_in", "adapter_out"}
    x = tokens().requires_grad_(True)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, 5:] = True
    block(x, mask).square().sum().backward()
    assert all(p.grad is None for p in frozen)
    for adapter in (block.adapter_in, block.adapter_out):
        assert adapter.weight.grad is not None and adapter.weight.grad.abs().sum() > 0
    assert x.grad is not None and x.grad[0, :5].abs().sum() > 0 and x.grad[1].abs().sum() > 0


def test_adapters_are_bias_free_truncated_normal(family_block):
    block = family_block("llama")
    assert block.adapter_in.bias is None and block.adapter_out.bias is None
    assert block.adapter_in.weight.shape == (64, IN_DIM) and block.adapter_out.weight.shape == (IN_DIM, 64)
    for adapter in (block.adapter_in, block.adapter_out):
        # timm/DeiT's trunc_normal_(std=.02): bounds at +-2 absolute, i.e. in effect a plain normal.
        assert 0.014 < adapter.weight.std() < 0.026 and adapter.weight.mean().abs() < 0.005


def test_frozen_layers_stay_in_eval_mode_under_a_training_parent(lm_checkpoint):
    """BERT's dropout 0.1 never applies to the frozen layers, even when the model trains."""
    block = FrozenLMBlock.from_pretrained(str(lm_checkpoint("bert", "sharded")), [-1], in_dim=IN_DIM)
    assert any(isinstance(m, nn.Dropout) and m.p > 0 for m in block.layers.modules())
    parent = nn.Sequential(nn.Identity(), block)
    parent.train()
    assert parent.training and block.training and block.adapter_in.training
    assert not any(m.training for m in block.layers.modules())
    x = tokens()
    torch.testing.assert_close(block(x), block(x), atol=0, rtol=0)
    parent.eval()
    assert not block.training and not any(m.training for m in block.layers.modules())
    parent.train()
    assert not any(m.training for m in block.layers.modules())


def test_trainable_layers_train_and_get_gradients(lm_checkpoint):
    block = FrozenLMBlock.from_pretrained(str(lm_checkpoint("bert", "sharded")), [-1], in_dim=IN_DIM, trainable=True)
    assert block.trainable and all(p.requires_grad for p in block.parameters())
    parent = nn.Sequential(block).train()
    assert all(m.training for m in block.layers.modules())
    x = tokens()
    assert not torch.allclose(block(x), block(x))  # dropout is active
    block(x).square().sum().backward()
    assert all(p.grad is not None for p in block.layers.parameters())
    parent.eval()
    torch.testing.assert_close(block(x), block(x), atol=0, rtol=0)


# -- bf16 ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "bert"])
def test_bfloat16_weights(lm_checkpoint, family):
    folder = str(lm_checkpoint(family, "sharded"))
    fp32 = FrozenLMBlock.from_pretrained(folder, [-1], in_dim=IN_DIM)
    bf16 = FrozenLMBlock.from_pretrained(folder, [-1], in_dim=IN_DIM, dtype="bfloat16")
    bf16.load_state_dict(fp32.state_dict())  # same adapters; the layers are cast back to bf16 in place
    assert {p.dtype for p in bf16.layers.parameters()} == {torch.bfloat16}
    assert bf16.adapter_in.weight.dtype == torch.float32 and bf16.lm_dtype == torch.bfloat16
    x = tokens(length=6)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1, 4:] = True
    with torch.no_grad():
        reference = fp32(x, mask)
    scale = reference.abs().max()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bf16(x, mask)
    assert torch.isfinite(out).all()
    assert (out.float() - reference).abs().max() < 0.05 * scale
    out.float().square().sum().backward()
    for adapter in (bf16.adapter_in, bf16.adapter_out):
        assert adapter.weight.grad is not None and adapter.weight.grad.dtype == torch.float32
        assert torch.isfinite(adapter.weight.grad).all() and adapter.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in bf16.layers.parameters())

    # Without autocast the hidden states are cast to the weights' dtype and back.
    bf16.zero_grad()
    out = bf16(x, mask)
    assert out.dtype == torch.float32
    assert (out - reference).abs().max() < 0.05 * scale
    out.square().sum().backward()
    assert bf16.adapter_in.weight.grad.abs().sum() > 0


# -- ablations -----------------------------------------------------------------------------------------
def test_random_init_ablation(tiny_llama_checkpoint):
    folder = str(tiny_llama_checkpoint)
    pretrained = FrozenLMBlock.from_pretrained(folder, [-2, -1], in_dim=IN_DIM)
    random_a = FrozenLMBlock.from_pretrained(folder, [-2, -1], in_dim=IN_DIM, init="random", seed=7)
    random_b = FrozenLMBlock.from_pretrained(folder, [-2, -1], in_dim=IN_DIM, init="random", seed=7)
    random_c = FrozenLMBlock.from_pretrained(folder, [-2, -1], in_dim=IN_DIM, init="random", seed=8)
    assert random_a.init == "random" and pretrained.init == "pretrained"
    assert random_a.layer_indices == [4, 5] and random_a.source == folder
    shapes = {k: v.shape for k, v in pretrained.layers.state_dict().items()}
    assert {k: v.shape for k, v in random_a.layers.state_dict().items()} == shapes
    a, b, c = (m.layers.state_dict() for m in (random_a, random_b, random_c))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert random_a.fingerprint == random_b.fingerprint != random_c.fingerprint != pretrained.fingerprint
    matrices = [k for k, v in a.items() if v.ndim == 2]
    assert matrices and not any(torch.equal(a[k], pretrained.layers.state_dict()[k]) for k in matrices)
    assert not any(p.requires_grad for p in random_a.layers.parameters())
    assert random_a(tokens()).shape == (2, 7, IN_DIM)
    # The seed does not disturb the global random stream.
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    FrozenLMBlock.from_pretrained(folder, [-1], in_dim=IN_DIM, init="random", seed=3)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), expected)


def test_random_init_from_config(tiny_lm):
    config = tiny_lm("opt").config
    a = FrozenLMBlock.from_config(config, [-1], in_dim=IN_DIM, seed=1)
    b = FrozenLMBlock.from_config(config, [3], in_dim=IN_DIM, seed=1)
    assert a.fingerprint == b.fingerprint and a.layer_indices == [3] and a.source is None
    assert a(tokens()).shape == (2, 7, IN_DIM)


def test_mlp_ablation_has_exactly_the_adapters_parameters(tiny_llama_checkpoint):
    block = FrozenLMBlock.from_pretrained(str(tiny_llama_checkpoint), [-1], in_dim=IN_DIM, replace_with_mlp=True)
    assert block.layers is None
    trainable = sum(p.numel() for p in block.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in block.parameters()) == 2 * IN_DIM * 64
    pretrained = FrozenLMBlock.from_pretrained(str(tiny_llama_checkpoint), [-1], in_dim=IN_DIM)
    assert trainable == sum(p.numel() for p in pretrained.parameters() if p.requires_grad)
    x = tokens().requires_grad_(True)
    out = block(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert block.adapter_in.weight.grad is not None and x.grad is not None
    assert "mlp" in repr(block)


def test_post_norm_is_parameter_free_and_optional(tiny_llama_checkpoint):
    with_norm = FrozenLMBlock.from_pretrained(str(tiny_llama_checkpoint), [-1], in_dim=IN_DIM)
    without = FrozenLMBlock.from_pretrained(str(tiny_llama_checkpoint), [-1], in_dim=IN_DIM, post_norm=False)
    assert not list(with_norm.norm.parameters())
    without.load_state_dict(with_norm.state_dict())
    x = tokens()
    with torch.no_grad():
        hidden = with_norm.run_layers(with_norm.adapter_in(x))
        expected = with_norm.adapter_out(hidden * torch.rsqrt(hidden.square().mean(-1, keepdim=True) + 1e-6))
        torch.testing.assert_close(with_norm(x), expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(without(x), with_norm.adapter_out(hidden))


def test_build_block_from_llm_config(tiny_llama_checkpoint):
    block = build_block(LLMConfig(checkpoint=str(tiny_llama_checkpoint), layers=[-2, -1], dtype="bfloat16"), 24)
    assert block.layer_indices == [4, 5] and block.in_dim == 24 and block.lm_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="llm.checkpoint is not set"):
        build_block(LLMConfig(), 24)


def test_deepcopy_keeps_the_block_frozen(family_block):
    """EMA copies of a model (timm ModelEmaV3) deep-copy the block."""
    block = family_block("llama")
    twin = copy.deepcopy(block)
    assert twin.fingerprint == block.fingerprint and not any(p.requires_grad for p in twin.layers.parameters())
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(twin(x), block(x))


# -- the real pretrained MiniLM -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm(minilm_checkpoint):
    from transformers import BertModel

    from frozenlm.llm.checkpoint import LMCheckpoint

    folder = LMCheckpoint(minilm_checkpoint).folder
    model = BertModel.from_pretrained(str(folder), attn_implementation="eager").eval()
    block = FrozenLMBlock.from_pretrained(minilm_checkpoint, [-1], in_dim=32)
    return model, block


def test_real_minilm_last_layer_tensors(minilm):
    model, block = minilm
    assert block.lm_config.model_type == "bert" and block.lm_config.num_hidden_layers == 6
    assert block.d_llm == 384 and block.layer_indices == [5]
    expected = model.encoder.layer[5].state_dict()
    got = block.layers[0].state_dict()
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key


@torch.no_grad()
def test_real_minilm_layer_matches_transformers(minilm):
    """Our bidirectional run of the real layer 5 equals BertModel's own layer 5, padded or not."""
    model, block = minilm
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 20000, (2, 12), generator=generator)
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    states = model(input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
    ours = block.run_layers(states[5])
    torch.testing.assert_close(ours, states[6], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours, model.encoder.layer[5](states[5]), atol=1e-5, rtol=1e-4)

    # BERT's attention_mask = 0 and our padding_mask = True hide the same tokens.
    attention_mask[1, 7:] = 0
    states = model(input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
    ours = block.run_layers(states[5], padding_mask=attention_mask == 0)
    valid = attention_mask.bool()
    torch.testing.assert_close(ours[valid], states[6][valid], atol=1e-5, rtol=1e-4)

    out = block(torch.randn(2, 12, 32, generator=generator), attention_mask == 0)
    assert out.shape == (2, 12, 32) and torch.isfinite(out).all()
