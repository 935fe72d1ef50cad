"""``frozenlm export``: the plain visual trunk of a trained ImageClassifier, for use without frozenlm.

A baseline (``llm: null``) or GCR (``llm.mode: auxiliary``) model is a plain timm ViT at inference:
the frozen LM block and the auxiliary head only shape training. Export writes that ViT's state dict
as ``model.safetensors`` and a sibling ``model.json`` with the timm model name and the
``timm.create_model`` keyword arguments that rebuild it:

    spec = json.load(open("model.json"))
    vit = timm.create_model(spec["model_name"], **spec["create_model_kwargs"])
    vit.load_state_dict(safetensors.torch.load_file("model.safetensors"))

A ViT with a convolutional stem or CAPE positions has frozenlm's patch embedding, so its spec says
``"builder": "frozenlm.models.create_vit"`` and it is rebuilt by
``frozenlm.models.create_vit(spec["model_name"], **spec["create_model_kwargs"])``; plain ViTs say
``"builder": "timm.create_model"``.

A decomposed (learngene) model is rebuilt at any depth from its first genes by ``frozenlm recompose``:
untied, a plain timm ViT written as above; ``--tied``, the genes themselves, for a fine-tuning that keeps
the blocks tied to them.

Only the Lightning checkpoint is read (its hyper-parameters and tensors); the LM source is never
opened, so export works on a machine without the LLM. Inline (LM4VE) checkpoints are refused: there
the frozen block is part of the forward path, and a trunk without it would be a different model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from timm.models import VisionTransformer

from frozenlm.models.learngene import gene_state, genes_in, recompose_blocks
from frozenlm.models.pointbert import PointBERT
from frozenlm.models.vit import create_vit, trunk_options

TRUNK_PREFIX = "backbone."
# PointCloudClassifier hyper-parameters that define its Point-BERT.
POINTBERT_ARGS = ("num_groups", "group_size", "embed_dim", "depth", "num_heads", "encoder_dims")


def _read(checkpoint: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(hyper-parameters, trunk state dict)`` of a baseline or GCR checkpoint; inline ones are refused."""
    # Lightning checkpoints hold plain containers and tensors: no unpickling of arbitrary classes.
    # mmap: only the trunk's tensors are read, not the optimizer state.
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    hparams = stored.get("hyper_parameters", {})
    state = {k.removeprefix(TRUNK_PREFIX): v for k, v in stored["state_dict"].items() if k.startswith(TRUNK_PREFIX)}
    llm = hparams.get("llm")
    if llm is not None and llm.get("mode", "inline") == "inline":
        raise ValueError(
            f"{checkpoint} was trained with the frozen LM block inline (llm.mode: inline, LM4VE): the block "
            "is part of that model, so the trunk alone would give different outputs. Only baseline "
            "(llm: null) and GCR (llm.mode: auxiliary) checkpoints give a plain trunk."
        )
    return hparams, state


def read_trunk(checkpoint: str | Path, decomposed: bool = False) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """``(timm model name, create_model kwargs, state dict)`` of an ImageClassifier checkpoint's ViT.

    The kwargs include frozenlm's stem and position options when the ViT has them (then
    ``frozenlm.models.create_vit``, not ``timm.create_model``, builds it).

    Raises ``ValueError`` for checkpoints of other tasks and for inline-mode LM blocks, and for decomposed
    (learngene) models unless ``decomposed`` (then the state holds no blocks: :func:`recompose` adds them).
    """
    hparams, state = _read(checkpoint)
    if hparams.get("learngene") and not decomposed:
        raise ValueError(f"{checkpoint} is a decomposed (learngene) model: write its ViT with `frozenlm recompose`.")
    if not isinstance(hparams.get("backbone"), str) or not state:
        kind = hparams.get("_class_path", "a task without a timm `backbone`")
        raise ValueError(f"{checkpoint} is a checkpoint of {kind}; export supports frozenlm.tasks.ImageClassifier.")
    # Architecture only: drop-path and pretrained-weight options shape training, not the model.
    kwargs = {"num_classes": hparams["num_classes"], **(hparams.get("backbone_kwargs") or {})}
    kwargs.update({k: hparams[k] for k in ("img_size", "patch_size") if hparams.get(k) is not None})
    kwargs.update(trunk_options(hparams))
    return hparams["backbone"], kwargs, state


def load_trunk(checkpoint: str | Path) -> VisionTransformer | PointBERT:
    """The checkpoint's plain trunk with its trained weights, in eval mode: the timm ViT of an
    ImageClassifier, or the Point-BERT of a PointCloudClassifier (without its head)."""
    hparams, state = _read(checkpoint)
    if all(k in hparams for k in POINTBERT_ARGS):  # a PointCloudClassifier
        model = PointBERT(**{k: hparams[k] for k in POINTBERT_ARGS})
    else:
        name, kwargs, state = read_trunk(checkpoint)
        model = create_vit(name, drop_path_rate=0.0, **kwargs)
    model.load_state_dict(state)
    return model.eval()


def export(checkpoint: str, output: str = "model.safetensors") -> Path:
    """Write the plain timm ViT of a baseline or GCR ImageClassifier checkpoint.

    Args:
        checkpoint: a Lightning ``.ckpt`` of ``frozenlm.tasks.ImageClassifier`` trained with
            ``llm: null`` or ``llm.mode: auxiliary``.
        output: the ``.safetensors`` file to write; the timm model name and ``create_model`` kwargs
            go to the same path with a ``.json`` suffix.

    Returns:
        The path of the written ``.safetensors`` file.
    """
    name, kwargs, state = read_trunk(checkpoint)
    return write_trunk(name, kwargs, state, output, checkpoint)


def write_trunk(name: str, kwargs: dict[str, Any], state: dict[str, torch.Tensor], output: str | Path, source: str | Path) -> Path:
    """``output`` (``.safetensors``): a ViT's state dict, and beside it the ``.json`` that rebuilds the model."""
    path = Path(output)
    if path.suffix != ".safetensors":
        raise ValueError(f"output must end in .safetensors, got {output}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata={"format": "pt"})
    builder = "frozenlm.models.create_vit" if trunk_options(kwargs) else "timm.create_model"
    spec = {"model_name": name, "builder": builder, "create_model_kwargs": kwargs, "source_checkpoint": str(source)}
    path.with_suffix(".json").write_text(json.dumps(spec, indent=2) + "\n")
    print(f"Wrote {path} ({len(state)} tensors) and {path.with_suffix('.json')} ({builder} arguments).")
    return path


def recompose(checkpoint: str, depth: int, genes: int | None = None, output: str = "model.safetensors", tied: bool = False) -> Path:
    """Build a ViT of ``depth`` blocks from the first ``genes`` learngenes of a decomposed model
    (``--model.learngene``): block ``l`` is ``sum_n a(l, n) A_n`` with the coefficients of a depth-``depth``
    ViT (:mod:`frozenlm.models.learngene`); the patch embedding, tokens, positions, norm and head are the
    trained ones.

    Args:
        checkpoint: a Lightning ``.ckpt`` of ``frozenlm.tasks.ImageClassifier`` with ``learngene`` set.
        depth: blocks of the new ViT.
        genes: learngenes used (the first ones); None = all.
        output: ``.safetensors`` to write. Untied: a plain ViT's state dict and the ``.json`` that rebuilds
            it (as ``frozenlm export``). ``tied``: the genes and shared parts in the task's names, for
            ``frozenlm fit --model.learngene '{genes: k}' --model.backbone_kwargs '{depth: D}'
            --model.init_from <output>`` (the blocks stay tied to the genes while fine-tuning).
        tied: write the genes instead of the blocks.

    Returns:
        The path written.
    """
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    hparams, state = stored.get("hyper_parameters", {}), stored["state_dict"]
    learngene, all_genes = hparams.get("learngene"), genes_in(state)
    if not learngene or not all_genes:
        raise ValueError(f"{checkpoint} is not a decomposed model: recompose needs a fit with --model.learngene.")
    genes = len(all_genes) if genes is None else genes
    if not 1 <= genes <= len(all_genes):
        raise ValueError(f"--genes must be in [1, {len(all_genes)}] for {checkpoint}, got {genes}.")
    if depth < 1:
        raise ValueError(f"--depth must be at least 1, got {depth}.")
    if tied:
        kept = {k: v for k, v in state.items() if k.startswith(TRUNK_PREFIX)}
        kept.update(gene_state(all_genes[:genes]))
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Read back by --model.init_from: the basis (a model's unset basis follows it) and the gene count.
        metadata = {"format": "pt", "learngene_basis": learngene["basis"], "learngene_genes": str(genes)}
        save_file({k: v.contiguous() for k, v in kept.items()}, path, metadata=metadata)
        backbone_kwargs = {**(hparams.get("backbone_kwargs") or {}), "depth": depth + _removed_blocks(hparams)}
        print(f"Wrote {path}: {genes} learngenes and the shared parts. Fine-tune with the blocks tied:\n  frozenlm fit "
              f"--config <config> --model.learngene '{{genes: {genes}, basis: {learngene['basis']}}}' "
              f"--model.backbone_kwargs '{json.dumps(backbone_kwargs)}' --model.init_from {path}")  # fmt: skip
        return path
    name, kwargs, trunk = read_trunk(checkpoint, decomposed=True)
    kwargs["depth"] = depth + _removed_blocks(hparams)  # create_vit removes the conv stem's blocks again
    trunk.update(recompose_blocks(all_genes[:genes], learngene["basis"], depth))
    return write_trunk(name, kwargs, trunk, output, checkpoint)


def _removed_blocks(hparams: dict[str, Any]) -> int:
    """Blocks ``create_vit`` takes off the requested depth (the conv stem's)."""
    return hparams.get("stem_removed_blocks", 1) if hparams.get("stem") == "conv" else 0
