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
"""

from nncompress.formats import huffman, packed  # noqa: F401  (register their encodings)
from nncompress.formats.arch import MODULE_TYPES
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
)
from nncompress.formats.encodings import DTYPES, ENCODINGS, Encoding
from nncompress.formats.header import FORMAT_VERSION, MAGIC

__all__ = [
    "DTYPES",
    "ENCODINGS",
    "FORMAT_VERSION",
    "MAGIC",
    "MODULE_TYPES",
    "ContainerInfo",
    "Encoding",
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
]
