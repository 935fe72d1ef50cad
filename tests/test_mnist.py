"""MNIST offline (issue 32): the restricted pickle reader, the IDX rebuild (byte-exact, md5-checked), the
datamodule on torchvision's MNIST, `frozenlm prepare`, the identity control and the sweep's test metrics."""

from __future__ import annotations

import gzip
import json
import math
import pickle

import numpy as np
import pytest
import torch
import yaml
from torchvision.datasets.mnist import read_image_file, read_label_file

from frozenlm.data.mnist import (
    ChecksumError,
    MNISTDataModule,
    UnsafePickleError,
    idx_bytes,
    load_mnist_pickle,
    pixels_to_uint8,
    raw_folder,
    rebuild_idx,
    write_idx,
)
from frozenlm.data.base import DatasetFileError, DatasetNotFoundError
from frozenlm.llm import FrozenLMBlock, LLMConfig
from frozenlm.sweep import summarize, sweep
from tests.cli_helpers import main_args
from tests.data.mnist import data as fake_mnist


class _CreatesAFile:
    """Unpickling this calls ``open(marker, "w")``: it creates the marker file if the reduce ever runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_the_restricted_reader_admits_numpy_arrays(tmp_path):
    path = tmp_path / "mnist.pkl.gz"
    arrays = fake_mnist.write_pickle(path, num_train=6, num_valid=2, num_test=3)
    (train_x, train_y), (valid_x, valid_y), (test_x, _) = load_mnist_pickle(path)
    assert train_x.dtype == np.float32 and train_x.shape == (6, 784) and valid_y.tolist() == arrays["train_labels"][6:].tolist()
    np.testing.assert_array_equal(pixels_to_uint8(test_x), arrays["test_images"])


def test_the_restricted_reader_refuses_any_other_call_without_running_it(tmp_path, capsys):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pkl.gz"
    with gzip.open(path, "wb") as file:
        pickle.dump(((np.zeros(3), _CreatesAFile(marker)),), file, protocol=4)
    with pytest.raises(UnsafePickleError, match=r"evil\.pkl\.gz asks to call (builtins|io)\.open"):
        load_mnist_pickle(path)
    assert not marker.exists()
    # Through the CLI: one line naming the file, exit status 2, nothing written.
    with pytest.raises(SystemExit) as exit_info:
        main_args(["prepare", "mnist", "--root", str(tmp_path / "out"), "--source", str(path)])
    assert exit_info.value.code == 2 and not marker.exists()
    error = capsys.readouterr().err.splitlines()[0]
    assert error.startswith("frozenlm: error: UnsafePickleError: ") and str(path) in error
    assert not raw_folder(tmp_path / "out").exists()


def test_the_idx_writer_is_byte_exact_against_torchvision_and_an_independent_writer(tmp_path):
    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8), rng.integers(0, 10, 7).astype(np.uint8)
    write_idx(tmp_path / "images", images)
    write_idx(tmp_path / "labels", labels)
    assert torch.equal(read_image_file(str(tmp_path / "images")), torch.from_numpy(images))
    assert torch.equal(read_label_file(str(tmp_path / "labels")), torch.from_numpy(labels).long())
    assert idx_bytes(images) == fake_mnist.idx(images) and idx_bytes(labels) == fake_mnist.idx(labels)


def test_the_md5_check_refuses_a_wrong_file_and_writes_nothing(tmp_path):
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    import hashlib

    right = hashlib.md5(fake_mnist.idx(images)).hexdigest()
    write_idx(tmp_path / "ok", images, md5=right)
    images[0, 0, 0] = 1
    with pytest.raises(ChecksumError, match="not the official"):
        write_idx(tmp_path / "wrong", images, md5=right)
    assert not (tmp_path / "wrong").exists()


def test_rebuild_from_the_pickle_gives_the_official_split_in_torchvision_layout(tmp_path):
    path = tmp_path / "mnist.pkl.gz"
    arrays = fake_mnist.write_pickle(path, num_train=8, num_valid=4, num_test=5)
    rebuild_idx(path, tmp_path / "root", check=False)
    folder = raw_folder(tmp_path / "root")
    # train = pickle train + valid, in order; t10k = pickle test; same bytes as the independent writer's.
    assert (folder / "train-images-idx3-ubyte").read_bytes() == fake_mnist.idx(arrays["train_images"])
    assert (folder / "train-labels-idx1-ubyte").read_bytes() == fake_mnist.idx(arrays["train_labels"])
    assert (folder / "t10k-images-idx3-ubyte").read_bytes() == fake_mnist.idx(arrays["test_images"])
    with pytest.raises(ChecksumError):  # the official md5s: a fake pickle is refused
        rebuild_idx(path, tmp_path / "checked", check=True)


def test_pixels_that_are_not_whole_multiples_of_one_256th_are_refused():
    with pytest.raises(DatasetFileError, match="not whole numbers"):
        pixels_to_uint8(np.full((1, 784), 0.3, dtype=np.float32))


def test_the_datamodule_reads_the_idx_files_with_official_test_and_last_training_images_as_val(tmp_path):
    root = fake_mnist.write(tmp_path, num_train=60, num_test=20)
    arrays = fake_mnist.fake_arrays(60, 20)
    dm = MNISTDataModule(root, num_val=20, batch_size=4, num_workers=0, img_size=28)
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.train_set) == 40 and len(dm.val_set) == 20 and len(dm.test_set) == 20
    assert dm.val_set.split.ids[0] == "train/40" and dm.test_set.split.ids[-1] == "test/19"
    assert list(dm.test_set.split.labels) == arrays["test_labels"].tolist()
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (4, 3, 28, 28) and batch["id"][0] == "test/0"
    # Normalised with MNIST's mean and std; the three channels are the same gray image.
    expected = (torch.from_numpy(arrays["test_images"][0]).float() / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(batch["image"][0, 1], expected, atol=1e-5, rtol=0)
    assert torch.equal(batch["image"][0, 0], batch["image"][0, 2])


def test_train_subset_keeps_the_first_images_of_each_class(tmp_path):
    root = fake_mnist.write(tmp_path, num_train=60, num_test=20)
    labels = fake_mnist.fake_arrays(60, 20)["train_labels"][:40]
    dm = MNISTDataModule(root, num_val=20, train_subset=20, batch_size=4, num_workers=0)
    dm.setup("fit")
    ids = [int(i.split("/")[1]) for i in dm.train_set.split.ids]
    expected = sorted(i for c in range(10) for i in np.flatnonzero(labels == c)[:2])
    assert ids == expected and np.bincount(labels[ids], minlength=10).tolist() == [2] * 10
    with pytest.raises(ValueError, match="multiple of 10"):
        MNISTDataModule(root, train_subset=15)


def test_missing_files_name_the_prepare_command(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="frozenlm prepare mnist"):
        MNISTDataModule(tmp_path)


def test_replace_with_identity_keeps_the_adapters_alone(tiny_llama_checkpoint):
    config = LLMConfig(checkpoint=str(tiny_llama_checkpoint), replace_with_identity=True)
    from frozenlm.llm import build_block

    block = build_block(config, 16)
    assert block.layers is None and sum(p.numel() for p in block.parameters() if not p.requires_grad) == 0
    tokens = torch.randn(2, 5, 16)
    torch.testing.assert_close(block(tokens), block.adapter_out(block.norm(block.adapter_in(tokens))))
    mlp = FrozenLMBlock.from_pretrained(str(tiny_llama_checkpoint), in_dim=16, replace_with_mlp=True)
    assert sum(p.numel() for p in block.parameters()) == sum(p.numel() for p in mlp.parameters())
    with pytest.raises(ValueError, match="replace_with_identity"):
        LLMConfig(checkpoint="x", replace_with_identity=True, replace_with_mlp=True)


def test_summarize_compares_test_metrics_seed_by_seed():
    def result(variant, seed, final, test):
        return {"variant": variant, "seed": seed, "metric": "val_acc1", "final": final, "best": final,
                "test": {"test_acc1": test, "test_loss": 1.0}, "trainable_params": 1, "frozen_params": 0,
                "flops_per_sample": 1, "seconds_per_step": 0.1, "coherence": {}}  # fmt: skip

    rows = {r["variant"]: r for r in summarize([
        result("base", 0, 0.5, 0.40), result("base", 1, 0.5, 0.60),
        result("a", 0, 0.5, 0.50), result("a", 1, 0.5, 0.80),
    ], "base")}  # fmt: skip
    a = rows["a"]
    # Paired test differences 0.1 and 0.2: mean 0.15, sd 0.0707107, t(0.975, 1) = 12.7062 -> 12.7062 x 0.05.
    assert a["test_mean"] == pytest.approx(0.65) and a["test_diff_mean"] == pytest.approx(0.15)
    assert a["test_diff_ci95"] == pytest.approx(0.635310, rel=1e-5) and a["test_p_holm"] == pytest.approx(a["test_p_value"])
    assert math.isnan(rows["base"]["test_p_value"])


def test_a_sweep_with_test_true_scores_each_run_on_the_test_split(tmp_path):
    root = fake_mnist.write(tmp_path / "data", num_train=60, num_test=20)
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "limit_train_batches": 2,
                    "enable_model_summary": False, "enable_progress_bar": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(tmp_path)}}},
        "model": {"class_path": "frozenlm.tasks.ImageClassifier", "init_args": {
            "backbone": "vit_tiny_patch16_224", "img_size": 28, "patch_size": 7,
            "backbone_kwargs": {"depth": 1, "embed_dim": 16, "num_heads": 2}, "drop_path_rate": 0.0, "llm": None,
            "mixup": 0.0, "cutmix": 0.0, "warmup_epochs": 0}},
        "data": {"class_path": "frozenlm.data.MNISTDataModule", "init_args": {
            "root": str(root), "num_val": 20, "batch_size": 10, "img_size": 28, "num_workers": 0}},
    }  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    preset = {"config": str(tmp_path / "c.yaml"), "seeds": [0], "metric": "val_acc1", "test": True,
              "variants": {"plain": []}}  # fmt: skip
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(preset))
    sweep(str(tmp_path / "p.yaml"), output=str(tmp_path / "sweep"))
    result = json.loads((tmp_path / "sweep" / "plain" / "seed0" / "result.json").read_text())
    accuracy = result["test"]["test_acc1"]
    assert 0 <= accuracy <= 1 and accuracy * 20 == pytest.approx(round(accuracy * 20), abs=1e-4)  # of the 20 test images
    assert result["data_split"] == {"train_subset": None, "num_val": 20}
    assert "Test split, each run's last weights" in (tmp_path / "sweep" / "results.md").read_text()
