"""onnxcompress: graph-level ONNX model compression, measured against onnxruntime.

    from onnxcompress import compress
    result = compress("model.onnx", "cleanup,quantize{mode=static}", calibration="calib.npz")
    result.model        # the compressed ModelProto
    result.ledger       # per-pass params / bytes / MACs / time / fidelity

Passes live in ``onnxcompress.passes`` and register themselves when that package is imported, which this module
does: the core modules themselves import no pass.
"""

from onnxcompress import passes  # noqa: E402,F401,I001  (registers the built-in passes)
from onnxcompress.api import compress
from onnxcompress.errors import BadInputError, OnnxCompressError, PassError, ValidationError

__version__ = "0.1.0"
__all__ = ["compress", "OnnxCompressError", "BadInputError", "PassError", "ValidationError", "__version__"]
