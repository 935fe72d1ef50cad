"""Preprocessing shared between processes: on a fresh cache, each of 2 DDP processes preprocesses its
own half of the Argoverse 2 scenes, each scene once, and training starts from the complete cache."""

from __future__ import annotations

import re

from tests.cli_helpers import last_checkpoint, load_checkpoint, run_cli_subprocess
from tests.data.argoverse2.data import write as write_argoverse2


def test_two_processes_split_the_preprocessing_of_a_fresh_cache(tmp_path):
    root = write_argoverse2(tmp_path / "av2", {"train": 8, "val": 5, "test": 2})
    result = run_cli_subprocess(
        "fit", "motion_llama", tmp_path / "run", "--model.llm", "null", "--data.root", str(root), "--data.batch_size", "2",
        "--trainer.max_epochs", "1", "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    done = re.findall(r"Argoverse2DataModule (\w+): preprocessing (\d+) of (\d+) scenes \(process (\d) of 2\)", result.stdout)
    counts = {(split, int(rank)): int(count) for split, count, _, rank in done}
    assert counts == {("train", 0): 4, ("train", 1): 4, ("val", 0): 3, ("val", 1): 2}, done  # each scene once
    cache = root / "frozenlm_cache"
    assert len(list(cache.glob("train-*/*.safetensors"))) == 8 and len(list(cache.glob("val-*/*.safetensors"))) == 5
    assert load_checkpoint(last_checkpoint(tmp_path / "run"))["global_step"] == 2  # 8 scenes / (2 x 2) per step
