"""``distill``: the original model teaches the compressed one, layer by layer (``Distill``).

- ``distill_pass``: the pass — options, the stage loop;
- ``layers``: which layers are refit and in which stage (matched to the teacher by name and channel map);
- ``stage_statistics``: one stage's calibration streaming, reduced to each layer's normal equations;
- ``normal_equations``: the streamed X^T X / X^T Y sums;
- ``ridge``: the ridge solves, ridge selection on held-out feeds, the objective;
- ``layer_solve``: one layer's refit or bias correction, written back into the graph;
- ``weight_refs``: float weights read and written as constants or DequantizeLinear(integers).

``mode=train`` / ``refit+train`` (PyTorch, the ``[train]`` extra, imported only inside these modules' functions):

- ``train_entry``: the entry point (feeds, teacher, end-to-end or block-wise);
- ``torch_ops`` / ``torch_interpreter``: the student graph run node by node in torch, its float weights trainable;
- ``train``: the optimizer loop (Adam, cosine decay, held-out early stop, time budget), end-to-end;
- ``blocks``: the block partition, block-wise (BRECQ-style) training and the feature-matching tensors;
- ``train_losses``: per-output losses (KL / cosine / normalized MSE), augmentation, feed batching.
"""

from onnxcompress.passes.distill.distill_pass import Distill

__all__ = ["Distill"]
