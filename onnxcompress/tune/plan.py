"""The cheap-first plan: per-pass sensitivity curves measured once, then combinations predicted from them.

Phase ``sensitivity``: the baseline (``cleanup`` only), then each searched pass alone, one dimension at a time over
its grid (every choice; 3 points of a range) with its other options at their base values (``PassSpace.base``: the
pass's default where the space holds it). Levels that give the same pipeline are measured once. The trials are ordered
round-robin over the passes (``space.PRIORITY`` first), so a small budget still measures every pass once.

Phase ``combine``: every combination of at most one measured level per pass (or the pass off) is predicted from the
single-pass measurements relative to the baseline ``b``:

    ratio(combo)  = b · Π_i ratio_i / b          (latency, size, MACs compose multiplicatively)
    metric(combo) = 1 − Σ_i (1 − metric_i)       (losses add; first-order, optimistic for stacked lossy passes)

Combinations predicted to meet the target are verified best-predicted-objective first; when none is predicted
feasible, the least predicted shortfall first. Nothing predicted is returned: only the real trials count.

Phase ``refine`` (when no model-based sampler follows): the neighbours of the best trial so far (or of the closest
one): each searched option one grid step either way / each other choice, and each other pass switched on at its
base options or off; repeated around the new best while the budget lasts.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

from onnxcompress.tune.space import PRIORITY, Space
from onnxcompress.tune.targets import RATIOS, Target

Config = dict[str, dict[str, Any] | None]


def config_key(config: Config) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def sensitivity_configs(space: Space, points: int = 3) -> list[Config]:
    """Baseline first, then single-pass levels round-robin over the passes (deduplicated later by pipeline)."""
    base = space.default_config()
    per_pass: list[list[Config]] = []
    order = sorted(space.passes, key=lambda p: PRIORITY.index(p.name) if p.name in PRIORITY else len(PRIORITY))
    for p in order:
        if p.always:
            continue
        levels = []
        base_opts = p.base()
        for name, dim in p.dims.items():
            grid = dim.grid(points)
            # the middle of a range first (a small budget gets the informative point), then the ends
            if dim.kind != "choice" and len(grid) >= 3:
                mid = len(grid) // 2
                grid = [grid[mid]] + grid[:mid] + grid[mid + 1:]
            for value in grid:
                levels.append({**base, p.name: {**base_opts, name: value}})
        per_pass.append(levels)
    out = [base]
    for level in itertools.chain.from_iterable(itertools.zip_longest(*per_pass)):
        if level is not None:
            out.append(level)
    return out


def _single_pass(config: Config, space: Space) -> str | None:
    on = [p.name for p in space.passes if not p.always and config.get(p.name) is not None]
    return on[0] if len(on) == 1 else None


def predict_combinations(space: Space, records: list[dict], target: Target, limit: int) -> list[Config]:
    """Up to ``limit`` untried combinations of measured single-pass levels, most promising first."""
    base_rec = next((r for r in records if r.get("phase") == "sensitivity" and r["status"] == "ok"
                     and _single_pass(r["config"], space) is None), None)
    if base_rec is None:
        return []
    base = base_rec["values"]
    levels: dict[str, list[tuple[dict, dict]]] = {}
    for r in records:
        name = _single_pass(r.get("config", {}), space) if r.get("config") else None
        if name and r["status"] == "ok" and "metric" in r["values"]:
            levels.setdefault(name, []).append((r["config"][name], r["values"]))
    if len(levels) < 2:
        return []
    tried = {config_key(r["config"]) for r in records if r.get("config")}
    names = sorted(levels)
    scored = []
    for choice in itertools.product(*[[None] + levels[n] for n in names]):
        picked = [(n, c) for n, c in zip(names, choice, strict=True) if c is not None]
        if len(picked) < 2:
            continue
        config = {**space.default_config(), **{n: dict(c[0]) for n, c in picked}}
        if config_key(config) in tried:
            continue
        pred: dict[str, float] = {}
        for key in RATIOS:
            if base.get(key):
                vals = [c[1].get(key) for _, c in picked]
                if all(v is not None for v in vals):
                    pred[key] = base[key] * math.prod(v / base[key] for v in vals)
        for key in ("metric", "cosine"):
            if key in base:
                pred[key] = 1.0 - sum(max(0.0, base[key] - c[1].get(key, base[key])) for _, c in picked) \
                    - (1.0 - base[key])
        feasible = not target.misses(pred) and all(k in pred for k in target.bounds)
        score = target.rank_key(pred) if feasible else (math.inf, target.shortfall(pred))
        scored.append((not feasible, score, config_key(config), config))
    scored.sort(key=lambda t: t[:3])
    return [t[3] for t in scored[:limit]]


def neighbours(space: Space, config: Config) -> list[Config]:
    """Configs one step from ``config`` (see the module docstring), nearest-first and deduplicated."""
    out: list[Config] = []
    for p in space.passes:
        if p.always:
            continue
        opts = config.get(p.name)
        if opts is None:
            out.append({**config, p.name: p.base()})
            continue
        for name, dim in p.dims.items():
            cur = opts.get(name, p.base().get(name))
            if dim.kind == "choice":
                values = [c for c in dim.choices if c != cur]
            else:
                step = dim.step or (float(dim.high) - float(dim.low)) / 4
                base = float(cur) if isinstance(cur, (int, float)) else float(p.base()[name])
                values = [v for v in {dim.snap(base - step), dim.snap(base + step)} if v != cur]
            out += [{**config, p.name: {**opts, name: v}} for v in sorted(values, key=str)]
        out.append({**config, p.name: None})
    seen, unique = set(), []
    for c in out:
        key = config_key(c)
        if key not in seen:
            seen.add(key)
            unique.append(c)
    return unique
