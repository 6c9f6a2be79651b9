"""Bits-precision and inference-graph techniques. Importing this package registers them.

- ``fold_batchnorm``: fold each BatchNorm into the convolution / linear layer that feeds
  it (Jacob et al., 2018, section 3.2), so the deployed model runs one layer fewer per
  block.
"""

from nncompress.quant import binary  # noqa: F401  (registers binarize + binary layers)
from nncompress.quant.fold import FoldBatchNormConfig, fold_batchnorm, fold_pairs
from nncompress.quant.int8 import QuantizeInt8Config  # noqa: F401  (registers quantize_int8)
from nncompress.quant.lowbit import LowBitConfig  # noqa: F401  (registers lowbit + layers)
from nncompress.quant.mixed import MixedPrecisionConfig  # noqa: F401  (mixed_precision)
from nncompress.quant.qat import QATInt8Config  # noqa: F401  (registers qat_int8)

__all__ = ["FoldBatchNormConfig", "fold_batchnorm", "fold_pairs"]
