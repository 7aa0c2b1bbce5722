"""The teacher-target cache of distill{mode=train}: content-keyed, bounded, never serving another feed's targets."""

import numpy as np
from onnxcompress.passes.distill.teacher_cache import TeacherCache, feed_key


def _teacher():
    calls = []

    def run(feed):
        calls.append(1)
        return {"y": feed["x"].astype(np.float32).sum(axis=1, keepdims=True) * 2.0}

    return run, calls


def test_equal_content_hits_and_other_content_misses():
    run, calls = _teacher()
    cache = TeacherCache(run)
    a = {"x": np.arange(12, dtype=np.int64).reshape(3, 4)}
    first = cache(a)
    again = cache({"x": a["x"].copy()})  # a new object with the same bytes
    assert len(calls) == 1 and again is first
    b = {"x": a["x"].copy()}
    b["x"][0, 0] += 1
    out = cache(b)
    assert len(calls) == 2
    np.testing.assert_array_equal(out["y"], run(b)["y"])
    assert cache.stats() == {"hits": 1, "misses": 2, "kept": 2}


def test_key_separates_shape_dtype_and_name():
    x = np.zeros((2, 3), np.int64)
    keys = {feed_key({"x": x}), feed_key({"x": x.reshape(3, 2)}), feed_key({"x": x.astype(np.int32)}),
            feed_key({"ids": x})}
    assert len(keys) == 4


def test_budget_bounds_what_is_kept():
    run, calls = _teacher()
    cache = TeacherCache(run, max_bytes=3 * 4 * 2)  # room for two [3, 1] float32 targets
    feeds = [{"x": np.full((3, 4), i, np.int64)} for i in range(4)]
    for f in feeds + feeds:
        cache(f)
    assert cache.stats()["kept"] == 2
    assert len(calls) == 2 + 2 + 2  # the two kept feeds hit the second time, the other two run again
