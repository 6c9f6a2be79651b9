"""Pruning techniques. Importing this package registers them in ``TECHNIQUES``.

- ``magnitude_prune``: magnitude connection pruning with iterative fine-tuning
  (Han, Pool, Tran & Dally, 2015).
"""

from nncompress.prune import channel_select as channel_select  # channel_lasso, thinet
from nncompress.prune import dead_units as dead_units  # registers dead_units
from nncompress.prune import dns as dns  # registers dynamic_surgery
from nncompress.prune import filter_l1 as filter_l1  # registers l1_filter_prune
from nncompress.prune import layers as layers  # registers layer_prune
from nncompress.prune import slimming as slimming  # registers network_slimming
from nncompress.prune import variational as variational  # registers sparse_vd
from nncompress.prune.magnitude import MagnitudePruneConfig, magnitude_masks, magnitude_prune
from nncompress.prune.masks import PRUNABLE, Prunables, apply_masks, find_prunable, mask_sparsity

__all__ = [
    "PRUNABLE",
    "MagnitudePruneConfig",
    "Prunables",
    "apply_masks",
    "find_prunable",
    "magnitude_masks",
    "magnitude_prune",
    "mask_sparsity",
]
