"""Visual backbones."""

from frozenlm.models.lm_vit import LMViT, LMViTConfig
from frozenlm.models.meter import METER, METERConfig
from frozenlm.models.pointbert import PointBERT
from frozenlm.models.scanqa import ScanQA, ScanQAConfig
from frozenlm.models.uta import UTAStudent, UTAStudentConfig
from frozenlm.models.videomae import create_videomae
from frozenlm.models.vit import ViTConfig, create_vit

__all__ = [
    "LMViT", "LMViTConfig", "METER", "METERConfig", "PointBERT", "ScanQA", "ScanQAConfig", "UTAStudent",
    "UTAStudentConfig", "ViTConfig", "create_videomae", "create_vit",
]
