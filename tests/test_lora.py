"""LoRA on the frozen LM block (peft): targets per family, what trains, dtypes, checkpoints and restore."""

from __future__ import annotations

import shutil

import pytest
import torch
from peft.tuners.lora import LoraLayer

from frozenlm.llm.block import FrozenLMBlock, LLMConfig
from frozenlm.llm.lora import LoRAConfig
from frozenlm.llm.mixin import CHECKPOINT_KEY
from tests.test_llm_mixin import TinyTask, fit, llm, outputs

IN_DIM = 24
pytestmark = pytest.mark.filterwarnings("ignore:Found .* module\\(s\\) in eval mode")
# The family's default targets inside one layer, written out by hand.
ATTENTION = {
    "llama": {"self_attn.q_proj", "self_attn.v_proj"},
    "mistral": {"self_attn.q_proj", "self_attn.v_proj"},
    "qwen2": {"self_attn.q_proj", "self_attn.v_proj"},
    "opt": {"self_attn.q_proj", "self_attn.v_proj"},
    "opt-postnorm": {"self_attn.q_proj", "self_attn.v_proj"},
    "gpt2": {"attn.c_attn"},
    "bert": {"attention.self.query", "attention.self.value"},
    "gemma3_text": {"self_attn.q_proj", "self_attn.v_proj"},
    "qwen3": {"self_attn.q_proj", "self_attn.v_proj"},
    "phi3": {"self_attn.qkv_proj"},  # fused query, key and value
}
MLP = {
    "llama": {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "phi3": {"mlp.gate_up_proj", "mlp.down_proj"},
    "opt": {"fc1", "fc2"},
    "gpt2": {"mlp.c_fc", "mlp.c_proj"},
    "bert": {"intermediate.dense", "output.dense"},  # not attention.output.dense
}


def adapted(block: FrozenLMBlock) -> set[str]:
    """Module paths inside a layer that carry a LoRA adapter, over all layers."""
    return {name.split(".", 1)[1] for name, m in block.layers.named_modules() if isinstance(m, LoraLayer)}


def tokens(batch: int = 2, length: int = 5) -> torch.Tensor:
    return torch.randn(batch, length, IN_DIM, generator=torch.Generator().manual_seed(0))


def test_default_targets_and_what_trains(lm_checkpoint, lm_family):
    folder = str(lm_checkpoint(lm_family, "sharded"))
    plain = FrozenLMBlock.from_pretrained(folder, [-2, -1], IN_DIM)
    block = FrozenLMBlock.from_pretrained(folder, [-2, -1], IN_DIM, lora=LoRAConfig(r=4, alpha=8))
    assert adapted(block) == ATTENTION[lm_family]
    trained = {name for name, p in block.named_parameters() if p.requires_grad}
    assert trained == {"adapter_in.weight", "adapter_out.weight"} | {
        name for name, _ in block.named_parameters() if ".lora_A." in name or ".lora_B." in name
    }
    # Each adapted map of each of the 2 layers gets A [r, in] and B [out, r].
    assert sum(".lora_A." in name for name in trained) == 2 * len(ATTENTION[lm_family])
    assert block.fingerprint == plain.fingerprint  # the frozen weights are the checkpoint's
    # B starts at zero, so the block starts as the frozen one.
    block.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(block(tokens()), plain(tokens()), atol=0, rtol=0)
    # A step changes the adapters, never the frozen weights.
    frozen = {k: v.clone() for k, v in block.layers.state_dict().items() if "lora_" not in k}
    optimizer = torch.optim.SGD([p for p in block.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        block.train()(tokens()).square().sum().backward()
        optimizer.step()
    after = block.layers.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    lora_b = [p for name, p in block.named_parameters() if ".lora_B." in name]
    assert all(p.abs().sum() > 0 for p in lora_b)
    with torch.no_grad():
        assert not torch.allclose(block.eval()(tokens()), plain.eval()(tokens()))


@pytest.mark.parametrize("family", sorted(MLP))
def test_mlp_targets(lm_checkpoint, family):
    block = FrozenLMBlock.from_pretrained(str(lm_checkpoint(family)), [-1], IN_DIM, lora=LoRAConfig(mlp=True))
    assert adapted(block) == ATTENTION[family] | MLP[family]


def test_targets_override_and_errors(tiny_llama_checkpoint):
    folder = str(tiny_llama_checkpoint)
    block = FrozenLMBlock.from_pretrained(folder, [-1], IN_DIM, lora=LoRAConfig(targets=["q_proj", "self_attn.o_proj"]))
    assert adapted(block) == {"self_attn.q_proj", "self_attn.o_proj"}
    with pytest.raises(ValueError, match=r"'query' names no linear map.*self_attn.q_proj"):
        FrozenLMBlock.from_pretrained(folder, [-1], IN_DIM, lora=LoRAConfig(targets=["query"]))
    with pytest.raises(ValueError, match="either `targets` or `mlp: true`"):
        LoRAConfig(targets=["q_proj"], mlp=True)
    with pytest.raises(ValueError, match="r must be >= 1"):
        LoRAConfig(r=0)
    with pytest.raises(ValueError, match="cannot be combined with llm.trainable"):
        LLMConfig(checkpoint=folder, trainable=True, lora={"r": 4})
    assert LLMConfig(checkpoint=folder, lora={"r": 4, "alpha": 8}).lora == LoRAConfig(r=4, alpha=8)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "bert"])
def test_bfloat16_base_with_float32_adapters(lm_checkpoint, family):
    block = FrozenLMBlock.from_pretrained(
        str(lm_checkpoint(family)), [-1], IN_DIM, dtype="bfloat16", lora=LoRAConfig(r=4, mlp=True)
    )
    lora = {name: p for name, p in block.layers.named_parameters() if "lora_" in name}
    base = [p for name, p in block.layers.named_parameters() if "lora_" not in name]
    assert lora and {p.dtype for p in lora.values()} == {torch.float32}
    assert {p.dtype for p in base} == {torch.bfloat16} and block.lm_dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(tokens())
    assert torch.isfinite(out).all()
    out.float().square().sum().backward()
    grads = [p.grad for name, p in lora.items() if ".lora_A." in name or ".lora_B." in name]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in base)


def test_lora_dropout_follows_train_mode_while_the_layers_stay_in_eval(lm_checkpoint):
    block = FrozenLMBlock.from_pretrained(str(lm_checkpoint("bert")), [-1], IN_DIM, lora=LoRAConfig(dropout=0.5))
    block.train()
    dropouts = [m for name, m in block.layers.named_modules() if name.endswith("lora_dropout")]
    assert dropouts and all(m.training for m in dropouts)
    # BERT's own dropout (0.1) stays off.
    assert not block.layers[0].attention.self.training and not block.layers[0].output.dropout.training
    block.eval()
    assert not any(m.training for m in dropouts)


def test_checkpoint_holds_adapters_not_frozen_weights(tmp_path, tiny_llama_checkpoint):
    model = TinyTask(llm=llm(tiny_llama_checkpoint, lora={"r": 4, "alpha": 8}))
    trainer, path = fit(model, tmp_path)
    in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    lora = [p for name, p in model.llm_block.layers.named_parameters() if "lora_" in name]
    frozen = [p for name, p in model.llm_block.layers.named_parameters() if "lora_" not in name]
    assert {id(p) for p in lora} <= in_optimizer and not {id(p) for p in frozen} & in_optimizer
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    layer_keys = {k.removeprefix("llm_block.layers.") for k in checkpoint["state_dict"] if k.startswith("llm_block.layers.")}
    assert layer_keys == {
        "0.self_attn.q_proj.lora_A.default.weight", "0.self_attn.q_proj.lora_B.default.weight",
        "0.self_attn.v_proj.lora_A.default.weight", "0.self_attn.v_proj.lora_B.default.weight",
    }  # fmt: skip
    meta = checkpoint[CHECKPOINT_KEY]["llm_block"]
    assert meta["fingerprint"] == model.llm_block.fingerprint and meta["embedded"] is False
    assert meta["lora"] == {"r": 4, "alpha": 8, "dropout": 0.0, "targets": None, "mlp": False}

    restored = TinyTask.load_from_checkpoint(path)
    assert restored.llm_block.lora == LoRAConfig(r=4, alpha=8)
    torch.testing.assert_close(outputs(restored), outputs(model), atol=0, rtol=0)
    # Another rank is refused with the reason, not a key mismatch.
    with pytest.raises(ValueError, match=r"trained with llm.lora \{'r': 4.*configured block has llm.lora \{'r': 8"):
        TinyTask.load_from_checkpoint(path, llm=llm(tiny_llama_checkpoint, lora={"r": 8}))
    with pytest.raises(ValueError, match="configured block has llm.lora None"):
        TinyTask.load_from_checkpoint(path, llm=llm(tiny_llama_checkpoint))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_embedded_weights_with_lora_restore_without_the_source(tmp_path, tiny_llama_checkpoint, dtype):
    source = shutil.copytree(tiny_llama_checkpoint, tmp_path / "source")
    model = TinyTask(llm=llm(source, embed_weights=True, dtype=dtype, lora={"r": 2, "mlp": True}))
    _, path = fit(model, tmp_path)
    shutil.rmtree(source)
    restored = TinyTask.load_from_checkpoint(path)
    assert restored.llm_block.lm_dtype == getattr(torch, dtype)
    assert adapted(restored.llm_block) == ATTENTION["llama"] | MLP["llama"]
    torch.testing.assert_close(outputs(restored), outputs(model), atol=0, rtol=0)


def test_block_level_combinations_are_refused(tiny_llama_checkpoint):
    folder = str(tiny_llama_checkpoint)
    for kwargs in ({"trainable": True}, {"replace_with_mlp": True}):
        with pytest.raises(ValueError, match="not with trainable layers or the MLP ablation"):
            FrozenLMBlock.from_pretrained(folder, [-1], IN_DIM, lora=LoRAConfig(), **kwargs)
