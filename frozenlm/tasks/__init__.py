"""Task LightningModules, one per task, on a shared base class and the frozen-block mixin."""

from frozenlm.tasks.base import BaseTask
from frozenlm.tasks.classification import ClassificationTask
from frozenlm.tasks.image import ImageClassifier
from frozenlm.tasks.motion import MotionForecaster
from frozenlm.tasks.pointcloud import PointCloudClassifier
from frozenlm.tasks.sqa3d import SQA3DTask
from frozenlm.tasks.uta import UnmaskedTokenAlignment
from frozenlm.tasks.video import VideoClassifier
from frozenlm.tasks.retrieval import ImageTextRetrieval
from frozenlm.tasks.vision_language import VisionLanguageTask
from frozenlm.tasks.vqa import VisualQuestionAnswering

__all__ = [
    "BaseTask",
    "ClassificationTask",
    "ImageClassifier",
    "ImageTextRetrieval",
    "MotionForecaster",
    "PointCloudClassifier",
    "SQA3DTask",
    "UnmaskedTokenAlignment",
    "VideoClassifier",
    "VisionLanguageTask",
    "VisualQuestionAnswering",
]
