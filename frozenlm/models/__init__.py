"""Visual backbones."""

from frozenlm.models.meter import METER
from frozenlm.models.pointbert import PointBERT
from frozenlm.models.videomae import create_videomae
from frozenlm.models.vit import create_vit

__all__ = ["METER", "PointBERT", "create_videomae", "create_vit"]
