"""ScanQA (SQA3D's baseline) as a plain model: the outputs the losses read, the object mask in fusion and in the
frozen block, GCR's branch and auxiliary head, no hooks, and the parameter count derived from the reference's
layer definitions (SilongYong/SQA3D ``ScanQA/``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from frozenlm.errors import ConfigurationError
from frozenlm.llm import LLMConfig
from frozenlm.models import ScanQA, ScanQAConfig
from frozenlm.models.scanqa import AttFlat, MultiHeadAttention
from tests.model_checks import hooked_modules

# Tiny sizes: 2,000 points, 16 proposals, fusion width 32 (the PointNet++ widths are the reference's).
TINY = dict(
    num_answers=11, sa_points=[256, 128, 64, 32], num_proposals=16, hidden_size=32, heads=4, ffn=64,
    flat_mlp_size=16, flat_out_size=24, embedding_size=20,
)  # fmt: skip
MEAN_SIZE = (torch.arange(54, dtype=torch.float32).reshape(18, 3) / 20 + 0.1).tolist()


def tiny_model(seed: int = 0, **overrides) -> ScanQA:
    torch.manual_seed(seed)
    return ScanQA(ScanQAConfig(**(TINY | {"mean_size": MEAN_SIZE} | overrides)))


def make_batch(batch: int = 2, points: int = 2000, embedding: int = 20, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cloud = torch.cat([torch.rand(batch, points, 3, generator=g) * torch.tensor([4.0, 4.0, 2.0]),
                       torch.randn(batch, points, 4, generator=g) * 0.2], dim=-1)  # fmt: skip
    s_len, q_len = torch.tensor([5, 9, 3][:batch]), torch.tensor([7, 2, 4][:batch])
    s = torch.randn(batch, 12, embedding, generator=g) * (torch.arange(12) < s_len[:, None])[..., None]
    q = torch.randn(batch, 10, embedding, generator=g) * (torch.arange(10) < q_len[:, None])[..., None]
    return {"point_clouds": cloud, "situation_tokens": s, "situation_lengths": s_len, "question_tokens": q,
            "question_lengths": q_len}  # fmt: skip


def block(checkpoint, mode: str, aux_head: str = "separate") -> LLMConfig:
    return LLMConfig(checkpoint=str(checkpoint), mode=mode, aux_head=aux_head)


# -- outputs -----------------------------------------------------------------------------------------------------
def test_outputs_have_the_contract_keys_and_shapes():
    model, batch = tiny_model().train(), make_batch()
    outputs, branch = model(batch)
    b, p, seeds = 2, 16, 128
    expected = {
        "seed_xyz": (b, seeds, 3), "seed_inds": (b, seeds), "vote_xyz": (b, seeds, 3), "aggregated_vote_xyz": (b, p, 3),
        "objectness_scores": (b, p, 2), "center": (b, p, 3), "heading_scores": (b, p, 1),
        "heading_residuals_normalized": (b, p, 1), "heading_residuals": (b, p, 1), "size_scores": (b, p, 18),
        "size_residuals_normalized": (b, p, 18, 3), "size_residuals": (b, p, 18, 3), "sem_cls_scores": (b, p, 18),
        "answer_scores": (b, 11), "situation_prediction": (b, 7), "object_mask": (b, p),
    }  # fmt: skip
    assert {k: tuple(outputs[k].shape) for k in expected} == expected
    assert branch is None
    assert outputs["seed_inds"].dtype == torch.long and outputs["object_mask"].dtype == torch.bool
    # seed_inds index the input points: the seeds are those points (SA1's first FPS picks = SA2's centres).
    gathered = torch.stack([batch["point_clouds"][i, outputs["seed_inds"][i], :3] for i in range(b)])
    torch.testing.assert_close(gathered, outputs["seed_xyz"])
    # VoteNet's decoding: residuals scaled by pi / H and by the size clusters' means (a buffer).
    torch.testing.assert_close(outputs["heading_residuals"], outputs["heading_residuals_normalized"] * torch.pi)
    torch.testing.assert_close(outputs["size_residuals"], outputs["size_residuals_normalized"] * torch.tensor(MEAN_SIZE))
    assert "proposal.mean_size" in model.state_dict()
    assert torch.equal(outputs["object_mask"], outputs["objectness_scores"].argmax(-1) == 0)
    # Gradients reach the detector through the answer (the vote positions included) and the detection outputs.
    (outputs["answer_scores"].sum() + outputs["center"].sum()).backward()
    assert model.backbone.sa[0].mlp[0].weight.grad.abs().sum() > 0
    assert model.voting.conv3.weight.grad[:3].abs().sum() > 0  # the offsets, through the proposals' positions
    assert model.language.lstm.weight_ih_l0.grad.abs().sum() > 0


def test_without_the_situation_head():
    outputs, _ = tiny_model(use_situation_aux=False).eval()(make_batch())
    assert "situation_prediction" not in outputs


def test_eval_is_deterministic_and_text_padding_is_ignored():
    model, batch = tiny_model().eval(), make_batch()
    with torch.no_grad():
        first, _ = model(batch)
        second, _ = model(batch)
        padded = dict(batch)  # values past each length changed: nothing downstream reads them
        for key, lengths in (("situation_tokens", "situation_lengths"), ("question_tokens", "question_lengths")):
            beyond = torch.arange(batch[key].shape[1]) >= batch[lengths][:, None]
            padded[key] = torch.where(beyond[..., None], torch.randn_like(batch[key]), batch[key])
        third, _ = model(padded)
    for key in first:
        assert torch.equal(first[key], second[key]), key
        torch.testing.assert_close(first[key], third[key], msg=key)


# -- the object mask -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [None, "inline"])
def test_masked_proposals_do_not_change_the_pooled_features(tiny_llama_checkpoint, mode):
    llm = None if mode is None else block(tiny_llama_checkpoint, mode)
    model = tiny_model(llm=llm).eval()
    g = torch.Generator().manual_seed(1)
    s, q = torch.randn(2, 6, 32, generator=g), torch.randn(2, 4, 32, generator=g)
    s_pad = torch.tensor([[False] * 4 + [True] * 2, [False] * 6])
    q_pad = torch.tensor([[False] * 4, [False] * 2 + [True] * 2])
    objects = torch.randn(2, 16, 128, generator=g)
    o_pad = torch.rand(2, 16, generator=g) < 0.5
    o_pad[:, 0], o_pad[:, 1] = False, True
    with torch.no_grad():
        (s1, q1, o1), _ = model.fuse_and_pool(s, s_pad, q, q_pad, objects, o_pad)
        changed = torch.where(o_pad[..., None], torch.randn(2, 16, 128, generator=g) * 5, objects)
        (s2, q2, o2), _ = model.fuse_and_pool(s, s_pad, q, q_pad, changed, o_pad)
        unmasked = objects.clone()
        unmasked[:, 0] += 1.0
        (_, _, o3), _ = model.fuse_and_pool(s, s_pad, q, q_pad, unmasked, o_pad)
    torch.testing.assert_close((s1, q1, o1), (s2, q2, o2))
    assert not torch.allclose(o1, o3)  # an object's features do count


def test_a_scene_without_objects_attends_to_every_proposal():
    """As the reference (-1e9 fill): all proposals masked -> uniform attention, finite features."""
    model = tiny_model().eval()
    pad = torch.ones(1, 16, dtype=torch.bool)
    with torch.no_grad():
        (_, _, o), _ = model.fuse_and_pool(torch.randn(1, 3, 32), torch.zeros(1, 3, dtype=torch.bool),
                                           torch.randn(1, 3, 32), torch.zeros(1, 3, dtype=torch.bool),
                                           torch.randn(1, 16, 128), pad)  # fmt: skip
    assert torch.isfinite(o).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fully_masked_attention_is_uniform_in_every_dtype(dtype):
    torch.manual_seed(0)
    attention, pool = MultiHeadAttention(16, 4, 0.0).to(dtype), AttFlat(16, 8, 12, 0.0).to(dtype)
    x, pad = torch.randn(2, 5, 16, dtype=dtype), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        attended, pooled = attention(x, x, x, pad), pool(x, pad)
        mean_value = attention.linear_merge(attention.linear_v(x).mean(dim=1, keepdim=True)).expand_as(attended)
    assert torch.isfinite(attended).all() and torch.isfinite(pooled).all()
    torch.testing.assert_close(attended, mean_value, atol=2e-2, rtol=2e-2)  # uniform weights over the keys


# -- the frozen block -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [None, "inline", "auxiliary"])
def test_no_hooks_and_the_branch_only_in_gcr_training(tiny_llama_checkpoint, mode):
    llm = None if mode is None else block(tiny_llama_checkpoint, mode)
    model, batch = tiny_model(llm=llm), make_batch()
    assert hooked_modules(model) == []
    outputs, branch = model.train()(batch)
    assert (branch is not None) == (mode == "auxiliary")
    if branch is not None:
        assert branch.shape == (2, 16, 32) and branch.requires_grad
    with torch.no_grad():
        assert model.eval()(batch)[1] is None
    assert hooked_modules(model) == []


@pytest.mark.parametrize("aux_head", ["separate", "shared"])
def test_gcr_auxiliary_answer_logits(tiny_llama_checkpoint, aux_head):
    model = tiny_model(llm=block(tiny_llama_checkpoint, "auxiliary", aux_head)).train()
    outputs, branch = model(make_batch())
    logits = model.forward_aux_head(branch, outputs)
    assert logits.shape == (2, 11)
    assert hasattr(model, "aux_head") == (aux_head == "separate")
    logits.sum().backward()
    trained = model.aux_head if aux_head == "separate" else model.answer_head
    assert trained[0].weight.grad.abs().sum() > 0
    assert model.llm_block.adapter_in.weight.grad.abs().sum() > 0
    assert model.backbone.sa[0].mlp[0].weight.grad.abs().sum() > 0  # the trunk, through the branch's input
    if aux_head == "separate":
        assert model.answer_head[0].weight.grad is None


def test_inline_block_changes_the_answer_but_not_the_detection(tiny_llama_checkpoint):
    plain = tiny_model().eval()
    inline = tiny_model(llm=block(tiny_llama_checkpoint, "inline")).eval()
    result = inline.load_state_dict(plain.state_dict(), strict=False)
    assert result.unexpected_keys == [] and all(k.startswith("llm_block.") for k in result.missing_keys)
    batch = make_batch()
    with torch.no_grad():
        a, _ = plain(batch)
        b, _ = inline(batch)
    assert torch.equal(a["objectness_scores"], b["objectness_scores"])
    assert not torch.allclose(a["answer_scores"], b["answer_scores"])


# -- configuration -----------------------------------------------------------------------------------------------------
def test_config_from_hparams_and_errors(tiny_llama_checkpoint):
    config = ScanQAConfig.from_hparams(TINY | {"mean_size": MEAN_SIZE, "lr": 5e-4,
                                               "llm": {"checkpoint": str(tiny_llama_checkpoint)}})  # fmt: skip
    assert isinstance(config.llm, LLMConfig) and config.num_proposals == 16
    with pytest.raises(ConfigurationError, match="mean_size"):
        ScanQA(ScanQAConfig(**TINY))
    with pytest.raises(ConfigurationError, match="mean_size"):
        ScanQA(ScanQAConfig(**TINY, mean_size=MEAN_SIZE[:3]))
    with pytest.raises(ConfigurationError, match="num_answers"):
        ScanQA(ScanQAConfig(**(TINY | {"num_answers": None}), mean_size=MEAN_SIZE))
    with pytest.raises(ConfigurationError, match="sa_radii"):
        tiny_model(sa_radii=[0.2, 0.4])
    with pytest.raises(ConfigurationError, match="num_points"):
        tiny_model()(make_batch(points=200))


# -- the parameter count, derived from the reference's layer definitions ----------------------------------------------
# Sizes: SQA3D ScanQA/scripts/train.py defaults with auxi.sh's `--use_color --use_aux_situation`:
#   input features 3 (colour) + 1 (height) = 4 (train.py:152), pointnet width 1 / depth 2 (train.py:63-64),
#   seed_feat_dim 256 (:65), proposal_size 128 (:66), hidden 256 (:59), mcan heads 8 / layers 2 (:97-98),
#   flat mlp 256 / glimpses 1 / out 512 (:94-96), GloVe 300 (:149), 1 LSTM layer, unidirectional (:89-90), num_pos 7
#   (models/sqa_module.py:38); ScanNet boxes: num_heading_bin 1, num_size_cluster 18, num_class 18 (ScanRefer's
#   data/scannet/model_util_scannet.py, which SQA3D's proposal_module.py:11 imports; 18 classes as the BRIEF).
def conv_bn(i: int, o: int) -> int:  # 1x1 conv without bias (pytorch_utils.py:87, bias = bias and not bn) + BN
    return i * o + 2 * o


def linear(i: int, o: int) -> int:  # nn.Linear / nn.Conv1d(k=1) with bias
    return i * o + o


def mhatt(d: int) -> int:  # mcan_sqa_module.py:117-120: linear_v, linear_k, linear_q, linear_merge
    return 4 * linear(d, d)


def ffn(d: int) -> int:  # mcan_sqa_module.py:190-198: MLP(d, 4d, d) (FC Linear :24, then Linear :51)
    return linear(d, 4 * d) + linear(4 * d, d)


def norm(d: int) -> int:  # mcan_sqa_module.py:62-63: a_2, b_2
    return 2 * d


def attflat(d: int, mlp: int = 256, out: int = 512) -> int:  # mcan_sqa_module.py:78-90: MLP(d, mlp, 1) + linear_merge
    return linear(d, mlp) + linear(mlp, 1) + linear(d, out)


def sqa3d_reference_rows(num_answers: int) -> list[tuple[str, str, int]]:
    """(module, where the reference defines its sizes, parameters) for every module ScanQA's forward uses."""
    h, c = 256, 4
    return [
        ("sa1 [4+3,64,64,128]", "backbone_module.py:28-36; pointnet2_modules.py:205-207 (+3)",
         conv_bn(c + 3, 64) + conv_bn(64, 64) + conv_bn(64, 128)),
        ("sa2 [128+3,128,128,256]", "backbone_module.py:38-46", conv_bn(131, 128) + conv_bn(128, 128) + conv_bn(128, 256)),
        ("sa3 [256+3,128,128,256]", "backbone_module.py:48-56", conv_bn(259, 128) + conv_bn(128, 128) + conv_bn(128, 256)),
        ("sa4 [256+3,128,128,256]", "backbone_module.py:58-66", conv_bn(259, 128) + conv_bn(128, 128) + conv_bn(128, 256)),
        ("fp1 [512,256,256]", "backbone_module.py:71", conv_bn(512, 256) + conv_bn(256, 256)),
        ("fp2 [512,256,256]", "backbone_module.py:72", conv_bn(512, 256) + conv_bn(256, 256)),
        ("voting conv1-3 (bias) + bn1-2", "voting_module.py:27-31", 2 * linear(256, 256) + linear(256, 259) + 2 * 2 * 256),
        ("vote aggregation [256+3,128,128,128]", "proposal_module.py:35-42",
         conv_bn(259, 128) + conv_bn(128, 128) + conv_bn(128, 128)),
        ("proposal head 2x(conv no bias + BN), conv 97", "proposal_module.py:48-56",
         2 * (128 * 128 + 2 * 128) + linear(128, 2 + 3 + 2 * 1 + 4 * 18 + 18)),
        ("LSTM 300->256, 1 layer", "sep_lang_module.py:22-29", 4 * h * (300 + h) + 2 * 4 * h),
        ("lang_feat_linear (s and q)", "sqa_module.py:68-71", linear(h, h)),
        ("object_feat_linear", "sqa_module.py:81-84", linear(128, h)),
        ("enc_list_s, enc_list_q: 2 SA each", "sqa_module.py:86-87; mcan_sqa_module.py:211-218",
         4 * (mhatt(h) + ffn(h) + 2 * norm(h))),
        ("dec_list, dec_list_2: 2 SGA each", "sqa_module.py:88-89; mcan_sqa_module.py:239-250",
         4 * (2 * mhatt(h) + ffn(h) + 3 * norm(h))),
        ("attflat_s, attflat_q, attflat_visual", "sqa_module.py:109-111", 3 * attflat(h)),
        ("aux_reg Linear(1024,256), Linear(256,7)", "sqa_module.py:101-106", linear(1024, h) + linear(h, 7)),
        ("answer_cls Linear(1536,256), Linear(256,N)", "sqa_module.py:121-126", linear(1536, h) + linear(h, num_answers)),
    ]  # fmt: skip


# Defined by the reference but never read by its forward (no gradient): not built here.
SQA3D_UNUSED = [
    ("s_feat_linear, q_feat_linear", "sqa_module.py:73-80", 2 * linear(256, 256)),
    ("object_cls", "sqa_module.py:93-98", linear(256, 256) + linear(256, 1)),
    ("attflat_lstm_q", "sqa_module.py:112", attflat(256)),
]

# The released answer_dict.json is not in the repository nor here; 706 is the size the brief gives (unverified).
SQA3D_NUM_ANSWERS = 706


def test_parameter_count_equals_the_reference_layer_definitions():
    model = ScanQA(ScanQAConfig(num_answers=SQA3D_NUM_ANSWERS, mean_size=MEAN_SIZE))
    ours = sum(p.numel() for p in model.parameters())
    assert ours == sum(n for *_, n in sqa3d_reference_rows(SQA3D_NUM_ANSWERS))
    # Each part, so that a miscount is located.
    parts = {
        "backbone": model.backbone, "voting": model.voting, "proposal": model.proposal, "language": model.language,
        "answer_head": model.answer_head, "situation_head": model.situation_head,
    }  # fmt: skip
    rows = sqa3d_reference_rows(SQA3D_NUM_ANSWERS)
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}
    assert counts == {"backbone": sum(n for *_, n in rows[:6]), "voting": rows[6][2], "proposal": rows[7][2] + rows[8][2],
                      "language": rows[9][2], "answer_head": rows[16][2], "situation_head": rows[15][2]}  # fmt: skip


def test_the_scanqa_step_benchmark_runs_and_restores_the_point_ops():
    """benchmarks/point_ops.py --model scanqa at a tiny size (figures reported, never asserted)."""
    from frozenlm.models import scanqa

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "point_ops.py"
    spec = importlib.util.spec_from_file_location("point_ops_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    before = {name: getattr(scanqa, name) for name in ("farthest_point_sample", "query_and_group", "three_nn")}
    result = bench.measure_scanqa(batch=1, points=600, device=torch.device("cpu"), repeats=1, cpu_clock=True,
                                  sa_points=[128, 64, 32, 16], num_proposals=8)  # fmt: skip
    assert {"step_s", "fps_s", "ball_query_s", "three_nn_s", "ops_share"} <= set(result)
    assert {name: getattr(scanqa, name) for name in before} == before


@pytest.mark.slow
def test_full_size_forward_backward_at_40k_points():
    torch.manual_seed(0)
    model = ScanQA(ScanQAConfig(num_answers=SQA3D_NUM_ANSWERS, mean_size=MEAN_SIZE)).train()
    batch = make_batch(points=40000, embedding=300)
    outputs, _ = model(batch)
    assert outputs["seed_xyz"].shape == (2, 1024, 3) and outputs["aggregated_vote_xyz"].shape == (2, 256, 3)
    (outputs["answer_scores"].sum() + outputs["situation_prediction"].sum() + outputs["center"].sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
