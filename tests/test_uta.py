"""UTA: masks, alignment to a frozen CLIP teacher on the student's kept tokens, zero-shot evaluation of the
student and the teacher, fine-tuning from a UTA checkpoint, and the CLI, on tiny CLIP teachers the tests
write (Hugging Face and open_clip)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from frozenlm.models.clip_teacher import HuggingFaceCLIPTeacher, TeacherLoadError, load_teacher
from frozenlm.models.masking import block_mask, kept_indices, reversed_block_mask
from frozenlm.tasks import ImageClassifier, UnmaskedTokenAlignment
from frozenlm.tasks.uta import CLIP_TEMPLATES
from tests.cli_helpers import last_checkpoint, load_checkpoint, run_cli
from tests.data.clip.teacher import train_on_digits, write
from tests.data.flickr30k.data import write as write_flickr30k

# The tiny teacher's shape: a student of this shape can be a copy of it.
STUDENT = {"backbone": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "drop_path_rate": 0.0,
           "backbone_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2.0, "pre_norm": True}}  # fmt: skip
CAPTIONS = [t.format(n) for n in ("zero", "one", "two", "seven") for t in CLIP_TEMPLATES]


@pytest.fixture(scope="session")
def teacher(tmp_path_factory) -> Path:
    return write(tmp_path_factory.mktemp("clip"), CAPTIONS)


def neighbours_masked(mask: np.ndarray) -> float:
    """Over the masked patches, the mean share of their 4-neighbours (inside the grid) that are masked too:
    about the mask ratio for scattered patches, near 1 for large blocks."""
    ones = np.pad(np.ones_like(mask, dtype=int), 1)
    padded = np.pad(mask.astype(int), 1)

    def around(grid):
        return grid[:-2, 1:-1] + grid[2:, 1:-1] + grid[1:-1, :-2] + grid[1:-1, 2:]

    return float((around(padded) / around(ones))[mask].mean())


# -- masks --------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.4, 0.5, 0.75])
def test_masks_keep_exactly_one_minus_the_ratio(ratio):
    rng = np.random.default_rng(0)
    count = round(ratio * 196)
    for draw in (block_mask, reversed_block_mask):
        masks = np.stack([draw((14, 14), count, rng) for _ in range(50)])
        assert (masks.sum(axis=(1, 2)) == count).all()
        assert kept_indices(masks).shape == (50, 196 - count)


def test_block_masks_are_contiguous_and_reversed_ones_keep_blocks():
    rng = np.random.default_rng(0)
    blocks = [block_mask((14, 14), 78, rng) for _ in range(100)]
    random = [np.isin(np.arange(196), rng.permutation(196)[:78]).reshape(14, 14) for _ in range(100)]
    reversed_ = [reversed_block_mask((14, 14), 78, rng) for _ in range(100)]
    assert np.mean([neighbours_masked(m) for m in blocks]) > 0.75
    assert np.mean([neighbours_masked(m) for m in random]) < 0.5  # about the ratio, 0.4
    assert np.mean([neighbours_masked(~m) for m in reversed_]) > 0.75  # the kept patches are the blocks
    masks = np.stack(blocks[:3])
    keep = kept_indices(masks)
    assert all(not masks[b].flat[keep[b]].any() for b in range(3)) and (keep.diff(dim=1) > 0).all()


# -- alignment ----------------------------------------------------------------------------------
def test_the_loss_is_zero_for_a_copy_of_the_teacher_and_the_targets_are_at_the_kept_positions(tmp_path, teacher):
    student = UnmaskedTokenAlignment(str(teacher), mask_ratio=0.0, **STUDENT)  # pre-norm: no patch bias, as CLIP
    twin = write(tmp_path / "twin", CAPTIONS, vision_from=student.backbone)
    model = UnmaskedTokenAlignment(str(twin), mask_ratio=0.0, **STUDENT)
    model.backbone.load_state_dict(student.backbone.state_dict())
    assert isinstance(model.projection, torch.nn.Identity)  # equal widths: no projection
    images = torch.randn(4, 3, 32, 32)
    rng = np.random.default_rng(0)
    losses, _ = model.step_losses(images, torch.from_numpy(np.stack([model.draw_mask(rng) for _ in range(4)])))
    assert losses.abs().max() < 1e-7  # float rounding only
    # Masked: the student sees fewer tokens, so its outputs move away from the teacher's (a random ViT's
    # tokens depend little on their context: far above rounding, small in absolute terms).
    model.hparams.mask_ratio = 0.5
    masks = torch.from_numpy(np.stack([model.draw_mask(rng) for _ in range(4)]))
    losses, _ = model.step_losses(images, masks)
    assert (losses > 1e-6).all()
    # The targets are the teacher's CLS and its tokens at the kept patches, in order.
    keep = kept_indices(masks)
    positions = torch.arange(17.0).view(1, 17, 1).expand(4, 17, 3)
    gathered = model.at_kept(positions, keep)
    assert gathered[:, 0, 0].eq(0).all() and torch.equal(gathered[:, 1:, 0].long(), keep + 1)


def test_no_gradient_reaches_the_teacher_and_it_stays_out_of_checkpoints(teacher):
    model = UnmaskedTokenAlignment(str(teacher), mask_ratio=0.5, **{**STUDENT, "backbone_kwargs": {"depth": 2, "embed_dim": 24, "num_heads": 2}})
    model.train()
    assert not model.teacher.training
    rng = np.random.default_rng(0)
    losses, _ = model.step_losses(torch.randn(2, 3, 32, 32), torch.from_numpy(np.stack([model.draw_mask(rng) for _ in range(2)])))
    losses.mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert model.projection.weight.grad is not None  # 24 -> 32: a linear projection, trained
    assert not any(k.startswith("teacher") for k in model.state_dict())
    trained = {id(p) for p in model.parameters()}
    assert not any(id(p) in trained for p in model.teacher.parameters())


def test_the_zero_shot_classifier_is_clips_built_by_hand(teacher):
    model = UnmaskedTokenAlignment(str(teacher), **STUDENT)
    names = ["zero", "seven"]
    classifier = model.zeroshot_classifier(names)
    clip = HuggingFaceCLIPTeacher(str(teacher))
    rows = []
    for name in names:
        encoded = clip.tokenizer([t.format(name) for t in CLIP_TEMPLATES], padding=True, return_tensors="pt")
        with torch.no_grad():
            text = clip.model.get_text_features(**encoded).pooler_output
        rows.append(F.normalize(F.normalize(text, dim=-1).mean(0), dim=-1))
    torch.testing.assert_close(classifier, torch.stack(rows))
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = F.normalize(clip.model.get_image_features(pixel_values=images).pooler_output, dim=-1)
    torch.testing.assert_close(model.teacher_image_embeddings(images), expected, atol=1e-5, rtol=1e-5)


def test_gcr_aligns_an_auxiliary_branch_too(teacher, tiny_llama_checkpoint):
    model = UnmaskedTokenAlignment(str(teacher), llm={"checkpoint": str(tiny_llama_checkpoint), "mode": "auxiliary"}, **STUDENT)
    model.train()
    rng = np.random.default_rng(0)
    losses, aux_losses = model.step_losses(torch.randn(2, 3, 32, 32), torch.from_numpy(np.stack([model.draw_mask(rng) for _ in range(2)])))
    assert aux_losses is not None and aux_losses.shape == losses.shape
    aux_losses.mean().backward()
    adapters = [p for n, p in model.llm_block.named_parameters() if p.requires_grad]
    assert adapters and all(p.grad is not None for p in adapters)


def test_teachers_that_cannot_load_are_named(tmp_path):
    with pytest.raises(TeacherLoadError, match="--model.teacher.*nowhere.*openai/clip-vit-base-patch16"):
        load_teacher(str(tmp_path / "nowhere"))
    with pytest.raises(TeacherLoadError, match="open_clip:No-Such-Model"):
        load_teacher("open_clip:No-Such-Model/none")


def test_an_open_clip_teacher_gives_its_tokens_projection_and_texts(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    config = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}  # fmt: skip
    (tmp_path / "Tiny-Test-ViT.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "Tiny-Test-ViT.json")
    torch.manual_seed(0)
    reference = open_clip.create_model("Tiny-Test-ViT")
    torch.save(reference.state_dict(), tmp_path / "weights.pt")
    teacher = load_teacher(f"open_clip:Tiny-Test-ViT/{tmp_path / 'weights.pt'}")
    assert (teacher.image_size, teacher.patch_size, teacher.width) == (32, 8, 32)
    images = torch.randn(2, 3, 32, 32)
    tokens = teacher.tokens(images)
    assert tokens.shape == (2, 17, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher.project(tokens[:, 0]), reference.encode_image(images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(teacher.encode_texts(["a cat"]), reference.encode_text(open_clip.get_tokenizer("Tiny-Test-ViT")(["a cat"])))
    model = UnmaskedTokenAlignment(f"open_clip:Tiny-Test-ViT/{tmp_path / 'weights.pt'}", **STUDENT)
    rng = np.random.default_rng(0)
    losses, _ = model.step_losses(images, torch.from_numpy(np.stack([model.draw_mask(rng) for _ in range(2)])))
    assert losses.shape == (2,) and losses.isfinite().all()


# -- through the CLI ------------------------------------------------------------------------------
def test_fit_then_zero_shot_test_and_fine_tune_from_the_checkpoint(teacher, tmp_path):
    args = ["--model.teacher", str(teacher)]
    run_cli("fit", "uta", tmp_path, *args)
    checkpoint = last_checkpoint(tmp_path)
    assert not any(k.startswith("teacher") for k in load_checkpoint(checkpoint)["state_dict"])
    test = run_cli("test", "uta", tmp_path, *args, "--ckpt_path", str(checkpoint), "--trainer.limit_test_batches", "1.0")
    metrics = {k: float(v) for k, v in test.trainer.callback_metrics.items()}
    assert {"test_loss", "test_zeroshot_acc1", "test_zeroshot_acc5", "test_teacher_zeroshot_acc1"} <= set(metrics)
    # The logged zero-shot accuracy is the one computed here image by image.
    model, data = test.model.eval(), test.datamodule
    classifier = model.zeroshot_classifier(data.classes)
    correct = teacher_correct = total = 0
    with torch.no_grad():
        for batch in data._loader(data.val_set):
            scale = model.teacher.logit_scale()
            correct += int(((scale * model.image_embeddings(batch["image"]) @ classifier.T).argmax(1) == batch["label"]).sum())
            teacher_correct += int(((model.teacher_image_embeddings(batch["image"]) @ classifier.T).argmax(1) == batch["label"]).sum())
            total += len(batch["label"])
    assert metrics["test_zeroshot_acc1"] == pytest.approx(correct / total, abs=1e-6)
    assert metrics["test_teacher_zeroshot_acc1"] == pytest.approx(teacher_correct / total, abs=1e-6)
    # Fine-tuning starts from the student's trunk; the head starts fresh.
    classifier_model = ImageClassifier(num_classes=10, init_from=str(checkpoint), layer_decay=0.65, **STUDENT | {
        "backbone_kwargs": {"depth": 2, "embed_dim": 48, "num_heads": 2}})  # fmt: skip
    trunk = load_checkpoint(checkpoint)["state_dict"]
    own = classifier_model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in trunk.items() if k.startswith("backbone."))
    assert own["backbone.head.weight"].shape == (10, 48)


def test_zero_shot_retrieval_on_flickr30k_against_brute_force(teacher, tmp_path):
    root = write_flickr30k(tmp_path / "f30k")
    args = ["--model.teacher", str(teacher), "--data", "frozenlm.data.Flickr30kDataModule", "--data.root", str(root),
            "--data.img_size", "32", "--data.num_workers", "0", "--data.batch_size", "2",
            "--trainer.limit_test_batches", "1.0"]  # fmt: skip
    test = run_cli("test", "uta", tmp_path, *args)
    metrics = {k: float(v) for k, v in test.trainer.callback_metrics.items()}
    model, data = test.model.eval(), test.datamodule
    texts, owners = data.captions("test")
    with torch.no_grad():
        images = torch.stack([data.test_dataloader().dataset[i]["image"] for i in range(5)])
        text = F.normalize(model.teacher.encode_texts(texts).float(), dim=-1)
        student, teacher_scores = model.image_embeddings(images) @ text.T, model.teacher_image_embeddings(images) @ text.T
    for name, scores in (("zeroshot", student), ("teacher_zeroshot", teacher_scores)):
        for k in (1, 5):
            image_hits = sum(any(int(owners[t]) == i for t in scores[i].topk(k).indices) for i in range(5)) / 5
            assert metrics[f"test_{name}_tr_r{k}"] == pytest.approx(image_hits)
            text_hits = sum(int(owners[t]) in scores[:, t].topk(k).indices.tolist() for t in range(len(texts))) / len(texts)
            assert metrics[f"test_{name}_ir_r{k}"] == pytest.approx(text_hits)


@pytest.mark.slow
def test_the_aligned_student_approaches_its_teachers_zero_shot_accuracy(tmp_path):
    """The miniature (benchmarks/uta_miniature.py runs it longer): a tiny CLIP trained on the digits' class-name
    captions, a student aligned to it for 10 epochs, zero-shot on the held-out digits."""
    folder = train_on_digits(tmp_path / "teacher", steps=200)
    args = ["--model.teacher", str(folder), "--trainer.limit_train_batches", "1.0", "--trainer.limit_val_batches", "1.0",
            "--trainer.limit_test_batches", "1.0"]  # fmt: skip
    run_cli("fit", "uta", tmp_path, *args, "--trainer.max_epochs", "10", "--model.warmup_epochs", "1")
    test = run_cli("test", "uta", tmp_path, *args, "--ckpt_path", str(last_checkpoint(tmp_path)))
    metrics = {k: float(v) for k, v in test.trainer.callback_metrics.items()}
    assert metrics["test_teacher_zeroshot_acc1"] > 0.6  # the teacher learned the digits' names
    assert metrics["test_zeroshot_acc1"] > 0.35  # chance: 0.1; the student got there through alignment alone


@pytest.mark.slow
def test_two_processes_score_each_image_once(teacher, tmp_path):
    """The alignment loss on fixed masks and the zero-shot accuracies of student and teacher: 2 processes give
    1 process's figures (181 validation digits: an odd split, so one process pads its share)."""
    from tests.cli_helpers import run_cli_subprocess

    args = ["--model.teacher", str(teacher), "--trainer.limit_test_batches", "1.0", "--data.val_fraction", "0.1007"]
    run_cli("fit", "uta", tmp_path, *args)
    checkpoint = ["--ckpt_path", str(last_checkpoint(tmp_path)), "--trainer.callbacks+=tests.cli_helpers.DumpMetrics"]
    run_cli("test", "uta", tmp_path / "p1", *args, *checkpoint, "--trainer.callbacks.path", str(tmp_path / "m1.json"))
    result = run_cli_subprocess("test", "uta", tmp_path / "p2", *args, *checkpoint, "--trainer.callbacks.path",
                                str(tmp_path / "m2.json"), "--trainer.strategy", "ddp", "--trainer.devices", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"m{n}.json").read_text()) for n in (1, 2))
    for name in ("test_loss", "test_zeroshot_acc1", "test_zeroshot_acc5", "test_teacher_zeroshot_acc1"):
        assert two[name] == pytest.approx(one[name], abs=1e-6), name
