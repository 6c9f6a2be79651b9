"""Weight sharing techniques. Importing this package registers them in ``TECHNIQUES``.

- ``weight_sharing``: per-layer k-means weight sharing with centroid fine-tuning
  (Han, Mao & Dally, 2015, "Deep compression").
- ``hashed_net``: HashedNets, Linear weights and Embedding tables read through a hash
  from shared buckets (Chen, Wilson, Tyree, Weinberger & Chen, 2015).

Also (methods over several models, registered in ``MULTI_MODEL_METHODS`` by
``share.methods`` and run by the CLI's zip / cascade / router / branches commands):
``zipping.zip_models`` (multi-task zipping, He, Zhou & Thiele 2018), ``multiplex`` and
``router`` (run-time model multiplexing, Eshratifar & Pedram 2020), and ``branches`` (a
frozen shared backbone with task heads).
"""

from nncompress.share.hashing import HashedLinear, HashedNetConfig
from nncompress.share.kmeans import kmeans_1d, optimal_kmeans_1d
from nncompress.share.weight_sharing import WeightSharingConfig
from nncompress.share.zipping import ZippedPair, ZipResult, zip_models

# The function ``weight_sharing`` is not re-exported: it would hide its module's name.
__all__ = ["HashedLinear", "HashedNetConfig", "WeightSharingConfig", "ZipResult", "ZippedPair",
           "kmeans_1d", "optimal_kmeans_1d", "zip_models"]
