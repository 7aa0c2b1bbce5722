"""The built-in passes. Importing this package registers every pass with ``onnxcompress.pass_base.register``
(``import onnxcompress`` does it)."""

from onnxcompress.passes import (  # noqa: F401  (registers the passes)
    cleanup,
    cluster,
    distill,
    prune_channels,
    prune_layers,
    prune_weights,
    quantize,
    strip_metadata,
)
