"""Visual backbones."""

from frozenlm.models.meter import METER, METERConfig
from frozenlm.models.pointbert import PointBERT
from frozenlm.models.videomae import create_videomae
from frozenlm.models.vit import ViTConfig, create_vit

__all__ = ["METER", "METERConfig", "PointBERT", "ViTConfig", "create_videomae", "create_vit"]
