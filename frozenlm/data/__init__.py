"""LightningDataModules: image datasets yield {"image", "label", "id"} samples, SSv2 {"video", "label", "id"},
point clouds {"points", "label", "id"}, SQA3D ScanNet scenes with situated questions, VQAv2 and Flickr30k images with their texts as strings."""

from frozenlm.data.argoverse1 import Argoverse1DataModule
from frozenlm.data.argoverse2 import Argoverse2DataModule
from frozenlm.data.base import ImageDataModule
from frozenlm.data.caltech256 import Caltech256DataModule
from frozenlm.data.cifar100 import CIFAR100DataModule
from frozenlm.data.digits import DigitsDataModule
from frozenlm.data.flickr30k import Flickr30kDataModule
from frozenlm.data.imagefolder import ImageFolderDataModule
from frozenlm.data.imagenet_variants import ImageNetVariantDataModule
from frozenlm.data.mnist import MNISTDataModule
from frozenlm.data.modelnet40 import ModelNet40DataModule
from frozenlm.data.motion import MotionDataModule
from frozenlm.data.pointcloud import PointCloudDataModule
from frozenlm.data.scanobjectnn import ScanObjectNNDataModule
from frozenlm.data.sqa3d import SQA3DDataModule
from frozenlm.data.ssv2 import SSv2DataModule
from frozenlm.data.vqav2 import VQAv2DataModule

__all__ = [
    "Argoverse1DataModule",
    "Argoverse2DataModule",
    "CIFAR100DataModule",
    "Caltech256DataModule",
    "DigitsDataModule",
    "Flickr30kDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "ImageNetVariantDataModule",
    "MNISTDataModule",
    "ModelNet40DataModule",
    "MotionDataModule",
    "PointCloudDataModule",
    "ScanObjectNNDataModule",
    "SQA3DDataModule",
    "SSv2DataModule",
    "VQAv2DataModule",
]
