"""The ``.nnc`` container: a packed, pickle-free model file, and its tensor encodings.

```python
from nncompress import formats
formats.save(model, "model.nnc", meta={"accuracy": 0.93})   # -> bytes written
model = formats.load("model.nnc")                            # eval mode, same outputs
formats.inspect("model.nnc")                                 # per-tensor bytes, sparsity
formats.load("model.nnc", max_bytes=2**30)                   # refuse files needing more
```

Layout and header schema (format version 2; version 1 still read): ``docs/FORMAT.md``.
Adding an encoding: subclass :class:`Encoding` and register an instance in
:data:`ENCODINGS`. ``save`` picks each tensor's smallest lossless encoding from cheap
statistics (:func:`choose_encoding`); ``load`` bounds what a file may make it allocate.
Adding a layer type a file may construct: register a :class:`LayerType` in
:data:`LAYER_TYPES` next to the class (and list its module in
``layer_types.LAYER_PACKAGES``); read the table through ``layer_types.layer_types()``.
"""

# imported to register PyTorch's layer types (arch) and the encodings
from nncompress.formats import arch, huffman, intk, packed  # noqa: F401
from nncompress.formats.choose import (
    choose_encoding,
    encoded_sizes,
    smallest_encoding,
    smallest_sizes,
)
from nncompress.formats.container import (
    ContainerInfo,
    TensorInfo,
    inspect,
    load,
    read_header,
    read_tensors,
    save,
    stored_form,
)
from nncompress.formats.encodings import DTYPES, ENCODINGS, Encoding
from nncompress.formats.header import FORMAT_VERSION, MAGIC
from nncompress.formats.layer_types import LAYER_TYPES, LayerType

__all__ = [
    "DTYPES",
    "ENCODINGS",
    "FORMAT_VERSION",
    "LAYER_TYPES",
    "MAGIC",
    "ContainerInfo",
    "Encoding",
    "LayerType",
    "TensorInfo",
    "choose_encoding",
    "encoded_sizes",
    "inspect",
    "load",
    "read_header",
    "read_tensors",
    "save",
    "smallest_encoding",
    "smallest_sizes",
    "stored_form",
]
