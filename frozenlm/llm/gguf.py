"""A GGUF language model (llama.cpp's format) converted once into a Hugging Face folder.

transformers reads GGUF itself (`from_pretrained(folder, gguf_file=...)`, with the `gguf` package) and
dequantises every tensor to float; `convert_gguf` saves that model as `config.json` + safetensors
shards, so that the block loader ([`LMCheckpoint`][frozenlm.llm.checkpoint.LMCheckpoint]) reads one layer from it
like from any checkpoint, without dequantising the whole file each run. Quantised weights stay what they
were: a 4-bit GGUF gives 4-bit values held in float32 (the folder's `frozenlm_source.json` says so).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict

from frozenlm.errors import FrozenLMError
from frozenlm.files import sha256_file, write_atomically

SOURCE_FILE = "frozenlm_source.json"


class GGUFConversionError(FrozenLMError, RuntimeError):
    """A GGUF file that transformers cannot read (another architecture, a damaged file, no `gguf` package)."""


def load_gguf_model(gguf_path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """transformers' own reading of a GGUF file: the causal LM with dequantised weights."""
    from transformers import AutoModelForCausalLM

    gguf_path = Path(gguf_path)
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise GGUFConversionError(
            f"Reading {gguf_path} needs the `gguf` package: pip install -e '.[gguf]' (or pip install gguf)."
        ) from None
    try:
        return AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=dtype)
    except (ValueError, OSError, KeyError, EOFError) as error:
        lines = str(error).strip().splitlines() or [type(error).__name__]
        raise GGUFConversionError(f"transformers cannot read {gguf_path} as a GGUF model: {lines[-1]}") from None


def convert_gguf(gguf_path: str | Path, output: str | Path, *, max_shard_size: str = "100MB",
                 note: str | None = None) -> Path:  # fmt: skip
    """Write `output`/config.json + safetensors shards (+ their index) from `gguf_path`, as transformers
    reads it (float32), and `frozenlm_source.json` (the file's name, sha256, quantisation types, `note`).

    Written into a temporary folder beside `output` and renamed into place, so an interrupted
    conversion leaves no half folder. An existing `output` is replaced.
    """
    gguf_path, output = Path(gguf_path), Path(output)
    model = load_gguf_model(gguf_path)
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    # transformers refuses save_pretrained on a model it read from GGUF ("quantized with gguf"): its tensors are
    # plain float now, so they are written directly, with the config minus the GGUF marks.
    config = model.config
    for attribute in ("quantization_config", "gguf_file"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    config.save_pretrained(partial)
    discard = ["lm_head.weight"] if getattr(config, "tie_word_embeddings", False) else None
    save_torch_state_dict(model.state_dict(), partial, max_shard_size=max_shard_size, shared_tensors_to_discard=discard)
    record = {
        "gguf_file": gguf_path.name,
        "sha256": sha256_file(gguf_path),
        "tensor_types": _tensor_types(gguf_path),
        "dequantised_by": "transformers from_pretrained(gguf_file=...), held as float32",
        "note": note,
        "model_type": model.config.model_type,
        "num_hidden_layers": model.config.num_hidden_layers,
        "hidden_size": model.config.hidden_size,
    }
    write_atomically(partial / SOURCE_FILE, json.dumps(record, indent=1))
    if output.exists():
        shutil.rmtree(output)
    partial.rename(output)
    return output


def _tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type the file holds (e.g. {"Q4_1": 210, "F32": 61})."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for tensor in GGUFReader(str(path)).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return counts
