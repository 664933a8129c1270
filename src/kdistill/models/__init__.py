"""A small model zoo and `build_model`, the one way a recipe's model section becomes a module."""

from kdistill.models.factory import (
    MODELS,
    build_model,
    count_parameters,
    custom_model,
    import_target,
)
from kdistill.models.zoo import MLP, CCExamMnistCNN, CNN1d, LeNet5, SmallCNN, ccexam_weights_path

__all__ = [
    "MLP",
    "MODELS",
    "CCExamMnistCNN",
    "CNN1d",
    "LeNet5",
    "SmallCNN",
    "build_model",
    "ccexam_weights_path",
    "count_parameters",
    "custom_model",
    "import_target",
]
