"""A frozen CLIP model as a teacher: its vision tower's final tokens, its projection into the joint
image-text space, and its text tower's class embeddings for zero-shot classification.

Two sources, both well-kept libraries: transformers' `CLIPModel` (a local Hugging Face folder or a hub
id such as `openai/clip-vit-base-patch16`) and open_clip (`open_clip:<architecture>/<pretrained>`, e.g.
`open_clip:EVA02-B-16/merged2b_s8b_b131k`, where `<pretrained>` is a tag open_clip knows or a local
weights file), whose vision tower is its own ViT or a timm ViT trunk (the EVA02 family). Either way the
teacher is frozen (no gradient, eval mode) and its tokens are the vision tower's output through its final
LayerNorm, CLS first: `[B, 1 + grid * grid, width]`; at another grid than the one it was trained at, its
position table is interpolated (bicubic, as transformers' CLIP does). The tokens are the towers' outputs: no
hook is put on any of the teacher's modules (transformers' output recording, which installs forward hooks on
its layers when a config asks for hidden states or attentions, is switched off).

A teacher must be whole: weights that lack a tensor of the model (or hold one in another shape), a folder of
another kind of model, or an open_clip architecture without weights are refused with `TeacherLoadError`
(one line) instead of running with random tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn
from transformers import AutoTokenizer, CLIPConfig, CLIPModel, PreTrainedModel
from transformers.utils import logging as transformers_logging

from frozenlm.errors import FrozenLMError
from frozenlm.llm.checkpoint import local_folder

OPEN_CLIP_PREFIX = "open_clip:"


class TeacherLoadError(FrozenLMError, OSError):
    """A teacher that cannot be loaded; the message names it and the fix."""


class CLIPTeacher(nn.Module):
    """The interface the alignment and zero-shot code use; subclasses wrap one library.

    Attributes:
        image_size: the side the teacher was trained at; patch_size: its patch side; width: its token
        width; mean, std: its input normalisation.
    """

    image_size: int
    patch_size: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def freeze(self) -> CLIPTeacher:
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> CLIPTeacher:
        return super().train(False)  # always in eval mode: no dropout, fixed statistics

    def tokens(self, images: Tensor) -> Tensor:
        """`[B, 1 + N, width]`: the vision tower's final tokens (after its final norm) of normalised images."""
        raise NotImplementedError

    def inputs(self, images: Tensor, grid: int, mean=None, std=None) -> Tensor:
        """A batch as the teacher takes it: normalised by `mean` / `std` (the data's; None: the teacher's), that
        undone and the teacher's applied, resized so that the teacher's patch grid is `grid x grid`, in its dtype."""
        if mean is not None and std is not None and (tuple(mean), tuple(std)) != (tuple(self.mean), tuple(self.std)):
            shape = (1, 3, 1, 1)
            pixels = images * images.new_tensor(std).view(shape) + images.new_tensor(mean).view(shape)
            images = (pixels - images.new_tensor(self.mean).view(shape)) / images.new_tensor(self.std).view(shape)
        side = grid * self.patch_size
        if images.shape[-1] != side or images.shape[-2] != side:
            images = F.interpolate(images, size=(side, side), mode="bicubic", align_corners=False)
        return images.to(self.dtype)

    @torch.no_grad()
    def image_tokens(self, images: Tensor, grid: int, mean=None, std=None) -> Tensor:
        """`tokens` in float32 of a batch as the data gives it (see `inputs`); the teacher, which is
        outside any trained module tree, follows the batch's device."""
        return self.to(images.device).tokens(self.inputs(images, grid, mean, std)).float()

    def embed(self, cls_tokens: Tensor) -> Tensor:
        """`project` in float32 of CLS tokens at the teacher's width (its own, or a student's projected)."""
        return self.to(cls_tokens.device).project(cls_tokens.to(self.dtype)).float()

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the teacher's weights (its inputs are cast to it)."""
        return next(self.parameters()).dtype

    @property
    def joint_dim(self) -> int:
        """The width of the joint image-text space (`project`'s output)."""
        with torch.no_grad():
            device = next(self.parameters()).device
            return self.project(torch.zeros(1, self.width, dtype=self.dtype, device=device)).shape[-1]

    def project(self, cls_tokens: Tensor) -> Tensor:
        """`[B, embed_dim]`: CLS tokens (as `tokens` gives them) in the joint image-text space."""
        raise NotImplementedError

    def encode_texts(self, texts: list[str]) -> Tensor:
        """`[T, embed_dim]`: the text tower's embeddings of `texts`."""
        raise NotImplementedError

    def logit_scale(self) -> Tensor:
        """The learned temperature of CLIP's logits (`exp` of its log; 100 for OpenAI's CLIP)."""
        raise NotImplementedError


class HuggingFaceCLIPTeacher(CLIPTeacher):
    """transformers' `CLIPModel` from a local folder or a hub id; every tensor of the model must be in it.

    `weights=False` builds the architecture alone on the meta device (its config is still read), to check a
    teacher spec without reading weights."""

    def __init__(self, source: str, revision: str | None = None, weights: bool = True) -> None:
        super().__init__()
        location, kind = source, None
        try:
            location = str(local_folder(source) or source)
            config = CLIPConfig.get_config_dict(location, revision=revision)[0]
            kind = config.get("model_type")
            if kind == "clip" and weights:  # tensors missing or of other shapes are refused below in one line
                with _quiet():  # (not in the library's report of them)
                    self.model, info = CLIPModel.from_pretrained(location, revision=revision, dtype=torch.float32,
                                                                 output_loading_info=True, ignore_mismatched_sizes=True)  # fmt: skip
                self.tokenizer = AutoTokenizer.from_pretrained(location, revision=revision)
            elif kind == "clip":
                with torch.device("meta"):
                    self.model, self.tokenizer = CLIPModel(CLIPConfig.from_dict(config)), None
                info = {"missing_keys": [], "mismatched_keys": []}
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise TeacherLoadError(
                f"--model.teacher {source!r} cannot be loaded as a CLIP model ({type(error).__name__}: {_one_line(error)}). "
                "Give a local Hugging Face CLIP folder (model and tokenizer), a hub id such as openai/clip-vit-base-patch16, "
                "or open_clip:<architecture>/<pretrained>."
            ) from None
        if kind != "clip":  # refused before building it: a CLIP model whose every tensor would be missing
            raise TeacherLoadError(
                f"--model.teacher {source}: {location} holds a {kind!r} model (config.json's model_type), not a CLIP model "
                "('clip'). Give a Hugging Face CLIP folder or hub id, or open_clip:<architecture>/<pretrained>."
            )
        mismatched = [k[0] if isinstance(k, tuple) else k for k in info["mismatched_keys"]]
        _refuse_missing(source, location, info["missing_keys"], mismatched)
        vision = self.model.config.vision_config
        self.image_size, self.patch_size, self.width = vision.image_size, vision.patch_size, vision.hidden_size
        # CLIP's preprocessing constants live in the processor; OpenAI's are what every HF CLIP uses.
        self.mean, self.std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
        for module in self.model.modules():  # transformers records them through forward hooks: the teacher has none
            if isinstance(module, PreTrainedModel):
                module.config.output_hidden_states = module.config.output_attentions = False
        self.freeze()

    def tokens(self, images: Tensor) -> Tensor:
        vision = self.model.vision_model
        # Another input size: transformers interpolates the position table (resample_positions does the same).
        interpolate = images.shape[-1] != self.image_size
        hidden = vision(pixel_values=images, interpolate_pos_encoding=interpolate).last_hidden_state
        return vision.post_layernorm(hidden)

    def project(self, cls_tokens: Tensor) -> Tensor:
        return self.model.visual_projection(cls_tokens)

    def encode_texts(self, texts: list[str]) -> Tensor:
        device = self.model.logit_scale.device
        encoded = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(device)
        return self.model.get_text_features(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).pooler_output

    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.exp()


class OpenCLIPTeacher(CLIPTeacher):
    """An open_clip model (`pip install open_clip_torch`) whose vision tower is a ViT pooled by its CLS token:
    open_clip's own `VisionTransformer` (`ViT-B-16`, ...) or a timm ViT trunk (`TimmModel`: the EVA02
    family, `EVA02-B-16`, ...).

    `pretrained` is a tag open_clip knows for `architecture` (downloaded by open_clip) or a local weights
    file, which must hold every tensor of the model; without one the teacher is refused (a random teacher
    teaches nothing). `weights=False` builds the architecture alone on the meta device (nothing read or
    downloaded), to check a teacher spec.

    The tokens are the tower's final tokens through its final norm (the ViT's `ln_post`, the trunk's
    `norm`), CLS first, register tokens left out; the projection is what `encode_image` applies to the
    normed CLS (`proj`, or the trunk's head and open_clip's head). For a patch grid other than the one it
    was trained at, the position table is interpolated as for a Hugging Face teacher (`resample_positions`;
    EVA02's rotary embedding is recomputed for the grid by timm).
    """

    def __init__(self, architecture: str, pretrained: str | None, weights: bool = True) -> None:
        super().__init__()
        spec = f"{OPEN_CLIP_PREFIX}{architecture}" + (f"/{pretrained}" if pretrained else "")
        try:
            import open_clip
        except ImportError:
            raise TeacherLoadError(
                f"--model.teacher {spec} needs open_clip: pip install open_clip_torch (or the frozenlm[uta] extra)."
            ) from None
        if architecture not in open_clip.list_models():
            raise TeacherLoadError(
                f"--model.teacher {spec}: open_clip has no architecture {architecture!r}; open_clip.list_models() names them "
                "(e.g. EVA02-B-16, ViT-B-16)."
            )
        self.model = self._build(open_clip, spec, architecture, pretrained, weights)
        self.tokenizer = open_clip.get_tokenizer(architecture) if weights else None
        visual = self.model.visual
        if isinstance(visual, open_clip.timm_model.TimmModel):
            trunk = visual.trunk
            pooled_by_cls = (
                getattr(trunk, "global_pool", None) == "token" and getattr(trunk, "attn_pool", None) is None
                and isinstance(getattr(trunk, "fc_norm", nn.Identity()), nn.Identity)  # the final norm before pooling
                and "pool" not in dict(visual.head.named_children()) and hasattr(trunk, "forward_features")
            )  # fmt: skip
            if not pooled_by_cls:
                raise TeacherLoadError(
                    f"--model.teacher {spec}: its timm vision trunk {type(trunk).__name__} is not a ViT pooled by its CLS "
                    "token after its final norm; UTA needs one."
                )
            self.image_size, self.patch_size = _pair(trunk.patch_embed.img_size)[0], _pair(trunk.patch_embed.patch_size)[0]
            self.width, table = trunk.embed_dim, trunk.pos_embed
        elif isinstance(visual, open_clip.transformer.VisionTransformer):
            if visual.attn_pool is not None or visual.pool_type != "tok":
                pooling = "attention" if visual.attn_pool is not None else f"pool_type {visual.pool_type!r}"
                raise TeacherLoadError(f"--model.teacher {spec}: its ViT pools by {pooling}, not by its CLS token; UTA needs one.")  # fmt: skip
            self.image_size, self.patch_size = _pair(visual.image_size)[0], _pair(visual.patch_size)[0]
            self.width, table = visual.class_embedding.shape[-1], visual.positional_embedding[None]
        else:
            raise TeacherLoadError(
                f"--model.teacher {spec}: its vision tower is a {type(visual).__name__}; UTA needs a ViT with a CLS token "
                "(open_clip's VisionTransformer or a timm ViT trunk such as EVA02's)."
            )
        # The trained position table, kept to interpolate from for another grid (None: rotary positions only).
        self.register_buffer("trained_positions", None if table is None else table.detach().clone(), persistent=False)
        self.grid = self.image_size // self.patch_size
        preprocess = open_clip.get_model_preprocess_cfg(self.model)
        self.mean = tuple(preprocess.get("mean") or open_clip.OPENAI_DATASET_MEAN)
        self.std = tuple(preprocess.get("std") or open_clip.OPENAI_DATASET_STD)
        self.freeze()

    @staticmethod
    def _build(open_clip, spec: str, architecture: str, pretrained: str | None, weights: bool) -> nn.Module:
        tags = open_clip.list_pretrained_tags_by_model(architecture)
        known = (f"the tags open_clip knows for {architecture}: {', '.join(tags)}" if tags
                 else f"open_clip knows no pretrained weights for {architecture}")  # fmt: skip
        if not weights:
            with _quiet(), torch.device("meta"):  # the architecture alone: no weights read or downloaded
                return open_clip.create_model(architecture, device="meta", pretrained_text=False)
        if not pretrained:
            raise TeacherLoadError(
                f"--model.teacher {spec} names no weights, and a random teacher teaches nothing: add a pretrained tag or a "
                f"local weights file, open_clip:{architecture}/<tag or file> ({known})."
            )
        if pretrained not in tags and not Path(pretrained).expanduser().is_file():
            raise TeacherLoadError(f"--model.teacher {spec}: {pretrained!r} is neither a pretrained tag nor a weights file ({known}).")
        if pretrained in tags:  # open_clip downloads the tag's weights (or reads them from its cache) and preprocessing
            try:
                with _quiet(bars=False):  # its error log would repeat the message below; the download's bar stays
                    return open_clip.create_model(architecture, pretrained=pretrained)
            except (RuntimeError, OSError, ValueError, KeyError) as error:
                raise TeacherLoadError(
                    f"--model.teacher {spec}: open_clip cannot fetch or load the weights of {pretrained} ({type(error).__name__}: "
                    f"{_one_line(error)}). Run once where the hub is reachable (open_clip caches them), or give a weights "
                    f"file: open_clip:{architecture}/<file>."
                ) from None
        try:
            with _quiet():
                model = open_clip.create_model(architecture, pretrained_text=False)
            incompatible = open_clip.load_checkpoint(model, str(Path(pretrained).expanduser()), strict=False)
        except (RuntimeError, OSError, ValueError, KeyError) as error:
            raise TeacherLoadError(
                f"--model.teacher {spec}: {pretrained} cannot be loaded as {architecture}'s weights ({type(error).__name__}: "
                f"{_one_line(error)}). Give a state dict of open_clip's {architecture} (.pt, .bin or .safetensors)."
            ) from None
        _refuse_missing(spec, pretrained, incompatible.missing_keys)
        if incompatible.unexpected_keys:
            names = sorted(incompatible.unexpected_keys)
            raise TeacherLoadError(
                f"--model.teacher {spec}: {pretrained} holds {len(names)} tensors that {architecture} does not have "
                f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): it is another architecture's weights."
            )
        return model

    def _fit_grid(self, side: int) -> None:
        """Make the tower take images of `side` pixels: its position table interpolated from the trained one to
        the new grid (and, for a timm trunk, the patch embedding's size and EVA02's rotary grid set by timm)."""
        grid = side // self.patch_size
        if grid == self.grid:
            return
        visual = self.model.visual
        if hasattr(visual, "trunk"):
            trunk = visual.trunk
            if not hasattr(trunk, "set_input_size"):
                raise TeacherLoadError(
                    f"The teacher's timm trunk {type(trunk).__name__} cannot take a {grid} x {grid} patch grid; use a student "
                    f"whose grid is the teacher's ({self.grid} x {self.grid})."
                )
            trunk.set_input_size(img_size=(side, side))
            if self.trained_positions is not None:
                prefix = 0 if getattr(trunk, "no_embed_class", False) else trunk.num_prefix_tokens
                trunk.pos_embed = nn.Parameter(resample_positions(self.trained_positions, grid, prefix), requires_grad=False)
        else:
            visual.positional_embedding = nn.Parameter(resample_positions(self.trained_positions, grid)[0], requires_grad=False)
        self.grid = grid

    def tokens(self, images: Tensor) -> Tensor:
        self._fit_grid(images.shape[-1])
        visual = self.model.visual
        if hasattr(visual, "trunk"):  # a timm ViT: forward_features ends with the final norm
            tokens = visual.trunk.forward_features(images)
            return torch.cat([tokens[:, :1], tokens[:, visual.trunk.num_prefix_tokens :]], dim=1)
        out = visual.forward_intermediates(images, indices=1, normalize_intermediates=True, intermediates_only=True,
                                           output_fmt="NLC", output_extra_tokens=True)  # fmt: skip
        return torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)

    def project(self, cls_tokens: Tensor) -> Tensor:
        visual = self.model.visual
        if hasattr(visual, "trunk"):  # what encode_image does after the trunk's CLS pooling
            return visual.head(visual.trunk.forward_head(cls_tokens[:, None]))
        return cls_tokens if visual.proj is None else cls_tokens @ visual.proj

    def encode_texts(self, texts: list[str]) -> Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.model.logit_scale.device))

    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.exp()


def load_teacher(source: str, revision: str | None = None, weights: bool = True) -> CLIPTeacher:
    """A frozen teacher from `source`: a Hugging Face CLIP folder or hub id, or `open_clip:<arch>/<pretrained>`.
    `weights=False`: its architecture alone, on the meta device (to check a spec without downloading weights)."""
    if source.startswith(OPEN_CLIP_PREFIX):
        architecture, _, pretrained = source[len(OPEN_CLIP_PREFIX) :].partition("/")
        return OpenCLIPTeacher(architecture, pretrained or None, weights)
    return HuggingFaceCLIPTeacher(source, revision, weights)


def resample_positions(table: Tensor, grid: int, prefix: int = 1) -> Tensor:
    """A position table `[1, prefix + n * n, D]` for a `grid x grid` patch grid: the prefix (CLS) entries kept,
    the patches' interpolated as transformers' CLIP does for another input size (bicubic, corners not aligned,
    no antialiasing), with timm's resampler."""
    return resample_abs_pos_embed(table, new_size=[grid, grid], num_prefix_tokens=prefix, antialias=False)


def _refuse_missing(spec: str, location: str, missing: Iterable[str], mismatched: Iterable[str] = ()) -> None:
    """A teacher whose weights lack tensors of its model (or hold them in other shapes) would run with those
    tensors random: refused in one line naming the first ones."""
    for names, what in ((sorted(missing), "lacks"), (sorted(mismatched), "holds in other shapes")):
        if names:
            raise TeacherLoadError(
                f"--model.teacher {spec}: {location} {what} {len(names)} tensors of the CLIP model ({', '.join(names[:3])}"
                f"{', ...' if len(names) > 3 else ''}); it is not this CLIP model's checkpoint. Give a whole CLIP checkpoint."
            )


def _one_line(error: BaseException, limit: int = 300) -> str:
    """A library's (often multi-line) message as one line of at most `limit` characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextmanager
def _quiet(bars: bool = True):
    """The libraries' loading chatter off: log records (open_clip warns that a model built without weights is
    random, here the point, or logs a failed download the error then names; transformers reports missing and
    unexpected tensors, which the teacher checks itself, in one line) and, with `bars`, transformers' progress bars."""
    previous, bar = logging.root.manager.disable, transformers_logging.is_progress_bar_enabled()
    logging.disable(logging.ERROR)
    if bars:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.disable(previous)
        if bars and bar:
            transformers_logging.enable_progress_bar()


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)
