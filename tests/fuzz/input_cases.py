"""Fuzz cases on what comes with the model: calibration/validation data, pipelines and recipes."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tests.fuzz.base import CALIB_SAMPLES, DIGITS, DIGITS_CALIB, Case, Setup, write_digits_calib


# ------------------------------------------------------------------------------------------------ data cases
def data_case(case_id: str, write: Callable[[Path], Path], must_fail: bool = True) -> Case:
    def build(folder: Path) -> Setup:
        model = folder / "model.onnx"
        model.write_bytes(DIGITS.read_bytes())
        return Setup(model, calib=write_digits_calib(folder), bad_data=write(folder))

    return Case(f"data-{case_id}", "data", build, must_fail=must_fail)


def data_cases() -> list[Case]:
    with np.load(DIGITS_CALIB) as z:
        good = z["image"][:CALIB_SAMPLES]

    def npz(name: str, **arrays) -> Callable[[Path], Path]:
        def write(folder: Path) -> Path:
            p = folder / name
            np.savez(p, **arrays)
            return p

        return write

    def raw(name: str, data: bytes) -> Callable[[Path], Path]:
        def write(folder: Path) -> Path:
            p = folder / name
            p.write_bytes(data)
            return p

        return write

    def pickled(folder: Path) -> Path:
        p = folder / "pickled.npz"
        obj = np.empty(CALIB_SAMPLES, dtype=object)
        for i in range(CALIB_SAMPLES):
            obj[i] = good[i]
        np.savez(p, image=obj)
        return p

    def pickled_npy(folder: Path) -> Path:
        p = folder / "pickled.npy"
        obj = np.empty(2, dtype=object)
        obj[0], obj[1] = good[0], {"evil": 1}
        np.save(p, obj, allow_pickle=True)
        return p

    def empty_folder(folder: Path) -> Path:
        d = folder / "feeds"
        d.mkdir()
        return d

    def folder_of(items: dict[str, dict[str, np.ndarray] | np.ndarray | bytes]) -> Callable[[Path], Path]:
        def write(folder: Path) -> Path:
            d = folder / "feeds"
            d.mkdir()
            for fname, item in items.items():
                if isinstance(item, bytes):
                    (d / fname).write_bytes(item)
                elif isinstance(item, dict):
                    np.savez(d / fname, **item)
                else:
                    np.save(d / fname, item)
            return d

        return write

    def pickled_in_folder(folder: Path) -> Path:
        d = folder / "feeds"
        d.mkdir()
        obj = np.empty(1, dtype=object)
        obj[0] = good[0]
        np.savez(d / "a.npz", image=obj)
        return d

    nan = good.copy()
    nan[0, 0, 3, 3] = np.nan
    pinf = good.copy()
    pinf[1, 0, 0, 0] = np.inf
    ninf = good.copy()
    ninf[0, 0, 7, 7] = -np.inf  # in the first samples: a --max-val cap must not skip it
    zip_junk = b"PK\x03\x04" + b"\x00" * 60
    cases = [
        data_case("missing-input", npz("a.npz", pixels=good)),
        data_case("extra-input", npz("a.npz", image=good, extra=good), must_fail=False),
        # integer and bool pixels widen losslessly to float32 (accepted, like float64 -> float32)
        data_case("int-dtype", npz("a.npz", image=(good * 16).astype(np.int64)), must_fail=False),
        data_case("uint8-dtype", npz("a.npz", image=(good * 16).astype(np.uint8)), must_fail=False),
        data_case("bool-dtype", npz("a.npz", image=good > 0.5), must_fail=False),
        data_case("complex-dtype", npz("a.npz", image=good.astype(np.complex64))),
        data_case("string-dtype", npz("a.npz", image=np.array(["a"] * CALIB_SAMPLES)[:, None, None, None])),
        data_case("float64-dtype", npz("a.npz", image=good.astype(np.float64)), must_fail=False),
        data_case("float16-dtype", npz("a.npz", image=good.astype(np.float16)), must_fail=False),
        data_case("rank-3", npz("a.npz", image=good[:, 0])),
        data_case("rank-6", npz("a.npz", image=good[:, None, None])),
        data_case("rank-1", npz("a.npz", image=good.reshape(-1))),
        data_case("scalar", npz("a.npz", image=np.float32(1.0))),
        data_case("wrong-static-dim", npz("a.npz", image=np.zeros((CALIB_SAMPLES, 1, 8, 9), np.float32))),
        data_case("wrong-channels", npz("a.npz", image=np.zeros((CALIB_SAMPLES, 3, 8, 8), np.float32))),
        data_case("nan", npz("a.npz", image=nan)),
        data_case("pos-inf", npz("a.npz", image=pinf)),
        data_case("neg-inf", npz("a.npz", image=ninf)),
        data_case("all-nan", npz("a.npz", image=np.full_like(good, np.nan))),
        data_case("object-array-pickled", pickled),
        data_case("object-npy-pickled", pickled_npy),
        data_case("zero-samples", npz("a.npz", image=good[:0])),
        data_case("zero-batch-per-sample", npz("a.npz", image=np.zeros((3, 0, 1, 8, 8), np.float32))),
        data_case("huge-values", npz("a.npz", image=np.full_like(good, 3e38)), must_fail=False),
        data_case("empty-npz", npz("a.npz")),
        data_case("empty-file", raw("a.npz", b"")),
        data_case("not-a-zip", raw("a.npz", b"this is not numpy data")),
        data_case("corrupt-zip", raw("a.npz", zip_junk)),
        data_case("onnx-file-as-data", raw("a.npz", DIGITS.read_bytes()[:4096])),
        data_case("wrong-extension", raw("a.txt", b"1 2 3")),
        data_case("missing-path", lambda folder: folder / "does-not-exist.npz"),
        data_case("empty-folder", empty_folder),
        data_case("folder-bad-npz", folder_of({"a.npz": b"garbage"})),
        data_case("folder-npz-wrong-name", folder_of({"a.npz": {"pixels": good[:1]}})),
        data_case("folder-npz-nan", folder_of({"a.npz": {"image": nan[:1]}})),
        data_case("folder-npz-pickled", pickled_in_folder),
        data_case("folder-npy-wrong-rank", folder_of({"a.npy": good[0, 0]})),
        data_case("folder-npy-garbage", folder_of({"a.npy": b"\x93NUMPY garbage"})),
        data_case("folder-mixed-good-then-bad", folder_of({"a.npz": {"image": good[:1]},
                                                           "b.npz": {"image": good[:1, :, :4]}})),
    ]
    return cases


# -------------------------------------------------------------------------------------------- pipeline cases
def _wrong_values(tp: typing.Any) -> list[str]:
    """Pipeline option values that cannot fit the field type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        return ["not_a_choice"]
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if all(a in (int, float) for a in inner):
            return ["abc"]
        if all(a is bool for a in inner):
            return ["maybe"]
        return []
    if tp is bool:
        return ["maybe", "2"]
    if tp is int:
        return ["abc", "1.5", "[1,2]"]
    if tp is float:
        return ["abc", "true", "[0.1]"]
    if origin in (tuple, list) and args and args[0] in (int, float):
        return ["[a,b]"]
    return []


def pipeline_case(case_id: str, *, passes: str | None = None, recipe: str | None = None) -> Case:
    def build(folder: Path) -> Setup:
        model = folder / "model.onnx"
        model.write_bytes(DIGITS.read_bytes())
        rp = None
        if recipe is not None:
            rp = folder / "recipe.toml"
            rp.write_text(recipe)
        return Setup(model, calib=write_digits_calib(folder), passes=passes, recipe=rp)

    return Case(f"pipeline-{case_id}", "pipeline", build, must_fail=True)


def pipeline_cases(pass_classes: dict[str, type]) -> list[Case]:
    cases = [pipeline_case(cid, passes=text) for cid, text in [
        ("unknown-pass", "frobnicate"), ("unknown-after-known", "cleanup,frobnicate"), ("empty", ""),
        ("only-commas", ",,,"), ("unbalanced-open", "cleanup{"), ("unbalanced-close", "cleanup}"),
        ("unbalanced-nested", "quantize{mode=static"), ("extra-close", "cleanup{}}"),
        ("unbalanced-bracket", "quantize{mode=[static}"), ("unclosed-quote", 'quantize{mode="static}'),
        ("option-without-value", "cleanup{verbose}"), ("option-without-braces", "cleanup verbose=1"),
        ("nested-braces", "cleanup{a={b=1}}"), ("name-with-space", "clean up"), ("leading-digit", "1cleanup"),
        ("unicode-name", "clëanup"), ("null-byte", "cleanup\0"), ("very-long", "cleanup," * 5000 + "frobnicate"),
        ("deep-brackets", "cleanup{x=" + "[" * 500 + "]" * 500 + "}"), ("equals-only", "cleanup{=}")]]
    for name, cls in pass_classes.items():
        cases.append(pipeline_case(f"{name}-unknown-option", passes=f"{name}{{no_such_option_zz=1}}"))
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            for k, bad in enumerate(_wrong_values(hints.get(f.name))):
                cases.append(pipeline_case(f"{name}-{f.name}-wrong-type-{k}", passes=f"{name}{{{f.name}={bad}}}"))
    cases += [pipeline_case(cid, recipe=text) for cid, text in [
        ("recipe-invalid-toml", "passes = \"cleanup"), ("recipe-empty", ""), ("recipe-unknown-pass",
                                                                               'passes = "frobnicate"'),
        ("recipe-passes-not-string", "passes = 5"), ("recipe-table-without-name", "[[pass]]\nmode = 'static'\n"),
        ("recipe-table-unknown-pass", "[[pass]]\nname = 'frobnicate'\n"),
        ("recipe-table-wrong-type", "[[pass]]\nname = 'cleanup'\nno_such_option = {a = 1}\n"),
        ("recipe-pass-not-table", "pass = 3\n"), ("recipe-name-not-string", "[[pass]]\nname = 3\n"),
        ("recipe-binary", "\0\1\2\3"), ("recipe-unbalanced", 'passes = "cleanup{"')]]
    for name, cls in pass_classes.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init and _wrong_values(hints.get(f.name)):
                cases.append(pipeline_case(f"recipe-{name}-{f.name}-wrong-type",
                                           recipe=f"[[pass]]\nname = '{name}'\n{f.name} = {{ a = 1 }}\n"))
                break
    return cases


