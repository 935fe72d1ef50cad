"""Robustness evaluation: ImageNet-A/-R/-Sketch/-C test sets in their published layouts, and FGSM/PGD
accuracy through `frozenlm test`."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from timm.data import ImageNetInfo

from frozenlm.cli import run
from frozenlm.data import ImageNetVariantDataModule
from frozenlm.data.base import DatasetError, DatasetNotFoundError
from tests.cli_helpers import run_cli
from tests.data.imagenet_variants.data import CLASSES, CORRUPTIONS, SEVERITIES, write

IMAGENET = list(ImageNetInfo().label_names())
FOLDERS = {"a": "imagenet-a", "r": "imagenet-r", "sketch": "sketch", "c": "imagenet-c"}


@pytest.fixture(scope="module")
def variants_root(tmp_path_factory) -> Path:
    return write(tmp_path_factory.mktemp("imagenet_variants"))


def datamodule(root: Path, variant: str, **kwargs) -> ImageNetVariantDataModule:
    return ImageNetVariantDataModule(root / FOLDERS[variant], variant, batch_size=4, img_size=32, num_workers=0, **kwargs)


@pytest.mark.parametrize("variant", ["a", "r", "sketch", "c"])
def test_labels_are_imagenet_indices_and_a_r_restrict_the_classes(variants_root, variant):
    data = datamodule(variants_root, variant)
    assert data.num_classes == 1000
    split = data.load_split("val")
    expected = {IMAGENET.index(wnid) for wnid in CLASSES[variant]}
    assert set(split.labels) == expected
    assert len(split.labels) == (3 * len(CORRUPTIONS) * len(SEVERITIES) if variant == "c" else 3 * 4)
    assert data.class_subset == (sorted(expected) if variant in ("a", "r") else None)
    batch = next(iter(data.test_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32)


def test_imagenet_c_selects_corruptions_and_severities(variants_root, tmp_path):
    data = datamodule(variants_root, "c", corruptions=["fog"], severities=[5])
    assert {Path(i).parts[:2] for i in data.load_split("val").ids} == {("fog", "5")}
    assert data.eval_transform.transforms[0].size == 32  # ImageNet-C images are centre crops already: crop_pct 1
    shutil.copytree(variants_root / "imagenet-c", tmp_path / "imagenet-c")
    shutil.rmtree(tmp_path / "imagenet-c" / "snow" / "3")
    with pytest.raises(DatasetNotFoundError, match=r"imagenet-c/snow/3.*zenodo"):
        datamodule(tmp_path, "c")
    with pytest.raises(ValueError, match="Unknown ImageNet-C corruption"):
        datamodule(variants_root, "c", corruptions=["rain"])


def test_bad_roots_and_fit_are_clear_errors(variants_root, tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"no class folders in .*nothing.*imagenet-r.tar"):
        ImageNetVariantDataModule(tmp_path / "nothing", "r")
    shutil.copytree(variants_root / "imagenet-a", tmp_path / "a")
    (tmp_path / "a" / CLASSES["a"][0]).rename(tmp_path / "a" / "cats")
    with pytest.raises(ValueError, match=r"not among the model's 1000 classes \(e.g. \['cats'\]\)"):
        ImageNetVariantDataModule(tmp_path / "a", "a")
    with pytest.raises(DatasetError, match="evaluation set"):
        datamodule(variants_root, "a").load_split("train")


def variant_args(root: Path, variant: str) -> list[str]:
    return [
        "--data", "frozenlm.data.ImageNetVariantDataModule", "--data.root", str(root / FOLDERS[variant]),
        "--data.variant", variant, "--data.img_size", "16", "--data.batch_size", "4", "--data.num_workers", "0",
        "--trainer.limit_test_batches", "null", "--trainer.limit_predict_batches", "null",
    ]  # fmt: skip


def test_predictions_on_imagenet_r_stay_in_its_200_classes(variants_root, tmp_path):
    output = tmp_path / "predictions.csv"
    run_cli("predict", "image_baseline", tmp_path, *variant_args(variants_root, "r"), "--predictions.output", str(output))
    rows = list(csv.DictReader(output.open()))
    assert len(rows) == 12
    covered = {IMAGENET.index(wnid) for wnid in CLASSES["r"]}
    for row in rows:  # top-5 of 3 covered classes: the 3, then zero-probability others
        classes, probs = json.loads(row["classes"]), json.loads(row["probs"])
        assert set(classes[:3]) == covered and sum(probs[:3]) == pytest.approx(1.0, abs=1e-5)


def test_adversarial_accuracy_is_clean_accuracy_at_eps_0_and_falls_under_a_strong_attack(variants_root, tmp_path):
    args = [*variant_args(variants_root, "a"), "--trainer.callbacks+=frozenlm.analysis.AdversarialAccuracy"]
    clean = run_cli("test", "image_baseline", tmp_path, *args, "--trainer.callbacks.eps", "0").trainer.callback_metrics
    assert clean["test_fgsm_acc1"] == clean["test_pgd_acc1"] == clean["test_acc1"]
    assert clean["test_acc1"] > 0  # 3 classes covered: a random model gets some right
    strong = [*args, "--trainer.callbacks.eps", "0.5", "--trainer.callbacks.pgd_steps", "10"]
    attacked = run_cli("test", "image_baseline", tmp_path, *strong).trainer.callback_metrics
    assert attacked["test_acc1"] == clean["test_acc1"]
    assert attacked["test_pgd_acc1"] < clean["test_acc1"] and attacked["test_fgsm_acc1"] <= clean["test_acc1"]


def test_the_readme_commands_parse_with_the_imagenet_config(capsys):
    config = str(Path(__file__).parents[1] / "configs/imagenet_deit_small_llama.yaml")
    for extra in (
        ["--data", "frozenlm.data.ImageNetVariantDataModule", "--data.variant", "r", "--data.root", "/data/imagenet-r"],
        ["--trainer.callbacks+=frozenlm.analysis.AdversarialAccuracy", "--trainer.callbacks.eps", "0.00392"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            run(["test", "--config", config, "--ckpt_path", "CKPT", *extra, "--print_config"])
        assert exit_info.value.code == 0, capsys.readouterr().err
    assert "variant: r" in capsys.readouterr().out
