"""The image datamodules on tiny fake datasets written in the real on-disk formats (and the real digits)."""

from __future__ import annotations

import importlib.util
import itertools
import pickle
import re
import shutil
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
import torch
import torchvision
from sklearn.datasets import load_digits
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from torchvision import transforms

import frozenlm.data.base as base
from frozenlm.data import (
    Caltech256DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    ImageDataModule,
    ImageFolderDataModule,
)
from frozenlm.data.base import DatasetError, DatasetNotFoundError, TooManyUnreadableSamplesError, Unreadable
from tests.cli_helpers import run_cli


def fake_data_writer(dataset: str):
    """The `write(root)` function of tests/data/<dataset>/data.py."""
    path = Path(__file__).parent / "data" / dataset / "data.py"
    spec = importlib.util.spec_from_file_location(f"fake_{dataset}_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write


write_cifar100 = fake_data_writer("cifar100")
write_imagefolder = fake_data_writer("imagefolder")
write_caltech256 = fake_data_writer("caltech256")


def check_batch(batch: dict, batch_size: int, img_size: int, num_classes: int) -> None:
    assert set(batch) == {"image", "label", "id", "unreadable"} and batch["unreadable"] == []
    assert batch["image"].shape == (batch_size, 3, img_size, img_size)
    assert batch["image"].dtype == torch.float32
    assert batch["label"].shape == (batch_size,) and batch["label"].dtype == torch.int64
    assert ((batch["label"] >= 0) & (batch["label"] < num_classes)).all()
    assert len(batch["id"]) == batch_size and all(isinstance(i, str) for i in batch["id"])


def check_all_loaders(dm: ImageDataModule, img_size: int) -> None:
    dm.setup("fit")
    check_batch(next(iter(dm.train_dataloader())), dm.batch_size, img_size, dm.num_classes)
    for loader in (dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
        check_batch(next(iter(loader)), min(dm.batch_size, len(dm.val_set)), img_size, dm.num_classes)


def all_ids(loader) -> list[str]:
    return [i for batch in loader for i in batch["id"]]


def unnormalize(image: torch.Tensor) -> np.ndarray:
    """An eval-transformed image back to HxWx3 uint8."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    return (image * std + mean).mul(255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


# --- defaults shared by every datamodule --------------------------------------------------------------


@pytest.mark.parametrize(("cores", "workers"), [(1, 0), (2, 1), (5, 4), (64, 8)])
def test_default_num_workers_leaves_a_core_and_caps_at_8(monkeypatch, cores, workers):
    monkeypatch.setattr(base.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert DigitsDataModule().num_workers == workers


def test_default_pin_memory_follows_cuda_and_persistent_workers_follow_num_workers():
    assert DigitsDataModule().pin_memory == torch.cuda.is_available()
    dm = DigitsDataModule(num_workers=1, pin_memory=False)
    loader = dm.val_dataloader()
    assert loader.num_workers == 1 and loader.persistent_workers and not loader.pin_memory
    assert not DigitsDataModule(num_workers=0).val_dataloader().persistent_workers


def test_only_labelled_sample_datamodules_derive_from_the_classification_base():
    import frozenlm.data as data
    from frozenlm.data.vision_language import VisionLanguageDataModule

    classifiers = [data.ImageDataModule, data.SSv2DataModule, data.PointCloudDataModule]
    others = [data.MotionDataModule, VisionLanguageDataModule]  # forecasts and image-text pairs: no classes
    assert all(issubclass(cls, base.BaseDataModule) for cls in classifiers + others)
    assert all(issubclass(cls, base.ClassificationDataModule) for cls in classifiers)
    assert not any(issubclass(cls, base.ClassificationDataModule) for cls in others)


def test_train_loader_refuses_a_batch_size_larger_than_the_train_split(tmp_path):
    dm = CIFAR100DataModule(write_cifar100(tmp_path), batch_size=64, num_workers=0)
    with pytest.raises(DatasetError, match="fewer than one batch"):
        dm.train_dataloader()


# --- digits -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=16, num_workers=0)
    dm.setup("fit")
    return dm


def test_digits_batches_and_split(digits):
    assert DigitsDataModule.num_classes == 10
    check_all_loaders(digits, img_size=32)
    train_ids, val_ids = set(digits.train_set.split.ids), set(digits.val_set.split.ids)
    assert (len(train_ids), len(val_ids)) == (1437, 360)
    assert train_ids.isdisjoint(val_ids) and len(train_ids | val_ids) == 1797
    class_sizes = Counter(load_digits().target.tolist())
    val_sizes = Counter(digits.val_set.split.labels)
    assert all(abs(val_sizes[d] - 0.2 * class_sizes[d]) <= 1 for d in range(10))


def test_digits_labels_and_images_are_the_real_digits(digits):
    real = load_digits()
    for index in range(0, len(digits.val_set), 37):
        sample = digits.val_set[index]
        row = int(sample["id"].removeprefix("digits/"))
        assert sample["label"] == real.target[row]
        # Eval images are the upsampled digit: ink (high values in load_digits) is bright, in all channels.
        pixels = unnormalize(sample["image"]).astype(float)
        ink = np.kron(real.images[row] > 8, np.ones((4, 4), bool))
        assert pixels[ink].mean() > pixels[~ink].mean() + 100
        assert np.abs(pixels[..., 0] - pixels[..., 2]).max() <= 2


def test_digits_split_is_seeded():
    assert DigitsDataModule(seed=0).load_split("val").ids == DigitsDataModule(seed=0).load_split("val").ids
    assert DigitsDataModule(seed=0).load_split("val").ids != DigitsDataModule(seed=1).load_split("val").ids


def test_digits_augmentation_never_mirrors_and_is_light(digits):
    kinds = {type(t) for t in digits.train_transform.transforms}
    assert not kinds & {transforms.RandomHorizontalFlip, RandAugment, RandomErasing, transforms.ColorJitter}


def test_predict_loader_is_unshuffled_and_deterministic(digits):
    first, second = list(digits.predict_dataloader()), list(digits.predict_dataloader())
    assert [i for b in first for i in b["id"]] == list(digits.val_set.split.ids)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, second))


# --- CIFAR-100 ----------------------------------------------------------------------------------------


def test_cifar100_batches_split_sizes_and_ids(tmp_path):
    dm = CIFAR100DataModule(write_cifar100(tmp_path, num_train=12, num_test=6), batch_size=4, num_workers=0)
    assert dm.num_classes == 100
    check_all_loaders(dm, img_size=32)
    assert (len(dm.train_set), len(dm.val_set)) == (12, 6)
    assert all_ids(dm.predict_dataloader()) == [f"test/{row}" for row in range(6)]


def test_cifar100_decodes_channel_major_rows_and_keeps_32px_uncropped(tmp_path):
    dm = CIFAR100DataModule(write_cifar100(tmp_path), num_workers=0)
    with open(tmp_path / "cifar-100-python" / "test", "rb") as file:
        written = pickle.load(file)
    dm.setup("validate")
    for row in (0, 5):
        expected = written["data"][row].reshape(3, 32, 32).transpose(1, 2, 0)
        assert np.abs(unnormalize(dm.val_set[row]["image"]).astype(int) - expected).max() <= 1
        assert dm.val_set[row]["label"] == written["fine_labels"][row]


def test_cifar100_uses_the_deit_recipe_by_default(tmp_path):
    dm = CIFAR100DataModule(write_cifar100(tmp_path), num_workers=0)
    kinds = {type(t) for t in dm.train_transform.transforms}
    assert {transforms.RandomHorizontalFlip, RandAugment, RandomErasing} <= kinds


def test_cifar100_missing_or_incomplete_fails_at_init_naming_path_and_fix(tmp_path):
    folder = re.escape(str(tmp_path / "cifar-100-python"))
    with pytest.raises(DatasetNotFoundError, match=f"train and test file in {folder}.*--data.download true"):
        CIFAR100DataModule(tmp_path)
    write_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "test").unlink()
    with pytest.raises(DatasetNotFoundError, match=f"no CIFAR-100 test file in {folder}"):
        CIFAR100DataModule(tmp_path)


def test_cifar100_download_goes_through_torchvision_in_prepare_data(tmp_path, monkeypatch):
    calls = []

    def fake_torchvision_cifar100(root, download):
        calls.append((root, download))
        write_cifar100(Path(root))

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", fake_torchvision_cifar100)
    dm = CIFAR100DataModule(tmp_path, download=True, num_workers=0)  # nothing on disk yet: no error
    dm.prepare_data()
    assert calls == [(str(tmp_path), True)]
    dm.setup("validate")
    assert len(dm.val_set) == 6


# --- ImageFolder --------------------------------------------------------------------------------------


def test_imagefolder_counts_classes_at_init_and_yields_batches(tmp_path):
    dm = ImageFolderDataModule(write_imagefolder(tmp_path), batch_size=4, img_size=32, num_workers=0)
    assert dm.classes == ["n01440764", "n01443537", "n01484850"] and dm.num_classes == 3
    check_all_loaders(dm, img_size=32)
    # 4 per class, plus a grayscale and a CMYK image in the first class.
    assert (len(dm.train_set), len(dm.val_set)) == (14, 6)
    assert all_ids(dm.predict_dataloader())[0] == "val/n01440764/n01440764_val_0.JPEG"


def test_imagefolder_converts_grayscale_and_cmyk_to_rgb(tmp_path):
    dm = ImageFolderDataModule(write_imagefolder(tmp_path), img_size=32, num_workers=0)
    dm.setup("fit")
    ids = list(dm.train_set.split.ids)
    for name in ("grayscale.JPEG", "cmyk.JPEG"):
        index = ids.index(f"train/n01440764/{name}")
        assert dm.train_set[index]["image"].shape == (3, 32, 32)
        assert dm.train_set[index]["label"] == 0


def damage_imagefolder(root: Path) -> list[Path]:
    """Add a non-image file named .png and a truncated JPEG to train/, and a truncated JPEG to val/."""
    not_an_image = root / "train" / "n01443537" / "notes.png"
    not_an_image.write_text("not an image\n" * 20)
    damaged = [not_an_image]
    for split in ("train", "val"):
        whole = root / split / "n01484850" / f"truncated_{split}.JPEG"
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(whole)
        whole.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
        damaged.append(whole)
    return damaged


def test_unreadable_images_are_dropped_with_their_path(tmp_path):
    not_an_image, truncated, _ = damage_imagefolder(write_imagefolder(tmp_path))
    dm = ImageFolderDataModule(tmp_path, batch_size=4, img_size=32, num_workers=0)
    dm.setup("fit")
    paths = list(dm.train_set.split.images)
    for path, reason in ((not_an_image, "UnidentifiedImageError"), (truncated, "image file is truncated")):
        sample = dm.train_set[paths.index(str(path))]
        assert isinstance(sample, Unreadable) and sample.path == str(path) and reason in sample.reason


def test_a_run_skips_and_counts_unreadable_images_and_names_each_once(tmp_path):
    root = tmp_path / "data"
    damaged = damage_imagefolder(write_imagefolder(root))  # 2 of 16 train images, 1 of 7 val images
    args = [
        "--data", "frozenlm.data.ImageFolderDataModule", "--data.root", str(root), "--data.batch_size", "4",
        "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "null", "--trainer.limit_val_batches", "null",
    ]  # fmt: skip
    with pytest.warns(UserWarning, match="Skipping unreadable sample") as record:
        cli = run_cli("fit", "image_baseline", tmp_path / "runs", *args, "--data.max_unreadable_fraction", "0.2")
    assert cli.trainer.current_epoch == 2  # both epochs ran
    messages = [str(w.message) for w in record if "Skipping unreadable sample" in str(w.message)]
    assert [sum(str(path) in m for m in messages) for path in damaged] == [1, 1, 1]  # once each over 2 epochs
    metrics = cli.trainer.callback_metrics
    assert metrics["data/unreadable/train"] == 2 and metrics["data/unreadable/val"] == 1

    with pytest.raises(TooManyUnreadableSamplesError, match=r"--data.max_unreadable_fraction 0.01.*(notes.png|truncated)"):
        run_cli("fit", "image_baseline", tmp_path / "runs", *args)


def test_imagefolder_missing_fails_at_init_naming_path(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=f"no class folders in {re.escape(str(tmp_path / 'train'))}"):
        ImageFolderDataModule(tmp_path)


def test_imagefolder_val_classes_must_match_train(tmp_path):
    write_imagefolder(tmp_path)
    shutil.rmtree(tmp_path / "val" / "n01484850")
    with pytest.raises(ValueError, match=r"only in train: \['n01484850'\]"):
        ImageFolderDataModule(tmp_path)


# --- Caltech-256 --------------------------------------------------------------------------------------


@pytest.fixture
def caltech_root(tmp_path) -> Path:
    return write_caltech256(tmp_path, per_category=10)


def test_caltech256_batches_and_num_classes(caltech_root):
    dm = Caltech256DataModule(caltech_root, batch_size=4, img_size=32, num_workers=0)
    assert dm.num_classes == 257
    assert Caltech256DataModule(caltech_root, include_clutter=False).num_classes == 256
    check_all_loaders(dm, img_size=32)
    # Every image, the grayscale one included, comes out with 3 channels.
    assert all(dm.val_set[i]["image"].shape == (3, 32, 32) for i in range(len(dm.val_set)))
    assert all(dm.train_set[i]["image"].shape == (3, 32, 32) for i in range(len(dm.train_set)))


def test_caltech256_split_is_stratified_7_to_3_disjoint_and_seeded(caltech_root):
    dm = Caltech256DataModule(caltech_root, num_workers=0)
    train, val = dm.load_split("train"), dm.load_split("val")
    assert Counter(train.labels) == {0: 7, 1: 7, 2: 7, 256: 7}  # "NNN.name" -> NNN - 1; RENAME2 ignored
    assert Counter(val.labels) == {0: 3, 1: 3, 2: 3, 256: 3}
    assert set(train.ids).isdisjoint(val.ids) and len(set(train.ids) | set(val.ids)) == 40
    assert val.ids[0].startswith("caltech256/256_ObjectCategories/001.ak47/001_")
    assert Caltech256DataModule(caltech_root, seed=0).load_split("val").ids == val.ids
    assert Caltech256DataModule(caltech_root, seed=1).load_split("val").ids != val.ids


def test_caltech256_without_clutter(caltech_root):
    dm = Caltech256DataModule(caltech_root, include_clutter=False, num_workers=0)
    train, val = dm.load_split("train"), dm.load_split("val")
    assert set(train.labels) == set(val.labels) == {0, 1, 2}
    assert (len(train.labels), len(val.labels)) == (21, 9)


def test_caltech256_missing_fails_at_init_naming_path_and_fix(tmp_path):
    folder = re.escape(str(tmp_path / "caltech256" / "256_ObjectCategories"))
    with pytest.raises(DatasetNotFoundError, match=f"in {folder}.*--data.download true"):
        Caltech256DataModule(tmp_path)


def test_caltech256_download_goes_through_torchvision_in_prepare_data(tmp_path, monkeypatch):
    calls = []

    def fake_torchvision_caltech256(root, download):
        calls.append((root, download))
        write_caltech256(Path(root))

    monkeypatch.setattr(torchvision.datasets, "Caltech256", fake_torchvision_caltech256)
    dm = Caltech256DataModule(tmp_path, download=True, num_workers=0)  # nothing on disk yet: no error
    dm.prepare_data()
    assert calls == [(str(tmp_path), True)]
    assert len(dm.load_split("val").ids) == 12


def test_repeated_augmentation_repeats_each_sampled_image_and_follows_the_epoch():
    dm = DigitsDataModule(batch_size=6, num_workers=0, repeated_augmentation=3, img_size=16)
    loader = dm.train_dataloader()
    ids = [i for batch in itertools.islice(loader, 2) for i in batch["id"]]
    assert ids[0] == ids[1] == ids[2] and ids[3] == ids[4] == ids[5] and ids[0] != ids[3]
    first = list(loader.sampler)
    loader.sampler.set_epoch(1)
    assert list(loader.sampler) != first


def test_repeated_augmentation_under_ddp_needs_lightnings_sampler_off():
    dm = DigitsDataModule(batch_size=6, num_workers=0, repeated_augmentation=3, img_size=16)
    connector = types.SimpleNamespace(use_distributed_sampler=True)
    dm.trainer = types.SimpleNamespace(world_size=2, global_rank=1, _accelerator_connector=connector)
    with pytest.raises(ValueError, match="use_distributed_sampler false"):
        dm.train_dataloader()
    connector.use_distributed_sampler = False
    sampler = dm.train_dataloader().sampler
    assert (sampler.num_replicas, sampler.rank) == (2, 1)
