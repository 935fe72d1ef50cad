"""SQA3D's task (frozenlm/tasks/sqa3d.py): ScanQA's losses against direct loops on small inputs, the batch-norm
momentum schedule, EM@1 per question type, and the CLI on the tiny SQA3D data (fit, validate, test, predict;
the same metrics on 1 and 2 processes)."""

from __future__ import annotations

import math

import pytest
import torch

from frozenlm.data.scannet import MEAN_SIZE
from frozenlm.tasks import scanqa_losses as L


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) <= 1.0 else abs(x) - 0.5


def log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    total = math.log(sum(math.exp(v - top) for v in row)) + top
    return [v - total for v in row]


def nearest(point, candidates, l1=False):
    """(distance, index) of the nearest candidate, the first on ties; squared Euclidean or L1."""
    dists = [sum(abs(p - c) if l1 else (p - c) ** 2 for p, c in zip(point, cand)) for cand in candidates]
    best = min(range(len(dists)), key=lambda i: (dists[i], i))
    return dists[best], best


def test_nn_distance_is_the_nearest_point_both_ways():
    a, b = torch.randn(2, 5, 3), torch.randn(2, 4, 3)
    for l1 in (False, True):
        dist1, idx1, dist2, idx2 = L.nn_distance(a, b, l1=l1)
        for s in range(2):
            for i in range(5):
                d, j = nearest(a[s, i].tolist(), b[s].tolist(), l1)
                assert dist1[s, i].item() == pytest.approx(d, rel=1e-5) and idx1[s, i].item() == j
            for j in range(4):
                d, i = nearest(b[s, j].tolist(), a[s].tolist(), l1)
                assert dist2[s, j].item() == pytest.approx(d, rel=1e-5) and idx2[s, j].item() == i


def test_vote_loss_is_the_l1_distance_to_the_nearest_of_three_votes_over_object_seeds():
    torch.manual_seed(0)
    B, N, S = 2, 12, 5
    seed_inds = torch.stack([torch.randperm(N)[:S] for _ in range(B)])
    seed_xyz, vote_xyz = torch.randn(B, S, 3), torch.randn(B, S, 3)
    vote_label, vote_label_mask = torch.randn(B, N, 9), (torch.rand(B, N) > 0.4).long()
    loss = L.vote_loss(seed_xyz, seed_inds, vote_xyz, vote_label, vote_label_mask)
    total, count = 0.0, 0
    for b in range(B):
        for s in range(S):
            point = seed_inds[b, s].item()
            if not vote_label_mask[b, point]:
                continue
            votes = [[seed_xyz[b, s, k].item() + vote_label[b, point, 3 * j + k].item() for k in range(3)] for j in range(3)]
            total += nearest(vote_xyz[b, s].tolist(), votes, l1=True)[0]
            count += 1
    assert count and loss.item() == pytest.approx(total / (count + 1e-6), rel=1e-5)


def test_objectness_labels_by_the_near_and_far_thresholds_and_weights_the_two_classes():
    """Aggregated votes 0.29, 0.31, 0.59 and 0.61 m from the only real box: object, not scored, not scored,
    non-object; the padding boxes sit at the origin, far from all four, as the reference pads them."""
    centre = torch.tensor([3.0, 2.0, 1.0])
    distances = [0.29, 0.31, 0.59, 0.61]
    votes = torch.stack([centre + torch.tensor([d, 0.0, 0.0]) for d in distances])[None]
    center_label = torch.zeros(1, 4, 3)
    center_label[0, 0] = centre
    scores = torch.randn(1, 4, 2)
    loss, label, mask, assignment = L.objectness_loss(votes, center_label, scores)
    assert label.tolist() == [[1, 0, 0, 0]] and mask.tolist() == [[1.0, 0.0, 0.0, 1.0]]
    assert assignment[0, 0].item() == 0
    expected = [-0.8 * log_softmax(scores[0, 0].tolist())[1], -0.2 * log_softmax(scores[0, 3].tolist())[0]]
    assert loss.item() == pytest.approx(sum(expected) / (2 + 1e-6), rel=1e-5)


def detection_inputs(seed: int = 0, B: int = 2, P: int = 6, K: int = 4, H: int = 2, S: int = 3, C: int = 3):
    """Random detection outputs and targets with VoteNet's shapes: P proposals, K boxes (the last padding)."""
    g = torch.Generator().manual_seed(seed)
    center_label = torch.randn(B, K, 3, generator=g)
    center_label[:, -1] = 0.0  # a padding row
    outputs = {
        "center": torch.randn(B, P, 3, generator=g),
        "heading_scores": torch.randn(B, P, H, generator=g),
        "heading_residuals_normalized": torch.randn(B, P, H, generator=g),
        "size_scores": torch.randn(B, P, S, generator=g),
        "size_residuals_normalized": torch.randn(B, P, S, 3, generator=g),
        "sem_cls_scores": torch.randn(B, P, C, generator=g),
    }
    batch = {
        "center_label": center_label,
        "heading_class_label": torch.randint(0, H, (B, K), generator=g),
        "heading_residual_label": torch.rand(B, K, generator=g),
        "size_class_label": torch.randint(0, S, (B, K), generator=g),
        "size_residual_label": torch.randn(B, K, 3, generator=g) * 0.5,
        "sem_cls_label": torch.randint(0, C, (B, K), generator=g),
        "box_label_mask": torch.tensor([[1.0] * (K - 1) + [0.0]] * B),
    }
    label = torch.randint(0, 2, (B, P), generator=g)
    assignment = torch.randint(0, K, (B, P), generator=g)
    mean_size = torch.rand(S, 3, generator=g) + 0.5
    return outputs, batch, label, assignment, mean_size


def test_box_and_semantic_losses_match_a_loop_over_proposals():
    outputs, batch, label, assignment, mean_size = detection_inputs()
    parts = L.box_losses(outputs, batch, label, assignment, mean_size)
    B, P, H = outputs["heading_scores"].shape
    K = batch["center_label"].shape[1]
    sums = dict.fromkeys(("center1", "heading_cls", "heading_reg", "size_cls", "size_reg", "sem_cls"), 0.0)
    center2, objects = 0.0, label.sum().item()
    for b in range(B):
        boxes = batch["center_label"][b].tolist()
        for p in range(P):
            if not label[b, p]:
                continue
            k = assignment[b, p].item()
            sums["center1"] += nearest(outputs["center"][b, p].tolist(), boxes)[0]
            hc, sc, cc = (batch[key][b, k].item() for key in ("heading_class_label", "size_class_label", "sem_cls_label"))
            sums["heading_cls"] -= log_softmax(outputs["heading_scores"][b, p].tolist())[hc]
            target = batch["heading_residual_label"][b, k].item() / (math.pi / H)
            sums["heading_reg"] += huber(outputs["heading_residuals_normalized"][b, p, hc].item() - target)
            sums["size_cls"] -= log_softmax(outputs["size_scores"][b, p].tolist())[sc]
            errors = [outputs["size_residuals_normalized"][b, p, sc, i].item()
                      - batch["size_residual_label"][b, k, i].item() / mean_size[sc, i].item() for i in range(3)]  # fmt: skip
            sums["size_reg"] += sum(huber(e) for e in errors) / 3
            sums["sem_cls"] -= log_softmax(outputs["sem_cls_scores"][b, p].tolist())[cc]
        for k in range(K):
            if batch["box_label_mask"][b, k]:
                center2 += nearest(boxes[k], outputs["center"][b].tolist())[0]
    real = batch["box_label_mask"].sum().item()
    expected = {name: total / (objects + 1e-6) for name, total in sums.items()}
    expected["center"] = expected.pop("center1") + center2 / (real + 1e-6)
    for name, value in expected.items():
        assert parts[name].item() == pytest.approx(value, rel=1e-5), name


def test_answer_loss_is_the_bce_summed_over_answers_over_the_batch():
    logits, targets = torch.randn(3, 5), torch.tensor([[0.0, 0.3, 0.0, 1.0, 0.0], [0.6, 0.0, 0.0, 0.0, 0.9], [0.0] * 5])
    total = 0.0
    for x, t in zip(logits.flatten().tolist(), targets.flatten().tolist()):
        sigma = 1 / (1 + math.exp(-x))
        total -= t * math.log(sigma) + (1 - t) * math.log(1 - sigma)
    assert L.answer_loss(logits, targets).item() == pytest.approx(total / 3, rel=1e-5)


def test_situation_loss_is_the_position_mse_plus_the_quaternion_mse():
    prediction, target = torch.randn(4, 7), torch.randn(4, 7)
    loss, position, rotation = L.situation_loss(prediction, target)
    pos = sum((prediction[b, i] - target[b, i]).item() ** 2 for b in range(4) for i in range(3)) / 12
    rot = sum((prediction[b, i] - target[b, i]).item() ** 2 for b in range(4) for i in range(3, 7)) / 16
    assert (position.item(), rotation.item()) == (pytest.approx(pos, rel=1e-5), pytest.approx(rot, rel=1e-5))
    assert loss.item() == pytest.approx(pos + rot, rel=1e-5)


def full_outputs(seed: int = 0, B: int = 2, N: int = 20, seeds: int = 8, P: int = 6, K: int = 4, answers: int = 5):
    outputs, batch, _, _, mean_size = detection_inputs(seed, B=B, P=P, K=K, H=1, S=3, C=3)
    g = torch.Generator().manual_seed(seed + 1)
    outputs.update({
        "seed_xyz": torch.randn(B, seeds, 3, generator=g), "seed_inds": torch.randint(0, N, (B, seeds), generator=g),
        "vote_xyz": torch.randn(B, seeds, 3, generator=g),
        "aggregated_vote_xyz": batch["center_label"].repeat(1, 2, 1)[:, :P] + 0.2 * torch.randn(B, P, 3, generator=g),
        "objectness_scores": torch.randn(B, P, 2, generator=g), "answer_scores": torch.randn(B, answers, generator=g),
        "situation_prediction": torch.randn(B, 7, generator=g),
    })  # fmt: skip
    batch.update({
        "vote_label": torch.randn(B, N, 9, generator=g), "vote_label_mask": torch.randint(0, 2, (B, N), generator=g),
        "answer_targets": torch.rand(B, answers, generator=g), "situation_target": torch.randn(B, 7, generator=g),
    })  # fmt: skip
    return outputs, batch, mean_size


def test_the_total_is_ten_times_the_references_weighted_sum():
    outputs, batch, mean_size = full_outputs()
    losses = L.scanqa_losses(outputs, batch, mean_size)
    objectness, label, _, assignment = L.objectness_loss(outputs["aggregated_vote_xyz"], batch["center_label"], outputs["objectness_scores"])
    assert 0 < label.sum() < label.numel()  # both kinds of proposals
    parts = L.box_losses(outputs, batch, label, assignment, mean_size)
    box = parts["center"] + 0.1 * parts["heading_cls"] + parts["heading_reg"] + 0.1 * parts["size_cls"] + parts["size_reg"]
    vote = L.vote_loss(outputs["seed_xyz"], outputs["seed_inds"], outputs["vote_xyz"], batch["vote_label"], batch["vote_label_mask"])
    answer = L.answer_loss(outputs["answer_scores"], batch["answer_targets"])
    aux = L.situation_loss(outputs["situation_prediction"], batch["situation_target"])[0]
    expected = 10 * (1.0 * vote + 0.5 * objectness + 1.0 * box + 0.1 * parts["sem_cls"] + 0.1 * answer + 0.1 * aux)
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses["box"].item() == pytest.approx(box.item(), rel=1e-6)

    del outputs["situation_prediction"]  # without the auxiliary head: no situation term
    assert L.scanqa_losses(outputs, batch, mean_size)["loss"].item() == pytest.approx((expected - 10 * 0.1 * aux).item(), rel=1e-6)


def test_the_losses_have_gradients_for_every_prediction():
    outputs, batch, mean_size = full_outputs()
    outputs = {k: v.requires_grad_() if v.is_floating_point() else v for k, v in outputs.items()}
    L.scanqa_losses(outputs, batch, mean_size)["loss"].backward()
    for key in ("vote_xyz", "objectness_scores", "center", "heading_residuals_normalized", "size_scores",
                "size_residuals_normalized", "sem_cls_scores", "answer_scores", "situation_prediction"):  # fmt: skip
        assert outputs[key].grad is not None and outputs[key].grad.abs().sum() > 0, key


# -- the task's recipe ------------------------------------------------------------------------------------------
TINY = dict(num_answers=7, num_points=256, sa_points=[64, 32, 16, 8], sa_nsamples=[8, 8, 8, 8], seed_feat_dim=32,
            proposal_size=32, num_proposals=8, vote_nsample=8, hidden_size=32, heads=2, ffn=64, flat_mlp_size=32,
            flat_out_size=64)  # fmt: skip


def test_bn_momentum_halves_every_20_epochs_down_to_0_001():
    from frozenlm.tasks.sqa3d import bn_momentum_at

    assert [bn_momentum_at(e) for e in (0, 19, 20, 39, 40, 79, 80, 180, 1000)] == [
        0.5, 0.5, 0.25, 0.25, 0.125, 0.0625, 0.03125, 0.001, 0.001]  # fmt: skip


def test_each_epoch_sets_the_references_momentum_on_every_batch_norm(monkeypatch):
    """The reference steps its schedule after each epoch from -1: epoch e trains with step max(e - 1, 0)."""
    from types import SimpleNamespace

    from frozenlm.tasks.sqa3d import SQA3DTask

    task = SQA3DTask(**TINY)
    norms = [m for m in task.model.modules() if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))]
    assert len(norms) > 10
    seen = {}
    with torch.random.fork_rng():
        for epoch in (0, 1, 20, 21, 40, 41):
            monkeypatch.setattr(task, "_trainer", SimpleNamespace(current_epoch=epoch, global_rank=0))
            task.on_train_epoch_start()
            seen[epoch] = {m.momentum for m in norms}
    assert seen == {0: {0.5}, 1: {0.5}, 20: {0.5}, 21: {0.25}, 40: {0.25}, 41: {0.125}}


def test_exact_match_overall_and_per_question_type():
    from frozenlm.tasks.sqa3d import ExactMatch

    metric = ExactMatch()
    # types: What What Is Is Is How Others Which; the last (-100: no answer in the vocabulary) is always wrong
    predicted = torch.tensor([3, 1, 0, 0, 2, 5, 4, 1])
    target = torch.tensor([3, 2, 0, 0, 1, 5, 4, -100])
    types = torch.tensor([0, 0, 1, 1, 1, 2, 5, 4])
    metric.update(predicted[:5], target[:5], types[:5])  # two batches
    metric.update(predicted[5:], target[5:], types[5:])
    result = {k: round(v.item(), 6) for k, v in metric.compute().items()}
    assert result == {"": round(5 / 8, 6), "_what": 0.5, "_is": round(2 / 3, 6), "_how": 1.0, "_which": 0.0, "_others": 1.0}


def test_gcr_adds_the_branchs_answer_loss_weighted_as_the_main_answer_loss(tiny_llama_checkpoint, monkeypatch):
    from frozenlm.tasks.sqa3d import SQA3DTask

    llm = {"checkpoint": str(tiny_llama_checkpoint), "layers": [-1], "mode": "auxiliary", "aux_weight": 0.3}
    task = SQA3DTask(**TINY, llm=llm).train()
    logged = {}
    monkeypatch.setattr(task, "log_dict", lambda values, **kwargs: logged.update(values))
    monkeypatch.setattr(task, "log", lambda name, value, **kwargs: logged.update({name: value}))
    monkeypatch.setattr(task, "finite_loss", lambda loss, batch, index: loss)
    batch = tiny_batch(B=2, N=256, answers=7)
    torch.manual_seed(0)
    loss = task.training_step(batch, 0)
    torch.manual_seed(0)  # the same dropout draws again
    outputs, branch = task.model(batch)
    main = L.scanqa_losses(outputs, batch, task.mean_size)["loss"]
    aux = 10 * 0.1 * L.answer_loss(task.model.forward_aux_head(branch, outputs), batch["answer_targets"])
    assert loss.item() == pytest.approx((main + 0.3 * aux).item(), rel=1e-5)
    assert logged["train_loss_aux"].item() == pytest.approx(aux.item(), rel=1e-5) and "train_loss_main" in logged


def tiny_batch(B: int, N: int, answers: int) -> dict[str, torch.Tensor]:
    """A batch of the datamodule's keys and shapes, random."""
    g = torch.Generator().manual_seed(0)
    return {
        "point_clouds": torch.randn(B, N, 7, generator=g), "situation_tokens": torch.randn(B, 5, 300, generator=g),
        "situation_lengths": torch.tensor([5, 3][:B]), "question_tokens": torch.randn(B, 6, 300, generator=g),
        "question_lengths": torch.tensor([6, 2][:B]), "answer_targets": torch.rand(B, answers, generator=g),
        "answer_class": torch.zeros(B, dtype=torch.long), "situation_target": torch.randn(B, 7, generator=g),
        "center_label": torch.randn(B, 128, 3, generator=g), "heading_class_label": torch.zeros(B, 128, dtype=torch.long),
        "heading_residual_label": torch.zeros(B, 128), "size_class_label": torch.randint(0, 18, (B, 128), generator=g),
        "size_residual_label": 0.1 * torch.randn(B, 128, 3, generator=g), "sem_cls_label": torch.randint(0, 18, (B, 128), generator=g),
        "box_label_mask": torch.ones(B, 128), "vote_label": torch.randn(B, N, 9, generator=g),
        "vote_label_mask": torch.randint(0, 2, (B, N), generator=g), "question_type": torch.zeros(B, dtype=torch.long),
        "question_id": torch.arange(B),
    }  # fmt: skip


def test_the_shipped_configs_are_the_references_recipe():
    import yaml

    from tests.cli_helpers import REPO

    for name in ("sqa3d_scanqa", "sqa3d_scanqa_llama"):
        config = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
        trainer, model, data = config["trainer"], config["model"]["init_args"], config["data"]["init_args"]
        assert (trainer["gradient_clip_val"], trainer["gradient_clip_algorithm"]) == (1.0, "value")
        assert (trainer["max_epochs"], trainer["val_check_interval"], trainer["check_val_every_n_epoch"]) == (50, 1000, None)
        assert (model["lr"], model["weight_decay"], model["optimizer"], data["batch_size"], data["num_points"]) == (
            5e-4, 1e-5, "adam", 16, 40000)  # fmt: skip
    assert yaml.safe_load((REPO / "configs/sqa3d_scanqa_llama.yaml").read_text())["model"]["init_args"]["llm"]["layers"] == [-1]


# -- the CLI on the tiny SQA3D -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sqa3d_fit(tmp_path_factory, tiny_llama_checkpoint):
    """The tiny SQA3D and a 2-epoch fit of the tiny config on it: ``(args, fit CLI, last checkpoint)``."""
    from tests.cli_helpers import last_checkpoint, run_cli
    from tests.data.sqa3d.data import write

    root = tmp_path_factory.mktemp("sqa3d")
    args = ["--data.root", str(write(root / "data").prepared), "--model.llm.checkpoint", str(tiny_llama_checkpoint)]
    fit = run_cli("fit", "sqa3d_llama", root / "fit", *args)
    return args, fit, last_checkpoint(root / "fit")


def test_fit_trains_with_adam_at_a_constant_lr_and_keeps_the_best_by_val_em1(sqa3d_fit):
    from lightning.pytorch.callbacks import ModelCheckpoint

    _, fit, _ = sqa3d_fit
    trainer, task = fit.trainer, fit.model
    (optimizer,) = trainer.optimizers
    assert type(optimizer) is torch.optim.Adam and not trainer.lr_scheduler_configs
    (group,) = optimizer.param_groups  # weight decay on every trainable parameter, biases and norms included
    assert (group["lr"], group["weight_decay"]) == (5e-4, 1e-5)  # after training: constant
    assert {id(p) for p in group["params"]} == {id(p) for p in task.parameters() if p.requires_grad}
    assert (trainer.gradient_clip_val, trainer.gradient_clip_algorithm) == (1.0, "value")
    best = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.monitor]
    assert [(c.monitor, c.mode) for c in best] == [("val_em1", "max")]
    from tests.data.sqa3d.data import QUESTIONS

    train_answers = {answer for split, *_, answer in QUESTIONS if split == "train"}
    assert task.hparams.num_answers == len(task.answers) == len(train_answers)  # linked from the data
    assert torch.equal(task.mean_size, torch.tensor(MEAN_SIZE, dtype=torch.float32))  # linked, ScanNet's
    for key in ("train_loss_vote", "train_loss_objectness", "train_loss_box", "train_loss_answer", "train_loss_aux", "val_em1"):
        assert torch.isfinite(trainer.callback_metrics[key]), key


def test_test_and_predict_from_the_checkpoint(sqa3d_fit, tmp_path):
    """Test scores the 5 test questions (2 without an answer in the vocabulary: wrong), and predict writes them,
    whose EM@1 per type is the one test logs."""
    import json

    from frozenlm.data.sqa3d import QUESTION_TYPES
    from tests.cli_helpers import run_cli

    args, _, checkpoint = sqa3d_fit
    ckpt = ["--ckpt_path", str(checkpoint)]
    test = run_cli("test", "sqa3d_llama", tmp_path, *args, *ckpt).trainer.callback_metrics
    output = tmp_path / "predictions.json"
    run_cli("predict", "sqa3d_llama", tmp_path, *args, *ckpt, "--predictions.output", str(output))
    rows = json.loads(output.read_text())
    assert len(rows) == 5 and [r["question_id"] for r in rows] == sorted(r["question_id"] for r in rows)
    assert sum(r["ground_truth"] is None for r in rows) == 2 and {r["question_type"] for r in rows} <= set(QUESTION_TYPES)
    right = [r["answer"] == r["ground_truth"] for r in rows]
    assert test["test_em1"].item() == pytest.approx(sum(right) / 5)
    for kind in {r["question_type"] for r in rows}:
        mine = [ok for ok, r in zip(right, rows) if r["question_type"] == kind]
        assert test[f"test_em1_{kind.lower()}"].item() == pytest.approx(sum(mine) / len(mine)), kind


@pytest.mark.slow
def test_2_processes_train_and_score_and_write_each_question_once(sqa3d_fit, tmp_path):
    """The fit's checkpoint validates as trained. A fit on 2 processes (gloo DDP on CPU); then the test metrics and the predictions file of its checkpoint on
    2 processes are those of 1 (5 test questions: one process's share padded with a repeat, never scored)."""
    import json

    from tests.cli_helpers import last_checkpoint, run_cli, run_cli_subprocess
    from tests.test_exact_evaluation import DDP, assert_same, metrics_on

    args, fit, checkpoint = sqa3d_fit
    validate = run_cli("validate", "sqa3d_llama", tmp_path / "validate", *args, "--ckpt_path", str(checkpoint))
    for key in ("val_em1", "val_answer_loss", "val_position_mse"):  # the restored model validates as trained
        assert validate.trainer.callback_metrics[key].item() == pytest.approx(fit.trainer.callback_metrics[key].item(), rel=1e-6)

    two = [*DDP, "--trainer.devices", "2"]
    result = run_cli_subprocess("fit", "sqa3d_llama", tmp_path / "fit2", *args, *two)
    assert result.returncode == 0, result.stderr[-3000:]
    common = [*args, "--ckpt_path", str(last_checkpoint(tmp_path / "fit2")), "--data.batch_size", "2"]
    metrics = [metrics_on(tmp_path, "test", "sqa3d_llama", n, *common) for n in (1, 2)]
    assert_same(metrics, ("test_em1",))
    assert {"test_em1", "test_answer_loss", "test_position_mse"} <= set(metrics[0])

    run_cli("predict", "sqa3d_llama", tmp_path / "predict1", *common, "--predictions.output", str(tmp_path / "one.json"))
    result = run_cli_subprocess("predict", "sqa3d_llama", tmp_path / "predict2", *common, "--predictions.output",
                                str(tmp_path / "two.json"), *two)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    one, two_rows = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert len(one) == 5 and two_rows == one


def test_a_constant_schedule_refuses_a_warmup():
    from frozenlm.tasks.sqa3d import SQA3DTask

    with pytest.raises(ValueError, match="constant.*warmup_epochs 0"):
        SQA3DTask(**TINY, warmup_epochs=1.0)


def test_create_model_builds_the_shipped_scanqa_without_lightning(tiny_llama_checkpoint):
    import lightning

    import frozenlm

    assert {"scanqa", "scanqa_llama"} <= set(frozenlm.list_models("scanqa*"))
    model = frozenlm.create_model("scanqa_llama", num_answers=706, llm={"checkpoint": str(tiny_llama_checkpoint)})
    assert not any(isinstance(m, lightning.LightningModule) for m in model.modules())
    assert model.config.sa_points == [2048, 1024, 512, 256] and model.config.num_proposals == 256
    assert model.config.mean_size == MEAN_SIZE.tolist()  # ScanNet's clusters
    assert model.answer_head[-1].out_features == 706 and model.llm_block is not None


def test_a_checkpoint_of_another_vocabulary_is_refused_naming_both_sizes(monkeypatch):
    from types import SimpleNamespace

    from frozenlm.errors import ConfigurationError
    from frozenlm.tasks.sqa3d import SQA3DTask

    task = SQA3DTask(**TINY)  # 7 answers
    data = SimpleNamespace(answer_vocabulary=[f"answer{i}" for i in range(9)])
    monkeypatch.setattr(task, "_trainer", SimpleNamespace(datamodule=data))
    with pytest.raises(ConfigurationError, match="has 9 answers, the model's answer head 7"):
        task.setup("test")
    data.answer_vocabulary = data.answer_vocabulary[:7]
    task.setup("test")
    assert task.answers == data.answer_vocabulary
