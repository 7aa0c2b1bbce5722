"""Fresh tensor/node names: ``base`` if it is free, else ``base_1``, ``base_2`` ... (first free suffix)."""

from __future__ import annotations


def unique_name(base: str, taken: set[str]) -> str:
    """``base`` if free, else ``base_1``, ``base_2`` ...; the chosen name is added to ``taken``."""
    name = base
    i = 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name
