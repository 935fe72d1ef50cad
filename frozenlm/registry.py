"""Plain models by name, and from checkpoints: `create_model`, `list_models`, `load_model`.

Every shipped config under `configs/` names a model; `create_model(name)` builds that config's model (the
`model:` section, through its task's `build_model`) as a plain `nn.Module`, without Lightning, a trainer
or data. The frozen LM block is read from the config's `llm.checkpoint` (one layer, as in training);
override it, or any other model argument, by keyword:

    model = frozenlm.create_model("deit_small_llama", llm={"checkpoint": "path/to/llama"})
    tokens, branch = model.forward_features(images)   # branch: the GCR tokens (training, auxiliary mode)

`load_model(checkpoint)` gives the trained model of a frozenlm checkpoint in one call (the frozen block
resolved from its source as when resuming; a self-contained checkpoint needs no source).
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from frozenlm.errors import FrozenLMError

# The names the papers' models go by, for the shipped config each builds (any config stem is a name too).
ALIASES: dict[str, str] = {
    "deit_tiny": "imagenet_deit_tiny",
    "deit_tiny_llama": "imagenet_deit_tiny_llama",
    "deit_small": "imagenet_deit_small",
    "deit_small_llama": "imagenet_deit_small_llama",
    "deit_small_gcr": "imagenet_deit_small_gcr",
    "deit_small_convstem": "imagenet_deit_small_convstem",
    "deit_small_convstem_llama": "imagenet_deit_small_convstem_llama",
    "deit_small_cape": "imagenet_deit_small_cape",
    "deit_small_cape_llama": "imagenet_deit_small_cape_llama",
    "deit_base": "imagenet_deit_base",
    "deit_base_llama": "imagenet_deit_base_llama",
    "learngene_deit_base": "imagenet_learngene_deitb",
    "tleg_aux_small": "imagenet_tleg_auxs",
    "pointbert": "scanobjectnn_hardest_pointbert",
    "pointbert_llama": "scanobjectnn_hardest_pointbert_llama",
    "pointbert_gcr": "scanobjectnn_hardest_pointbert_gcr",
    "vectornet": "argoverse2_vectornet",
    "vectornet_llama": "argoverse2_vectornet_llama",
    "videomae_small": "ssv2_videomae_small",
    "videomae_small_llama": "ssv2_videomae_small_llama",
    "videomae_small_gcr": "ssv2_videomae_small_gcr",
    "videomae_base": "ssv2_videomae_base",
    "videomae_base_llama": "ssv2_videomae_base_llama",
    "meter": "vqav2_meter",
    "meter_llama": "vqav2_meter_llama",
    "meter_retrieval": "flickr30k_meter",
    "meter_retrieval_llama": "flickr30k_meter_llama",
    "uta_base": "imagenet21k_uta_base",
    "scanqa": "sqa3d_scanqa",
    "scanqa_llama": "sqa3d_scanqa_llama",
}
# Configs that are not models of their own (the demos run the tiny bundled data).
_NOT_MODELS = ("demo", "demo_uta")


class UnknownModelError(FrozenLMError, KeyError):
    """`create_model` was given a name no shipped config has."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class NotAFrozenLMCheckpointError(FrozenLMError, ValueError):
    """`load_model` was given a file that is not a frozenlm task checkpoint."""


def config_dir() -> Path:
    """The shipped `configs/` folder: `$FROZENLM_CONFIGS`, else the one beside the package (`make install`
    installs the repository in place)."""
    folder = Path(os.environ.get("FROZENLM_CONFIGS") or Path(__file__).resolve().parent.parent / "configs")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"The shipped configs are not at {folder}: install frozenlm from its repository (`make install`) or set "
            "FROZENLM_CONFIGS to the repository's configs/ folder."
        )
    return folder


def list_models(pattern: str = "*") -> list[str]:
    """Every model name `create_model` takes (the aliases and the shipped configs' names), sorted; `pattern`
    filters them as shell wildcards (`"*pointbert*"`).

    Examples:
        >>> import frozenlm
        >>> frozenlm.list_models("cifar100_deit_*")[:3]
        ['cifar100_deit_baseline', 'cifar100_deit_convstem', 'cifar100_deit_convstem_llama']
    """
    stems = {p.stem for p in config_dir().glob("*.yaml")} - set(_NOT_MODELS)
    names = {alias for alias, stem in ALIASES.items() if stem in stems} | stems
    return sorted(fnmatch.filter(names, pattern))


def model_config(name: str) -> tuple[type, dict[str, Any]]:
    """`(task class, model arguments)` of a model name: the config's `model:` section over the task's
    defaults, `num_classes` from the config's datamodule when the config does not give it."""
    stem = ALIASES.get(name, name)
    path = config_dir() / f"{stem}.yaml"
    if stem in _NOT_MODELS or not path.is_file():
        close = fnmatch.filter(list_models(), f"*{name.split('_')[0]}*")[:8]
        raise UnknownModelError(f"No model named {name!r}; frozenlm.list_models() lists them (close: {close}).")
    config = yaml.safe_load(path.read_text())
    task_cls = _resolve(config["model"]["class_path"])
    args = {k: p.default for k, p in inspect.signature(task_cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}  # fmt: skip
    args.update(config["model"].get("init_args") or {})
    if "num_classes" in args and "num_classes" not in (config["model"].get("init_args") or {}):
        args["num_classes"] = _data_classes(config.get("data") or {}, args["num_classes"])
    return task_cls, args


def create_model(name: str, **overrides: Any) -> nn.Module:
    """The plain model of a shipped config (see [`list_models`][frozenlm.registry.list_models]), built without Lightning.

    `overrides` replace the config's model arguments (a dict for `llm` is merged into the config's, so
    `llm={"checkpoint": folder}` keeps its layers and dtype; `llm=None` drops the block).

    Examples:
        >>> import frozenlm
        >>> vit = frozenlm.create_model("mnist_vit")  # the MNIST evidence's small ViT, no block
        >>> sum(p.numel() for p in vit.parameters()) > 0
        True
        >>> vit = frozenlm.create_model("deit_small", num_classes=10)  # doctest: +SKIP
        >>> with_block = frozenlm.create_model("deit_small_llama", llm={"checkpoint": "path/to/llama"})  # doctest: +SKIP
    """
    task_cls, args = model_config(name)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(args.get(key), dict):
            args[key] = {**args[key], **value}
        else:
            args[key] = value
    return task_cls.build_model(args)


def load_model(checkpoint: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """The trained model (`task.model`, in eval mode) of a frozenlm `.ckpt`, in one call.

    Examples:
        >>> import frozenlm, torch
        >>> model = frozenlm.load_model("runs/cifar100_deit/version_0/checkpoints/last.ckpt")  # doctest: +SKIP
        >>> logits = model(torch.randn(1, 3, 224, 224))  # doctest: +SKIP
    """
    from frozenlm.checkpoints import check_checkpoint
    from frozenlm.tasks.base import TASK_KEY

    check_checkpoint(checkpoint)
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    class_path = stored.get(TASK_KEY) or (stored.get("hyper_parameters") or {}).get("_class_path")
    if not class_path:
        raise NotAFrozenLMCheckpointError(
            f"{checkpoint} does not say which task wrote it (written by frozenlm before it recorded that, and not "
            "through the frozenlm CLI): load it with that task's load_from_checkpoint(...).model."
        )
    task_cls = _resolve(class_path)
    task = task_cls.load_from_checkpoint(checkpoint, map_location=map_location)
    model = getattr(task, "model", None)
    if not isinstance(model, nn.Module):
        raise NotAFrozenLMCheckpointError(f"{checkpoint} is a checkpoint of {class_path}, which holds no `model`.")
    return model.eval()


def _resolve(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    if not module.startswith("frozenlm."):
        raise NotAFrozenLMCheckpointError(f"{class_path} is not a frozenlm task.")
    return getattr(importlib.import_module(module), name)


def _data_classes(data: dict[str, Any], default: int | None) -> int | None:
    """The class count the config's datamodule reports (the CLI links it to the model): the count a datamodule
    built from the config reports, else the class's own count (`num_classes`, or `classes_for(**init_args)`),
    else the task's default (the paper's dataset: ImageNet's 1000, SSv2's 174, ModelNet40's 40...)."""
    if "class_path" not in data:
        return default
    data_cls, init_args = _resolve(data["class_path"]), data.get("init_args") or {}
    try:
        classes = getattr(data_cls(**init_args), "num_classes", None)
    except Exception:  # noqa: BLE001 - a datamodule that needs its files
        classes = getattr(data_cls, "num_classes", None)
        if hasattr(data_cls, "classes_for"):
            classes = data_cls.classes_for(**init_args)
    return classes if isinstance(classes, int) else default
