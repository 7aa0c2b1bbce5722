"""cluster: weight clustering with codebook storage (being built; see issue 15)."""
