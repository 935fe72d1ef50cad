"""`frozenlm export`: the plain timm ViT of baseline and GCR checkpoints, without the LLM."""

from __future__ import annotations

import json
import shutil

import pytest
import timm
import torch
from safetensors.torch import load_file

from frozenlm.cli import run
from frozenlm.export import export
from tests.cli_helpers import last_checkpoint, run_cli


@pytest.fixture(scope="module")
def gcr_run(tmp_path_factory, tiny_llama_checkpoint):
    """A GCR run whose LLM source folder is deleted after training: (model, checkpoint path)."""
    root = tmp_path_factory.mktemp("gcr_run")
    source = shutil.copytree(tiny_llama_checkpoint, root / "llama")
    cli = run_cli("fit", "image_llama", root, "--model.llm.checkpoint", str(source), "--model.llm.mode", "auxiliary")
    shutil.rmtree(source)
    return cli.model, last_checkpoint(root)


def test_exported_gcr_trunk_loads_into_timm_and_matches_the_task(gcr_run, tmp_path):
    model, checkpoint = gcr_run
    output = tmp_path / "out" / "model.safetensors"
    run(["export", "--checkpoint", str(checkpoint), "--output", str(output)])

    state = load_file(output)
    assert not [k for k in state if "llm_block" in k or "aux_head" in k]
    spec = json.loads(output.with_suffix(".json").read_text())
    assert spec["model_name"] == "vit_tiny_patch16_224"
    assert spec["create_model_kwargs"] == {
        "num_classes": 10, "depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 16, "patch_size": 8,
    }  # fmt: skip
    vit = timm.create_model(spec["model_name"], **spec["create_model_kwargs"])
    vit.load_state_dict(state)
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(vit.eval()(images), model.eval()(images))


def test_baseline_exports_and_inline_is_refused(tmp_path, tiny_llama_checkpoint):
    run_cli("fit", "image_baseline", tmp_path / "baseline")
    path = export(str(last_checkpoint(tmp_path / "baseline")), str(tmp_path / "baseline.safetensors"))
    assert "head.weight" in load_file(path)

    run_cli("fit", "image_llama", tmp_path / "inline", "--model.llm.checkpoint", str(tiny_llama_checkpoint))
    with pytest.raises(ValueError, match="inline"):
        export(str(last_checkpoint(tmp_path / "inline")), str(tmp_path / "inline.safetensors"))
    assert not (tmp_path / "inline.safetensors").exists()
