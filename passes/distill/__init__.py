"""``distill``: the original model teaches the compressed one, layer by layer (``Distill``).

- ``distill_pass``: the pass — options, the stage loop;
- ``layers``: which layers are refit and in which stage (matched to the teacher by name and channel map);
- ``stage_statistics``: one stage's calibration streaming, reduced to each layer's normal equations;
- ``normal_equations``: the streamed X^T X / X^T Y sums;
- ``ridge``: the ridge solves, ridge selection on held-out feeds, the objective;
- ``layer_solve``: one layer's refit or bias correction, written back into the graph;
- ``weight_refs``: float weights read and written as constants or DequantizeLinear(integers).
"""

from onnxcompress.passes.distill.distill_pass import Distill

__all__ = ["Distill"]
