"""Feed lists on disk for the benchmark subprocesses: one .npz holding feeds whose shapes may differ per feed.

Arrays are stored as ``{feed index}/{input index}`` plus ``__names__`` (the input names) and ``__count__``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.spec import Feed


def save_feeds(feeds: list[Feed], path: Path) -> Path:
    """Write a list of feeds (shapes may differ per feed) to one .npz: arrays ``{i}/{j}`` + the input names."""
    names = sorted({k for f in feeds for k in f})
    arrays = {f"{i}/{names.index(k)}": v for i, f in enumerate(feeds) for k, v in f.items()}
    np.savez(path, __names__=np.array(names), __count__=np.array(len(feeds)), **arrays)
    return path


def load_feeds(path: Path) -> list[Feed]:
    with np.load(path, allow_pickle=False) as z:
        names = [str(n) for n in z["__names__"]]
        count = int(z["__count__"])
        feeds: list[Feed] = [{} for _ in range(count)]
        for key in z.files:
            if key.startswith("__"):
                continue
            i, j = key.split("/")
            feeds[int(i)][names[int(j)]] = z[key]
    return feeds
