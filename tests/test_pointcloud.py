"""Point clouds: FPS / kNN / grouping, Point-BERT and its pretrained starts, ScanObjectNN and ModelNet40
in their official layouts, PointCloudClassifier through the CLI (inline, GCR, voting), the reference
recipe, and the analyses on group tokens."""

from __future__ import annotations

import copy
import csv
import json
import pickle
import shutil
from pathlib import Path

import h5py
import lightning
import numpy as np
import pytest
import torch

from frozenlm.analysis import rank_layers, stage_maps
from frozenlm.cli import run
from frozenlm.data import ModelNet40DataModule, ScanObjectNNDataModule
from frozenlm.data.base import DatasetFileError, DatasetNotFoundError
from frozenlm.data.pointcloud import sample_count
from frozenlm.llm import LLMConfig
from frozenlm.models.point_ops import farthest_point_sample, gather_points, group_points, knn_indices
from frozenlm.models.pointbert import PointBERT, PointBERTClassifier, load_pretrained
from frozenlm.tasks import PointCloudClassifier
from tests.cli_helpers import check_lora_round_trip, last_checkpoint, run_cli
from tests.model_checks import check_branch, hooked_modules
from tests.data.modelnet40.data import WITH_SHAPES
from tests.data.modelnet40.data import write as write_modelnet40
from tests.data.scanobjectnn.data import write as write_scanobjectnn

TINY = {"num_groups": 16, "group_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "encoder_dims": 24}


@pytest.fixture(scope="module")
def scanobjectnn_root(tmp_path_factory) -> Path:
    return write_scanobjectnn(tmp_path_factory.mktemp("scanobjectnn"))


@pytest.fixture
def modelnet40_root(tmp_path) -> Path:
    return write_modelnet40(tmp_path)


# -- geometry ---------------------------------------------------------------------------------------
def brute_force_fps(cloud: np.ndarray, count: int) -> list[int]:
    """The pointnet2 kernel's rule (Point-BERT's FPS): start at 0, never a point with |p|^2 <= 1e-3 after
    it. Ties are first-of-equals here; the kernel's own tie order is checked in test_point_ops.py."""
    chosen, eligible = [0], (cloud**2).sum(1) > 1e-3
    for _ in range(count - 1):
        distance = np.min([((cloud - cloud[c]) ** 2).sum(1) for c in chosen], axis=0)
        chosen.append(int(np.where(eligible, distance, -1.0).argmax()))
    return chosen


@pytest.mark.parametrize("use_fpsample", [False, True])
def test_fps_matches_brute_force_and_starts_at_index_0(use_fpsample):
    clouds = torch.randn(3, 300, 3, generator=torch.Generator().manual_seed(0))
    indices = farthest_point_sample(clouds, 40, use_fpsample=use_fpsample)
    assert indices.shape == (3, 40) and (indices[:, 0] == 0).all()
    for cloud, chosen in zip(clouds, indices):
        assert chosen.tolist() == brute_force_fps(cloud.numpy().astype(np.float64), 40)


def test_knn_matches_brute_force():
    points, centres = torch.randn(2, 200, 3), torch.randn(2, 5, 3)
    indices = knn_indices(points, centres, 7)
    for b in range(2):
        for g in range(5):
            distances = ((points[b] - centres[b, g]) ** 2).sum(1)
            assert set(indices[b, g].tolist()) == set(distances.argsort()[:7].tolist())


def test_grouping_is_invariant_to_point_order_with_the_start_point_fixed():
    cloud = torch.randn(1, 500, 3, generator=torch.Generator().manual_seed(1))
    order = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(499)])  # index 0 stays first
    groups, centres = group_points(cloud, 32, 16)
    shuffled_groups, shuffled_centres = group_points(cloud[:, order], 32, 16)
    torch.testing.assert_close(shuffled_centres, centres)
    torch.testing.assert_close(shuffled_groups, groups)  # re-centred, nearest first: the same groups
    assert (groups.norm(dim=-1)[..., 0] == 0).all()  # each centre is its own nearest point
    other_start = group_points(cloud[:, torch.roll(torch.arange(500), 1)], 32, 16)[1]
    assert not torch.equal(other_start, centres)  # FPS's start point is the one order dependence


def test_point_bert_shapes_and_clear_errors():
    model = PointBERT(**TINY)
    tokens = model.forward_features(torch.randn(2, 128, 3))
    assert tokens.shape == (2, 1 + 16, 32)
    with pytest.raises(ValueError, match=r"Clouds of 10 points are too small for 16 groups of 8"):
        model.forward_features(torch.randn(2, 10, 3))
    with pytest.raises(ValueError, match=r"must be \[batch, points, 3\]"):
        model.forward_features(torch.randn(2, 128, 6))


# -- pretrained starts ----------------------------------------------------------------------------
def point_bert_checkpoint(path: Path, model: PointBERT) -> Path:
    """A file in Point-BERT.pth's format: base_model with `module.transformer_q.` tensors (its blocks
    nested as `blocks.blocks.N`), plus its contrastive head, dVAE and momentum encoder."""
    state = {f"module.transformer_q.{k.replace('blocks.', 'blocks.blocks.', 1)}": v for k, v in model.state_dict().items()}
    state["module.transformer_q.cls_head.0.weight"] = torch.randn(256, 32)
    state["module.transformer_q.lm_head.weight"] = torch.randn(8192, 32)
    state["module.transformer_k.cls_token"] = torch.randn(1, 1, 32)
    state["module.dvae.encoder.first_conv.0.weight"] = torch.randn(128, 3, 1)
    torch.save({"base_model": state, "epoch": 300}, path)
    return path


def test_point_bert_and_point_mae_checkpoints_load_by_name(tmp_path):
    source = PointBERT(**TINY)
    summary = load_pretrained(model := PointBERT(**TINY), point_bert_checkpoint(tmp_path / "Point-BERT.pth", source))
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)
    assert summary["missing"] == [] and summary["unexpected"] == ["lm_head.weight"]

    mae_like = PointBERT(**{**TINY, "encoder_dims": 32})  # Point-MAE: the encoder outputs the width
    state = {f"MAE_encoder.{k.replace('blocks.', 'blocks.blocks.', 1)}": v for k, v in mae_like.state_dict().items()
             if not k.startswith("cls_")}  # fmt: skip
    state["MAE_decoder.norm.weight"] = torch.ones(32)
    torch.save({"base_model": state}, tmp_path / "pretrain.pth")
    summary = load_pretrained(PointBERT(**{**TINY, "encoder_dims": 32}), tmp_path / "pretrain.pth")
    assert summary["missing"] == ["cls_pos", "cls_token"] and summary["unexpected"] == []
    with pytest.raises(ValueError, match="Point-MAE.*set encoder_dims to embed_dim"):
        load_pretrained(PointBERT(**TINY), tmp_path / "pretrain.pth")


def test_files_that_are_not_pretraining_checkpoints_are_refused(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "lightning.ckpt")
    with pytest.raises(ValueError, match="no `base_model`"):
        load_pretrained(PointBERT(**TINY), tmp_path / "lightning.ckpt")
    torch.save({"base_model": {"module.backbone.x": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="neither Point-BERT's"):
        load_pretrained(PointBERT(**TINY), tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError, match="Point-BERT.pth"):
        load_pretrained(PointBERT(**TINY), tmp_path / "missing.pth")


# -- data -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["obj_bg", "obj_only", "hardest"])
def test_scanobjectnn_variants_read_the_official_files(scanobjectnn_root, variant):
    data = ScanObjectNNDataModule(scanobjectnn_root, variant, batch_size=4, num_workers=0, num_points=256)
    assert data.num_classes == 15 and data.classes[0] == "bag" and data.classes[-1] == "toilet"
    train, val, test = data.dataset("train"), data.dataset("val"), data.dataset("test")
    assert (len(train), len(val), len(test)) == (27, 3, 15)  # 10 % of train held out to validate
    assert not set(train.ids) & set(val.ids) and val.ids[0].startswith(f"{variant}/train/")
    everything = ScanObjectNNDataModule(scanobjectnn_root, variant, num_workers=0, val_fraction=0.0)
    assert len(everything.dataset("train")) == 30 and everything.dataset("val") is everything.dataset("test")
    assert train[0]["points"].shape == (2048, 3) and test.ids[0] == f"{variant}/test/0"
    assert sorted(set(train.labels)) == list(range(15))
    assert not torch.equal(train[0]["points"], train[0]["points"])  # training permutes the points
    assert torch.equal(test[0]["points"], test[0]["points"])


def test_scanobjectnn_bad_input_is_a_clear_error(scanobjectnn_root, tmp_path):
    with pytest.raises(ValueError, match="Unknown ScanObjectNN variant 'pb_t50'"):
        ScanObjectNNDataModule(scanobjectnn_root, "pb_t50")
    with pytest.raises(DatasetNotFoundError, match=r"missing main_split_nobg/training_objectdataset.h5.*hkust-vgd"):
        ScanObjectNNDataModule(tmp_path, "obj_only")
    root = Path(shutil.copytree(scanobjectnn_root, tmp_path / "copy"))
    with h5py.File(root / "main_split" / "test_objectdataset.h5", "w") as file:
        file.create_dataset("data", data=np.zeros((4, 2048, 6), dtype=np.float32))  # with normals: wrong
        file.create_dataset("label", data=np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match=r"`data` must be \[N, points, 3\]"):
        ScanObjectNNDataModule(root, "obj_bg").dataset("test")
    (root / "main_split" / "training_objectdataset.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="is not a ScanObjectNN h5 file"):
        ScanObjectNNDataModule(root, "obj_bg").dataset("train")


def test_modelnet40_is_resampled_once_into_a_safe_cache(modelnet40_root, monkeypatch):
    data = ModelNet40DataModule(
        modelnet40_root, cache_points=256, num_points=128, batch_size=2, num_workers=0, val_fraction=0.0
    )
    assert data.num_classes == 40
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        train = data.dataset("train")  # the cache built in this process (num_workers=0) ...
        assert torch.get_num_threads() == 2  # ... leaves the training process's thread count alone
    finally:
        torch.set_num_threads(threads)
    cache = modelnet40_root / "modelnet40_train_256pts_kernelfps.safetensors"
    assert cache.is_file() and len(train) == 9 and train.points.shape == (9, 256, 3)
    assert train.ids[3].startswith("night_stand_") and train.labels[3] == data.classes.index("night_stand")
    norms = train.points.norm(dim=-1)
    assert torch.allclose(norms.amax(dim=1), torch.ones(9)) and train.points.mean(dim=1).abs().max() < 1e-5
    # The cached clouds are the FPS of each shape file, normalised.
    raw = np.loadtxt(modelnet40_root / "airplane" / f"{train.ids[0]}.txt", delimiter=",", dtype=np.float32)[:, :3]
    chosen = raw[brute_force_fps(raw.astype(np.float64), 256)]
    chosen = (chosen - chosen.mean(0)) / np.linalg.norm(chosen - chosen.mean(0), axis=1).max()
    np.testing.assert_allclose(train.points[0].numpy(), chosen, atol=1e-5)

    monkeypatch.setattr(ModelNet40DataModule, "build_cache", lambda *a: pytest.fail("rebuilt the cache"))
    again = ModelNet40DataModule(modelnet40_root, cache_points=256, num_points=128, num_workers=0, val_fraction=0.0)
    again = again.dataset("train")
    assert torch.equal(again.points, train.points) and again.ids == train.ids
    assert not (modelnet40_root / "modelnet40_train_512pts_kernelfps.safetensors").exists()  # other count, other key


def test_a_malformed_modelnet40_shape_file_is_named(modelnet40_root):
    broken = modelnet40_root / "night_stand" / "night_stand_0004.txt"
    broken.write_text("0.1,0.2,0.3\n")  # 3 columns, not 6
    data = ModelNet40DataModule(modelnet40_root, cache_points=256, num_points=128, num_workers=0)
    with pytest.raises(ValueError, match=rf"{broken} is not a ModelNet40 shape"):
        data.dataset("train")
    assert not list(modelnet40_root.glob("*.safetensors"))  # no cache is written from a partial build


def test_modelnet40_refuses_pickled_caches_unless_trusted(modelnet40_root):
    clouds = [np.random.default_rng(0).normal(size=(300, 6)).astype(np.float32) for _ in range(6)]
    with open(modelnet40_root / "modelnet40_test_8192pts_fps.dat", "wb") as file:
        pickle.dump((clouds, [np.array([0])] * 6), file)
    for name in WITH_SHAPES:
        shutil.rmtree(modelnet40_root / name)
    data = ModelNet40DataModule(modelnet40_root, cache_points=256, num_points=128, num_workers=0)
    with pytest.raises(DatasetNotFoundError, match=r"pickle.*modelnet40_normal_resampled.zip.*trust_pickled_cache"):
        data.dataset("test")
    trusted = ModelNet40DataModule(
        modelnet40_root, cache_points=256, num_points=128, num_workers=0, trust_pickled_cache=True
    ).dataset("test")
    assert trusted.points.shape == (6, 256, 3)
    with pytest.raises(DatasetNotFoundError, match=r"e\.g\. airplane/airplane_0001.txt"):
        data.dataset("train")  # no pickle for train: the missing shape file is named


def test_training_views_sample_and_augment_like_point_bert(scanobjectnn_root):
    assert (sample_count(1024, 2048), sample_count(4096, 8192), sample_count(8192, 8192)) == (1200, 4800, 8192)
    data = ScanObjectNNDataModule(scanobjectnn_root, batch_size=4, num_workers=0, num_points=256, test_votes=3)
    clouds = torch.stack([data.dataset("test")[i]["points"] for i in range(4)])
    views = data.random_views(clouds, 5)
    assert views.shape == (4, 5, 256, 3)
    # Scale in [2/3, 3/2] and shift in [-0.2, 0.2] per axis: the extent stays within the scaled bounds.
    extent = clouds.abs().amax(dim=1)[:, None]
    assert (views.abs().amax(dim=2) <= extent * 1.5 + 0.2 + 1e-5).all()
    assert not torch.equal(views[:, 0], views[:, 1])
    evaluation = data.on_after_batch_transfer({"points": clouds}, 0)["points"]  # no trainer: evaluation
    torch.testing.assert_close(evaluation, gather_points(clouds, farthest_point_sample(clouds, 256)))


# -- the task -------------------------------------------------------------------------------------
def tiny_model(checkpoint, **kwargs) -> PointCloudClassifier:
    llm = kwargs.pop("llm", LLMConfig(checkpoint=str(checkpoint)))
    return PointCloudClassifier(num_classes=15, **TINY, llm=llm, **kwargs)


def test_block_sits_after_the_last_block_before_the_final_norm(tiny_llama_checkpoint):
    model = tiny_model(tiny_llama_checkpoint).eval()
    points = torch.randn(2, 128, 3)
    seen = {}
    model.model.backbone.norm.register_forward_pre_hook(lambda m, args: seen.__setitem__("norm_input", args[0]))
    with torch.no_grad():
        logits = model(points)
        backbone = model.model.backbone
        groups, centres = backbone.group(points)
        x = torch.cat([backbone.cls_token.expand(2, -1, -1), backbone.reduce_dim(backbone.encoder(groups))], 1)
        pos = torch.cat([backbone.cls_pos.expand(2, -1, -1), backbone.pos_embed(centres)], 1)
        for block in backbone.blocks:
            x = block.forward(x + pos)
        x = model.model.llm_block(x)
        torch.testing.assert_close(seen["norm_input"], x)
        tokens = backbone.norm(x)
        expected = model.model.head(torch.cat([tokens[:, 0], tokens[:, 1:].max(1).values], -1))
    torch.testing.assert_close(logits, expected)


def test_reference_parameter_groups(tiny_llama_checkpoint):
    model = tiny_model(tiny_llama_checkpoint)
    groups = model.optimizer_parameters(lr=1.0, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    by_lr = {g["lr"]: ({names[id(p)] for p in g["params"]}, g["weight_decay"]) for g in groups}
    no_decay, adapters, decay = by_lr[0.1], by_lr[0.5], by_lr[1.0]
    assert adapters == ({"model.llm_block.adapter_in.weight", "model.llm_block.adapter_out.weight"}, 0.0)
    assert {"model.backbone.cls_token", "model.backbone.norm.weight", "model.head.0.bias"} <= no_decay[0] and no_decay[1] == 0.0
    assert "model.backbone.cls_pos" in decay[0] and "model.backbone.blocks.0.attn.qkv.weight" in decay[0] and decay[1] == 0.05
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert no_decay[0] | adapters[0] | decay[0] == trainable
    assert not any(n.startswith("model.llm_block.layers") for n in trainable)


def test_schedule_steps_per_epoch(tiny_llama_checkpoint, scanobjectnn_root):
    model = tiny_model(tiny_llama_checkpoint, warmup_epochs=2, lr=1e-3, min_lr=1e-6, warmup_lr=1e-6)
    seen = []

    class Record(lightning.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.current_epoch, [g["lr"] for g in trainer.optimizers[0].param_groups]))

    trainer = lightning.Trainer(
        max_epochs=5, limit_train_batches=2, limit_val_batches=0, accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()],
    )  # fmt: skip
    trainer.fit(model, ScanObjectNNDataModule(scanobjectnn_root, batch_size=8, num_workers=0, num_points=128))
    lrs = {epoch: lr for epoch, lr in seen}
    assert [lr for epoch, lr in seen[::2]] == [lr for epoch, lr in seen[1::2]]  # constant within an epoch
    assert lrs[0] == pytest.approx([1e-6] * 3)  # warmup from warmup_lr, every group
    assert lrs[2] == pytest.approx([1e-4, 5e-4, 1e-3])  # the groups' own lr after 2 warmup epochs
    assert lrs[1][2] == pytest.approx((1e-6 + 1e-3) / 2) and lrs[4][2] < lrs[3][2] < lrs[2][2]


def test_fit_validate_test_with_votes_and_predict_through_the_cli(tmp_path, scanobjectnn_root, tiny_llama_checkpoint):
    args = ["--data.root", str(scanobjectnn_root), "--model.llm.checkpoint", str(tiny_llama_checkpoint)]
    fit = run_cli("fit", "pointcloud_llama", tmp_path, *args)
    assert fit.trainer.current_epoch == 2 and fit.trainer.callback_metrics["train_loss"].isfinite()
    ckpt = last_checkpoint(tmp_path)
    assert not [k for k in torch.load(ckpt, weights_only=True)["state_dict"] if k.startswith("model.llm_block.layers")]
    validate = run_cli("validate", "pointcloud_llama", tmp_path, *args, "--ckpt_path", str(ckpt))
    assert 0 <= validate.trainer.callback_metrics["val_acc1"] <= 1
    test = run_cli("test", "pointcloud_llama", tmp_path, *args, "--ckpt_path", str(ckpt), "--trainer.limit_test_batches", "null")
    metrics = test.trainer.callback_metrics
    assert {"test_acc1", "test_vote_acc1"} <= set(metrics) and 0 <= metrics["test_vote_acc1"] <= 1
    output = tmp_path / "predictions.csv"
    run_cli("predict", "pointcloud_llama", tmp_path, *args, "--ckpt_path", str(ckpt), "--predictions.output", str(output))
    rows = list(csv.DictReader(output.open()))
    assert len(rows) == 15 and json.loads(rows[0]["class_names"])[0] in ScanObjectNNDataModule.classes


def test_gcr_and_baseline_through_the_cli_and_analyses_on_group_tokens(
    tmp_path, scanobjectnn_root, tiny_llama_checkpoint, capsys
):
    args = ["--data.root", str(scanobjectnn_root), "--model.llm.checkpoint", str(tiny_llama_checkpoint)]
    gcr = run_cli("fit", "pointcloud_llama", tmp_path / "gcr", *args, "--model.llm.mode", "auxiliary")
    metrics = gcr.trainer.callback_metrics
    assert metrics["train_loss_aux"].isfinite() and metrics["train_loss_main"].isfinite()
    model = gcr.model.eval()
    points = torch.randn(2, 128, 3)
    with torch.no_grad():
        plain = model.model.head(model.model.pool(model.model.backbone.forward_features(points)))
        model.model.llm_block.forward = lambda *a, **k: pytest.fail("the LM block ran at inference in auxiliary mode")
        torch.testing.assert_close(model(points), plain)
        del model.model.llm_block.forward

    maps = stage_maps(model, points)  # GCR: the block runs on the tapped tokens for the maps
    assert set(maps) == {"vit", "adapter_in", "attention", "ffn", "adapter_out", "cls_attention"}
    for kinds in maps.values():
        for values in kinds.values():
            assert values.shape == (2, 16) and values.min() >= 0 and values.max() <= 1  # one value per group

    rows = rank_layers(
        str(tiny_llama_checkpoint), checkpoint=str(last_checkpoint(tmp_path / "gcr")), position=-1, layers=[0, 5],
        data=ScanObjectNNDataModule(scanobjectnn_root, num_points=128, num_workers=0), num_images=4, quiet=True,
    )  # fmt: skip
    assert [r["layer"] for r in sorted(rows, key=lambda r: r["layer"])] == [0, 5]
    assert all(0 <= r["cka"] <= 1 for r in rows)
    run([
        "rank-layers", "--lm_checkpoint", str(tiny_llama_checkpoint), "--checkpoint", str(last_checkpoint(tmp_path / "gcr")),
        "--data", "frozenlm.data.ScanObjectNNDataModule", "--data.root", str(scanobjectnn_root),
        "--data.num_points", "128", "--data.num_workers", "0", "--layers", "[0, 5]", "--num_images", "4",
    ])  # fmt: skip
    assert "Point-BERT block 1 (the last: its own output)" in " ".join(capsys.readouterr().out.split())

    baseline = run_cli("fit", "pointcloud_llama", tmp_path / "baseline", *args[:2], "--model.llm", "null")
    assert baseline.model.model.llm_block is None and baseline.trainer.callback_metrics["train_loss"].isfinite()


def test_lora_block_through_the_cli(tmp_path, scanobjectnn_root, tiny_llama_checkpoint):
    check_lora_round_trip("pointcloud_llama", tmp_path, "--data.root", str(scanobjectnn_root), "--model.llm.checkpoint", str(tiny_llama_checkpoint))


@pytest.mark.parametrize("row", ["nan,0.1,0.2,0,0,1", "0.1,inf,0.2,0,0,1", "0.1,-inf,nan,0,0,1"])
def test_a_modelnet40_shape_with_nonfinite_coordinates_is_named_and_never_trained_on(modelnet40_root, row):
    broken = modelnet40_root / "airplane" / "airplane_0002.txt"
    lines = broken.read_text().splitlines()
    broken.write_text("\n".join(lines[:7] + [row] + lines[8:]) + "\n")
    data = ModelNet40DataModule(modelnet40_root, cache_points=256, num_points=128, num_workers=0)
    with pytest.raises(DatasetFileError, match=rf"{broken}, line 8: NaN or infinite coordinates \(1 rows\)"):
        data.dataset("train")
    assert not list(modelnet40_root.glob("*.safetensors"))


def test_a_modelnet40_token_that_is_not_a_number_is_named_with_its_line(modelnet40_root):
    broken = modelnet40_root / "night_stand" / "night_stand_0005.txt"
    lines = broken.read_text().splitlines()
    broken.write_text("\n".join(lines[:2] + ["0.1,0.2,abc,0,0,1"] + lines[3:]) + "\n")
    with pytest.raises(DatasetFileError, match=rf"{broken}, line 3: 'abc' is not a number"):
        ModelNet40DataModule(modelnet40_root, cache_points=256, num_points=128, num_workers=2).dataset("train")


def test_modelnet40_cache_follows_its_shape_files(modelnet40_root, capsys):
    def load():
        data = ModelNet40DataModule(modelnet40_root, cache_points=256, num_points=128, num_workers=0, val_fraction=0.0)
        return data.dataset("train")

    first = load()
    shape = modelnet40_root / "airplane" / f"{first.ids[1]}.txt"
    rows = np.loadtxt(shape, delimiter=",")
    rows[:, :3] *= 2.0  # the shape is replaced (normalisation is scale-free, so move one point too)
    rows[0, :3] += 5.0
    np.savetxt(shape, rows, fmt="%.6f", delimiter=",")
    second = load()
    assert "1 of 9 train shapes changed since" in capsys.readouterr().out
    assert not torch.equal(second.points[1], first.points[1])
    assert torch.equal(second.points[[0, *range(2, 9)]], first.points[[0, *range(2, 9)]])  # only that shape redone

    cache = modelnet40_root / "modelnet40_train_256pts_kernelfps.safetensors"
    cache.write_bytes(cache.read_bytes()[:500])  # truncated by a full disk or a copy cut short
    third = load()
    assert f"the cache {cache} is damaged" in capsys.readouterr().out and torch.equal(third.points, second.points)


def test_empty_modelnet40_and_scanobjectnn_splits_are_named(modelnet40_root, scanobjectnn_root, tmp_path):
    (modelnet40_root / "modelnet40_test.txt").write_text("\n")
    with pytest.raises(DatasetFileError, match=rf"{modelnet40_root / 'modelnet40_test.txt'} lists no shape ids"):
        ModelNet40DataModule(modelnet40_root, cache_points=256, num_points=128, num_workers=0).dataset("test")
    (modelnet40_root / "modelnet40_train.txt").write_text("airplane_0001\nhelicopter_0001\n")
    with pytest.raises(DatasetFileError, match=r"modelnet40_train.txt, entry 2: shape 'helicopter_0001' has class"):
        ModelNet40DataModule(modelnet40_root, cache_points=256, num_points=128, num_workers=0).dataset("train")

    root = Path(shutil.copytree(scanobjectnn_root, tmp_path / "empty"))
    with h5py.File(root / "main_split" / "test_objectdataset.h5", "w") as file:
        file.create_dataset("data", data=np.zeros((0, 2048, 3), dtype=np.float32))
        file.create_dataset("label", data=np.zeros(0, dtype=np.int64))
    with pytest.raises(DatasetFileError, match=r"test_objectdataset.h5 holds no clouds"):
        ScanObjectNNDataModule(root, "obj_bg", num_workers=0).dataset("test")


def reference_point_bert_transformer(model: PointBERT, points: torch.Tensor) -> torch.Tensor:
    """Point-BERT's transformer written from its definition (``models/Point_BERT.py``: ``Block``, ``Attention``,
    ``Mlp`` with ``norm_layer=nn.LayerNorm``), in plain tensor ops on ``model``'s weights: what its
    ``forward`` computes after the group encoder, ``x = block(x + pos)`` then the final norm."""
    state = model.state_dict()
    groups, centres = model.group(points)
    tokens = model.reduce_dim(model.encoder(groups))
    batch, width, heads = len(tokens), model.embed_dim, model.blocks[0].attn.num_heads
    x = torch.cat([state["cls_token"].expand(batch, -1, -1), tokens], dim=1)
    pos = torch.cat([state["cls_pos"].expand(batch, -1, -1), model.pos_embed(centres)], dim=1)

    def norm(t, name):
        return torch.nn.functional.layer_norm(t, (width,), state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-5)

    for i in range(len(model.blocks)):
        b = f"blocks.{i}"
        x = x + pos
        q, k, v = (norm(x, f"{b}.norm1") @ state[f"{b}.attn.qkv.weight"].T).reshape(batch, -1, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (width // heads) ** -0.5).softmax(dim=-1)
        x = x + (attn @ v).transpose(1, 2).reshape(batch, -1, width) @ state[f"{b}.attn.proj.weight"].T + state[f"{b}.attn.proj.bias"]
        hidden = torch.nn.functional.gelu(norm(x, f"{b}.norm2") @ state[f"{b}.mlp.fc1.weight"].T + state[f"{b}.mlp.fc1.bias"])
        x = x + hidden @ state[f"{b}.mlp.fc2.weight"].T + state[f"{b}.mlp.fc2.bias"]
    return norm(x, "norm")


def test_point_bert_matches_its_reference_definition_to_float64_precision():
    torch.manual_seed(0)
    model = PointBERT(**TINY).double().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # LayerNorm weights away from 1 and 0, so a changed eps shows
                param.copy_(torch.rand_like(param) + 0.5)
        points = torch.randn(2, 128, 3, dtype=torch.float64) * 0.01  # small inputs: variances near eps
        ours, reference = model.forward_features(points), reference_point_bert_transformer(model, points)
    assert (ours - reference).abs().max() < 1e-12  # timm's default eps (1e-6) is off by ~1e-4 here


@pytest.mark.parametrize("mode", ["inline", "auxiliary"])
def test_the_plain_model_has_no_hooks_and_returns_the_gcr_branch(tiny_llama_checkpoint, mode):
    hparams = {"num_classes": 15, **TINY, "drop_path_rate": 0.0, "llm_position": -2,
               "llm": {"checkpoint": str(tiny_llama_checkpoint), "mode": mode}}  # fmt: skip
    model = PointCloudClassifier.build_model(hparams)  # no task, no trainer
    assert isinstance(model, PointBERTClassifier) and model.llm_position == 0  # -2 of 2 blocks
    points = torch.randn(2, 128, 3)
    _, branch = check_branch(model, (points,), mode)
    for training in (True, False):  # the group encoder's batch norms differ
        model.train(training)
        with torch.no_grad():
            x, pos = model.backbone.embed(points)
            first = model.backbone.blocks[0](x + pos)  # the block runs after block 0, before block 1 adds the positions
            after = model.llm_block(first) if mode == "inline" else first
            expected = model.backbone.norm(model.backbone.blocks[1](after + pos))
            torch.testing.assert_close(model.forward_features(points)[0], expected)
            if branch is not None and training:
                torch.testing.assert_close(branch, model.llm_block(first))
                assert model.forward_aux_head(branch).shape == (2, 15)
    with pytest.raises(IndexError, match="llm_position 2 is out of range for a Point-BERT with 2 blocks"):
        PointCloudClassifier.build_model({**hparams, "llm_position": 2})
    assert hooked_modules(tiny_model(tiny_llama_checkpoint, llm=LLMConfig(checkpoint=str(tiny_llama_checkpoint), mode=mode))) == []


def test_the_point_major_group_encoder_is_point_berts_channel_major_one():
    """The encoder runs its kernel-1 convolutions as matmuls over [points, channels] rows: the same tokens,
    gradients and batch-norm running statistics as Point-BERT's Conv1d over [groups, channels, points]."""
    torch.manual_seed(0)
    encoder = PointBERT(**TINY).encoder.double()
    reference = copy.deepcopy(encoder)

    def channel_major(module, groups):  # Point-BERT's Encoder.forward
        batch, num_groups, size, _ = groups.shape
        local = module.first_conv(groups.reshape(batch * num_groups, size, 3).transpose(1, 2))
        pooled = local.max(dim=2, keepdim=True).values
        features = module.second_conv(torch.cat([pooled.expand(-1, -1, size), local], dim=1))
        return features.max(dim=2).values.reshape(batch, num_groups, -1)

    groups, weights = torch.randn(2, 5, 8, 3, dtype=torch.float64), torch.randn(2, 5, 24, dtype=torch.float64)
    ours, theirs = encoder(groups), channel_major(reference, groups)
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)
    for (name, p), q in zip(encoder.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-10, rtol=1e-10, msg=name)
    for a, b in zip(encoder.buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
