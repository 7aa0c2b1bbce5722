"""A small ONNX -> PyTorch interpreter: the student graph executed node by node, its float weights trainable.

``TorchGraph(graph, torch)`` walks an onnx-graphsurgeon graph in topological order and evaluates every node with
the ``torch_ops`` table; nothing is converted or re-traced, so the graph it trains is exactly the graph that is
written back. The float weights of weighted slots become ``Weight`` parameters keyed by their ONNX tensor name
(a ``Constant`` node's weight by its output name), one parameter per name however many nodes share it:

- Conv / ConvTranspose / Gemm weight and bias, MatMul's constant operand, BatchNormalization scale and bias,
  LayerNormalization scale and bias, PRelu slope, the constant (non-scalar) operand of Add / Sub / Mul;
- ``Gather(codebook, constant indices)`` (a clustered tensor decoded by Gather): the codebook is the parameter;
- a weight with few distinct values (<= 256, every value used >= 16 times on average: snapped clustering) is
  trained as its codebook: W = c[idx], so it keeps <= k distinct values; a Conv / Gemm / MatMul weight with few
  values in each output row (snapped with channel scales: ``shared_values.snapped_rows``) trains each row's set;
- exact zeros stay zero: W = P * M with the mask M = (W0 != 0) (pruned weights; their gradient is zero); with
  ``learn_masks`` a pruned MatMul / Gemm / Conv weight trains a dense shadow P and W = P * M(P), its N:M pattern or
  non-zero count kept (``sparse_masks``);
- a clustered weight as ``cluster`` stores it (``storage=codebook``: indices in bit streams unpacked by integer ops):
  every tensor computed from integer constants alone is evaluated once up front
  (``constant_eval.integer_constant_values``), so the decode's Gather reads constant indices and its codebook
  and channel scales train while the packed streams stay as they are; a weight stored as float16 and cast
  (``Cast(float16 constant)``: half codebooks and scales) trains in float32 and is written back rounded to float16;
- a QDQ graph (``quantize``): QuantizeLinear / DequantizeLinear run as fake quantization with a straight-through
  estimator; a quantized weight or int32 bias read through a DQ trains a float shadow of its integers, and with
  ``learn_scales`` the activation scales train too (``fake_quant``).

Shape arithmetic (Shape, Gather on shapes, Concat of dims) runs on int64 tensors, so dynamic shapes follow the feed.
Ops outside the table, other domains and subgraph ops (If, Loop, Scan) are ``Unsupported``: listed up front by
``unsupported`` and raised, naming the op and node, if a forward reaches them.
"""

from __future__ import annotations

import heapq
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.analyses.shared_values import snapped_rows, weight_output_axis
from onnxcompress.constant_eval import integer_constant_values

from .fake_quant import attach
from .sparse_masks import MaskRule, choose_mask, reduction_axis, rule_for, straight_through
from .torch_ops import MULTI_OUTPUT, OPS

log = logging.getLogger(__name__)

#: (op, input index) slots whose constant float input is a trainable weight
WEIGHT_SLOTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "BatchNormalization": (1, 2),
                "LayerNormalization": (1, 2), "PRelu": (1,), "MatMul": (0, 1), "Add": (0, 1), "Sub": (0, 1),
                "Mul": (0, 1)}
#: a weight with at most this many distinct values, each used CODEBOOK_USE times on average, trains its codebook
CODEBOOK_MAX = 256
CODEBOOK_USE = 16


class Unsupported(Exception):
    """A node the interpreter cannot execute."""

    def __init__(self, op: str, node: str, why: str = "") -> None:
        self.op, self.node = op, node
        super().__init__(f"op {op} (node {node!r}) is not supported by the training interpreter"
                         + (f": {why}" if why else ""))


@dataclass
class Weight:
    """One trainable ONNX weight: value = (param[index] if a codebook else param) * mask."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    param: Any
    mask: Any = None
    index: Any = None
    #: learned mask (``sparse_masks``): ``mask`` is M(param), refreshed by ``refresh_mask``
    rule: MaskRule | None = None
    #: the mask is folded into the parameter: its masked entries are 0 and its gradient is masked by a hook
    folded: bool = False

    def value(self) -> Any:
        v = self.param[self.index] if self.index is not None else self.param
        if self.mask is None or self.folded:
            return v
        return straight_through(v, self.mask) if self.rule is not None else v * self.mask

    def refresh_mask(self, torch: Any) -> int:
        """Recompute a learned mask from the current shadow; returns how many entries changed sides."""
        if self.rule is None:
            return 0
        new = choose_mask(torch, self.param, self.rule)
        changed = int((new != self.mask).sum()) // 2
        self.mask = new
        return changed

    def numpy(self) -> np.ndarray:
        return self.value().detach().cpu().numpy().astype(self.dtype).reshape(self.shape)


def _const_value(t: gs.Tensor, folded: dict[str, np.ndarray] | None = None) -> np.ndarray | None:
    if folded and t.name in folded:
        return folded[t.name]
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        v = t.inputs[0].attrs.get("value")
        return np.asarray(v.values) if isinstance(v, gs.Constant) else None
    return None


def topo_order(graph: gs.Graph) -> list[gs.Node]:
    """The stored node order when it is topological (the usual case), else Kahn's algorithm with ties in stored
    order (O(nodes + edges) either way)."""
    producer = {id(o): i for i, n in enumerate(graph.nodes) for o in n.outputs}
    deps = [{producer[id(t)] for t in n.inputs if id(t) in producer} for n in graph.nodes]
    if all(j < i for i, d in enumerate(deps) for j in d):
        return list(graph.nodes)
    users: dict[int, list[int]] = defaultdict(list)
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    count = [len(d) for d in deps]
    ready = [i for i, c in enumerate(count) if c == 0]
    heapq.heapify(ready)
    out = []
    while ready:
        i = heapq.heappop(ready)
        out.append(graph.nodes[i])
        for j in users[i]:
            count[j] -= 1
            if count[j] == 0:
                heapq.heappush(ready, j)
    if len(out) != len(graph.nodes):
        raise ValueError("the graph has a cycle")
    return out


def is_weight_slot(node: gs.Node, index: int, value: np.ndarray,
                   folded: dict[str, np.ndarray] | None = None) -> bool:
    if not np.issubdtype(value.dtype, np.floating) or value.size <= 1:
        return False
    if node.op == "Gather":
        return index == 0 and len(node.inputs) > 1 and _const_value(node.inputs[1], folded) is not None
    if node.op == "Cast":  # a weight stored in half precision, cast to float32 where it is used
        return value.dtype == np.float16 and int(node.attrs.get("to", 0)) == onnx.TensorProto.FLOAT
    return index in WEIGHT_SLOTS.get(node.op, ())


class TorchGraph:
    """The graph as a torch forward; ``weights`` are its trainable parameters (by ONNX name)."""

    def __init__(self, graph: gs.Graph, torch: Any, train: bool = True, masks: bool = True,
                 codebooks: bool = True, learn_scales: bool = False, learn_masks: bool = False) -> None:
        self.torch = torch
        self.graph = graph
        folded = integer_constant_values(graph)  # e.g. a clustered weight's bit-packed indices, unpacked
        self.nodes = [n for n in topo_order(graph) if n.op != "Constant"
                      and not all(t.name in folded for t in n.outputs if t.name)]
        self.inputs = [t.name for t in graph.inputs]
        self.outputs = [t.name for t in graph.outputs]
        self.consts: dict[str, Any] = {}
        self.weights: dict[str, Weight] = {}
        self.unsupported: list[tuple[str, str]] = []
        slots: set[str] = set()
        axes: dict[str, int | None] = {}  # a weight's reduction axis at its first consumer (learned N:M masks)
        owner: dict[str, tuple[gs.Node, int]] = {}  # a weight's first consumer and slot
        for node in self.nodes:
            if node.op not in OPS and node.op not in MULTI_OUTPUT or (node.domain or "") not in ("", "ai.onnx"):
                self.unsupported.append((node.op, node.name))
            for i, t in enumerate(node.inputs):
                if not t.name or t.name in self.consts:
                    continue
                v = _const_value(t, folded)
                if v is None:
                    continue
                if train and t.name not in folded and is_weight_slot(node, i, v, folded):
                    slots.add(t.name)
                    axes[t.name] = reduction_axis(node.op, i, node.attrs, v.ndim)
                    owner.setdefault(t.name, (node, i))
                self.consts[t.name] = v
        for name in list(self.consts):
            v = self.consts[name]
            if name in slots:
                self.weights[name] = self._weight(name, v, masks, codebooks, owner.get(name))
                if learn_masks and masks and axes.get(name) is not None:
                    self._learn_mask(self.weights[name], v, axes[name])
                self._fold_mask(self.weights[name])
                del self.consts[name]
            else:
                self.consts[name] = torch.from_numpy(np.array(v))
        self.quant_stats: dict = {}
        if train and any(n.op == "DequantizeLinear" for n in self.nodes):
            self.quant_stats = attach(self, lambda n, i: i in WEIGHT_SLOTS.get(n.op, ()), learn_scales)
        # last use of every tensor: freed after its last consumer (bounded memory without autograd)
        self._last: dict[int, list[str]] = defaultdict(list)
        seen: dict[str, int] = {}
        for k, node in enumerate(self.nodes):
            for t in node.inputs:
                if t.name:
                    seen[t.name] = k
        for name, k in seen.items():
            self._last[k].append(name)

    def _weight(self, name: str, v: np.ndarray, masks: bool, codebooks: bool,
                owner: tuple[gs.Node, int] | None = None) -> Weight:
        torch = self.torch
        f = v.astype(np.float32)
        mask = None
        if masks and (f == 0).any():
            mask = torch.from_numpy((f != 0).astype(np.float32))
        if codebooks and f.size >= CODEBOOK_USE * 2:
            uniq, inv = np.unique(f, return_inverse=True)
            if len(uniq) <= CODEBOOK_MAX and f.size >= CODEBOOK_USE * len(uniq):
                p = torch.nn.Parameter(torch.from_numpy(uniq.astype(np.float32)))
                idx = torch.from_numpy(inv.reshape(f.shape).astype(np.int64))
                return Weight(name, v.dtype, v.shape, p, mask, idx)
            node, slot = owner if owner is not None else (None, -1)
            rows = snapped_rows(node, slot, weight_output_axis(node), CODEBOOK_MAX, min_size=CODEBOOK_USE * 2) \
                if node is not None and slot == 1 and node.op in ("Conv", "Gemm", "MatMul") else None
            if rows is not None:  # few values per output row (snapped with channel scales): each row's set trains
                p = torch.nn.Parameter(torch.from_numpy(rows.codebook().astype(np.float32)))
                return Weight(name, v.dtype, v.shape, p, mask, torch.from_numpy(rows.labels))
        return Weight(name, v.dtype, v.shape, torch.nn.Parameter(torch.from_numpy(f.copy())), mask)

    def _learn_mask(self, w: Weight, v: np.ndarray, axis: int | None) -> None:
        """Give a pruned weight a learned mask (its shadow is the plain parameter; codebook weights keep theirs)."""
        rule = rule_for(np.asarray(v, dtype=np.float32), axis) if w.index is None and w.mask is not None else None
        if rule is not None:
            w.rule = rule

    def _fold_mask(self, w: Weight) -> None:
        """A fixed mask of a plain weight: the parameter already holds 0 where the mask is 0, so the forward uses
        it as is and a gradient hook zeroes those entries' gradient instead (Adam then never moves them: zero
        moments, zero step). The same values as ``param * mask`` and the same gradient, one multiply fewer per
        forward (the masked MatMul weights of a 50%-sparse MiniLM-L6: 10.6M products a step)."""
        if w.mask is None or w.index is not None or w.rule is not None:
            return
        mask = w.mask
        w.param.register_hook(lambda g, m=mask: g * m)
        w.folded = True

    def refresh_masks(self) -> int:
        """Recompute every learned mask from its shadow; the number of entries that changed sides."""
        return sum(w.refresh_mask(self.torch) for w in self.weights.values() if getattr(w, "rule", None))

    @property
    def learned_masks(self) -> dict[str, str]:
        """Weight name -> the pattern its learned mask keeps (``2:4``, ``unstructured``)."""
        return {n: w.rule.describe() for n, w in self.weights.items() if getattr(w, "rule", None) is not None}

    def parameters(self, names: set[str] | None = None) -> list:
        return [w.param for n, w in self.weights.items()
                if w.param is not None and (names is None or n in names)]

    def value(self, name: str, env: dict) -> Any:
        if name in env:
            return env[name]
        if name in self.weights:
            return self.weights[name].value()
        if name in self.consts:
            return self.consts[name]
        raise KeyError(name)

    def run_nodes(self, nodes: list[gs.Node], env: dict, want: set[str] | None = None) -> dict:
        """Evaluate ``nodes`` (in order) on ``env`` (name -> tensor, updated in place); frees a tensor after its
        last consumer unless it is in ``want``. Stops early once every wanted tensor is known."""
        want = set(want or ())
        index = {id(n): k for k, n in enumerate(self.nodes)}
        for node in nodes:
            if want and want.issubset(env):
                break
            fn = OPS.get(node.op)
            if (fn is None and node.op not in MULTI_OUTPUT) or (node.domain or "") not in ("", "ai.onnx"):
                raise Unsupported(node.op, node.name)
            args = [self.value(t.name, env) if t.name else None for t in node.inputs]
            while args and args[-1] is None:
                args.pop()
            try:
                out = MULTI_OUTPUT[node.op](self.torch, args, node.attrs, len(node.outputs)) if fn is None \
                    else fn(self.torch, args, node.attrs)
            except NotImplementedError as exc:
                raise Unsupported(node.op, node.name, str(exc)) from exc
            except Exception as exc:
                raise RuntimeError(f"{node.op} node {node.name!r} failed in the training interpreter: "
                                   f"{exc}") from exc
            for t, v in zip(node.outputs, out, strict=False):
                if t.name:
                    env[t.name] = v
            for name in self._last.get(index.get(id(node), -1), ()):
                if name not in want and name in env and name not in self.outputs:
                    del env[name]
        return env

    def forward(self, feed: dict[str, Any], want: list[str] | None = None) -> dict[str, Any]:
        """Graph outputs (and ``want``) for one feed (name -> torch tensor or numpy array)."""
        torch = self.torch
        env = {k: (torch.from_numpy(np.asarray(v)) if isinstance(v, np.ndarray) else v) for k, v in feed.items()
               if k in self.inputs}
        names = list(dict.fromkeys(self.outputs + list(want or [])))
        self.run_nodes(self.nodes, env, set(names))
        missing = [n for n in names if n not in env]
        if missing:
            raise KeyError(f"tensors not computed: {missing[:4]}")
        return {n: env[n] for n in names}

    def write_back(self, names: set[str] | None = None) -> int:
        """Write the trained values into the graph's constants (new arrays; a Constant node gets a new value
        attribute). Returns how many tensors were written."""
        by_name: dict[str, list] = defaultdict(list)
        for node in self.graph.nodes:
            if node.op == "Constant" and node.outputs:
                by_name[node.outputs[0].name].append(node)
            for t in node.inputs:
                if isinstance(t, gs.Constant):
                    by_name[t.name].append(t)
        written = 0
        for name, w in self.weights.items():
            if names is not None and name not in names:
                continue
            new = w.numpy()
            for target in {id(x): x for x in by_name.get(name, [])}.values():
                if isinstance(target, gs.Constant):
                    target.values = new
                else:
                    target.attrs["value"] = gs.Constant(name, new)
            written += 1
        return written
