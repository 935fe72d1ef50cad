"""frozenlm.data: LightningDataModules that yield {"image", "label", "id"} sample dicts."""

from frozenlm.data.base import ImageDataModule
from frozenlm.data.caltech256 import Caltech256DataModule
from frozenlm.data.cifar100 import CIFAR100DataModule
from frozenlm.data.digits import DigitsDataModule
from frozenlm.data.imagefolder import ImageFolderDataModule
