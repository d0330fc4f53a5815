"""Training and deployment tools around batch norm.

``convert``/``revert`` (torch's layers <-> ours, with activation fusion), ``fold`` (into the
previous layer, for inference), ``freeze``/``unfreeze`` and ``FrozenBatchNorm1d/2d/3d/Nd``,
``recalibrate`` (precise BN), Keras/Flax weight conventions, and ``benchmark_fold``.
Export (``torch.export``, ONNX) needs no tool: in eval, our layers export as torch's own
batch norm and activation ops (see ``functional._standard_ops``).
"""

from .bench import benchmark_fold, small_resnet
from .conventions import load_flax, load_keras, to_flax, to_keras
from .convert import FusedActivation, convert, revert
from .fold import ChannelAffine, FoldReport, fold
from .freeze import (
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    FrozenBatchNormNd,
    freeze,
    unfreeze,
)
from .recalibrate import recalibrate

__all__ = [
    "ChannelAffine",
    "FoldReport",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "FrozenBatchNormNd",
    "FusedActivation",
    "benchmark_fold",
    "convert",
    "fold",
    "freeze",
    "load_flax",
    "load_keras",
    "recalibrate",
    "revert",
    "small_resnet",
    "to_flax",
    "to_keras",
    "unfreeze",
]
