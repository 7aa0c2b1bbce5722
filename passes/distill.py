"""``distill``: post-training knowledge distillation — the original model teaches the compressed one.

Teacher: ``ctx.original_model()``; student: the current graph. Layers are matched by the name of their output
tensor (passes keep names); when ``prune-channels`` cut a layer's outputs, the context's ``channel_map`` says which
teacher channel each kept student channel is.

For every weighted layer (Conv, depthwise Conv, Gemm, MatMul with a constant weight, with its bias — a Conv/Gemm
bias input or the Add that follows a MatMul) whose input differs from the teacher's (downstream of a cut or of
modified weights) or whose own weights were modified, the weights and bias are refit by ridge least squares so
that, on the calibration data, the layer maps the *student's* input to the *teacher's* output
(He et al. 2017, ThiNet): see ``_prune_refit`` for the maths. Layers are processed in stages by depth — a layer is
refit only after every refit layer upstream of it, on inputs produced by the already refit student — so errors do
not accumulate. Each stage streams the calibration feeds once through the student (its layer inputs) and the teacher
(the targets), keeping only X^T X and X^T Y per layer (``max rows`` random rows per feed).

Each layer's ridge is chosen on held-out calibration feeds (every 4th; ``select_ridge``), and a layer keeps its
current weights when no refit does better on them: with few calibration rows per unknown a fixed weak ridge
interpolates the calibration data (MiniLM's FFN projections) and distill made the student worse than the pruned one.

A layer whose output only feeds a residual Add (y + r) is fit to teacher(Add) - student(r) (``compensate``): it
absorbs the error that already reached the residual stream instead of reproducing the teacher's y. When that sum
feeds a LayerNormalization, what the model sees is (s - mean(s)) / std(s) per token, so an error e in s costs
e / std(s): each row (token) of the fit is weighted by 1 / std_teacher(s) (``ln_weight``). Unweighted, the few
tokens with a huge residual stream (BERT's [CLS]/[SEP]: std 10-15x the median in MiniLM's first layer) dominate the
least squares and the ordinary tokens are fit poorly.

Works after ``prune-weights`` (zeros stay zeros: each output is solved on its support) and after ``quantize``
(the float solution is re-quantized on the layer's existing grid and the bias re-solved); layers that cannot be
solved this way (ConvTranspose, grouped Conv, very wide layers) get bias correction:
b += E[y_teacher - y_student] per channel.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress import io
from onnxcompress.analyses.channel_groups import toposort
from onnxcompress.context import PassContext
from onnxcompress.errors import PassError
from onnxcompress.pass_base import Pass, PassResult, register
from onnxcompress.runtime import Session

from ._prune_refit import Layer, Normal, WeightRef, conv_rows, objective, select_ridge, solve

log = logging.getLogger(__name__)


@register
@dataclass(frozen=True)
class Distill(Pass):
    name: ClassVar[str] = "distill"
    description: ClassVar[str] = (
        "refit layers by ridge least squares so the compressed model matches the original "
        "on calibration data, layer by layer; bias correction for the rest"
    )
    option_help_legacy: ClassVar[dict[str, str]] = {
        "ridge": "ridge strength relative to the mean diagonal of X^T X",
        "samples": "calibration feeds used (time grows with them; more feeds generalise better: MiniLM-L3 "
        "cosine 0.969 with 256 sentences, 0.979 with 550)",
        "rows": "design rows per layer (0: 32 x inputs, within 16k..64k), drawn evenly from the feeds",
        "max_inputs": "layers with more inputs per output (Cin*k) only get bias correction",
        "layers": "changed (layers whose input or weights differ from the teacher) or all",
        "bias_correction": "bias-correct layers that are not refit by least squares",
        "compensate": "a layer feeding a residual Add fits teacher(Add) - student(other branch): it absorbs the "
        "error that reached the residual stream",
        "ln_weight": "a residual sum that feeds LayerNormalization: weigh each token by 1 / std of the teacher's sum "
        "(the error LayerNorm passes on)",
        "select_ridge": "hold out every 4th feed and pick each layer's ridge (ridge x 1..1000) on it; keep the "
        "current weights when no refit does better there (needs >= 4 feeds)",
    }

    ridge: float = 1e-2
    samples: int = 1024
    rows: int = 0
    max_inputs: int = 4096
    layers: str = "changed"
    bias_correction: bool = True
    compensate: bool = True
    ln_weight: bool = True
    select_ridge: bool = True

    def __post_init__(self) -> None:
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.rows < 0 or self.max_inputs < 1:
            raise ValueError("rows must be >= 0 and max_inputs >= 1")
        if self.layers not in ("changed", "all"):
            raise ValueError(f"layers must be 'changed' or 'all', got {self.layers!r}")

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        if ctx.calibration is None:
            raise PassError("distill needs calibration data (--calib)")

    # ------------------------------------------------------------------------------------------------ run
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        teacher = ctx.original_model()
        io.lift_constant_nodes(teacher)
        teacher_outputs = {o for n in teacher.graph.node for o in n.output if o}
        teacher_weights = _teacher_weights(teacher)
        cmap = ctx.channel_map.positions
        layers, skipped = self._find_layers(graph, teacher_outputs, teacher_weights, cmap)
        feeds = ctx.calibration.take(self.samples)  # re-iterated per stage, one feed in memory at a time
        rng = ctx.rng("distill")
        stats: dict = {"layers_refit": 0, "layers_bias_corrected": 0, "stages": 0}
        fit_before, fit_after = [], []
        stages = sorted({L.stage for L in layers})
        progress = getattr(ctx, "progress", None)
        for stage in progress(stages, total=len(stages), desc="distill") if progress else stages:
            todo = [L for L in layers if L.stage == stage]
            self._accumulate(ctx.export(graph), teacher, todo, feeds, rng)
            for L in todo:
                result = self._solve(L)
                if result is None:
                    continue
                kind, before, after = result
                if kind == "ls":
                    stats["layers_refit"] += 1
                    fit_before.append(before)
                    fit_after.append(after)
                elif kind == "bias":
                    stats["layers_bias_corrected"] += 1
                else:
                    skipped[kind] += 1
                L.stats = L.hold = None
            stats["stages"] += 1
        stats["skipped"] = dict(skipped.most_common(8))
        if fit_before:
            stats["fit_residual_before"] = round(float(np.mean(fit_before)), 5)
            stats["fit_residual_after"] = round(float(np.mean(fit_after)), 5)
        modified = stats["layers_refit"] + stats["layers_bias_corrected"] > 0
        log.info(
            "distill: %d layers refit, %d bias-corrected in %d stages",
            stats["layers_refit"],
            stats["layers_bias_corrected"],
            stats["stages"],
        )
        return PassResult(modified, stats, frozenset() if modified else frozenset({"all"}))

    # ------------------------------------------------------------------------------------------ layer discovery
    def _find_layers(
        self, graph: gs.Graph, teacher_outputs: set[str], teacher_weights: dict, cmap: dict
    ) -> tuple[list[Layer], Counter]:
        skipped: Counter = Counter()
        changed: set[str] = set(cmap)
        depth: dict[str, int] = {}
        layers: list[Layer] = []
        tensors = graph.tensors()
        graph_out = {id(t) for t in graph.outputs}
        for node in toposort(graph):
            d_in = max((depth.get(t.name, 0) for t in node.inputs), default=0)
            in_changed = any(t.name in changed for t in node.inputs if isinstance(t, gs.Variable))
            L = _make_layer(node)
            node_changed = in_changed
            refit = False
            if L is not None:
                if L.y not in teacher_outputs:
                    skipped["output not in the teacher"] += 1
                    L = None
            if L is not None:
                L.kept_out = _kept(cmap, L.y, L.out_axis)
                if self.compensate:
                    _residual_target(L, tensors, graph_out, teacher_outputs, self.ln_weight)
                modified = _weights_modified(L, teacher_weights, cmap)
                node_changed = node_changed or modified
                if self.layers == "all" or in_changed or modified:
                    L.stage = d_in + 1
                    layers.append(L)
                    refit = True
            out_depth = L.stage if refit else d_in
            for t in node.outputs:
                depth[t.name] = out_depth
                if node_changed:
                    changed.add(t.name)
            if L is not None and L.y != node.outputs[0].name:  # MatMul + bias Add: the Add output too
                depth[L.y] = out_depth
                if node_changed:
                    changed.add(L.y)
        return layers, skipped

    # ------------------------------------------------------------------------------------------ statistics
    def _accumulate(
        self,
        student: onnx.ModelProto,
        teacher: onnx.ModelProto,
        layers: list[Layer],
        feeds,
        rng: np.random.Generator,
    ) -> None:
        s_names = sorted(
            {L.x for L in layers}
            | {L.y for L in layers if L.kind == "bias"}
            | {L.res_other for L in layers if L.res_other}
        )
        t_names = sorted({L.res_out or L.y for L in layers})
        n_feeds = len(feeds)
        with (
            Session(_expose(student, s_names), what="student") as ss,
            Session(_expose(teacher, t_names), what="teacher") as ts,
        ):
            holdout = self.select_ridge and n_feeds >= 4
            for i, feed in enumerate(feeds):
                hold = holdout and i % 4 == 3
                xs = dict(zip(s_names, ss.run(feed, s_names), strict=True))
                ys = dict(zip(t_names, ts.run(feed, t_names), strict=True))
                for L in layers:
                    if L.reason:
                        continue
                    try:
                        self._update(L, xs, ys, n_feeds, rng, hold)
                    except _Skip as exc:
                        L.reason = str(exc)

    def _update(self, L: Layer, xs: dict, ys: dict, n_feeds: int, rng: np.random.Generator,
                hold: bool = False) -> None:
        x = np.asarray(xs[L.x], dtype=np.float64)
        yt = np.asarray(ys[L.res_out or L.y], dtype=np.float64)
        axis = L.out_axis % yt.ndim
        row_w = _ln_row_weights(yt, L.ln_axis, axis) if L.res_out and L.ln_axis is not None else None
        if L.kept_out is not None:
            yt = np.take(yt, L.kept_out, axis=axis)
        if L.res_out:  # the part of the teacher's residual sum this layer must supply
            other = np.asarray(xs[L.res_other], dtype=np.float64)
            if other.shape != yt.shape:
                other = (
                    np.broadcast_to(other, yt.shape)
                    if np.broadcast_shapes(other.shape, yt.shape) == yt.shape
                    else None
                )
                if other is None:
                    raise _Skip("residual branch shape differs from the teacher's sum")
            yt = yt - other
        if L.kind == "bias":
            ysv = np.asarray(xs[L.y], dtype=np.float64)
            if ysv.shape != yt.shape:
                raise _Skip("student and teacher outputs differ in shape")
            diff = np.moveaxis(yt - ysv, axis, 0).reshape(yt.shape[axis], -1)
            L.bias_sum = diff.sum(axis=1) + (L.bias_sum if L.bias_sum is not None else 0.0)
            L.bias_count += diff.shape[1]
            return
        w = L.w.get()
        has_bias = L.b is not None or L.kind in ("conv", "dwconv")
        if L.kind in ("conv", "dwconv"):
            cout = w.shape[0]
            if yt.shape[1] != cout:
                raise _Skip("output channels do not match the teacher (no channel map)")
            k_cols = int(np.prod(w.shape[1:]))
            rows = self._rows_per_feed(k_cols + 1, n_feeds)
            patches, pos = conv_rows(x, L.node, w.shape, list(yt.shape[2:]), rows, rng)
            yr = np.moveaxis(yt, 1, -1)[pos]  # [R, Co]
            if L.kind == "conv":
                xr = patches.reshape(patches.shape[0], -1)
                if has_bias:
                    xr = np.concatenate([xr, np.ones((xr.shape[0], 1))], axis=1)
                _stats(L, hold).update(xr, yr)
            else:
                cin = patches.shape[1]
                m = cout // cin
                per = patches[:, np.arange(cout) // m].reshape(patches.shape[0], cout, -1)  # [R, Co, k]
                per = np.transpose(per, (1, 0, 2))
                per = np.concatenate([per, np.ones(per.shape[:2] + (1,))], axis=2)
                _stats(L, hold, per_channel=True).update(per, yr.T)
            return
        # gemm / matmul: rows of the input
        if L.kind == "gemm":
            xr = x.T if L.trans_a else x
        else:
            xr = x.reshape(-1, x.shape[-1])
        yr = np.moveaxis(yt, axis, -1).reshape(-1, yt.shape[axis])
        n_out = w.shape[0] if (L.kind == "gemm" and L.trans_b) else w.shape[-1]
        if yr.shape[1] != n_out or yr.shape[0] != xr.shape[0]:
            raise _Skip("output features do not match the teacher (no channel map)")
        rw = row_w.reshape(-1) if row_w is not None and not (L.kind == "gemm" and L.trans_a) else None
        rows = self._rows_per_feed(xr.shape[1] + 1, n_feeds)
        if rows < xr.shape[0]:
            pick = rng.choice(xr.shape[0], rows, replace=False)
            xr, yr = xr[pick], yr[pick]
            rw = rw[pick] if rw is not None else None
        if has_bias:
            xr = np.concatenate([xr, np.ones((xr.shape[0], 1))], axis=1)
        if rw is not None:
            xr, yr = xr * rw[:, None], yr * rw[:, None]
        _stats(L, hold).update(xr, yr)

    def _rows_per_feed(self, cols: int, n_feeds: int) -> int:
        # default budget: 32 rows per unknown, at least 16k, at most 64k and ~4e11 multiply-adds for X^T X
        total = self.rows or int(min(65536, max(16384, 32 * cols), 4e11 / (cols * cols)))
        return max(16, math.ceil(total / max(n_feeds, 1)))

    # ------------------------------------------------------------------------------------------ solving
    def _solve(self, L: Layer) -> tuple[str, float, float] | None:
        if L.reason:
            log.debug("distill: %s skipped: %s", L.node.name, L.reason)
            return (L.reason, 0.0, 0.0)
        if L.kind == "bias":
            if L.bias_sum is None or not self.bias_correction:
                return None
            delta = L.bias_sum / max(L.bias_count, 1)
            b_ref = L.b or _add_bias(L)
            if b_ref is None:
                return ("no bias to correct", 0.0, 0.0)
            cur = b_ref.get().reshape(-1)
            if cur.size != delta.size:
                return ("bias shape", 0.0, 0.0)
            b_ref.set((cur + delta).reshape(b_ref.get().shape))
            return ("bias", 0.0, 0.0)
        st = L.stats
        if st is None or st.rows == 0:
            return ("no rows", 0.0, 0.0)
        hold, L.hold = L.hold, None
        w = L.w.get()
        has_bias = L.b is not None or L.kind in ("conv", "dwconv")
        if L.kind == "dwconv":
            cur = w.reshape(w.shape[0], -1)
            b_cur = L.b.get().reshape(-1) if L.b is not None else np.zeros(w.shape[0])
            wb_cur = np.concatenate([cur, b_cur[:, None]], axis=1)
            ridge = select_ridge(st, hold, self.ridge, True, wb_cur) if self.select_ridge else self.ridge
            if ridge is None:
                return (_HELD_OUT, 0.0, 0.0)
            st = st.merged(hold)
            new = solve(st, ridge, True, prior=wb_cur)
            before, after = objective(st, wb_cur), objective(st, new)
            if not after < before:
                return ("no improvement", 0.0, 0.0)
            w_eff = L.w.set(new[:, :-1].reshape(w.shape)).reshape(w.shape[0], -1)
            if L.w.quantized:  # bias for the re-quantized weights, per channel
                a, b = st.xtx, st.xty
                new[:, -1] = (b[:, -1] - np.einsum("ck,ck->c", a[:, -1, :-1], w_eff)) / np.maximum(
                    a[:, -1, -1], 1
                )
            b_ref = L.b or _add_bias(L)
            b_ref.set(new[:, -1].reshape(b_ref.get().shape))
            return (
                "ls",
                _rel(st, before),
                _rel(st, objective(st, np.concatenate([w_eff, new[:, -1:]], axis=1))),
            )
        wm = _to_matrix(L, w)  # [K, N]
        k = wm.shape[0]
        if k > self.max_inputs:
            return (f"more than {self.max_inputs} inputs", 0.0, 0.0)
        b_cur = _bias_vector(L, wm.shape[1]) if has_bias else None
        wb_cur = np.concatenate([wm, b_cur[None, :]], axis=0) if has_bias else wm
        mask = None
        if np.mean(wm == 0) > 0.2:  # sparse weights: keep the support
            mask = np.concatenate([wm != 0, np.ones((1, wm.shape[1]), bool)], axis=0) if has_bias else wm != 0
        ridge = select_ridge(st, hold, self.ridge, has_bias, wb_cur, mask) if self.select_ridge else self.ridge
        if ridge is None:
            return (_HELD_OUT, 0.0, 0.0)
        st = st.merged(hold)
        new = solve(st, ridge, has_bias, mask, prior=wb_cur)
        before, after = objective(st, wb_cur), objective(st, new)
        if not after < before:
            log.debug(
                "distill: %s: refit does not lower the objective (%.4g >= %.4g)", L.node.name, after, before
            )
            return ("no improvement", 0.0, 0.0)
        w_eff = _from_matrix(L, new[:k], w.shape)
        w_eff_m = _to_matrix(L, L.w.set(w_eff))
        if has_bias:
            b_new = new[k]
            if L.w.quantized:
                a, b = st.xtx, st.xty
                b_new = (b[k] - a[k, :k] @ w_eff_m) / max(a[k, k], 1.0)
            _set_bias(L, b_new)
            final = np.concatenate([w_eff_m, b_new[None, :]], axis=0)
        else:
            final = w_eff_m
        return ("ls", _rel(st, before), _rel(st, objective(st, final)))


class _Skip(Exception):
    pass


_HELD_OUT = "held-out feeds prefer the current weights"


def _stats(L: Layer, hold: bool, per_channel: bool = False) -> Normal:
    """The layer's fit statistics, or its held-out ones."""
    attr = "hold" if hold else "stats"
    if getattr(L, attr) is None:
        setattr(L, attr, Normal(per_channel=per_channel))
    return getattr(L, attr)


def _rel(st: Normal, obj: float) -> float:
    """Residual energy relative to the target's: (||XW - Y||^2) / ||Y||^2."""
    return max(0.0, (obj + st.yty) / st.yty) if st.yty > 0 else 0.0


# ---------------------------------------------------------------------------------------------- helpers
def _make_layer(node: gs.Node) -> Layer | None:
    op = node.op
    if (
        node.domain not in (None, "", "ai.onnx")
        or not node.inputs
        or not isinstance(node.inputs[0], gs.Variable)
    ):
        return None
    x = node.inputs[0].name
    if op == "Conv":
        w = WeightRef.resolve(node, 1)
        if w is None:
            return None
        wv = w.get()
        group = int(node.attrs.get("group", 1))
        b = WeightRef.resolve(node, 2)
        if group == 1:
            kind = "conv"
        elif wv.shape[1] == 1:
            kind = "dwconv"
        else:
            kind = "bias"
        return Layer(node, kind, x, node.outputs[0].name, 1, w, b)
    if op == "ConvTranspose":
        w = WeightRef.resolve(node, 1)
        if w is None:
            return None
        return Layer(node, "bias", x, node.outputs[0].name, 1, w, WeightRef.resolve(node, 2))
    if op == "Gemm":
        w = WeightRef.resolve(node, 1)
        if w is None:
            return None
        b = WeightRef.resolve(node, 2)
        n = w.get().shape[0 if node.attrs.get("transB", 0) else 1]
        if b is not None and b.get().size != n:
            return None  # a C that varies along M cannot be refit per output
        return Layer(
            node,
            "gemm",
            x,
            node.outputs[0].name,
            1,
            w,
            b,
            alpha=float(node.attrs.get("alpha", 1.0)),
            beta=float(node.attrs.get("beta", 1.0)),
            trans_a=bool(node.attrs.get("transA", 0)),
            trans_b=bool(node.attrs.get("transB", 0)),
        )
    if op == "MatMul":
        w = WeightRef.resolve(node, 1)
        if w is None or w.get().ndim != 2:
            return None
        y = node.outputs[0]
        b = None
        yname = y.name
        if len(y.outputs) == 1 and y.outputs[0].op == "Add":
            add = y.outputs[0]
            other = 1 if add.inputs[0] is y else 0
            ref = WeightRef.resolve(add, other)
            if ref is not None and ref.get().size == w.get().shape[1] and ref.get().ndim == 1:
                b = ref
                yname = add.outputs[0].name
        return Layer(node, "matmul", x, yname, -1, w, b)
    return None


def _residual_target(L: Layer, tensors: dict, graph_out: set[int], teacher_outputs: set[str],
                     ln_weight: bool = True) -> None:
    """If the layer's output only feeds Add(y, other) with ``other`` an activation, fit teacher(sum) - other; note
    the LayerNormalization axis when every consumer of the sum normalises it over one axis."""
    y = tensors.get(L.y)
    if y is None or len(y.outputs) != 1 or y.outputs[0].op != "Add" or id(y) in graph_out:
        return
    add = y.outputs[0]
    if len(add.inputs) != 2 or add.inputs[0] is add.inputs[1]:
        return
    other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
    out = add.outputs[0].name
    if isinstance(other, gs.Variable) and other.name and out in teacher_outputs:
        L.res_out, L.res_other = out, other.name
        total = add.outputs[0]
        users = total.outputs
        if ln_weight and users and all(u.op == "LayerNormalization" and u.inputs[0] is total for u in users):
            axes = {int(u.attrs.get("axis", -1)) for u in users}
            if axes == {-1} or (total.shape is not None and axes == {len(total.shape) - 1}):
                L.ln_axis = -1


def _ln_row_weights(sum_t: np.ndarray, ln_axis: int, out_axis: int) -> np.ndarray | None:
    """1 / std of the teacher's residual sum over the LayerNorm axis, one weight per row of the fit (the rows are
    the positions along every other axis, the layer's output axis being the last), normalised to mean 1."""
    if ln_axis % sum_t.ndim != out_axis:
        return None
    std = np.sqrt(sum_t.var(axis=out_axis) + 1e-5)
    w = 1.0 / std
    return w / w.mean()


def _kept(cmap: dict, name: str, axis: int) -> np.ndarray | None:
    entry = cmap.get(name)
    if not entry:
        return None
    if axis >= 0:
        return entry.get(axis)
    return entry.get(max(entry)) if len(entry) == 1 else None


def _teacher_weights(teacher: onnx.ModelProto) -> dict[str, np.ndarray]:
    """output tensor name -> weight of the node producing it (Conv/ConvTranspose/Gemm/MatMul)."""
    inits = {t.name: t for t in teacher.graph.initializer}
    out = {}
    for n in teacher.graph.node:
        if (
            n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")
            and len(n.input) > 1
            and n.input[1] in inits
        ):
            out[n.output[0]] = inits[n.input[1]]
    return out


def _weights_modified(L: Layer, teacher_weights: dict, cmap: dict) -> bool:
    """Whether the layer's weights differ from the teacher's beyond slicing (pruned weights, quantization...)."""
    if L.w.quantized:
        return True
    t = teacher_weights.get(L.node.outputs[0].name)
    if t is None:
        return False
    tw = onnx.numpy_helper.to_array(t)
    sw = np.asarray(L.node.inputs[1].values)
    if tw.shape == sw.shape:
        return not np.array_equal(tw, sw)
    # sliced: compare on the kept positions when the maps are known
    kin = _kept(cmap, L.x, 1 if L.kind != "matmul" else -1)
    kout = L.kept_out
    try:
        if L.kind in ("conv", "dwconv", "bias"):
            if kout is not None:
                tw = tw[kout]
            if kin is not None and L.kind == "conv":
                tw = tw[:, kin]
        elif L.kind == "matmul":
            if kin is not None:
                tw = tw[kin]
            if kout is not None:
                tw = tw[:, kout]
        else:
            return True
    except IndexError:
        return True
    return tw.shape != sw.shape or not np.array_equal(tw, sw)


def _to_matrix(L: Layer, w: np.ndarray) -> np.ndarray:
    """The layer's weight as [K, N] with y = x @ W (Gemm: alpha folded in)."""
    if L.kind == "conv":
        return w.reshape(w.shape[0], -1).T
    if L.kind == "gemm":
        return (w.T if L.trans_b else w) * L.alpha
    return w


def _from_matrix(L: Layer, m: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if L.kind == "conv":
        return m.T.reshape(shape)
    if L.kind == "gemm":
        b = m / L.alpha
        return b.T if L.trans_b else b
    return m


def _bias_vector(L: Layer, n: int) -> np.ndarray:
    if L.b is None:
        return np.zeros(n)
    b = L.b.get().reshape(-1)
    return b * L.beta if L.kind == "gemm" else b


def _set_bias(L: Layer, b: np.ndarray) -> None:
    ref = L.b or _add_bias(L)
    if ref is None:
        return
    shape = ref.get().shape
    if L.kind == "gemm":
        b = b / L.beta
    ref.set(b.reshape(shape))


def _add_bias(L: Layer) -> WeightRef | None:
    """Give a Conv / ConvTranspose / Gemm a zero bias input (float, like the layer's output)."""
    node = L.node
    if node.op not in ("Conv", "ConvTranspose", "Gemm"):
        return None
    w = L.w.get()
    n = {
        "Conv": w.shape[0],
        "ConvTranspose": w.shape[1] * int(node.attrs.get("group", 1)),
        "Gemm": w.shape[0] if L.trans_b else w.shape[1],
    }[node.op]
    dtype = np.float32 if L.w.quantized else np.asarray(node.inputs[1].values).dtype
    const = gs.Constant(f"{node.outputs[0].name}_bias", np.zeros(n, dtype=dtype))
    while len(node.inputs) < 3:
        node.inputs.append(const)
    node.inputs[2] = const
    if node.op == "Gemm":
        node.attrs["beta"] = 1.0
        L.beta = 1.0
    L.b = WeightRef(node, 2)
    return L.b


def _expose(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """The part of ``model`` needed for ``names``, with exactly those as outputs (nodes with subgraphs: whole)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    has_sub = any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute
    )
    if not has_sub:
        producer = {o: i for i, n in enumerate(g.node) for o in n.output}
        need = set()
        stack = [n for n in names if n in producer]
        seen = set(stack)
        while stack:
            t = stack.pop()
            i = producer.get(t)
            if i is None or i in need:
                continue
            need.add(i)
            for inp in g.node[i].input:
                if inp and inp not in seen:
                    seen.add(inp)
                    stack.append(inp)
        keep = [n for i, n in enumerate(g.node) if i in need]
        del g.node[:]
        g.node.extend(keep)
        used = {x for n in keep for x in n.input}
        inits = [t for t in g.initializer if t.name in used]
        del g.initializer[:]
        g.initializer.extend(inits)
    del g.output[:]
    for n in names:
        g.output.append(onnx.ValueInfoProto(name=n))
    return m
