"""Weight sharing techniques. Importing this package registers them in ``TECHNIQUES``.

- ``weight_sharing``: per-layer k-means weight sharing with centroid fine-tuning
  (Han, Mao & Dally, 2015, "Deep compression").
- ``hashed_net``: HashedNets, Linear weights read through a hash from shared buckets
  (Chen, Wilson, Tyree, Weinberger & Chen, 2015).

Also (functions over several models, not single-model techniques): ``zipping.zip_models``
(multi-task zipping, He, Zhou & Thiele 2018) and ``multiplex`` (run-time model
multiplexing, Eshratifar & Pedram 2020).
"""

from nncompress.share.hashing import HashedLinear, HashedNetConfig
from nncompress.share.kmeans import kmeans_1d, optimal_kmeans_1d
from nncompress.share.weight_sharing import WeightSharingConfig
from nncompress.share.zipping import ZippedPair, ZipResult, zip_models

# The function ``weight_sharing`` is not re-exported: it would hide its module's name.
__all__ = ["HashedLinear", "HashedNetConfig", "WeightSharingConfig", "ZipResult", "ZippedPair",
           "kmeans_1d", "optimal_kmeans_1d", "zip_models"]
