"""Learngenes: a ViT's blocks as fixed combinations of shared genes, trained once and recomposed at any
depth (Lin et al., NeurIPS 2024; TLEG, AAAI 2024)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from frozenlm.cli import run
from frozenlm.models import create_vit
from frozenlm.models.learngene import BASES, LearngeneConfig, Learngenes, coefficients
from frozenlm.tasks import ImageClassifier
from tests.cli_helpers import last_checkpoint, load_checkpoint, run_cli

VIT = dict(backbone="vit_tiny_patch16_224", img_size=16, patch_size=8, num_classes=10,
           backbone_kwargs={"depth": 4, "embed_dim": 32, "num_heads": 2}, drop_path_rate=0.0, mixup=0.0, cutmix=0.0)  # fmt: skip
FIT = ["--model.backbone_kwargs", json.dumps(VIT["backbone_kwargs"]), "--model.drop_path_rate", "0"]


@pytest.mark.parametrize("depth", [1, 6, 12])
def test_coefficients_equal_their_closed_forms(depth):
    x = np.arange(depth) / depth
    chebyshev = coefficients("chebyshev", depth, 6).numpy()
    assert np.allclose(chebyshev, np.stack([np.cos(n * np.arccos(x)) for n in range(6)], 1), atol=1e-12)
    legendre = coefficients("legendre", depth, 6).numpy()
    assert np.allclose(legendre, np.stack([np.polynomial.legendre.legval(x, np.eye(6)[n]) for n in range(6)], 1), atol=1e-12)
    assert np.allclose(coefficients("taylor", depth, 4).numpy(), np.stack([x**n for n in range(4)], 1))
    fourier = [np.ones_like(x), np.sin(2 * np.pi * x), np.cos(2 * np.pi * x), np.sin(4 * np.pi * x), np.cos(4 * np.pi * x)]
    assert np.allclose(coefficients("fourier", depth, 5).numpy(), np.stack(fourier, 1), atol=1e-12)
    assert np.allclose(coefficients("linear", depth, 2).numpy(), np.stack([np.ones_like(x), x], 1))  # TLEG
    # Genes are indexed from T_0: with one gene every block, the first included, is that gene.
    for basis in BASES:
        assert (coefficients(basis, depth, 2 if basis == "linear" else 1)[:, 0] == 1).all()


def test_invalid_configurations_name_the_fix():
    with pytest.raises(ValueError, match="linear basis"):
        LearngeneConfig(genes=3, basis="linear")
    with pytest.raises(ValueError, match="frozen_genes must be in"):
        LearngeneConfig(genes=2, frozen_genes=2)
    with pytest.raises(ValueError, match="basis must be one of"):
        LearngeneConfig(genes=2, basis="bessel")


@pytest.mark.parametrize("genes", [1, 2, 4, 6])
def test_parameters_are_genes_times_one_block_plus_the_shared_parts(genes):
    plain = ImageClassifier(**VIT, llm=None)
    model = ImageClassifier(**VIT, llm=None, learngene={"genes": genes})
    block = sum(p.numel() for p in plain.backbone.blocks[0].parameters())
    total = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert total(model) == total(plain) - 4 * block + genes * block
    assert model.learngenes.per_block_parameters() == block
    assert not [k for k in model.state_dict() if k.startswith("backbone.blocks.")]  # only genes hold block weights


def test_blocks_are_the_coefficients_combination_of_the_genes():
    torch.manual_seed(0)
    vit = create_vit("vit_tiny_patch16_224", 10, img_size=16, patch_size=8, depth=5, embed_dim=32, num_heads=2, drop_path_rate=0)
    genes = Learngenes(vit.blocks, LearngeneConfig(genes=3, basis="chebyshev"))
    for gene in genes.genes:
        for value in gene.values():
            torch.nn.init.normal_(value)
    vit(torch.randn(1, 3, 16, 16))  # the blocks compose their weights as they run
    a = coefficients("chebyshev", 5, 3)
    for layer in (0, 4):
        expected = sum(a[layer, n].item() * genes.genes[n]["attn__qkv__weight"] for n in range(3))
        torch.testing.assert_close(vit.blocks[layer].attn.qkv.weight, expected)


def test_frozen_genes_get_no_gradient_and_new_genes_leave_the_function_unchanged():
    torch.manual_seed(0)
    two = ImageClassifier(**VIT, llm=None, learngene={"genes": 2})
    images = torch.randn(4, 3, 16, 16)
    three = ImageClassifier(**VIT, llm=None, learngene={"genes": 3, "frozen_genes": 2})
    three.load_state_dict(two.state_dict(), strict=False)  # the new gene starts at zero
    two.eval(), three.eval()
    assert torch.equal(two(images), three(images))
    three(images).sum().backward()
    assert all(p.grad is None and not p.requires_grad for gene in three.learngenes.genes[:2] for p in gene.values())
    assert all(p.grad is not None for p in three.learngenes.genes[2].values())


def test_recompose_reproduces_the_trained_model_and_tied_and_untied_agree(tmp_path, capsys):
    fit = run_cli("fit", "image_baseline", tmp_path / "fit", *FIT, "--model.learngene", "{genes: 3, basis: chebyshev}")
    checkpoint = last_checkpoint(tmp_path / "fit")
    stored = load_checkpoint(checkpoint)["state_dict"]
    assert {k.split(".")[2] for k in stored if k.startswith("learngenes.")} == {"0", "1", "2"}
    model = fit.model.eval()
    images = torch.randn(5, 3, 16, 16)

    def timm_model(path):
        spec = json.loads(path.with_suffix(".json").read_text())
        vit = timm.create_model(spec["model_name"], **spec["create_model_kwargs"])
        vit.load_state_dict(load_file(path))
        return vit.eval()

    # At the training depth with all genes: the trained model, exactly.
    run(["recompose", "--checkpoint", str(checkpoint), "--depth", "4", "--output", str(tmp_path / "same.safetensors")])
    with torch.no_grad():
        assert torch.equal(timm_model(tmp_path / "same.safetensors")(images), model(images))

    # 2 blocks from 2 genes: the untied ViT equals the tied model built from the same genes.
    run(["recompose", "--checkpoint", str(checkpoint), "--depth", "2", "--genes", "2", "--output", str(tmp_path / "d2.safetensors")])
    run(["recompose", "--checkpoint", str(checkpoint), "--depth", "2", "--genes", "2", "--tied", "true",
         "--output", str(tmp_path / "tied.safetensors")])  # fmt: skip
    assert "--model.init_from" in capsys.readouterr().out
    untied = timm_model(tmp_path / "d2.safetensors")
    assert len(untied.blocks) == 2
    tied = ImageClassifier(**{**VIT, "backbone_kwargs": {**VIT["backbone_kwargs"], "depth": 2}}, llm=None,
                           learngene={"genes": 2}, init_from=str(tmp_path / "tied.safetensors")).eval()  # fmt: skip
    plain = ImageClassifier(**{**VIT, "backbone_kwargs": {**VIT["backbone_kwargs"], "depth": 2}}, llm=None,
                            init_from=str(tmp_path / "d2.safetensors")).eval()  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(tied(images), untied(images), rtol=1e-5, atol=1e-6)
        assert torch.equal(plain(images), untied(images))

    # Both start a normal fit.
    for name, extra in (("untied", []), ("tied", ["--model.learngene", "{genes: 2}"])):
        depth2 = json.dumps({**VIT["backbone_kwargs"], "depth": 2})
        source = tmp_path / ("d2.safetensors" if name == "untied" else "tied.safetensors")
        run_cli("fit", "image_baseline", tmp_path / name, *FIT, "--model.backbone_kwargs", depth2, *extra,
                "--model.init_from", str(source))  # fmt: skip
        assert load_checkpoint(last_checkpoint(tmp_path / name))["global_step"] == 3


def test_learngenes_compose_with_the_lm_block_gcr_conv_stem_and_cape(tiny_llama_checkpoint):
    llm = {"checkpoint": str(tiny_llama_checkpoint), "layers": [-1]}
    images = torch.randn(2, 3, 16, 16)
    for options in ({"llm": llm}, {"llm": {**llm, "mode": "auxiliary"}}, {"llm": None, "stem": "conv"},
                    {"llm": None, "pos_embed": "cape"}):  # fmt: skip
        model = ImageClassifier(**VIT, learngene={"genes": 2}, **options)
        model.train()
        model(images).sum().backward()
        assert all(p.grad is not None for gene in model.learngenes.genes for p in gene.values()), options


def test_init_from_names_weights_that_do_not_fit(tmp_path):
    from safetensors.torch import save_file

    from frozenlm.checkpoints import InitialWeightsError

    save_file({"backbone.blocks.0.norm1.weight": torch.ones(7)}, tmp_path / "odd.safetensors")
    with pytest.raises(InitialWeightsError, match="shapes"):
        ImageClassifier(**VIT, llm=None, init_from=str(tmp_path / "odd.safetensors"))
    with pytest.raises(InitialWeightsError, match="no such file"):
        ImageClassifier(**VIT, llm=None, init_from=str(tmp_path / "missing.ckpt"))


def test_incremental_phases_train_only_the_new_genes(tmp_path):
    """ICT: phase 2 starts from phase 1's weights with a new gene; the old gene stays bit-identical."""
    run_cli("fit", "image_baseline", tmp_path / "phase1", *FIT, "--model.learngene", "{genes: 1}")
    first = load_checkpoint(last_checkpoint(tmp_path / "phase1"))["state_dict"]
    run_cli("fit", "image_baseline", tmp_path / "phase2", *FIT, "--model.learngene", "{genes: 2, frozen_genes: 1}",
            "--model.init_from", str(last_checkpoint(tmp_path / "phase1")))  # fmt: skip
    second = load_checkpoint(last_checkpoint(tmp_path / "phase2"))["state_dict"]
    old = [k for k in second if k.startswith("learngenes.genes.0.")]
    new = [k for k in second if k.startswith("learngenes.genes.1.")]
    assert old and all(torch.equal(second[k], first[k]) for k in old)
    assert any(second[k].abs().sum() > 0 for k in new)  # started at zero, trained
    assert not torch.equal(second["backbone.head.weight"], first["backbone.head.weight"])  # shared parts train on


def test_a_decomposed_checkpoint_starts_a_plain_vit_of_any_depth_as_recompose_would(tmp_path):
    run_cli("fit", "image_baseline", tmp_path / "fit", *FIT, "--model.learngene", "{genes: 3, basis: legendre}")
    checkpoint = last_checkpoint(tmp_path / "fit")
    run(["recompose", "--checkpoint", str(checkpoint), "--depth", "3", "--genes", "2", "--output", str(tmp_path / "d3.safetensors")])
    depth3 = {**VIT, "backbone_kwargs": {**VIT["backbone_kwargs"], "depth": 3}}
    direct = ImageClassifier(**depth3, llm=None, init_from=str(checkpoint), init_genes=2)
    via_file = ImageClassifier(**depth3, llm=None, init_from=str(tmp_path / "d3.safetensors"))
    assert all(torch.equal(value, via_file.state_dict()[key]) for key, value in direct.state_dict().items())
    tied = ImageClassifier(**depth3, llm=None, learngene={"genes": 2, "basis": "legendre"}, init_from=str(checkpoint), init_genes=2)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(tied.eval()(images), direct.eval()(images), rtol=1e-5, atol=1e-6)


def test_a_deep_copy_composes_its_blocks_from_its_own_genes():
    """EMA keeps a deep copy of the model: its blocks must follow the copy's genes, not the original's."""
    import copy

    model = ImageClassifier(**VIT, llm=None, learngene={"genes": 2}).eval()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for value in twin.learngenes.genes[1].values():
            value.add_(0.1)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert not torch.equal(twin(images), model(images))
        fresh = ImageClassifier(**VIT, llm=None, learngene={"genes": 2}).eval()
        fresh.load_state_dict(twin.state_dict())
        assert torch.equal(fresh(images), twin(images))
