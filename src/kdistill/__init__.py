"""kdistill: knowledge distillation for PyTorch. The public API:

    from kdistill import load_config, run
    result = run(load_config("recipes/mnist-hinton.yaml", ["train.seeds=[0,1,2]"]))
"""

from kdistill.cache import CacheKey, TeacherCache, build_cache
from kdistill.cache_key import fingerprint_model
from kdistill.capture import capture
from kdistill.config import RunConfig, TrainSettings, load_config
from kdistill.data.loader import BatchLoader
from kdistill.engine import LoopSettings, TrainState, train
from kdistill.errors import ConfigError, KDistillError, TrainingError
from kdistill.logger import MetricsLogger
from kdistill.losses import hard_cross_entropy, kd_kl, soft_cross_entropy
from kdistill.methods import METHODS, Method, MethodConfig, Outputs, build_method
from kdistill.pipeline.order import RunResult, run
from kdistill.schedules import Progress
from kdistill.teachers import CachedTeacher, EnsembleTeacher, OnlineTeacher, freeze_teacher

__all__ = [
    "METHODS",
    "BatchLoader",
    "CacheKey",
    "CachedTeacher",
    "ConfigError",
    "EnsembleTeacher",
    "KDistillError",
    "LoopSettings",
    "Method",
    "MethodConfig",
    "MetricsLogger",
    "OnlineTeacher",
    "Outputs",
    "Progress",
    "RunConfig",
    "RunResult",
    "TeacherCache",
    "TrainSettings",
    "TrainState",
    "TrainingError",
    "build_cache",
    "build_method",
    "capture",
    "fingerprint_model",
    "freeze_teacher",
    "hard_cross_entropy",
    "kd_kl",
    "load_config",
    "run",
    "soft_cross_entropy",
    "train",
]
