"""densenets: Densely Connected Convolutional Networks for PyTorch."""

from .backbone import FeatureExtractor
from .inspect import Summary, summary
from .layers import DenseLayer, Transition
from .model import DenseBlock, DenseNet, DenseNetConfig
from .weights import KeyMismatchError, load, save
from .zoo import (
    create_model,
    densenet121,
    densenet161,
    densenet169,
    densenet201,
    densenet264,
    list_models,
)

__version__ = "0.1.0"

__all__ = [
    "DenseBlock", "DenseLayer", "DenseNet", "DenseNetConfig", "Summary", "Transition",
    "create_model", "densenet121", "densenet161", "densenet169", "densenet201", "densenet264",
    "list_models", "summary",
    "FeatureExtractor", "KeyMismatchError", "load", "save",
]
