"""Writes the old-checkpoint fixtures of ``tests/test_old_checkpoints.py``: small Lightning checkpoints of each
task family, written by the frozenlm of an OLD commit, and the outputs that code computes from them.

It must run with the old commit's package on the path (the helpers that write the tiny LM, towers and teacher
are read from this repository, the same the test uses)::

    git worktree add --detach /tmp/old-0734af2 0734af2
    PYTHONPATH=/tmp/old-0734af2 python tests/data/checkpoints/make_fixtures.py 0734af2

For each fixture ``<name>`` it writes, under ``tests/data/checkpoints/<commit>/``:

- ``<name>.ckpt``: the task's weights with seeded noise added to every trained tensor (so a tensor the new code
  fails to load cannot pass for its initialisation), saved by Lightning's ``Trainer.save_checkpoint`` with the
  task's own hooks (``weights_only=True``: no optimizer state, to keep the files small); ``image_cli`` is
  instead the last checkpoint of a 3-step ``frozenlm fit`` of tests/conf/image_llama.yaml by the old CLI, whole. The frozen block is stored in the checkpoint (``llm.embed_weights: true``), so it loads
  without its source.
- ``<name>.inputs.safetensors``: a small fixed input batch (seeded).
- ``<name>.json``: how to rebuild what the checkpoint needs beyond itself (the task class, the hyper-parameters
  to override at load: the METER towers and UTA teacher folders the tests write again), and the eval-mode
  outputs of ``task.sample_forward(batch, n)`` computed by the old code after reloading the file.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning
import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]

# What the METER towers' tokenizer and the UTA teacher are trained on (the tests write them again from these).
TOWER_TEXTS = ["a red square", "what color is the circle?", "two dogs on a beach", "a cat"]
TEACHER_TEXTS = ["a photo of the zero.", "a photo of the one.", "art of the seven."]
VIT = {"backbone": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 8,
       "backbone_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2}, "drop_path_rate": 0.1,
       "num_classes": 10, "warmup_epochs": 0.5}  # fmt: skip
METER = {"img_size": 32, "fusion_layers": 2, "fusion_hidden": 32, "fusion_heads": 2, "lr": 1e-4}
VQA_ANSWERS = ["yes", "no", "two", "red", "blue"]


def helper(name: str, path: Path):
    """A module of this repository's test helpers, read by path (not through the old commit's ``tests``)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def llm(checkpoint: Path, **options) -> dict:
    return {"checkpoint": str(checkpoint), "layers": [-1], "embed_weights": True, **options}


def folder_digest(folder: Path) -> str:
    """SHA-256 over the files of a folder the tests write (names and bytes): says whether they wrote it alike."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def fixtures(lm: Path, towers: tuple[Path, Path], teacher: Path) -> dict[str, dict]:
    """name -> {"task": class path, "kwargs": the task's arguments, "batch": the input batch, "samples": n}."""
    g = torch.Generator().manual_seed(1)
    images16 = torch.randn(2, 3, 16, 16, generator=g)
    images32 = torch.randn(2, 3, 32, 32, generator=g)
    agent_mask = torch.ones(2, 3, 5, dtype=torch.bool)
    agent_mask[1, 2, 2:] = False
    agent_mask[1, 1] = False  # a padding agent
    map_mask = torch.ones(2, 4, 6, dtype=torch.bool)
    map_mask[0, 3] = False
    map_mask[1, :, 4:] = False
    motion = {
        "agent_vectors": torch.randn(2, 3, 5, 12, generator=g) * agent_mask[..., None],
        "agent_mask": agent_mask,
        "map_vectors": torch.randn(2, 4, 6, 12, generator=g) * map_mask[..., None],
        "map_mask": map_mask,
        "polyline_mask": torch.cat([agent_mask.any(dim=2), map_mask.any(dim=2)], dim=1),
    }
    vision, text = (str(p) for p in towers)
    return {
        # Every trained tensor with seeded noise (see add_noise): one that failed to load could not pass for its init.
        "image_inline": dict(task="frozenlm.tasks.ImageClassifier", kwargs=dict(**VIT, llm=llm(lm)),
                             batch={"image": images16}),
        # Trained 3 steps by the old CLI (`frozenlm fit`, tests/conf/image_llama.yaml on Digits): a checkpoint as
        # the CLI writes it (optimizer state, loops, the CLI's class path); validate and predict run on it.
        "image_cli": dict(task="frozenlm.tasks.ImageClassifier", kwargs=dict(llm=llm(lm)), batch={"image": images16},
                          cli_fit=True),
        "image_gcr": dict(task="frozenlm.tasks.ImageClassifier",
                          kwargs=dict(**VIT, llm=llm(lm, mode="auxiliary", aux_head="separate")),
                          batch={"image": images16}),
        "image_learngene": dict(task="frozenlm.tasks.ImageClassifier",
                                kwargs=dict(**{**VIT, "backbone_kwargs": {"depth": 3, "embed_dim": 32, "num_heads": 2}},
                                            llm=None, learngene={"genes": 2}),
                                batch={"image": images16}),
        "video": dict(task="frozenlm.tasks.VideoClassifier",
                      kwargs=dict(backbone="small", num_frames=4, img_size=32, num_classes=5, llm=llm(lm),
                                  backbone_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                                   "intermediate_size": 64}),
                      batch={"video": torch.randn(2, 3, 4, 32, 32, generator=g)}),
        "pointcloud_gcr": dict(task="frozenlm.tasks.PointCloudClassifier",
                               kwargs=dict(num_groups=16, group_size=8, embed_dim=32, depth=2, num_heads=2,
                                           encoder_dims=24, num_classes=5,
                                           llm=llm(lm, mode="auxiliary", aux_head="separate")),
                               batch={"points": torch.randn(2, 128, 3, generator=g)}),
        "motion": dict(task="frozenlm.tasks.MotionForecaster",
                       kwargs=dict(horizon=6, hidden=16, node_completion=1.0, llm=llm(lm)), batch=motion),
        "vqa": dict(task="frozenlm.tasks.VisualQuestionAnswering",
                    kwargs=dict(vision_checkpoint=vision, text_checkpoint=text, num_classes=len(VQA_ANSWERS),
                                **METER, llm=llm(lm)),
                    batch={"image": images32, "question": ["what color is the circle?", "a red square"]},
                    answers=VQA_ANSWERS),
        "retrieval": dict(task="frozenlm.tasks.ImageTextRetrieval",
                          kwargs=dict(vision_checkpoint=vision, text_checkpoint=text, **METER,
                                      llm=llm(lm, mode="auxiliary")),
                          batch={"image": images32, "texts": [["two dogs on a beach"], ["a cat"]]}),
        "uta": dict(task="frozenlm.tasks.UnmaskedTokenAlignment",
                    kwargs=dict(teacher=str(teacher), backbone="vit_tiny_patch16_224", img_size=32, patch_size=8,
                                backbone_kwargs={"depth": 2, "embed_dim": 48, "num_heads": 2}, drop_path_rate=0.0,
                                mask_ratio=0.5, llm=llm(lm)),
                    batch={"image": images32}),
    }  # fmt: skip


def task_class(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def add_noise(task: torch.nn.Module, seed: int) -> None:
    """Seeded noise on every trained tensor (the frozen block's weights do not train)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in task.parameters():
            if parameter.requires_grad and parameter.dtype.is_floating_point:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=g, dtype=parameter.dtype))


def inference(task, batch: dict, samples: int) -> tuple:
    """``(function, inputs)``: the task's ``sample_forward`` where the old code has it (0734af2), else (a305f9b)
    the same call written out as today's ``sample_forward`` of the family makes it."""
    if hasattr(task, "sample_forward"):
        return task.sample_forward(batch, samples)
    first = {k: v[:samples] for k, v in batch.items()}
    name = type(task).__name__
    if name == "MotionForecaster":
        return task, (first,)
    if name == "VisualQuestionAnswering":
        return task.head_logits, ({"image": first["image"], "question": first["question"]},)
    if name == "ImageTextRetrieval":
        return task, (first["image"], [t[0] for t in first["texts"]])
    if name == "UnmaskedTokenAlignment":
        return task.image_embeddings, (first["image"],)
    return task, (first[task.input_key],)


def outputs(task, batch: dict, samples: int) -> list[torch.Tensor]:
    """The eval-mode inference forward (:func:`inference`), as a flat list of tensors (None left out)."""
    task.eval()
    with torch.no_grad():
        function, inputs = inference(task, batch, samples)
        out = function(*inputs)
    return [t.float() for t in (out if isinstance(out, (tuple, list)) else (out,)) if t is not None]


def save(task, path: Path, weights_only: bool) -> None:
    trainer = lightning.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.strategy.connect(task)
    trainer.save_checkpoint(path, weights_only=weights_only)


CLI_FIXTURE = "image_cli"


def cli_args(subcommand: str, checkpoint: Path, lm: Path, root: Path) -> list[str]:
    """``frozenlm <subcommand>`` of the CLI check: tests/conf/image_llama.yaml (Digits) from ``checkpoint``."""
    return [subcommand, "--config", str(REPO / "tests" / "conf" / "image_llama.yaml"),
            "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
            "--model.llm.checkpoint", str(lm), "--ckpt_path", str(checkpoint)]  # fmt: skip


def cli_fit(lm: Path, root: Path) -> Path:
    """The last checkpoint of the old CLI's ``fit`` of tests/conf/image_llama.yaml (3 steps), the block embedded."""
    from frozenlm.cli import run

    run(["fit", "--config", str(REPO / "tests" / "conf" / "image_llama.yaml"), "--trainer.default_root_dir", str(root),
         "--trainer.logger.init_args.save_dir", str(root), "--model.llm.checkpoint", str(lm),
         "--model.llm.embed_weights", "true"])  # fmt: skip
    return max(root.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)


def cli_record(checkpoint: Path, lm: Path, root: Path) -> dict:
    """What the old CLI reports from the checkpoint: ``validate``'s metrics and ``predict``'s CSV."""
    from frozenlm.cli import run

    validate = run(cli_args("validate", checkpoint, lm, root))
    metrics = {k: float(v) for k, v in validate.trainer.callback_metrics.items()}
    output = root / "predictions.csv"
    run([*cli_args("predict", checkpoint, lm, root), "--predictions.output", str(output)])
    return {"validate": metrics, "predictions_csv": output.read_text()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("commit", help="the commit whose code is on PYTHONPATH (checked against its git HEAD)")
    parser.add_argument("--only", nargs="*", help="fixture names (default: all)")
    args = parser.parse_args()
    import frozenlm

    package = Path(frozenlm.__file__).resolve().parents[1]
    head = subprocess.run(["git", "-C", str(package), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    if not head.startswith(args.commit) or package == REPO:
        sys.exit(f"frozenlm is imported from {package} at {head.strip() or '?'}: put commit {args.commit}'s worktree first on PYTHONPATH")
    torch.set_num_threads(1)
    conftest = helper("fixture_conftest", REPO / "tests" / "conftest.py")
    towers_helper = helper("fixture_towers", REPO / "tests" / "data" / "meter" / "towers.py")
    teacher_helper = helper("fixture_teacher", REPO / "tests" / "data" / "clip" / "teacher.py")
    out = HERE / args.commit
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lm = conftest.save_checkpoint(conftest.build_tiny_lm("llama"), tmp / "llama", "sharded")
        towers = towers_helper.write(tmp / "towers", TOWER_TEXTS)
        teacher = teacher_helper.write(tmp / "teacher", TEACHER_TEXTS)
        made = {"lm": folder_digest(lm), "towers": folder_digest(tmp / "towers"), "teacher": folder_digest(teacher)}
        for seed, (name, spec) in enumerate(fixtures(lm, towers, teacher).items()):
            if args.only and name not in args.only:
                continue
            cls = task_class(spec["task"])
            path = out / f"{name}.ckpt"
            if spec.get("cli_fit"):
                shutil.copyfile(cli_fit(lm, tmp / "fit"), path)
                task = cls.load_from_checkpoint(path, map_location="cpu", weights_only=True)
            else:
                lightning.seed_everything(0, verbose=False)
                task = cls(**spec["kwargs"])
                if "answers" in spec:
                    task.answers = list(spec["answers"])
                add_noise(task, seed=100 + seed)
                save(task, path, weights_only=True)
            expected = outputs(task, spec["batch"], samples=2)
            # The old code's own round trip gives the same outputs (the file holds the whole model).
            overrides = {k: v for k, v in spec["kwargs"].items() if k in ("vision_checkpoint", "text_checkpoint", "teacher")}
            restored = cls.load_from_checkpoint(path, map_location="cpu", weights_only=True, **overrides)
            if "answers" in spec and getattr(restored, "answers", None) is None:
                restored.answers = list(spec["answers"])
            again = outputs(restored, spec["batch"], samples=2)
            assert all(torch.equal(a, b) for a, b in zip(expected, again)), f"{name}: the old code's round trip differs"
            tensors = {k: v for k, v in spec["batch"].items() if torch.is_tensor(v)}
            save_file({k: v.contiguous() for k, v in tensors.items()}, out / f"{name}.inputs.safetensors")
            record = {
                "commit": args.commit,
                "task": spec["task"],
                "samples": 2,
                "texts": {k: v for k, v in spec["batch"].items() if not torch.is_tensor(v)},
                "overrides": sorted(overrides),
                "written_by_tests": {k: made[k] for k in (["lm"] if spec["kwargs"].get("llm") else [])
                                     + (["towers"] if "vision_checkpoint" in overrides else [])
                                     + (["teacher"] if "teacher" in overrides else [])},
                "outputs": [{"shape": list(t.shape), "values": t.flatten().tolist()} for t in expected],
            }  # fmt: skip
            if hasattr(task, "rank_head"):  # retrieval: also the rank head's score of each pair (one more Linear)
                with torch.no_grad():
                    score = task.rank_head(expected[0]).float()
                record["rank_scores"] = {"shape": list(score.shape), "values": score.flatten().tolist()}
            if name == CLI_FIXTURE:
                record["cli"] = cli_record(path, lm, tmp / "cli")
            (out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
            print(f"{name}: {path.stat().st_size / 1024:.0f} KB, outputs {[tuple(t.shape) for t in expected]}")


if __name__ == "__main__":
    main()
