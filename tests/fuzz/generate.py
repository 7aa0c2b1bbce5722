"""The fuzz corpus: hostile and broken inputs for every onnxcompress command, generated from a seed.

``generate_cases(seed)`` returns the cases; nothing binary is committed. A case writes its files into a folder
(``case.build(folder)``) and says what it feeds to which command:

- ``model`` cases mutate the bundled ``models/digits_cnn.onnx`` or a small inline graph: truncated and bit-flipped
  protobufs, wrong IR / opset numbers, unknown ops and custom domains, nodes reading missing tensors, cycles,
  duplicate names, empty graphs, absurd and negative declared shapes, initializers whose data length disagrees with
  their shape, external data escaping the folder (absolute, ``..``, symlinks) or pointing past the end of its file.
  They go through ``compress`` with every registered pass, ``inspect`` and ``validate``.
- ``data`` cases give the (valid) bundled model bad calibration / validation data: missing or extra inputs, wrong
  dtypes and ranks, NaN/Inf, pickled object arrays, zero samples, unreadable files.
- ``pipeline`` cases give it bad pipelines and recipes: unknown passes and options, a wrong-typed value for every
  option of every registered pass (discovered from the registry), unbalanced braces, broken TOML.

Expectations: a case marked ``must_fail`` must be refused as bad input (exit 2); otherwise the command may succeed
or fail cleanly. Model cases decide ``must_fail`` by an oracle at build time: a file protobuf cannot parse must be
refused by every command, one onnxruntime cannot load must be refused by ``compress`` and ``validate``.
"""

from __future__ import annotations

import random

from tests.fuzz.base import Case, Setup  # noqa: F401  (the records the runner uses)
from tests.fuzz.input_cases import data_cases, pipeline_cases
from tests.fuzz.model_cases import (
    digits_node_cases,
    digits_tensor_cases,
    external_cases,
    header_cases,
    protobuf_cases,
    structure_cases,
)


# ------------------------------------------------------------------------------------------------------- all
def generate_cases(seed: int = 0, pass_classes: dict[str, type] | None = None) -> list[Case]:
    if pass_classes is None:
        import onnxcompress  # noqa: F401  (registers the passes)
        from onnxcompress.pass_base import registered_passes

        pass_classes = {n: c for n, c in registered_passes().items() if not n.startswith("test-")}
    rng = random.Random(seed)
    cases = (protobuf_cases(rng) + header_cases() + digits_node_cases() + digits_tensor_cases(rng) + structure_cases()
             + external_cases() + data_cases() + pipeline_cases(pass_classes))
    ids = [c.id for c in cases]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise AssertionError(f"duplicate fuzz case ids: {sorted(dup)}")
    return cases


def summary(cases: list[Case]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in cases:
        out[c.kind] = out.get(c.kind, 0) + 1
    return out


if __name__ == "__main__":
    cs = generate_cases()
    print(len(cs), summary(cs))
