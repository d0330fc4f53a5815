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

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d",
    "batch_norm", "functional",
    "SyncBatchNorm", "convert_sync_batchnorm", "revert_sync_batchnorm",
]
