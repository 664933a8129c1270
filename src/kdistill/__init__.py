"""kdistill: knowledge distillation for PyTorch. The public API:

    from kdistill import load_config, run
    result = run(load_config("recipes/mnist-hinton.yaml", ["train.seeds=[0,1,2]"]))
"""

from kdistill.capture import capture
from kdistill.config import RunConfig, load_config
from kdistill.engine import TrainState, train
from kdistill.errors import ConfigError, KDistillError
from kdistill.losses import hard_cross_entropy, kd_kl, soft_cross_entropy
from kdistill.methods import METHODS, Method, Outputs
from kdistill.pipeline.order import RunResult, run
from kdistill.schedules import Progress

__all__ = [
    "METHODS",
    "ConfigError",
    "KDistillError",
    "Method",
    "Outputs",
    "Progress",
    "RunConfig",
    "RunResult",
    "TrainState",
    "capture",
    "hard_cross_entropy",
    "kd_kl",
    "load_config",
    "run",
    "soft_cross_entropy",
    "train",
]
