"""Known-answer tests of frozenlm.analysis: gradient coherence, linear CKA, activation maps, callback."""

from __future__ import annotations

import csv
import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from matplotlib.axes import Axes
from torch import nn
from torch.utils.data import DataLoader, Dataset

from frozenlm.analysis import (
    GradientCoherenceCallback,
    cls_attention_map,
    frequency_map,
    linear_cka,
    m_coherence,
    magnitude_map,
    mean_pairwise_cosine,
    minmax_normalize,
    overlay,
    per_sample_gradients,
    pseudo_mask_iou,
    to_patch_grid,
)
from frozenlm.analysis.callbacks import parameter_group

# ---------------------------------------------------------------- gradient coherence measures


def test_identical_gradients_give_m_and_cosine_one():
    m = 7
    gradients = torch.randn(1, 50).repeat(m, 1)
    assert m_coherence(gradients).item() == pytest.approx(m)
    assert mean_pairwise_cosine(gradients).item() == pytest.approx(1.0)


def test_orthogonal_rows_give_one_and_cosine_zero():
    gradients = torch.eye(5, 12) * torch.arange(1.0, 6.0)[:, None]  # orthogonal, unequal norms
    assert m_coherence(gradients).item() == pytest.approx(1.0)
    assert mean_pairwise_cosine(gradients).item() == pytest.approx(0.0)


def test_opposite_gradients_cancel():
    g = torch.randn(1, 10)
    gradients = torch.cat([g, -g])
    assert m_coherence(gradients).item() == pytest.approx(0.0, abs=1e-12)
    assert mean_pairwise_cosine(gradients).item() == pytest.approx(-1.0)


def test_equal_norm_rows_link_both_measures():
    # For unit rows: m-coherence = 1 + (m - 1) * mean cosine.
    m = 6
    gradients = F.normalize(torch.randn(m, 30, dtype=torch.float64), dim=1)
    expected = 1 + (m - 1) * mean_pairwise_cosine(gradients)
    assert m_coherence(gradients).item() == pytest.approx(expected.item())


def test_zero_rows_count_as_orthogonal_and_all_zero_is_nan():
    m = 5
    gradients = torch.randn(1, 8).repeat(m, 1)
    gradients[0] = 0
    assert m_coherence(gradients).item() == pytest.approx(m - 1)
    # Only the (m-1)(m-2) ordered pairs of non-zero rows have cosine 1.
    assert mean_pairwise_cosine(gradients).item() == pytest.approx((m - 1) * (m - 2) / (m * (m - 1)))
    assert math.isnan(m_coherence(torch.zeros(3, 4)).item())
    assert math.isnan(mean_pairwise_cosine(torch.zeros(3, 4)).item())


def test_measures_reject_bad_shapes():
    with pytest.raises(ValueError):
        mean_pairwise_cosine(torch.randn(1, 4))
    with pytest.raises(ValueError):
        m_coherence(torch.randn(4))


# ---------------------------------------------------------------- per-sample gradients


def test_one_hot_linear_model_has_orthogonal_per_sample_gradients():
    m, d = 4, 6
    weight = torch.randn(1, d)
    batch = {"x": torch.eye(m, d)}

    def loss_fn(params, sample):  # d(w . x)/dw = x: one-hot inputs give orthogonal gradients
        return (sample["x"] @ params["weight"].T).sum()

    gradients = per_sample_gradients(loss_fn, {"weight": weight}, batch)
    torch.testing.assert_close(gradients, torch.eye(m, d))
    assert m_coherence(gradients).item() == pytest.approx(1.0)
    assert mean_pairwise_cosine(gradients).item() == pytest.approx(0.0)


def test_per_sample_gradients_match_autograd_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    params = {name: p.detach() for name, p in model.named_parameters()}
    batch = {"x": torch.randn(4, 5), "y": torch.tensor([0, 2, 1, 2]), "ids": ["a", "b", "c", "d"]}

    def loss_fn(p, sample):
        assert sample["x"].shape == (1, 5) and "ids" not in sample
        return F.cross_entropy(torch.func.functional_call(model, p, (sample["x"],)), sample["y"])

    gradients = per_sample_gradients(loss_fn, params, batch)
    expected = []
    for i in range(4):
        loss = F.cross_entropy(model(batch["x"][i : i + 1]), batch["y"][i : i + 1])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        expected.append(torch.cat([g.flatten() for g in grads]))
    torch.testing.assert_close(gradients, torch.stack(expected))
    assert all(p.grad is None for p in model.parameters())


def test_per_sample_gradients_need_one_batch_size():
    with pytest.raises(ValueError, match="leading batch size"):
        per_sample_gradients(lambda p, s: p["w"].sum(), {"w": torch.ones(2)}, {"a": torch.ones(3), "b": torch.ones(4)})


# ---------------------------------------------------------------- linear CKA


def _random_orthogonal(d, generator):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    return q


def test_cka_identity_invariances_and_symmetry():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=generator)
    y = torch.randn(200, 24, generator=generator)
    y = y + x @ torch.randn(16, 24, generator=generator)  # correlated with x
    assert linear_cka(x, x).item() == pytest.approx(1.0)
    base = linear_cka(x, y).item()
    assert 0.0 < base < 1.0
    rotated = x.double() @ _random_orthogonal(16, generator)
    assert linear_cka(rotated * 3.5, y).item() == pytest.approx(base)
    assert linear_cka(x + 10.0, y).item() == pytest.approx(base)  # centring removes offsets
    assert linear_cka(y, x).item() == pytest.approx(base)


def test_cka_of_independent_features_is_near_zero():
    generator = torch.Generator().manual_seed(1)
    value = linear_cka(torch.randn(20000, 8, generator=generator), torch.randn(20000, 8, generator=generator))
    assert value.item() < 0.01
    assert value.dtype == torch.float64


def test_cka_tokens_are_samples_and_gram_form_matches():
    generator = torch.Generator().manual_seed(2)
    tokens_x = torch.randn(2, 5, 40, generator=generator)
    tokens_y = torch.randn(2, 5, 30, generator=generator)
    x, y = tokens_x.reshape(10, 40).double(), tokens_y.reshape(10, 30).double()
    # n = 10 < d: the Gram form is used; compare with the feature-space formula.
    x, y = x - x.mean(0), y - y.mean(0)
    expected = (y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm())
    assert linear_cka(tokens_x, tokens_y).item() == pytest.approx(expected.item())
    with pytest.raises(ValueError, match="same number of samples"):
        linear_cka(torch.randn(4, 3), torch.randn(5, 3))


# ---------------------------------------------------------------- activation maps


def test_constant_tokens_give_zero_maps():
    tokens = torch.randn(2, 1, 12).expand(2, 9, 12)
    torch.testing.assert_close(magnitude_map(tokens), torch.zeros(2, 9))
    torch.testing.assert_close(frequency_map(tokens), torch.zeros(2, 9))


def test_outlier_token_is_the_maximum():
    tokens = torch.randn(3, 16, 32) * 0.01
    tokens[torch.arange(3), torch.tensor([0, 7, 15])] += 5.0
    assert magnitude_map(tokens).argmax(dim=1).tolist() == [0, 7, 15]


def test_frequency_map_of_a_phase_outlier():
    tokens = torch.ones(1, 4, 8)  # FFT phase 0 everywhere
    tokens[0, 2] = -1.0  # DC phase pi, other bins 0
    frequency = frequency_map(tokens)
    assert frequency.argmax().item() == 2
    assert frequency[0, 2].item() == pytest.approx(math.pi * 3 / 4)


def test_minmax_normalize_range_per_image():
    maps = torch.randn(4, 3, 3) * torch.tensor([1.0, 10.0, 100.0, 0.0])[:, None, None]
    normalized = minmax_normalize(maps)
    for image in normalized[:3]:
        assert image.min().item() == 0.0 and image.max().item() == pytest.approx(1.0)
    assert torch.equal(normalized[3], torch.zeros(3, 3))  # constant map


def test_to_patch_grid_and_its_errors():
    maps = torch.arange(24.0).reshape(2, 12)
    assert to_patch_grid(maps, (3, 4))[1, 2, 1].item() == 12 + 2 * 4 + 1
    assert to_patch_grid(torch.zeros(2, 196)).shape == (2, 14, 14)
    with pytest.raises(ValueError, match="square"):
        to_patch_grid(torch.zeros(1, 197))
    with pytest.raises(ValueError, match="holds"):
        to_patch_grid(maps, (3, 3))


def test_pseudo_mask_iou():
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:6, 2:6] = True
    assert pseudo_mask_iou(mask.float(), mask) == (1.0, 0.1)
    # A ramp that covers the mask at t < 0.5 and half of it at t >= 0.5.
    activation = torch.zeros(8, 8)
    activation[2:6, 2:6] = 0.4
    activation[2:6, 2:4] = 0.8
    iou, threshold = pseudo_mask_iou(activation, mask)
    assert (iou, threshold) == (1.0, 0.1)
    iou_high, _ = pseudo_mask_iou(activation, mask, thresholds=(0.5, 0.6))
    assert iou_high == pytest.approx(0.5)
    # A 2x2 activation upsampled to the 8x8 mask.
    iou, _ = pseudo_mask_iou(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.ones(8, 8, dtype=torch.bool))
    assert 0.0 < iou < 1.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pseudo_mask_iou(torch.full((8, 8), 2.0), mask)


def test_cls_attention_map_averages_heads():
    attn = torch.softmax(torch.randn(2, 4, 5, 5), dim=-1)
    cls_map = cls_attention_map(attn)
    assert cls_map.shape == (2, 4)
    torch.testing.assert_close(cls_map, attn[:, :, 0, 1:].mean(1))
    assert cls_attention_map(attn, num_prefix_tokens=2).shape == (2, 3)


@pytest.mark.parametrize("image", [torch.rand(3, 32, 32), np.zeros((32, 32, 3), dtype=np.uint8)])
def test_overlay_draws_image_and_heat_map(image):
    ax = overlay(image, torch.rand(4, 4), alpha=0.4)
    assert isinstance(ax, Axes)
    layers = ax.get_images()
    assert len(layers) == 2 and layers[1].get_array().shape == (32, 32)
    assert layers[1].get_alpha() == 0.4


# ---------------------------------------------------------------- callback


class _DictDataset(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return {"x": self.x[index], "y": self.y[index], "id": f"sample-{index}"}


class _TinyClassifier(L.LightningModule):
    def __init__(self, in_features=6, classes=3):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(in_features, 8), nn.BatchNorm1d(8), nn.Dropout(0.5))
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(self.encoder(x))

    def probe_loss(self, batch):
        return F.cross_entropy(self(batch["x"]), batch["y"])

    def training_step(self, batch, batch_idx):
        return self.probe_loss(batch)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)


def _loader(identical=False, n=16):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=generator)
    y = torch.randint(0, 3, (n,), generator=generator)
    if identical:
        x, y = x[:1].expand(n, 6).clone(), y[:1].expand(n).clone()
    return DataLoader(_DictDataset(x, y), batch_size=8)


# The default log_every_n_steps=50 is kept on purpose: the callback must log at its own steps anyway.
fit_warnings = pytest.mark.filterwarnings("ignore:The number of training batches")


def _fit(tmp_path, callbacks, loader, max_steps=4):
    L.seed_everything(0, verbose=False)
    model = _TinyClassifier()
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        callbacks=callbacks,
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    return model, trainer


def _logged_rows(trainer):
    with open(f"{trainer.logger.log_dir}/metrics.csv") as handle:
        return list(csv.DictReader(handle))


@fit_warnings
def test_callback_logs_coherence_without_touching_training(tmp_path):
    callback = GradientCoherenceCallback(every_n_steps=2, probe_size=4)
    model, trainer = _fit(tmp_path / "with", [callback], _loader())
    reference, _ = _fit(tmp_path / "without", [], _loader())

    rows = _logged_rows(trainer)
    assert [int(row["step"]) for row in rows] == [0, 2, 4]
    for row in rows:
        assert 0.0 < float(row["grad_coherence/m_coherence"]) <= 4.0
        assert float(row["grad_coherence/m_coherence_normalized"]) == pytest.approx(
            float(row["grad_coherence/m_coherence"]) / 4
        )
        assert -1.0 <= float(row["grad_coherence/mean_cosine"]) <= 1.0
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p, p_ref, msg=name)
        torch.testing.assert_close(p.grad, p_ref.grad, msg=name)
    for name, b in model.named_buffers():
        torch.testing.assert_close(b, reference.get_buffer(name), msg=name)


@fit_warnings
def test_callback_gives_m_for_identical_samples(tmp_path):
    callback = GradientCoherenceCallback(every_n_steps=1, probe_size=5, parameters="per_block")
    _, trainer = _fit(tmp_path, [callback], _loader(identical=True), max_steps=2)
    rows = _logged_rows(trainer)
    assert len(rows) == 3
    for row in rows:
        for group in ("", "encoder.0/", "encoder.1/", "head/"):
            assert float(row[f"grad_coherence/{group}m_coherence"]) == pytest.approx(5.0)
            assert float(row[f"grad_coherence/{group}mean_cosine"]) == pytest.approx(1.0)


def test_measure_keeps_grads_and_module_modes():
    model = _TinyClassifier()
    model.train()
    model.encoder[2].eval()  # a submodule deliberately kept in eval mode
    modes = {name: module.training for name, module in model.named_modules()}
    grads = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.grad = grads[name].clone()
    batch = next(iter(_loader()))
    metrics = GradientCoherenceCallback(parameters=["head"]).measure(model, batch)
    assert set(metrics) == {f"grad_coherence/{key}" for key in ("m_coherence", "m_coherence_normalized", "mean_cosine")}
    assert {name: module.training for name, module in model.named_modules()} == modes
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name])

    model.eval()  # reference: an autograd loop over the samples, in eval mode like the callback
    rows = []
    for i in range(len(batch["y"])):
        loss = model.probe_loss({"x": batch["x"][i : i + 1], "y": batch["y"][i : i + 1]})
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.head.parameters()))]))
    expected = torch.stack(rows)
    assert metrics["grad_coherence/m_coherence"] == pytest.approx(m_coherence(expected).item())
    assert metrics["grad_coherence/mean_cosine"] == pytest.approx(mean_pairwise_cosine(expected).item())


def test_parameter_selection_errors_and_groups():
    model = _TinyClassifier()
    with pytest.raises(ValueError, match="max_params"):
        GradientCoherenceCallback(max_params=10).select_parameters(model)
    with pytest.raises(ValueError, match="no parameters"):
        GradientCoherenceCallback(parameters=["encoder.00"]).select_parameters(model)
    assert list(GradientCoherenceCallback(parameters=["encoder.0"]).select_parameters(model)) == [
        "encoder.0.weight",
        "encoder.0.bias",
    ]
    assert parameter_group("model.blocks.3.attn.qkv.weight") == "model.blocks.3"
    assert parameter_group("model.head.weight") == "model.head"
    assert parameter_group("cls_token") == "cls_token"
    with pytest.raises(ValueError, match="parameters must be"):
        GradientCoherenceCallback(parameters="all")
