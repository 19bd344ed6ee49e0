import numpy as np
import pytest

from banditroute.policy.encoders import ENCODERS, EmbeddingCache, EncoderConfig, encode_with_cache, make_encoder


class CountingEncoder:
    """Wraps a real encoder and counts how many texts it was asked to encode."""

    def __init__(self, inner):
        self.inner, self.encoder_id, self.dim, self.calls = inner, inner.encoder_id, inner.dim, 0

    def encode(self, texts, progress=None):
        self.calls += len(texts)
        return self.inner.encode(texts, progress)


def test_registry_and_unknown_name():
    assert {"minilm", "hashing"} <= set(ENCODERS)
    with pytest.raises(ValueError, match="encoder.name"):
        make_encoder(EncoderConfig(name="nope"))


def test_hashing_keeps_the_end_of_long_prompts():
    enc = make_encoder(EncoderConfig(name="hashing", max_tokens=8))
    shared = "same preamble " * 50
    a, b = enc.encode([shared + "what is the capital of france", shared + "how do I reverse a list"])
    assert np.linalg.norm(a - b) > 0.5  # the differing END is what is encoded


def test_cache_second_run_does_not_reencode(tmp_path):
    enc = CountingEncoder(make_encoder(EncoderConfig(name="hashing")))
    texts = ["a b c", "d e f", "a b c"]
    first = encode_with_cache(enc, texts, tmp_path)
    assert enc.calls == 2  # the duplicate text is encoded once
    second = encode_with_cache(enc, texts + ["new"], tmp_path)
    assert enc.calls == 3  # only "new"
    np.testing.assert_array_equal(first, second[:3])
    assert set(EmbeddingCache(tmp_path).load(enc.encoder_id)) and len(list(tmp_path.rglob("part-*.parquet"))) == 2


def test_cache_is_keyed_by_encoder_id(tmp_path):
    a = make_encoder(EncoderConfig(name="hashing", dim=64))
    b = make_encoder(EncoderConfig(name="hashing", dim=32))
    assert encode_with_cache(a, ["x y"], tmp_path).shape == (1, 64)
    assert encode_with_cache(b, ["x y"], tmp_path).shape == (1, 32)


def test_minilm_offline_end_truncation_and_similarity():
    enc = make_encoder(EncoderConfig(name="minilm", max_tokens=16, device="cpu"))
    preamble = "Here are some worked examples about geography and history. " * 20
    v = enc.encode([preamble + "What is the capital of France?", preamble + "Write a python function to sort a list.",
                    "Which city is the capital of France?"])
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    # With left truncation the two long prompts differ (their ends differ) and the
    # France question is closer to its paraphrase than to the python question.
    assert float(v[0] @ v[2]) > float(v[0] @ v[1])
    assert enc.encoder_id == "all-MiniLM-L6-v2-mean-left16"
