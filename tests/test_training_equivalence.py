"""Training under DDP is the same training: for each task family, 2 gloo processes on the CPU with half
the batch each reach the weights of 1 process with the whole batch (augmentation and stochastic layers
off, so that both runs see the same inputs; for Point-BERT, whose batch norms see each process's batch,
1 process accumulating 2 half batches); with augmentation on, no two processes share a random
stream, and a killed and resumed 2-process run ends bit-identical to an uninterrupted one.

Each 2-process run is a fresh Python per process (~15 s): images run in `make test`, GCR, point clouds,
motion, video and LoRA in `make test-slow`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from frozenlm.data.distributed import TrainingSampler
from tests.cli_helpers import last_checkpoint, load_checkpoint, run_cli, run_cli_subprocess
from tests.data.argoverse2.data import write as write_argoverse2
from tests.data.scanobjectnn.data import write as write_scanobjectnn
from tests.data.ssv2.data import write as write_ssv2

DDP = ["--trainer.strategy", "ddp", "--trainer.accelerator", "cpu", "--trainer.devices", "2"]
# SGD with a large constant learning rate: a step on different samples moves the weights far beyond
# the tolerance, which absorbs the different order of the gradient sums. (AdamW divides each gradient by
# its own scale, so it turns the float noise of gradients that are 0 in exact arithmetic, like an
# attention key's bias, into full-size steps: a test of the optimizer, not of DDP.)
LEARNING = ["--model.optimizer", "sgd", "--model.lr", "0.1", "--model.lr_reference_batch", "0", "--model.warmup_epochs", "0"]
IMAGE_FIXED = [
    "--data.auto_augment", "null", "--data.re_prob", "0", "--data.hflip", "0", "--data.color_jitter", "null",
    "--data.scale", "[1.0, 1.0]", "--model.mixup", "0", "--model.cutmix", "0", "--model.drop_path_rate", "0",
]  # fmt: skip


def image(tmp_path: Path, llama: Path, *extra: str) -> tuple[str, list[str], int]:
    return "image_llama", ["--model.llm.checkpoint", str(llama), *IMAGE_FIXED, *extra], 16


def video(tmp_path: Path, llama: Path) -> tuple[str, list[str], int]:
    root = write_ssv2(tmp_path / "ssv2", frames=4)  # clips of 4 frames from 4: no temporal jitter
    fixed = ["--data.auto_augment", "null", "--data.re_prob", "0", "--data.scale", "[1.0, 1.0]", "--model.mixup", "0",
             "--model.cutmix", "0", "--model.drop_path_rate", "0"]  # fmt: skip
    return "video_llama", ["--data.root", str(root), "--model.llm.checkpoint", str(llama), *fixed], 4


def point_cloud(tmp_path: Path, llama: Path) -> tuple[str, list[str], int]:
    root = write_scanobjectnn(tmp_path / "scanobjectnn")
    fixed = ["--data.augment", "false", "--model.drop_path_rate", "0", "--model.head_dropout", "0"]
    return "pointcloud_llama", ["--data.root", str(root), "--model.llm.checkpoint", str(llama), *fixed], 8


def motion(tmp_path: Path, llama: Path) -> tuple[str, list[str], int]:
    root = write_argoverse2(tmp_path / "av2", {"train": 8, "val": 3, "test": 1})
    # Scenes of different sizes: each process pads its own batch to its own largest scene.
    args = ["--data.root", str(root), "--model.llm.checkpoint", str(llama), "--model.node_completion", "0",
            "--trainer.max_epochs", "1"]  # fmt: skip
    return "motion_llama", args, 4


FAMILIES = {
    "image": image,
    "image-gcr": pytest.param(lambda tmp_path, llama: image(tmp_path, llama, "--model.llm.mode", "auxiliary"),
                              marks=pytest.mark.slow),  # fmt: skip
    "point-cloud": pytest.param(point_cloud, marks=pytest.mark.slow),
    "motion": pytest.param(motion, marks=pytest.mark.slow),
    "video": pytest.param(video, marks=pytest.mark.slow),
    "image-lora": pytest.param(lambda tmp_path, llama: image(tmp_path, llama, "--model.llm.lora", "{r: 4, alpha: 8}"),
                               marks=pytest.mark.slow),  # fmt: skip
}


# Families whose models hold batch norms (Point-BERT's mini-PointNet): each process normalises its own
# batch (SyncBatchNorm needs GPUs), so the 1-process run accumulates 2 half batches instead.
BATCH_NORM = ("point-cloud",)


@pytest.mark.parametrize("family", FAMILIES.values(), ids=FAMILIES.keys())
def test_two_processes_with_half_batches_train_like_one_with_the_whole(tmp_path, tiny_llama_checkpoint, family, request):
    config, args, batch = family(tmp_path, tiny_llama_checkpoint)
    steps = 3
    args = [*args, *LEARNING, "--trainer.max_epochs", "1"]
    if request.node.callspec.id in BATCH_NORM:
        whole = ["--data.batch_size", str(batch // 2), "--trainer.accumulate_grad_batches", "2",
                 "--trainer.limit_train_batches", str(2 * steps)]  # fmt: skip
    else:
        whole = ["--data.batch_size", str(batch), "--trainer.limit_train_batches", str(steps)]
    one = run_cli("fit", config, tmp_path / "one", *args, *whole, "--trainer.callbacks+=tests.cli_helpers.InitialWeights")
    half = ["--data.batch_size", str(batch // 2), "--trainer.limit_train_batches", str(steps)]
    two = run_cli_subprocess("fit", config, tmp_path / "two", *args, *half, *DDP)
    assert two.returncode == 0, two.stderr[-3000:]

    expected = load_checkpoint(last_checkpoint(tmp_path / "one"))
    state = load_checkpoint(last_checkpoint(tmp_path / "two"))
    assert state["global_step"] == expected["global_step"] == one.trainer.global_step > 1
    # The same global batch: the same scaled learning rate.
    assert state["optimizer_states"][0]["param_groups"][0]["lr"] == expected["optimizer_states"][0]["param_groups"][0]["lr"]
    assert state["state_dict"].keys() == expected["state_dict"].keys()
    assert not [k for k in state["state_dict"] if k.removeprefix("model.").startswith("llm_block.layers.") and "lora_" not in k]
    initial = next(c for c in one.trainer.callbacks if type(c).__name__ == "InitialWeights").state
    # Batch-norm running statistics are process 0's own (DDP broadcasts its buffers): left out.
    running = ("running_mean", "running_var", "num_batches_tracked")
    for key, value in expected["state_dict"].items():
        if key.endswith(running):
            continue
        torch.testing.assert_close(state["state_dict"][key], value, rtol=1e-4, atol=1e-4, msg=key)
    # The tolerance is far below how far training moved the weights.
    assert max((value - initial[key]).abs().max() for key, value in expected["state_dict"].items()) > 1e-2


@pytest.mark.parametrize("size", [16, 37])
def test_the_training_sampler_deals_the_same_global_batches_to_any_number_of_processes(size):
    batch = 4
    def global_batches(processes: int) -> list[set[int]]:
        samplers = [TrainingSampler(range(size), processes, rank, batch // processes) for rank in range(processes)]
        for sampler in samplers:
            sampler.set_epoch(3)
        shares = [list(sampler) for sampler in samplers]
        assert len({len(share) for share in shares}) == 1 and len(shares[0]) == len(samplers[0])
        step = batch // processes
        return [{i for share in shares for i in share[k * step : (k + 1) * step]} for k in range(len(shares[0]) // step)]

    batches = global_batches(1)
    assert len(batches) == size // batch and all(len(b) == batch for b in batches)
    assert global_batches(2) == global_batches(4) == batches
    assert len(set().union(*batches)) == size // batch * batch  # no sample twice in an epoch
    epoch4 = TrainingSampler(range(size), 1, 0, batch)
    epoch4.set_epoch(4)
    assert list(epoch4)[:batch] != sorted(batches[0])  # a new order every epoch
