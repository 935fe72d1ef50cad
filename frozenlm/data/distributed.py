"""Data work on several processes: training batches that do not depend on how many processes share
them (`TrainingSampler`), evaluation that scores every sample exactly once, and preprocessing
shared between the processes instead of repeated by each (`share_work`).

PyTorch's `DistributedSampler` (Lightning's default under DDP) pads a split whose size does not divide
by the world size with repeated samples, so that every process runs the same number of batches; the
repeats are then scored twice (a test split of 15 clouds on 2 processes scored 16). Skipping them
outright would leave processes with different numbers of batches, which hangs any collective of an
evaluation step (DDP's buffer broadcast during `fit`'s validation, a synced log). Instead
`EvaluationSampler` keeps the padding, so the batch counts stay equal, but marks each repeat;
`MarkedPadding` gives every sample a `padding` flag, and the tasks drop the flagged rows (after
the forward, which every process still runs on its whole batch) before any metric, loss or prediction
([`scored`][frozenlm.tasks.BaseTask.scored]).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler

from frozenlm.errors import FrozenLMError

# The batch entry holding each sample's position in its split (evaluation loaders under DDP).
DATASET_INDEX = "dataset_index"


class TrainingSampler(DistributedSampler):
    """The training order: one permutation of the split per epoch, drawn from `(seed, epoch)` alone
    (`--seed_everything`; Lightning calls `set_epoch`), cut into global batches of
    `num_replicas x batch_size` samples, of which process `r` takes the `r`-th `batch_size`.
    So the samples of a step do not depend on how they are shared: `n` processes with batches of
    `b` train on the same samples as one process with batches of `n b`, and each process's batch is
    the micro-batch one process accumulating `n` batches of `b` would see (the same batch-norm
    statistics, too). The samples that do not fill a global batch are left out of the epoch. (A plain
    `RandomSampler` on one process and Lightning's `DistributedSampler` on several shuffle
    differently, and the latter deals samples round-robin.)"""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, batch_size: int) -> None:
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.num_samples = len(dataset) // (num_replicas * batch_size) * batch_size
        self.total_size = self.num_samples * num_replicas

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator)[: self.total_size].view(-1, self.batch_size)
        return iter(order[self.rank :: self.num_replicas].flatten().tolist())


class EvaluationSampler(DistributedSampler):
    """The split in order, dealt round-robin to `num_replicas` processes as `DistributedSampler`
    deals it, padded to an equal share with repeats of the first samples that are marked: a repeat of
    sample `i` is yielded as `-(i + 1)`, which `MarkedPadding` turns back into sample `i`
    flagged as padding. Every non-negative index appears exactly once over all processes."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)

    def __iter__(self):
        size = len(self.dataset)
        indices = list(range(size)) + [-(i % size) - 1 for i in range(self.total_size - size)]
        return iter(indices[self.rank : self.total_size : self.num_replicas])


class MarkedPadding(Dataset):
    """`dataset` whose samples (dicts) carry `padding`: True for the repeats `EvaluationSampler`
    marks (index `-(i + 1)`), False otherwise; and `dataset_index`: the sample's position `i` in the
    split, by which the processes' predictions are put back in dataset order (a process's share is not
    every `n`-th sample once unreadable samples were dropped from its batches). Anything that is not a
    dict (an unreadable file's marker) passes unchanged, except as padding: a repeat of a sample that
    could not be read is None, which the batch drops without counting it again."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        padding = index < 0
        position = -index - 1 if padding else index
        sample = self.dataset[position]
        if not isinstance(sample, dict):
            return None if padding else sample
        return {**sample, "padding": padding, DATASET_INDEX: position}


class DataPreparationError(FrozenLMError, RuntimeError):
    """Another process failed while preparing the data (its own error is in its output)."""


def share_work(trainer: Any, work: Callable[[int, int], None]) -> None:
    """`work(rank, world_size)` on every process, then wait for all of them: each process does its part
    of a preprocessing job (e.g. every `world_size`-th scene from `rank`) and none reads the result
    before all are done. An error in one process stops every process (that one with its own error), where
    a plain barrier would leave the others waiting. Without a trainer (or with one process), just
    `work(0, 1)`."""
    world = trainer.world_size if trainer is not None else 1
    if world == 1:
        return work(0, 1)
    failure = None
    try:
        work(trainer.global_rank, world)
    except Exception as error:  # stopped below, once every process knows
        failure = error
    flag = torch.tensor(float(failure is not None), device=trainer.strategy.root_device)
    if trainer.strategy.reduce(flag, reduce_op="max") > 0:  # the all-reduce is the barrier too
        if failure is not None:
            raise failure
        raise DataPreparationError("Another process failed while preparing the data; its error is printed above.")
