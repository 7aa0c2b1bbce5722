"""benchmarks.speech_text: tokenizer, mel front end and metrics on their own; the real models when cached."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import speech_text as st

# ---------------------------------------------------------------------------------------------------------------
# no cache needed


def test_basic_tokens_split_punctuation_accents_cjk():
    got = st.WordPieceTokenizer.basic_tokens("Héllo, WORLD!! naïve\tcafé\u200b 東京 (re)bind.")
    assert got == ["hello", ",", "world", "!", "!", "naive", "cafe", "東", "京", "(", "re", ")", "bind", "."]


def test_wordpiece_greedy_longest_match_and_unknown():
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "un", "una", "##ffa", "##ff", "##able", "##ble", "bind", "."]
    tok = st.WordPieceTokenizer({t: i for i, t in enumerate(vocab)})
    assert tok.wordpiece("unaffable") == [5, 6, 9]  # una ##ffa ##ble (longest first piece wins)
    assert tok.wordpiece("unxyz") == [1]  # any piece missing -> the whole word is [UNK]
    assert tok.encode("Bind unaffable.", max_length=5) == [2, 10, 5, 6, 3]  # truncated, [SEP] kept


def test_sentences_are_real_and_splits_disjoint():
    calib, ev = st.split_sentences("calib"), st.split_sentences("eval")
    assert len(calib) > 300 and len(ev) > 300
    assert not set(calib) & set(ev)
    assert all(5 <= len(s.split()) <= 40 for s in calib + ev)
    with pytest.raises(ValueError):
        st.split_sentences("train")


def test_mel_filterbank_matches_slaney_reference():
    fb = st.mel_filterbank()
    assert fb.shape == (40, 201) and (fb >= 0).all()
    # reference values of the Slaney-normalised filterbank (sr 16 kHz, 400-point FFT, 40 mels)
    np.testing.assert_allclose(
        fb.sum(1)[[0, 10, 20, 39]], [0.02480904, 0.02480904, 0.02521975, 0.02497876], rtol=1e-6
    )
    np.testing.assert_array_equal(fb.argmax(1)[[0, 10, 20, 39]], [2, 20, 44, 185])
    np.testing.assert_allclose(
        fb.max(1)[[0, 10, 20, 39]], [0.01240452, 0.01187949, 0.00719192, 0.00172494], rtol=1e-6
    )


def test_mel_spectrogram_of_a_tone_peaks_at_its_channel():
    t = np.arange(st.SR) / st.SR
    mel = st.mel_spectrogram(np.sin(2 * np.pi * 1000 * t).astype(np.float32))
    assert mel.shape == (1 + st.SR // st.MEL_HOP, 40) and mel.dtype == np.float32
    centres = st._mel_to_hz(np.linspace(0, st._hz_to_mel(8000.0), 42))[1:-1]
    assert abs(centres[mel[50].argmax()] - 1000) < 120


def test_vad_metrics_perfect_and_corrupted():
    rng = np.random.default_rng(0)
    truth = rng.random(200) > 0.4
    probs = np.where(truth, 0.9, 0.1) + rng.normal(0, 0.02, 200)
    same = st.vad_metrics(probs, probs, truth)
    assert same == {"agreement": 1.0, "prob_mae": 0.0, "fp32_f1": 1.0, "f1": 1.0}
    bad = st.vad_metrics(probs, 1 - probs, truth)
    assert bad["agreement"] == 0.0 and bad["f1"] == 0.0 and bad["fp32_f1"] == 1.0


def test_embedding_metrics_perfect_and_corrupted():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(20, 16))
    same = st.embedding_metrics(ref, ref)
    assert same["cosine_mean"] == pytest.approx(1) and same["rank_agreement"] == 1.0
    noisy = st.embedding_metrics(ref, ref + rng.normal(0, 1.0, ref.shape))
    assert noisy["cosine_mean"] < 0.9 and noisy["cosine_min"] <= noisy["cosine_mean"]
    assert noisy["rank_agreement"] < 1.0


# ---------------------------------------------------------------------------------------------------------------
# real models (skip unless already in the cache: python -m benchmarks.models fetch NAME)

SPECS = {s.name: s for s in st.SPECS}


def _needs(name: str):
    missing = [p.name for p in st.required_files(name) if not p.exists()]
    if missing:
        pytest.skip(
            f"{name} not cached ({', '.join(missing)}); run: python -m benchmarks.models fetch {name}"
        )


def _run(name: str, n: int, split: str = "eval"):
    import onnxruntime as ort

    spec = SPECS[name]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(spec.fetch(st.cache_dir())), so, providers=["CPUExecutionProvider"])
    feeds = spec.make_inputs(n, split)
    return spec, feeds, [sess.run(None, f) for f in feeds]


def _corrupt(spec, outputs, rng):
    """VAD: flip the speech probability; embedders: add noise as large as the embedding."""
    out = []
    for o in outputs:
        o = [np.asarray(a).copy() for a in o]
        if spec.family == "vad":
            o[0] = 1 - o[0]
        else:
            for i, a in enumerate(o):
                if a.dtype.kind == "f":
                    o[i] = (a + rng.normal(0, 1.0, a.shape) * np.abs(a).mean()).astype(a.dtype)
        out.append(o)
    return out


@pytest.mark.realmodel
def test_wordpiece_matches_known_bert_ids():
    vocab = st.required_files("minilm_l3")[1]
    if not vocab.exists():
        pytest.skip("bert vocab.txt not cached; run: python -m benchmarks.models fetch minilm_l3")
    tok = st.tokenizer()
    assert len(tok.vocab) == 30522
    assert tok.encode("The quick brown fox jumps over the lazy dog.") == [
        101, 1996, 4248, 2829, 4419, 14523, 2058, 1996, 13971, 3899, 1012, 102,
    ]  # fmt: skip
    assert tok.encode("Héllo, WORLD!! naïve café — 東京 unaffable (re)bind.") == [
        101, 7592, 1010, 2088, 999, 999, 15743, 7668, 1517, 1879, 1755, 14477, 20961, 3468, 1006, 2128, 1007,
        14187, 1012, 102,
    ]  # fmt: skip


@pytest.mark.realmodel
@pytest.mark.parametrize("name", list(SPECS))
def test_spec_self_agreement_and_corruption(name):
    _needs(name)
    spec, feeds, ref = _run(name, 12)
    assert feeds and all(set(f) for f in feeds)
    perfect = spec.evaluate(feeds, ref, ref)
    assert perfect[spec.primary_metric] == pytest.approx(1.0, abs=1e-6)
    corrupted = spec.evaluate(feeds, ref, _corrupt(spec, ref, np.random.default_rng(0)))
    assert corrupted[spec.primary_metric] < perfect[spec.primary_metric] - 0.05


@pytest.mark.realmodel
@pytest.mark.parametrize("name", list(st.SILERO_SHA))
def test_silero_fp32_matches_rttm(name):
    _needs(name)
    spec, feeds, ref = _run(name, 1000)
    metrics = spec.evaluate(feeds, ref, ref)
    # measured: 0.978-0.989 speech-frame F1 on the last 15 s of the pyannote sample call
    assert metrics["fp32_f1"] >= 0.9
    assert metrics["f1"] == metrics["fp32_f1"]


@pytest.mark.realmodel
def test_silero_feed_carries_the_stream_state():
    """Teacher forcing: feed k's state is what FP32 returned on chunk k-1, so chaining reproduces the stream."""
    _needs("silero_vad")
    spec, feeds, ref = _run("silero_vad", 10_000, "calib")
    assert len(feeds) == len(st._split_chunks("calib")[0])
    for k in (1, 100, len(feeds) - 1):
        np.testing.assert_array_equal(ref[k - 1][1], feeds[k]["state"])
        np.testing.assert_array_equal(
            feeds[k - 1]["input"][0, -st.CONTEXT :], feeds[k]["input"][0, : st.CONTEXT]
        )


@pytest.mark.realmodel
def test_minilm_splits_differ_and_lengths_are_real():
    _needs("minilm_l3")
    spec = SPECS["minilm_l3"]
    calib, ev = spec.make_inputs(16, "calib"), spec.make_inputs(16, "eval")
    lengths = {f["input_ids"].shape[1] for f in calib + ev}
    assert len(lengths) > 3  # variable sequence lengths, no padding
    assert all(f["attention_mask"].all() and f["input_ids"][0, 0] == 101 for f in calib + ev)
    assert {f["input_ids"].tobytes() for f in calib}.isdisjoint({f["input_ids"].tobytes() for f in ev})


@pytest.mark.realmodel
def test_resemblyzer_separates_speakers():
    _needs("resemblyzer")
    spec, feeds, ref = _run("resemblyzer", 64)
    metrics = spec.evaluate(feeds, ref, ref)
    assert metrics["fp32_spk_margin"] > 0.03  # measured 0.10: same-speaker windows are closer
