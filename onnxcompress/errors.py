"""Error hierarchy.

Every failure onnxcompress raises on purpose derives from ``OnnxCompressError``. The CLI turns any of them into a
single line on stderr and a non-zero exit code; ``--debug`` shows the traceback.
"""

from __future__ import annotations


class OnnxCompressError(Exception):
    """Base class of every error onnxcompress raises on purpose."""

    exit_code = 1


class BadInputError(OnnxCompressError):
    """The user's input is unusable: corrupt or non-ONNX file, unsafe external data, bad calibration data."""

    exit_code = 2


class PassError(OnnxCompressError):
    """A pass failed (its precondition, its run, or its postcondition)."""

    exit_code = 3


class ValidationError(OnnxCompressError):
    """A result failed the structural gate (checker, shape inference, ORT session) or a fidelity budget."""

    exit_code = 4
