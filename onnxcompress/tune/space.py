"""The search space of ``onnxcompress tune``: which passes a pipeline may hold, in which order, with which options.

A point of the space is a *config*: pass name -> its searched option values, or ``None`` when the pass is off.
The pipeline of a config is ``cleanup`` (always on: exact and free), then every enabled pass in ``STAGE`` order with
its searched options (the others at their defaults), with ``distill`` after the last pruning pass whenever one of
them is on (``STRUCTURAL``: it is the recovery step the hand-written pipelines use: prune, then refit on
calibration data).

The dimensions come from the passes themselves: ``option(default, help, search=...)`` beside each field
(``onnxcompress.pass_base.search_space``), so a new pass is searched as soon as it declares them.

A pass with dimensions gets an on/off switch (``enabled``) as well, unless it is always on. A registered lossy pass
with no dimensions is not searched (``--space`` lists it and says why). New passes are placed by
``STAGE``; a pass not named there goes after the structural passes and before quantize.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from onnxcompress.pass_base import SearchDim, option_fields, registered_passes, search_space

#: pipeline order: lower first; passes not named go at ``DEFAULT_STAGE``
STAGE = {"cleanup": 0, "prune-layers": 10, "prune-channels": 20, "distill": 30, "prune-weights": 40,
         "cluster": 50, "quantize": 60, "strip-metadata": 90}
DEFAULT_STAGE = 35
#: the order passes are first measured in (a small budget measures the first ones): the broadly useful first
PRIORITY = ["quantize", "prune-channels", "cluster", "prune-layers", "prune-weights"]
#: lossy passes the hand-written pipelines recover with ``distill`` (structural pruning, and weight pruning as in
#: the ``small`` / ``deep-compression`` recipes): it follows the last of them when any is on
STRUCTURAL = {"prune-layers", "prune-channels", "prune-weights"}
#: always in the pipeline (exact)
ALWAYS = ("cleanup",)
#: never searched: recovery steps added by rule, or exact passes that change what the user may want kept
BY_RULE = {"distill": "added after prune-layers / prune-channels / prune-weights (the recovery refit)",
           "strip-metadata": "exact, removes the model's documentation: add it to the recipe by hand"}


@dataclass
class PassSpace:
    name: str
    stage: int
    dims: dict[str, SearchDim]
    source: dict[str, str]  # option -> "pass" | "--search-passes"
    always: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)  # option -> the pass's default value

    def base(self) -> dict[str, Any]:
        """Every searched option at a value inside the space: the pass's default where the space holds it, else
        the first choice / the middle of the range."""
        out = {}
        for name, dim in self.dims.items():
            default = self.defaults.get(name)
            if dim.kind == "choice":
                out[name] = default if default in dim.choices else dim.choices[0]
            elif isinstance(default, (int, float)) and not isinstance(default, bool) and \
                    dim.low <= default <= dim.high:
                out[name] = default
            else:
                grid = dim.grid(3)
                out[name] = grid[len(grid) // 2]
        return out


@dataclass
class Space:
    passes: list[PassSpace]
    skipped: dict[str, str] = field(default_factory=dict)  # pass -> why it is not searched

    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def get(self, name: str) -> PassSpace:
        return next(p for p in self.passes if p.name == name)

    def default_config(self) -> dict[str, dict[str, Any] | None]:
        """Every searched pass off (the baseline ``cleanup`` pipeline)."""
        return {p.name: ({} if p.always else None) for p in self.passes}

    def pipeline(self, config: dict[str, dict[str, Any] | None]) -> str:
        """The pipeline text of a config (options in the pass's own format, so it parses back)."""
        from onnxcompress.pipeline import build_pass, format_pipeline

        chosen = [(p.stage, p.name, config.get(p.name)) for p in self.passes]
        enabled = [(stage, name, opts) for stage, name, opts in chosen if opts is not None or name in ALWAYS]
        recovered = [stage for stage, name, _ in enabled if name in STRUCTURAL]
        if recovered and "distill" in registered_passes():
            enabled.append((max(recovered) + 0.5, "distill", {}))
        enabled.sort(key=lambda t: t[0])
        return format_pipeline([build_pass(name, dict(opts or {})) for _, name, opts in enabled])

    def fingerprint(self) -> str:
        data = [[p.name, p.stage, {k: dataclasses.asdict(d) for k, d in p.dims.items()}] for p in self.passes]
        return json.dumps(data, sort_keys=True, default=str)

    def restrict(self, items: list[str]) -> Space:
        """Only the named passes (``--search-passes quantize,prune-channels``), optionally with an option pinned
        to a few values: ``quantize{mode=dynamic|weight_only min_cosine=none}``. Any option of the pass can be
        given (one not searched by default is then searched over, or fixed to, the values given:
        ``cluster{bits=4|6 refit=true}``). Unknown names are bad input."""
        from onnxcompress.errors import BadInputError

        pins: dict[str, dict[str, list[Any]]] = {}
        for item in items:
            name, _, rest = item.strip().partition("{")
            pins[name.strip()] = {}
            for term in rest.rstrip("}").replace(",", " ").split():
                opt, sep, values = term.partition("=")
                if not sep or not values:
                    raise BadInputError(f"--search-passes {item!r}: expected pass{{option=v1|v2 ...}}")
                pins[name.strip()][opt.replace("-", "_")] = [_scalar(v) for v in values.split("|")]
        unknown = [n for n in pins if n not in self.names()]
        if unknown:
            raise BadInputError(f"--search-passes: {', '.join(unknown)} not searchable; searchable: "
                                f"{', '.join(self.names())}")
        kept = []
        for p in self.passes:
            if p.name not in pins and not p.always:
                continue
            dims, source = dict(p.dims), dict(p.source)
            for opt, values in pins.get(p.name, {}).items():
                fields = [f.name for f in option_fields(registered_passes()[p.name])]
                if opt not in dims and opt not in fields:
                    raise BadInputError(f"--search-passes: {p.name} has no option {opt!r}; options: "
                                        f"{', '.join(fields) or '(none)'}")
                dims[opt], source[opt] = SearchDim(opt, "choice", tuple(values)), "--search-passes"
            kept.append(dataclasses.replace(p, dims=dims, source=source))
        return Space(kept, dict(self.skipped))

    def describe(self) -> list[tuple[str, str, str, str]]:
        """Rows (pass, option, range, declared by) for ``tune --space``."""
        rows = []
        for p in self.passes:
            if p.always:
                rows.append((p.name, "-", "always on", "rule"))
                continue
            rows.append((p.name, "enabled", "{false, true}", "rule"))
            rows += [(p.name, k, d.describe(), p.source[k]) for k, d in p.dims.items()]
        rows += [(name, "-", f"not searched: {why}", "rule") for name, why in sorted(self.skipped.items())]
        return rows


def build_space() -> Space:
    """The space of every registered pass (see the module docstring)."""
    passes, skipped = [], {}
    for name, cls in registered_passes().items():
        if name in ALWAYS:
            passes.append(PassSpace(name, STAGE.get(name, 0), {}, {}, always=True))
            continue
        if name in BY_RULE:
            skipped[name] = BY_RULE[name]
            continue
        dims = dict(search_space(cls))
        source = dict.fromkeys(dims, "pass")
        if not dims:
            skipped[name] = "declares no searchable option (option(..., search=...))"
            continue
        defaults = {f.name: f.default for f in option_fields(cls) if f.default is not dataclasses.MISSING}
        passes.append(PassSpace(name, STAGE.get(name, DEFAULT_STAGE), dims, source, defaults=defaults))
    passes.sort(key=lambda p: (p.stage, p.name))
    return Space(passes, skipped)


def _scalar(raw: str) -> Any:
    low = raw.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw.strip().strip("\"'")


def validate_config(space: Space, config: dict[str, dict[str, Any] | None]) -> str | None:
    """Why a config cannot be built (an option combination its pass refuses), or None when it builds."""
    from onnxcompress.errors import BadInputError

    try:
        space.pipeline(config)
    except BadInputError as exc:
        return str(exc)
    return None
