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
    block = sum(p.numel() for p in plain.model.backbone.blocks[0].parameters())
    total = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert total(model) == total(plain) - 4 * block + genes * block
    assert model.model.learngenes.per_block_parameters() == block
    assert not [k for k in model.state_dict() if k.startswith("model.backbone.blocks.")]  # only genes hold block weights


def test_blocks_are_the_coefficients_combination_of_the_genes():
    torch.manual_seed(0)
    vit = create_vit("vit_tiny_patch16_224", 10, img_size=16, patch_size=8, depth=5, embed_dim=32, num_heads=2, drop_path_rate=0)
    genes = Learngenes(vit.blocks, LearngeneConfig(genes=3, basis="chebyshev"))
    for gene in genes.genes:
        for value in gene.values():
            torch.nn.init.normal_(value)
    a = coefficients("chebyshev", 5, 3)
    for layer in (0, 4):  # what the model runs block `layer` with (no tensor is left on the block)
        expected = sum(a[layer, n].item() * genes.genes[n]["attn__qkv__weight"] for n in range(3))
        torch.testing.assert_close(genes.compose(layer)["attn.qkv.weight"], expected)
        assert vit.blocks[layer].attn.qkv.weight is None


def test_frozen_genes_get_no_gradient_and_new_genes_leave_the_function_unchanged():
    torch.manual_seed(0)
    two = ImageClassifier(**VIT, llm=None, learngene={"genes": 2})
    images = torch.randn(4, 3, 16, 16)
    three = ImageClassifier(**VIT, llm=None, learngene={"genes": 3, "frozen_genes": 2})
    three.load_state_dict(two.state_dict(), strict=False)  # the new gene starts at zero
    two.eval(), three.eval()
    assert torch.equal(two(images), three(images))
    three(images).sum().backward()
    assert all(p.grad is None and not p.requires_grad for gene in three.model.learngenes.genes[:2] for p in gene.values())
    assert all(p.grad is not None for p in three.model.learngenes.genes[2].values())


def test_recompose_reproduces_the_trained_model_and_tied_and_untied_agree(tmp_path, capsys):
    fit = run_cli("fit", "image_baseline", tmp_path / "fit", *FIT, "--model.learngene", "{genes: 3, basis: chebyshev}")
    checkpoint = last_checkpoint(tmp_path / "fit")
    stored = load_checkpoint(checkpoint)["state_dict"]
    assert {k.split(".")[3] for k in stored if k.startswith("model.learngenes.")} == {"0", "1", "2"}
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
    from safetensors import safe_open

    with safe_open(tmp_path / "tied.safetensors", "pt") as file:  # what --model.init_from compares
        assert {k: file.metadata()[k] for k in ("learngene_basis", "learngene_genes")} == {"learngene_basis": "chebyshev", "learngene_genes": "2"}
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
        assert all(p.grad is not None for gene in model.model.learngenes.genes for p in gene.values()), options


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
    old = [k for k in second if k.startswith("model.learngenes.genes.0.")]
    new = [k for k in second if k.startswith("model.learngenes.genes.1.")]
    assert old and all(torch.equal(second[k], first[k]) for k in old)
    assert any(second[k].abs().sum() > 0 for k in new)  # started at zero, trained
    assert not torch.equal(second["model.backbone.head.weight"], first["model.backbone.head.weight"])  # shared parts train on


def test_a_decomposed_checkpoint_starts_a_plain_vit_of_any_depth_as_recompose_would(tmp_path):
    run_cli("fit", "image_baseline", tmp_path / "fit", *FIT, "--model.learngene", "{genes: 3, basis: legendre}")
    checkpoint = last_checkpoint(tmp_path / "fit")
    run(["recompose", "--checkpoint", str(checkpoint), "--depth", "3", "--genes", "2", "--output", str(tmp_path / "d3.safetensors")])
    depth3 = {**VIT, "backbone_kwargs": {**VIT["backbone_kwargs"], "depth": 3}}
    direct = ImageClassifier(**depth3, llm=None, init_from=str(checkpoint), init_genes=2)
    via_file = ImageClassifier(**depth3, llm=None, init_from=str(tmp_path / "d3.safetensors"))
    assert all(torch.equal(value, via_file.state_dict()[key]) for key, value in direct.state_dict().items())
    assert load_checkpoint(checkpoint)["hyper_parameters"]["learngene"]["basis"] == "legendre"
    # A tied model's unset basis follows the checkpoint's (the CLI-saved one); another basis is refused.
    tied = ImageClassifier(**depth3, llm=None, learngene={"genes": 2}, init_from=str(checkpoint), init_genes=2)
    assert tied.hparams.learngene["basis"] == "legendre"
    from frozenlm.checkpoints import InitialWeightsError

    with pytest.raises(InitialWeightsError, match="holds 3 learngenes of the legendre basis, but --model.learngene.basis is chebyshev"):
        ImageClassifier(**depth3, llm=None, learngene={"genes": 2, "basis": "chebyshev"}, init_from=str(checkpoint), init_genes=2)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(tied.eval()(images), direct.eval()(images), rtol=1e-5, atol=1e-6)


def test_a_deep_copy_composes_its_blocks_from_its_own_genes():
    """EMA keeps a deep copy of the model: its blocks must follow the copy's genes, not the original's."""
    import copy

    model = ImageClassifier(**VIT, llm=None, learngene={"genes": 2}).eval()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for value in twin.model.learngenes.genes[1].values():
            value.add_(0.1)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert not torch.equal(twin(images), model(images))
        fresh = ImageClassifier(**VIT, llm=None, learngene={"genes": 2}).eval()
        fresh.load_state_dict(twin.state_dict())
        assert torch.equal(fresh(images), twin(images))


def _tied_file(path, basis, genes=2, metadata=None):
    """A ``recompose --tied``-style file: a decomposed model's state with its basis and gene count."""
    from safetensors.torch import save_file

    model = ImageClassifier(**VIT, llm=None, learngene={"genes": genes, "basis": basis})
    with torch.no_grad():
        for gene in model.model.learngenes.genes[1:]:
            for value in gene.values():
                value.normal_(0, 0.05)  # genes that matter, so that a wrong basis changes the outputs
    info = {"format": "pt", "learngene_basis": basis, "learngene_genes": str(genes)} if metadata is None else metadata
    save_file({k: v.contiguous() for k, v in model.model.state_dict().items()}, path, metadata=info)
    return model.eval()


def test_a_learngene_file_sets_an_unset_basis_and_a_different_basis_or_too_few_genes_is_refused(tmp_path):
    from frozenlm.checkpoints import InitialWeightsError

    torch.manual_seed(0)
    source = _tied_file(tmp_path / "legendre.safetensors", "legendre", genes=3)
    path = str(tmp_path / "legendre.safetensors")
    images = torch.randn(2, 3, 16, 16)
    # The basis defaults to the file's: the model is the one that wrote it, and says so in its hyper-parameters.
    loaded = ImageClassifier(**VIT, llm=None, learngene={"genes": 3}, init_from=path).eval()
    assert loaded.hparams.learngene["basis"] == "legendre"
    with torch.no_grad():
        assert torch.equal(loaded(images), source(images))
    # Before: another basis loaded silently and gave other outputs. Now one line naming file, basis, genes, setting.
    for basis in ("chebyshev", "taylor"):
        with pytest.raises(InitialWeightsError, match=rf"{path} holds 3 learngenes of the legendre basis, but "
                           rf"--model.learngene.basis is {basis}"):  # fmt: skip
            ImageClassifier(**VIT, llm=None, learngene={"genes": 3, "basis": basis}, init_from=path)
    with pytest.raises(InitialWeightsError, match=r"holds 3 learngenes \(legendre basis\) and 3 are used, but "
                       r"--model.learngene.genes is 2"):  # fmt: skip
        ImageClassifier(**VIT, llm=None, learngene={"genes": 2}, init_from=path)
    # Fewer of the file's genes (init_genes), or more genes in the model (a later phase), still load.
    assert ImageClassifier(**VIT, llm=None, learngene={"genes": 2}, init_from=path, init_genes=2).hparams.learngene["basis"] == "legendre"
    assert ImageClassifier(**VIT, llm=None, learngene={"genes": 4}, init_from=path).hparams.learngene["genes"] == 4
    # Without a file the unset basis is Chebyshev.
    assert ImageClassifier(**VIT, llm=None, learngene={"genes": 2}).hparams.learngene["basis"] == "chebyshev"
    # A file that does not say its basis needs the setting; one whose gene count disagrees with its tensors is refused.
    _tied_file(tmp_path / "silent.safetensors", "taylor", metadata={"format": "pt"})
    with pytest.raises(InitialWeightsError, match="does not say the basis of its 2 learngenes"):
        ImageClassifier(**VIT, llm=None, learngene={"genes": 2}, init_from=str(tmp_path / "silent.safetensors"))
    with pytest.raises(InitialWeightsError, match="does not say their basis"):
        ImageClassifier(**VIT, llm=None, init_from=str(tmp_path / "silent.safetensors"))
    _tied_file(tmp_path / "odd.safetensors", "taylor", metadata={"format": "pt", "learngene_basis": "taylor", "learngene_genes": "5"})
    with pytest.raises(InitialWeightsError, match="says it holds 5 learngenes but holds 2"):
        ImageClassifier(**VIT, llm=None, learngene={"genes": 2}, init_from=str(tmp_path / "odd.safetensors"))


def test_tleg_initialisation_of_the_slope_gene():
    """AlphaXia/TLEG 6e30a5c, modules_with_LE.py: LELinear.reset_parameters (lines 80-85) draws weight_base
    and weight_ilayer from trunc_normal_(std=.02) and zeroes both biases; LELayerNorm.reset_parameters
    (lines 39-44) sets weight_base 1, bias_base 0 and both slopes 0. frozenlm's own default: slopes zero."""
    torch.manual_seed(0)
    vit = create_vit("vit_tiny_patch16_224", 10, img_size=16, patch_size=8, depth=4, embed_dim=64, num_heads=2, drop_path_rate=0)
    genes = Learngenes(vit.blocks, LearngeneConfig(genes=2, basis="linear", init="tleg"))
    base, slope = genes.genes
    for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
        for gene in (base, slope):
            weight = gene[_key(f"{name}.weight")]
            assert 0.018 < weight.std().item() < 0.022 and weight.abs().max() <= 2, name  # std .02, within [-2, 2]
            assert not gene[_key(f"{name}.bias")].any()
        assert not torch.equal(base[_key(f"{name}.weight")], slope[_key(f"{name}.weight")])
    for norm in ("norm1", "norm2"):
        assert (base[f"{norm}__weight"] == 1).all() and not base[f"{norm}__bias"].any()
        assert not slope[f"{norm}__weight"].any() and not slope[f"{norm}__bias"].any()
    ours = Learngenes(create_vit("vit_tiny_patch16_224", 10, img_size=16, patch_size=8, depth=4, embed_dim=64, num_heads=2).blocks,
                      LearngeneConfig(genes=2, basis="linear"))  # fmt: skip
    assert not any(value.any() for value in ours.genes[1].values())


def _key(name):
    return name.replace(".", "__")


def test_tlegs_auxiliary_model_averages_the_normed_tokens_without_a_class_token():
    """AlphaXia/TLEG 6e30a5c: aux_models.py line 23 builds Aux-S with use_cls_token=False; TLEG_vit.py then has
    no class token and positions for the patches only (lines 259-265), and its forward is patch embedding +
    positions, the blocks, the final norm on every token (line 347), their average (lines 292-293, 355-359),
    the head. configs/imagenet_tleg_auxs.yaml asks timm's ViT for exactly this."""
    import yaml

    from tests.cli_helpers import REPO

    config = yaml.safe_load((REPO / "configs/imagenet_tleg_auxs.yaml").read_text())["model"]["init_args"]
    assert config["learngene"] == {"genes": 2, "basis": "linear", "init": "tleg"}
    kwargs = {**VIT["backbone_kwargs"], **config["backbone_kwargs"]}
    torch.manual_seed(0)
    model = ImageClassifier(**{**VIT, "backbone_kwargs": kwargs}, llm=None, learngene=config["learngene"]).eval()
    vit = model.model.backbone
    assert vit.cls_token is None and vit.pos_embed.shape[1] == vit.patch_embed.num_patches == 4
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        x = vit.patch_embed(images) + vit.pos_embed
        for index, block in enumerate(vit.blocks):  # each block with the weights its genes compose
            x = torch.func.functional_call(block, model.model.learngenes.compose(index), (x,))
        expected = vit.head(vit.norm(x).mean(dim=1))
        torch.testing.assert_close(model(images), expected)


def test_descendant_blocks_and_head_as_tlegs_gene_transfer(tmp_path):
    """AlphaXia/TLEG 6e30a5c utils.py gene_tranfer: block i of an L-block descendant is
    i / L * W_ilayer + W_base for every parameter (lines 255-283); the head is inherited on ImageNet and
    left fresh on other datasets (load_head, lines 247-248, chosen in main.py lines 399-402):
    --model.init_head false."""
    from frozenlm.models.learngene import recompose_blocks

    torch.manual_seed(0)
    base, slope = {"w": torch.randn(4, 3)}, {"w": torch.randn(4, 3)}
    blocks = recompose_blocks([base, slope], "linear", 3)
    for i in range(3):
        torch.testing.assert_close(blocks[f"blocks.{i}.w"], i / 3 * slope["w"] + base["w"], rtol=0, atol=1e-6)

    _tied_file(tmp_path / "aux.safetensors", "linear")
    path = str(tmp_path / "aux.safetensors")
    source = load_file(path)
    five = {**VIT, "num_classes": 5}
    from frozenlm.checkpoints import InitialWeightsError

    with pytest.raises(InitialWeightsError, match="shapes"):  # another dataset's classes: the head does not fit
        ImageClassifier(**five, llm=None, init_from=path)
    torch.manual_seed(1)
    fresh = ImageClassifier(**five, llm=None).model.state_dict()
    torch.manual_seed(1)
    descendant = ImageClassifier(**five, llm=None, init_from=path, init_head=False).model.state_dict()
    assert torch.equal(descendant["backbone.head.weight"], fresh["backbone.head.weight"])
    for key in ("backbone.pos_embed", "backbone.patch_embed.proj.weight", "backbone.norm.weight"):
        assert torch.equal(descendant[key], source[key])
    inherited = ImageClassifier(**VIT, llm=None, init_from=path).model.state_dict()
    assert torch.equal(inherited["backbone.head.weight"], source["backbone.head.weight"])


@pytest.mark.parametrize(("basis", "depth", "genes", "unused"), [("fourier", 12, 12, 11), ("fourier", 6, 6, 5), ("fourier", 4, 8, 3),
                                                                  ("chebyshev", 1, 2, 1), ("taylor", 1, 3, 1)])  # fmt: skip
def test_a_gene_that_is_zero_at_every_block_is_refused(basis, depth, genes, unused):
    """Fourier's sin(2 pi k l / L) is 0 at every block l when 2k is a multiple of L (gene 11, sin 12 pi x, of
    12 genes at depth 12); at depth 1 (x = 0) every polynomial gene past the first is 0. Such a gene would
    never train: refused, naming the first such gene; one gene fewer is accepted."""
    a = coefficients(basis, depth, genes)
    assert not a[:, unused].abs().max() > 1e-9 and (a[:, :unused].abs().amax(0) > 1e-9).all()  # the premise
    kwargs = {**VIT["backbone_kwargs"], "depth": depth}
    with pytest.raises(ValueError, match=rf"gene {unused} of the {basis} basis is zero at every block of this {depth}-block ViT"):
        ImageClassifier(**{**VIT, "backbone_kwargs": kwargs}, llm=None, learngene={"genes": genes, "basis": basis})
    ImageClassifier(**{**VIT, "backbone_kwargs": kwargs}, llm=None, learngene={"genes": unused, "basis": basis})
