"""Shared, cached facts about a graph (channel groups, activation statistics, MACs, model statistics).

Each analysis is a class with a ``name`` and ``compute(graph, ctx)``; a pass asks ``ctx.analysis(Kind, graph)``.
Nothing here is imported for its side effects.
"""
