"""``cluster``: weight sharing — every weight tensor (or output channel) reduced to k = 2^bits shared values.

For each float weight constant of a Conv / ConvTranspose / Gemm / MatMul (the constant B) / Gather (embedding
table) / LSTM, GRU, RNN (W and R; no activation weights or refit) with at least ``min_size`` elements (depthwise Convs left alone with ``skip_depthwise``):

1. exact 1-D k-means of its values (``kmeans1d``) — per tensor, per output channel (``per_channel``), or per tensor
   on the values divided by each output channel's RMS with the scales kept (``channel_scales``, the default: a
   BatchNorm folded into a Conv gives channels of very different size); weighted by the layer's input energy with
   ``activation_aware``; 0 a fixed centroid when >= ``zero_fraction`` of the tensor is exactly zero (pruned);
2. with ``refit`` (calibration data): the weights re-assigned input by input with error feedback (``obs_assign``,
   ``obs``) and the shared values refit by least squares with the assignment fixed (``codebook_refit``), both on
   the layer's Gram X^T X; with ``max_error`` a tensor whose relative output error stays above it is redone with
   one more bit (up to 8);
   ``refit_rounds`` / ``fit_scales`` alternate refit, channel-scale fit and re-assignment (``refine``);
3. with ``target_error`` / ``size_budget`` / ``size_ratio``: bits per tensor from measured output errors
   (``allocation``; a product-quantized table climbs v<d> -> shorter blocks -> 8 bits -> float); ``size_ratio=R`` budgets the clustered tensors at (the run's original model bytes / R) minus
   the rest of the file (earlier passes that removed weights, e.g. ``prune-channels``, leave more per weight);
4. stored as a codebook + packed indices decoded in the graph, or snapped in place, whichever is smaller on disk
   (``storage=auto``; ``storage``); ``storage=unpacked`` keeps int32 indices (what ``distill{mode=train}`` trains)
   and every later ``cluster`` run packs such decodes exactly (``pack_only``: nothing else).

Gather tables with ``embedding_vector=d``: product quantization (``vector_codebook``: blocks of d values share
2^embedding_bits d-vectors; token counts on every calibration feed as row weights, and scalar residuals in stages on
the rows worth it: ``hot_rows``); an allocation's trial feeds are held out of the counts (unseen tokens measured).
MatMul / Gemm weights and Conv kernels with ``matrix_vector`` (and the refit's Gram): vector codes with error feedback
instead of step 1-2 at 1-4 bits (``matrix_vector``: GPTQ-VQ, natural or act-order inputs as measured). Codebooks and
channel scales are stored as float16 where that rounding costs <= 1% of the tensor's error (``half_books``).

A constant read by several nodes (tied weights) is clustered once and all its readers read the one decoded tensor.
Statistics (Gram matrices of the layer inputs) come from the shared ``ActivationStatistics`` of the current graph,
in one streaming run over the first ``samples`` feeds, and one more over more feeds where a layer's feeds gave all
their rows and fell short of ``gram_rows`` x its inputs (token models: ``gram_rows``).

Stats: tensors clustered / skipped (with reasons), storage per tensor kind, bits per tensor, bytes of the clustered
tensors before and after (as planned: data + decode overhead), the largest codebook row, the weighted relative error
sum w (v - v̂)^2 / sum w v^2 (mean over tensors), the refit objective before/after (summed). Raw file size shrinks
only with codebook storage (ORT folds the decode at load: the session holds float weights); snapped values shrink
under zip and feed a later ``quantize`` (which then quantizes the snapped values).
"""

from __future__ import annotations

import logging
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress import mmap_weights
from onnxcompress.analyses.activation_stats import ActivationStatistics, StatsRequest
from onnxcompress.context import PassContext
from onnxcompress.errors import BadInputError
from onnxcompress.naming import Namer
from onnxcompress.pass_base import Pass, PassResult, option, register

from .allocation import FLOAT, Trials, allocate, ladder
from .candidates import Candidate, find_candidates
from .cluster_tensor import Clustered, cluster_tensor, element_weights
from .emit import write_clustered
from .gram_rows import RowNeed, feeds_for_rows
from .half_books import halve
from .hot_rows import describe_stages
from .kmeans1d import INITS
from .layouts import RECURRENT
from .matrix_vector import OPS as MATRIX_OPS
from .matrix_vector import cluster_matrix, pick_form, vector_form
from .packing import pack_existing
from .storage import DecodeBuilder
from .vector_codebook import cluster_table, token_counts, vector_blocks

log = logging.getLogger(__name__)

STORAGES = ("auto", "codebook", "snap", "unpacked")
#: size_ratio plans 0.5% under the asked size: the decode overheads of ``storage.plan_bytes`` are measured constants
RATIO_MARGIN = 0.995
#: serialized bytes per character of a tensor's name beyond the first, in a decode (the decoded "<name>_clustered"
#: is a node output, a consumer input and a value_info; the constant it replaces was named once): the storage
#: constants are measured with one-character names
NAME_BYTES = 1.45


def _named(res: Clustered, name: str) -> Clustered:
    """``res`` with the name-dependent bytes of its decode added to every planned storage but ``snap``."""
    extra = int(NAME_BYTES * max(len(name) - 1, 0))
    res.bytes_planned = {k: v + (0 if k == "snap" else extra) for k, v in res.bytes_planned.items()}
    return res


@register
@dataclass(frozen=True)
class Cluster(Pass):
    name: ClassVar[str] = "cluster"
    description: ClassVar[str] = (
        "weight sharing: k-means of each weight tensor (or output channel) to 2^bits values, stored as a codebook "
        "+ packed indices decoded in the graph (smaller file) or snapped in place"
    )
    needs: ClassVar[frozenset[str]] = frozenset()
    preserves: ClassVar[frozenset[str]] = frozenset()

    bits: int = option(4, "index bits: k = 2^bits shared values per tensor (per channel with per_channel), 1..8",
                       search=[2, 3, 4, 5, 6])
    per_channel: bool = option(False, "one codebook per output channel instead of one per tensor")
    channel_scales: bool = option(True, "per-tensor codebook of values divided by each output channel's RMS, "
                                        "times a float scale per channel (<= k values per channel; for channels "
                                        "of very different size, e.g. BatchNorm folded into Conv)")
    skip_depthwise: bool = option(True, "leave depthwise convolutions alone (few weights, large effect)")
    init: str = option("linear", "k-means init: linear (even over [min, max]), density (quantiles) or kmeans++")
    activation_aware: bool = option(False, "weight each element by its input's energy ||x_j||^2 on calibration "
                                           "data (needs --calib)")
    refit: bool = option(False, "refit the shared values by least squares on calibration data (indices fixed; "
                                "needs --calib)")
    max_error: float | None = option(None, "with refit: a tensor whose relative output error on calibration "
                                           "data, ||X(W - Ŵ)||^2 / ||XW||^2, is above this gets one more bit, up to "
                                           "8 (mixed precision)")
    obs: bool = option(True, "with refit: assign the weights input by input, each rounding error moved onto the "
                             "weights not yet assigned through the layer's inverse Gram (GPTQ with the codebook)")
    refit_rounds: int = option(1, "with refit: rounds of (least-squares shared values, channel scales, "
                                  "re-assignment with error feedback) in the layer's output metric, the best kept; "
                                  "stops when the output error improves by < 0.1%")
    fit_scales: bool = option(False, "with refit and channel_scales: each output channel's scale refit by least "
                                     "squares in the output metric (else the channel RMS)")
    storage: str = option("auto", "auto (smaller on disk per tensor), codebook (packed indices + Gather), snap "
                                  "(values replaced in place) or unpacked (codebook + int32 indices: what "
                                  "distill{mode=train} trains; a later cluster packs them)")
    half_codebooks: bool = option(True, "store codebooks and channel scales as float16 (cast back at load) where "
                                        "that adds <= 1% to the tensor's measured clustering error; with "
                                        "pack_only: round the trained tables to float16 when packing them")
    pack_only: bool = option(False, "only pack the indices of existing unpacked codebook decodes (after "
                                    "distill{mode=train}), cluster nothing new")
    exclude: tuple[str, ...] = option((), "tensor or node names (fnmatch patterns) left alone")
    min_size: int = option(1024, "tensors with fewer elements are left alone")
    embeddings: bool = option(True, "also cluster Gather tables (embeddings)")
    embedding_bits: int | None = option(None, "index bits for Gather tables (default: bits; with "
                                              "embedding_vector: 8 (256 codes per block), fewer for a table "
                                              "whose codebooks would outweigh its codes, down to 4)")
    embedding_vector: int = option(0, "Gather tables: product quantization, every row cut into blocks of this "
                                      "many values that share 2^embedding_bits codes per block (log2(k) / d bits "
                                      "per weight; weighted by token counts with activation_aware; under an "
                                      "allocation the table's ladder shortens d); 0: scalar like other weights")
    matrix_vector: bool = option(False, "MatMul / Gemm weights and Conv kernels at 1-4 bits in vector codes with "
                                        "error feedback "
                                        "(GPTQ-VQ: groups of 8/4/2/2 inputs share 256/256/64/256 codes per tensor, "
                                        "channel scales; needs refit=true for the layer Gram; other tensors, "
                                        "pruned ones and 8 bits stay scalar)")
    zero_fraction: float = option(0.05, "a tensor with at least this share of exact zeros (pruned) keeps 0 as a "
                                        "fixed centroid; 1 disables")
    target_error: float | None = option(None, "mixed bit-widths from measured sensitivity: each tensor's effect "
                                              "on the outputs (relative output error on calibration feeds, "
                                              "clustered alone) decides who gets more bits (+2, 8) or stays "
                                              "float, most error per byte first, until the model's measured "
                                              "error is <= this (needs --calib)")
    size_budget: float | None = option(None, "mixed bit-widths within a size: bits per weight, all-in (indices, "
                                             "codebooks, scales, decode), over the clustered tensors; tensors get "
                                             "more bits, most measured output error per byte first, while it fits "
                                             "(with target_error: until that is met; needs --calib)")
    size_ratio: float | None = option(None, "mixed bit-widths for a file this many times smaller than the run's "
                                            "original model (before any pass: after prune-channels the pruned "
                                            "bytes count): the clustered tensors get what the rest of the file "
                                            "leaves of size / size_ratio, spent as size_budget (needs --calib)")
    sensitivity_samples: int = option(16, "calibration feeds for target_error's trials")
    samples: int = option(256, "calibration feeds for activation_aware / refit statistics (more where a layer's "
                               "feeds give fewer than gram_rows rows per input: gram_rows)")
    gram_rows: float = option(32.0, "layer Gram rows per input wanted: a layer whose feeds give all their rows "
                                    "(tokens) and fall short reads more calibration feeds (0: off)")
    max_inputs: int = option(2304, "refit only layers with at most this many inputs per output (Gram size)")

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer in 1..8, got {self.bits!r}")
        if not isinstance(self.embedding_vector, int) or self.embedding_vector < 0 or self.embedding_vector == 1:
            raise ValueError(f"embedding_vector must be 0 (off) or a block length >= 2, got {self.embedding_vector!r}")
        if self.embedding_bits is not None and not 1 <= self.embedding_bits <= 8:
            raise ValueError(f"embedding_bits must be in 1..8, got {self.embedding_bits!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.storage not in STORAGES:
            raise ValueError(f"storage must be one of {', '.join(STORAGES)}, got {self.storage!r}")
        if self.min_size < 1 or self.samples < 1 or self.max_inputs < 1 or self.refit_rounds < 1:
            raise ValueError("min_size, samples, max_inputs and refit_rounds must be >= 1")
        if self.target_error is not None and not self.target_error > 0:
            raise ValueError(f"target_error must be > 0, got {self.target_error}")
        if self.size_ratio is not None and not self.size_ratio > 1:
            raise ValueError(f"size_ratio must be > 1, got {self.size_ratio}")
        if self.size_budget is not None and self.size_ratio is not None:
            raise ValueError("give size_budget or size_ratio, not both")
        if self.size_budget is not None and not self.size_budget > 0:
            raise ValueError(f"size_budget must be > 0 bits per weight, got {self.size_budget}")
        if self.sensitivity_samples < 1 or not self.gram_rows >= 0:
            raise ValueError(f"sensitivity_samples must be >= 1 and gram_rows >= 0 (0: off), got "
                             f"{self.sensitivity_samples} and {self.gram_rows}")
        if self.max_error is not None and not self.max_error > 0:
            raise ValueError(f"max_error must be > 0, got {self.max_error}")
        if self.matrix_vector and not self.refit:
            raise ValueError("matrix_vector needs refit=true (its error feedback uses the layer Gram)")
        if self.storage == "unpacked" and self.per_channel:
            raise ValueError("storage=unpacked takes one codebook per tensor (per_channel=false)")
        if not 0.0 < self.zero_fraction <= 1.0:
            raise ValueError(f"zero_fraction must be in (0, 1], got {self.zero_fraction}")

    def needs_calibration(self) -> bool:
        return self.activation_aware or self.refit or self.target_error is not None or \
            self.size_budget is not None or self.size_ratio is not None

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        if self.needs_calibration() and ctx.calibration is None:
            raise BadInputError("cluster{activation_aware/refit/target_error/size_budget} needs calibration data (--calib)")

    # ------------------------------------------------------------------------------------------ statistics
    def _statistics(self, graph: gs.Graph, ctx: PassContext,
                    cands: list[Candidate]) -> tuple[dict[int, tuple], int | None]:
        """Per candidate: (norms, per_column, refit Gram or None) from one streaming run of the current graph (two
        when ``gram_rows`` asks for more feeds); and the feeds the Grams are over (None: no Gram)."""
        rng = ctx.rng("cluster")
        n_feeds = min(self.samples, len(ctx.calibration))
        plan: dict[int, tuple[str, str | None]] = {}
        needs: dict[str, RowNeed] = {}
        req = StatsRequest(samples=self.samples)
        for c in cands:
            use = c.uses[0]
            x = use.activation()
            shape = tuple(c.tensor.values.shape)
            if isinstance(x, gs.Constant) or use.op in ("Gather", "ConvTranspose") or use.op in RECURRENT:
                continue
            if len({(u.op, u.channel_axis(len(shape))) for u in c.uses}) > 1:
                continue  # tied across different roles: no one input to weight by
            chan_key = design_key = None
            if self.refit and use.refit_reason(shape) is None:
                n_in = use.to_matrix(np.empty(shape, np.uint8)).shape[1]
                if n_in <= self.max_inputs:
                    per_feed = max(64, -(-8 * n_in // max(n_feeds, 1)))
                    design_key = f"{x.name}:cluster-rows:{use.node.name}"
                    req.second_moments[design_key] = (x.name, use.design_rows(shape, per_feed, rng))
                    needs[design_key] = RowNeed(n_in, per_feed)
            if self.activation_aware and design_key is None:
                chan_key = f"{x.name}:channels"
                req.second_moments[chan_key] = (x.name, use.channel_rows())
            plan[id(c.tensor)] = (chan_key, design_key)
        out = {}
        if self.activation_aware and self.embedding_vector:
            tables = {c.tensor.name: (c.uses[0].node.inputs[1], c.tensor.values.shape[0]) for c in cands
                      if c.uses[0].op == "Gather" and len(c.uses) == 1 and self._vector_level(c) is not None
                      and int(c.uses[0].node.attrs.get("axis", 0)) == 0}  # indices name rows
            # the allocation's trial feeds (the first sensitivity_samples) are held out of the counts: its measured
            # table error then includes rows the counts never saw, as new text will (hot rows fit the counted ones)
            counts = token_counts(graph, ctx, tables, req, skip=self._held_out(ctx)) if tables else {}
            for c in cands:  # a table's "input norms" are its token counts (the one-hot input's Gram diagonal)
                if c.tensor.name in counts:  # (computed indices are counted during the run below)
                    out[id(c.tensor)] = (counts[c.tensor.name], False, None)
        if not req.second_moments and req.capture is None:
            return out, None
        store = ctx.analysis(ActivationStatistics, graph).get(req)
        rows = {k: g.rows for k in needs if (g := store.gram(k, n_feeds)) is not None}
        n_used = feeds_for_rows(rows, needs, n_feeds, len(ctx.calibration), self.gram_rows)
        if n_used > n_feeds:  # token feeds: few rows each (``gram_rows``), every Gram again over more feeds
            store.drop_grams(req.second_moments, n_feeds)  # only their row counts were needed: freed before the run
            store.get(StatsRequest(second_moments=dict(req.second_moments), samples=n_used))
        for c in cands:
            keys = plan.get(id(c.tensor))
            if keys is None:
                continue
            chan_key, design_key = keys
            design = store.gram(design_key, n_used) if design_key else None
            chan = store.gram(chan_key, n_used) if chan_key else None
            gram = None if design is None else design.xtx / max(design.rows, 1)
            if self.activation_aware and design is not None:
                out[id(c.tensor)] = (np.diag(gram).copy(), True, gram)
            elif chan is not None:
                out[id(c.tensor)] = (chan.channel_sq_norms / max(chan.rows, 1), False, None)
            else:
                out[id(c.tensor)] = (None, False, gram)
        return out, n_used

    def _allocates(self) -> bool:
        return self.target_error is not None or self.size_budget is not None or self.size_ratio is not None

    def _held_out(self, ctx: PassContext) -> int:
        """Calibration feeds left out of the token counts: the allocation's trial feeds, when at least as many remain."""
        n_feeds = min(self.samples, len(ctx.calibration))
        return self.sensitivity_samples if self._allocates() and n_feeds >= 2 * self.sensitivity_samples else 0

    # ------------------------------------------------------------------------------------------- one tensor
    def _vector_level(self, c: Candidate) -> str | None:
        """The first level of a table that takes product quantization ("v<d>"), else None."""
        if not self.embedding_vector or c.uses[0].op != "Gather" or self.storage == "snap":
            return None
        return f"v{self.embedding_vector}" if self._codes(c) else None

    def _codes(self, c: Candidate) -> int:
        """Codes per block of a table: 2^embedding_bits, or without it the most of 256, 128, .., 16 whose codebooks
        weigh no more than the codes (``vector_blocks``); 0 when none does."""
        w = c.tensor.values
        for bits in ([self.embedding_bits] if self.embedding_bits else range(8, 3, -1)):
            if not vector_blocks(tuple(w.shape), self.embedding_vector, 1 << bits, w.dtype.itemsize):
                return 1 << bits
        return 0

    def _rungs(self, c: Candidate, level) -> list:
        """The allocation ladder of one tensor from its first level: scalar bits b0, b0 + 1, .. (``ladder``), or
        for a product-quantized table v<d> then every shorter block length that divides the row, down to 2 (more
        bits per weight each: log2(k) / d), then 8 bits, then float."""
        if not isinstance(level, str):
            return ladder(level)
        row = c.tensor.values.shape[1]
        return [f"v{d}" for d in range(int(level[1:]), 1, -1) if row % d == 0] + [8, FLOAT]

    def _cluster_one(self, c: Candidate, bits, stats_of: dict, storage: str, rng, vector: bool = True) -> Clustered:
        """One tensor at one level; ``vector``: matrix_vector may apply (not at an allocation's forced first level,
        which stays the cheapest form: a 256-code codebook there is spent before any measurement weighs it)."""
        w = np.asarray(c.tensor.values)
        norms, per_column, gram = stats_of.get(id(c.tensor), (None, False, None))
        if isinstance(bits, str):  # "v<d>": product quantization of a Gather table
            res = cluster_table(w, int(bits[1:]), self._codes(c), norms, storage, rng)
            return _named(halve(res, w, c.uses[0]) if self.half_codebooks else res, c.tensor.name)
        if c.uses[0].op == "Gather":
            norms = None  # token counts weight only the d-vectors (scalar codes weighted so: measured worse)
        scales = self.channel_scales and c.uses[0].op != "Gather" and w.shape[c.uses[0].channel_axis(w.ndim)] > 1
        res = cluster_tensor(w, 1 << bits, use=c.uses[0], per_channel=self.per_channel, channel_scales=scales,
                             init=self.init, zero_fraction=self.zero_fraction, col_norms=norms,
                             per_column=per_column, refit_gram=gram, obs=self.obs, storage=storage, rng=rng,
                             refit_rounds=self.refit_rounds if self.obs else 1, fit_scales=self.fit_scales)
        op = c.uses[0].op
        if vector and self.matrix_vector and gram is not None and op in MATRIX_OPS and (w.ndim == 2 or op == "Conv") \
                and vector_form(bits, gram.shape[0]) and np.mean(w == 0) < self.zero_fraction and storage != "snap":
            own = np.random.default_rng(zlib.crc32(f"{c.tensor.name}:{bits}".encode()))  # the shared stream stays
            res = pick_form(w, cluster_matrix(w, bits, c.uses[0], gram, storage, own), res, c.uses[0], gram)
        return _named(halve(res, w, c.uses[0]) if self.half_codebooks else res, c.tensor.name)

    def _allocate(self, graph: gs.Graph, ctx: PassContext, chosen: list, stats_of: dict, storage: str, rng,
                  st: dict) -> list:
        """``target_error`` / ``size_budget``: levels (bits or float) per tensor from measured output errors
        (``allocation``)."""
        by_name = {c.tensor.name: (c, bits, res) for c, bits, res in chosen}
        levels = {n: {bits: (res.bytes_planned[res.storage], res.snapped)} for n, (c, bits, res) in by_name.items()}
        done = {n: {bits: res} for n, (c, bits, res) in by_name.items()}
        rungs = {n: self._rungs(c, bits) for n, (c, bits, _) in by_name.items()}

        def make_level(name: str, bits):
            c = by_name[name][0]
            if bits == FLOAT:
                return int(np.asarray(c.tensor.values).nbytes), None
            res = self._cluster_one(c, bits, stats_of, storage, rng)
            done[name][bits] = res
            return res.bytes_planned[res.storage], res.snapped

        feeds = list(ctx.calibration.take(self.sensitivity_samples))
        trials = Trials(ctx.export(graph), list(by_name), feeds)
        try:
            budget = None
            if self.size_budget is not None or self.size_ratio is not None:
                n_weights = sum(int(np.asarray(c.tensor.values).size) for c, _, _ in chosen)
                if self.size_ratio is not None:  # the file: the rest stays as it is, the tensors get what is left
                    # serialized_size: memory-mapped weights count with their bytes (ByteSize sees file references:
                    # a model with 9.5 MB of external weights measured 0.15 MB, the budget 31 bits a weight)
                    model_bytes = mmap_weights.serialized_size(ctx.export(graph))
                    ref_bytes = len(ctx.original_bytes) if ctx.original_bytes is not None else \
                        mmap_weights.serialized_size(ctx.original_model())
                    rest = model_bytes - sum(int(np.asarray(c.tensor.values).nbytes) for c, _, _ in chosen)
                    want = int(ref_bytes / self.size_ratio * RATIO_MARGIN) - rest
                    st["size_ratio_of_bytes"] = ref_bytes
                    st["size_ratio_budget_bits"] = round(8 * want / max(n_weights, 1), 3)
                else:
                    want = int(self.size_budget * n_weights / 8)
                budget = max(want, sum(levels[n][rungs[n][0]][0] for n in levels))
            pick, a_st = allocate(trials, levels, make_level, self.target_error, budget, rungs)
        finally:
            trials.close()
        st.update(a_st)
        return [(c, pick[c.tensor.name] if pick[c.tensor.name] != FLOAT else bits,
                 done[c.tensor.name].get(pick[c.tensor.name])) for c, bits, _ in chosen]

    # ------------------------------------------------------------------------------------------------ run
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        skipped: Counter = Counter()
        n_packed = saved = 0
        if self.storage != "unpacked" and ctx.opset() >= 11:
            n_packed, saved = pack_existing(graph, DecodeBuilder(graph, Namer(graph), ctx.opset()), self.min_size,
                                            self.half_codebooks and self.pack_only)  # asked: round trained tables
        cands = [] if self.pack_only else find_candidates(graph, self, skipped)
        for c in cands:
            axis = c.uses[0].channel_axis(c.tensor.values.ndim)
            if self.per_channel and c.tensor.values.shape[axis] == 1:
                raise BadInputError(f"cluster{{per_channel=true}}: {c.tensor.name} has a single output channel "
                                    f"(shape {list(c.tensor.values.shape)}); exclude it or cluster per tensor")
        stats_of, gram_feeds = self._statistics(graph, ctx, cands) if self.needs_calibration() and cands \
            else ({}, None)
        storage = self.storage
        if ctx.opset() < 11 and storage != "snap":
            storage = "snap"
            skipped["codebook storage needs opset >= 11: snapped"] += len(cands)
        builder = DecodeBuilder(graph, Namer(graph), ctx.opset())
        rng = ctx.rng("cluster-init")
        k = 1 << self.bits
        st: dict = {"tensors_clustered": 0, "storage": Counter(), "bits": Counter(), "bytes_before": 0, "bytes_after": 0,
                    "max_unique_per_row": 0, "weighted": 0, "refit_layers": 0}
        if gram_feeds:
            st["gram_feeds"] = gram_feeds
        errs, refit_before, refit_after = [], 0.0, 0.0

        def clustered():  # lazily: without an allocation each tensor is applied before the next is clustered
            for c in cands:
                w = np.asarray(c.tensor.values)
                norms, per_column, gram = stats_of.get(id(c.tensor), (None, False, None))
                if self.activation_aware and norms is None:
                    skipped["activation_aware: no input statistics (unweighted)"] += 1
                if self.refit and gram is None:
                    reason = c.uses[0].refit_reason(w.shape) or "inputs above max_inputs or tied across roles"
                    skipped[f"refit: {reason}"] += 1
                bits, energy = self.bits, None
                if self.embedding_bits is not None and c.uses[0].op == "Gather":
                    bits = self.embedding_bits
                bits = self._vector_level(c) or bits
                if self.max_error is not None and gram is not None:
                    m = c.uses[0].to_matrix(w.astype(np.float64))
                    energy = max(float(np.sum((m @ gram) * m)), 1e-30)
                while True:
                    res = self._cluster_one(c, bits, stats_of, storage, rng, vector=not self._allocates())
                    if energy is None or res.refit is None or bits >= 8 or res.refit[1] / energy <= self.max_error:
                        break
                    bits += 1
                yield c, bits, res

        chosen = clustered()
        if self._allocates():
            chosen = list(chosen)  # the allocation weighs every tensor's results together
            if chosen:
                chosen = self._allocate(graph, ctx, chosen, stats_of, storage, rng, st)
            if any(isinstance(b, str) and res is not None and res.weighted for _, b, res in chosen):
                st["token_counts_held_out"] = self._held_out(ctx)  # feeds (the allocation's trials)
        for c, bits, res in chosen:
            st["bits"][str(bits) if res is not None else "float"] += 1
            if c.uses[0].op == "Gather":  # embedding tables: the level each got (v<d>: product quantization)
                st.setdefault("tables", {})[c.tensor.name] = str(bits) if res is not None else "float"
                if res is not None and res.hot is not None:
                    st.setdefault("hot_rows", {})[c.tensor.name] = describe_stages(res.hot)
            if res is None:
                skipped["kept float (target_error)"] += 1
                continue
            w = np.asarray(c.tensor.values)
            norms, per_column, _ = stats_of.get(id(c.tensor), (None, False, None))
            wf = w.astype(np.float64)
            wt = 1.0 if norms is None else element_weights(c.uses[0], w.shape, norms, per_column)
            errs.append(float(np.sum(wt * (wf - res.snapped) ** 2) / max(float(np.sum(wt * wf**2)), 1e-30)))
            if res.refit is not None:
                st["refit_layers"] += 1
                refit_before += res.refit[0]
                refit_after += res.refit[1]
            st["weighted"] += int(res.weighted)
            if res.vector is None:
                st["max_unique_per_row"] = max(st["max_unique_per_row"], int(res.codebook.shape[1]))
            st["bytes_before"] += res.bytes_raw
            st["bytes_after"] += res.bytes_planned[res.storage]
            st["storage"]["unpacked" if storage == "unpacked" and res.storage != "snap" else res.storage] += 1
            st["tensors_clustered"] += 1
            write_clustered(builder, c.tensor, c.uses[0], res, storage, f"cl{st['tensors_clustered']}")
            st["half_codebooks"] = st.get("half_codebooks", 0) + int(res.half)
            mmap_weights.release_resident_pages()  # a model over 2 GB: one weight's pages resident
        if n_packed:
            st["decodes_packed"], st["bytes_saved_packing"] = n_packed, saved
        if st["tensors_clustered"] or n_packed:
            graph.cleanup().toposort()
        if "size_ratio_of_bytes" in st:  # what the plan bought, measured on the written graph
            st["size_ratio_reached"] = round(st["size_ratio_of_bytes"] /
                                             max(mmap_weights.serialized_size(ctx.export(graph)), 1), 3)
        st["storage"] = dict(st["storage"])
        st["bits"] = dict(sorted(st["bits"].items(), key=lambda kv: (len(kv[0]), kv[0])))
        st["skipped"] = dict(skipped.most_common(12))
        st["relative_error"] = round(float(np.mean(errs)), 6) if errs else 0.0
        if st["refit_layers"]:
            st["refit_objective_before"] = refit_before
            st["refit_objective_after"] = refit_after
        log.info("cluster: %d tensors to %d values (%s), %d -> %d bytes", st["tensors_clustered"], k,
                 st["storage"], st["bytes_before"], st["bytes_after"])
        modified = st["tensors_clustered"] > 0 or n_packed > 0
        if not modified and not st["skipped"]:
            st["skipped"] = {"(model)": "no constant float weight of a Conv / ConvTranspose / Gemm / MatMul / "
                                        "embedding Gather / LSTM / GRU / RNN in the main graph"}
        return PassResult(modified, st, frozenset() if modified else frozenset({"all"}))
