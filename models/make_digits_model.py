"""Train the bundled digits CNN and write it, with its data splits, to models/.

Regenerate (from the repository root; needs numpy, scikit-learn, onnx, onnxruntime):

    python models/make_digits_model.py

Everything is plain numpy (forward, hand-written backward, Adam), seeded and single-threaded, so a
rerun on the same machine reproduces the artefacts byte for byte. The ONNX graph is assembled with
``onnx.helper`` from the trained weights, and the script checks that onnxruntime reproduces the numpy
inference forward pass (max abs diff < 1e-4) before writing anything.

Graph (opset 17, IR 8), kept deliberately "unoptimised" so every onnxcompress pass has real work:

    image[N,1,8,8] -> Conv(1->16,3x3,p1) -> BatchNormalization -> Relu
                   -> Conv(16->32,3x3,p1) -> BatchNormalization -> Relu -> MaxPool(2x2)  = p
                   -> Conv(32->32,3x3,p1) -> BatchNormalization -> Relu -> Add(., p)     (identity residual)
                   -> Flatten -> Gemm(512->64) -> Relu -> Dropout(0.1, inference) -> Gemm(64->10) -> logits[N,10]
"""

from __future__ import annotations

import os

# Single-threaded BLAS before numpy is imported: matmul summation order then does not depend on the
# number of threads, which keeps the training run reproducible.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import sklearn  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

SEED = 20240611
N_VAL = 397
N_CALIB = 200
EPOCHS = 30
BATCH = 32
LR = 2e-3
WEIGHT_DECAY = 1e-4
BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # running = (1 - m) * running + m * batch  (ONNX attribute momentum = 1 - m)
DROPOUT = 0.1
OPSET = 17
IR_VERSION = 8

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------- data
def load_splits(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Stratified, seeded, disjoint train/calib/val splits; images scaled /16 to [0, 1], shape [n,1,8,8]."""
    digits = load_digits()
    x = (digits.images.astype(np.float32) / np.float32(16.0))[:, None, :, :]
    y = digits.target.astype(np.int64)
    idx = np.arange(len(y))
    rest, val = train_test_split(idx, test_size=N_VAL, stratify=y, random_state=seed)
    train, calib = train_test_split(rest, test_size=N_CALIB, stratify=y[rest], random_state=seed + 1)
    # Sorted indices: the stored arrays follow the original dataset order (stable, easy to audit).
    out = {}
    for name, part in (("train", train), ("calib", calib), ("val", val)):
        part = np.sort(part)
        out[name] = (np.ascontiguousarray(x[part]), y[part])
    return out


# ------------------------------------------------------------------------------------- numpy layers
def im2col(x: np.ndarray) -> np.ndarray:
    """[N,C,H,W] -> [N*H*W, C*9] patches of a 3x3 / pad 1 / stride 1 convolution (C-major, then kh, kw)."""
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    cols = np.stack([xp[:, :, i : i + h, j : j + w] for i in range(3) for j in range(3)], axis=2)
    return cols.transpose(0, 3, 4, 1, 2).reshape(n * h * w, c * 9)


def col2im(dcols: np.ndarray, shape: tuple[int, int, int, int]) -> np.ndarray:
    n, c, h, w = shape
    d = dcols.reshape(n, h, w, c, 9).transpose(0, 3, 4, 1, 2)
    dxp = np.zeros((n, c, h + 2, w + 2), dtype=dcols.dtype)
    for k in range(9):
        i, j = divmod(k, 3)
        dxp[:, :, i : i + h, j : j + w] += d[:, :, k]
    return dxp[:, :, 1:-1, 1:-1]


def conv_fwd(x, w, b):
    n, _, h, wd = x.shape
    cols = im2col(x)
    out = cols @ w.reshape(w.shape[0], -1).T + b
    return out.reshape(n, h, wd, -1).transpose(0, 3, 1, 2), cols


def conv_bwd(dout, cols, w, x_shape, need_dx=True):
    f = w.shape[0]
    dmat = dout.transpose(0, 2, 3, 1).reshape(-1, f)
    dw = (dmat.T @ cols).reshape(w.shape)
    db = dmat.sum(0)
    dx = col2im(dmat @ w.reshape(f, -1), x_shape) if need_dx else None
    return dx, dw, db


def bn_train_fwd(x, gamma, beta):
    mean = x.mean(axis=(0, 2, 3))
    var = x.var(axis=(0, 2, 3))
    inv = 1.0 / np.sqrt(var + BN_EPS)
    xhat = (x - mean[None, :, None, None]) * inv[None, :, None, None]
    y = gamma[None, :, None, None] * xhat + beta[None, :, None, None]
    return y, (xhat, inv, mean, var)


def bn_bwd(dy, cache, gamma):
    xhat, inv, _, _ = cache
    m = dy.shape[0] * dy.shape[2] * dy.shape[3]
    dgamma = (dy * xhat).sum(axis=(0, 2, 3))
    dbeta = dy.sum(axis=(0, 2, 3))
    dxhat = dy * gamma[None, :, None, None]
    dx = (
        inv[None, :, None, None]
        / m
        * (
            m * dxhat
            - dxhat.sum(axis=(0, 2, 3))[None, :, None, None]
            - xhat * (dxhat * xhat).sum(axis=(0, 2, 3))[None, :, None, None]
        )
    )
    return dx, dgamma, dbeta


def bn_eval(x, gamma, beta, mean, var):
    s = (gamma / np.sqrt(var + BN_EPS)).astype(x.dtype)
    return x * s[None, :, None, None] + (beta - mean * s)[None, :, None, None]


def maxpool_fwd(x):
    n, c, h, w = x.shape
    r = x.reshape(n, c, h // 2, 2, w // 2, 2)
    out = r.max(axis=(3, 5))
    return out


def maxpool_bwd(dout, x, out):
    n, c, h, w = x.shape
    r = x.reshape(n, c, h // 2, 2, w // 2, 2)
    mask = r == out[:, :, :, None, :, None]
    # route each window's gradient to exactly one (the first) maximum
    flat = mask.transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
    first = np.zeros_like(flat)
    np.put_along_axis(first, flat.argmax(-1)[..., None], True, axis=-1)
    first = first.reshape(n, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5)
    return (first * dout[:, :, :, None, :, None]).reshape(n, c, h, w)


# ---------------------------------------------------------------------------------------------- model
CONVS = (("conv1", 1, 16, "bn1"), ("conv2", 16, 32, "bn2"), ("conv3", 32, 32, "bn3"))


def init_params(rng: np.random.Generator) -> tuple[dict, dict]:
    p: dict[str, np.ndarray] = {}
    for name, cin, cout, bn in CONVS:
        fan_in = cin * 9
        p[f"{name}.weight"] = rng.normal(0, np.sqrt(2.0 / fan_in), (cout, cin, 3, 3))
        # Conv bias kept (as exporters usually do) although BN makes it redundant: fold passes must handle it.
        p[f"{name}.bias"] = rng.uniform(-1, 1, cout) / np.sqrt(fan_in)
        p[f"{bn}.weight"] = np.ones(cout)
        p[f"{bn}.bias"] = np.zeros(cout)
    p["fc1.weight"] = rng.normal(0, np.sqrt(2.0 / 512), (64, 512))
    p["fc1.bias"] = np.zeros(64)
    p["fc2.weight"] = rng.normal(0, np.sqrt(1.0 / 64), (10, 64))
    p["fc2.bias"] = np.zeros(10)
    p = {k: v.astype(np.float32) for k, v in p.items()}
    stats = {}
    for _, _, cout, bn in CONVS:
        stats[f"{bn}.running_mean"] = np.zeros(cout, np.float32)
        stats[f"{bn}.running_var"] = np.ones(cout, np.float32)
    return p, stats


def forward_train(p, stats, x, rng):
    """Training forward (batch-stat BN, active dropout); returns logits, caches, and updates running stats."""
    c = {}
    h = x
    for name, _, _, bn in CONVS:
        if name == "conv3":
            c["pool_in"] = h
            h = maxpool_fwd(h)
            c["pool_out"] = h
        c[f"{name}.in_shape"] = h.shape
        z, c[f"{name}.cols"] = conv_fwd(h, p[f"{name}.weight"], p[f"{name}.bias"])
        y, c[f"{bn}.cache"] = bn_train_fwd(z, p[f"{bn}.weight"], p[f"{bn}.bias"])
        _, _, mean, var = c[f"{bn}.cache"]
        m = z.shape[0] * z.shape[2] * z.shape[3]
        rm, rv = f"{bn}.running_mean", f"{bn}.running_var"
        stats[rm] = ((1 - BN_MOMENTUM) * stats[rm] + BN_MOMENTUM * mean).astype(np.float32)
        stats[rv] = ((1 - BN_MOMENTUM) * stats[rv] + BN_MOMENTUM * var * m / (m - 1)).astype(np.float32)
        h = np.maximum(y, 0)
        c[f"{name}.relu"] = h
    h = h + c["pool_out"]  # identity residual around conv3
    flat = h.reshape(h.shape[0], -1)
    c["flat"] = flat
    f1 = np.maximum(flat @ p["fc1.weight"].T + p["fc1.bias"], 0)
    c["f1"] = f1
    keep = (rng.random(f1.shape) >= DROPOUT).astype(np.float32) / np.float32(1 - DROPOUT)
    c["keep"] = keep
    d = f1 * keep
    c["d"] = d
    logits = d @ p["fc2.weight"].T + p["fc2.bias"]
    return logits, c


def backward(p, c, dlogits):
    g = {}
    g["fc2.weight"] = dlogits.T @ c["d"]
    g["fc2.bias"] = dlogits.sum(0)
    dd = dlogits @ p["fc2.weight"]
    df1 = dd * c["keep"] * (c["f1"] > 0)
    g["fc1.weight"] = df1.T @ c["flat"]
    g["fc1.bias"] = df1.sum(0)
    dh = (df1 @ p["fc1.weight"]).reshape(c["conv3.relu"].shape)
    dpool_out = dh.copy()  # residual branch
    for name, _, _, bn in reversed(CONVS):
        dy = dh * (c[f"{name}.relu"] > 0)
        dz, g[f"{bn}.weight"], g[f"{bn}.bias"] = bn_bwd(dy, c[f"{bn}.cache"], p[f"{bn}.weight"])
        dx, g[f"{name}.weight"], g[f"{name}.bias"] = conv_bwd(
            dz, c[f"{name}.cols"], p[f"{name}.weight"], c[f"{name}.in_shape"], need_dx=name != "conv1"
        )
        if name == "conv3":
            dx = dx + dpool_out
            dx = maxpool_bwd(dx, c["pool_in"], c["pool_out"])
        dh = dx
    return g


def forward_eval(p, stats, x):
    """Inference forward: exactly the computation the ONNX graph performs."""
    h = x
    pooled = None
    for name, _, _, bn in CONVS:
        if name == "conv3":
            h = pooled = maxpool_fwd(h)
        z, _ = conv_fwd(h, p[f"{name}.weight"], p[f"{name}.bias"])
        z = bn_eval(
            z, p[f"{bn}.weight"], p[f"{bn}.bias"], stats[f"{bn}.running_mean"], stats[f"{bn}.running_var"]
        )
        h = np.maximum(z, 0)
    h = h + pooled
    f1 = np.maximum(h.reshape(h.shape[0], -1) @ p["fc1.weight"].T + p["fc1.bias"], 0)
    return f1 @ p["fc2.weight"].T + p["fc2.bias"]


def softmax_xent(logits, y):
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    prob = e / e.sum(1, keepdims=True)
    n = len(y)
    loss = -np.log(prob[np.arange(n), y] + 1e-12).mean()
    d = prob
    d[np.arange(n), y] -= 1
    return float(loss), (d / n).astype(np.float32)


def train(splits, seed: int, epochs: int, verbose: bool = True):
    rng = np.random.default_rng(seed)
    p, stats = init_params(rng)
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(v) for k, v in p.items()}
    b1, b2 = 0.9, 0.999
    xtr, ytr = splits["train"]
    steps_per_epoch = int(np.ceil(len(ytr) / BATCH))
    total = epochs * steps_per_epoch
    t = 0
    for ep in range(epochs):
        order = rng.permutation(len(ytr))
        losses = []
        for s in range(steps_per_epoch):
            bi = order[s * BATCH : (s + 1) * BATCH]
            if len(bi) < 2:
                continue
            logits, cache = forward_train(p, stats, xtr[bi], rng)
            loss, dl = softmax_xent(logits, ytr[bi])
            losses.append(loss)
            g = backward(p, cache, dl)
            t += 1
            lr = LR * 0.5 * (1 + np.cos(np.pi * t / total))  # cosine decay to 0
            for k in p:
                gk = g[k] + (WEIGHT_DECAY * p[k] if k.endswith("weight") and not k.startswith("bn") else 0)
                m[k] = b1 * m[k] + (1 - b1) * gk
                v[k] = b2 * v[k] + (1 - b2) * gk * gk
                mh = m[k] / (1 - b1**t)
                vh = v[k] / (1 - b2**t)
                p[k] = (p[k] - lr * mh / (np.sqrt(vh) + 1e-8)).astype(np.float32)
        if verbose and (ep % 5 == 4 or ep == epochs - 1):
            acc = accuracy(forward_eval(p, stats, xtr), ytr)
            print(f"epoch {ep + 1:3d}  loss {np.mean(losses):.4f}  train acc {acc:.4f}")
    return p, stats


def accuracy(logits, y) -> float:
    return float((logits.argmax(1) == y).mean())


# ----------------------------------------------------------------------------------------------- onnx
def build_onnx(p, stats) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in {**p, **stats}.items()]
    inits.append(numpy_helper.from_array(np.array(DROPOUT, np.float32), "dropout.ratio"))
    nodes = []
    h = "image"
    for name, _, _, bn in CONVS:
        if name == "conv3":
            nodes.append(
                helper.make_node(
                    "MaxPool", [h], ["pool_out"], name="pool", kernel_shape=[2, 2], strides=[2, 2]
                )
            )
            h = "pool_out"
        nodes.append(
            helper.make_node(
                "Conv",
                [h, f"{name}.weight", f"{name}.bias"],
                [f"{name}_out"],
                name=name,
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
                strides=[1, 1],
                dilations=[1, 1],
                group=1,
            )
        )
        nodes.append(
            helper.make_node(
                "BatchNormalization",
                [f"{name}_out", f"{bn}.weight", f"{bn}.bias", f"{bn}.running_mean", f"{bn}.running_var"],
                [f"{bn}_out"],
                name=bn,
                epsilon=BN_EPS,
                momentum=1.0 - BN_MOMENTUM,
            )
        )
        relu = f"relu{name[-1]}"
        nodes.append(helper.make_node("Relu", [f"{bn}_out"], [f"{relu}_out"], name=relu))
        h = f"{relu}_out"
    nodes += [
        helper.make_node("Add", [h, "pool_out"], ["residual_out"], name="residual_add"),
        helper.make_node("Flatten", ["residual_out"], ["flat_out"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat_out", "fc1.weight", "fc1.bias"], ["fc1_out"], name="fc1", transB=1),
        helper.make_node("Relu", ["fc1_out"], ["relu4_out"], name="relu4"),
        helper.make_node("Dropout", ["relu4_out", "dropout.ratio"], ["dropout_out"], name="dropout"),
        helper.make_node("Gemm", ["dropout_out", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    graph.doc_string = "8x8 digits classifier (scikit-learn load_digits), input pixels scaled /16 to [0,1]"
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="onnxcompress-models",
        producer_version="1",
    )
    model.doc_string = "Made by models/make_digits_model.py (numpy training, onnx.helper graph)."
    return model


def ort_logits(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"image": x})[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE, help="output directory (default: models/)")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    args = ap.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    splits = load_splits(args.seed)
    for name, (_x, y) in splits.items():
        print(f"{name:5s}: {len(y)} images, per-class counts {np.bincount(y, minlength=10).tolist()}")

    p, stats = train(splits, args.seed, args.epochs)

    model = build_onnx(p, stats)
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    out_dims = [d.dim_param or d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim]
    assert out_dims == ["N", 10], out_dims
    model_bytes = model.SerializeToString()

    # The numpy inference forward and onnxruntime must agree on every split.
    acc = {}
    max_diff = 0.0
    for name, (x, y) in splits.items():
        ref = forward_eval(p, stats, x)
        got = ort_logits(model_bytes, x)
        max_diff = max(max_diff, float(np.abs(ref - got).max()))
        acc[name] = accuracy(got, y)
    print(f"max |numpy - onnxruntime| = {max_diff:.2e}")
    if max_diff >= 1e-4:
        raise SystemExit(f"onnxruntime output differs from the numpy reference by {max_diff}")
    print("accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()))

    onnx_path = out / "digits_cnn.onnx"
    onnx_path.write_bytes(model_bytes)
    # np.savez (uncompressed) is byte-for-byte deterministic; zip timestamps in savez_compressed vary.
    np.savez(out / "digits_calib.npz", image=splits["calib"][0])
    np.savez(out / "digits_val.npz", image=splits["val"][0])
    np.save(out / "digits_val_labels.npy", splits["val"][1])

    files = ["digits_cnn.onnx", "digits_calib.npz", "digits_val.npz", "digits_val_labels.npy"]
    n_params = int(sum(v.size for v in p.values()))
    n_stats = int(sum(v.size for v in stats.values()))
    info = {
        "model": "digits_cnn.onnx",
        "task": "10-class classification of scikit-learn load_digits 8x8 images",
        "input": {
            "name": "image",
            "dtype": "float32",
            "shape": ["N", 1, 8, 8],
            "preprocessing": "pixel / 16",
        },
        "output": {"name": "logits", "dtype": "float32", "shape": ["N", 10]},
        "opset": OPSET,
        "ir_version": IR_VERSION,
        "op_counts": {
            op: sum(n.op_type == op for n in model.graph.node)
            for op in sorted({n.op_type for n in model.graph.node})
        },
        "accuracy_fp32": {"val": acc["val"], "calib": acc["calib"], "train": acc["train"]},
        "max_abs_diff_numpy_vs_onnxruntime": max_diff,
        "params": {"trainable": n_params, "bn_running_stats": n_stats, "total": n_params + n_stats},
        "split": {k: len(v[1]) for k, v in splits.items()},
        "split_method": "sklearn train_test_split, stratified: val (random_state=seed), then calib (random_state=seed+1)",
        "training": {
            "framework": "numpy (hand-written backward)",
            "optimizer": "Adam, cosine lr decay",
            "lr": LR,
            "weight_decay": WEIGHT_DECAY,
            "epochs": args.epochs,
            "batch_size": BATCH,
            "dropout": DROPOUT,
            "bn_momentum": BN_MOMENTUM,
            "bn_eps": BN_EPS,
        },
        "seed": args.seed,
        "files": {f: {"bytes": (out / f).stat().st_size, "sha256": sha256(out / f)} for f in files},
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "scikit-learn": sklearn.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
        },
        "regenerate": "python models/make_digits_model.py",
    }
    (out / "digits_cnn.json").write_text(json.dumps(info, indent=2) + "\n")
    for f in files:
        print(f"wrote {out / f} ({(out / f).stat().st_size} bytes)")
    print(f"wrote {out / 'digits_cnn.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
