"""``cleanup``: exact graph simplification.

Every rewrite leaves the model's outputs equal (up to float rounding of the BN / Conv-affine folds) and keeps the
names, dtypes and order of the graph outputs; graph inputs are never removed. Shapes are only ever taken from
*computed* shape inference (``shape_facts``: declared value_info and output shapes are stripped first, they can
be wrong). Rewrites, repeated until none applies:

* **Dead code.** Nodes that contribute to no graph output are dropped (``Graph.cleanup``, subgraphs included). A
  tensor a subgraph reads from an enclosing scope counts as used. Initializers nobody reads are not exported.
* **Identity / inference Dropout.** ``y = Identity(x)`` and ``y = Dropout(x)`` (mask unused, ``training_mode``
  absent or constant false; opset < 7 only with ``is_test=1``) are bypassed: consumers of ``y`` read ``x``. When ``y``
  is an output of its graph the producer of ``x`` is made to produce ``y`` instead, so the output name survives; if
  ``x`` is a graph input, an initializer, another output, or comes from an enclosing scope, the node stays.
* **Constant and shape folding** (``constant_folding``): nodes whose inputs are all constants are evaluated with
  onnxruntime and replaced by their value when that does not inflate the file; small integer values computed from
  ``Shape``/``Size`` become constants when computed shapes determine them.
* **Constant If** (``inline_if``). An If whose condition is constant is replaced by the branch it takes
  (``if_inlining``); constants inside branches fold like any others.
* **BatchNormalization and per-channel affines into Conv / ConvTranspose / Gemm** (``batchnorm_folding``,
  ``conv_affine_folding``): ``W' = W·γ/σ``, ``b' = (b − μ)·γ/σ + β``, in float64, cast back.
* **No-op nodes, chains, common subexpressions** (``remove_noops``, ``merge_chains``, ``cse``): see
  ``noops``, ``chains`` and ``cse`` for the exact rule of each (Cast to the same dtype, identity Transpose/Reshape/Slice/Pad,
  ``x·1``, ``x+0``; Reshape/Unsqueeze/Transpose/Slice chains; same op + attributes + inputs -> one node).
* **Duplicate initializers.** Constants with the same dtype, shape and bytes (blake2b over the raw bytes, then a
  byte comparison) are merged into the first one met (main graph first); subgraphs then read the outer copy.

Not done on purpose (they make ORT CPU slower, see design.md §4): folding Pad into Conv, MatMul+Add into Gemm.
A Reshape target is never taken from a declared output shape (onnxslim does, and changes ddddocr's output).

Where each rule lives (modules of this package): ``cleanup_pass`` (the ``Cleanup`` pass: options, the rounds to a
fixed point), ``noops`` (Identity/Dropout and no-op nodes), ``constant_folding``, ``if_inlining``,
``batchnorm_folding``, ``conv_affine_folding``, ``reshape_targets``, ``chains``, ``cse``, ``dedup_initializers``;
what the rewrites read: ``shape_facts`` (computed dims and dtypes; ``inference_models`` builds what onnx infers on)
and ``symbolic_values`` (small integer tensors known element by element); ``rewrite_env`` (the shared ``Env`` and
``bypass``).
"""

from onnxcompress.passes.cleanup.cleanup_pass import Cleanup

__all__ = ["Cleanup"]
