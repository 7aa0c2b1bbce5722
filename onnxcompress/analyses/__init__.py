"""Shared, cached facts about a graph. Importing this package registers every analysis with the context."""

from importlib import import_module

for _name in ("model_stats", "channel_groups"):
    import_module(f"{__name__}.{_name}")
