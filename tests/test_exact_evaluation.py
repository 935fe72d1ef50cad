"""Every evaluation sample is scored exactly once on any number of processes: the same metrics on 1, 2
and 3 processes (gloo DDP on CPU) for splits whose size divides by neither, and predictions with no
repeated sample. Each multi-process run costs a fresh Python per process: images and motion run their
3-process case in `make test-slow`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import pytest
import torch

from frozenlm.data.distributed import EvaluationSampler, MarkedPadding
from tests.cli_helpers import last_checkpoint, run_cli, run_cli_subprocess
from frozenlm.data import ImageFolderDataModule
from frozenlm.data.base import Unreadable, collate_readable
from tests.data.argoverse2.data import write as write_argoverse2
from tests.data.imagefolder.data import write as write_imagefolder
from tests.data.scanobjectnn.data import write as write_scanobjectnn
from tests.data.ssv2.data import write as write_ssv2

DDP = ["--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]


@pytest.mark.parametrize("size", [1, 13, 15, 16])
@pytest.mark.parametrize("processes", [1, 2, 3, 4])
def test_the_sampler_deals_every_sample_once_and_marks_the_padding(size, processes):
    shares = [list(EvaluationSampler(range(size), processes, rank)) for rank in range(processes)]
    assert len({len(share) for share in shares}) == 1  # equal shares: every process runs the same steps
    real = sorted(i for share in shares for i in share if i >= 0)
    assert real == list(range(size))  # each sample exactly once
    padding = [i for share in shares for i in share if i < 0]
    assert len(padding) == -size % processes and all(0 <= -i - 1 < size for i in padding)
    samples = MarkedPadding([{"x": i} for i in range(size)])
    assert samples[-1] == {"x": 0, "padding": True, "dataset_index": 0}
    assert samples[size - 1] == {"x": size - 1, "padding": False, "dataset_index": size - 1}


def test_a_padding_repeat_of_an_unreadable_sample_is_dropped_without_being_counted_again():
    samples = MarkedPadding([Unreadable("a.png", "OSError: broken"), {"x": 1}])
    batch = collate_readable([samples[0], samples[1], samples[-1]])  # -1: the padding repeat of sample 0
    assert batch["unreadable"] == ["a.png (OSError: broken)"]  # once, by the process it was dealt to
    assert batch["dataset_index"].tolist() == [1] and batch["padding"].tolist() == [False]


def metrics_on(root: Path, subcommand: str, config: str, processes: int, *args: str) -> dict[str, float]:
    """``frozenlm <subcommand>`` on ``processes`` processes (one: in this process, without DDP); the synced
    metrics rank 0 saw."""
    path = root / f"metrics-{processes}.json"
    args = (*args, "--trainer.limit_test_batches", "1.0", "--trainer.callbacks+=tests.cli_helpers.DumpMetrics",
            "--trainer.callbacks.path", str(path))  # fmt: skip
    if processes == 1:
        run_cli(subcommand, config, root / "p1", *args)
    else:
        result = run_cli_subprocess(subcommand, config, root / f"p{processes}", *args, *DDP, "--trainer.devices", str(processes))
        assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(path.read_text())


def assert_same(metrics: list[dict[str, float]], exact: tuple[str, ...]) -> None:
    for name in exact:  # counts: identical
        assert len({m[name] for m in metrics}) == 1, (name, [m[name] for m in metrics])
    for name in metrics[0]:  # means of floats: equal up to the order of the sums
        assert all(m[name] == pytest.approx(metrics[0][name], rel=1e-5, abs=1e-6) for m in metrics), name


def test_point_clouds_with_voting_score_each_cloud_once_on_1_2_and_3_processes(tmp_path):
    root = write_scanobjectnn(tmp_path / "scanobjectnn")
    test_file = root / "main_split" / "test_objectdataset.h5"
    with h5py.File(test_file, "r") as file:
        data, labels = file["data"][:13], file["label"][:13]  # 13 clouds: divisible by neither 2 nor 3
    with h5py.File(test_file, "w") as file:
        file.create_dataset("data", data=data)
        file.create_dataset("label", data=labels)
    common = ["--model.llm", "null", "--data.root", str(root), "--data.batch_size", "4"]
    run_cli("fit", "pointcloud_llama", tmp_path / "fit", *common, "--trainer.max_epochs", "1")
    ckpt = ["--ckpt_path", str(last_checkpoint(tmp_path / "fit"))]
    metrics = [metrics_on(tmp_path, "test", "pointcloud_llama", n, *common, *ckpt) for n in (1, 2, 3)]
    assert_same(metrics, ("test_acc1", "test_vote_acc1", "test_acc5"))
    assert round(metrics[0]["test_acc1"] * 13) == pytest.approx(metrics[0]["test_acc1"] * 13, abs=1e-4)  # k / 13


# The 3-process runs of images and motion are `make test-slow`'s (point clouds run 1, 2 and 3 in `make test`).
SECOND = [2, pytest.param(3, marks=pytest.mark.slow)]


@pytest.mark.parametrize("processes", SECOND)
def test_images_score_each_sample_once_and_predict_writes_each_once(tmp_path, processes):
    odd = ["--data.val_fraction", "0.1007"]  # 181 validation digits, a prime
    run_cli("fit", "image_baseline", tmp_path / "fit", *odd)
    ckpt = ["--ckpt_path", str(last_checkpoint(tmp_path / "fit"))]
    metrics = [metrics_on(tmp_path, "test", "image_baseline", n, *odd, *ckpt) for n in (1, processes)]
    assert_same(metrics, ("test_acc1", "test_acc5"))
    if processes > 2:
        return

    # predict on 2 processes: one file, the samples in the order and with the predictions of 1 process
    args = [*odd, *ckpt, "--trainer.limit_predict_batches", "1.0", "--predictions.output"]
    run_cli("predict", "image_baseline", tmp_path / "predict1", *args, str(tmp_path / "one.csv"))
    result = run_cli_subprocess("predict", "image_baseline", tmp_path / "predict2", *args, str(tmp_path / "two.csv"), *DDP,
                                "--trainer.devices", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(tmp_path.glob("two.rank*"))  # the processes' own files are joined, then removed
    one, two = (list(csv.DictReader((tmp_path / name).open())) for name in ("one.csv", "two.csv"))
    assert [row["id"] for row in two] == [row["id"] for row in one] and len({row["id"] for row in one}) == 181
    assert [row["classes"] for row in two] == [row["classes"] for row in one]
    for a, b in zip(one, two):
        assert json.loads(a["probs"]) == pytest.approx(json.loads(b["probs"]), abs=2e-6)


def test_predictions_of_shares_with_dropped_samples_are_joined_in_dataset_order(tmp_path):
    """9 samples dealt round-robin to 2 processes in batches of 2, process 1 padded with a repeat of sample 0
    (never written), samples 3 and 4 unreadable (dropped from their batches): the joined file has the 7
    others in dataset order, as 1 process writes them (joining the shares round-robin would not)."""
    from frozenlm.predictions import ClassPredictionsCSV

    shares = {0: [[0, 2], [4, 6], [8]], 1: [[1, 3], [5, 7], [-1]]}
    parts = [tmp_path / f"p.rank{rank}.csv" for rank in (0, 1)]
    for rank, batches in shares.items():
        file = ClassPredictionsCSV(parts[rank])
        for indices in batches:
            kept = [i for i in indices if i not in (3, 4)]  # the loader drops the unreadable samples
            batch = {"dataset_index": torch.tensor([-i - 1 if i < 0 else i for i in kept]), "padding": torch.tensor([i < 0 for i in kept])}
            real = [i for i in kept if i >= 0]  # what predict_step writes (BaseTask.scored)
            file.write_batch({"id": [f"s{i}" for i in real], "classes": [[i] for i in real], "probs": [[1.0]] * len(real)}, batch)
        file.close()
    assert ClassPredictionsCSV.join(parts, tmp_path / "p.csv") == 7 and not list(tmp_path.glob("p.rank*"))
    assert [row["id"] for row in csv.DictReader((tmp_path / "p.csv").open())] == [f"s{i}" for i in (0, 1, 2, 5, 6, 7, 8)]


@pytest.mark.slow
def test_unreadable_images_on_both_processes_are_counted_once_each_and_predictions_stay_in_dataset_order(tmp_path):
    """15 validation images, 3 unreadable: 2 dealt to process 0 (samples 0 and 4), 1 to process 1 (sample 3).
    The count logged is the sum over the processes, and the predictions of 2 processes, whose shares are no
    longer every other sample once the unreadable ones are dropped, are the file of 1 process."""
    root = write_imagefolder(tmp_path / "data", val_per_class=5)
    images = ImageFolderDataModule(root, num_workers=0).load_split("val").images
    for position in (0, 3, 4):
        Path(images[position]).write_text("not an image\n")
    common = ["--data", "frozenlm.data.ImageFolderDataModule", "--data.root", str(root), "--data.batch_size", "4",
              "--data.max_unreadable_fraction", "0.5", "--data.num_workers", "0", "--data.img_size", "16"]  # fmt: skip
    metrics = [metrics_on(tmp_path, "test", "image_baseline", n, *common) for n in (1, 2)]
    assert [m["data/unreadable/test"] for m in metrics] == [3, 3]  # rank 0's alone: 2
    assert_same(metrics, ("test_acc1",))

    args = [*common, "--trainer.limit_predict_batches", "1.0", "--predictions.output"]
    with pytest.warns(UserWarning, match="Skipping unreadable sample"):
        run_cli("predict", "image_baseline", tmp_path / "predict1", *args, str(tmp_path / "one.csv"))
    result = run_cli_subprocess("predict", "image_baseline", tmp_path / "predict2", *args, str(tmp_path / "two.csv"), *DDP,
                                "--trainer.devices", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(tmp_path.glob("two.rank*"))  # the processes' files (and their sample positions) removed
    one, two = (list(csv.DictReader((tmp_path / name).open())) for name in ("one.csv", "two.csv"))
    readable = [Path(image).relative_to(root).as_posix() for i, image in enumerate(images) if i not in (0, 3, 4)]
    assert [row["id"] for row in one] == readable  # 12 in dataset order
    assert [row["id"] for row in two] == readable and [row["classes"] for row in two] == [row["classes"] for row in one]
    for a, b in zip(one, two):
        assert json.loads(a["probs"]) == pytest.approx(json.loads(b["probs"]), abs=2e-6)


@pytest.mark.parametrize("processes", SECOND)
def test_motion_metrics_score_each_scene_once_on_2_and_3_processes(tmp_path, processes):
    root = write_argoverse2(tmp_path / "av2", {"train": 8, "val": 5, "test": 2})  # 5 val scenes
    common = ["--model.llm", "null", "--data.root", str(root), "--data.batch_size", "2"]
    run_cli("fit", "motion_llama", tmp_path / "fit", *common, "--trainer.max_epochs", "1")
    ckpt = ["--ckpt_path", str(last_checkpoint(tmp_path / "fit"))]
    metrics = [metrics_on(tmp_path, "test", "motion_llama", n, *common, *ckpt) for n in (1, processes)]
    assert_same(metrics, ("test_MR_6", "test_MR_1"))
    assert torch.isfinite(torch.tensor(metrics[0]["test_minFDE_6"]))


@pytest.mark.slow
def test_the_argoverse2_submission_of_2_processes_is_the_one_of_1(tmp_path):
    """One parquet, the scenes (in order) and forecasts of 1 process."""
    from av2.datasets.motion_forecasting.eval.submission import ChallengeSubmission

    root = write_argoverse2(tmp_path / "av2", {"train": 8, "val": 5, "test": 2})
    common = ["--model.llm", "null", "--data.root", str(root), "--data.batch_size", "2"]
    run_cli("fit", "motion_llama", tmp_path / "fit", *common, "--trainer.max_epochs", "1")
    ckpt = ["--ckpt_path", str(last_checkpoint(tmp_path / "fit"))]
    args = [*common, *ckpt, "--data.predict_split", "val", "--predictions.output"]
    run_cli("predict", "motion_llama", tmp_path / "predict1", *args, str(tmp_path / "one.parquet"))
    result = run_cli_subprocess("predict", "motion_llama", tmp_path / "predict2", *args, str(tmp_path / "two.parquet"),
                                *DDP, "--trainer.devices", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (ChallengeSubmission.from_parquet(tmp_path / name).predictions for name in ("one.parquet", "two.parquet"))
    assert list(two) == list(one) and len(one) == 5
    for scenario, (probs, tracks) in one.items():
        assert two[scenario][0] == pytest.approx(probs, abs=1e-5)
        for track, modes in tracks.items():
            assert two[scenario][1][track] == pytest.approx(modes, abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 3])
def test_video_views_score_each_video_once_on_2_and_3_processes(tmp_path, processes):
    """7 validation videos, each scored as the mean of 2 clips x 3 crops."""
    root = write_ssv2(tmp_path / "ssv2")
    labels = root / "labels" / "validation.json"
    labels.write_text(json.dumps(json.loads(labels.read_text())[:7]))
    common = ["--model.llm", "null", "--data.root", str(root), "--data.batch_size", "2", "--data.test_clips", "2",
              "--data.test_crops", "3"]  # fmt: skip
    run_cli("fit", "video_llama", tmp_path / "fit", *common)
    ckpt = ["--ckpt_path", str(last_checkpoint(tmp_path / "fit"))]
    metrics = [metrics_on(tmp_path, "test", "video_llama", n, *common, *ckpt) for n in (1, processes)]
    assert_same(metrics, ("test_acc1", "test_acc5"))
    assert round(metrics[0]["test_acc1"] * 7) == pytest.approx(metrics[0]["test_acc1"] * 7, abs=1e-4)  # k / 7
