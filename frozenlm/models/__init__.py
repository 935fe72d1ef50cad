"""Visual backbones."""

from frozenlm.models.videomae import create_videomae
from frozenlm.models.vit import create_vit

__all__ = ["create_videomae", "create_vit"]
