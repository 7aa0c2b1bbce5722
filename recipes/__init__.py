"""Named compression recipes (TOML files in this folder), loaded by ``--recipe NAME``."""
