"""``importance=obs``: channel ranking that accounts for the refit ``distill`` will do (structured Optimal Brain
Surgeon, as in Optimal Brain Compression / ThiNet's greedy selection).

For a consumer layer y = x W (Conv: x are im2col patches, W is [Cin*k, Cout]) with H = X^T X over calibration rows,
removing the input rows Q of one unit and refitting the remaining weights optimally raises the squared output error
by

    dE(Q) = tr(W_Q^T [(H^-1)_QQ]^-1 W_Q)

(one row: ||w_q||^2 / (H^-1)_qq; with H diagonal this is the ``recon`` score E[x_q^2] ||w_q||^2). Units are removed
greedily, the cheapest first, and after each removal the remaining weights and H^-1 are updated in closed form:

    W    <- W    - (H^-1)_:Q [(H^-1)_QQ]^-1 W_Q
    H^-1 <- H^-1 - (H^-1)_:Q [(H^-1)_QQ]^-1 (H^-1)_Q:

A unit's score is the accumulated error when it goes (so the order is the greedy order); a group with several
consumers sums their dE. Only consumers with at most ``max_dim`` input rows take part (H is dense); groups without one
keep the fallback score. H is streamed (X^T X per feed, a random subset of rows: im2col patches for a Conv,
``onnxcompress.analyses.conv_rows``) and damped by 1% of its mean diagonal.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx

from onnxcompress.analyses.activations import stream_activations
from onnxcompress.analyses.channel_groups import ChannelGroups, ConstSlice
from onnxcompress.analyses.conv_rows import conv_output_spatial, conv_rows
from onnxcompress.data import FeedSet

log = logging.getLogger(__name__)


@dataclass
class _Consumer:
    s: ConstSlice
    w: np.ndarray  # [d, out]
    rows_per_pos: int  # k for Conv (rows of one input channel), 1 otherwise
    h: np.ndarray | None = None
    n: int = 0


def _consumer(cg: ChannelGroups, s: ConstSlice, max_dim: int) -> _Consumer | None:
    node = s.node
    w = cg.value(node.inputs[s.index]).astype(np.float64)
    spec = s.specs[0]
    if spec.el.ndim != 1:
        return None
    if node.op == "Conv" and int(node.attrs.get("group", 1)) == 1 and spec.axis == 1:
        k = int(np.prod(w.shape[2:]))
        m, per = w.reshape(w.shape[0], -1).T, k
    elif node.op == "MatMul" and spec.axis == 0 and w.ndim == 2:
        m, per = w, 1
    elif node.op == "Gemm" and not node.attrs.get("transA", 0) and w.ndim == 2:
        m, per = (w.T if node.attrs.get("transB", 0) else w), 1
    else:
        return None
    if m.shape[0] > max_dim:
        return None
    return _Consumer(s, m, per)


def _features(c: _Consumer, x: np.ndarray, rows: int, rng: np.random.Generator) -> np.ndarray:
    node = c.s.node
    if node.op == "Conv":
        k = list(np.asarray(node.inputs[1].values).shape)
        out = conv_output_spatial(node, tuple(k), x.shape[2:])
        patches, _ = conv_rows(x, node, tuple(k), out, rows, rng)
        return patches.reshape(patches.shape[0], -1)
    if node.op == "Gemm":
        f = x
    else:
        f = x.reshape(-1, x.shape[-1])
    if f.shape[0] > rows:
        f = f[rng.choice(f.shape[0], rows, replace=False)]
    return f


def obs_scores(cg: ChannelGroups, model: onnx.ModelProto, feeds: FeedSet, groups: set[int], min_keep: float,
               rng: np.random.Generator, max_dim: int = 2304, rows_per_feed: int = 256,
               mem_bytes: float = 6e8, progress=None) -> tuple[np.ndarray, set[int]]:
    """Greedy OBS scores per unit for the candidate groups that have a dense consumer; returns (scores, groups
    scored)."""
    consumers: list[_Consumer] = []
    unusable: set[int] = set()  # groups with a consumer OBS cannot model: their scores would be incomplete
    for s in cg.slices:
        if s.role != "in":
            continue
        touched = set(np.unique(cg.unit_group[cg.unit_of[s.specs[0].el.reshape(-1)]]).tolist()) & groups
        if not touched:
            continue
        c = _consumer(cg, s, max_dim) if s.act else None
        if c is None:
            unusable |= touched
        else:
            consumers.append(c)
    scores = np.zeros(cg.n_units)
    if not consumers:
        return scores, set()
    # stream H = X^T X, in chunks that fit the memory budget
    chunks, cur, used = [], [], 0.0
    for c in consumers:
        b = 8.0 * c.w.shape[0] ** 2
        if cur and used + b > mem_bytes:
            chunks.append(cur)
            cur, used = [], 0.0
        cur.append(c)
        used += b
    chunks.append(cur)
    for chunk in chunks:
        names = sorted({c.s.act for c in chunk})
        for _, acts in stream_activations(model, names, feeds, progress=progress, desc="obs importance"):
            for c in chunk:
                f = _features(c, np.asarray(acts[c.s.act], dtype=np.float64), rows_per_feed, rng)
                if f.shape[1] != c.w.shape[0]:
                    continue
                c.h = f.T @ f if c.h is None else c.h + f.T @ f
                c.n += f.shape[0]
    by_group: dict[int, list[_Consumer]] = defaultdict(list)
    for c in consumers:
        if c.h is None:
            continue
        for g in set(np.unique(cg.unit_group[cg.unit_of[c.s.specs[0].el]]).tolist()) & groups:
            by_group[g].append(c)
    done = set()
    for g, cons in by_group.items():
        units = cg.groups[g].units
        if len(units) < 2 or g in unusable:
            continue
        scores[units] = _greedy(cg, units, cons, min_keep)
        done.add(g)
    return scores, done


def _greedy(cg: ChannelGroups, units: np.ndarray, cons: list[_Consumer], min_keep: float) -> np.ndarray:
    n = len(units)
    index = {int(u): i for i, u in enumerate(units.tolist())}
    state = []
    for c in cons:
        h = c.h / max(c.n, 1)
        d = h.shape[0]
        h = h + 0.01 * max(float(np.mean(np.diag(h))), 1e-12) * np.eye(d)
        try:
            hinv = np.linalg.inv(h)
        except np.linalg.LinAlgError:
            continue
        # rows of each unit in this consumer
        pos_units = cg.unit_of[c.s.specs[0].el]
        rows: list[list[int]] = [[] for _ in range(n)]
        for p, u in enumerate(pos_units.tolist()):
            i = index.get(u)
            if i is not None:
                rows[i].extend(range(p * c.rows_per_pos, (p + 1) * c.rows_per_pos))
        rows_arr = [np.asarray(r, dtype=np.int64) for r in rows]
        by_len: dict[int, list[int]] = defaultdict(list)
        for i, r in enumerate(rows_arr):
            if r.size:
                by_len[r.size].append(i)
        packed = {q: (np.asarray(idx), np.stack([rows_arr[i] for i in idx])) for q, idx in by_len.items()}
        state.append([hinv, c.w.copy(), rows_arr, packed])
    alive = np.ones(n, dtype=bool)
    score = np.zeros(n)
    total = 0.0
    steps = max(0, min(n - 1, int(np.floor((1.0 - min_keep) * n)) + 1))

    def costs() -> np.ndarray:
        de = np.zeros(n)
        for hinv, w, _, packed in state:
            for q, (idx_all, r_all) in packed.items():
                keep = alive[idx_all]
                idx, r = idx_all[keep], r_all[keep]
                if not idx.size:
                    continue
                if q == 1:
                    rr = r[:, 0]
                    de[idx] += np.einsum("ij,ij->i", w[rr], w[rr]) / np.maximum(hinv[rr, rr], 1e-300)
                else:
                    hq = hinv[r[:, :, None], r[:, None, :]]  # [m, q, q]
                    wq = w[r]  # [m, q, out]
                    sol = np.linalg.solve(hq + 1e-12 * np.eye(q), wq)
                    de[idx] += np.einsum("mqo,mqo->m", wq, sol)
        return de

    for _ in range(steps):
        de = costs()
        de[~alive] = np.inf
        i = int(np.argmin(de))
        total += float(de[i])
        score[i] = total
        alive[i] = False
        for st in state:
            hinv, w, rows, _ = st
            q = rows[i]
            if not q.size:
                continue
            a = hinv[:, q]
            b = np.linalg.inv(hinv[np.ix_(q, q)] + 1e-12 * np.eye(q.size))
            st[1] = w - a @ (b @ w[q])
            st[0] = hinv - a @ b @ a.T
    if alive.any():  # the ones never removed: after the last removed, in order of their current cost
        de = costs()
        rest = np.flatnonzero(alive)
        score[rest] = total + 1e-12 + de[rest] - min(0.0, float(de[rest].min()))
    return score
