"""``prune-channels``: structured pruning of whole channels, neurons and attention heads (``PruneChannels``).

- ``prune_channels_pass``: the pass — options, scoring, allocation and the cut;
- ``importance``: one score per removable unit (weight norms, BN scales, activation statistics, ablation);
- ``obs_importance``: the structured Optimal-Brain-Surgeon ranking (error after the consumers' optimal refit);
- ``allocation``: how many units each group keeps (uniform, one global threshold, sensitivity-driven budgets);
- ``sensitivity``: measured output error of pruning trials (sensitivity curves, the relative error);
- ``mean_compensation``: removed channels' calibration means moved into the consumers' biases;
- ``latency_model``: the latency cost model of ``target_latency``, fitted to one (recorded) ORT profile.
"""

from onnxcompress.passes.prune_channels.prune_channels_pass import PruneChannels

__all__ = ["PruneChannels"]
