"""Product quantization of an embedding table: rows share d-vectors, not single values (``cluster{embedding_vector=d}``).

A Gather table E [V, D] (V tokens of D features) is cut into S = D / d column blocks; block s of every row is one
point x_vs in R^d. Each block has its own codebook of k d-vectors C_s [k, d] and every row stores one index per block:

    E_v ≈ [C_1[i_v1], C_2[i_v2], ..., C_S[i_vS]]

so a weight costs log2(k) / d bits plus the codebooks' k·D floats (the whole table shares them): k = 256, d = 8 is
1 bit per weight + 32·256·D bits. Scalar clustering gives every weight its own index; here one index names d weights
at once, and the d-vectors follow the joint distribution of the block (correlated features share an index).

**Weighted k-means per block** (Lloyd, all S blocks at once): minimise sum_v w_v ||x_vs - C_s[i_vs]||^2 with row
weights w_v; assignment by the nearest centroid (||c||^2 - 2 x·c, batched matmuls in chunks of rows), update by the
weighted mean of each cluster (``bincount`` over the flat labels s·k + i); an empty cluster takes the block's point
with the largest weighted error; stops when the objective improves by < ``TOL`` (relative) or after ``ITERS``.
A table of more than ``SAMPLE_ROWS`` rows is fitted on that many rows drawn with probability ∝ w_v (each drawn row
weighted by how often it was drawn: the same objective in expectation), then one Lloyd step on all rows.
Init: weighted k-means++ per block (the next code drawn with probability ∝ w_v · D_v^2, D_v the distance to the
nearest code so far), vectorised over the blocks: random rows as codes leave clusters of rows unserved.

**Row weights** (``activation_aware``): the table's input is one-hot in the token: the Gram matrix of that input is
diagonal with the token counts n_v on calibration data, so the error of row v costs n_v (the same ||x_j||^2 weighting as
every other activation-aware weight); every row also gets a floor of ``FLOOR`` times the mean count, so tokens the
calibration never saw still get a fitting code.

**Storage**: indices [V, S] packed to log2(k) bits (``storage.pack_bits``), decoded in the graph as
``idx + s·k -> Gather(codebook [S·k, d]) -> Reshape [V, D]``; ``unpacked``: int32 indices with the offsets added
(what ``distill{mode=train}`` trains: the codebook is the parameter), packed exactly by a later ``cluster``.

**Hot rows** (with token counts): the rows whose weighted error is worth more than the table's next level per byte get
a scalar-coded residual on top (``hot_rows``).
**Base refit** (when stages were taken): the base was fitted for weights w_v, but a row a stage refines keeps only
the stage's residual error, e_v^final = γ_v e_v^base (γ_v <= 1 measured per row). What the base's error costs after
the stages is therefore sum_v w_v γ_v ||x_v - base_v||^2: the frequent rows, fixed by their residuals anyway, stop
pulling the codes, and the codes serve the rows no stage reaches (rare and unseen tokens). The base is fitted again
with weights w_v γ_v, then the stages again on it (the per-byte rule decides them afresh). MiniLM-L6's word table
(550 + 4,000 calibration sentences, the rest of the model float, 550 evaluation sentences): cosine 0.9938 -> 0.9951
for 0.8% more table bytes (a second round: 0.9948; flattening the weights to sqrt(w_v) instead: 0.9945).
"""

from __future__ import annotations

import math

import numpy as np

from .cluster_tensor import Clustered
from .hot_rows import hot_stages
from .storage import STREAMS, decode_overhead, index_bits

ITERS = 20
#: tables with more rows are fitted on this many rows drawn ∝ their weights, then one Lloyd step on every row
SAMPLE_ROWS = 8192
TOL = 1e-4
FLOOR = 0.1
#: elements of one chunk of the batched distance matrix [S, rows, k]
CHUNK_ELEMENTS = 1 << 24
#: serialized bytes of the decode's Add + offsets + 2-D Gather besides the index streams (measured like storage's)
OVERHEAD_VECTOR = 200


def row_weights(counts: np.ndarray | None, rows: int) -> np.ndarray:
    """w_v = n_v + FLOOR · mean(n) (uniform without counts)."""
    if counts is None or not np.any(counts > 0):
        return np.ones(rows)
    c = np.asarray(counts, np.float64)[:rows]
    return c + FLOOR * max(float(c.mean()), 1e-12)


def _assign(x: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid per point: x [S, n, d], c [S, k, d] -> labels [S, n], squared distances [S, n]."""
    s, n, _ = x.shape
    k = c.shape[1]
    cc = np.einsum("skd,skd->sk", c, c)
    step = max(1, CHUNK_ELEMENTS // max(s * k, 1))
    lab = np.empty((s, n), np.int64)
    dist = np.empty((s, n), x.dtype)
    xx = np.einsum("snd,snd->sn", x, x)
    for a in range(0, n, step):
        d2 = cc[:, None, :] - 2.0 * np.matmul(x[:, a:a + step], c.transpose(0, 2, 1))
        lab[:, a:a + step] = np.argmin(d2, axis=2)
        dist[:, a:a + step] = np.take_along_axis(d2, lab[:, a:a + step, None], 2)[..., 0] + xx[:, a:a + step]
    return lab, np.maximum(dist, 0)


def _init_plus_plus(x: np.ndarray, k: int, w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Weighted k-means++ codes [S, k, d] for the points x [S, V, d], every block at once."""
    s, n, d = x.shape
    blocks = np.arange(s)
    c = np.empty((s, k, d), x.dtype)
    c[:, 0] = x[blocks, rng.choice(n, size=s, p=w / w.sum())]
    best = np.einsum("snd,snd->sn", x - c[:, :1], x - c[:, :1])
    for j in range(1, k):
        cum = np.cumsum(best * w[None, :], axis=1)
        r = rng.random(s) * cum[:, -1]
        pick = np.minimum(np.sum(cum <= r[:, None], axis=1), n - 1)
        pick = np.where(cum[:, -1] > 0, pick, rng.integers(0, n, s))  # every point already a code: any
        c[:, j] = x[blocks, pick]
        diff = x - c[:, j:j + 1]
        best = np.minimum(best, np.einsum("snd,snd->sn", diff, diff))
    return c


def product_kmeans(table: np.ndarray, d: int, k: int, weights: np.ndarray,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Codebooks [S, k, d] and labels [V, S] of the table [V, D] (D divisible by d, V >= k)."""
    v, dim = table.shape
    s = dim // d
    x = np.ascontiguousarray(table.astype(np.float32).reshape(v, s, d).transpose(1, 0, 2))  # [S, V, d]
    w = np.asarray(weights, np.float64)
    fit_rows, fit_w = np.arange(v), w
    if v > SAMPLE_ROWS:  # fit on SAMPLE_ROWS draws ∝ w (multiplicities as weights: unbiased), then all rows
        drawn = np.bincount(rng.choice(v, size=SAMPLE_ROWS, p=w / w.sum()), minlength=v)
        fit_rows = np.flatnonzero(drawn)
        fit_w = drawn[fit_rows].astype(np.float64)
    c = _init_plus_plus(x[:, fit_rows], k, fit_w, rng)
    c = _lloyd(x[:, fit_rows], c, fit_w, ITERS)
    if fit_rows.size < v:
        c = _lloyd(x, c, w, 1)
    lab, _ = _assign(x, c)
    return c, np.ascontiguousarray(lab.T)


def _lloyd(x: np.ndarray, c: np.ndarray, w: np.ndarray, iters: int) -> np.ndarray:
    """``iters`` weighted Lloyd steps (fewer once the objective stops improving by TOL) from codes c [S, k, d]."""
    s, _, d = x.shape
    k = c.shape[1]
    flat_w = np.tile(w, s)
    offsets = (np.arange(s) * k)[:, None]
    prev = math.inf
    for _ in range(iters):
        lab, dist = _assign(x, c)
        obj = float(np.sum(dist * w[None, :]))
        flat = (lab + offsets).ravel()
        wsum = np.bincount(flat, weights=flat_w, minlength=s * k)
        sums = np.stack([np.bincount(flat, weights=(x[..., j] * w[None, :]).ravel(), minlength=s * k)
                         for j in range(d)], axis=1)
        full = wsum > 0
        new = np.where(full[:, None], sums / np.maximum(wsum, 1e-300)[:, None], c.reshape(s * k, d))
        empty = np.flatnonzero(~full)
        if empty.size:  # the block's worst-fit points take the empty clusters
            for blk in np.unique(empty // k):
                gone = empty[empty // k == blk]
                worst = np.argsort(dist[blk] * w)[::-1][:gone.size]
                new[gone] = x[blk, worst]
        c = new.reshape(s, k, d).astype(np.float32)
        if prev - obj <= TOL * max(obj, 1e-30):
            break
        prev = obj
    return c


def decode(codebooks: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The table [V, S·d] from codebooks [S, k, d] and labels [V, S] (what the graph's decode computes)."""
    s, k, d = codebooks.shape
    flat = codebooks.reshape(s * k, d)
    return flat[labels + (np.arange(s) * k)[None, :]].reshape(labels.shape[0], s * d)


def plan_bytes(rows: int, blocks: int, k: int, d: int, itemsize: int) -> int:
    """Bytes on disk: indices packed to log2(k) bits, codebooks, the decode nodes."""
    bits = index_bits(k)
    data = sum(math.ceil(rows * blocks * w / 8) for w in STREAMS[bits])
    return data + blocks * k * d * itemsize + decode_overhead(bits, False, False) + OVERHEAD_VECTOR


def vector_blocks(shape: tuple[int, ...], d: int, k: int, itemsize: int = 4) -> str | None:
    """Why a table of ``shape`` should not take d-vectors with k codes (None: it can). The codebooks (k·D values)
    must weigh no more than the codes (V·D/d indices of log2(k) bits): V >= 8·k·d·itemsize / log2(k) rows (8192 for
    k = 256, d = 8, float32); a smaller table (e.g. 512 positions) keeps scalar codes."""
    if len(shape) != 2:
        return "not a 2-D table"
    if shape[1] % d:
        return f"row length {shape[1]} not divisible by embedding_vector={d}"
    rows = math.ceil(8 * k * d * itemsize / max(math.log2(k), 1))
    if shape[0] < rows:
        return f"{shape[0]} rows: codebooks would outweigh the codes below {rows}"
    return None


def cluster_table(w: np.ndarray, d: int, k: int, counts: np.ndarray | None, storage: str,
                  rng: np.random.Generator, refit_base: bool = True) -> Clustered:
    """The table ``w`` [V, D] product-quantized: codebook [S·k, d], labels [V, S] (``Clustered.vector`` = d); with
    counts, hot-row stages on top and (``refit_base``) the base fitted again for what the stages leave."""
    weights = row_weights(counts, w.shape[0])
    books, labels = product_kmeans(w, d, k, weights, rng)
    s = books.shape[0]
    base = snapped = decode(books, labels).astype(w.dtype)
    plans = {"snap": int(w.nbytes), "vector-codebook": plan_bytes(w.shape[0], s, k, d, w.dtype.itemsize)}
    hot: tuple = ()
    if counts is not None:
        hot, snapped = hot_stages(w, base, weights, rng)
        if hot and refit_base:  # the base fitted for what the stages leave of each row's error
            base_err = np.sum((w.astype(np.float64) - base) ** 2, axis=1)
            kept = np.sum((w.astype(np.float64) - snapped) ** 2, axis=1)
            gamma = np.clip(kept / np.maximum(base_err, np.finfo(np.float64).tiny), 0.0, 1.0)
            books, labels = product_kmeans(w, d, k, weights * gamma, rng)
            hot, snapped = hot_stages(w, decode(books, labels).astype(w.dtype), weights, rng)
        plans["vector-codebook"] += sum(stage.planned_bytes() for stage in hot)
    out = Clustered(codebook=books.reshape(s * k, d).astype(w.dtype), labels=labels.astype(np.uint16), axis=None,
                    zero_label=None, snapped=snapped, bytes_raw=int(w.nbytes), weighted=counts is not None,
                    vector=d, hot=hot or None)
    out.bytes_planned = plans
    out.storage = "snap" if storage == "snap" else "vector-codebook"
    return out


def vector_codes(book: np.ndarray, idx: np.ndarray) -> int:
    """k when ``Gather(book, idx)`` is an unpacked product-quantized table (book [S·k, d] float, idx [V, S] with
    column s in [s·k, (s+1)·k), k <= 256), else 0."""
    if book.ndim != 2 or idx.ndim != 2 or not np.issubdtype(book.dtype, np.floating) or \
            not np.issubdtype(idx.dtype, np.integer) or book.shape[0] % idx.shape[1]:
        return 0
    k = book.shape[0] // idx.shape[1]
    local = idx.astype(np.int64) - (np.arange(idx.shape[1]) * k)[None, :]
    return k if 2 <= k <= 256 and local.min() >= 0 and local.max() < k else 0


def token_counts(graph, ctx, tables: dict[str, tuple[object, int]], request,
                 skip: int = 0) -> dict[str, np.ndarray]:
    """How often each row of each table is read on the calibration feeds after the first ``skip`` (held out):
    ``tables`` maps a key to (the Gather's index tensor, rows V). A constant index is counted directly; a graph
    input on EVERY calibration feed (reading ids costs no model run, and each sentence more names rows that new text
    will read: on MiniLM-L6 the sentences with the most rows the counts never saw lose twice the cosine); any other
    tensor during the caller's run of ``request`` (its first ``samples`` feeds; fetched, counted by its
    ``capture``): the counts are complete once the caller has run it. Negative indices count as i + V."""
    import onnx_graphsurgeon as gs

    counts = {key: np.zeros(v, np.float64) for key, (_, v) in tables.items()}

    def add(key: str, idx: np.ndarray) -> None:
        v = counts[key].size
        i = np.asarray(idx, np.int64).ravel()
        i = np.where(i < 0, i + v, i)
        counts[key] += np.bincount(i[(i >= 0) & (i < v)], minlength=v)[:v]

    inputs = {t.name for t in graph.inputs}
    fetched: dict[str, list[str]] = {}
    for key, (t, _) in tables.items():
        if isinstance(t, gs.Constant):
            add(key, t.values)
        elif t.name in inputs:
            for i, feed in enumerate(ctx.calibration):
                if i >= skip and t.name in feed:
                    add(key, feed[t.name])
        else:
            fetched.setdefault(t.name, []).append(key)
    if fetched:
        if request.capture is not None:
            raise ValueError("token_counts: the request already has a capture")

        def capture(i: int, acts: dict[str, np.ndarray]) -> None:
            if i < skip:
                return
            for name, keys in fetched.items():
                for key in keys:
                    add(key, acts[name])

        request.fetch.extend(fetched)
        request.capture = capture
    return counts
