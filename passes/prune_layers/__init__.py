"""``prune-layers``: removal of whole residual blocks, transformer layers, plain stages and no-op layers
(``PruneLayers``).

- ``prune_layers_pass``: the pass — options, budgets, the greedy removal with re-measurement;
- ``trials``: output change of single-unit bypass trials, the block-influence proxy, measured latency.

The units themselves (what can be bypassed, what dies with it) are the analysis ``onnxcompress.analyses.blocks``.
"""

from onnxcompress.passes.prune_layers.prune_layers_pass import PruneLayers

__all__ = ["PruneLayers"]
