"""The built-in passes. Importing this package registers every pass with ``onnxcompress.pass_base.register``
(``import onnxcompress`` does it)."""

from onnxcompress.passes import cleanup, distill, prune_channels, quantize  # noqa: F401  (registers the passes)
