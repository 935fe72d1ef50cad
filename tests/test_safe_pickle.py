"""Dataset pickles (CIFAR-100's python version, MNIST's) are read without executing them."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest

from frozenlm.data import CIFAR100DataModule
from frozenlm.data.safe_pickle import UnsafePickleError, load_arrays
from tests.data.cifar100.data import write as write_cifar100


class _Marker:
    """Unpickling this would create a file: what a malicious dataset pickle could do instead."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_plain_arrays_and_containers_load_under_every_protocol(protocol):
    value = {"data": np.arange(12, dtype=np.uint8).reshape(3, 4), "fine_labels": [1, 2, 3], "name": "train"}
    if protocol == 2:  # Python 3's protocol 2 wraps bytes in _codecs.encode; Python 2 (the real files) did not
        value["data"] = value["data"].tolist()
    read = load_arrays(io.BytesIO(pickle.dumps(value, protocol=protocol)), "x.pkl", "fix")
    assert np.array_equal(np.asarray(read["data"]), np.asarray(value["data"])) and read["fine_labels"] == [1, 2, 3]


def test_a_cifar100_file_that_would_run_code_is_refused_before_it_runs(tmp_path):
    root = write_cifar100(tmp_path / "cifar")
    marker = tmp_path / "marker"
    train = root / "cifar-100-python" / "train"
    train.write_bytes(pickle.dumps({"data": _Marker(marker), "fine_labels": [0]}))
    datamodule = CIFAR100DataModule(root, batch_size=2, num_workers=0)
    with pytest.raises(UnsafePickleError, match=rf"{train}.*refused without running it.*tarball again") as error:
        datamodule.setup("fit")
    assert not marker.exists() and "\n" not in str(error.value)
