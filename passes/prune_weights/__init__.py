"""prune-weights: unstructured and N:M weight sparsity (being built; see issue 13)."""
