"""Bundled datasets (mnist1d generated offline, sklearn digits) and user data loaders.

Contract used by the rest of the package:

- :class:`Dataset` bundles train/test ``DataLoader`` s with the per-sample input shape
  (channels first, without the batch dimension) and the number of classes.
- :func:`load_dataset` resolves ``"mnist1d"``, ``"digits"`` or a user reference
  ``"package.module:function"`` (the function returns ``(train_loader, test_loader)`` or
  ``(x_train, y_train, x_test, y_test)`` tensors/arrays).
"""

from nncompress.data.core import Dataset, dataset_names, example_input, load_dataset

__all__ = ["Dataset", "dataset_names", "example_input", "load_dataset"]
