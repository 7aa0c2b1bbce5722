"""Made-up inputs when the user gave no data: random feeds the ORIGINAL model itself accepts, and what was guessed.

A symbolic input dim with no binding is a guess; so is every value of a random integer input. A guess the model
rejects (a reflect Pad longer than the signal, an STFT window wider than the input, a sample rate the graph does not
know) is not an internal error of ours: the candidates below are tried in order, each checked by running the first
feed through the original model under onnxruntime, and when none is accepted the run stops with a bad-input error
asking for real data, ``--shape`` or ``--dim``.

Candidates, from the model's own hints first:
- free (unbound, non-batch) dims: 32, then 128, 512, 2048 — for every input at once, then with the free dims of
  some inputs set to 1 instead (a recurrent state's unnamed batch axis must match the signal's batch of 1);
- integer inputs: random 0/1, then every scalar constant the graph compares the input with (an ``Equal`` / ``Less``
  / ``Greater`` node reading the input directly or through a ``Cast``: ``sr == 16000`` in a VAD says 16000 is valid).
Every guess is returned as a note for the report.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import onnx

from onnxcompress import io
from onnxcompress.data import FeedSet, model_inputs, random_feeds
from onnxcompress.errors import BadInputError
from onnxcompress.runtime import Session

log = logging.getLogger(__name__)

FREE_DIM_CANDIDATES = (32, 128, 512, 2048)
_COMPARISONS = {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"}


def compared_constants(model: onnx.ModelProto, name: str) -> list[int]:
    """Scalar constants the graph (any subgraph) compares input ``name`` with, in order of appearance."""
    consts: dict[str, np.ndarray] = {t.name: onnx.numpy_helper.to_array(t) for g in io.iter_graphs(model.graph)
                                     for t in g.initializer if not t.dims or int(np.prod(t.dims)) == 1}
    aliases = {name}
    values: list[int] = []
    for g in io.iter_graphs(model.graph):
        for node in g.node:
            if node.op_type == "Constant":
                v = io.constant_node_value(node)
                if v is not None and v.size == 1:
                    consts[node.output[0]] = v
            elif node.op_type == "Cast" and node.input and node.input[0] in aliases:
                aliases.add(node.output[0])
    for g in io.iter_graphs(model.graph):
        for node in g.node:
            if node.op_type in _COMPARISONS and any(i in aliases for i in node.input):
                for i in node.input:
                    if i in consts:
                        v = float(np.asarray(consts[i]).reshape(-1)[0])
                        if v.is_integer() and int(v) not in values:
                            values.append(int(v))
    return values


def accepted_random_feeds(model: onnx.ModelProto, dims: dict[str, int] | None, shapes: dict | None, n: int,
                          seed: int) -> tuple[FeedSet, list[str]]:
    """Random feeds the original model runs on, and the notes saying what was guessed."""
    inputs = model_inputs(model)
    ints = [s for s in inputs if not np.issubdtype(s.dtype, np.floating) and s.dtype != np.bool_]
    int_options: list[dict[str, int]] = [{}]
    for spec in ints:
        for v in compared_constants(model, spec.name):
            int_options.append({spec.name: v})
    free_inputs = [s.name for s in inputs if any(not isinstance(d, int) for d in s.shape[1:])]
    masks = [m for m in itertools.product((True, False), repeat=min(len(free_inputs), 4)) if any(m)]
    errors: list[str] = []
    with Session(model, optimize=False, what="input model") as sess:
        for free, mask in itertools.product(FREE_DIM_CANDIDATES, masks or [()]):
            free_dim = {name: (free if big else 1) for name, big in zip(free_inputs, mask, strict=False)}
            for pinned in int_options:
                guesses: list[str] = []
                feeds = random_feeds(model, dims, n=n, seed=seed, shapes=shapes, free_dim=free_dim,
                                     int_values=pinned, guesses=guesses, quiet=True)
                try:
                    sess.run(feeds.first(), quiet=True)
                except Exception as exc:  # the model rejects this made-up input: try the next candidate
                    errors.append(io.first_line(exc))
                    continue
                notes = ["no data given: fidelity measured on RANDOM inputs; it says little about real inputs"]
                if guesses:
                    notes.append("made-up input shape (symbolic dims guessed): " + "; ".join(guesses)
                                 + " — give --shape/--dim or real data to measure at a real size")
                if pinned:
                    notes.append("integer inputs pinned to values the graph compares them with: "
                                 + ", ".join(f"{k}={v}" for k, v in pinned.items()))
                return feeds, notes
    raise BadInputError("the model rejects every made-up input tried (random values, free dims "
                        f"{'/'.join(map(str, FREE_DIM_CANDIDATES))}): it needs real data (--val/--calib) or "
                        f"--shape/--dim; onnxruntime said: {errors[0] if errors else '?'}")



