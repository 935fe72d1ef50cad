"""Visual backbones."""

from frozenlm.models.vit import create_vit

__all__ = ["create_vit"]
