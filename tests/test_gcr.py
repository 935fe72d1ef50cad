"""GCR auxiliary mode end to end: losses, inference without the block, gradients, the coherence callback."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from frozenlm.cli import run
from frozenlm.tasks import ImageClassifier
from tests.cli_helpers import run_cli

REPO = Path(__file__).resolve().parents[1]
GCR_CONFIGS = sorted((REPO / "configs").glob("*_gcr.yaml"))
# The command line the README gives for tracking gradient coherence.
COHERENCE = [
    "--trainer.callbacks+=frozenlm.analysis.GradientCoherenceCallback", "--trainer.callbacks.every_n_steps", "200",
]  # fmt: skip
# The ViT of tests/conf/image_llama.yaml.
TINY_VIT = dict(backbone="vit_tiny_patch16_224", img_size=16, patch_size=8)
TINY_VIT_KWARGS = dict(depth=2, embed_dim=32, num_heads=2)


@pytest.mark.parametrize("config", GCR_CONFIGS, ids=lambda p: p.name)
def test_gcr_configs_take_the_coherence_callback_besides_the_defaults(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "--config", str(config), *COHERENCE, "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "mode: auxiliary" in out and "aux_head: separate" in out and "aux_weight: 1.0" in out
    assert "frozenlm.analysis.GradientCoherenceCallback" in out and "every_n_steps: 200" in out
    assert "frozenlm.callbacks.RunSummary" in out  # appended to the CLI's default callbacks, not replacing them


@pytest.mark.parametrize("aux_head", ["separate", "shared"])
def test_fit_logs_both_losses_and_inference_is_the_plain_vit(tmp_path, tiny_llama_checkpoint, aux_head):
    cli = run_cli(
        "fit", "image_llama", tmp_path, "--model.llm.checkpoint", str(tiny_llama_checkpoint),
        "--model.llm.mode", "auxiliary", "--model.llm.aux_head", aux_head, "--model.llm.aux_weight", "0.5",
        *COHERENCE,
    )  # fmt: skip
    metrics = cli.trainer.callback_metrics
    torch.testing.assert_close(metrics["train_loss"], metrics["train_loss_main"] + 0.5 * metrics["train_loss_aux"])

    scalars = EventAccumulator(cli.trainer.logger.log_dir).Reload().Tags()["scalars"]
    assert {"grad_coherence/m_coherence", "grad_coherence/mean_cosine", "train_loss_aux"} <= set(scalars)

    model = cli.model
    block_calls = []
    model.model.llm_block.register_forward_hook(lambda *args: block_calls.append(1))
    cli.trainer.validate(model, datamodule=cli.datamodule, verbose=False)
    cli.trainer.predict(model, datamodule=cli.datamodule)
    assert not block_calls

    plain = timm.create_model(TINY_VIT["backbone"], num_classes=10, img_size=16, patch_size=8, **TINY_VIT_KWARGS)
    trunk = {k.removeprefix("model.backbone."): v for k, v in model.state_dict().items() if k.startswith("model.backbone.")}
    plain.load_state_dict(trunk)
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), plain.eval()(images), rtol=0, atol=0)
    assert not block_calls


@pytest.mark.parametrize("aux_head", ["separate", "shared"])
def test_aux_loss_trains_the_branch_and_the_trunk(tiny_llama_checkpoint, aux_head):
    torch.manual_seed(0)
    model = ImageClassifier(
        **TINY_VIT, backbone_kwargs=TINY_VIT_KWARGS, num_classes=10, drop_path_rate=0.0, mixup=0.0, cutmix=0.0,
        llm={"checkpoint": str(tiny_llama_checkpoint), "mode": "auxiliary", "aux_head": aux_head},
    )  # fmt: skip
    batch = {"image": torch.randn(8, 3, 16, 16), "label": torch.arange(8)}

    def gradients(aux_weight: float) -> dict[str, torch.Tensor | None]:
        model.model.llm_config.aux_weight = aux_weight
        model.zero_grad(set_to_none=True)
        model.train()
        with pytest.warns(UserWarning, match="self.log"):  # no trainer attached: logging is skipped
            model.training_step(batch, 0).backward()
        return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}

    without, with_aux = gradients(0.0), gradients(1.0)
    branch = ["model.llm_block.adapter_in.weight", "model.llm_block.adapter_out.weight"]
    branch += [n for n in with_aux if n.startswith("model.aux_head.")] if aux_head == "separate" else []
    for name in branch:
        assert with_aux[name].abs().sum() > 0 and without[name].abs().sum() == 0, name
    assert all(with_aux[n] is None for n in with_aux if n.startswith("model.llm_block.layers."))  # frozen
    trunk = "model.backbone.blocks.0.attn.qkv.weight"
    assert not torch.allclose(with_aux[trunk], without[trunk])  # the aux loss reaches the trunk
    head_unchanged = torch.equal(with_aux["model.backbone.head.weight"], without["model.backbone.head.weight"])
    assert head_unchanged == (aux_head == "separate")  # a shared head also learns from the aux loss
