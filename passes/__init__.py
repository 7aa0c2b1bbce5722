"""The built-in passes. Importing this package registers every pass with ``onnxcompress.pass_base.register``."""

from importlib import import_module

_PASS_MODULES = ["cleanup", "prune_channels", "quantize", "distill"]

for _name in _PASS_MODULES:
    import_module(f"{__name__}.{_name}")
