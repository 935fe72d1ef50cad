"""Every shipped config's training data pipeline, run at volume on fake data in the real on-disk formats.

A crash that hits one sample in 500 (DeiT's RandAugment asking Pillow 13 to posterize to 0 bits) ends a
real run in its first epoch but passes any test that draws a few samples, so each distinct training
pipeline of `configs/*.yaml` is run here over thousands of samples: decoding, the config's own
augmentation settings and the batch collation, exactly as the datamodule the config names builds them.
"""

from __future__ import annotations

import importlib
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from frozenlm.data.augment import posterize
from frozenlm.data.vision_language import VisionLanguageDataModule
from frozenlm.data.sqa3d import SQA3DDataModule
from tests.data.argoverse1.data import write as write_argoverse1
from tests.data.argoverse2.data import write as write_argoverse2
from tests.data.caltech256.data import write as write_caltech256
from tests.data.cifar100.data import write as write_cifar100
from tests.data.flickr30k.data import write as write_flickr30k
from tests.data.imagefolder.data import write as write_imagefolder
from tests.data.mnist.data import write as write_mnist
from tests.data.modelnet40.data import write as write_modelnet40
from tests.data.scanobjectnn.data import write as write_scanobjectnn
from tests.data.sqa3d.data import write as write_sqa3d
from tests.data.ssv2.data import write as write_ssv2
from tests.data.vqav2.data import write as write_vqav2

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
FAKE_DATA = {
    "frozenlm.data.CIFAR100DataModule": write_cifar100,
    "frozenlm.data.Caltech256DataModule": write_caltech256,
    "frozenlm.data.ImageFolderDataModule": write_imagefolder,
    # The configs hold out the last 10,000 training images for validation, as the official split.
    "frozenlm.data.MNISTDataModule": lambda root: write_mnist(root, num_train=12_000, num_test=20),
    "frozenlm.data.SSv2DataModule": write_ssv2,
    "frozenlm.data.DigitsDataModule": None,  # ships with scikit-learn
    "frozenlm.data.ScanObjectNNDataModule": write_scanobjectnn,
    # 10,000 points per shape, as the real files (the configs cache 8,192).
    "frozenlm.data.ModelNet40DataModule": lambda root: write_modelnet40(root, 1, 1, points=10_000),
    "frozenlm.data.Argoverse1DataModule": write_argoverse1,
    "frozenlm.data.Argoverse2DataModule": write_argoverse2,
    "frozenlm.data.VQAv2DataModule": write_vqav2,
    "frozenlm.data.Flickr30kDataModule": write_flickr30k,
    "frozenlm.data.SQA3DDataModule": lambda root: write_sqa3d(root).prepared,
}
# Samples per distinct pipeline. DeiT's RandAugment posterized to 0 bits about once in 650 images; a
# clip draws its RandAugment ops once for all of its 16 frames (SSv2: 2 clips a video, 8,000 frames);
# a point cloud's sampling and augmentation are a few tensor ops on the batch (FPS is the cost);
# vision-language images are resized and cropped without random augmentation (576 px: the cost); an SQA3D
# question resamples its scene to 40,000 points and builds their vote targets.
IMAGE_SAMPLES, VIDEO_SAMPLES, CLOUD_SAMPLES, SCENE_SAMPLES, PAIR_SAMPLES, QUESTION_SAMPLES = 4000, 250, 128, 256, 64, 32


def data_config(path: Path) -> dict:
    return yaml.safe_load(path.read_text())["data"]


def build_datamodule(data: dict, root: Path):
    module, name = data["class_path"].rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    init_args = {**data["init_args"], "batch_size": 1, "num_workers": 0}  # the transforms do not depend on these
    write = FAKE_DATA[data["class_path"]]
    if write is not None:
        init_args["root"] = str(write(root))
    return cls(**init_args)


def distinct_pipelines() -> dict[str, list[str]]:
    """Config names grouped by (datamodule, data settings other than size and workers)."""
    groups: dict[str, list[str]] = {}
    for path in CONFIGS:
        data = data_config(path)
        settings = {k: v for k, v in data["init_args"].items() if k not in {"root", "batch_size", "num_workers"}}
        groups.setdefault(f"{data['class_path']}{sorted(settings.items())}", []).append(path.stem)
    return groups


PIPELINES = list(distinct_pipelines().values())


def test_every_shipped_config_has_fake_data_for_its_datamodule():
    assert CONFIGS, "no configs found"
    unknown = {data_config(p)["class_path"] for p in CONFIGS} - set(FAKE_DATA)
    assert not unknown, f"add a fake-data writer for {unknown} to FAKE_DATA"


@pytest.mark.parametrize("configs", PIPELINES, ids=[names[0] for names in PIPELINES])
def test_training_pipeline_survives_thousands_of_samples(configs, tmp_path):
    data = data_config(Path(CONFIGS[0].parent / f"{configs[0]}.yaml"))
    datamodule = build_datamodule(data, tmp_path)
    dataset = datamodule.train_dataloader().dataset  # the real train dataset: files + config augmentation
    kind = "video" if data["class_path"].endswith("SSv2DataModule") else "image"
    kind = "points" if hasattr(datamodule, "random_views") else kind
    kind = "map_vectors" if hasattr(datamodule, "horizon") else kind  # motion: scenes preprocessed into the cache
    kind = "point_clouds" if isinstance(datamodule, SQA3DDataModule) else kind  # SQA3D: scenes and questions
    pairs = isinstance(datamodule, VisionLanguageDataModule)
    samples, batch_size = {
        "video": (VIDEO_SAMPLES, 4), "image": (PAIR_SAMPLES if pairs else IMAGE_SAMPLES, 16 if pairs else 64),
        "points": (CLOUD_SAMPLES, 32), "map_vectors": (SCENE_SAMPLES, 32), "point_clouds": (QUESTION_SAMPLES, 16),
    }[kind]  # fmt: skip
    collate = datamodule.collate_fn
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    batch = []
    for i in range(samples):
        batch.append(dataset[i % len(dataset)])
        if len(batch) == batch_size or i == samples - 1:
            collated = collate(batch)
            assert collated["unreadable"] == [], collated["unreadable"]
            if kind == "points":  # sampled and augmented on the device, per batch
                collated["points"] = datamodule.random_views(collated["points"], 1)[:, 0]
            assert collated[kind].dtype == torch.float32 and collated[kind].isfinite().all()
            if kind == "map_vectors":
                assert collated["agent_vectors"].isfinite().all() and collated["polyline_mask"][:, 0].all()
            batch = []
    if kind == "points":
        assert collated["points"].shape[1:] == (data["init_args"]["num_points"], 3)
    elif kind == "map_vectors":
        assert collated["target"].shape[1:] == (datamodule.horizon, 2) and collated["polyline_mask"][:, 0].all()
    elif kind == "point_clouds":
        assert collated[kind].shape[1:] == (data["init_args"]["num_points"], 7)
        assert collated["vote_label"].isfinite().all() and collated["situation_target"].isfinite().all()
    else:
        size = data["init_args"].get("img_size", 224)
        assert collated[kind].shape[-2:] == (size, size)


def test_posterize_to_zero_bits_gives_black_as_pillow_before_13():
    image = Image.fromarray(np.random.default_rng(0).integers(1, 256, (8, 8, 3), dtype=np.uint8))
    assert not np.asarray(posterize(image, 0)).any()
    assert not np.asarray(posterize(image.convert("L"), 0)).any()
    assert posterize(image, 8) is image
    assert np.array_equal(np.asarray(posterize(image, 3)), np.asarray(image) & 0b11100000)


def recipe(path: Path) -> dict:
    """A config without what names its run and without the LM block."""
    config = yaml.safe_load(path.read_text())
    for key in ("default_root_dir", "logger"):
        config["trainer"].pop(key, None)
    config["model"]["init_args"].pop("llm")
    return config


BASELINE_PAIRS = [
    (path.with_name(path.name.replace("_llama", "")), path) for path in CONFIGS if path.stem.endswith("_llama")
] + [(CONFIGS[0].parent / "cifar100_deit_baseline.yaml", CONFIGS[0].parent / "cifar100_deit.yaml")]


@pytest.mark.parametrize(("baseline", "with_block"), BASELINE_PAIRS, ids=[p[0].stem for p in BASELINE_PAIRS])
def test_each_baseline_trains_with_the_recipe_of_its_llm_run(baseline, with_block):
    """Like for like, as the reference trains its baselines (20 warmup epochs for both on ImageNet)."""
    assert yaml.safe_load(baseline.read_text())["model"]["init_args"]["llm"] is None
    assert recipe(baseline) == recipe(with_block)
