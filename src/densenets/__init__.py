"""densenets: Densely Connected Convolutional Networks for PyTorch."""

from .analysis.summary import Summary, summary
from .factory import (
    create_model,
    densenet121,
    densenet161,
    densenet169,
    densenet201,
    densenet264,
    densenet264d,
    densenetblur121d,
    fcdensenet56,
    fcdensenet67,
    fcdensenet103,
    list_models,
    rdnet_base,
    rdnet_large,
    rdnet_small,
    rdnet_tiny,
)
from .models.backbone import FeatureExtractor
from .models.densenet import DenseBlock, DenseNet, DenseNetConfig
from .models.fcdensenet import FCDenseNet, FCDenseNetConfig
from .models.layers import DenseLayer, Transition
from .models.rdnet import RDNet, RDNetConfig, RDNetFeatures
from .weights.files import KeyMismatchError, load, save

__version__ = "0.1.0"

__all__ = [
    "DenseBlock", "DenseLayer", "DenseNet", "DenseNetConfig", "Summary", "Transition",
    "create_model", "densenet121", "densenet161", "densenet169", "densenet201", "densenet264",
    "densenet264d", "densenetblur121d", "list_models", "summary",
    "FeatureExtractor", "KeyMismatchError", "load", "save",
    "RDNet", "RDNetConfig", "RDNetFeatures", "rdnet_base", "rdnet_large", "rdnet_small",
    "rdnet_tiny",
    "FCDenseNet", "FCDenseNetConfig", "fcdensenet56", "fcdensenet67", "fcdensenet103",
]
