"""UTA in miniature, offline on 2 CPU cores: does a student aligned to a teacher's tokens inherit its zero-shot
ability? A tiny CLIP is first trained contrastively on scikit-learn's digits with captions made of their
class names ("a photo of the seven."); a ViT student is then aligned to it on the digits' unmasked patches
(`configs/demo_uta.yaml` at 32 px), and both are scored zero-shot on the held-out digits after each epoch.
Writes `results.json`, `results.md` and `results.png` (zero-shot accuracy per epoch) to `--output`::

    python benchmarks/uta_miniature.py [--epochs 20] [--output docs/uta_miniature]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from frozenlm.cli import run  # noqa: E402
from tests.data.clip.teacher import train_on_digits  # noqa: E402


def scalars(log_dir: Path, name: str) -> list[float]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [event.value for event in events.Scalars(name)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--teacher-steps", type=int, default=200)
    parser.add_argument("--mask-ratio", type=float, default=0.4)
    parser.add_argument("--output", type=Path, default=Path("docs/uta_miniature"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    start = time.perf_counter()
    teacher = train_on_digits(work / "teacher", steps=args.teacher_steps)
    teacher_seconds = time.perf_counter() - start
    fit = run([
        "fit", "--config", "configs/demo_uta.yaml", "--model.teacher", str(teacher), "--trainer.accelerator", "cpu",
        "--data.img_size", "32", "--model.img_size", "32", "--model.patch_size", "8", "--data.num_workers", "0",
        "--model.backbone_kwargs", "{depth: 4, embed_dim: 96, num_heads: 3}", "--model.mask_ratio", str(args.mask_ratio),
        "--trainer.max_epochs", str(args.epochs), "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(work), "--trainer.logger.init_args.save_dir", str(work),
    ])  # fmt: skip
    log_dir = Path(fit.trainer.log_dir)
    student, teacher_acc = scalars(log_dir, "val_zeroshot_acc1"), scalars(log_dir, "val_teacher_zeroshot_acc1")
    losses = scalars(log_dir, "val_loss")
    results = {
        "epochs": args.epochs, "teacher_steps": args.teacher_steps, "mask_ratio": args.mask_ratio,
        "teacher_zeroshot_acc1": teacher_acc[-1], "student_zeroshot_acc1_per_epoch": student,
        "val_alignment_loss_per_epoch": losses, "chance": 0.1, "validation_images": 360,
        "seconds_total": round(time.perf_counter() - start, 1), "seconds_teacher": round(teacher_seconds, 1),
    }  # fmt: skip
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    rows = "\n".join(f"| {e + 1} | {s:.3f} | {loss:.4f} |" for e, (s, loss) in enumerate(zip(student, losses)))
    (args.output / "results.md").write_text(
        f"Zero-shot top-1 on the 360 held-out digits (chance 0.100). Teacher (a tiny CLIP, {args.teacher_steps} "
        f"contrastive steps on the digits' names): **{teacher_acc[-1]:.3f}**. Student (ViT, 4 blocks of width 96, "
        f"mask ratio {args.mask_ratio}), aligned to the teacher's tokens only:\n\n"
        f"| epoch | student zero-shot top-1 | validation alignment loss |\n|---|---|---|\n{rows}\n\n"
        f"`python benchmarks/uta_miniature.py --epochs {args.epochs}`: {results['seconds_total']:.0f} s on this machine.\n"
    )
    figure = Figure(figsize=(5, 3.2))
    ax = figure.subplots()
    ax.plot(range(1, len(student) + 1), student, marker="o", label="student (UTA-aligned)")
    ax.axhline(teacher_acc[-1], color="tab:orange", linestyle="--", label="teacher (tiny CLIP)")
    ax.axhline(0.1, color="grey", linestyle=":", label="chance")
    ax.set_xlabel("epoch")
    ax.set_ylabel("zero-shot top-1 (held-out digits)")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(args.output / "results.png", dpi=120)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
