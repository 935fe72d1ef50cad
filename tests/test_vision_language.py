"""Vision-language: METER with a frozen LM block after fusion, VQAv2 and Flickr30k in their official layouts,
the official VQA accuracy, retrieval recall, and the CLI paths (fit / validate / test / predict, 1 and 2
processes) on tiny towers and data the tests write."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from unittest.mock import patch

import lightning
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from transformers import CLIPVisionModel

from frozenlm.cli import main
from frozenlm.data import Flickr30kDataModule, VQAv2DataModule
from frozenlm.data.base import DatasetFileError, DatasetNotFoundError
from frozenlm.data.distributed import EvaluationSampler
from frozenlm.data.vqa_answers import answer_vocabulary, normalize_answer, normalize_word
from frozenlm.data.vqav2 import Question, VQASamples, soft_score
from frozenlm.metrics import RetrievalRecall, split_recalls
from frozenlm.models.meter import METER, TowerLoadError, vqa_head
from frozenlm.tasks import BaseTask, ImageTextRetrieval, VisualQuestionAnswering
from frozenlm.tasks.vision_language import IncompatibleCheckpointError
from frozenlm.tasks.vl_metrics import VQAAccuracy, retrieval_recalls, vqa_accuracy
from frozenlm.trainer_cli import ConfigurationError
from tests.cli_helpers import (
    cli_command,
    finish,
    free_port,
    last_checkpoint,
    load_checkpoint,
    run_cli,
    run_cli_subprocess,
    start_cli_subprocess,
)
from tests.data.flickr30k.data import TEMPLATES
from tests.data.flickr30k.data import write as write_flickr30k
from tests.data.meter.towers import write as write_towers
from tests.data.vqav2.data import write as write_vqav2

TINY = {"img_size": 32, "fusion_layers": 2, "fusion_hidden": 32, "fusion_heads": 2}
DDP = ["--trainer.strategy", "ddp", "--trainer.accelerator", "cpu", "--trainer.devices", "2"]


@pytest.fixture(scope="session")
def towers(tmp_path_factory) -> tuple[Path, Path]:
    texts = [t.format(colour="red", shape="square") for t in TEMPLATES] + ["What color is the circle? How many squares?"]
    return write_towers(tmp_path_factory.mktemp("towers"), texts)


@pytest.fixture(scope="session")
def vqa_root(tmp_path_factory) -> Path:
    """12 train, 6 val (18 questions), 3 test-dev images, 3 questions each. Copy it before editing."""
    return write_vqav2(tmp_path_factory.mktemp("vqav2"))


@pytest.fixture(scope="session")
def flickr_root(tmp_path_factory) -> Path:
    """8 train, 4 val, 5 test images, 5 captions each. Copy it before editing."""
    return write_flickr30k(tmp_path_factory.mktemp("flickr30k"))


def vqa_data(root: Path, **kwargs) -> VQAv2DataModule:
    return VQAv2DataModule(root, batch_size=4, img_size=32, min_answer_count=2, num_workers=0, **kwargs)


def tower_args(towers, llama=None) -> list[str]:
    args = ["--model.vision_checkpoint", str(towers[0]), "--model.text_checkpoint", str(towers[1])]
    return args + (["--model.llm.checkpoint", str(llama)] if llama else ["--model.llm", "null"])


# -- the official VQA accuracy ------------------------------------------------------------------
def test_answers_are_normalised_as_the_official_evaluation():
    assert normalize_answer("Two") == "2"
    assert normalize_answer("the dog.") == "dog"
    assert normalize_answer("dont know") == "don't know"
    assert normalize_answer("1,000") == "1000"  # a comma between digits: punctuation is deleted
    assert normalize_answer("black-and-white") == "black and white"  # otherwise replaced by a space
    assert normalize_answer("3.5") == "3.5"  # a period before a digit stays
    assert normalize_answer(" yes\n") == "yes"


def test_vqa_accuracy_matches_hand_computed_cases():
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    # 2 of 10 said "2": each leave-one-out subset has 2 matches (-> 2/3) unless it leaves a match out (1/3).
    answers = ["2", "2"] + ["3"] * 8
    assert vqa_accuracy("two", answers) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    # 3 matches: subsets keep 3 (-> 1) or 2 (-> 2/3).
    assert vqa_accuracy("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx((7 * 1 + 3 * 2 / 3) / 10)
    assert vqa_accuracy("green", ["red"] * 3 + ["blue"] * 7) == 0.0
    # Human answers are normalised for punctuation only, and only when they differ: "Yes" never matches.
    assert vqa_accuracy("yes", ["Yes"] * 10) == 0.0
    assert vqa_accuracy("black and white", ["black-and-white"] * 4 + ["no"] * 6) == 1.0
    assert vqa_accuracy("yes", ["yes!"] * 4 + ["no"] * 6) == 0.0  # sic: "yes!" becomes "yes " (not stripped)


def test_the_2016_and_2021_rules_of_the_official_script_differ_where_it_changed():
    # GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py. 2016 (before commit a013f00, lines
    # 86-98): the prediction is stripped and fully normalised; human answers are never stripped and get
    # processPunctuation only, only when they differ. 2021 (a013f00, lines 87-105): both are stripped; only
    # when the human answers differ are both fully normalised (processPunctuation + processDigitArticle).
    humans = ["two"] * 3 + ["2"] + ["three"] * 6
    assert vqa_accuracy("2", humans, "2016") == pytest.approx(9 * (1 / 3) / 10)  # "two" stays "two": 1 match
    assert vqa_accuracy("2", humans, "2021") == 1.0  # "two" -> "2": 4 matches
    assert vqa_accuracy("yes", [" yes"] * 10, "2016") == 0.0  # human answers are not stripped
    assert vqa_accuracy("yes", [" yes"] * 10, "2021") == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 10, "2016") == 1.0  # the prediction is always normalised
    assert vqa_accuracy("Yes", ["yes"] * 10, "2021") == 0.0  # ... only when the humans disagree
    assert vqa_accuracy("yes", ["yes!"] * 4 + ["no"] * 6, "2021") == 1.0  # "yes!" -> "yes " -> "yes"
    for rule in ("2016", "2021"):  # where the rules agree
        assert vqa_accuracy("yes", ["Yes"] * 10, rule) == 0.0
        assert vqa_accuracy("red", ["red"] * 3 + ["blue"] * 7, rule) == pytest.approx((7 * 1 + 3 * 2 / 3) / 10)
    metric = VQAAccuracy(rule="2021")
    metric.update(["2"], [humans], ["number"])
    assert float(metric.compute()["number"]) == 1.0
    with pytest.raises(ValueError, match="2016"):
        vqa_accuracy("yes", ["yes"] * 10, "2017")


def test_the_metric_reports_each_answer_type_and_sums_exactly():
    metric = VQAAccuracy()
    metric.update(["yes", "2"], [["yes"] * 10, ["2", "2"] + ["3"] * 8], ["yes/no", "number"])
    metric.update(["red"], [["blue"] * 10], ["other"])
    values = metric.compute()
    assert values["yes/no"] == 1.0 and values["other"] == 0.0
    assert values["number"] == pytest.approx(0.6)
    assert values["overall"] == pytest.approx((1.0 + 0.6 + 0.0) / 3)


# -- retrieval recall -----------------------------------------------------------------------------
def brute_force_recalls(scores: torch.Tensor, owners: torch.Tensor, k: int) -> tuple[float, float]:
    image_hits = 0
    for image, row in enumerate(scores.tolist()):
        ranked = sorted(range(len(row)), key=lambda t: -row[t])[:k]
        image_hits += any(owners[t] == image for t in ranked)
    text_hits = 0
    for text in range(scores.shape[1]):
        column = scores[:, text].tolist()
        ranked = sorted(range(len(column)), key=lambda i: -column[i])[:k]
        text_hits += int(owners[text]) in ranked
    return image_hits / len(scores), text_hits / scores.shape[1]


def test_recall_matches_brute_force():
    generator = torch.Generator().manual_seed(0)
    owners = torch.arange(7).repeat_interleave(5)
    scores = torch.randn(7, 35, generator=generator)
    scores[torch.arange(35) % 7, torch.arange(35)] += 1.0  # some signal
    recalls = retrieval_recalls(scores, owners, ks=(1, 2, 5))
    for k in (1, 2, 5):
        tr, ir = brute_force_recalls(scores, owners, k)
        assert recalls[f"tr_r{k}"].item() == pytest.approx(tr) and recalls[f"ir_r{k}"].item() == pytest.approx(ir)



def shares_of(images: int, processes: int, batch_size: int = 2):
    """Each process's evaluation batches of a split of ``images``, as the sampler deals them: ``(index, padding)``."""
    for rank in range(processes):
        share = list(EvaluationSampler(range(images), processes, rank))
        for start in range(0, len(share), batch_size):
            dealt = share[start : start + batch_size]
            yield torch.tensor([i if i >= 0 else -i - 1 for i in dealt]), torch.tensor([i < 0 for i in dealt])


def test_the_recall_metric_is_the_recall_of_the_gathered_rows_without_padding():
    generator = torch.Generator().manual_seed(1)
    owners = torch.arange(7).repeat_interleave(5)
    scores = torch.randn(7, 35, generator=generator)
    # The hand gathering it replaces: every process's rows, padding marked -1, through split_recalls.
    rows = [(index.masked_fill(padding, -1), scores[index]) for index, padding in shares_of(7, 3)]
    expected = split_recalls(torch.cat([i for i, _ in rows]), torch.cat([s for _, s in rows]), owners, "test")
    metric = RetrievalRecall(ks=(1, 5, 10))
    metric.start(owners, "test")
    for index, padding in shares_of(7, 3):
        metric.update(*BaseTask.scored({"padding": padding}, index, scores[index]))
    assert metric.compute() == expected and set(expected) == {f"{d}_r{k}" for d in ("tr", "ir") for k in (1, 5, 10)}
    # Part of the split (the sanity check, limit_val_batches): the scored images and their captions, said.
    metric.start(owners, "val")
    metric.update(torch.tensor([4, 1]), scores[[4, 1]])
    with pytest.warns(UserWarning, match="val recall over the 2 scored images of 7"):
        part = metric.compute()
    assert part == split_recalls(torch.tensor([4, 1]), scores[[4, 1]], owners, "val", warn=False)
    texts = torch.cat([torch.arange(5, 10), torch.arange(20, 25)])  # images 1 and 4's captions
    assert part == retrieval_recalls(scores[[1, 4]][:, texts], torch.arange(2).repeat_interleave(5))


RECALL_WORKER = """
import json, sys, torch, torch.distributed as dist
from frozenlm.metrics import RetrievalRecall
dist.init_process_group("gloo")
rank, results = dist.get_rank(), {}
for images in (7, 1):  # 7: shares of 4 and 3 (+1 padding); 1: process 1 holds only padding, so scores nothing
    scores = torch.randn(images, 5 * images, generator=torch.Generator().manual_seed(images))
    metric = RetrievalRecall(ks=(1, 2, 5))
    metric.start(torch.arange(images).repeat_interleave(5), "test")
    for index, padding in json.loads(sys.argv[1])[str(images)][rank]:
        index = torch.tensor([i for i, p in zip(index, padding) if not p], dtype=torch.long)
        if len(index):
            metric.update(index, scores[index])
    results[images] = {k: float(v) for k, v in metric.compute().items()}
print(json.dumps(results))
dist.destroy_process_group()
"""


@pytest.mark.slow  # two fresh Pythons importing torch: ~10 s of CPU
def test_the_recall_metric_of_two_gloo_processes_is_the_recall_of_one():
    shares = {}
    for images in (7, 1):
        batches = list(shares_of(images, 2))
        half = len(batches) // 2
        shares[images] = [[(i.tolist(), p.tolist()) for i, p in batches[:half]], [(i.tolist(), p.tolist()) for i, p in batches[half:]]]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    processes = [start_cli_subprocess([sys.executable, "-c", RECALL_WORKER, json.dumps(shares)], **env, RANK=str(rank))
                 for rank in range(2)]  # fmt: skip
    results = [finish(process, timeout=300) for process in processes]
    assert all(r.returncode == 0 for r in results), [r.stderr[-2000:] for r in results]
    for images in (7, 1):
        scores = torch.randn(images, 5 * images, generator=torch.Generator().manual_seed(images))
        one = retrieval_recalls(scores, torch.arange(images).repeat_interleave(5), ks=(1, 2, 5))
        for result in results:  # every process computes the recalls of the whole split
            assert json.loads(result.stdout)[str(images)] == {k: float(v) for k, v in one.items()}


# -- data ---------------------------------------------------------------------------------------
def test_vqav2_reads_the_official_files(vqa_root, tmp_path):
    data = vqa_data(vqa_root, cache_dir=tmp_path / "cache")
    assert data.num_classes == len(data.answers) and "yes" in data.answers and "2" in data.answers
    assert "two" not in data.answers  # normalised
    assert len(list((tmp_path / "cache").glob("vqav2_answers_*.json"))) == 1  # cached
    assert vqa_data(vqa_root, cache_dir=tmp_path / "cache").answers == data.answers
    sample = data.dataset("val")[1]  # "Is there a ...?"
    assert sample["image"].shape == (3, 32, 32) and sample["answer_type"] == "yes/no" and len(sample["answers"]) == 10
    yes = sum(a == "yes" for a in sample["answers"])  # METER counts the answers as written: "Yes" does not count
    assert sample["targets"][data.answer_index["yes"]] == pytest.approx(soft_score(yes))
    assert [soft_score(n) for n in range(6)] == pytest.approx([0, 0.3, 0.6, 0.9, 1.0, 1.0])
    answerable = [q for q in data.questions("train2014") if set(q.answers) & set(data.answers)]
    assert data.split_questions("train") == answerable and len(data.split_questions("val")) == 18
    assert len(data.split_questions("predict")) == 9 and data.dataset("predict")[0]["answers"] == []
    # METER's split: train on train + val, hold the last val images out, with all their questions.
    held = vqa_data(vqa_root, cache_dir=tmp_path / "c2", train_splits=["train2014", "val2014"], holdout=2)
    validation = held.split_questions("val")
    val_images = sorted({q.image.name for q in held.questions("val2014")})
    assert {q.image.name for q in validation} == set(val_images[-2:]) and len(validation) == 6
    training = held.split_questions("train")
    assert not {q.question_id for q in validation} & {q.question_id for q in training}
    assert {q.image.name for q in training if "val2014" in q.image.name} <= set(val_images[:-2])


def test_answer_vocabulary_targets_and_training_questions_are_meters(vqa_root, tmp_path):
    # METER's meter/utils/write_vqa.py make_arrow: the vocabulary counts normalize_word(multiple_choice_answer)
    # over train2014 + val2014 and keeps answers given >= 9 times (here 3); targets count the human answers
    # as written against it; train/val questions without an in-vocabulary answer are filtered out.
    main = ["Two", "2", "two.", "yes", "Yes", "no", "red ", " red", "red"]
    assert answer_vocabulary(main, 3) == ["2", "red"]  # "Two", "two." -> "2"; " red" / "red " -> "red"
    assert answer_vocabulary(main, 2) == ["2", "red", "yes"]
    assert normalize_word("Two.") == "2" and normalize_word(" ?yes") == "yes" and normalize_word("1,000") == "1000"
    questions = [
        Question(1, "How many?", vqa_root / "train2014" / "x.jpg", ["2"] * 3 + ["two"] * 7, "number"),
        Question(2, "How many?", vqa_root / "train2014" / "x.jpg", ["two"] * 10, "number"),
    ]
    samples = VQASamples(questions, {"2": 0, "red": 1}, transform=None)
    assert soft_score(3) == pytest.approx(0.9)  # three annotators wrote "2"; the seven "two" do not count
    with patch("frozenlm.data.vqav2.read_image", return_value=torch.zeros(3, 4, 4)):
        assert samples[0]["targets"].tolist() == pytest.approx([0.9, 0.0])
        assert samples[1]["targets"].tolist() == [0.0, 0.0]
    # The vocabulary counts val2014's main answers even when training on train2014 alone (METER's).
    data = vqa_data(vqa_root, cache_dir=tmp_path / "cache")
    expected = answer_vocabulary([a["multiple_choice_answer"] for split in ("train2014", "val2014")
                                  for a in json.loads((vqa_root / f"v2_mscoco_{split}_annotations.json").read_text())["annotations"]], 2)
    assert data.answers == expected
    only_train = vqa_data(vqa_root, cache_dir=tmp_path / "cache", answer_splits=["train2014"])
    assert only_train.answers != data.answers
    # A training question none of whose answers is in the vocabulary is left out; evaluation keeps it.
    root = Path(shutil.copytree(vqa_root, tmp_path / "vqa"))
    for split in ("train2014", "val2014"):
        path = root / f"v2_mscoco_{split}_annotations.json"
        content = json.loads(path.read_text())
        for answer in content["annotations"][0]["answers"]:
            answer["answer"] = "zebra"  # in no vocabulary
        path.write_text(json.dumps(content))
    edited = vqa_data(root, cache_dir=tmp_path / "c3", train_splits=["train2014"])
    first = {split: json.loads((root / f"v2_mscoco_{split}_annotations.json").read_text())["annotations"][0]["question_id"]
             for split in ("train2014", "val2014")}
    assert first["train2014"] not in {q.question_id for q in edited.split_questions("train")}
    assert len(edited.split_questions("train")) == len(edited.questions("train2014")) - 1
    assert first["val2014"] in {q.question_id for q in edited.split_questions("val")}


def test_vqav2_errors_name_the_file_and_the_fix(vqa_root, tmp_path):
    root = Path(shutil.copytree(vqa_root, tmp_path / "vqa"))
    (root / "v2_mscoco_train2014_annotations.json").unlink()
    with pytest.raises(DatasetNotFoundError, match="v2_mscoco_train2014_annotations.json.*visualqa.org"):
        vqa_data(root)
    shutil.copy(vqa_root / "v2_mscoco_train2014_annotations.json", root)
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text('{"questions": [')
    with pytest.raises(DatasetFileError, match="v2_OpenEnded_mscoco_val2014_questions.json is not valid JSON"):
        vqa_data(root).split_questions("val")
    questions = json.loads((vqa_root / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())
    questions["questions"].append({"image_id": 1, "question": "Why?", "question_id": 999})
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(questions))
    with pytest.raises(DatasetFileError, match="no annotation of question 999"):
        vqa_data(root).split_questions("val")
    with pytest.raises(DatasetNotFoundError, match="is not a directory"):
        vqa_data(tmp_path / "nowhere")


def test_an_unreadable_image_drops_its_question_and_is_named(vqa_root, tmp_path):
    root = Path(shutil.copytree(vqa_root, tmp_path / "vqa"))
    broken = sorted((root / "val2014").glob("*.jpg"))[0]
    broken.write_bytes(b"not a jpeg")
    data = vqa_data(root)
    batch = next(iter(data._loader(data.dataset("val"))))
    # The image's three questions are dropped, the fourth of the batch stays.
    assert len(batch["question_id"]) == 1 and len(batch["unreadable"]) == 3
    assert all(broken.name in entry for entry in batch["unreadable"])


def test_flickr30k_reads_karpathys_splits_and_draws_negatives_of_other_images(flickr_root, tmp_path):
    data = Flickr30kDataModule(flickr_root, batch_size=2, img_size=32, negatives=3, num_workers=0)
    assert [len(data.splits[s]) for s in ("train", "val", "test")] == [8, 4, 5]
    texts, owners = data.captions("test")
    assert len(texts) == 25 and owners.tolist() == [i for i in range(5) for _ in range(5)]
    pairs = data.train_dataloader().dataset
    sample = pairs[7]  # image 1, caption 2
    image_captions = set(data.splits["train"][1].captions)
    assert sample["texts"][0] == data.splits["train"][1].captions[2] and len(sample["texts"]) == 4
    own = {c for c in sample["texts"][1:] if c in image_captions}
    others = {c for i, img in enumerate(data.splits["train"]) if i != 1 for c in img.captions}
    assert all(c in others for c in sample["texts"][1:]) and not own - others
    # METER's get_false_image: another image of the split per sample, for the ITM loss.
    images = {i: data.transform(Image.open(img.path).convert("RGB")) for i, img in enumerate(data.splits["train"])}
    assert any(torch.equal(sample["false_image"], images[i]) for i in images if i != 1)
    assert not torch.equal(sample["false_image"], images[1])
    assert "false_image" not in Flickr30kDataModule(flickr_root, img_size=32, false_image=False, num_workers=0).train_dataloader().dataset[7]
    root = Path(shutil.copytree(flickr_root, tmp_path / "f30k"))
    annotations = json.loads((root / "dataset_flickr30k.json").read_text())
    del annotations["images"][0]["sentences"]
    (root / "dataset_flickr30k.json").write_text(json.dumps(annotations))
    with pytest.raises(DatasetFileError, match="dataset_flickr30k.json is not in Karpathy's format"):
        Flickr30kDataModule(root, img_size=32)
    shutil.rmtree(root / "flickr30k-images")
    with pytest.raises(DatasetNotFoundError, match="flickr30k-images"):
        Flickr30kDataModule(root, img_size=32)


# -- model --------------------------------------------------------------------------------------
def test_towers_that_cannot_load_are_named(towers, tiny_llama_checkpoint, tmp_path):
    with pytest.raises(TowerLoadError, match="--model.vision_checkpoint.*nowhere.*openai/clip-vit-base-patch32"):
        VisualQuestionAnswering(str(tmp_path / "nowhere"), str(towers[1]), num_classes=5, **TINY)
    with pytest.raises(TowerLoadError, match="--model.vision_checkpoint"):
        VisualQuestionAnswering(str(tiny_llama_checkpoint), str(towers[1]), num_classes=5, **TINY)


def test_text_padding_changes_nothing_with_the_block_on_text_and_image_tokens(towers, tiny_llama_checkpoint, vqa_root):
    model = VisualQuestionAnswering(str(towers[0]), str(towers[1]), num_classes=5, llm_tokens="all", **TINY,
                                    llm={"checkpoint": str(tiny_llama_checkpoint)}).eval()  # fmt: skip
    images = torch.randn(2, 3, 32, 32)
    short, long = "Is it red?", "What color is the circle in the middle of the picture on the left?"
    with torch.no_grad():
        alone = model(images[:1], [short])
        padded = model(images, [short, long])
    assert model.model.tokenize([short, long])[1][0].eq(0).any()  # the short question was padded
    torch.testing.assert_close(alone[0], padded[0], atol=1e-5, rtol=1e-5)


def test_optimizer_groups_follow_meters_multipliers(towers, tiny_llama_checkpoint):
    model = VisualQuestionAnswering(str(towers[0]), str(towers[1]), num_classes=5, llm={"checkpoint": str(tiny_llama_checkpoint)},
                                    head_lr_mult=50, fusion_lr_mult=5, llm_lr_mult=10, **TINY)  # fmt: skip
    groups = model.optimizer_parameters(lr=1e-5, weight_decay=0.01)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.model.named_parameters())
    assert lr_of[id(named["head.0.weight"])] == (pytest.approx(5e-4), 0.01)
    assert lr_of[id(named["head.0.bias"])] == (pytest.approx(5e-4), 0.0)
    assert lr_of[id(named["meter.text_layers.0.self_attn.in_proj_weight"])][0] == pytest.approx(5e-5)
    assert lr_of[id(named["meter.vision.embeddings.patch_embedding.weight"])][0] == pytest.approx(1e-5)
    assert lr_of[id(named["meter.text.embeddings.word_embeddings.weight"])][0] == pytest.approx(1e-5)
    # METER's name-based groups (meter/modules/meter_utils.py lines 187-188): the token-type (modality)
    # embeddings are neither head nor "cross_modal" and keep x1.
    assert lr_of[id(named["meter.modality_embeddings.weight"])][0] == pytest.approx(1e-5)
    assert lr_of[id(named["meter.image_transform.weight"])][0] == pytest.approx(5e-5)
    adapters = [n for n in named if n.startswith("llm_block.") and named[n].requires_grad]
    assert adapters and all(lr_of[id(named[n])][0] == pytest.approx(1e-4) for n in adapters)
    frozen = [p for n, p in named.items() if n.startswith("llm_block.layers.")]
    assert frozen and not any(id(p) in lr_of for p in frozen)


def test_retrieval_rank_head_keeps_the_towers_lr(towers):
    # METER's Flickr30k fine-tuning scores pairs with `rank_output`, which is not among its `head_names`
    # (meter/modules/meter_utils.py line 187): it trains at the base lr, not x lr_mult_head.
    model = ImageTextRetrieval(str(towers[0]), str(towers[1]), llm=None, head_lr_mult=5, fusion_lr_mult=5, **TINY)
    lr_of = {id(p): g["lr"] for g in model.optimizer_parameters(lr=1e-5, weight_decay=0.01) for p in g["params"]}
    assert lr_of[id(model.model.rank_head.weight)] == pytest.approx(1e-5)
    assert lr_of[id(model.model.meter.text_layers[0].linear1.weight)] == pytest.approx(5e-5)


def test_retrieval_adds_meters_itm_loss_through_a_frozen_itm_head(towers, flickr_root):
    # METER's Flickr30k fine-tuning (meter/config.py line 188: itm 0.5 + irtr 1; meter_module.py lines 151-157:
    # rank_output starts as itm_score's "match" row and itm_score is frozen; objectives.py lines 44-68:
    # half the pairs, at random, get a false image).
    model = ImageTextRetrieval(str(towers[0]), str(towers[1]), llm=None, **TINY).eval()  # no dropout: comparable
    assert model.hparams.itm_weight == 0.5
    assert not any(p.requires_grad for p in model.model.itm_head.parameters())
    assert torch.equal(model.model.rank_head.weight, model.model.itm_head.weight[1:])
    assert not {id(p) for p in model.model.itm_head.parameters()} & {
        id(p) for g in model.optimizer_parameters(lr=1e-5, weight_decay=0.01) for p in g["params"]}
    data = Flickr30kDataModule(flickr_root, batch_size=4, img_size=32, negatives=3, num_workers=0)
    batch = next(iter(data.train_dataloader()))
    captions = [texts[0] for texts in batch["texts"]]
    ids, mask = model.model.tokenize(captions)
    text, padding = model.model.encode_text(ids, mask), mask == 0
    image = model.model.encode_image(batch["image"])
    torch.manual_seed(3)
    loss = model.itm_loss(batch, text, padding, image)
    torch.manual_seed(3)
    matched = torch.cat([torch.ones(2), torch.zeros(2)])[torch.randperm(4)]
    assert matched.sum() == 2  # exactly half matched
    expected = []
    for i in range(4):  # pair by pair, the image or the false image with the sample's own caption
        pixels = batch["image"][i : i + 1] if matched[i] else batch["false_image"][i : i + 1]
        features, _ = model.model.forward_features(pixels, *model.model.tokenize([captions[i]]))
        expected.append(F.cross_entropy(model.model.itm_head(features), matched[i : i + 1].long()))
    torch.testing.assert_close(loss, torch.stack(expected).mean(), atol=1e-5, rtol=1e-5)
    loss.backward()
    assert model.model.meter.text_layers[0].linear1.weight.grad.abs().sum() > 0 and model.model.itm_head.weight.grad is None


def test_the_itm_loss_without_false_images_is_refused_in_one_line(towers, flickr_root, tmp_path):
    args = ["--data.root", str(flickr_root), *tower_args(towers), "--data.false_image", "false"]
    with pytest.raises(ConfigurationError, match="--model.itm_weight 0.5 needs.*--data.false_image true"):
        run_cli("fit", "retrieval_llama", tmp_path, *args)


def test_vqa_head_is_meters():
    # METER's vqa_classifier (meter/modules/meter_module.py lines 105-110), hs = 768, 3,129 answers:
    # Linear(2hs, 2hs) -> LayerNorm(2hs) -> GELU -> Linear(2hs, 3129).
    hs, answers = 768, 3129
    expected = (2 * hs * 2 * hs + 2 * hs) + 2 * (2 * hs) + (2 * hs * answers + answers)
    head = vqa_head(2 * hs, answers)
    assert sum(p.numel() for p in head.parameters()) == expected == 7_173_177
    assert [tuple(m.weight.shape) for m in head if hasattr(m, "weight")] == [(1536, 1536), (1536,), (3129, 1536)]


def test_clip_tower_is_meters_layers_minus_one_with_positions_resized_once(towers):
    # METER's CLIP (meter/modules/clip_model.py): `Transformer` builds `layers - 1` blocks (line 55), the
    # position embedding is resized once by `adapt_position_encoding` (lines 193-220: bicubic on the patch
    # grid, CLS kept) and `ln_post` normalises every token (line 91).
    model = VisualQuestionAnswering(str(towers[0]), str(towers[1]), num_classes=5, llm=None, **{**TINY, "img_size": 48})
    full = CLIPVisionModel.from_pretrained(str(towers[0])).eval()
    layers = full.config.num_hidden_layers
    assert len(model.model.meter.vision.encoder.layers) == layers - 1
    weight = full.embeddings.position_embedding.weight.detach()
    grid = weight[1:].reshape(4, 4, -1).permute(2, 0, 1).unsqueeze(0)  # 32 px / patch 8 -> 48 px / patch 8
    resized = F.interpolate(grid, size=(6, 6), mode="bicubic").squeeze(0).permute(1, 2, 0).reshape(36, -1)
    ours = model.model.meter.vision.embeddings.position_embedding.weight.detach()
    torch.testing.assert_close(ours, torch.cat([weight[:1], resized]))
    images = torch.randn(2, 3, 48, 48)
    model.eval()
    with torch.no_grad():
        hidden = full(pixel_values=images, interpolate_pos_encoding=True, output_hidden_states=True).hidden_states
        expected = full.post_layernorm(hidden[layers - 1])  # after the first layers - 1 blocks
        tokens = model.model.meter.vision.post_layernorm(model.model.meter.vision(pixel_values=images).last_hidden_state)
    torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-5)


def test_fusion_ffn_has_no_dropout_after_its_activation(towers):
    # BERT's cross layer (METER's BertCrossLayer: BertIntermediate then BertOutput) drops only the FFN's
    # output before the residual; PyTorch's TransformerDecoderLayer also drops after the activation.
    model = VisualQuestionAnswering(str(towers[0]), str(towers[1]), num_classes=5, llm=None, **TINY).train()
    layer = model.model.meter.image_layers[0]
    hidden = torch.randn(3, 5, 32)
    inner = layer.linear2(layer.dropout(layer.activation(layer.linear1(hidden))))
    torch.testing.assert_close(inner, layer.linear2(layer.activation(layer.linear1(hidden))))
    assert layer.dropout3.p == pytest.approx(0.1)  # the output dropout stays


def test_vqa_questions_keep_meters_50_tokens(towers):
    model = VisualQuestionAnswering(str(towers[0]), str(towers[1]), num_classes=5, llm=None, **TINY)
    assert model.hparams.max_text_len == 50  # METER's task_finetune_vqa_clip_bert (meter/config.py line 154)
    assert model.model.tokenize([" ".join(["red"] * 80)])[0].shape[1] == 50
    assert model.val_accuracy.rule == model.test_accuracy.rule == "2016"  # the default scoring rule
    later = VisualQuestionAnswering(str(towers[0]), str(towers[1]), num_classes=5, llm=None, vqa_rule="2021", **TINY)
    assert later.val_accuracy.rule == later.test_accuracy.rule == "2021"


def test_a_checkpoint_of_the_older_architecture_is_refused_in_one_line(towers, vqa_root, tmp_path):
    args = ["--data.root", str(vqa_root), *tower_args(towers), "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1"]
    run_cli("fit", "vqa_llama", tmp_path, *args)
    stored = load_checkpoint(last_checkpoint(tmp_path))
    assert stored.pop("frozenlm_vision_language_version") == 2
    old = tmp_path / "old.ckpt"
    torch.save(stored, old)  # as frozenlm wrote them before the format was recorded
    with pytest.raises(IncompatibleCheckpointError, match=r"older frozenlm \(format 1, today's 2\).*VQA head") as error:
        run_cli("validate", "vqa_llama", tmp_path, *args, "--ckpt_path", str(old))
    assert "\n" not in str(error.value)  # the CLI prints a FrozenLMError as one line, exit status 2


def test_gcr_trains_an_auxiliary_branch_and_evaluates_without_it(towers, tiny_llama_checkpoint, vqa_root):
    data = vqa_data(vqa_root)
    model = VisualQuestionAnswering(str(towers[0]), str(towers[1]), num_classes=data.num_classes, **TINY,
                                    llm={"checkpoint": str(tiny_llama_checkpoint), "mode": "auxiliary"})  # fmt: skip
    batch = next(iter(data._loader(data.dataset("val"))))
    calls = []
    model.model.llm_block.register_forward_hook(lambda *args: calls.append(1))  # counts the block's runs
    logits, aux_logits = model.head_logits(batch)
    assert calls and aux_logits is not None and aux_logits.shape == logits.shape
    model.model.aux_head.zero_grad()
    model.loss(aux_logits, batch["targets"]).backward()
    assert model.model.aux_head[0].weight.grad.abs().sum() > 0
    model.eval()
    calls.clear()
    with torch.no_grad():
        assert model.head_logits(batch)[1] is None and not calls



# -- the model: one plain module, built without Lightning -----------------------------------------
def test_each_task_builds_its_model_without_a_trainer_and_trains_that_model(towers, tiny_llama_checkpoint):
    llm = {"checkpoint": str(tiny_llama_checkpoint), "mode": "auxiliary"}
    for task, extra, heads in ((VisualQuestionAnswering, {"num_classes": 5}, {"head", "aux_head"}),
                               (ImageTextRetrieval, {}, {"itm_head", "rank_head", "aux_rank_head"})):  # fmt: skip
        flags = {"vision_checkpoint": str(towers[0]), "text_checkpoint": str(towers[1]), "llm": llm, **TINY, **extra}
        torch.manual_seed(0)
        model = task.build_model(flags)  # a plain dict of the task's flags: no trainer, no Lightning
        assert type(model) is METER and not isinstance(model, lightning.LightningModule)
        assert {name for name, _ in model.named_children()} == {"meter", "llm_block"} | heads  # the checkpoints' names
        hooks = [(name, kind) for name, module in model.named_modules()
                 for kind in ("_forward_hooks", "_forward_pre_hooks") if getattr(module, kind)]  # fmt: skip
        assert not hooks
        torch.manual_seed(0)
        trained = task(str(towers[0]), str(towers[1]), llm=llm, **TINY, **extra)
        assert trained.model.config == model.config  # the task's own defaults too (VQA's 50 tokens, retrieval's 384 px)
        assert model.config.max_text_len == (50 if task is VisualQuestionAnswering else 40)
        state = trained.state_dict()
        assert set(state) == {f"model.{key}" for key in model.state_dict()}
        assert all(torch.equal(value, state[f"model.{key}"]) for key, value in model.state_dict().items())
    # The import paths of the tasks before they had a file each still work.
    from frozenlm.tasks import vision_language

    assert vision_language.VisualQuestionAnswering is VisualQuestionAnswering and vision_language.vqa_head is vqa_head
    assert vision_language.ImageTextRetrieval is ImageTextRetrieval



def test_each_task_declares_the_metric_its_configs_keep_the_best_of():
    configs = Path(__file__).resolve().parents[1] / "configs"
    for task, pattern in ((VisualQuestionAnswering, "vqav2_meter*.yaml"), (ImageTextRetrieval, "flickr30k_meter*.yaml")):
        assert (task.monitor, task.monitor_mode) == {VisualQuestionAnswering: ("val_vqa_acc", "max"),
                                                     ImageTextRetrieval: ("val_r_mean", "max")}[task]  # fmt: skip
        for path in configs.glob(pattern):  # configs that still name the monitored metric name the task's
            callbacks = yaml.safe_load(path.read_text())["trainer"].get("callbacks", [])
            monitored = {(c["init_args"]["monitor"], c["init_args"].get("mode", "min"))
                         for c in callbacks if "monitor" in c.get("init_args", {})}  # fmt: skip
            assert monitored <= {(task.monitor, task.monitor_mode)}, path

@pytest.mark.parametrize("llm_tokens", ["visual", "all"])
def test_the_model_returns_gcrs_branch_in_training_and_none_in_eval(towers, tiny_llama_checkpoint, llm_tokens):
    flags = {"vision_checkpoint": str(towers[0]), "text_checkpoint": str(towers[1]), "num_classes": 5, **TINY,
             "llm_tokens": llm_tokens, "llm": {"checkpoint": str(tiny_llama_checkpoint), "mode": "auxiliary"}}  # fmt: skip
    model = VisualQuestionAnswering.build_model(flags).train()
    images, (ids, mask) = torch.randn(2, 3, 32, 32), model.tokenize(["Is it red?", "What color is the circle on the left?"])
    torch.manual_seed(0)
    features, branch = model.forward_features(images, ids, mask)
    # The branch: the frozen block on the fused tokens (text padding masked for `all`), pooled as the main path.
    torch.manual_seed(0)
    text, image = model.meter.fuse(model.encode_text(ids, mask), mask == 0, model.encode_image(images))
    if llm_tokens == "visual":
        expected = model.meter.pool(text, model.llm_block(image))
    else:
        tokens = model.llm_block(torch.cat([text, image], 1), torch.cat([mask == 0, torch.zeros(image.shape[:2], dtype=torch.bool)], 1))
        expected = model.meter.pool(tokens[:, : text.shape[1]], tokens[:, text.shape[1] :])
    torch.testing.assert_close(branch, expected)
    torch.testing.assert_close(features, model.meter.pool(text, image))  # GCR's main path runs without the block
    assert model.forward_aux_head(branch).shape == (2, 5) and model.forward_aux_head(branch) is not None
    model.eval()
    with patch.object(model.llm_block, "forward", side_effect=AssertionError("the block ran in eval")), torch.no_grad():
        features, branch = model.forward_features(images, ids, mask)
    assert branch is None and model.forward_head(features).shape == (2, 5)


def test_checkpoints_hold_the_model_and_those_written_before_load_to_the_same_metrics(towers, tiny_llama_checkpoint, vqa_root, tmp_path):
    args = ["--data.root", str(vqa_root), *tower_args(towers, tiny_llama_checkpoint), "--model.llm_tokens", "all",
            "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1"]  # fmt: skip
    run_cli("fit", "vqa_llama", tmp_path, *args)
    checkpoint = last_checkpoint(tmp_path)
    stored = load_checkpoint(checkpoint)
    assert {key.split(".")[0] for key in stored["state_dict"]} == {"model"} and list(stored["frozen_lm"]) == ["model.llm_block"]
    # As frozenlm wrote them before the model was a module of its own (`meter.*`, `head.*`, the block `llm_block`).
    for entry in ("state_dict", "frozen_lm"):
        stored[entry] = {key.removeprefix("model."): value for key, value in stored[entry].items()}
    torch.save(stored, tmp_path / "older.ckpt")
    new, old = (run_cli("validate", "vqa_llama", tmp_path / name, *args, "--ckpt_path", str(path)).trainer.callback_metrics
                for name, path in (("new", checkpoint), ("old", tmp_path / "older.ckpt")))  # fmt: skip
    assert "val_vqa_acc" in new and {k: float(v) for k, v in old.items()} == {k: float(v) for k, v in new.items()}


# -- through the CLI ------------------------------------------------------------------------------
def test_vqa_fit_test_and_predict_through_the_cli(towers, tiny_llama_checkpoint, vqa_root, tmp_path):
    args = ["--data.root", str(vqa_root), *tower_args(towers, tiny_llama_checkpoint)]
    fit = run_cli("fit", "vqa_llama", tmp_path, *args)
    checkpoint = last_checkpoint(tmp_path)
    stored = load_checkpoint(checkpoint)
    assert stored["vqa_answers"] == fit.datamodule.answers
    assert any(k.startswith("model.llm_block.adapter_in.") for k in stored["state_dict"])
    assert not any(".llm_block.layers." in k for k in stored["state_dict"])  # the frozen layer is not stored
    test = run_cli("test", "vqa_llama", tmp_path, *args, "--ckpt_path", str(checkpoint))
    metrics = {k: float(v) for k, v in test.trainer.callback_metrics.items()}
    assert {"test_vqa_acc", "test_vqa_acc_yesno", "test_vqa_acc_number", "test_vqa_acc_other"} <= set(metrics)
    # The logged accuracy is the official one of the model's answers, recomputed here question by question.
    model, data = test.model, test.datamodule
    model.eval()
    scores, kinds = [], []
    with torch.no_grad():
        for batch in data._loader(data.dataset("val")):
            logits, _ = model.head_logits(batch)
            for top, answers, kind in zip(logits.argmax(-1).tolist(), batch["answers"], batch["answer_type"]):
                scores.append(vqa_accuracy(model.answers[top], answers))
                kinds.append(kind)
    assert metrics["test_vqa_acc"] == pytest.approx(sum(scores) / len(scores), abs=1e-6)
    number = [s for s, k in zip(scores, kinds) if k == "number"]
    assert metrics["test_vqa_acc_number"] == pytest.approx(sum(number) / len(number), abs=1e-6)
    output = tmp_path / "results.json"
    run_cli("predict", "vqa_llama", tmp_path, *args, "--ckpt_path", str(checkpoint), "--predictions.output", str(output))
    results = json.loads(output.read_text())
    questions = json.loads((vqa_root / "v2_OpenEnded_mscoco_test-dev2015_questions.json").read_text())["questions"]
    assert [r["question_id"] for r in results] == sorted(q["question_id"] for q in questions)
    assert set(results[0]) == {"question_id", "answer"} and all(r["answer"] in model.answers for r in results)


def test_a_checkpoint_refuses_another_answer_vocabulary(towers, vqa_root, tmp_path, monkeypatch, capsys):
    """One line, the checkpoint's size first, each vocabulary with the settings it was built with."""
    args = ["--data.root", str(vqa_root), *tower_args(towers), "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1"]
    run_cli("fit", "vqa_llama", tmp_path, *args)
    checkpoint = last_checkpoint(tmp_path)
    stored = load_checkpoint(checkpoint)
    trained = len(stored["vqa_answers"])  # min_answer_count 2 (the config's)
    data = len(VQAv2DataModule(vqa_root, img_size=32, min_answer_count=3, cache_dir=tmp_path / "cache").answers)
    assert trained != data
    command = cli_command("validate", "vqa_llama", tmp_path, *args, "--data.min_answer_count", "3", "--ckpt_path", str(checkpoint))
    monkeypatch.setattr("sys.argv", ["frozenlm", *command[3:]])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("frozenlm: error:")] == [(
        f"frozenlm: error: AnswerVocabularyError: The checkpoint {checkpoint} has an answer vocabulary of {trained} "
        "answers (built with --data.answer_splits [train2014, val2014] --data.min_answer_count 2), the data's has "
        f"{data} answers (built with --data.answer_splits [train2014, val2014] --data.min_answer_count 3): its answer head does "
        "not fit. Pass the training run's --data.answer_splits and --data.min_answer_count (and its annotation files)."
    )]


def test_vqav2_refuses_answers_that_are_not_text_when_reading(vqa_root, tmp_path):
    """``"answer": 2`` used to pass the reader and stop an epoch half-way (AttributeError in the answer
    normalisation); now the file and the question are named before anything runs."""
    root = Path(shutil.copytree(vqa_root, tmp_path / "vqa"))
    for split, key in (("train2014", "answers"), ("val2014", "multiple_choice_answer")):
        path = root / f"v2_mscoco_{split}_annotations.json"
        original = path.read_text()
        annotations = json.loads(original)
        entry = annotations["annotations"][5]  # "How many ...?"
        if key == "answers":
            entry["answers"][3]["answer"] = 2
        else:
            entry["multiple_choice_answer"] = 2
        path.write_text(json.dumps(annotations))
        question = entry["question_id"]
        error = re.escape(f"{path}: question {question} has {'answer' if key == 'answers' else key} 2 (int), not text")
        with pytest.raises(DatasetFileError, match=error):  # both read for the answer vocabulary, as the datamodule is built
            vqa_data(root, cache_dir=tmp_path / "cache")
        path.write_text(original)
    # Splits outside the vocabulary's are read when the run is set up, before the first training step.
    data = vqa_data(root, cache_dir=tmp_path / "cache", answer_splits=["train2014"])
    path = root / "v2_mscoco_val2014_annotations.json"
    annotations = json.loads(path.read_text())
    annotations["annotations"][5]["answers"][0]["answer"] = 2
    path.write_text(json.dumps(annotations))
    with pytest.raises(DatasetFileError, match=f"question {annotations['annotations'][5]['question_id']} has answer 2"):
        data.setup("fit")
    path.write_text(original)
    questions = root / "v2_OpenEnded_mscoco_test-dev2015_questions.json"
    listing = json.loads(questions.read_text())
    listing["questions"][1]["image_id"] = "1"
    questions.write_text(json.dumps(listing))
    with pytest.raises(DatasetFileError, match=f"question {listing['questions'][1]['question_id']} has image_id '1'"):
        vqa_data(root, cache_dir=tmp_path / "cache").setup("predict")


def test_an_empty_vqa_validation_split_stops_the_run_at_setup(towers, vqa_root, tmp_path):
    root = Path(shutil.copytree(vqa_root, tmp_path / "vqa"))
    for name in ("v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json"):
        content = json.loads((root / name).read_text())
        content["questions" if "questions" in content else "annotations"] = []
        (root / name).write_text(json.dumps(content))
    runs = tmp_path / "runs"
    questions = root / "v2_OpenEnded_mscoco_val2014_questions.json"
    expected = re.escape(f"The validation split is empty: {questions} lists no question (--data.val_split val2014)")
    with pytest.raises(DatasetFileError, match=expected + ".*--data.holdout"):
        run_cli("fit", "vqa_llama", runs, "--data.root", str(root), *tower_args(towers))
    assert not list(runs.rglob("*.ckpt"))  # no epoch ran
    # Holding questions of a training split out is the fix the message offers; it validates on them.
    held = vqa_data(root, train_splits=["train2014"], val_split="train2014", holdout=2)
    held.setup("fit")
    assert len(held.split_questions("val")) == 6  # 2 images, 3 questions each


def test_retrieval_fit_test_and_predict_through_the_cli(towers, tiny_llama_checkpoint, flickr_root, tmp_path):
    args = ["--data.root", str(flickr_root), *tower_args(towers, tiny_llama_checkpoint), "--model.llm_tokens", "all"]
    run_cli("fit", "retrieval_llama", tmp_path, *args)
    checkpoint = last_checkpoint(tmp_path)
    test = run_cli("test", "retrieval_llama", tmp_path, *args, "--ckpt_path", str(checkpoint))
    metrics = {k: float(v) for k, v in test.trainer.callback_metrics.items()}
    # Recall against brute force: every image x caption pair scored one at a time through the model.
    model, data = test.model.eval(), test.datamodule
    texts, owners = data.captions("test")
    with torch.no_grad():
        images = torch.stack([data.test_dataloader().dataset[i]["image"] for i in range(5)])
        scores = torch.stack([
            torch.cat([model(images[i : i + 1], [t]) for t in texts]).squeeze(-1) for i in range(5)
        ])  # fmt: skip
    for k in (1, 5, 10):
        tr, ir = brute_force_recalls(scores, owners, k)
        assert metrics[f"test_tr_r{k}"] == pytest.approx(tr) and metrics[f"test_ir_r{k}"] == pytest.approx(ir)
    output = tmp_path / "rankings.json"
    run_cli("predict", "retrieval_llama", tmp_path, *args, "--ckpt_path", str(checkpoint), "--predictions.output", str(output))
    rankings = json.loads(output.read_text())
    assert [r["image"] for r in rankings] == [p.name for p, _ in data.splits["test"]]
    best = scores.argmax(dim=1).tolist()
    assert [r["captions"][0] for r in rankings] == [texts[b] for b in best]


def test_retrieval_on_part_of_a_split_says_so_and_scores_the_part(towers, flickr_root, tmp_path):
    args = ["--data.root", str(flickr_root), *tower_args(towers), "--data.batch_size", "2"]
    with pytest.warns(UserWarning, match="recall over the 2 scored images of 4"):
        validate = run_cli("validate", "retrieval_llama", tmp_path, *args, "--trainer.limit_val_batches", "1")
    model, data = validate.model.eval(), validate.datamodule
    texts, owners = data.captions("val")
    with torch.no_grad():
        images = torch.stack([data.val_dataloader().dataset[i]["image"] for i in range(2)])
        scores = model.score_images(images, *_encoded(model, texts))[:, :10]  # the two images' own captions only
    tr, ir = brute_force_recalls(scores, owners[:10], 1)
    metrics = validate.trainer.callback_metrics
    assert float(metrics["val_tr_r1"]) == pytest.approx(tr) and float(metrics["val_ir_r1"]) == pytest.approx(ir)


def _encoded(model, texts):
    input_ids, attention_mask = model.model.tokenize(texts)
    return model.model.encode_text(input_ids, attention_mask), attention_mask == 0


def test_an_unreadable_evaluation_image_stops_retrieval(towers, flickr_root, tmp_path):
    root = Path(shutil.copytree(flickr_root, tmp_path / "f30k"))
    broken = root / "flickr30k-images" / Flickr30kDataModule(root, img_size=32).splits["val"][0].path.name
    Image.new("RGB", (4, 4)).save(broken)
    broken.write_bytes(broken.read_bytes()[:20])
    with pytest.raises(DatasetFileError, match="Unreadable evaluation image"):
        # Even where the fraction allowed for training would let it pass.
        run_cli("validate", "retrieval_llama", tmp_path, "--data.root", str(root), *tower_args(towers),
                "--data.max_unreadable_fraction", "1")  # fmt: skip


@pytest.mark.slow
def test_two_processes_score_each_question_and_image_once(towers, tiny_llama_checkpoint, vqa_root, flickr_root, tmp_path):
    """VQA on 18 val questions and retrieval on 5 test images: the metrics and predictions of 2 processes are
    those of 1 (neither split divides evenly over 2 with these batches)."""
    for config, root, names in (("vqa_llama", vqa_root, ("test_vqa_acc", "test_vqa_acc_other", "test_loss")),
                                ("retrieval_llama", flickr_root, ("test_ir_r1", "test_tr_r1", "test_r_mean"))):  # fmt: skip
        args = ["--data.root", str(root), *tower_args(towers, tiny_llama_checkpoint)]
        run_cli("fit", config, tmp_path / config, *args, "--trainer.limit_train_batches", "2")
        checkpoint = str(last_checkpoint(tmp_path / config))
        dump = ["--trainer.callbacks+=tests.cli_helpers.DumpMetrics", "--ckpt_path", checkpoint]
        run_cli("test", config, tmp_path / config / "p1", *args, *dump, "--trainer.callbacks.path", str(tmp_path / config / "m1.json"))
        result = run_cli_subprocess("test", config, tmp_path / config / "p2", *args, *DDP, *dump,
                                    "--trainer.callbacks.path", str(tmp_path / config / "m2.json"))  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        one, two = (json.loads((tmp_path / config / f"m{n}.json").read_text()) for n in (1, 2))
        for name in names:
            assert two[name] == pytest.approx(one[name], abs=1e-5), name
        outputs = [tmp_path / config / f"predictions{n}.json" for n in (1, 2)]
        run_cli("predict", config, tmp_path / config / "p1", *args, "--ckpt_path", checkpoint, "--predictions.output", str(outputs[0]))
        result = run_cli_subprocess("predict", config, tmp_path / config / "p2", *args, *DDP, "--ckpt_path", checkpoint,
                                    "--predictions.output", str(outputs[1]))  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        first, second = (json.loads(p.read_text()) for p in outputs)
        key = "question_id" if config == "vqa_llama" else "image"
        assert [r[key] for r in second] == [r[key] for r in first]
        if config == "vqa_llama":
            assert [r["answer"] for r in second] == [r["answer"] for r in first]
