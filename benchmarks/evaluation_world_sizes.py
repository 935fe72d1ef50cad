"""Test metrics of each task family on 1, 2 and 3 processes (gloo DDP on the CPU), as a table.

The splits are `tests/test_exact_evaluation.py`'s, sized to divide by neither 2 nor 3: 181 digits, 13
ScanObjectNN clouds with 3 votes each, 5 Argoverse 2 scenes, 7 SSv2 videos of 2 clips x 3 crops. Each
task's tiny test model is fitted briefly once, then tested from its checkpoint on 1 process (in this
one) and on 2 and 3 (fresh processes). Every sample must be scored exactly once, so the metrics agree
(losses, means of floats, up to the order of the sums)::

    python benchmarks/evaluation_world_sizes.py [--output metrics.json] [--markdown docs/benchmarks/evaluation_world_sizes.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import h5py

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import Report  # noqa: E402
from tests.cli_helpers import last_checkpoint, run_cli  # noqa: E402
from tests.data.argoverse2.data import write as write_argoverse2  # noqa: E402
from tests.data.scanobjectnn.data import write as write_scanobjectnn  # noqa: E402
from tests.data.ssv2.data import write as write_ssv2  # noqa: E402
from tests.test_exact_evaluation import metrics_on  # noqa: E402


def scanobjectnn(folder: Path) -> Path:
    root = write_scanobjectnn(folder)
    test_file = root / "main_split" / "test_objectdataset.h5"
    with h5py.File(test_file, "r") as file:
        data, labels = file["data"][:13], file["label"][:13]
    with h5py.File(test_file, "w") as file:
        file.create_dataset("data", data=data)
        file.create_dataset("label", data=labels)
    return root


def ssv2(folder: Path) -> Path:
    root = write_ssv2(folder)
    labels = root / "labels" / "validation.json"
    labels.write_text(json.dumps(json.loads(labels.read_text())[:7]))
    return root


def tasks(folder: Path) -> dict[str, tuple[str, list[str], list[str]]]:
    """name -> (test config, arguments, extra fit arguments)."""
    motion = ["--data.root", str(write_argoverse2(folder / "av2", {"train": 8, "val": 5, "test": 2})), "--data.batch_size", "2"]
    return {
        "image": ("image_baseline", ["--data.val_fraction", "0.1007"], []),
        "point-cloud": ("pointcloud_llama", ["--model.llm", "null", "--data.root", str(scanobjectnn(folder / "sonn")),
                                             "--data.batch_size", "4"], ["--trainer.max_epochs", "1"]),
        "motion": ("motion_llama", ["--model.llm", "null", *motion], ["--trainer.max_epochs", "1"]),
        "video": ("video_llama", ["--model.llm", "null", "--data.root", str(ssv2(folder / "ssv2")), "--data.batch_size", "2",
                                  "--data.test_clips", "2", "--data.test_crops", "3"], []),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, help="also write the metrics as JSON here")
    parser.add_argument("--markdown", type=Path, help="also write the table here (docs/benchmarks/ is what the docs include)")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, (config, common, fit) in tasks(Path(scratch)).items():
            work = Path(scratch) / name
            run_cli("fit", config, work / "fit", *common, *fit)
            checkpoint = ["--ckpt_path", str(last_checkpoint(work / "fit"))]
            results[name] = {n: metrics_on(work, "test", config, n, *common, *checkpoint) for n in (1, 2, 3)}
    report = Report(args.markdown)
    report.line("| task | metric | 1 process | 2 processes | 3 processes |")
    report.line("|---|---|---:|---:|---:|")
    for name, by_count in results.items():
        for metric in by_count[1]:
            report.line(f"| {name} | {metric} | " + " | ".join(f"{by_count[n][metric]:.7g}" for n in (1, 2, 3)) + " |")
    report.save()
    if args.output:
        args.output.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
