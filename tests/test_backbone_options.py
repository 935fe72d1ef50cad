"""The ViT options: convolutional stem and CAPE positions (units), and all three options (with LoRA)
through the CLI: fit, exact resume after a kill, export, rank-layers and activation maps."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file
from timm.layers import ConvNormAct

from frozenlm.analysis import rank_layers, stage_maps
from frozenlm.measure import trunk_flops
from frozenlm.cli import run
from frozenlm.export import load_trunk
from frozenlm.models import create_vit
from frozenlm.models.patch_embed import CAPE2d, CAPEConfig, PatchEmbedding, conv_stem_plan
from frozenlm.tasks import ImageClassifier
from tests.cli_helpers import last_checkpoint, load_checkpoint, run_cli
from tests.test_shipped_configs import CONFIGS

TINY_VIT = {"depth": 3, "embed_dim": 32, "num_heads": 2}


# -- convolutional stem ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("embed_dim", "patch", "channels", "strides"),
    [
        (192, 16, [24, 48, 96, 192], [2, 2, 2, 2]),  # the paper's ViT-T-like stem
        (384, 16, [48, 96, 192, 384], [2, 2, 2, 2]),  # ViT-S-like
        (768, 16, [64, 128, 128, 256, 256, 512], [2, 2, 1, 2, 1, 2]),  # ViT-B-like
        (1024, 16, [64, 128, 128, 256, 256, 512], [2, 2, 1, 2, 1, 2]),  # ViT-L-like: the 36 GF model reuses it
        (384, 4, [48, 96, 192, 384], [2, 2, 1, 1]),  # CIFAR's 4 px patches
        (768, 8, [64, 128, 128, 256, 256, 512], [2, 2, 1, 2, 1, 1]),
    ],
)
def test_conv_stem_plans(embed_dim, patch, channels, strides):
    assert conv_stem_plan(embed_dim, patch) == (channels, strides)


def test_conv_stem_layers_and_depth():
    vit = create_vit("deit_small_patch16_224", 10, stem="conv", drop_path_rate=0.0)
    assert len(vit.blocks) == 11 and isinstance(vit.patch_embed, PatchEmbedding)
    stem = vit.patch_embed.proj
    assert isinstance(stem, torch.nn.Sequential) and len(stem) == 5
    for layer, width in zip(stem[:4], [48, 96, 192, 384], strict=True):
        assert isinstance(layer, ConvNormAct)
        assert layer.conv.kernel_size == (3, 3) and layer.conv.stride == (2, 2) and layer.conv.bias is None
        assert layer.conv.out_channels == width and isinstance(layer.bn, torch.nn.BatchNorm2d)
        assert isinstance(layer.bn.act, torch.nn.ReLU)
    assert stem[4].kernel_size == (1, 1) and stem[4].bias is not None and stem[4].out_channels == 384
    assert vit(torch.randn(2, 3, 224, 224)).shape == (2, 10)
    # The removed blocks are settable, and count from the configured depth.
    assert len(create_vit("deit_small_patch16_224", 10, stem="conv", stem_removed_blocks=0).blocks) == 12
    assert len(create_vit("deit_small_patch16_224", 10, stem="conv", stem_removed_blocks=2, depth=6).blocks) == 4


def test_conv_stem_errors():
    with pytest.raises(ValueError, match=r"multiply to 8, not the patch size 16"):
        create_vit("deit_tiny_patch16_224", 10, stem="conv", stem_channels=[8, 16, 32], stem_strides=[2, 2, 2])
    with pytest.raises(ValueError, match="reach patch sizes 1, 2, 4, 8 or 16, not 14"):
        create_vit("deit_tiny_patch16_224", 10, stem="conv", patch_size=14)
    with pytest.raises(ValueError, match="train from scratch"):
        create_vit("deit_tiny_patch16_224", 10, stem="conv", pretrained=True)
    with pytest.raises(ValueError, match="stem_channels/stem_strides need 'conv'"):
        create_vit("deit_tiny_patch16_224", 10, stem_channels=[8, 16, 32, 64], stem_strides=[2, 2, 2, 2])
    with pytest.raises(ValueError, match=r"stem_removed_blocks 3 must be in \[0, 3\)"):
        create_vit("deit_tiny_patch16_224", 10, stem="conv", stem_removed_blocks=3, depth=3)


def test_trunk_flops_stay_comparable():
    rows = {(r["backbone"], r["stem"], r["pos_embed"]): r for r in trunk_flops()}
    for size in ("tiny", "small", "base"):
        name = f"deit_{size}_patch16_224"
        patch, conv, cape = (rows[name, s, p] for s, p in (("patch", "learn"), ("conv", "learn"), ("patch", "cape")))
        assert (patch["depth"], conv["depth"]) == (12, 11)
        # Xiao et al.: the stem costs about one transformer block (their ViT_C: within 2 % of ViT_P).
        assert conv["embed_flops"] > 3 * patch["embed_flops"]
        assert abs(conv["flops"] / patch["flops"] - 1) < 0.02
        # CAPE drops the 197 x d position table and adds no matmul worth counting.
        assert patch["params"] - cape["params"] == 197 * {"tiny": 192, "small": 384, "base": 768}[size]
        assert abs(cape["flops"] / patch["flops"] - 1) < 1e-3


# -- CAPE ----------------------------------------------------------------------------------------------
def test_cape_frequencies_and_eval_positions():
    cape = CAPE2d(8).eval()
    k = torch.arange(4.0)
    rho = 10 ** ((k + 1) / 4)
    torch.testing.assert_close(cape.frequencies, torch.stack([rho * k.cos(), rho * k.sin()], -1))
    grid = cape.positions(2, 3, 5)
    assert grid.shape == (2, 3, 5, 2)
    torch.testing.assert_close(grid[0, 0, :, 0], torch.linspace(-1, 1, 5))  # x along the width
    torch.testing.assert_close(grid[0, :, 0, 1], torch.linspace(-1, 1, 3))  # y along the height
    embedding = cape(2, 3, 5)
    phase = math.pi * (rho * k.cos() * -1 + rho * k.sin() * -1)  # the top-left patch, (x, y) = (-1, -1)
    torch.testing.assert_close(embedding[1, 0, 0], torch.cat([phase.cos(), phase.sin()]))
    assert not dict(cape.state_dict())  # nothing to store or resample


def test_cape_phases_stay_float32_under_bf16_autocast():
    cape = CAPE2d(384).eval()
    reference = cape(1, 14, 14)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = cape(1, 14, 14)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, reference, atol=0, rtol=0)


def augmented(config: CAPEConfig, batch: int = 512, height: int = 5, width: int = 9):
    cape = CAPE2d(4, config).train()
    base = cape.grid(height, width)
    return cape.positions(batch, height, width), base, torch.tensor([2 / (width - 1), 2 / (height - 1)])


def test_cape_global_shift_is_per_sample_within_its_maximum():
    positions, base, _ = augmented(CAPEConfig(max_global_shift=0.5, max_local_shift=0, max_global_scaling=1))
    shift = positions - base
    assert torch.allclose(shift, shift[:, :1, :1].expand_as(shift), atol=1e-6)  # one shift per sample and axis
    assert shift.abs().max() <= 0.5 and shift.abs().max() > 0.45  # the maximum is reached, not exceeded
    assert shift[:, 0, 0, 0].std() > 0.2 and (shift[:, 0, 0, 0] - shift[:, 0, 0, 1]).abs().max() > 0.1


def test_cape_local_shift_is_per_patch_within_half_a_spacing():
    positions, base, spacing = augmented(CAPEConfig(max_global_shift=0, max_local_shift=0.5, max_global_scaling=1))
    shift = (positions - base) / spacing  # in grid spacings, per axis
    assert shift.abs().max() <= 0.5 + 1e-6 and shift.abs().max() > 0.49
    assert shift[0].std() > 0.2  # differs between the patches of one sample
    # Neighbours cannot swap: each x stays ordered along its row.
    assert (positions[..., 1:, 0] > positions[..., :-1, 0]).all()


def test_cape_global_scale_is_log_uniform_within_its_maximum():
    positions, base, _ = augmented(CAPEConfig(max_global_shift=0, max_local_shift=0, max_global_scaling=1.4))
    scale = positions[:, -1, -1, 0] / base[-1, -1, 0]
    torch.testing.assert_close(positions, base * scale[:, None, None, None])  # one scale per sample, both axes
    log = scale.log() / math.log(1.4)
    assert log.abs().max() <= 1 + 1e-6 and log.min() < -0.95 and log.max() > 0.95
    assert abs(log.mean()) < 0.15 and abs(log.std() - 1 / math.sqrt(3)) < 0.05  # uniform in log space


def test_cape_vit_is_deterministic_and_resolution_agnostic_in_eval():
    torch.manual_seed(0)
    vit = create_vit("vit_tiny_patch16_224", 10, img_size=16, patch_size=8, pos_embed="cape", **TINY_VIT).eval()
    assert vit.pos_embed is None and "pos_embed" not in vit.state_dict()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(vit(images), vit(images), atol=0, rtol=0)
        for size in (8, 24, 40):  # 1x1, 3x3 and 5x5 patch grids, with no table to resample
            assert torch.isfinite(vit(torch.randn(2, 3, size, size))).all()
        vit.train()
        assert not torch.equal(vit.patch_embed(images), vit.patch_embed(images))  # augmented in training


# -- shipped configs -----------------------------------------------------------------------------------
OPTION_CONFIGS = [p for p in CONFIGS if any(k in p.stem for k in ("convstem", "cape", "lora"))]


@pytest.mark.parametrize("path", OPTION_CONFIGS, ids=[p.stem for p in OPTION_CONFIGS])
def test_option_configs_build_their_trunk(path):
    init = yaml.safe_load(path.read_text())["model"]["init_args"]
    if "lora" in path.stem:
        assert init["llm"]["lora"] == {"r": 8, "alpha": 16}
        return
    model = ImageClassifier(num_classes=100, **{**init, "llm": None})
    patch_embed = model.model.backbone.patch_embed
    assert len(model.model.backbone.blocks) == (11 if "convstem" in path.stem else 12)
    assert isinstance(patch_embed.proj, torch.nn.Sequential) == ("convstem" in path.stem)
    assert (patch_embed.cape is not None) == ("cape" in path.stem)
    size = init.get("img_size") or 224
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, size, size)).shape == (1, 100)


# -- through the CLI -----------------------------------------------------------------------------------
OPTIONS = ["--model.stem", "conv", "--model.pos_embed", "cape", "--model.llm.lora", "{r: 4, alpha: 8}"]


@pytest.fixture(scope="module")
def gcr_run(tmp_path_factory, tiny_llama_checkpoint):
    """A GCR run with all three options: (cli, checkpoint path)."""
    root = tmp_path_factory.mktemp("options")
    cli = run_cli(
        "fit", "image_llama", root, "--model.llm.checkpoint", str(tiny_llama_checkpoint), "--model.llm.mode", "auxiliary",
        "--model.backbone_kwargs", json.dumps(TINY_VIT), *OPTIONS,
    )  # fmt: skip
    return cli, last_checkpoint(root)


def test_options_train_and_checkpoint(gcr_run):
    cli, path = gcr_run
    model = cli.model
    assert len(model.model.backbone.blocks) == 2 and isinstance(model.model.backbone.patch_embed.proj, torch.nn.Sequential)
    state = load_checkpoint(path)
    layer_keys = [k for k in state["state_dict"] if k.startswith("model.llm_block.layers.")]
    assert layer_keys and all(".lora_" in k for k in layer_keys)  # the adapters, not the frozen weights
    assert state["frozen_lm"]["model.llm_block"]["lora"]["r"] == 4
    assert any(k.endswith("bn.running_mean") for k in state["state_dict"])  # the stem's BatchNorm statistics
    assert not any("pos_embed" in k for k in state["state_dict"])
    restored = ImageClassifier.load_from_checkpoint(path)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(images), model.eval()(images), atol=0, rtol=0)


def test_options_export_and_rebuild(gcr_run, tmp_path):
    cli, path = gcr_run
    output = tmp_path / "model.safetensors"
    run(["export", "--checkpoint", str(path), "--output", str(output)])
    spec = json.loads(output.with_suffix(".json").read_text())
    assert spec["builder"] == "frozenlm.models.create_vit"
    assert spec["create_model_kwargs"] == {
        "num_classes": 10, **TINY_VIT, "img_size": 16, "patch_size": 8, "stem": "conv", "pos_embed": "cape",
    }  # fmt: skip
    vit = create_vit(spec["model_name"], **spec["create_model_kwargs"])
    vit.load_state_dict(load_file(output))
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(vit.eval()(images), cli.model.eval()(images), atol=0, rtol=0)
        # Another resolution without resampling anything (CAPE), through the exported trunk.
        torch.testing.assert_close(vit(torch.zeros(1, 3, 32, 32)), load_trunk(path)(torch.zeros(1, 3, 32, 32)))


def test_options_checkpoint_validates_at_another_resolution(gcr_run, tiny_llama_checkpoint, tmp_path):
    """Trained at 16 px (2x2 patches), validated at 32 px (4x4): CAPE has no table to resample."""
    _, path = gcr_run
    validate = run_cli(
        "validate", "image_llama", tmp_path, "--model.llm.checkpoint", str(tiny_llama_checkpoint),
        "--model.backbone_kwargs", json.dumps(TINY_VIT), *OPTIONS, "--model.llm.mode", "auxiliary",
        "--data.img_size", "32", "--ckpt_path", str(path),
    )  # fmt: skip
    assert 0 <= validate.trainer.callback_metrics["val_acc1"] <= 1
    assert validate.model.hparams.img_size == 16  # the model as trained


def test_cape_options_parse_from_the_cli(tiny_llama_checkpoint, tmp_path):
    cli = run_cli(
        "fit", "image_llama", tmp_path, "--model.llm", "null", "--model.pos_embed", "cape",
        "--model.cape", "{max_global_shift: 0.25, max_global_scaling: 1.1}", "--trainer.max_steps", "1",
    )  # fmt: skip
    assert cli.model.model.backbone.patch_embed.cape.config == CAPEConfig(max_global_shift=0.25, max_global_scaling=1.1)


def test_rank_layers_on_an_options_checkpoint(gcr_run, tiny_llama_checkpoint):
    _, path = gcr_run
    rows = rank_layers(str(tiny_llama_checkpoint), checkpoint=str(path), layers=[0, -1], num_images=8, quiet=True)
    assert sorted(row["layer"] for row in rows) == [0, 5] and all(0 < row["cka"] <= 1 for row in rows)


def test_activation_maps_with_the_options_inline_at_another_resolution(tiny_llama_checkpoint):
    torch.manual_seed(0)
    model = ImageClassifier(
        backbone="vit_tiny_patch16_224", num_classes=10, img_size=16, patch_size=8, backbone_kwargs=TINY_VIT,
        stem="conv", pos_embed="cape", llm={"checkpoint": str(tiny_llama_checkpoint), "lora": {"r": 4}},
    )  # fmt: skip
    maps = stage_maps(model, torch.randn(2, 3, 32, 32))  # trained at 16 px: 2x2 patches; here 4x4
    assert set(maps) == {"vit", "adapter_in", "attention", "ffn", "adapter_out", "cls_attention"}
    for kinds in maps.values():
        for value in kinds.values():
            assert value.shape == (2, 4, 4) and torch.isfinite(value).all()


def test_options_resume_exactly_after_a_kill(tmp_path, tiny_llama_checkpoint):
    from tests.test_resume_ddp import cli_subprocess

    common = [
        "--model.llm.checkpoint", str(tiny_llama_checkpoint), "--trainer.max_epochs", "3",
        "--model.backbone_kwargs", json.dumps(TINY_VIT), *OPTIONS,
    ]  # fmt: skip
    straight = run_cli("fit", "image_llama", tmp_path / "straight", *common)
    killed = cli_subprocess(
        tmp_path / "killed", *common, "--trainer.callbacks+=tests.cli_helpers.ExitAtEpoch", "--trainer.callbacks.epoch", "2"
    )
    assert killed.returncode == 17, killed.stderr[-3000:]
    resumed = run_cli("fit", "image_llama", tmp_path / "killed", *common, "--ckpt_path", "last")
    assert resumed.trainer.global_step == straight.trainer.global_step == 9
    expected = straight.model.state_dict()
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert torch.equal(resumed.trainer.callback_metrics["val_loss"], straight.trainer.callback_metrics["val_loss"])
