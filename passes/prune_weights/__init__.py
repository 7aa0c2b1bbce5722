"""``prune-weights``: unstructured and N:M weight sparsity (``PruneWeights``).

- ``prune_weights_pass``: the pass — options, the run (scores, counts, zeros, stats);
- ``targets``: which weights are pruned, their matrix view [outputs, reduction] and design rows, skip rules;
- ``masks``: scores (magnitude, Wanda), exact-count masks per row / tensor, N:M, global comparable scores;
- ``obs``: SparseGPT's OBS pruning with reconstruction (Cholesky of H^-1, column blocks);
- ``sensitivity``: per-layer measured output-error curves and the allocation that meets the budget;
- ``storage``: dense zeros or COO (Constant sparse_value nodes; ``to_sparse_initializers`` for a finished model).
"""

from onnxcompress.passes.prune_weights.prune_weights_pass import PruneWeights

__all__ = ["PruneWeights"]
