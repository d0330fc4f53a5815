"""batchnorm: PyTorch's Batch Normalization, exact, fused and fast.

``BatchNorm1d/2d/3d`` replace ``torch.nn.BatchNorm1d/2d/3d`` one for one, with a fused
activation and residual; :mod:`batchnorm.reference` is the whole math in NumPy float64.
"""

from . import functional
from .functional import batch_norm
from .modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
)
from .distributed import SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm

from . import tools
from .tools import (
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    FrozenBatchNormNd,
    convert,
    fold,
    freeze,
    recalibrate,
    revert,
    unfreeze,
)

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d",
    "batch_norm", "functional",
    "tools", "convert", "revert", "fold", "freeze", "unfreeze", "recalibrate",
    "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "FrozenBatchNormNd",
    "SyncBatchNorm", "convert_sync_batchnorm", "revert_sync_batchnorm",
]
