"""onnxruntime sessions for ModelProtos of any size.

Models under the protobuf limit go to ORT as bytes; larger ones, and models with memory-mapped weights, are written
(with external data, mapped weights streamed from their file) into a temporary folder that lives as long as the
session wrapper, and ORT maps that file. Every session runs on the CPU execution provider.

``light=True`` is for sessions that only prove a model loads (the input check, the structural gate): no graph
optimizations and no weight pre-packing, so ORT does not build a second, packed copy of every MatMul weight; a model
with ``LIGHT_VIA_FILE_BYTES`` of weights or more is written to a temporary file with external data first, and ORT
maps that file and touches nothing.

``staged`` + ``overrides``: trials that change one weight at a time (sensitivity curves) stage the model once and
give each trial session the changed array as an initializer override (ORT's ``add_initializer``), so a model over
2 GB is written once, not once per trial.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxcompress import io, mmap_weights
from onnxcompress.errors import ValidationError

log = logging.getLogger(__name__)

#: a light session of a model with at least this many weight bytes loads it from a file (ORT maps the weights)
#: instead of from serialised bytes (which ORT parses into a copy and then copies into its tensors)
LIGHT_VIA_FILE_BYTES = 64 << 20


def session_options(threads: int = 1, optimize: bool = True, spin: bool = True,
                    prepack: bool = True) -> ort.SessionOptions:
    """CPU session options. ``spin=False`` stops idle intra-op pool threads from busy-waiting: needed when several
    sessions are timed interleaved in one process, where a spinning pool steals the CPU from the next session."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    return so


#: run options for a probe whose failure the caller expects: ORT's own error log of the failed kernel is not printed
_QUIET_RUN = ort.RunOptions()
_QUIET_RUN.log_severity_level = 4


class Session:
    """An ``InferenceSession`` built from a ModelProto, bytes or a path (temporary files cleaned up on close)."""

    def __init__(self, model: onnx.ModelProto | bytes | str | Path, threads: int = 1, optimize: bool = True,
                 what: str = "model", spin: bool = True, light: bool = False,
                 overrides: dict[str, np.ndarray] | None = None):
        """``overrides``: initializer name -> array used instead of the model's (ORT reads the array in place; the
        model itself is not rewritten, so one staged file serves many trial sessions, see ``staged``)."""
        self._tmpdir: str | None = None
        so = session_options(threads, optimize and not light, spin, prepack=not light)
        #: the OrtValues must outlive the session: ORT uses their buffers without a copy
        self._overrides = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in (overrides or {}).values()]
        for name, value in zip(overrides or {}, self._overrides, strict=True):
            so.add_initializer(name, value)
        try:
            if isinstance(model, onnx.ModelProto):
                if io.needs_external_data(model) or mmap_weights.has_mapped(model) or (
                        light and io.weight_bytes(model) >= LIGHT_VIA_FILE_BYTES):
                    self._tmpdir, path = _temporary_copy(model)
                    self.sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
                else:
                    self.sess = ort.InferenceSession(model.SerializeToString(), so,
                                                     providers=["CPUExecutionProvider"])
            elif isinstance(model, bytes):
                self.sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
            else:
                self.sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            self.close()
            raise ValidationError(f"onnxruntime cannot load the {what}: {io.first_line(exc)}") from exc
        self.output_names = [o.name for o in self.sess.get_outputs()]
        self.input_names = [i.name for i in self.sess.get_inputs()]

    def run(self, feed: dict, outputs: list[str] | None = None, quiet: bool = False) -> list:
        """Outputs for ``feed``. ``quiet``: a failure is expected and handled by the caller (a probe): onnxruntime
        does not log it to stderr; the exception still carries its message."""
        return self.sess.run(outputs, {k: v for k, v in feed.items() if k in self.input_names},
                             _QUIET_RUN if quiet else None)

    def close(self) -> None:
        """Free ORT's session (its copy of the weights) now, not when the wrapper is collected, and remove the
        temporary folder."""
        self.sess = None
        self._overrides = []
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


@contextlib.contextmanager
def staged(model: onnx.ModelProto):
    """The model in the form a session loads fastest, made once for many sessions: its serialized bytes, or (weights
    over the protobuf limit, or memory-mapped weights) the path of a temporary copy with external data, removed on
    exit. Pair with ``Session(..., overrides=...)`` to run variants of one weight without writing the model again."""
    if not (io.needs_external_data(model) or mmap_weights.has_mapped(model)):
        yield model.SerializeToString()
        return
    tmpdir, path = _temporary_copy(model)
    try:
        yield path
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _temporary_copy(model: onnx.ModelProto) -> tuple[str, str]:
    """(folder, path) of ``model`` written with external data (mapped weights streamed) into a new temporary folder
    (on failure nothing is left); the caller removes the folder."""
    tmpdir = tempfile.mkdtemp(prefix="onnxcompress-")
    try:
        path = Path(tmpdir) / "model.onnx"
        io.save_model(model, path, external_data=True)
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    return tmpdir, str(path)
