"""A frozen CLIP model as a teacher: its vision tower's final tokens, its projection into the joint
image-text space, and its text tower's class embeddings for zero-shot classification.

Two sources, both well-kept libraries: transformers' ``CLIPModel`` (a local Hugging Face folder or a hub
id such as ``openai/clip-vit-base-patch16``) and open_clip (``open_clip:<architecture>/<pretrained>``, e.g.
``open_clip:EVA02-B-16/merged2b_s8b_b131k``, where ``<pretrained>`` is a tag open_clip knows or a local
weights file). Either way the teacher is frozen (no gradient, eval mode) and its tokens are the vision
tower's output through its final LayerNorm, CLS first: ``[B, 1 + grid * grid, width]``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import AutoTokenizer, CLIPModel

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
        """``[B, 1 + N, width]``: the vision tower's final tokens (after its final norm) of normalised images."""
        raise NotImplementedError

    def project(self, cls_tokens: Tensor) -> Tensor:
        """``[B, embed_dim]``: CLS tokens (as :meth:`tokens` gives them) in the joint image-text space."""
        raise NotImplementedError

    def encode_texts(self, texts: list[str]) -> Tensor:
        """``[T, embed_dim]``: the text tower's embeddings of ``texts``."""
        raise NotImplementedError

    def logit_scale(self) -> Tensor:
        """The learned temperature of CLIP's logits (``exp`` of its log; 100 for OpenAI's CLIP)."""
        raise NotImplementedError


class HuggingFaceCLIPTeacher(CLIPTeacher):
    """transformers' ``CLIPModel`` from a local folder or a hub id."""

    def __init__(self, source: str, revision: str | None = None) -> None:
        super().__init__()
        try:
            location = str(local_folder(source) or source)
            self.model = CLIPModel.from_pretrained(location, revision=revision, dtype=torch.float32)
            self.tokenizer = AutoTokenizer.from_pretrained(location, revision=revision)
        except (OSError, ValueError, KeyError) as error:
            raise TeacherLoadError(
                f"--model.teacher {source!r} cannot be loaded as a CLIP model ({type(error).__name__}: {error}). Give a "
                "local Hugging Face CLIP folder (model and tokenizer), a hub id such as openai/clip-vit-base-patch16, "
                "or open_clip:<architecture>/<pretrained>."
            ) from None
        vision = self.model.config.vision_config
        self.image_size, self.patch_size, self.width = vision.image_size, vision.patch_size, vision.hidden_size
        # CLIP's preprocessing constants live in the processor; OpenAI's are what every HF CLIP uses.
        self.mean, self.std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
        self.freeze()

    def tokens(self, images: Tensor) -> Tensor:
        vision = self.model.vision_model
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
    """An open_clip model (``pip install open_clip_torch``) with a ViT vision tower."""

    def __init__(self, architecture: str, pretrained: str | None) -> None:
        super().__init__()
        try:
            import open_clip
        except ImportError:
            raise TeacherLoadError(
                f"--model.teacher open_clip:{architecture}/{pretrained} needs open_clip: pip install open_clip_torch "
                "(or the frozenlm[uta] extra)."
            ) from None
        try:
            self.model = open_clip.create_model(architecture, pretrained=pretrained or None)
        except (RuntimeError, OSError, ValueError, KeyError) as error:
            raise TeacherLoadError(
                f"--model.teacher open_clip:{architecture}/{pretrained} cannot be loaded ({type(error).__name__}: {error}). "
                "Name an architecture of open_clip.list_models() and a tag of open_clip.list_pretrained() or a weights file."
            ) from None
        self.tokenizer = open_clip.get_tokenizer(architecture)
        visual = self.model.visual
        if not hasattr(visual, "ln_post") or not hasattr(visual, "class_embedding"):
            raise TeacherLoadError(f"--model.teacher open_clip:{architecture}: its vision tower is not a ViT with a CLS token.")
        self.image_size, self.patch_size = _pair(visual.image_size)[0], _pair(visual.patch_size)[0]
        self.width = visual.class_embedding.shape[-1]
        self.mean = tuple(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
        self.std = tuple(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
        self.freeze()

    def tokens(self, images: Tensor) -> Tensor:
        # open_clip returns the pooled (projected) CLS and the patch tokens; the CLS before projection is
        # read where the final norm writes it.
        captured = {}
        handle = self.model.visual.ln_post.register_forward_hook(lambda m, args, out: captured.update(tokens=out))
        try:
            self.model.visual(images)
        finally:
            handle.remove()
        return captured["tokens"]

    def project(self, cls_tokens: Tensor) -> Tensor:
        proj = self.model.visual.proj
        return cls_tokens if proj is None else cls_tokens @ proj

    def encode_texts(self, texts: list[str]) -> Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.model.logit_scale.device))

    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.exp()


def load_teacher(source: str, revision: str | None = None) -> CLIPTeacher:
    """A frozen teacher from ``source``: a Hugging Face CLIP folder or hub id, or ``open_clip:<arch>/<pretrained>``."""
    if source.startswith(OPEN_CLIP_PREFIX):
        architecture, _, pretrained = source[len(OPEN_CLIP_PREFIX) :].partition("/")
        return OpenCLIPTeacher(architecture, pretrained or None)
    return HuggingFaceCLIPTeacher(source, revision)


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)
