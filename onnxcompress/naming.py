"""Fresh tensor/node names: ``base`` if it is free, else ``base_1``, ``base_2`` ... (first free suffix).

One rule for the whole project: ``unique_name`` for a one-off name against a set the caller keeps, ``Namer`` when a
pass mints many names in one graph (it starts from every tensor and node name already in the graph).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import onnx_graphsurgeon as gs


def unique_name(base: str, taken: set[str]) -> str:
    """``base`` if free, else ``base_1``, ``base_2`` ...; the chosen name is added to ``taken``."""
    name = base
    i = 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def graph_names(graph: gs.Graph) -> set[str]:
    """Every tensor name and node name of ``graph`` (the names a new tensor or node must not reuse)."""
    names = set(graph.tensors().keys())
    names.update(n.name for n in graph.nodes if n.name)
    return names


class Namer:
    """Mints names unique within one graph: ``namer("conv_scale")`` -> ``conv_scale`` or ``conv_scale_1`` ..."""

    def __init__(self, graph: gs.Graph):
        self.taken = graph_names(graph)

    def __call__(self, base: str) -> str:
        return unique_name(base, self.taken)
