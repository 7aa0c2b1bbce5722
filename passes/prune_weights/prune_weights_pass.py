"""``prune-weights``: zero individual weights (unstructured or N:M) by magnitude, Wanda or OBS (SparseGPT).

For every target weight (``targets``: Conv / ConvTranspose / Gemm / MatMul constants, embeddings on request) seen as
V [outputs, reduction]:

1. scores (``masks``): |V| (``magnitude``), |V_ij| · ||x_j|| (``wanda``), V_ij² / [H^-1]_jj (``obs``), with
   H = X^T X the layer's Gram matrix over calibration design rows, taken from the shared ``ActivationStatistics``
   store (one streaming run for all layers; layers reading the same input with the same row construction share
   one Gram matrix);
2. zero counts per tensor (``allocation``): ``uniform`` round(sparsity · size) each; ``global`` one threshold over
   the scores made comparable across layers; ``sensitivity`` from each layer's measured output-error curve
   (``sensitivity``; the error is judged per output channel when an output mixes quantities of very different
   scale, ``sensitivity_error``; the trials can prune with the OBS update, ``sensitivity_update``); ``auto`` =
   sensitivity with calibration data, else uniform (measured at 50% obs on
   ``benchmarks/prune_weights.py``: MiniLM-L3 cosine 0.959 -> 0.972, nudenet box F1 0.626 -> 0.793, ddddocr_det 0.939 -> 0.989); N:M patterns
   fix the count at (M - N) / M of every tensor;
   ``score=auto`` is obs with calibration data, else magnitude (measured: obs beat magnitude, and wanda where it
   ran, in every model and cell of the benchmark);
3. the zeros: ``magnitude`` / ``wanda`` zero the smallest scores per output row (``scope=row``) or per tensor
   (``layer``), or the M - N smallest of each N:M group; ``obs`` prunes with the OBS update of the remaining weights,
   column block by column block (``obs``), so the layer's calibration output is reconstructed while it is pruned.

Per tensor the stats give the target and reached sparsity, the score used and, where a Gram matrix exists, the
relative calibration output error tr(D H D^T) / tr(V H V^T) of the zeroing alone (``err_before``) and after the OBS
update (``err_after``). Skipped weights are listed with their reason. Unstructured and N:M zeros give no speed-up
on onnxruntime's CPU kernels (they are dense): the gain is size (``storage``), which the stats say.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress import mmap_weights
from onnxcompress.analyses.activation_stats import ActivationStatistics, StatsRequest
from onnxcompress.context import PassContext
from onnxcompress.errors import BadInputError
from onnxcompress.pass_base import Pass, PassResult, option, register

from . import masks as mk
from .obs import damped, inverse_cholesky_upper, obs_prune, saliency
from .sensitivity import ERRORS, allocate, measure_curves
from .storage import store_sparse
from .targets import Target, find_targets

log = logging.getLogger(__name__)

SCORES = ("auto", "magnitude", "wanda", "obs")
ALLOCATIONS = ("auto", "uniform", "global", "sensitivity")
_NM = re.compile(r"^(\d+):(\d+)$")
SPEED_NOTE = "size only, no speed-up on ORT CPU (dense kernels)"


@register
@dataclass(frozen=True)
class PruneWeights(Pass):
    name: ClassVar[str] = "prune-weights"
    description: ClassVar[str] = ("zero individual weights (unstructured or N:M) by magnitude, Wanda or OBS with "
                                  "reconstruction (SparseGPT); size only, no speed-up on ORT CPU")
    #: for score=wanda/obs and allocation=sensitivity only (``needs_calibration``)
    needs: ClassVar[frozenset[str]] = frozenset({"calibration"})
    #: none declared: weight values (and so activations) change; with dense storage the run keeps channel_groups
    #: (shapes and channels do not change), with COO storage new Constant nodes appear
    preserves: ClassVar[frozenset[str]] = frozenset()

    sparsity: float = option(0.5, "fraction of each pruned tensor's weights set to zero (unstructured), in [0, 1)",
                             search=(0.3, 0.9, 0.1))
    pattern: str = option("unstructured", "unstructured, or N:M (2:4, 4:8): at most N non-zeros in every M "
                                          "consecutive weights along the reduction axis (sparsity is then 1-N/M)")
    score: str = option("auto", "auto (obs with calibration data, else magnitude), magnitude (|w|), wanda "
                                "(|w|*||x||), obs (SparseGPT: OBS saliency and update of the remaining weights)")
    allocation: str = option("auto", "auto (sensitivity with calibration data, else uniform; measured at 50% obs: "
                                     "MiniLM-L3 cosine 0.959 -> 0.972, nudenet box F1 0.626 -> 0.793, ddddocr_det "
                                     "0.939 -> 0.989), uniform "
                                     "(every tensor at sparsity), global (one threshold over scores made comparable "
                                     "across layers), sensitivity (per-layer sparsity from measured output-error "
                                     "curves; needs data)")
    scope: str = option("row", "where a tensor's zeros are chosen: row (every output row gets its share) or layer")
    exclude: tuple[str, ...] = option((), "weights to leave alone: glob patterns on weight or node names")
    embeddings: bool = option(False, "also prune embedding tables (Gather of a constant 2-D table; magnitude)")
    keep_first_last: bool = option(True, "leave the first and last weighted layers (no weighted layer before / "
                                         "after them) dense")
    min_params: int = option(1024, "leave weights with fewer elements dense")
    skip_depthwise: bool = option(True, "leave depthwise convolutions dense (few weights, large effect)")
    samples: int = option(128, "calibration feeds used for the Gram matrices (wanda, obs)")
    rows_per_feed: int = option(256, "Conv output positions (im2col rows) sampled per calibration feed")
    damp: float = option(0.01, "OBS damping of H, relative to its mean diagonal")
    block: int = option(128, "OBS column block size (the mask is chosen per block on the updated weights)")
    stages: int = option(1, "wanda/obs: prune the layers in this many groups in topological order, each on "
                            "statistics of the model with the earlier groups already pruned (one calibration run "
                            "per group; 1 = all layers on the unpruned model's statistics)")
    storage: str = option("dense", "dense (zeros, shrink under zip), sparse (COO Constant nodes) or auto (COO "
                                   "where smaller); COO weights are invisible to later passes: last pass only")
    sensitivity_levels: tuple[float, ...] = option((0.3, 0.5, 0.7, 0.9), "sparsities each layer is measured at "
                                                                         "alone (allocation=sensitivity)")
    sensitivity_samples: int = option(4, "calibration feeds per sensitivity trial")
    sensitivity_update: bool = option(False, "score=obs: measure each sensitivity level with the OBS update of the "
                                             "remaining weights (what the pruning does) instead of the zeroing "
                                             "alone")
    sensitivity_error: str = option("auto", "output (relative squared error pooled over the outputs), channel "
                                            "(mean of each output channel's relative error: an output mixing box "
                                            "coordinates and class scores is not judged by the coordinates alone; "
                                            "nudenet 50% box F1 0.855 -> 0.962) or auto (channel when an output's "
                                            "channel energies differ by > 1e4x, else output)")

    def __post_init__(self) -> None:
        if not isinstance(self.sparsity, int | float) or not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity!r}")
        if self.pattern != "unstructured":
            m = _NM.match(str(self.pattern))
            if not m:
                raise ValueError(f"pattern must be unstructured or N:M (e.g. 2:4), got {self.pattern!r}")
            n, mm = int(m.group(1)), int(m.group(2))
            if not 0 < n < mm:
                raise ValueError(f"pattern {self.pattern}: need 0 < N < M")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.scope not in ("row", "layer"):
            raise ValueError(f"scope must be row or layer, got {self.scope!r}")
        if self.sensitivity_error not in ERRORS:
            raise ValueError(f"sensitivity_error must be one of {', '.join(ERRORS)}, got {self.sensitivity_error!r}")
        if self.storage not in ("dense", "sparse", "auto"):
            raise ValueError(f"storage must be dense, sparse or auto, got {self.storage!r}")
        if min(self.samples, self.rows_per_feed, self.sensitivity_samples, self.block, self.stages) < 1:
            raise ValueError("samples, rows_per_feed, sensitivity_samples, block and stages must be >= 1")
        if self.min_params < 0 or self.damp < 0:
            raise ValueError("min_params and damp must be >= 0")
        if not self.sensitivity_levels or not all(0 < x < 1 for x in self.sensitivity_levels):
            raise ValueError("sensitivity_levels must be sparsities in (0, 1)")
        if self.nm is not None and self.block % self.nm[1]:
            raise ValueError(f"block ({self.block}) must be a multiple of M ({self.nm[1]})")

    @property
    def update_block(self) -> int | None:
        """The OBS block size the sensitivity trials update with (None: zeroing alone)."""
        return self.block if self.sensitivity_update else None

    @property
    def nm(self) -> tuple[int, int] | None:
        m = _NM.match(str(self.pattern))
        return (int(m.group(1)), int(m.group(2))) if m else None

    # ------------------------------------------------------------------------------------------ contract
    def needs_calibration(self) -> bool:
        return self.score in ("wanda", "obs") or self.allocation == "sensitivity"

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        if self.needs_calibration() and ctx.calibration is None:
            raise BadInputError(f"prune-weights{{score={self.score} allocation={self.allocation}}} needs "
                                "calibration data (--calib); score=magnitude does not")

    def resolved_allocation(self, ctx: PassContext) -> str:
        if self.allocation != "auto":
            return self.allocation
        return "sensitivity" if ctx.calibration is not None else "uniform"

    def resolved_score(self, ctx: PassContext) -> str:
        if self.score != "auto":
            return self.score
        return "obs" if ctx.calibration is not None else "magnitude"

    # ----------------------------------------------------------------------------------------------- run
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        self.requires(graph, ctx)
        score = self.resolved_score(ctx)
        nm = self.nm
        targets, skipped = find_targets(
            graph, embeddings=self.embeddings, keep_first_last=self.keep_first_last, min_params=self.min_params,
            skip_depthwise=self.skip_depthwise, exclude=tuple(self.exclude), nm=nm,
            rows_per_feed=self.rows_per_feed, seed=ctx.seed)
        allocation = self.resolved_allocation(ctx) if nm is None else "n:m"
        stats: dict = {"score": score, "pattern": self.pattern, "allocation": allocation,
                       "speed": SPEED_NOTE, "skipped": skipped}
        if not targets:
            stats["tensors_pruned"] = 0
            if not skipped:
                stats["skipped"] = {"(model)": "no constant float weight of a Conv / ConvTranspose / Gemm / MatMul "
                                               "in the main graph"}
            return PassResult(False, stats, frozenset({"all"}))
        needs_h = score in ("wanda", "obs")
        # the Gram matrices of every target at once can outgrow the model (33 layers of 4096 columns: 4.4 GB of
        # float64 for a 2.2 GB file): then the layers go in groups whose Grams fit GRAM_BUDGET_BYTES, each group's
        # statistics measured when it is reached (on the graph as it is then, as ``stages`` does)
        by_memory = gram_groups(targets) if needs_h else 1
        chunks = np.array_split(np.arange(len(targets)), max(min(self.stages, len(targets)) if needs_h else 1,
                                                               by_memory))
        grams = self._grams(ctx.analysis(ActivationStatistics, graph), targets) if needs_h and by_memory == 1 \
            else {}
        chunk_grams = _ChunkGrams(self, graph, ctx, targets, chunks) if by_memory > 1 else None

        def layer(t: Target, source: dict) -> _Layer:
            return _Layer(t, source.get(t.rows_key) if t.rows_key else None, score, self.damp)

        def layer_at(i: int) -> _Layer:  # with its chunk's Grams when they are measured per group
            return layer(targets[i], chunk_grams.of(i) if chunk_grams else grams)

        layers: list[_Layer | None]
        mapped = any(mmap_weights.is_mapped_constant(t.const) for t in targets)
        if allocation in ("uniform", "n:m") or (allocation == "sensitivity" and (mapped or chunk_grams)):
            # each layer's float64 state is built when it is measured / pruned and released after, so memory
            # holds one layer at a time (models over 2 GB)
            layers = [None] * len(targets)
            sizes = [int(np.prod(t.const.shape)) for t in targets]
            if allocation == "sensitivity":
                counts = self._sensitivity_counts(
                    targets, [lambda i=i: layer_at(i).zeroed_at(self.scope, self.update_block)
                              for i in range(len(targets))], sizes, graph, ctx, stats)
            else:
                counts = self._counts_by_size(sizes)
        elif chunk_grams:  # global: one float32 comparable score per weight, the layers built group by group
            layers = [None] * len(targets)
            counts, _ = mk.global_counts([mk.comparable(layer_at(i).scores).astype(np.float32)
                                          for i in range(len(targets))], self.sparsity)
        else:
            layers = [layer(t, grams) for t in targets]
            counts = self._counts(layers, graph, ctx, allocation, stats)
        per_tensor: dict[str, dict] = {}
        for ci, chunk in enumerate(chunks):
            source = grams
            if ci > 0 or chunk_grams:  # statistics of the graph as it is now: the earlier groups already pruned
                source = self._grams(ActivationStatistics.compute(graph, ctx), [targets[i] for i in chunk])
                for i in chunk:
                    layers[i] = None  # rebuilt from these statistics, one layer at a time
            for i in chunk:
                if layers[i] is None:
                    layers[i] = layer(targets[i], source)
                per_tensor[layers[i].t.name] = self._prune(layers[i], counts[i])
                layers[i].release()
            del source
        if chunk_grams:
            stats["gram_groups"] = by_memory
        stats["stages"] = len(chunks)
        consts = [t.const for t in targets]
        stats["storage"] = store_sparse(graph, consts, self.storage) | {"mode": self.storage}
        self._summarise(stats, per_tensor, layers)
        modified = stats["zeros_added"] > 0 or stats["storage"]["tensors"] > 0
        log.info("prune-weights (%s, %s): %d tensors, %.1f%% of their weights zero", score, self.pattern,
                 len(layers), 100 * stats["sparsity_pruned_tensors"])
        kept = frozenset({"channel_groups"}) if stats["storage"]["tensors"] == 0 else frozenset()
        return PassResult(modified, stats, kept if modified else frozenset({"all"}))

    # ------------------------------------------------------------------------------------------- helpers
    def _grams(self, store, targets: list[Target]) -> dict:
        """Gram matrices of the targets' design rows from a shared statistics ``store`` (one streaming run)."""
        req = {t.rows_key: (t.x_name, t.rows_fn) for t in targets if t.rows_key}
        if not req:
            return {}
        store.get(StatsRequest(second_moments=req, samples=self.samples))
        return {key: store.gram(key, self.samples) for key in req}

    def _counts_by_size(self, sizes: list[int]) -> list[int]:
        """Zeros per tensor for allocations that need only the sizes: N:M, or the same sparsity everywhere."""
        nm = self.nm
        if nm is not None:
            return [size * (nm[1] - nm[0]) // nm[1] for size in sizes]
        return [int(round(self.sparsity * size)) for size in sizes]

    def _counts(self, layers: list[_Layer], graph: gs.Graph, ctx: PassContext, allocation: str,
                stats: dict) -> list[int]:
        """Zeros per tensor (allocation=sensitivity also puts its measured curves in ``stats``)."""
        if self.nm is not None:
            return self._counts_by_size([L.size for L in layers])
        if allocation == "global":
            counts, _ = mk.global_counts([mk.comparable(L.scores) for L in layers], self.sparsity)
            return counts
        if allocation == "sensitivity":
            return self._sensitivity_counts([L.t for L in layers],
                                            [lambda L=L: L.zeroed_at(self.scope, self.update_block) for L in layers],
                                            [L.size for L in layers], graph, ctx, stats)
        return self._counts_by_size([L.size for L in layers])

    def _sensitivity_counts(self, targets: list[Target], zeroed_at: list, sizes: list[int], graph: gs.Graph,
                            ctx: PassContext, stats: dict) -> list[int]:
        """Zeros per tensor from each layer's measured output-error curve (``sensitivity``); the curves and the
        error they were measured with (``sensitivity_error``) go into ``stats``."""
        feeds = list(ctx.calibration.take(self.sensitivity_samples))
        levels = tuple(sorted(self.sensitivity_levels))
        info: dict = {}
        curves = measure_curves(ctx.export(graph), [t.name for t in targets], zeroed_at, levels, feeds,
                                self.sensitivity_error, info)
        stats["sensitivity_error"] = info
        stats["sensitivity_curves"] = {t.name: [round(float(e), 6) for e in c]
                                       for t, c in zip(targets, curves, strict=True)}
        return allocate(curves, levels, sizes, self.sparsity)

    def _prune(self, L: _Layer, k: int) -> dict:
        v = L.v
        if L.score == "obs":
            new, mask = L.obs(k, self.scope, self.nm, self.block)
        else:
            mask = mk.nm_mask(L.scores, *self.nm) if self.nm is not None else mk.unstructured_mask(
                L.scores, k, self.scope)
            new = np.where(mask, 0.0, v)
        before_zeros = int(np.count_nonzero(v == 0))
        dtype = np.asarray(L.t.const.values).dtype
        out = L.t.from_matrix(new).astype(dtype)
        was_mapped = mmap_weights.is_mapped_constant(L.t.const)
        L.t.const.values = np.ascontiguousarray(out)  # a new array: never write into a Constant's values
        if was_mapped and out.nbytes >= mmap_weights.MAP_MIN_BYTES:
            mmap_weights.spill(L.t.const)  # a model over 2 GB: the pruned weight goes to a scratch file at once
        zeros = int(np.count_nonzero(out == 0))
        row = {"target": round(k / L.size, 6), "reached": round(zeros / L.size, 6), "score": L.score,
               "size": L.size, "zeros": zeros, "zeros_before": before_zeros}
        if L.h_groups is not None:
            row["err_before"] = round(L.error(np.where(mask, 0.0, v)), 6)
            row["err_after"] = round(L.error(new), 6)
        return row

    def _summarise(self, stats: dict, per_tensor: dict, layers: list[_Layer]) -> None:
        size = sum(r["size"] for r in per_tensor.values())
        zeros = sum(r["zeros"] for r in per_tensor.values())
        stats["tensors_pruned"] = len(per_tensor)
        stats["params_in_pruned_tensors"] = size
        stats["zeros_added"] = zeros - sum(r["zeros_before"] for r in per_tensor.values())
        stats["sparsity_pruned_tensors"] = round(zeros / size, 6) if size else 0.0
        errs = [(r["err_before"], r["err_after"]) for r in per_tensor.values() if "err_after" in r]
        if errs:
            stats["calib_error_before_mean"] = round(float(np.mean([e[0] for e in errs])), 6)
            stats["calib_error_after_mean"] = round(float(np.mean([e[1] for e in errs])), 6)
        stats["tensors"] = per_tensor


#: the Gram matrices (float64 X^T X) held at once; more, and the layers are pruned in groups (``gram_groups``)
GRAM_BUDGET_BYTES = 256 << 20


def gram_groups(targets: list[Target]) -> int:
    """Groups of layers whose Grams (8 · cols² bytes each) fit ``GRAM_BUDGET_BYTES``: 1 for every usual model."""
    total = sum(8 * reduction_cols(t) ** 2 for t in targets if t.rows_key)
    return max(1, -(-total // GRAM_BUDGET_BYTES))


def reduction_cols(t: Target) -> int:
    """Columns of the target's matrix view V (the layer's reduction width), from its shape alone."""
    shape = t.const.shape
    if t.kind == "matmul" or t.kind == "convT":
        return int(shape[0])
    if t.kind == "gemm":
        return int(shape[1] if t.extra.get("trans_b") else shape[0])
    if t.kind == "conv":
        return int(np.prod(shape[1:]))
    return int(shape[-1])


class _ChunkGrams:
    """Grams measured one group of layers at a time (on the graph as it is when asked), the last group's kept."""

    def __init__(self, owner: PruneWeights, graph: gs.Graph, ctx: PassContext, targets: list[Target],
                 chunks: list[np.ndarray]):
        self.owner, self.graph, self.ctx, self.targets = owner, graph, ctx, targets
        self.chunk_of = {int(i): ci for ci, chunk in enumerate(chunks) for i in chunk}
        self.chunks, self.current, self.grams = chunks, -1, {}

    def of(self, i: int) -> dict:
        ci = self.chunk_of[i]
        if ci != self.current:
            self.grams = {}  # release the previous group's first
            self.grams = self.owner._grams(ActivationStatistics.compute(self.graph, self.ctx),
                                           [self.targets[j] for j in self.chunks[ci]])
            self.current = ci
        return self.grams


#: rows per block in ``_Layer.error``
ERROR_BLOCK_ROWS = 256


class _Layer:
    """One target with its matrix view, its score matrix and (with a Gram) the per-group damped Hessians."""

    def __init__(self, t: Target, gram, score: str, damp: float):
        self.t = t
        self.v = t.to_matrix(np.asarray(t.const.values).astype(np.float64))
        self.size = int(self.v.size)
        self.rows = t.row_groups(self.v.shape[0])
        self.h_groups: list[np.ndarray] | None = None
        if gram is not None:
            cols = t.group_cols or [None]
            self.h_groups = [gram.xtx if c is None else gram.xtx[np.ix_(c, c)] for c in cols]
        self.score = score if self.h_groups is not None else "magnitude"
        self.damp = damp
        #: per group: upper Cholesky factor of the damped H^-1 (obs)
        self.u_groups = ([inverse_cholesky_upper(damped(h, damp)) for h in self.h_groups]
                         if self.score == "obs" else None)
        self.scores = self._scores()

    def _scores(self) -> np.ndarray:
        if self.score == "magnitude":
            return np.abs(self.v)
        s = np.empty_like(self.v)
        for g, (rows, h) in enumerate(zip(self.rows, self.h_groups, strict=True)):
            if self.score == "wanda":
                s[rows] = mk.wanda_scores(self.v[rows], np.diag(h))
            else:
                s[rows] = np.sqrt(saliency(self.v[rows], self.u_groups[g]))  # |w| / sqrt([H^-1]_jj)
        return s

    def zeroed_at(self, scope: str, update_block: int | None = None):
        """level -> the weight with that share of its lowest scores zeroed. Holds only the ranks (one sort for
        every level) and the weight: the layer's scores, Hessians and factors can be freed meanwhile. With
        ``update_block`` (score obs): the level's OBS pruning with the update of the remaining weights instead
        (this holds the layer's factors)."""
        if update_block is not None and self.score == "obs":
            dtype_ = np.asarray(self.t.const.values).dtype

            def pruned(level: float) -> np.ndarray:
                new, _ = self.obs(int(round(level * self.size)), scope, None, update_block)
                return self.t.from_matrix(new).astype(dtype_)
            return pruned
        ranked = mk.ranks(self.scores, axis=1 if scope == "row" else None)
        t, v, size = self.t, self.v, self.size
        dtype = np.asarray(t.const.values).dtype

        def zeroed(level: float) -> np.ndarray:
            mask = mk.mask_from_ranks(ranked, int(round(level * size)), scope)
            return t.from_matrix(np.where(mask, 0.0, v)).astype(dtype)
        return zeroed

    def obs(self, k: int, scope: str, nm, block: int) -> tuple[np.ndarray, np.ndarray]:
        new = np.empty_like(self.v)
        mask = np.zeros(self.v.shape, dtype=bool)
        per_row = mk.row_counts(k, *self.v.shape)
        n_rows = self.v.shape[0]
        for rows, u in zip(self.rows, self.u_groups, strict=True):
            # layer scope: the tensor's k split over the groups by cumulative rounding (the total stays k)
            kg = int(per_row[rows].sum()) if scope == "row" else (
                int(round(k * (rows[-1] + 1) / n_rows)) - int(round(k * rows[0] / n_rows)))
            new[rows], mask[rows] = obs_prune(self.v[rows], u, k=kg, scope=scope, nm=nm, block=block)
        return new, mask

    def release(self) -> None:
        """Drop the big matrices once the layer is pruned (the stats keep what matters): the float64 copy of the
        weight too, so memory holds one layer's state at a time."""
        self.v = self.h_groups = self.u_groups = self.scores = None

    def error(self, new: np.ndarray) -> float:
        """Relative calibration output error Σ_r (w'_r - w_r) H (w'_r - w_r)^T / Σ_r w_r H w_r^T, in blocks of
        rows so the temporaries stay a fraction of the layer (a 4096 x 4096 layer: 8 MB, not 3 x 134 MB)."""
        num = den = 0.0
        for rows, h in zip(self.rows, self.h_groups, strict=True):
            for start in range(0, len(rows), ERROR_BLOCK_ROWS):
                r = rows[start:start + ERROR_BLOCK_ROWS]
                v, d = self.v[r], new[r] - self.v[r]
                num += float(np.sum((d @ h) * d))
                den += float(np.sum((v @ h) * v))
        return num / den if den > 0 else 0.0
