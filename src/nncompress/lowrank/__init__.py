"""Low-rank factorisation techniques. Importing this package registers them in ``TECHNIQUES``.

- ``low_rank``: truncated SVD of Linear / Conv / recurrent weights (Denton et al., 2014;
  Xue, Li & Gong, 2013), LSTM recurrences as a projection (Sak et al., 2014).
"""

from nncompress.lowrank.layers import LowRankConv1d, LowRankConv2d, LowRankLinear, LowRankRNN
from nncompress.lowrank.svd import LowRankConfig, factorise, low_rank, svd_rank, truncated_svd

__all__ = [
    "LowRankConfig",
    "LowRankConv1d",
    "LowRankConv2d",
    "LowRankLinear",
    "LowRankRNN",
    "factorise",
    "low_rank",
    "svd_rank",
    "truncated_svd",
]
