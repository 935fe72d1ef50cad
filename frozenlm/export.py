"""`frozenlm export`: the plain visual trunk of a trained ImageClassifier, for use without frozenlm.

A baseline (`llm: null`) or GCR (`llm.mode: auxiliary`) model is a plain timm ViT at inference:
the frozen LM block and the auxiliary head only shape training. Export writes that ViT's state dict
as `model.safetensors` and a sibling `model.json` with the timm model name and the
`timm.create_model` keyword arguments that rebuild it:

    spec = json.load(open("model.json"))
    vit = timm.create_model(spec["model_name"], **spec["create_model_kwargs"])
    vit.load_state_dict(safetensors.torch.load_file("model.safetensors"))

A ViT with a convolutional stem or CAPE positions has frozenlm's patch embedding, so its spec says
`"builder": "frozenlm.models.create_vit"` and it is rebuilt by
`frozenlm.models.create_vit(spec["model_name"], **spec["create_model_kwargs"])`; plain ViTs say
`"builder": "timm.create_model"`.

A decomposed (learngene) model is rebuilt at any depth from its first genes by `frozenlm recompose`:
untied, a plain timm ViT written as above; `--tied`, the genes themselves, for a fine-tuning that keeps
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
from safetensors import SafetensorError
from safetensors.torch import save_file
from timm.models import VisionTransformer

from frozenlm.checkpoints import model_state, newest_intact_checkpoint
from frozenlm.errors import FrozenLMError
from frozenlm.llm.mixin import TRUNK_KEY
from frozenlm.models.learngene import gene_state, genes_in, recompose_blocks
from frozenlm.models.pointbert import PointBERT
from frozenlm.models.vit import create_vit, trunk_options

TRUNK_PREFIX = "backbone."
# PointCloudClassifier hyper-parameters that define its Point-BERT.
POINTBERT_ARGS = ("num_groups", "group_size", "embed_dim", "depth", "num_heads", "encoder_dims")


class ExportError(FrozenLMError, ValueError):
    """`frozenlm export` or `frozenlm recompose` cannot use the checkpoint or an option given (a
    missing, damaged or other kind of file, a checkpoint of another model, an output it cannot write);
    the message names the file or option and the fix."""


def _load(checkpoint: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """`(hyper-parameters, state dict)` of a Lightning checkpoint, the state in its model's names (`backbone.*`,
    whether the task stored it as `model.backbone.*` or, before tasks held `self.model`, `backbone.*`), or an
    `ExportError` naming the file when it is missing, damaged or not a Lightning checkpoint (with the newest
    intact one beside it)."""
    path = Path(checkpoint)
    fix = "give a .ckpt that `frozenlm fit` wrote (runs/<name>/version_<n>/checkpoints/)"
    if not path.is_file():
        raise ExportError(f"The checkpoint {path} {'is a folder' if path.is_dir() else 'does not exist'}: {fix}.")
    try:
        # Lightning checkpoints hold plain containers and tensors: no unpickling of arbitrary classes.
        # mmap: only the tensors used are read, not the optimizer state.
        stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # truncated, empty, another format, a pickle of other objects
        intact = newest_intact_checkpoint(path.parent, exclude=path)
        instead = f"; the newest intact checkpoint beside it is {intact}" if intact else ""
        reason = (str(error).strip().splitlines() or [""])[0]
        problem = f"is damaged or not a Lightning checkpoint ({type(error).__name__}: {reason})"
        raise ExportError(f"The checkpoint {path} {problem}: {fix}{instead}.") from error
    if not isinstance(stored, dict) or not isinstance(stored.get("state_dict"), dict):
        raise ExportError(f"{path} is not a Lightning checkpoint (it holds no state_dict): {fix}.")
    trunks = {name: meta.get("pretrained_file") for name, meta in (stored.get(TRUNK_KEY) or {}).items()}
    if trunks:  # --model.freeze_trunk from --model.pretrained_file: the frozen weights are not in the checkpoint
        raise ExportError(
            f"{path} leaves its frozen trunk's weights out (--model.freeze_trunk with --model.pretrained_file; they "
            f"are in {', '.join(sorted(map(str, trunks.values())))}), so it holds no whole trunk to export: load it "
            f"with frozenlm.load_model('{path}'), which reads them from that file (SHA-256 checked), and save "
            "model.backbone.state_dict() with safetensors."
        )
    return stored.get("hyper_parameters") or {}, model_state(stored["state_dict"])


def _read(checkpoint: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """`(hyper-parameters, trunk state dict)` of a baseline or GCR checkpoint; inline ones are refused."""
    hparams, state = _load(checkpoint)
    # Checkpoints of tasks holding their network as `model` store `model.backbone.*`; older ones `backbone.*`.
    prefix = f"model.{TRUNK_PREFIX}" if any(k.startswith(f"model.{TRUNK_PREFIX}") for k in state) else TRUNK_PREFIX
    state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    llm = hparams.get("llm")
    if llm is not None and llm.get("mode", "inline") == "inline":
        raise ExportError(
            f"{checkpoint} was trained with the frozen LM block inline (llm.mode: inline, LM4VE): the block "
            "is part of that model, so the trunk alone would give different outputs. Only baseline "
            "(llm: null) and GCR (llm.mode: auxiliary) checkpoints give a plain trunk."
        )
    return hparams, state


def read_trunk(checkpoint: str | Path, decomposed: bool = False) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """`(timm model name, create_model kwargs, state dict)` of an ImageClassifier checkpoint's ViT.

    The kwargs include frozenlm's stem and position options when the ViT has them (then
    `frozenlm.models.create_vit`, not `timm.create_model`, builds it).

    Raises `ExportError` (a `ValueError`) for missing or damaged files, checkpoints of other tasks and
    inline-mode LM blocks, and for decomposed (learngene) models unless `decomposed` (then the state holds
    no blocks: `recompose` adds them).
    """
    hparams, state = _read(checkpoint)
    if hparams.get("learngene") and not decomposed:
        raise ExportError(f"{checkpoint} is a decomposed (learngene) model: write its ViT with `frozenlm recompose`.")
    if not isinstance(hparams.get("backbone"), str) or not state:
        kind = hparams.get("_class_path", "a task without a timm `backbone`")
        raise ExportError(f"{checkpoint} is a checkpoint of {kind}; export supports frozenlm.tasks.ImageClassifier.")
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
        checkpoint: a Lightning `.ckpt` of `frozenlm.tasks.ImageClassifier` trained with
            `llm: null` or `llm.mode: auxiliary`.
        output: the `.safetensors` file to write; the timm model name and `create_model` kwargs
            go to the same path with a `.json` suffix.

    Returns:
        The path of the written `.safetensors` file.
    """
    _check_output(output)
    name, kwargs, state = read_trunk(checkpoint)
    return write_trunk(name, kwargs, state, output, checkpoint)


def write_trunk(name: str, kwargs: dict[str, Any], state: dict[str, torch.Tensor], output: str | Path, source: str | Path) -> Path:
    """`output` (`.safetensors`): a ViT's state dict, and beside it the `.json` that rebuilds the model."""
    builder = "frozenlm.models.create_vit" if trunk_options(kwargs) else "timm.create_model"
    spec = {"model_name": name, "builder": builder, "create_model_kwargs": kwargs, "source_checkpoint": str(source)}
    path = _save(state, output, {"format": "pt"}, json.dumps(spec, indent=2) + "\n")
    print(f"Wrote {path} ({len(state)} tensors) and {path.with_suffix('.json')} ({builder} arguments).")
    return path


def recompose(checkpoint: str, depth: int, genes: int | None = None, output: str = "model.safetensors", tied: bool = False) -> Path:
    """Build a ViT of `depth` blocks from the first `genes` learngenes of a decomposed model
    (`--model.learngene`): block `l` is `sum_n a(l, n) A_n` with the coefficients of a depth-`depth`
    ViT ([`learngene`][frozenlm.models.learngene]); the patch embedding, tokens, positions, norm and head are the
    trained ones.

    Args:
        checkpoint: a Lightning `.ckpt` of `frozenlm.tasks.ImageClassifier` with `learngene` set.
        depth: blocks of the new ViT.
        genes: learngenes used (the first ones); None = all.
        output: `.safetensors` to write. Untied: a plain ViT's state dict and the `.json` that rebuilds
            it (as `frozenlm export`). `tied`: the genes and shared parts in the task's names, for
            `frozenlm fit --model.learngene '{genes: k}' --model.backbone_kwargs '{depth: D}'
            --model.init_from <output>` (the blocks stay tied to the genes while fine-tuning).
        tied: write the genes instead of the blocks.

    Returns:
        The path written.
    """
    if depth < 1:
        raise ExportError(f"--depth must be at least 1, got {depth}.")
    _check_output(output)
    hparams, state = _load(checkpoint)
    learngene, all_genes = hparams.get("learngene"), genes_in(state)
    if not learngene or not all_genes:
        raise ExportError(f"{checkpoint} is not a decomposed model: recompose needs a fit with --model.learngene.")
    genes = len(all_genes) if genes is None else genes
    if not 1 <= genes <= len(all_genes):
        raise ExportError(f"--genes must be in [1, {len(all_genes)}] for {checkpoint}, got {genes}.")
    if tied:
        kept = {k: v for k, v in state.items() if k.startswith(TRUNK_PREFIX)}
        kept.update(gene_state(all_genes[:genes]))
        # Read back by --model.init_from: the basis (a model's unset basis follows it) and the gene count.
        metadata = {"format": "pt", "learngene_basis": learngene["basis"], "learngene_genes": str(genes)}
        path = _save(kept, output, metadata)
        backbone_kwargs = {**(hparams.get("backbone_kwargs") or {}), "depth": depth + _removed_blocks(hparams)}
        print(f"Wrote {path}: {genes} learngenes and the shared parts. Fine-tune with the blocks tied:\n  frozenlm fit "
              f"--config <config> --model.learngene '{{genes: {genes}, basis: {learngene['basis']}}}' "
              f"--model.backbone_kwargs '{json.dumps(backbone_kwargs)}' --model.init_from {path}")  # fmt: skip
        return path
    name, kwargs, trunk = read_trunk(checkpoint, decomposed=True)
    kwargs["depth"] = depth + _removed_blocks(hparams)  # create_vit removes the conv stem's blocks again
    trunk.update(recompose_blocks(all_genes[:genes], learngene["basis"], depth))
    return write_trunk(name, kwargs, trunk, output, checkpoint)


def _check_output(output: str | Path) -> Path:
    path = Path(output)
    if path.suffix != ".safetensors":
        raise ExportError(f"--output {output} must end in .safetensors: the weights are written in that format.")
    return path


def _save(state: dict[str, torch.Tensor], output: str | Path, metadata: dict[str, str], spec: str | None = None) -> Path:
    """Write `state` to `output` (`.safetensors`) and `spec`, when given, to the `.json` beside it;
    an `ExportError` naming `--output` when the path is not `.safetensors` or cannot be written."""
    path = _check_output(output)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, path, metadata=metadata)
        if spec is not None:
            path.with_suffix(".json").write_text(spec)
    except (OSError, SafetensorError) as error:
        raise ExportError(f"Cannot write --output {path} ({type(error).__name__}: {error}): choose another path.") from error
    return path


def _removed_blocks(hparams: dict[str, Any]) -> int:
    """Blocks `create_vit` takes off the requested depth (the conv stem's)."""
    return hparams.get("stem_removed_blocks", 1) if hparams.get("stem") == "conv" else 0
