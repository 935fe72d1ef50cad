"""UTA: masks, alignment to a frozen CLIP teacher on the student's kept tokens, zero-shot evaluation of the
student and the teacher, fine-tuning from a UTA checkpoint, and the CLI, on tiny CLIP teachers the tests
write (Hugging Face and open_clip)."""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from frozenlm.cli import main
from frozenlm.errors import ConfigurationError
from frozenlm.models.clip_teacher import HuggingFaceCLIPTeacher, TeacherLoadError, load_teacher
from frozenlm.models.masking import block_mask, kept_indices, reversed_block_mask
from frozenlm.tasks import ImageClassifier, UnmaskedTokenAlignment
from frozenlm.tasks.uta import CLIP_TEMPLATES
from frozenlm.tasks.zeroshot import class_names, zeroshot_classifier
from tests.cli_helpers import REPO, last_checkpoint, load_checkpoint, run_cli
from tests.data.clip import open_clip_tiny
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
    twin = write(tmp_path / "twin", CAPTIONS, vision_from=student.model.backbone)
    model = UnmaskedTokenAlignment(str(twin), mask_ratio=0.0, **STUDENT)
    model.model.backbone.load_state_dict(student.model.backbone.state_dict())
    assert isinstance(model.model.projection, torch.nn.Identity)  # equal widths: no projection
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
    assert model.model.projection.weight.grad is not None  # 24 -> 32: a linear projection, trained
    assert not any(k.startswith("teacher") for k in model.state_dict())
    trained = {id(p) for p in model.parameters()}
    assert not any(id(p) in trained for p in model.teacher.parameters())


def test_the_zero_shot_classifier_is_clips_built_by_hand(teacher):
    model = UnmaskedTokenAlignment(str(teacher), **STUDENT)
    names = ["zero", "seven"]
    classifier = zeroshot_classifier(model.teacher, names, model.hparams.zeroshot_templates)
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


def test_zero_shot_imagenet_takes_clips_80_prompts_and_class_names_from_open_clip(teacher):
    # UTA's imagenet_zeroshot_data.py holds CLIP's 80 ImageNet templates and 1,000 class names, the lists
    # open_clip ships (zero_shot_metadata.py); the classifier is the legacy construction (UTA's eval script).
    from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    model = UnmaskedTokenAlignment(str(teacher), zeroshot_templates="openai_imagenet", zeroshot_class_names="imagenet",
                                   num_classes=1000, **STUDENT)  # fmt: skip
    assert class_names("imagenet", model.hparams.num_classes, None) == list(IMAGENET_CLASSNAMES) and len(OPENAI_IMAGENET_TEMPLATES) == 80
    names = ["tench", "goldfish"]
    clip = HuggingFaceCLIPTeacher(str(teacher))
    rows = []
    for name in names:
        encoded = clip.tokenizer([t(name) for t in OPENAI_IMAGENET_TEMPLATES], padding=True, return_tensors="pt")
        with torch.no_grad():
            text = clip.model.get_text_features(**encoded).pooler_output
        rows.append(F.normalize(F.normalize(text, dim=-1).mean(0), dim=-1))
    torch.testing.assert_close(zeroshot_classifier(model.teacher, names, model.hparams.zeroshot_templates), torch.stack(rows))
    with pytest.raises(ValueError, match="clip7"):
        UnmaskedTokenAlignment(str(teacher), zeroshot_templates="imagenet80", **STUDENT)


def test_utas_own_head_reaches_the_joint_space_and_is_aligned_to_the_teachers_image_embedding(teacher):
    # UTA's released student (jihaonew/UTA eva_vit_model/eva_vit.py: head = Linear(embed_dim, 1024) on
    # norm(x)[:, 0]) has its own head into the joint space; how it was trained is not in the code (ours: the
    # alignment loss between its output and the teacher's image embedding, beside the token alignment).
    torch.manual_seed(0)
    model = UnmaskedTokenAlignment(str(teacher), zeroshot_head="own", mask_ratio=0.5, **STUDENT)
    images = torch.randn(3, 3, 32, 32)
    cls = model.model(images)[0][:, 0]
    expected = F.normalize(model.model.joint_head(cls), dim=-1)
    project = model.teacher.project
    model.teacher.project = lambda tokens: (_ for _ in ()).throw(AssertionError("the teacher projects the student"))
    torch.testing.assert_close(model.image_embeddings(images), expected)
    model.teacher.project = project
    masks = model.evaluation_masks(["a", "b", "c"])
    losses, _ = model.step_losses(images, masks)
    keep = kept_indices(masks)
    teacher_tokens = model.teacher_tokens(images)
    student = model.model(images, keep)[0]
    tokens = model.alignment_loss(model.model.projection(student), model.at_kept(teacher_tokens, keep))
    with torch.no_grad():
        embedding = model.teacher.project(teacher_tokens[:, 0])
    joint = 1 - F.cosine_similarity(model.model.joint_head(student[:, 0]), embedding, dim=-1)
    torch.testing.assert_close(losses, tokens + joint)
    losses.mean().backward()
    assert model.model.joint_head.weight.grad.abs().sum() > 0
    # The teacher's way (the default) has no head of its own.
    assert not hasattr(UnmaskedTokenAlignment(str(teacher), **STUDENT).model, "joint_head")


def test_gcr_aligns_an_auxiliary_branch_too(teacher, tiny_llama_checkpoint):
    model = UnmaskedTokenAlignment(str(teacher), llm={"checkpoint": str(tiny_llama_checkpoint), "mode": "auxiliary"}, **STUDENT)
    model.train()
    rng = np.random.default_rng(0)
    losses, aux_losses = model.step_losses(torch.randn(2, 3, 32, 32), torch.from_numpy(np.stack([model.draw_mask(rng) for _ in range(2)])))
    assert aux_losses is not None and aux_losses.shape == losses.shape
    aux_losses.mean().backward()
    adapters = [p for n, p in model.model.llm_block.named_parameters() if p.requires_grad]
    assert adapters and all(p.grad is not None for p in adapters)


# -- the student as a plain module ----------------------------------------------------------------
def student_of(task):
    """The task's student modules (``task.model``; before the models were explicit, the task itself)."""
    return getattr(task, "model", task)


def hooks(module: torch.nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if m._forward_hooks or m._forward_pre_hooks]


@pytest.mark.parametrize("aux_head", ["separate", "shared"])
def test_gcr_follows_aux_head_and_combines_its_loss_in_the_one_helper(teacher, tiny_llama_checkpoint, aux_head, monkeypatch):
    """separate: the branch's own norm and projection, so the student's final norm and projection learn from the
    main alignment only; shared: the branch goes through them (UTA ignored the setting: always shared)."""
    llm = {"checkpoint": str(tiny_llama_checkpoint), "mode": "auxiliary", "aux_head": aux_head, "aux_weight": 0.25}
    task = UnmaskedTokenAlignment(str(teacher), llm=llm, llm_position=0, mask_ratio=0.5,
                                  **{**STUDENT, "backbone_kwargs": {"depth": 2, "embed_dim": 24, "num_heads": 2}})  # fmt: skip
    student = student_of(task)
    task.train()
    masks = task.evaluation_masks(["a", "b"])
    losses, aux_losses = task.step_losses(torch.randn(2, 3, 32, 32), masks)
    aux_losses.mean().backward()
    projection, norm = student.projection.weight, student.backbone.norm.weight  # 24 -> 32: a linear projection
    if aux_head == "separate":
        assert projection.grad is None and norm.grad is None
        assert [type(m).__name__ for m in student.aux_head] == ["LayerNorm", "Linear"] and student.aux_head[1].weight.grad is not None
    else:
        assert projection.grad is not None and norm.grad is not None and not hasattr(student, "aux_head")
    calls = []
    combine = task.with_auxiliary_loss
    monkeypatch.setattr(task, "with_auxiliary_loss", lambda *args: calls.append(args) or combine(*args))
    loss = task.training_step({"image": torch.randn(2, 3, 32, 32), "id": ["a", "b"]}, 0)
    ((main, aux, weight, batch),) = calls
    assert weight == 0.25 and batch == 2 and torch.equal(loss, main + 0.25 * aux)


def test_the_student_is_a_plain_module_without_hooks_that_returns_the_gcr_branch(teacher, tiny_llama_checkpoint, tmp_path):
    """build_model needs no trainer (the teacher's widths from its architecture alone, or given); the student's
    forward returns GCR's branch in training only; neither the student nor the teacher holds a hook, even when the
    teacher's config asks transformers for hidden states and attentions (it records them through forward hooks)."""
    hparams = {"teacher": str(teacher), **STUDENT, "llm": {"checkpoint": str(tiny_llama_checkpoint), "mode": "auxiliary"},
               "llm_position": -2, "zeroshot_head": "own", "num_classes": 4}  # fmt: skip
    student = UnmaskedTokenAlignment.build_model(hparams)
    assert type(student).__name__ == "UTAStudent" and student.llm_position == 0 and student.joint_head.out_features == 16
    given = UnmaskedTokenAlignment.build_model(hparams, teacher_width=32, joint_dim=8)
    assert given.joint_head.out_features == 8
    with pytest.raises(IndexError, match="llm_position 2 is out of range for a ViT with 2 blocks"):
        UnmaskedTokenAlignment.build_model({**hparams, "llm_position": 2})
    images, keep = torch.randn(2, 3, 32, 32), kept_indices(torch.tensor([[True] * 8 + [False] * 8] * 2).view(2, 4, 4))
    tokens, branch = student.train()(images, keep)
    assert tokens.shape == branch.shape == (2, 9, 32)
    tokens, branch = student.eval()(images, keep)
    assert tokens.shape == (2, 9, 32) and branch is None
    # The task's student is the same module: it loads the built one's weights and gives the same tokens.
    config = json.loads((teacher / "config.json").read_text())
    for part in ("vision_config", "text_config"):
        config[part] |= {"output_hidden_states": True, "output_attentions": True}
    recording = shutil.copytree(teacher, tmp_path / "recording")
    (recording / "config.json").write_text(json.dumps(config))
    task = UnmaskedTokenAlignment(str(recording), **{k: v for k, v in hparams.items() if k != "teacher"})
    task.model.load_state_dict(student.state_dict())
    torch.testing.assert_close(task.model.eval()(images, keep)[0], tokens, rtol=0, atol=0)
    assert {k.split(".")[0] for k in task.state_dict()} == {"model"}  # checkpoints: model.backbone..., model.llm_block...
    task.train()
    task.training_step({"image": images, "id": ["a", "b"]}, 0)
    task.eval()
    task.image_embeddings(images), task.teacher_image_embeddings(images), zeroshot_classifier(task.teacher, ["zero"], None)
    assert hooks(student_of(task)) == [] and hooks(task.teacher) == []


def test_checkpoints_of_the_task_before_its_model_was_explicit_load(teacher, tiny_llama_checkpoint):
    """Keys written as ``backbone.*`` (main before issue 31) move under ``model.``; a GCR checkpoint of that time,
    whose branch had no head of its own (UTA ignored llm.aux_head), is refused in one line unless it is loaded shared."""
    task = UnmaskedTokenAlignment(str(teacher), zeroshot_head="own", **STUDENT)
    old = {"state_dict": {k.removeprefix("model."): v.clone() + 1 for k, v in task.state_dict().items()}}
    assert any(k.startswith("backbone.") for k in old["state_dict"])
    task.on_load_checkpoint(old)
    task.load_state_dict(old["state_dict"])  # strict
    assert torch.equal(task.model.joint_head.bias, old["state_dict"]["model.joint_head.bias"])
    llm = {"checkpoint": str(tiny_llama_checkpoint), "mode": "auxiliary"}
    shared = UnmaskedTokenAlignment(str(teacher), llm={**llm, "aux_head": "shared"}, **STUDENT)
    gcr = {"state_dict": {k.removeprefix("model."): v for k, v in shared.state_dict().items()}}
    with pytest.raises(ConfigurationError, match="trained before UTA followed llm.aux_head.*--model.llm.aux_head shared"):
        UnmaskedTokenAlignment(str(teacher), llm=llm, **STUDENT).on_load_checkpoint(copy.deepcopy(gcr))
    shared.on_load_checkpoint(gcr)
    shared.load_state_dict(gcr["state_dict"])


def test_the_task_monitors_the_students_zero_shot_accuracy_as_the_demo_config():
    assert (UnmaskedTokenAlignment.monitor, UnmaskedTokenAlignment.monitor_mode) == ("val_zeroshot_acc1", "max")
    config = yaml.safe_load((REPO / "configs" / "demo_uta.yaml").read_text())
    monitored = [c["init_args"] for c in config["trainer"].get("callbacks", []) if "monitor" in c.get("init_args", {})]
    assert all((c["monitor"], c["mode"]) == ("val_zeroshot_acc1", "max") for c in monitored)


def test_teachers_that_cannot_load_are_named(tmp_path):
    with pytest.raises(TeacherLoadError, match="--model.teacher.*nowhere.*openai/clip-vit-base-patch16"):
        load_teacher(str(tmp_path / "nowhere"))
    with pytest.raises(TeacherLoadError, match="open_clip:No-Such-Model"):
        load_teacher("open_clip:No-Such-Model/none")


@pytest.fixture(scope="session")
def open_clip_models(tmp_path_factory) -> Path:
    """The tiny open_clip models registered (tests/data/clip/open_clip_tiny.py); the folder for their weights."""
    pytest.importorskip("open_clip")
    root = tmp_path_factory.mktemp("open_clip")
    open_clip_tiny.register(root)
    return root


@pytest.mark.parametrize("architecture", ["Tiny-Test-ViT", "Tiny-Test-EVA"])
def test_an_open_clip_teacher_gives_encode_images_tokens_embedding_and_texts(open_clip_models, architecture):
    """open_clip's own ViT and a timm trunk (EVA02's kind, which has no ln_post or class_embedding): the teacher's
    tokens are the tower's final-normed tokens and its CLS projects to what encode_image gives."""
    import open_clip

    reference, path = open_clip_tiny.weights(architecture, open_clip_models)
    teacher = load_teacher(f"open_clip:{architecture}/{path}")
    assert (teacher.image_size, teacher.patch_size, teacher.width) == (32, 8, 32)
    images = torch.randn(2, 3, 32, 32)
    tokens = teacher.tokens(images)
    assert tokens.shape == (2, 17, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher.project(tokens[:, 0]), reference.encode_image(images), atol=1e-5, rtol=1e-5)
        if architecture == "Tiny-Test-ViT":  # open_clip's forward with its patch tokens (after ln_post)
            reference.visual.output_tokens = True
            patches = reference.visual(images)[1]
            reference.visual.output_tokens = False
        else:  # timm's features end with the trunk's final norm
            patches = reference.visual.trunk.forward_features(images)[:, 1:]
        torch.testing.assert_close(tokens[:, 1:], patches, atol=1e-5, rtol=1e-5)
        texts = open_clip.get_tokenizer(architecture)(["a cat"])
        torch.testing.assert_close(teacher.encode_texts(["a cat"]), reference.encode_text(texts))
    model = UnmaskedTokenAlignment(f"open_clip:{architecture}/{path}", **STUDENT)
    rng = np.random.default_rng(0)
    losses, _ = model.step_losses(images, torch.from_numpy(np.stack([model.draw_mask(rng) for _ in range(2)])))
    assert losses.shape == (2,) and losses.isfinite().all()


@pytest.mark.parametrize("architecture", ["Tiny-Test-ViT", "Tiny-Test-EVA"])
def test_an_open_clip_teacher_takes_another_grid_as_a_hugging_face_teacher_does(open_clip_models, architecture):
    """Trained at 4 x 4 patches, given 6 x 6: the position table is interpolated as transformers' CLIP interpolates
    it (its own code computes the reference table), EVA02's rotary grid as timm sets it; back at 4 x 4 the
    trained table is used again. And a UTA student with a 6 x 6 grid trains against it."""
    from transformers.models.clip.modeling_clip import CLIPVisionConfig, CLIPVisionEmbeddings

    reference, path = open_clip_tiny.weights(architecture, open_clip_models)
    teacher = load_teacher(f"open_clip:{architecture}/{path}")
    vit = architecture == "Tiny-Test-ViT"
    trained = reference.visual.positional_embedding if vit else reference.visual.trunk.pos_embed[0]
    embeddings = CLIPVisionEmbeddings(CLIPVisionConfig(hidden_size=32, num_attention_heads=2, image_size=32, patch_size=8))
    with torch.no_grad():
        embeddings.position_embedding.weight.copy_(trained)
        table = embeddings.interpolate_pos_encoding(torch.zeros(1, 37, 32), 48, 48)  # transformers' interpolation
    larger = copy.deepcopy(reference)
    if vit:
        larger.visual.positional_embedding = torch.nn.Parameter(table[0])
    else:
        larger.visual.set_input_size(48)  # timm: the patch embedding's size and the rotary grid (and a table we replace)
        larger.visual.trunk.pos_embed = torch.nn.Parameter(table)
    images, small = torch.randn(2, 3, 48, 48), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = teacher.tokens(images)
        assert tokens.shape == (2, 37, 32)
        torch.testing.assert_close(teacher.project(tokens[:, 0]), larger.encode_image(images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(teacher.project(teacher.tokens(small)[:, 0]), reference.encode_image(small), atol=1e-5, rtol=1e-5)
    model = UnmaskedTokenAlignment(f"open_clip:{architecture}/{path}", **{**STUDENT, "img_size": 48})
    rng = np.random.default_rng(0)
    losses, _ = model.step_losses(images, torch.from_numpy(np.stack([model.draw_mask(rng) for _ in range(2)])))
    assert losses.shape == (2,) and losses.isfinite().all()


def config_teachers() -> dict[str, list[str]]:
    """Every teacher spec a shipped config's model names, and the configs naming it."""
    found: dict[str, list[str]] = {}
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        init_args = ((yaml.safe_load(path.read_text()) or {}).get("model") or {}).get("init_args") or {}
        if isinstance(init_args.get("teacher"), str):
            found.setdefault(init_args["teacher"], []).append(path.name)
    return found


# Hub ids cannot be fetched here; their published shapes, as transformers' CLIPConfig takes them (its defaults are
# documented as openai/clip-vit-base-patch32's). A config naming another hub id fails until its shape is added here.
HUB_CONFIGS = {"openai/clip-vit-base-patch16": {"vision_config": {"patch_size": 16}}}


@pytest.mark.parametrize("spec", config_teachers())
def test_every_teacher_a_shipped_config_names_builds(spec, monkeypatch):
    """The real architecture of each config's teacher (open_clip's own config of it; a hub id's published shape),
    built on the meta device (no weights, no download) through the teacher's own code, gives tokens of its grid
    and an image embedding."""
    from transformers import CLIPConfig

    from frozenlm.models import clip_teacher

    assert "imagenet21k_uta_base.yaml" in config_teachers()["open_clip:EVA02-E-14/laion2b_s4b_b115k"]  # the search works
    if not spec.startswith(clip_teacher.OPEN_CLIP_PREFIX):
        assert spec in HUB_CONFIGS, f"{config_teachers()[spec]}: add the published shape of {spec} to HUB_CONFIGS"
        hub = SimpleNamespace(get_config_dict=lambda source, revision=None: (CLIPConfig(**HUB_CONFIGS[source]).to_dict(), {}),
                              from_dict=CLIPConfig.from_dict)  # fmt: skip
        monkeypatch.setattr(clip_teacher, "CLIPConfig", hub)
    teacher = load_teacher(spec, weights=False)
    assert next(teacher.parameters()).is_meta
    grid = teacher.image_size // teacher.patch_size
    tokens = teacher.tokens(torch.empty(2, 3, teacher.image_size, teacher.image_size, device="meta"))
    assert tokens.shape == (2, 1 + grid * grid, teacher.width)
    assert teacher.project(tokens[:, 0]).shape[0] == 2


# -- teachers that cannot be right are refused ------------------------------------------------------
def test_a_hugging_face_folder_that_is_not_a_whole_clip_is_refused(tmp_path, teacher):
    """Another kind of model (RoBERTa), a CLIP folder lacking tensors, one whose tensors have other shapes: each
    would run with random tensors (transformers initialises what it does not find); refused in one line."""
    from safetensors.torch import load_file, save_file
    from transformers import RobertaConfig, RobertaModel

    roberta = tmp_path / "roberta"
    RobertaModel(RobertaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(roberta)
    with pytest.raises(TeacherLoadError, match=rf"--model.teacher {roberta}: {roberta} holds a 'roberta' model .*not a CLIP model"):
        load_teacher(str(roberta))
    partial = tmp_path / "partial"
    shutil.copytree(teacher, partial)
    state = load_file(partial / "model.safetensors")
    save_file({k: v for k, v in state.items() if k not in ("logit_scale", "visual_projection.weight")}, partial / "model.safetensors")
    with pytest.raises(TeacherLoadError, match=rf"{partial} lacks 2 tensors of the CLIP model \(logit_scale, visual_projection.weight\)"):
        load_teacher(str(partial))
    other = tmp_path / "other"  # a CLIP folder whose config does not match its weights' shapes
    shutil.copytree(teacher, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "projection_dim": 8}))
    with pytest.raises(TeacherLoadError, match=rf"{other} holds in other shapes 2 tensors of the CLIP model \(text_projection.weight, visual_projection.weight\)"):
        load_teacher(str(other))


def test_an_open_clip_teacher_without_weights_or_with_incomplete_ones_is_refused(open_clip_models):
    import open_clip

    known = ", ".join(open_clip.list_pretrained_tags_by_model("ViT-B-16"))
    with pytest.raises(TeacherLoadError, match=rf"open_clip:ViT-B-16 names no weights.*open_clip:ViT-B-16/<tag or file> \(the tags open_clip knows for ViT-B-16: {known}\)"):
        load_teacher("open_clip:ViT-B-16")
    with pytest.raises(TeacherLoadError, match="open_clip knows no pretrained weights for Tiny-Test-ViT"):
        load_teacher("open_clip:Tiny-Test-ViT")
    with pytest.raises(TeacherLoadError, match="'nothing-here' is neither a pretrained tag nor a weights file"):
        load_teacher("open_clip:Tiny-Test-ViT/nothing-here")
    reference, path = open_clip_tiny.weights("Tiny-Test-ViT", open_clip_models)
    partial = path.with_name("partial.pt")
    torch.save({k: v for k, v in reference.state_dict().items() if not k.startswith("visual.ln_post")}, partial)
    with pytest.raises(TeacherLoadError, match=rf"{partial} lacks 2 tensors of the CLIP model \(visual.ln_post.bias, visual.ln_post.weight\)"):
        load_teacher(f"open_clip:Tiny-Test-ViT/{partial}")


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--model.teacher", "open_clip:Tiny-Test-ViT"], "TeacherLoadError: --model.teacher open_clip:Tiny-Test-ViT names no weights"),
        (["--model.mask_ratio", "0.99"], "ValueError: --model.mask_ratio 0.99 masks all 16 patches of the student's 4 x 4 grid; keep at least one"),
    ],
)  # fmt: skip
def test_the_console_script_refuses_in_one_line(args, reason, teacher, open_clip_models, tmp_path, monkeypatch, capsys):
    """A teacher without weights, a mask that keeps no patch: exit 2 with one line, before any training."""
    from tests.cli_helpers import CONF

    argv = ["frozenlm", "fit", "--config", str(CONF / "uta.yaml"), "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--model.teacher", str(teacher), *args]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert reason in err[0] and len(err) == 2, err
    assert not list(tmp_path.rglob("*.ckpt"))


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
    classifier = zeroshot_classifier(model.teacher, data.classes, model.hparams.zeroshot_templates)
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
    trunk = {k.removeprefix("model."): v for k, v in load_checkpoint(checkpoint)["state_dict"].items()}  # either layout
    own = {k.removeprefix("model."): v for k, v in classifier_model.state_dict().items()}
    assert any(k.startswith("backbone.") for k in trunk)
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


def test_an_evaluation_batch_of_padding_alone_scores_nothing(teacher):
    """Under DDP a process's last evaluation batch can hold nothing but the padding that evens out the processes'
    shares (181 digits, 3 processes, batches of 10: 61 per process, the 61st a repeat): the zero-shot metrics
    skip it, as the other tasks' do (they were updated with 0 rows, which torchmetrics cannot take)."""
    model = UnmaskedTokenAlignment(str(teacher), **STUDENT)
    model._trainer = SimpleNamespace(datamodule=SimpleNamespace(classes=["zero", "one", "two", "seven"]),
                                     sanity_checking=False)  # what evaluation reads
    model._start_evaluation("test")
    model._trainer = None  # no trainer: self.log does nothing
    padding = {"image": torch.randn(1, 3, 32, 32), "label": torch.tensor([1]), "id": ["digits/0"], "padding": torch.tensor([True])}
    model._evaluate(padding, "test")
    assert all(metric.update_count == 0 for metrics in model._zeroshot.accuracy.values() for metric in metrics.values())
    model._evaluate({**padding, "padding": torch.tensor([False])}, "test")
    assert all(metric.update_count == 1 for metrics in model._zeroshot.accuracy.values() for metric in metrics.values())


@pytest.mark.slow
def test_two_and_three_processes_score_each_image_once(teacher, tmp_path):
    """The alignment loss on fixed masks and the zero-shot accuracies of student and teacher: 2 and 3 processes give
    1 process's figures (181 validation digits in batches of 10: on 2 processes 91 each, on 3 processes 61 each,
    so a process's last batch is one padding row alone)."""
    from tests.cli_helpers import run_cli_subprocess

    args = ["--model.teacher", str(teacher), "--trainer.limit_test_batches", "1.0", "--data.val_fraction", "0.1007",
            "--data.batch_size", "10"]  # fmt: skip
    run_cli("fit", "uta", tmp_path, *args)
    checkpoint = ["--ckpt_path", str(last_checkpoint(tmp_path)), "--trainer.callbacks+=tests.cli_helpers.DumpMetrics"]
    run_cli("test", "uta", tmp_path / "p1", *args, *checkpoint, "--trainer.callbacks.path", str(tmp_path / "m1.json"))
    one = json.loads((tmp_path / "m1.json").read_text())
    for processes in (2, 3):
        result = run_cli_subprocess("test", "uta", tmp_path / f"p{processes}", *args, *checkpoint, "--trainer.callbacks.path",
                                    str(tmp_path / f"m{processes}.json"), "--trainer.strategy", "ddp", "--trainer.devices", str(processes))  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        many = json.loads((tmp_path / f"m{processes}.json").read_text())
        for name in ("test_loss", "test_zeroshot_acc1", "test_zeroshot_acc5", "test_teacher_zeroshot_acc1"):
            assert many[name] == pytest.approx(one[name], abs=1e-6), (processes, name)


def test_a_run_without_zero_shot_monitors_the_alignment_loss(teacher):
    """`zeroshot: false` logs no zero-shot accuracy: its best checkpoint follows the loss it logs."""
    from frozenlm.trainer_cli import task_checkpoints

    task = UnmaskedTokenAlignment(str(teacher), zeroshot=False, **STUDENT)
    best = task_checkpoints(task)[0]
    assert (best.monitor, best.mode) == ("val_loss", "min")
    assert (UnmaskedTokenAlignment(str(teacher), **STUDENT).monitor) == "val_zeroshot_acc1"
