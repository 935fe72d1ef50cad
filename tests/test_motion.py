"""Motion forecasting: metrics against av2's, agent-centric vectorisation (padding invariance, rotation
and translation equivariance), the resumable scene cache and unusable scenes, Argoverse 1 and 2 in their
official layouts, and MotionForecaster through the CLI (inline, GCR, baseline, submissions)."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from av2.datasets.motion_forecasting.eval import metrics as av2_metrics
from av2.datasets.motion_forecasting.eval.submission import ChallengeSubmission

from frozenlm.data import Argoverse1DataModule, Argoverse2DataModule
from frozenlm.data.base import DatasetFileError, DatasetNotFoundError
from frozenlm.data.motion import VECTOR_DIM, MotionPredictionsCSV, Scene, TooManySkippedScenesError, collate_scenes, vectorize
from frozenlm.llm import LLMConfig
from frozenlm.models.vectornet import VectorNet, VectorNetForecaster
from frozenlm.tasks import MotionForecaster
from frozenlm.tasks.motion import to_world
from frozenlm.tasks.motion_metrics import BrierMinFDE, MinADE, MinFDE, MissRate
from tests.cli_helpers import check_lora_round_trip, last_checkpoint, run_cli
from tests.data.argoverse1.data import write as write_argoverse1
from tests.data.argoverse2.data import write as write_argoverse2
from tests.model_checks import check_branch, hooked_modules


@pytest.fixture(scope="module")
def av2_root(tmp_path_factory) -> Path:
    return write_argoverse2(tmp_path_factory.mktemp("argoverse2"))


@pytest.fixture(scope="module")
def av1_root(tmp_path_factory) -> Path:
    return write_argoverse1(tmp_path_factory.mktemp("argoverse1"))


# -- metrics --------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [6, 1])
def test_metrics_match_av2(k):
    rng = np.random.default_rng(0)
    trajectories = rng.normal(size=(20, 6, 60, 2)).cumsum(axis=2)
    probabilities = rng.dirichlet(np.ones(6), size=20)
    target = rng.normal(size=(20, 60, 2)).cumsum(axis=1) * 0.5
    expected = {"ade": [], "fde": [], "mr": [], "brier": []}
    for modes, probs, truth in zip(trajectories, probabilities, target):
        top = np.argsort(-probs)[:k]
        fde = av2_metrics.compute_fde(modes[top], truth)
        best = int(np.argmin(fde))
        expected["fde"].append(fde[best])
        expected["ade"].append(av2_metrics.compute_ade(modes[top], truth)[best])
        expected["mr"].append(av2_metrics.compute_is_missed_prediction(modes[top], truth, 2.0)[best])
        expected["brier"].append(av2_metrics.compute_brier_fde(modes[top], truth, probs[top])[best])
    args = (torch.from_numpy(trajectories), torch.from_numpy(probabilities), torch.from_numpy(target))
    for metric, key in ((MinADE(k), "ade"), (MinFDE(k), "fde"), (MissRate(k, 2.0), "mr"), (BrierMinFDE(k), "brier")):
        metric.update(*(a[:12] for a in args))
        metric.update(*(a[12:] for a in args))  # accumulated over batches
        assert metric.compute().item() == pytest.approx(float(np.mean(expected[key])), rel=1e-5), key


# -- vectorisation --------------------------------------------------------------------------------
def synthetic_scene(rotation: float = 0.0, shift: tuple[float, float] = (0.0, 0.0), seed: int = 0) -> Scene:
    """A scene in world coordinates, optionally rotated about the world origin and shifted."""
    rng = np.random.default_rng(seed)
    steps = np.arange(20 + 30)[:, None] * 0.1
    focal = np.concatenate([8 * steps, 0.5 * steps**2], axis=1) + [300.0, -120.0]
    other = focal[::-1] + rng.normal(size=2) * 5
    lanes = [np.stack([np.linspace(250, 380, 10), np.full(10, y)], 1) for y in (-125.0, -118.0, -110.0)]
    cos, sin = math.cos(rotation), math.sin(rotation)

    def move(points: np.ndarray) -> np.ndarray:
        return points @ np.array([[cos, sin], [-sin, cos]]) + shift

    positions = np.stack([move(focal[:20]), move(other[:20])])
    positions[1, :5] = np.nan  # a track that appears late
    return Scene(
        scenario_id="s", focal_track_id="focal", agent_positions=positions, agent_kinds=np.array([0, 1]),
        future=move(focal[20:]), map_polylines=[move(lane) for lane in lanes],
        map_attributes=np.eye(4, dtype=np.float32)[:3],
    )  # fmt: skip


def scene_sample(scene: Scene) -> dict:
    result = vectorize(scene, history=20, horizon=30, radius=50.0, needs_future=True)
    return {**result["tensors"], **result["metadata"]}


def tiny_model(checkpoint=None, **kwargs) -> MotionForecaster:
    llm = LLMConfig(checkpoint=str(checkpoint)) if checkpoint else None
    return MotionForecaster(horizon=30, hidden=16, llm=llm, **kwargs).eval()


def test_vectors_are_in_the_focal_agents_frame():
    sample = scene_sample(synthetic_scene())
    focal = sample["agent_vectors"][0]
    last = focal[focal[:, -1] > 0][-1]
    torch.testing.assert_close(last[2:4], torch.zeros(2), atol=1e-5, rtol=0)  # ends at the origin
    assert last[0] < 0 and abs(last[1]) < 0.1  # came from behind, along +x
    assert sample["target"][:, 0].min() > 0  # drives on along +x
    assert (sample["agent_vectors"][1, :, -1].sum(), sample["map_vectors"].shape[0]) == (14, 3)  # 15 observed, 14 vectors


def test_rotating_and_translating_the_scene_moves_the_predictions_with_it(tiny_llama_checkpoint):
    model = tiny_model(tiny_llama_checkpoint)
    angle, shift = 1.1, (-4000.0, 2500.0)
    plain = collate_scenes([scene_sample(synthetic_scene())])
    moved = collate_scenes([scene_sample(synthetic_scene(angle, shift))])
    for group in ("agent_vectors", "map_vectors"):  # the same agent frame
        torch.testing.assert_close(moved[group], plain[group], atol=1e-3, rtol=0)
    with torch.no_grad():
        world, probabilities = model.predict_modes(plain)
        moved_world, moved_probabilities = model.predict_modes(moved)
    cos, sin = math.cos(angle), math.sin(angle)
    expected = world.double() @ torch.tensor([[cos, sin], [-sin, cos]], dtype=torch.float64) + torch.tensor(shift)
    torch.testing.assert_close(moved_world.double(), expected, atol=2e-2, rtol=0)
    torch.testing.assert_close(moved_probabilities, probabilities, atol=1e-4, rtol=0)
    torch.testing.assert_close(to_world(plain["target"], plain["origin"], plain["heading"]).double(),
                               torch.from_numpy(synthetic_scene().future)[None], atol=1e-3, rtol=0)  # fmt: skip


@pytest.mark.parametrize("mode", ["inline", "auxiliary"])
def test_padding_never_changes_a_prediction(tiny_llama_checkpoint, mode):
    model = MotionForecaster(horizon=30, hidden=16, llm=LLMConfig(checkpoint=str(tiny_llama_checkpoint), mode=mode)).eval()
    small, large = scene_sample(synthetic_scene(seed=1)), scene_sample(synthetic_scene(seed=2))
    large["map_vectors"] = torch.cat([large["map_vectors"]] * 4)  # more lanes, more padding for `small`
    large["agent_vectors"] = torch.cat([large["agent_vectors"]] * 3)  # and more agents
    alone = collate_scenes([small])
    together = collate_scenes([small, large])
    assert together["polyline_mask"].shape[1] > alone["polyline_mask"].shape[1]
    with torch.no_grad():
        for a, b in zip(model(alone), model(together)):
            torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)


# -- data ------------------------------------------------------------------------------------------
def test_argoverse2_scenes_read_with_av2_and_cached(av2_root):
    data = Argoverse2DataModule(av2_root, num_workers=0, batch_size=4)
    train = data.dataset("train")
    assert len(train) == 8 and data.cache_folder("train").parent == av2_root / "frozenlm_cache"
    sample = train[0]
    assert sample["target"].shape == (60, 2) and sample["agent_vectors"].shape[1] == 49
    assert sample["scenario_id"] == "train-0000" and sample["track_id"] == "focal"
    assert sample["map_vectors"][..., 4:8].sum() > 0  # lane attributes from the map JSON
    assert data.dataset("test")[0]["has_target"] == "False"
    other = Argoverse2DataModule(av2_root, num_workers=0, radius=20.0)
    assert other.cache_folder("train") != data.cache_folder("train")  # other parameters, other cache


def test_preprocessing_in_the_training_process_leaves_its_thread_count_alone(av2_root, tmp_path):
    root = Path(shutil.copytree(av2_root, tmp_path / "av2", ignore=shutil.ignore_patterns("frozenlm_cache")))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert len(Argoverse2DataModule(root, num_workers=0).dataset("val")) == 4  # preprocessed here
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_preprocessing_resumes_after_a_kill(av2_root, tmp_path, monkeypatch):
    root = Path(shutil.copytree(av2_root, tmp_path / "av2", ignore=shutil.ignore_patterns("frozenlm_cache")))
    read = []
    original = Argoverse2DataModule.read_scene

    def killed_after_three(self, source):
        if len(read) == 3:
            raise KeyboardInterrupt  # the process dies here
        read.append(source.parent.name)
        return original(self, source)

    monkeypatch.setattr(Argoverse2DataModule, "read_scene", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        Argoverse2DataModule(root, num_workers=0).dataset("train")
    folder = Argoverse2DataModule(root, num_workers=0).cache_folder("train")
    assert sorted(p.name.split(".")[0] for p in folder.glob("*.safetensors")) == read and not list(folder.glob(".*"))
    read.clear()
    monkeypatch.setattr(Argoverse2DataModule, "read_scene", lambda self, source: read.append(1) or original(self, source))
    assert len(Argoverse2DataModule(root, num_workers=0).dataset("train")) == 8
    assert len(read) == 5  # only the scenes not done before the kill


def test_unusable_scenes_are_skipped_counted_and_named(av2_root, tmp_path, capsys):
    root = Path(shutil.copytree(av2_root, tmp_path / "av2", ignore=shutil.ignore_patterns("frozenlm_cache")))
    scenes = sorted((root / "train").iterdir())
    (scenes[0] / f"scenario_{scenes[0].name}.parquet").write_bytes(b"not parquet")
    for path in scenes[1].glob("log_map_archive_*.json"):
        path.unlink()
    data = Argoverse2DataModule(root, num_workers=0, max_skipped_fraction=0.25)
    assert len(data.dataset("train")) == 6
    reasons = data.skipped["train"]
    assert len(reasons) == 2 and scenes[0].name in reasons[0] and "log_map_archive" in reasons[1]
    assert "2 of 8 scenes skipped as unusable" in capsys.readouterr().out
    short = synthetic_scene()
    short.agent_positions[0, -1] = np.nan
    with pytest.raises(ValueError, match="not at the last"):
        vectorize(short, 20, 30, 50.0, needs_future=True)
    truncated = synthetic_scene()
    truncated.future = truncated.future[:10]
    with pytest.raises(ValueError, match="future is not 30 finite positions"):
        vectorize(truncated, 20, 30, 50.0, needs_future=True)


def test_damaged_argoverse1_sequences_are_skipped_with_the_reason(av1_root, tmp_path):
    root = Path(shutil.copytree(av1_root, tmp_path / "av1", ignore=shutil.ignore_patterns("frozenlm_cache")))
    (root / "train" / "data" / "1.csv").write_text("TIMESTAMP,TRACK_ID\n1.0,x\n")  # columns missing
    (root / "train" / "data" / "2.csv").write_text((root / "train" / "data" / "2.csv").read_text().replace("AGENT", "OTHERS"))
    data = Argoverse1DataModule(root, num_workers=0, max_skipped_fraction=0.25)
    assert len(data.dataset("train")) == 6
    assert [reason.split(": ")[1] for reason in data.skipped["train"]] == ["KeyError", "KeyError"]
    assert "no AGENT track" in data.skipped["train"][1]


def test_a_repaired_scene_is_read_again_and_too_many_skips_stop_the_run(av2_root, tmp_path):
    root = Path(shutil.copytree(av2_root, tmp_path / "av2", ignore=shutil.ignore_patterns("frozenlm_cache")))
    scene = sorted((root / "train").iterdir())[2]
    parquet = scene / f"scenario_{scene.name}.parquet"
    original = parquet.read_bytes()
    parquet.write_bytes(original[: len(original) // 2])  # truncated by an interrupted copy
    with pytest.raises(TooManySkippedScenesError, match=rf"1 of 8 train scenes are unusable.*{scene.name}.*max_skipped_fraction"):
        Argoverse2DataModule(root, num_workers=0).dataset("train")  # default: at most 1 %
    assert len(Argoverse2DataModule(root, num_workers=0, max_skipped_fraction=0.2).dataset("train")) == 7

    parquet.write_bytes(original)  # repaired: read again, no longer skipped
    data = Argoverse2DataModule(root, num_workers=0)
    assert len(data.dataset("train")) == 8 and data.skipped["train"] == []
    folder = data.cache_folder("train")
    assert len(list(folder.glob("*.safetensors"))) == 8 and not list(folder.glob("*.skipped"))  # stale entry gone


@pytest.mark.parametrize("workers", [0, 1])
def test_a_damaged_argoverse1_map_stops_the_run_naming_it(av1_root, tmp_path, workers):
    root = Path(shutil.copytree(av1_root, tmp_path / "av1", ignore=shutil.ignore_patterns("frozenlm_cache")))
    city_map = sorted((root / "map_files").glob("*.xml"))[0]
    city_map.write_text(city_map.read_text()[:300])  # cut mid-element
    with pytest.raises(DatasetFileError, match=rf"^{city_map} is not a readable Argoverse vector map \(ParseError") as error:
        Argoverse1DataModule(root, num_workers=workers, max_skipped_fraction=1.0).dataset("train")
    assert "Traceback" not in str(error.value)  # raised as it is, not wrapped by the loader worker


def test_scenes_with_nonfinite_map_points_are_skipped_with_the_reason():
    scene = synthetic_scene()
    scene.map_polylines[0] = scene.map_polylines[0].copy()
    scene.map_polylines[0][3, 1] = np.inf
    with pytest.raises(ValueError, match=r"map polyline 0 \(centreline\) has NaN or infinite points"):
        vectorize(scene, 20, 30, 50.0, needs_future=True)


def test_argoverse1_reads_csv_and_vector_map(av1_root, tmp_path):
    data = Argoverse1DataModule(av1_root, num_workers=0, batch_size=4)
    train = data.dataset("train")
    assert len(train) == 8
    sample = train[0]
    assert sample["target"].shape == (30, 2) and sample["agent_vectors"].shape == (3, 19, 13)
    assert sample["track_id"].endswith("agent") and sample["map_vectors"].shape[1] == 9  # 10-point centrelines
    assert data.dataset("test")[0]["has_target"] == "False" and len(data.dataset("test")) == 2
    with pytest.raises(DatasetNotFoundError, match="pruned_argoverse_<CITY>_<id>_vector_map.xml"):
        Argoverse1DataModule(tmp_path)
    with pytest.raises(DatasetNotFoundError, match=r"no dataset folder .*nowhere; pass --data.root"):
        Argoverse2DataModule(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match=r"no .*empty/train\. Download the Argoverse 2 .*argoverse.org"):
        Argoverse2DataModule(tmp_path / "empty").dataset("train")


# -- through the CLI ---------------------------------------------------------------------------------
def test_fit_test_and_submit_argoverse2_through_the_cli(tmp_path, av2_root, tiny_llama_checkpoint):
    args = ["--data.root", str(av2_root), "--model.llm.checkpoint", str(tiny_llama_checkpoint)]
    fit = run_cli("fit", "motion_llama", tmp_path, *args)
    metrics = fit.trainer.callback_metrics
    assert {"val_minADE_6", "val_minFDE_6", "val_MR_6", "val_brier_minFDE_6", "val_minFDE_1"} <= set(metrics)
    assert metrics["val_minFDE_6"] <= metrics["val_minFDE_1"] and metrics["train_loss_node_completion"].isfinite()
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set().union(*(EventAccumulator(str(e)).Reload().Tags()["images"] for e in events))
    assert "val_scenes" in tags  # validation scenes drawn to TensorBoard
    ckpt = last_checkpoint(tmp_path)
    test = run_cli("test", "motion_llama", tmp_path, *args, "--ckpt_path", str(ckpt))
    assert test.trainer.callback_metrics["test_minADE_6"] > 0
    submission = tmp_path / "submission.parquet"
    run_cli("predict", "motion_llama", tmp_path, *args, "--ckpt_path", str(ckpt), "--predictions.output", str(submission))
    predictions = ChallengeSubmission.from_parquet(submission).predictions
    assert sorted(predictions) == ["test-0000", "test-0001"]
    probabilities, trajectories = predictions["test-0000"]
    assert trajectories["focal"].shape == (6, 60, 2) and probabilities.sum() == pytest.approx(1.0)
    assert np.abs(trajectories["focal"][:, 0] - np.array([2500.0, -1300.0])).max() < 200  # world coordinates


def test_gcr_and_baseline_argoverse2_and_argoverse1_predictions(tmp_path, av2_root, av1_root, tiny_llama_checkpoint):
    args = ["--data.root", str(av2_root), "--model.llm.checkpoint", str(tiny_llama_checkpoint)]
    gcr = run_cli("fit", "motion_llama", tmp_path / "gcr", *args, "--model.llm.mode", "auxiliary")
    assert gcr.trainer.callback_metrics["train_loss_aux"].isfinite()
    model = gcr.model.eval()
    batch = collate_scenes([model.trainer.datamodule.dataset("val")[0]])
    model.model.llm_block.forward = lambda *a, **k: pytest.fail("the LM block ran at inference in auxiliary mode")
    with torch.no_grad():
        model(batch)
    del model.model.llm_block.forward

    baseline = run_cli("fit", "motion_llama", tmp_path / "baseline", *args[:2], "--model.llm", "null")
    assert baseline.model.model.llm_block is None

    av1 = ["--data", "frozenlm.data.Argoverse1DataModule", "--data.root", str(av1_root), "--model.horizon", "30",
           "--model.llm", "null", "--data.batch_size", "4", "--data.num_workers", "0"]  # fmt: skip
    run_cli("fit", "motion_llama", tmp_path / "av1", *av1)
    output = tmp_path / "av1.csv"
    run_cli("predict", "motion_llama", tmp_path / "av1", *av1, "--ckpt_path", str(last_checkpoint(tmp_path / "av1")),
            "--predictions.output", str(output))  # fmt: skip
    rows = list(csv.DictReader(output.open()))
    assert len(rows) == 2 * 6 and {r["scenario_id"] for r in rows} == {"13", "14"}
    assert len(json.loads(rows[0]["x"])) == 30
    with pytest.raises(ValueError, match=r"horizon 60 .* Argoverse1DataModule predicts 30"):
        run_cli("fit", "motion_llama", tmp_path / "av1", *[a for a in av1 if a not in ("--model.horizon", "30")])


def test_lora_block_on_agent_and_lane_tokens_through_the_cli(tmp_path, av2_root, tiny_llama_checkpoint):
    check_lora_round_trip("motion_llama", tmp_path, "--data.root", str(av2_root), "--model.llm.checkpoint", str(tiny_llama_checkpoint))


def test_vectornet_identifier_is_the_minimum_start_and_the_paper_global_graph():
    vectors = torch.zeros(1, 2, 3, VECTOR_DIM)
    vectors[0, 0, :, :2] = torch.tensor([[3.0, -1.0], [1.0, 2.0], [-9.0, -9.0]])  # the last vector is padding
    vectors[0, 1, :1, :2] = torch.tensor([[5.0, 4.0]])
    mask = torch.tensor([[[True, True, False], [True, False, False]]])
    torch.testing.assert_close(VectorNet.identifiers([(vectors, mask)]), torch.tensor([[[1.0, -1.0], [5.0, 4.0]]]))

    torch.manual_seed(0)
    net = VectorNet(VECTOR_DIM, hidden=8)
    nodes, polyline_mask = torch.randn(2, 5, 16), torch.tensor([[True] * 5, [True, True, True, False, False]])
    graph = net.global_graph
    q, k, v = graph.query(nodes), graph.key(nodes), graph.value(nodes)
    scores = (q @ k.transpose(1, 2)).masked_fill(~polyline_mask[:, None], float("-inf"))  # no 1/sqrt(d), no out-proj
    torch.testing.assert_close(graph(nodes, polyline_mask), scores.softmax(-1) @ v)
    # a scene with no real polyline attends to nothing, as scaled_dot_product_attention: 0, finite gradients
    nodes.requires_grad_()
    out = graph(nodes, torch.tensor([[False] * 5, [True, True, True, False, False]]))
    assert out[0].abs().max() == 0 and out.isfinite().all()
    out.sum().backward()
    assert nodes.grad.isfinite().all() and all(p.grad.isfinite().all() for p in graph.parameters())
    assert not any("out_proj" in name for name, _ in net.named_parameters())
    assert any("out_proj" in name for name, _ in VectorNet(VECTOR_DIM, hidden=8, global_graph="multihead").named_parameters())


def test_argoverse2_lane_boundaries_and_crosswalks_as_polylines(av2_root):
    plain = Argoverse2DataModule(av2_root, num_workers=0)
    full = Argoverse2DataModule(av2_root, num_workers=0, lane_boundaries=True, crosswalks=True)
    assert plain.cache_folder("train") != full.cache_folder("train")
    lanes, everything = plain.dataset("train")[0]["map_vectors"], full.dataset("train")[0]["map_vectors"]
    kinds = everything[:, 0, VECTOR_DIM - 3 : VECTOR_DIM].argmax(dim=1)  # centreline, boundary, crosswalk
    centrelines = int((kinds == 0).sum())
    assert centrelines == len(lanes) and int((kinds == 1).sum()) == 2 * centrelines and (kinds == 2).sum() > 0
    assert everything.shape[1] == lanes.shape[1] == 9  # every map polyline resampled to 10 points
    torch.testing.assert_close(everything[kinds == 0], lanes)  # the centrelines are unchanged
    batch = collate_scenes([full.dataset("train")[i] for i in range(4)])
    assert batch["map_vectors"].shape[2] == 9 and batch["agent_vectors"].shape[2] == 49  # padded per type
    assert batch["agent_mask"].float().mean() > 0.5  # most agent slots are real vectors


def test_motion_predictions_csv_holds_each_batch_as_soon_as_it_is_written(tmp_path):
    """Streamed like the classifiers' files: a pass that dies later keeps the batches written so far."""
    file = MotionPredictionsCSV(tmp_path / "forecasts.csv")
    batch = {"scenario_id": ["s0", "s1"], "track_id": ["a", "b"], "trajectories": torch.zeros(2, 6, 60, 2),
             "probabilities": torch.full((2, 6), 1 / 6)}  # fmt: skip
    file.write(batch)
    rows = (tmp_path / "forecasts.csv").read_text().splitlines()  # read before close()
    assert len(rows) == 1 + 2 * 6 and rows[1].startswith("s0,a,0,")
    assert file.close() == 2


# -- the plain model ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["inline", "auxiliary"])
def test_the_plain_model_has_no_hooks_and_returns_the_gcr_branch(tiny_llama_checkpoint, mode):
    hparams = {"horizon": 30, "hidden": 16, "node_completion": 1.0, "llm": {"checkpoint": str(tiny_llama_checkpoint), "mode": mode}}
    model = MotionForecaster.build_model(hparams)  # no task, no trainer
    assert isinstance(model, VectorNetForecaster) and model.config.global_graph == "multihead"  # hparams without it
    batch = collate_scenes([scene_sample(synthetic_scene(seed=s)) for s in range(2)])
    _, branch = check_branch(model, (batch,), mode)
    with torch.no_grad():
        groups, mask = model.polyline_groups(batch), batch["polyline_mask"]
        graph = model.backbone(groups, mask)  # after VectorNet's global graph, padding masked
        tokens = model.llm_block(graph, ~mask) if mode == "inline" else graph
        torch.testing.assert_close(model.forward_features(batch)[0], tokens)
        for got, expected in zip(model(batch), model.decoder(tokens[:, 0])):
            torch.testing.assert_close(got, expected)
    if branch is not None:
        torch.testing.assert_close(branch, model.llm_block(graph, ~mask))
    assert hooked_modules(tiny_model(tiny_llama_checkpoint)) == []


@pytest.mark.parametrize("aux_head", ["separate", "shared"])
def test_gcr_decodes_its_branch_with_its_own_decoder_or_the_models(tiny_llama_checkpoint, aux_head):
    llm = LLMConfig(checkpoint=str(tiny_llama_checkpoint), mode="auxiliary", aux_head=aux_head, aux_weight=0.5)
    task = MotionForecaster(horizon=30, hidden=16, llm=llm).train()
    assert hasattr(task.model, "aux_decoder") == (aux_head == "separate")
    logged = {}
    task.log = lambda name, value, **kwargs: logged.__setitem__(name, value)
    task.log_dict = lambda values, **kwargs: logged.update(values)
    batch = collate_scenes([scene_sample(synthetic_scene(seed=s)) for s in range(2)])
    task.training_step(batch, 0).backward()
    torch.testing.assert_close(logged["train_loss"], logged["train_loss_main"] + 0.5 * logged["train_loss_aux"])
    decoder = {n: p.grad.clone() for n, p in task.model.decoder.named_parameters()}
    task.zero_grad()
    task.forecast_loss(*task.model(batch), batch["target"]).backward()  # the main loss alone
    same = all(torch.equal(decoder[n], p.grad) for n, p in task.model.decoder.named_parameters())
    assert same == (aux_head == "separate")  # a shared decoder also learns from the auxiliary loss


def masked_subgraph_reference(subgraph, vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """VectorNet's subgraph as the paper writes it: every layer on the padded vectors, each max-pool masked to
    the polyline's real vectors (0 for an empty polyline), the last layer's output ``[nodes, max]`` pooled."""

    def masked_max(nodes):
        pooled = nodes.masked_fill(~mask[..., None], float("-inf")).amax(dim=2)
        return torch.where(mask.any(dim=2, keepdim=True), pooled, torch.zeros_like(pooled))

    x = vectors
    for layer in subgraph.layers:
        nodes = layer(x)
        x = torch.cat([nodes, masked_max(nodes)[:, :, None].expand_as(nodes)], dim=-1)
    return torch.nn.functional.normalize(masked_max(x), dim=-1)


def test_the_subgraph_over_all_groups_at_once_matches_the_masked_definition_and_its_gradients():
    """The subgraph runs agents and map polylines as one set of rows, padded slots filled with copies of a
    real vector and no masks (VectorNet.polyline_features): the same features and parameter gradients as
    each group padded and masked, in float64, with garbage in the padding and empty polylines."""
    torch.manual_seed(0)
    net = VectorNet(VECTOR_DIM, hidden=16).double()
    groups = []
    for polylines, length in ((5, 7), (4, 11)):
        vectors = torch.randn(3, polylines, length, VECTOR_DIM, dtype=torch.float64)
        mask = torch.rand(3, polylines, length) < 0.6
        mask[0, 0], mask[1, 1] = False, True  # an empty polyline and a full one
        vectors[~mask] = 1e3 * torch.randn(int((~mask).sum()), VECTOR_DIM, dtype=torch.float64)  # never read
        groups.append((vectors, mask))
    weights = torch.randn(3, 9, 32, dtype=torch.float64)
    features = net.polyline_features(groups)
    (features * weights).sum().backward()
    ours = {name: p.grad.clone() for name, p in net.subgraph.named_parameters()}
    net.zero_grad()
    reference = torch.cat([masked_subgraph_reference(net.subgraph, v, m) for v, m in groups], dim=1)
    (reference * weights).sum().backward()
    torch.testing.assert_close(features, reference, atol=1e-12, rtol=0)
    assert features[0, 0].abs().max() == 0  # the empty polyline
    for name, p in net.subgraph.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-10, rtol=1e-10)
