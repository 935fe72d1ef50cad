"""SQA3D's data: the batch of the contract, the answer vocabulary and filtering, question types, tokens and
word vectors, the augmentation (points, boxes, votes and situation move alike), exact evaluation on two
simulated processes, ``frozenlm prepare sqa3d`` (end to end, resume, missing and damaged scans), the GloVe
readers and the PLY reader, on the tiny official-layout data of tests/data/sqa3d/data.py."""

from __future__ import annotations

import os
import pickle
import shutil
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from frozenlm.data.base import DatasetFileError, DatasetNotFoundError, Unreadable
from frozenlm.data.glove import load_word_vectors, read_glove_pickle, read_glove_text
from frozenlm.data.prepare import prepare
from frozenlm.data.safe_pickle import UnsafePickleError
from frozenlm.data.scannet import (
    MAX_NUM_OBJ,
    MEAN_SIZE,
    NYU40_IDS,
    NYU40ID_TO_CLASS,
    SceneError,
    box_targets,
    padded_boxes,
    read_ply,
    rotate_boxes,
    rotx,
    rotz,
    vote_targets,
)
from frozenlm.data.sqa3d import (
    IGNORE_CLASS,
    QUESTION_TYPES,
    SQA3DDataModule,
    augment_scene,
    question_type,
    tokenize,
)
from tests.cli_helpers import main_args
from tests.data.sqa3d.data import QUESTIONS, SCENES, make_scene, write

NUM_POINTS = 256


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write(tmp_path_factory.mktemp("sqa3d"))


def datamodule(root, **kwargs) -> SQA3DDataModule:
    return SQA3DDataModule(root, batch_size=2, num_workers=0, num_points=NUM_POINTS, **kwargs)


@pytest.fixture(scope="module")
def data(tiny):
    module = datamodule(tiny.prepared)
    module.setup()
    return module


def test_the_batch_has_every_key_of_the_contract_with_its_shape_and_dtype(data):
    torch.manual_seed(0)
    batch = next(iter(data.train_dataloader()))
    n, b, a = NUM_POINTS, 2, data.num_answers
    expected = {
        "point_clouds": ((b, n, 7), torch.float32), "situation_tokens": ((b, 100, 300), torch.float32),
        "situation_lengths": ((b,), torch.int64), "question_tokens": ((b, 100, 300), torch.float32),
        "question_lengths": ((b,), torch.int64), "answer_targets": ((b, a), torch.float32),
        "answer_class": ((b,), torch.int64), "situation_target": ((b, 7), torch.float32),
        "center_label": ((b, MAX_NUM_OBJ, 3), torch.float32), "heading_class_label": ((b, MAX_NUM_OBJ), torch.int64),
        "heading_residual_label": ((b, MAX_NUM_OBJ), torch.float32), "size_class_label": ((b, MAX_NUM_OBJ), torch.int64),
        "size_residual_label": ((b, MAX_NUM_OBJ, 3), torch.float32), "sem_cls_label": ((b, MAX_NUM_OBJ), torch.int64),
        "box_label_mask": ((b, MAX_NUM_OBJ), torch.float32), "vote_label": ((b, n, 9), torch.float32),
        "vote_label_mask": ((b, n), torch.int64), "question_type": ((b,), torch.int64),
        "question_id": ((b,), torch.int64), "dataset_index": ((b,), torch.int64), "padding": ((b,), torch.bool),
    }  # fmt: skip
    for key, (shape, dtype) in expected.items():
        assert tuple(batch[key].shape) == shape and batch[key].dtype == dtype, key
    assert data.mean_size.shape == (18, 3) and data.num_points == NUM_POINTS
    assert (batch["situation_lengths"] >= 1).all() and not batch["padding"].any()
    # a unit quaternion, and zero-padded texts past their lengths
    assert torch.allclose(batch["situation_target"][:, 3:].norm(dim=1), torch.ones(b), atol=1e-5)
    for i, length in enumerate(batch["question_lengths"].tolist()):
        assert batch["question_tokens"][i, length:].abs().sum() == 0 and batch["question_tokens"][i, length - 1].abs().sum() > 0


def test_evaluation_points_are_the_scenes_with_colour_and_height_as_the_reference(tiny, data):
    sample = data.dataset("test")[0]
    scene = np.load(tiny.prepared / "scannet_data" / "scene0002_00_aligned_vert.npy").astype(np.float64)
    expected = np.concatenate([scene[:, 0:3], (scene[:, 3:6] - [109.8, 97.2, 83.8]) / 256,
                               scene[:, 2:3] - np.percentile(scene[:, 2], 0.99)], 1)  # fmt: skip
    points = sample["point_clouds"].double().numpy()
    distance = np.abs(points[:, None, :] - expected[None]).max(-1).min(1)  # each point is a row of the scene
    assert distance.max() < 1e-5
    assert len(expected) < NUM_POINTS  # fewer points than asked: drawn with replacement, as the reference
    again = data.dataset("test")[0]
    assert torch.equal(sample["point_clouds"], again["point_clouds"])  # evaluation is deterministic
    assert sample["box_label_mask"].sum() == 2 and sample["vote_label_mask"].sum() > 0  # test has its targets too


def test_the_answer_vocabulary_is_trains_and_train_val_keep_answerable_questions(tiny, data):
    train_answers = Counter(q[4] for q in QUESTIONS if q[0] == "train")
    assert data.answer_vocabulary == sorted(train_answers) and data.num_answers == len(train_answers)
    assert len(data.dataset("train")) == 12 and data.skipped["train"] == 0
    assert len(data.dataset("val")) == 3 and data.skipped["val"] == 1  # "rectangular" is not a training answer
    assert len(data.dataset("test")) == 5  # test keeps all; its unanswerable questions count as wrong
    classes = [data.dataset("test")[i]["answer_class"].item() for i in range(5)]
    expected = [data.answer_vocabulary.index(q[4]) if q[4] in train_answers else IGNORE_CLASS
                for q in QUESTIONS if q[0] == "test"]  # fmt: skip
    assert classes == expected and classes.count(IGNORE_CLASS) == 2  # "blue", "wall"
    # soft targets by the answer's count among the training answers: "no" 4 times -> 1.0, the others once -> 0.3
    for i in range(len(data.dataset("train"))):
        sample = data.dataset("train")[i]
        answer = data.answer_vocabulary[sample["answer_class"]]
        score = {1: 0.3, 2: 0.6, 3: 0.9}.get(train_answers[answer], 1.0)
        assert sample["answer_targets"].nonzero().flatten().tolist() == [sample["answer_class"].item()]
        assert sample["answer_targets"].max().item() == pytest.approx(score)


def test_question_types_by_first_word_with_are_and_am_as_is(data):
    assert QUESTION_TYPES == ("What", "Is", "How", "Can", "Which", "Others")
    cases = {"What is it?": "What", "Is it?": "Is", "Are they?": "Is", "Am I?": "Is", "How many?": "How",
             "Can I?": "Can", "Which one?": "Which", "Where is it?": "Others", "What's that?": "Others",
             "what is it?": "Others", "If I turn, what?": "Others", "": "Others"}  # fmt: skip
    for question, kind in cases.items():
        assert QUESTION_TYPES[question_type(question)] == kind, question
    types = [QUESTION_TYPES[data.dataset("test")[i]["question_type"]] for i in range(5)]
    assert types == ["What", "Is", "Which", "Can", "Others"]


def test_tokens_split_off_question_marks_and_periods_and_keep_case_and_extra_spaces():
    assert tokenize("What is on my left?") == ["What", "is", "on", "my", "left", "?"]
    assert tokenize("I stand  by the Table .") == ["I", "stand", " ", "by", "the", "Table", " ", "."]  # spaCy's runs
    assert tokenize("It is 2.5 m.") == ["It", "is", "2", ".5", "m", "."]
    assert tokenize(" lead") == [" ", "lead"] and tokenize("") == []


def test_texts_are_glove_vectors_with_unk_for_unknown_words_and_at_most_100_tokens(tiny, data):
    glove = read_glove_pickle(tiny.prepared / "glove.p")
    vector = dict(zip(glove.words, glove.vectors))
    dataset = data.dataset("train")
    index = next(i for i, q in enumerate(dataset.questions) if "fridge" in q.question)
    sample = dataset[index]
    tokens = tokenize(dataset.questions[index].question)
    assert sample["question_lengths"].item() == len(tokens)
    for position, token in enumerate(tokens):
        expected = vector.get(token, vector["unk"])  # "fridge" is not in the tiny GloVe
        assert np.array_equal(sample["question_tokens"][position].numpy(), expected), token
    long = dataset.embed(np.zeros(150, dtype=np.int64))
    assert long[0].shape == (100, 300) and long[1].item() == 100
    empty = dataset.embed(np.zeros(0, dtype=np.int64))
    assert empty[1].item() == 1 and empty[0].abs().sum() == 0


def _scene_cloud(name: str):
    """All points of a tiny scene (aligned as the prepared arrays are), its boxes and labels."""
    scene = make_scene(name, list(SCENES).index(name))
    from tests.data.sqa3d.data import prepared_arrays

    arrays = prepared_arrays(scene)
    return arrays["aligned_vert"][:, 0:3].astype(np.float64), arrays


def test_augmentation_moves_points_boxes_votes_and_the_situation_alike():
    xyz, arrays = _scene_cloud("scene0000_00")
    boxes, mask, count = padded_boxes(arrays["aligned_bbox"])
    position = np.array([0.3, -0.7, 0.0])
    flips = set()
    for seed in range(12):
        quaternion = Rotation.from_euler("z", 0.4 + seed).as_quat()  # SQA3D's rotations are about z
        forward = Rotation.from_quat(quaternion).as_matrix()[:, 0]
        # probes: each box centre, the situation's position, and a point one metre ahead of it
        probes = np.concatenate([boxes[:count, 0:3], position[None], (position + forward)[None]])
        cloud = np.concatenate([xyz, probes])
        rng = np.random.default_rng(seed)
        flips.add((rng.random() > 0.5, rng.random() > 0.5))  # the augmentation's first two draws
        new_cloud, new_boxes, new_position, new_quaternion = augment_scene(cloud, boxes, position, quaternion,
                                                                           np.random.default_rng(seed))  # fmt: skip
        assert not np.allclose(new_cloud, cloud)
        moved = new_cloud[len(xyz):]
        np.testing.assert_allclose(moved[:count], new_boxes[:count, 0:3], atol=1e-9)  # box centres stay box centres
        np.testing.assert_allclose(moved[count], new_position, atol=1e-9)  # the situation moves as a point
        new_forward = Rotation.from_quat(new_quaternion).as_matrix()[:, 0]
        np.testing.assert_allclose(moved[count + 1] - moved[count], new_forward, atol=1e-9)  # its heading too
        # votes, computed after augmentation, point at the moved box centres (the objects are mirror-symmetric)
        points = new_cloud[: len(xyz)]
        votes, vote_mask = vote_targets(points, arrays["ins_label"], arrays["sem_label"])
        for row in range(count):
            chosen = arrays["ins_label"] == int(arrays["aligned_bbox"][row, 7]) + 1
            assert vote_mask[chosen].all()
            np.testing.assert_allclose(points[chosen] + votes[chosen, 0:3], np.tile(new_boxes[row, 0:3], (chosen.sum(), 1)), atol=1e-5)
        assert not vote_mask[(arrays["sem_label"] == 2) | (arrays["ins_label"] == 0)].any()  # floor, unannotated
    assert flips == {(False, False), (False, True), (True, False), (True, True)}  # every flip case was checked


def test_an_augmented_training_sample_votes_inside_its_boxes(tiny):
    module = datamodule(tiny.prepared)
    dataset = module.dataset("train")
    torch.manual_seed(3)
    sample = dataset[0]
    centres, sizes = sample["center_label"].numpy(), sample["size_residual_label"].numpy()
    count = int(sample["box_label_mask"].sum())
    sizes = sizes[:count] + MEAN_SIZE[sample["size_class_label"][:count].numpy()]
    voters = sample["vote_label_mask"].numpy() == 1
    targets = sample["point_clouds"][:, 0:3].numpy()[voters] + sample["vote_label"][:, 0:3].numpy()[voters]
    inside = (np.abs(targets[:, None] - centres[None, :count]) <= sizes[None] / 2 + 1e-4).all(-1).any(1)
    assert voters.sum() > 0 and inside.all()
    unaugmented = datamodule(tiny.prepared, augment=False).dataset("train")[0]
    assert not torch.allclose(sample["situation_target"], unaugmented["situation_target"])


def test_box_rotation_is_the_references_corner_extent():
    boxes = np.array([[1.0, 2.0, 3.0, 0.5, 0.7, 0.9]])
    angle = 0.3
    z = rotate_boxes(boxes, rotz(angle), "z")[0]
    c, s = np.cos(angle), np.sin(angle)
    np.testing.assert_allclose(z[3:], [c * 0.5 + s * 0.7, s * 0.5 + c * 0.7, 0.9])  # the rotated box's extent
    np.testing.assert_allclose(z[:3], rotz(angle) @ boxes[0, :3])
    x = rotate_boxes(boxes, rotx(angle), "x")[0]
    np.testing.assert_allclose(x[3:], [0.5, 0.7, c * 0.9])  # the reference's rectangle in the x-y plane
    np.testing.assert_allclose(x[:3], rotx(angle) @ boxes[0, :3])


def test_box_and_vote_targets_against_a_direct_loop():
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(200, 3))
    instance = rng.integers(0, 5, 200)
    semantic = np.array([0, 5, 2, 24, 39])[instance]  # 0 unannotated, 2 floor: no votes
    votes, mask = vote_targets(xyz, instance, semantic)
    for label in np.unique(instance):
        chosen = instance == label
        if semantic[chosen][0] in NYU40_IDS:
            centre = (xyz[chosen].min(0) + xyz[chosen].max(0)) / 2
            np.testing.assert_allclose(votes[chosen], np.tile(centre - xyz[chosen], 3), atol=1e-6)
            assert mask[chosen].all()
        else:
            assert not mask[chosen].any() and not votes[chosen].any()
    instance_boxes = np.array([[0, 0, 0, 1, 1, 1, 5, 0], [1, 1, 1, 2, 2, 2, 24, 1], [2, 2, 2, 1, 1, 1, 39, 2.0]])
    boxes, box_mask, count = padded_boxes(instance_boxes)
    targets = box_targets(boxes, instance_boxes, count)
    assert count == 3 and box_mask.tolist() == [1] * 3 + [0] * (MAX_NUM_OBJ - 3)
    assert targets["sem_cls_label"][:4].tolist() == [2, 12, 17, 0] == targets["size_class_label"][:4].tolist()
    np.testing.assert_allclose(targets["size_residual_label"][1], [2, 2, 2] - MEAN_SIZE[12], atol=1e-6)
    assert not targets["heading_class_label"].any() and not targets["heading_residual_label"].any()
    assert NYU40ID_TO_CLASS[24] == 12 and NYU40ID_TO_CLASS[39] == 17 and 22 not in NYU40ID_TO_CLASS


def test_training_draws_come_from_the_processs_seeded_stream(data):
    dataset = data.dataset("train")

    def draw(seed):
        torch.manual_seed(seed)
        return dataset[0]["point_clouds"]

    assert torch.equal(draw(1), draw(1))  # reproducible from the seed (the task seeds each rank and epoch)
    assert not torch.equal(draw(1), draw(2))  # and another rank's seed draws otherwise


def test_evaluation_on_two_simulated_processes_scores_each_question_once_with_the_same_inputs(tiny):
    single = datamodule(tiny.prepared)
    reference = {int(q): p for batch in single.test_dataloader() for q, p in zip(batch["question_id"], batch["point_clouds"])}
    seen = []
    for rank in range(2):
        module = datamodule(tiny.prepared)
        module.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        for batch in module.test_dataloader():
            for qid, points, padding in zip(batch["question_id"].tolist(), batch["point_clouds"], batch["padding"]):
                if not padding:
                    seen.append(qid)
                    assert torch.equal(points, reference[qid])
    assert len(reference) == 5 and sorted(seen) == sorted(reference)  # 5 questions on 2 processes: each once


def test_missing_and_damaged_scenes_are_named(tiny, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny.prepared, root)
    (root / "scannet_data" / "scene0001_00_aligned_vert.npy").unlink()
    module = datamodule(root)
    with pytest.raises(DatasetNotFoundError, match=r"1 of the 2 scenes of the train split are missing.*scene0001_00.*frozenlm prepare sqa3d"):
        module.setup("fit")
    assert len(module.dataset("test")) == 5  # the other splits' scenes are fine
    shutil.copy(tiny.prepared / "scannet_data" / "scene0001_00_aligned_vert.npy", root / "scannet_data")
    (root / "scannet_data" / "scene0001_00_vert.npy").write_bytes(b"not an array")
    with pytest.raises(DatasetFileError, match=r"1 of the 2 scenes of the train split are damaged: scene0001_00"):
        datamodule(root).setup("fit")
    # arrays damaged after setup: the sample is dropped, named, and counted by the loader
    shutil.copy(tiny.prepared / "scannet_data" / "scene0001_00_vert.npy", root / "scannet_data")
    module = datamodule(root)
    module.setup("fit")
    bad = np.load(root / "scannet_data" / "scene0001_00_aligned_vert.npy")
    bad[3, 0] = np.nan
    np.save(root / "scannet_data" / "scene0001_00_aligned_vert.npy", bad)
    index = next(i for i, q in enumerate(module.dataset("train").questions) if q.scene_id == "scene0001_00")
    sample = module.dataset("train")[index]
    assert isinstance(sample, Unreadable) and "scene0001_00_aligned_vert.npy holds NaN" in sample.reason


def test_boxes_of_other_classes_in_reference_prepared_scenes_are_left_out(tiny, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny.prepared, root)
    path = root / "scannet_data" / "scene0002_00_aligned_bbox.npy"
    boxes = np.load(path)
    np.save(path, np.concatenate([boxes, [[0, 0, 1, 5, 0.1, 2, 1, 9]]]))  # a wall box (NYU40 1)
    sample = datamodule(root).dataset("test")[0]
    assert sample["box_label_mask"].sum() == len(boxes) and set(sample["sem_cls_label"][: len(boxes)].tolist()) == {2, 4}
    np.save(path, np.zeros((1, 8)))  # the reference's placeholder for a scan without annotation
    sample = datamodule(root).dataset("test")[0]
    assert sample["box_label_mask"].sum() == 0 and sample["vote_label_mask"].sum() > 0


def test_prepare_converts_the_raw_scans_as_the_reference_and_resumes(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    prepare("sqa3d", str(out), str(tiny.scannet), str(tiny.sqa_task))
    for scene in SCENES:
        for name in ("vert", "aligned_vert", "sem_label", "ins_label", "bbox", "aligned_bbox"):
            ours = np.load(out / "scannet_data" / f"{scene}_{name}.npy")
            theirs = np.load(tiny.prepared / "scannet_data" / f"{scene}_{name}.npy")
            assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, (scene, name)
            columns = slice(0, 6) if name.endswith("vert") else slice(None)  # normals: checked below
            np.testing.assert_allclose(ours[:, columns] if ours.ndim == 2 else ours, theirs[:, columns] if theirs.ndim == 2 else theirs, atol=1e-6)
        assert (out / "scans" / scene / f"{scene}.txt").is_file()
    normals = np.load(out / "scannet_data" / "scene0000_00_vert.npy")[:78, 6:9]  # floor triangles: normals along z
    np.testing.assert_allclose(np.abs(normals[:, 2]), 1, atol=1e-5)
    # the prepared copy works with the datamodule
    shutil.copy(tiny.prepared / "glove.p", out)
    assert len(datamodule(out).dataset("val")) == 3
    # resume: nothing redone; a deleted file redoes only its scene
    stamps = {p: p.stat().st_mtime_ns for p in (out / "scannet_data").iterdir()}
    capsys.readouterr()
    prepare("sqa3d", str(out), str(tiny.scannet))
    assert "Wrote 0 scenes (3 were already there)" in capsys.readouterr().out
    (out / "scannet_data" / "scene0001_00_bbox.npy").unlink()
    prepare("sqa3d", str(out), str(tiny.scannet))
    assert "Wrote 1 scenes (2 were already there)" in capsys.readouterr().out
    changed = {p.name for p in (out / "scannet_data").iterdir() if stamps.get(p) != p.stat().st_mtime_ns}
    assert changed == {f"scene0001_00_{n}.npy" for n in ("vert", "aligned_vert", "sem_label", "ins_label", "bbox", "aligned_bbox")}


def test_prepare_names_and_counts_missing_and_damaged_scans_and_converts_the_others(tiny, tmp_path, capsys):
    raw = tmp_path / "scannet"
    shutil.copytree(tiny.scannet, raw)
    shutil.rmtree(raw / "scans" / "scene0002_00")
    ply = raw / "scans" / "scene0001_00" / "scene0001_00_vh_clean_2.ply"
    ply.write_bytes(ply.read_bytes()[:-100])  # truncated
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main_args(["prepare", "sqa3d", "--root", str(out), "--source", str(raw), "--questions", str(tiny.sqa_task)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[0]  # one line (then where the traceback is)
    assert error.startswith("frozenlm: error: DatasetFileError: frozenlm prepare sqa3d: 2 of 3 scenes")
    assert "(1 missing, 1 damaged)" in error and "scene0001_00" in error and "truncated" in error
    assert "scene0002_00" in error
    listed = (out / "sqa3d_prepare_problems.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in listed] == ["scene0001_00", "scene0002_00"]
    assert (out / "scannet_data" / "scene0000_00_aligned_vert.npy").is_file()  # the good scan is written
    assert not list((out / "scannet_data").glob("scene0001_00_*"))
    with pytest.raises(DatasetNotFoundError, match="needs --source"):
        prepare("sqa3d", str(out), None)


def test_the_ply_reader_reads_scannets_binary_layout_and_refuses_others(tiny, tmp_path):
    path = tiny.scannet / "scans" / "scene0000_00" / "scene0000_00_vh_clean_2.ply"
    vertices, faces = read_ply(path)
    scene = make_scene("scene0000_00", 0)
    np.testing.assert_array_equal(np.stack([vertices["x"], vertices["y"], vertices["z"]], 1), scene.xyz)
    np.testing.assert_array_equal(np.stack([vertices["red"], vertices["green"], vertices["blue"]], 1), scene.rgb)
    np.testing.assert_array_equal(faces, scene.faces)
    ascii_ply = tmp_path / "a.ply"
    ascii_ply.write_text("ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nend_header\n0\n")
    with pytest.raises(SceneError, match="only binary PLY"):
        read_ply(ascii_ply)


class _CreatesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_glove_text_and_pickle_readers_agree_and_a_malicious_pickle_is_refused_unrun(tiny, tmp_path):
    text = read_glove_text(tiny.glove_text)
    pickled = read_glove_pickle(tiny.prepared / "glove.p")
    assert text.words == pickled.words and text.vectors.dtype == np.float32 == pickled.vectors.dtype
    np.testing.assert_allclose(text.vectors, pickled.vectors, atol=1e-6)  # the text keeps 6 decimals
    kept = load_word_vectors(tiny.glove_text, keep={"chair", "nowhere"})
    assert sorted(kept.words) == ["chair", "unk"]
    expected = text.vectors[[text.words.index(w) for w in ("chair", "unk")]]
    np.testing.assert_array_equal(kept.embed(["chair", "nowhere"]), expected)
    # words with spaces (glove.840B has a few), a short line, a bad number, no 'unk'
    odd = tmp_path / "odd.txt"
    odd.write_text("unk 1 2 3\n. . . 4 5 6\n")
    assert read_glove_text(odd).words == ["unk", ". . ."]
    odd.write_text("unk 1 2 3\nchair 4 5\n")
    with pytest.raises(DatasetFileError, match=r"odd\.txt, line 2: 2 values, not 3"):
        read_glove_text(odd)
    odd.write_text("unk 1 2 3\nchair 4 x 6\n")
    with pytest.raises(DatasetFileError, match=r"odd\.txt, line 2: a value is not a number"):
        read_glove_text(odd)
    odd.write_text("chair 1 2 3\n")
    with pytest.raises(DatasetFileError, match=r"odd\.txt has no vector for 'unk'"):
        load_word_vectors(odd)
    marker = tmp_path / "marker"
    evil = tmp_path / "glove.p"
    with open(evil, "wb") as file:
        pickle.dump({"unk": np.zeros(3), "chair": _CreatesAFile(marker)}, file, protocol=4)
    with pytest.raises(UnsafePickleError, match=r"glove\.p asks to call (builtins|io)\.open"):
        load_word_vectors(evil)
    assert not marker.exists()
    with open(evil, "wb") as file:
        pickle.dump([np.zeros(3)], file)
    with pytest.raises(DatasetFileError, match=r"glove\.p holds a list, not a dict"):
        read_glove_pickle(evil)
    with pytest.raises(DatasetNotFoundError, match="No word-vector file"):
        load_word_vectors(tmp_path / "missing.p")
    assert os.path.exists(tiny.prepared / "glove.p")
