"""prune-layers: removal of whole residual blocks / transformer layers (being built; see issue 14)."""
