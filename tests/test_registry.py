"""``frozenlm.create_model`` / ``list_models`` / ``load_model``: plain models by name and from checkpoints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning
import pytest
import torch
import yaml

import frozenlm
from frozenlm.registry import ALIASES, UnknownModelError, config_dir

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
REPO_DATA = Path(__file__).resolve().parent / "data"


def _no_hooks(model: torch.nn.Module) -> None:
    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, f"{name or 'model'} has a hook"


def test_every_shipped_model_config_is_listed_and_every_alias_names_one():
    names = frozenlm.list_models()
    stems = {p.stem for p in CONFIGS.glob("*.yaml")} - {"demo", "demo_uta"}
    assert stems <= set(names)
    for alias, stem in ALIASES.items():
        assert alias in names and (CONFIGS / f"{stem}.yaml").is_file(), alias
    assert frozenlm.list_models("*vectornet_llama") == sorted(n for n in names if n.endswith("vectornet_llama"))
    assert config_dir() == CONFIGS


def test_an_unknown_name_is_one_line_naming_the_list():
    with pytest.raises(UnknownModelError, match=r"list_models\(\)") as error:
        frozenlm.create_model("deit_smal_llama")
    assert "\n" not in str(error.value)


def test_create_model_builds_the_configs_model_without_lightning(tiny_llama_checkpoint):
    model = frozenlm.create_model("deit_tiny_llama", llm={"checkpoint": str(tiny_llama_checkpoint)}, num_classes=7)
    assert not any(isinstance(m, lightning.LightningModule) for m in model.modules())
    _no_hooks(model)
    # The config's block (its last layer, LM4VE's) and the config's trunk, with the override's classes.
    config = yaml.safe_load((CONFIGS / "imagenet_deit_tiny_llama.yaml").read_text())["model"]["init_args"]
    assert model.llm_block.layer_indices[-1] >= 0 and config["llm"]["layers"] == [-1]
    images = torch.randn(2, 3, 224, 224)
    model.eval()
    tokens, branch = model.forward_features(images)
    assert branch is None and model(images).shape == (2, 7)
    assert torch.equal(model.forward_head(tokens), model(images))


def test_create_model_gcr_returns_the_branch_in_training_only(tiny_llama_checkpoint):
    model = frozenlm.create_model("deit_small_gcr", llm={"checkpoint": str(tiny_llama_checkpoint)}, num_classes=5,
                                  backbone_kwargs={"depth": 2})  # fmt: skip
    images = torch.randn(2, 3, 224, 224)
    _, branch = model.train().forward_features(images)
    assert branch is not None and model.forward_aux_head(branch).shape == (2, 5)
    assert model.eval().forward_features(images)[1] is None


def test_create_model_for_point_clouds_and_motion(tiny_llama_checkpoint):
    llm = {"checkpoint": str(tiny_llama_checkpoint)}
    for name in ("pointbert_llama", "vectornet_llama"):
        model = frozenlm.create_model(name, llm=llm)
        _no_hooks(model)
        assert model.llm_block is not None and not isinstance(model, lightning.LightningModule), name


def test_import_frozenlm_stays_light():
    code = "import sys, frozenlm; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_load_model_takes_the_trained_model_of_any_task_checkpoint(tmp_path):
    """A checkpoint a Trainer wrote (not through the CLI) names its task, so ``load_model`` gives its model; an
    old one that names none is refused in one line."""
    from frozenlm.registry import NotAFrozenLMCheckpointError
    from frozenlm.tasks import ImageClassifier

    task = ImageClassifier(backbone="vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8,
                           backbone_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})  # fmt: skip
    trainer = lightning.Trainer(logger=False, enable_checkpointing=False, max_steps=0)
    trainer.strategy.connect(task)
    path = tmp_path / "task.ckpt"
    trainer.save_checkpoint(path)
    model = frozenlm.load_model(path)
    images = torch.randn(2, 3, 32, 32)
    assert not model.training and torch.equal(model(images), task.eval()(images))
    old = REPO_DATA / "checkpoints" / "0734af2" / "image_inline.ckpt"  # written by Lightning directly, before
    with pytest.raises(NotAFrozenLMCheckpointError, match="load_from_checkpoint"):
        frozenlm.load_model(old)
