"""FrozenLMMixin in a real Lightning loop: optimizer groups, lean and self-contained checkpoints, restore."""

from __future__ import annotations

import io
import pickle
import shutil
from pathlib import Path

import lightning
import pytest
import torch
import torch.nn as nn
from lightning.fabric.utilities.cloud_io import _load as pl_load
from torch.utils.data import DataLoader, TensorDataset

from frozenlm.llm.block import FrozenLMBlock, apply_block
from frozenlm.llm.mixin import CHECKPOINT_KEY, FrozenLMMixin, create_block

IN, DIM, CLASSES, LENGTH = 8, 16, 3, 6

# Frozen layers stay in eval mode on purpose; Lightning warns about that at every fit.
pytestmark = pytest.mark.filterwarnings("ignore:Found .* module\\(s\\) in eval mode")


class TokenPrefix(nn.Module):
    """A learned CLS-like token declared through timm's ``no_weight_decay()`` convention."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.scale = nn.Parameter(torch.ones(dim, dim))  # a matrix: decayed

    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens @ self.scale], dim=1)


class TinyTask(FrozenLMMixin, lightning.LightningModule):
    """Linear token embedding -> CLS prefix -> frozen LM block -> norm -> mean pool -> linear head."""

    def __init__(self, llm: dict | None = None, lr: float = 1e-2, weight_decay: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Linear(IN, DIM)
        self.prefix = TokenPrefix(DIM)
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, CLASSES)
        self.build_block()

    def build_block(self) -> None:
        self.llm_block = create_block(self.hparams.llm, in_dim=DIM)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.prefix(self.embed(x))
        mask = torch.cat([padding_mask.new_zeros(len(x), 1), padding_mask], dim=1)
        tokens = self.norm(apply_block(self.llm_block, tokens, mask)[0])
        keep = (~mask).unsqueeze(-1).to(tokens.dtype)
        return self.head((tokens * keep).sum(1) / keep.sum(1))

    def training_step(self, batch, batch_idx):
        x, mask, y = batch
        return nn.functional.cross_entropy(self(x, mask), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.trainable_parameter_groups(self.hparams.weight_decay), lr=self.hparams.lr)


class LazyTinyTask(TinyTask):
    """Builds the block in ``configure_model`` (Lightning's hook for large or sharded models)."""

    def build_block(self) -> None:
        self.llm_block = None

    def configure_model(self) -> None:
        if self.llm_block is None:
            super().build_block()


def make_loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, LENGTH, IN, generator=generator)
    lengths = torch.randint(2, LENGTH + 1, (16,), generator=generator)
    mask = torch.arange(LENGTH)[None] >= lengths[:, None]
    y = torch.randint(0, CLASSES, (16,), generator=generator)
    return DataLoader(TensorDataset(x, mask, y), batch_size=4)


def make_trainer(root: Path, max_steps: int = 2) -> lightning.Trainer:
    return lightning.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root,
    )  # fmt: skip


def fit(model: TinyTask, root: Path, max_steps: int = 2) -> tuple[lightning.Trainer, Path]:
    torch.manual_seed(0)
    trainer = make_trainer(root, max_steps)
    trainer.fit(model, make_loader())
    path = root / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return trainer, path


@torch.no_grad()
def outputs(model: TinyTask) -> torch.Tensor:
    x, mask, _ = next(iter(make_loader()))
    return model.eval()(x, mask)


def llm(folder: Path, **kwargs) -> dict:
    return {"checkpoint": str(folder), "layers": [-1], **kwargs}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_checkpoint):
    """A TinyTask with the last layer of the tiny LLaMA, fit for 2 steps, and its checkpoint."""
    root = tmp_path_factory.mktemp("tiny_task")
    model = TinyTask(llm=llm(tiny_llama_checkpoint))
    before = {k: v.clone() for k, v in model.llm_block.layers.state_dict().items()}
    calls = []
    handle = model.llm_block.register_forward_hook(lambda module, args, out: calls.append(args[1]))
    trainer, path = fit(model, root)
    handle.remove()
    assert len(calls) == 2 and all(mask is not None and mask.any() for mask in calls)  # the block ran, masked
    return model, trainer, path, before


# -- training ----------------------------------------------------------------------------------------
def test_training_leaves_the_frozen_block_untouched(trained):
    model, trainer, _, before = trained
    assert trainer.global_step == 2
    after = model.llm_block.layers.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not model.llm_block.layers.training  # still in eval mode after Lightning's train()


def test_optimizer_holds_no_frozen_parameter(trained):
    model, trainer, _, _ = trained
    (optimizer,) = trainer.optimizers
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    frozen = {id(p) for p in model.llm_block.layers.parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert frozen and not in_optimizer & frozen
    assert in_optimizer == trainable
    assert {id(p) for p in model.llm_block.adapter_in.parameters()} <= in_optimizer


def test_weight_decay_groups(tiny_llama_checkpoint):
    model = TinyTask(llm=llm(tiny_llama_checkpoint), weight_decay=0.05)
    assert model.no_weight_decay() == {"prefix.cls_token"}
    groups = model.trainable_parameter_groups(0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decay == {
        "embed.weight", "prefix.scale", "head.weight", "llm_block.adapter_in.weight", "llm_block.adapter_out.weight",
    }  # fmt: skip
    assert no_decay == {"embed.bias", "prefix.cls_token", "norm.weight", "norm.bias", "head.bias"}
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


# -- lean checkpoints (default) -------------------------------------------------------------------------
def test_checkpoint_stores_metadata_not_frozen_weights(trained, tiny_llama_checkpoint):
    model, _, path, _ = trained
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    keys = set(checkpoint["state_dict"])
    assert not any(k.startswith("llm_block.layers.") for k in keys)
    assert {"llm_block.adapter_in.weight", "llm_block.adapter_out.weight", "head.weight"} <= keys
    meta = checkpoint[CHECKPOINT_KEY]["llm_block"]
    assert meta["source"] == str(tiny_llama_checkpoint)
    assert meta["layers"] == [5] and meta["init"] == "pretrained" and meta["embedded"] is False
    assert meta["fingerprint"] == model.llm_block.fingerprint and len(meta["fingerprint"]) == 16
    assert meta["lm_config"]["model_type"] == "llama"
    # Optimizer state only for the trainable parameters.
    n_trainable = sum(p.requires_grad for p in model.parameters())
    assert len(checkpoint["optimizer_states"][0]["state"]) == n_trainable
    # The checkpoint is small: the frozen layer's bytes are not in it.
    layer_bytes = sum(p.numel() * p.element_size() for p in model.llm_block.layers.parameters())
    assert path.stat().st_size < layer_bytes


def test_load_from_checkpoint_restores_identical_outputs(trained):
    model, _, path, _ = trained
    restored = TinyTask.load_from_checkpoint(path)
    assert restored.llm_block.fingerprint == model.llm_block.fingerprint
    torch.testing.assert_close(outputs(restored), outputs(model), atol=0, rtol=0)
    assert not any(p.requires_grad for p in restored.llm_block.layers.parameters())


def test_load_from_a_file_object(trained, tmp_path, tiny_llama_checkpoint):
    """Lightning accepts file objects; so must the mixin's metadata read (no mmap there)."""
    model, _, path, _ = trained
    with open(path, "rb") as f:
        restored = TinyTask.load_from_checkpoint(io.BytesIO(f.read()))
    torch.testing.assert_close(outputs(restored), outputs(model), atol=0, rtol=0)
    embedded = TinyTask(llm=llm(tiny_llama_checkpoint, embed_weights=True))
    _, embedded_path = fit(embedded, tmp_path)
    restored = TinyTask.load_from_checkpoint(io.BytesIO(embedded_path.read_bytes()))
    torch.testing.assert_close(outputs(restored), outputs(embedded), atol=0, rtol=0)


EXECUTED = []


def mark_executed() -> None:
    EXECUTED.append("ran")


class Payload:
    """Unpickling this runs code (a module-level function, pickled by reference): what
    `weights_only=True` exists to refuse."""

    def __reduce__(self):
        return (mark_executed, ())


def test_weights_only_is_honoured(trained, tmp_path):
    model, _, path, _ = trained
    restored = TinyTask.load_from_checkpoint(path, weights_only=True)
    torch.testing.assert_close(outputs(restored), outputs(model), atol=0, rtol=0)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint["extra"] = Payload()
    torch.save(checkpoint, tmp_path / "unsafe.ckpt")
    EXECUTED.clear()
    with pytest.raises(pickle.UnpicklingError):
        TinyTask.load_from_checkpoint(tmp_path / "unsafe.ckpt", weights_only=True)
    assert EXECUTED == []
    torch.load(tmp_path / "unsafe.ckpt", weights_only=False)  # the payload is real
    assert EXECUTED == ["ran"]


class WritesMarker:
    """Unpickling this creates a file: a crafted checkpoint that runs code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_default_loading_is_as_strict_as_lightnings(trained, tmp_path):
    """`load_from_checkpoint(path)` with no `weights_only` reads the frozen-block metadata no more
    permissively than Lightning then reads the checkpoint: a crafted pickle never runs."""
    _, _, path, _ = trained
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    marker = tmp_path / "pwned"
    checkpoint["extra"] = WritesMarker(marker)
    torch.save(checkpoint, tmp_path / "crafted.ckpt")
    with pytest.raises(pickle.UnpicklingError):
        pl_load(tmp_path / "crafted.ckpt")  # Lightning's own loading refuses it...
    crafted = tmp_path / "crafted.ckpt"
    for source in (crafted, str(crafted), io.BytesIO(crafted.read_bytes())):
        with pytest.raises(pickle.UnpicklingError):
            TinyTask.load_from_checkpoint(source)  # ...and so does ours, for paths and file objects
        assert not marker.exists()
    torch.load(tmp_path / "crafted.ckpt", weights_only=False)  # the payload is real
    assert marker.exists()


def test_restoring_into_a_different_block_is_refused(tmp_path, trained, tiny_lm, tiny_llama_checkpoint):
    _, _, path, _ = trained
    with pytest.raises(ValueError, match=r"trained with the frozen block from .* layers \[5\].*configured block"):
        TinyTask.load_from_checkpoint(path, llm=llm(tiny_llama_checkpoint, layers=[-2]))
    # Same shapes and layer, other weights (another training run of the "same" model).
    other = tiny_lm("llama", seed=1)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"trained with the frozen block.*fingerprint"):
        TinyTask.load_from_checkpoint(path, llm=llm(tmp_path / "other"))
    with pytest.raises(ValueError, match=r"trained with the frozen block"):
        TinyTask.load_from_checkpoint(path, llm=llm(tiny_llama_checkpoint, init="random"))


def test_restore_after_the_source_moved(tmp_path, trained, tiny_llama_checkpoint):
    """The same weights from another folder (or the hub id of the same model) restore fine."""
    model, _, path, _ = trained
    moved = shutil.copytree(tiny_llama_checkpoint, tmp_path / "moved")
    restored = TinyTask.load_from_checkpoint(path, llm=llm(moved))
    torch.testing.assert_close(outputs(restored), outputs(model), atol=0, rtol=0)


def test_resume_training(tmp_path, trained, tiny_llama_checkpoint):
    _, _, path, _ = trained
    model = TinyTask(llm=llm(tiny_llama_checkpoint))
    trainer = make_trainer(tmp_path, max_steps=4)
    trainer.fit(model, make_loader(), ckpt_path=path)
    assert trainer.global_step == 4
    # The resumed optimizer still holds only the trainable parameters.
    frozen = {id(p) for p in model.llm_block.layers.parameters()}
    assert not frozen & {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}


def test_resume_with_another_block_is_refused(tmp_path, trained, tiny_llama_checkpoint):
    _, _, path, _ = trained
    model = TinyTask(llm=llm(tiny_llama_checkpoint, layers=[0]))
    with pytest.raises(ValueError, match="trained with the frozen block"):
        make_trainer(tmp_path, max_steps=4).fit(model, make_loader(), ckpt_path=path)


def test_random_init_restores_from_its_seed(tmp_path, tiny_llama_checkpoint):
    model = TinyTask(llm=llm(tiny_llama_checkpoint, init="random", seed=5))
    _, path = fit(model, tmp_path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    assert not any(k.startswith("llm_block.layers.") for k in checkpoint["state_dict"])
    assert checkpoint[CHECKPOINT_KEY]["llm_block"]["init"] == "random"
    restored = TinyTask.load_from_checkpoint(path)
    torch.testing.assert_close(outputs(restored), outputs(model), atol=0, rtol=0)
    with pytest.raises(ValueError, match="trained with the frozen block"):
        TinyTask.load_from_checkpoint(path, llm=llm(tiny_llama_checkpoint, init="random", seed=6))


# -- self-contained checkpoints (embed_weights) ---------------------------------------------------------
@pytest.mark.parametrize("task", [TinyTask, LazyTinyTask], ids=["init", "configure_model"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_embedded_weights_restore_without_the_source(tmp_path, tiny_llama_checkpoint, task, dtype):
    source = shutil.copytree(tiny_llama_checkpoint, tmp_path / "source")
    model = task(llm=llm(source, layers=[-2, -1], embed_weights=True, dtype=dtype))
    _, path = fit(model, tmp_path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    layer_keys = {k for k in checkpoint["state_dict"] if k.startswith("llm_block.layers.")}
    assert layer_keys == {f"llm_block.layers.{k}" for k in model.llm_block.layers.state_dict()}
    meta = checkpoint[CHECKPOINT_KEY]["llm_block"]
    assert meta["embedded"] is True and meta["layers"] == [4, 5] and meta["source"] == str(source)
    del checkpoint

    shutil.rmtree(source)
    restored = task.load_from_checkpoint(path)
    assert restored.llm_block.fingerprint == model.llm_block.fingerprint
    assert restored.llm_block.layer_indices == [4, 5]
    assert restored.llm_block.lm_dtype == getattr(torch, dtype)
    expected = model.llm_block.layers.state_dict()
    got = restored.llm_block.layers.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    assert not any(p.requires_grad for p in restored.llm_block.layers.parameters())
    torch.testing.assert_close(outputs(restored), outputs(model), atol=0, rtol=0)
    # Without the source, a lean restore has nothing to read from: the error names the folder.
    with pytest.raises(FileNotFoundError, match="does not exist"):
        task(llm=llm(source)).configure_model()


def test_lazy_block_lean_checkpoint_restores(tmp_path, tiny_llama_checkpoint):
    model = LazyTinyTask(llm=llm(tiny_llama_checkpoint))
    assert model.llm_block is None
    _, path = fit(model, tmp_path)
    restored = LazyTinyTask.load_from_checkpoint(path)
    torch.testing.assert_close(outputs(restored), outputs(model), atol=0, rtol=0)


# -- other configurations -----------------------------------------------------------------------------
def test_trainable_block_checkpoints_its_weights(tmp_path, tiny_llama_checkpoint):
    model = TinyTask(llm=llm(tiny_llama_checkpoint, trainable=True))
    before = {k: v.clone() for k, v in model.llm_block.layers.state_dict().items()}
    trainer, path = fit(model, tmp_path)
    in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in model.llm_block.layers.parameters()} <= in_optimizer
    after = model.llm_block.layers.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in before.items())  # it trained
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    assert any(k.startswith("llm_block.layers.") for k in checkpoint["state_dict"])
    assert checkpoint[CHECKPOINT_KEY] == {}
    restored = TinyTask.load_from_checkpoint(path)
    torch.testing.assert_close(outputs(restored), outputs(model), atol=0, rtol=0)


def test_mlp_ablation_and_no_block(tmp_path, tiny_llama_checkpoint):
    model = TinyTask(llm=llm(tiny_llama_checkpoint, replace_with_mlp=True))
    assert isinstance(model.llm_block, FrozenLMBlock) and model.llm_block.layers is None
    _, path = fit(model, tmp_path)
    torch.testing.assert_close(outputs(TinyTask.load_from_checkpoint(path)), outputs(model), atol=0, rtol=0)

    baseline = TinyTask(llm=None)
    assert baseline.llm_block is None and baseline.frozen_lm_blocks() == {}
    x = torch.randn(2, LENGTH, DIM)
    assert apply_block(baseline.llm_block, x)[0] is x
    assert outputs(baseline).shape == (4, CLASSES)
