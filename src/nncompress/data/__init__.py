"""Bundled datasets (mnist1d generated offline, sklearn digits) and user data loaders.

Contract used by the rest of the package:

- :class:`Dataset` bundles train/test ``DataLoader`` s with the per-sample input shape
  (channels first, without the batch dimension) and the number of classes.
- :func:`load_dataset` resolves ``"mnist1d"``, ``"digits"`` or a user reference
  ``"package.module:function"`` (the function returns ``(train_loader, test_loader)`` or
  ``(x_train, y_train, x_test, y_test)`` tensors/arrays).
- Unlabelled data (inputs only): :func:`unlabelled` / :func:`without_labels` build a
  Dataset with ``labelled=False`` whose batches are ``(x, None)``; :func:`require_labels`
  is the one-line refusal of a stage that needs labels.
- :func:`class_subset` (one task of a multi-task pair) and :func:`holdout` (a held-out
  calibration split) derive new datasets from one.
"""

from nncompress.data.core import (
    Dataset,
    dataset_names,
    example_input,
    load_dataset,
    require_labels,
    unlabelled,
    without_labels,
)
from nncompress.data.split import class_subset, holdout

__all__ = ["Dataset", "class_subset", "dataset_names", "example_input", "holdout",
           "load_dataset", "require_labels", "unlabelled", "without_labels"]
