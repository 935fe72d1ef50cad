"""Video: SSv2 decoding and sampling, VideoMAE + frozen LM block (inline and GCR), layer decay, pretrained loading."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.optim import create_optimizer_v2
from transformers import VideoMAEConfig, VideoMAEForPreTraining, VideoMAEModel

from frozenlm.data import SSv2DataModule
from frozenlm.data.base import DatasetNotFoundError, Unreadable, collate_readable
from frozenlm.data.ssv2 import class_name
from frozenlm.data.video_transforms import (
    VideoTrainTransform,
    decode_frames,
    read_clip,
    segment_indices,
    uniform_clip_indices,
)
from frozenlm.llm import LLMConfig
from frozenlm.models.videomae import VideoMAEClassifier
from frozenlm.tasks import VideoClassifier
from tests.cli_helpers import check_lora_round_trip, last_checkpoint, load_checkpoint, run_cli
from tests.model_checks import check_branch, hooked_modules
from tests.data.ssv2.data import CLASSES, HEIGHT, WIDTH, write

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
FRAMES, SIZE = 4, 32


@pytest.fixture(scope="session")
def ssv2_root(tmp_path_factory) -> Path:
    """4 classes x (4 train + 2 validation) videos of 8 frames, 32 x 48 px. Copy it before editing."""
    return write(tmp_path_factory.mktemp("ssv2"))


@pytest.fixture
def ssv2_copy(ssv2_root, tmp_path) -> Path:
    return Path(shutil.copytree(ssv2_root, tmp_path / "ssv2"))


def datamodule(root: Path, **kwargs) -> SSv2DataModule:
    return SSv2DataModule(root, batch_size=4, num_workers=0, num_frames=FRAMES, img_size=SIZE, **kwargs)


def tiny_model(llm: LLMConfig | None = None, **kwargs) -> VideoClassifier:
    return VideoClassifier(num_classes=4, num_frames=FRAMES, img_size=SIZE, backbone_config=TINY, llm=llm, **kwargs)


# -- data ------------------------------------------------------------------------------------
def test_segment_sampling_and_uniform_test_clips():
    for _ in range(20):
        indices = segment_indices(32, 4)
        assert [int(i) // 8 for i in indices] == [0, 1, 2, 3]  # one frame inside each segment
    assert [c.tolist() for c in uniform_clip_indices(32, 4, 2)] == [[2, 10, 18, 26], [6, 14, 22, 30]]
    assert uniform_clip_indices(32, 4, 1)[0].tolist() == [4, 12, 20, 28]  # segment centres
    short = segment_indices(3, 4)  # fewer frames than segments: frames repeat, in order
    assert short.min() >= 0 and short.max() <= 2 and np.all(np.diff(short) >= 0)


def test_decoding_reads_the_moving_square(ssv2_root):
    frames = decode_frames(ssv2_root / "20bn-something-something-v2" / "1.webm")  # left to right
    assert len(frames) == 8
    clip = read_clip(frames, [0, 7])
    assert clip.shape == (2, 3, HEIGHT, WIDTH) and clip.dtype == torch.uint8
    columns = clip.float().mean(dim=(1, 2))  # brightness per column
    assert columns[1].argmax() > columns[0].argmax() + 10


def test_labels_come_from_the_templates(ssv2_root):
    assert class_name("Putting [something] on [something similar]") == "Putting something on something similar"
    data = datamodule(ssv2_root)
    assert data.num_classes == 4 and data.classes == list(CLASSES)
    train, val = data.load_split("train"), data.load_split("val")
    assert len(train.labels) == 16 and len(val.labels) == 8
    annotations = json.loads((ssv2_root / "labels" / "train.json").read_text())
    assert train.labels[:4] == [0, 1, 2, 3] and train.ids[0] == annotations[0]["id"]
    assert train.paths[0] == ssv2_root / "20bn-something-something-v2" / f"{annotations[0]['id']}.webm"


def test_loaders_yield_clips_and_test_views(ssv2_root):
    data = datamodule(ssv2_root)
    train = next(iter(data.train_dataloader()))
    assert train["video"].shape == (4, 3, FRAMES, SIZE, SIZE) and train["unreadable"] == []
    val = next(iter(data.val_dataloader()))
    assert val["video"].shape == (4, 3, FRAMES, SIZE, SIZE)
    test = next(iter(data.test_dataloader()))
    assert test["video"].shape == (4, 2 * 3, 3, FRAMES, SIZE, SIZE)  # 2 clips x 3 crops
    views = test["video"][0]
    assert not torch.equal(views[0], views[2])  # crops at both ends of the 48 px width differ
    assert not torch.equal(views[0], views[3])  # the two clips take different frames
    one_clip = next(iter(datamodule(ssv2_root, test_clips=1).test_dataloader()))["video"][0]
    assert torch.equal(val["video"][0], one_clip[1])  # val = the segment centres' centre crop


def test_train_clips_gives_each_video_several_differently_augmented_clips(ssv2_root):
    data = datamodule(ssv2_root, train_clips=2)
    train = next(iter(data.train_dataloader()))
    assert train["video"].shape == (4 * 2, 3, FRAMES, SIZE, SIZE)  # batch_size videos x 2 clips
    assert train["id"][0::2] == train["id"][1::2] and torch.equal(train["label"][0::2], train["label"][1::2])
    assert not torch.equal(train["video"][0], train["video"][1])


def test_stochastic_depth_on_both_residual_branches_of_every_layer():
    model = VideoClassifier(num_classes=4, num_frames=FRAMES, img_size=SIZE, backbone_config=TINY, drop_path_rate=0.2)
    layers = model.model.backbone.encoder.layer
    assert [layer.drop_path.drop_prob for layer in layers] == pytest.approx([0.0, 0.2])
    plain = VideoClassifier(num_classes=4, num_frames=FRAMES, img_size=SIZE, backbone_config=TINY, drop_path_rate=0.0)
    assert model.state_dict().keys() == plain.state_dict().keys()  # checkpoints are unchanged
    video = torch.randn(8, 3, FRAMES, SIZE, SIZE).transpose(1, 2)  # HF layout [B, T, 3, H, W]
    backbone = model.model.backbone.eval()
    with torch.no_grad():
        tokens = backbone(pixel_values=video).last_hidden_state
        torch.testing.assert_close(backbone(pixel_values=video).last_hidden_state, tokens)  # no drop path at eval
        layers[1].drop_path.train()
        layers[1].drop_path.drop_prob = 1.0  # both branches of layer 1 dropped for every clip
        skipped = backbone(pixel_values=video).last_hidden_state
        after_layer0 = layers[0](backbone.embeddings(video, None))
    torch.testing.assert_close(skipped, after_layer0)  # layer 1 is the identity
    assert not torch.allclose(tokens, skipped)


def test_augmentation_is_the_same_for_every_frame():
    torch.manual_seed(0)
    frame = torch.randint(0, 256, (1, 3, 40, 40), dtype=torch.uint8)
    transform = VideoTrainTransform(SIZE, re_prob=0.0)
    for _ in range(5):
        clip = transform(frame.expand(FRAMES, -1, -1, -1).clone())
        assert clip.shape == (3, FRAMES, SIZE, SIZE)
        assert all(torch.equal(clip[:, 0], clip[:, t]) for t in range(1, FRAMES))


def test_unreadable_videos_are_dropped_and_named(ssv2_copy):
    data = datamodule(ssv2_copy)
    split = data.load_split("val")
    split.paths[1].write_bytes(b"\x1a\x45\xdf\xa3 not a webm" * 10)
    split.paths[2].unlink()
    dataset = data.test_dataloader().dataset
    assert isinstance(dataset[1], Unreadable) and dataset[1].path == str(split.paths[1])
    assert isinstance(dataset[2], Unreadable) and "No such file" in dataset[2].reason
    batch = collate_readable([dataset[0], dataset[1], dataset[3], dataset[2]])
    assert batch["video"].shape[0] == 2
    assert [entry.split(" (")[0] for entry in batch["unreadable"]] == [str(split.paths[1]), str(split.paths[2])]
    assert collate_readable([dataset[1]]) == {"unreadable": [f"{split.paths[1]} ({dataset[1].reason})"]}


def test_missing_dataset_fails_at_once_with_the_fix(tmp_path, ssv2_copy):
    with pytest.raises(DatasetNotFoundError, match=rf"{tmp_path / 'nothing'}.*Download Something-Something-v2"):
        datamodule(tmp_path / "nothing")
    (ssv2_copy / "labels" / "validation.json").unlink()
    with pytest.raises(DatasetNotFoundError, match="validation.json"):
        datamodule(ssv2_copy)


# -- model -----------------------------------------------------------------------------------
def test_block_sits_before_pooling(tiny_llama_checkpoint):
    model = tiny_model(LLMConfig(checkpoint=str(tiny_llama_checkpoint))).eval()
    calls = []
    model.model.backbone.encoder.layer[-1].register_forward_hook(lambda m, a, out: calls.append(("encoder", out)))
    model.model.llm_block.register_forward_hook(lambda m, a, out: calls.append(("llm", a[0], out)))
    model.model.fc_norm.register_forward_hook(lambda m, a, out: calls.append(("fc_norm", a[0])))
    video = torch.randn(2, 3, FRAMES, SIZE, SIZE)
    with torch.no_grad():
        logits = model(video)
    assert [c[0] for c in calls] == ["encoder", "llm", "fc_norm"]
    (_, encoder_out), (_, llm_in, llm_out), (_, pooled) = calls
    assert llm_in.shape == (2, 8, 32) and torch.equal(llm_in, encoder_out)  # all 2 x 2 x 2 tokens, no CLS
    torch.testing.assert_close(pooled, llm_out.mean(dim=1))
    assert logits.shape == (2, 4)
    assert model.model.backbone.config._attn_implementation == "sdpa"
    assert model.model.llm_block.lm_config._attn_implementation == "sdpa"


def test_layer_decay_scales(tiny_llama_checkpoint):
    model = tiny_model(LLMConfig(checkpoint=str(tiny_llama_checkpoint)))
    optimizer = create_optimizer_v2(model, "adamw", lr=1.0, weight_decay=0.05, layer_decay=0.7)
    scale = {id(p): group["lr_scale"] for group in optimizer.param_groups for p in group["params"]}
    depth = TINY["num_hidden_layers"]
    for name, param in model.named_parameters():
        if name.startswith("model.llm_block.layers."):
            assert id(param) not in scale  # frozen: never optimised
        elif name.startswith("model.backbone.embeddings."):
            assert scale[id(param)] == pytest.approx(0.7 ** (depth + 1)), name
        elif name.startswith("model.backbone.encoder.layer."):
            layer = int(name.split(".")[4])
            assert scale[id(param)] == pytest.approx(0.7 ** (depth - layer)), name
        else:  # fc_norm, head, LM adapters
            assert scale[id(param)] == 1.0, name
    assert any(name.startswith("model.llm_block.adapter_in") for name, _ in model.named_parameters())


def test_pretrained_weights_load_from_a_local_folder(tmp_path):
    config = VideoMAEConfig(**TINY, image_size=SIZE, patch_size=16, num_frames=FRAMES, tubelet_size=2)
    torch.manual_seed(1)
    VideoMAEModel(config).save_pretrained(tmp_path / "encoder")
    pretraining = VideoMAEForPreTraining(VideoMAEConfig(
        **config.to_dict() | {"use_mean_pooling": False, "decoder_hidden_size": 16, "decoder_num_hidden_layers": 1,
                              "decoder_num_attention_heads": 2, "decoder_intermediate_size": 32}
    ))  # fmt: skip
    pretraining.save_pretrained(tmp_path / "mae")
    saved = {
        "encoder": VideoMAEModel.from_pretrained(tmp_path / "encoder").state_dict(),
        "mae": pretraining.videomae.state_dict(),
    }
    for folder, expected in saved.items():
        model = tiny_model(pretrained=str(tmp_path / folder))
        loaded = model.model.backbone.state_dict()
        assert set(loaded) <= set(expected) and loaded
        assert all(torch.equal(loaded[k], expected[k]) for k in loaded), folder
        assert model.model.backbone.config.use_mean_pooling and model.model.backbone.layernorm is None
    with pytest.raises(ValueError, match="hidden_size: checkpoint 32, configured 384"):
        VideoClassifier(num_classes=4, num_frames=FRAMES, img_size=SIZE, pretrained=str(tmp_path / "encoder"))


# -- through the CLI -------------------------------------------------------------------------
def test_fit_test_predict_inline_through_the_cli(tmp_path, ssv2_root, tiny_llama_checkpoint):
    args = ["--data.root", str(ssv2_root), "--model.llm.checkpoint", str(tiny_llama_checkpoint)]
    cli = run_cli("fit", "video_llama", tmp_path, *args)
    assert cli.trainer.callback_metrics["train_loss"].isfinite()
    assert cli.model.hparams.num_classes == 4
    groups = cli.trainer.optimizers[0].param_groups
    assert sorted({round(g["lr_scale"], 6) for g in groups}) == [0.343, 0.49, 0.7, 1.0]
    ckpt = last_checkpoint(tmp_path)
    assert not [k for k in load_checkpoint(ckpt)["state_dict"] if k.startswith("model.llm_block.layers.")]

    test = run_cli("test", "video_llama", tmp_path, *args, "--ckpt_path", str(ckpt))
    metrics = test.trainer.callback_metrics
    assert 0.0 <= metrics["test_acc1"].item() <= metrics["test_acc5"].item() <= 1.0
    output = tmp_path / "predictions.csv"
    run_cli("predict", "video_llama", tmp_path, *args, "--ckpt_path", str(ckpt), "--predictions.output", str(output))
    rows = list(csv.DictReader(output.open()))
    assert len(rows) == 8 and json.loads(rows[0]["class_names"])[0] in CLASSES  # every validation video


def test_gcr_auxiliary_mode_through_the_cli(tmp_path, ssv2_copy, tiny_llama_checkpoint):
    # One unreadable video in train and in val: counted, never a crash (and an odd train batch for mixup).
    data = datamodule(ssv2_copy)
    for split in ("train", "val"):
        data.load_split(split).paths[0].write_bytes(b"garbage" * 50)
    with pytest.warns(UserWarning, match=rf"Skipping unreadable sample .*{data.load_split('train').paths[0]}"):
        cli = run_cli(
            "fit", "video_llama", tmp_path, "--data.root", str(ssv2_copy),
            "--model.llm.checkpoint", str(tiny_llama_checkpoint), "--model.llm.mode", "auxiliary",
            "--trainer.limit_train_batches", "4", "--data.max_unreadable_fraction", "0.3",  # 1 of 4 val videos
        )  # fmt: skip
    metrics = cli.trainer.callback_metrics
    assert metrics["train_loss_aux"].isfinite() and metrics["train_loss_main"].isfinite()
    assert metrics["data/unreadable/train"] == 1 and metrics["data/unreadable/val"] == 1

    model = cli.model.eval()
    model.model.llm_block.forward = lambda *a, **k: pytest.fail("the LM block ran at inference in auxiliary mode")
    video = torch.randn(2, 3, FRAMES, SIZE, SIZE)
    with torch.no_grad():
        plain = model.model.forward_head(model.model.backbone(pixel_values=video.transpose(1, 2)).last_hidden_state)
        torch.testing.assert_close(model(video), plain)


def test_a_batch_of_only_unreadable_videos_gives_a_zero_loss_that_reaches_every_trainable_parameter(
    tiny_llama_checkpoint,
):
    model = VideoClassifier(
        num_classes=4, num_frames=4, img_size=32, llm=LLMConfig(checkpoint=str(tiny_llama_checkpoint)),
        backbone_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
    )  # fmt: skip
    model.log = lambda *args, **kwargs: None  # no trainer attached
    loss = model.training_step({"unreadable": ["a.webm (OSError)"] * 4}, 0)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters() if p.requires_grad)


def test_lora_block_through_the_cli(tmp_path, ssv2_root, tiny_llama_checkpoint):
    check_lora_round_trip("video_llama", tmp_path, "--data.root", str(ssv2_root), "--model.llm.checkpoint", str(tiny_llama_checkpoint))


# -- the plain model ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["inline", "auxiliary"])
def test_the_plain_model_has_no_hooks_and_returns_the_gcr_branch(tiny_llama_checkpoint, mode):
    hparams = {"num_classes": 4, "num_frames": FRAMES, "img_size": SIZE, "backbone_config": TINY, "drop_path_rate": 0.2,
               "llm": {"checkpoint": str(tiny_llama_checkpoint), "mode": mode}}  # fmt: skip
    model = VideoClassifier.build_model(hparams)  # no task, no trainer
    assert isinstance(model, VideoMAEClassifier) and model.llm_config.mode == mode
    assert [layer.drop_path.drop_prob for layer in model.backbone.encoder.layer] == pytest.approx([0.0, 0.2])
    video = torch.randn(2, 3, FRAMES, SIZE, SIZE)
    tokens, branch = check_branch(model, (video,), mode)
    if branch is not None:
        assert model.forward_aux_head(branch).shape == (2, 4)
    with torch.no_grad():
        encoded = model.backbone(pixel_values=video.transpose(1, 2)).last_hidden_state
        expected = model.llm_block(encoded) if mode == "inline" else encoded
        torch.testing.assert_close(model(video), model.head(model.fc_norm(expected.mean(dim=1))))
    assert hooked_modules(tiny_model(LLMConfig(checkpoint=str(tiny_llama_checkpoint), mode=mode))) == []
