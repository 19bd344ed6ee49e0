import dataclasses
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from banditroute.policy.encoders import (
    DEFAULT_CHARS_PER_TOKEN,
    ENCODERS,
    EmbeddingCache,
    EncoderConfig,
    StaticEncoder,
    clip_tail,
    encode_with_cache,
    make_encoder,
    mean_rows,
    static_model_folder,
)
from banditroute.policy.static_model import StaticBuildSpec, publish_atomically


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


# --- long inputs: every encoder clips by characters before tokenizing --------------------------------------

CJK_PROMPT = "漢字" * 50_000  # 100,000 characters, no whitespace


def test_clip_tail_keeps_the_end_at_a_word_boundary_or_hard_cut():
    assert clip_tail("short text", 100) == "short text"
    text = "first words " * 100 + "the question at the end?"
    tail = clip_tail(text, 60)
    assert len(tail) <= 60 and text.endswith(tail) and tail.split()[0] in {"first", "words"}  # no split word
    assert tail.endswith("the question at the end?")
    assert clip_tail(CJK_PROMPT, 100) == CJK_PROMPT[-100:]  # no whitespace: hard cut at the limit
    # A whitespace only in the second half does not shorten the tail below half the budget.
    lopsided = "x" * 1000 + " end"
    assert clip_tail(lopsided, 100) == lopsided[-100:]


@pytest.mark.parametrize("cfg", [EncoderConfig(name="hashing", max_tokens=16), EncoderConfig(name="hashing", chars_per_token=4)])
def test_hashing_encodes_a_huge_prompt_as_its_tail(cfg):
    enc = make_encoder(cfg)
    huge = "preamble " * 20_000 + "what is the capital of france"
    max_chars = cfg.max_tokens * cfg.chars_per_token
    np.testing.assert_array_equal(enc.encode([huge]), enc.encode([clip_tail(huge, max_chars)]))
    assert enc.encode([CJK_PROMPT]).shape == (1, cfg.dim)


def test_clip_setting_is_part_of_the_encoder_id_only_when_not_default():
    assert DEFAULT_CHARS_PER_TOKEN == EncoderConfig().chars_per_token
    assert make_encoder(EncoderConfig(name="hashing")).encoder_id == "hashing-384-last256"
    assert make_encoder(EncoderConfig(name="hashing", chars_per_token=4)).encoder_id == "hashing-384-last256-tail4cpt"
    with pytest.raises(ValueError, match="chars_per_token"):
        make_encoder(EncoderConfig(name="hashing", chars_per_token=0))


def test_minilm_clips_huge_prompts_without_changing_ordinary_ones():
    enc = make_encoder(EncoderConfig(name="minilm", max_tokens=32, device="cpu"))
    assert enc.max_chars == 32 * DEFAULT_CHARS_PER_TOKEN
    # An ordinary prompt longer than the clip: exactly the same token ids as the unclipped tokenizer call.
    ordinary = "Here are some worked examples about geography and history. " * 40 + "What is the capital of France?"
    assert len(ordinary) > enc.max_chars
    full = enc.tokenizer([ordinary], truncation=True, max_length=32, return_tensors="pt")
    assert enc.tokenize([ordinary])["input_ids"].tolist() == full["input_ids"].tolist()
    # A 100,000-character prompt without whitespace is tokenized from its tail only (same vector as the tail).
    tail = CJK_PROMPT[-enc.max_chars:]
    assert enc.tokenize([CJK_PROMPT])["input_ids"].tolist() == enc.tokenize([tail])["input_ids"].tolist()
    np.testing.assert_allclose(enc.encode([CJK_PROMPT]), enc.encode([tail]), atol=1e-6)


# --- the static (model2vec) encoder -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def static_config(tmp_path_factory):
    """A static encoder config whose distilled model is built once for this module (~15-40 s on 2 cores)."""
    cfg = EncoderConfig(name="static", model_cache_dir=str(tmp_path_factory.mktemp("models")))
    make_encoder(cfg)
    return cfg


def test_static_encoder_is_registered_offline_and_keeps_the_end(static_config):
    # The token window is an inference setting: another max_tokens reuses the same distilled model.
    enc = make_encoder(dataclasses.replace(static_config, max_tokens=16))
    assert isinstance(enc, StaticEncoder) and "static" in ENCODERS
    preamble = "Here are some worked examples about geography and history. " * 40
    v = enc.encode([preamble + "What is the capital of France?", preamble + "Write a python function to sort a list.",
                    "Which city is the capital of France?"])
    assert v.shape == (3, 256) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert float(v[0] @ v[2]) > float(v[0] @ v[1])
    # Short texts: the same vectors as model2vec's own encode (which differs only in keeping the START of long ones).
    short = ["What is the capital of France?", "def f(x): return x"]
    np.testing.assert_allclose(enc.encode(short), enc.model.encode(short, max_length=None), atol=2e-3)
    assert all(len(ids) <= enc.max_tokens for ids in enc.token_ids([preamble * 10]))


def test_static_encoder_id_names_source_hash_and_settings(static_config):
    enc = make_encoder(static_config)
    folder = next(p for p in Path(static_config.model_cache_dir).iterdir() if p.is_dir())
    built = json.loads((folder / "build.json").read_text())
    assert enc.encoder_id == f"{built['key']}-mean-left256"
    assert enc.encoder_id.startswith(f"static-all-MiniLM-L6-v2@{built['source_sha256'][:12]}-m2v")
    assert "-pca256-sif0.0001-float16-" in enc.encoder_id
    spec = StaticBuildSpec(**{k: built[k] for k in built if k != "key"})
    changed = [dataclasses.replace(spec, pca_dims=128), dataclasses.replace(spec, source_sha256="0" * 64),
               dataclasses.replace(spec, model2vec_version="9.9"), dataclasses.replace(spec, sif_coefficient=1e-3),
               dataclasses.replace(spec, sif_coefficient=0.0), dataclasses.replace(spec, quantize_to="float32")]
    assert len({spec.key, *(c.key for c in changed)}) == 7  # each distillation input changes the key


def test_static_distillation_settings_reach_the_build_spec(tmp_path, monkeypatch):
    from banditroute.policy import static_model

    def fake_distill(folder, source_dir, spec):
        (folder / "build.json").write_text(json.dumps(dataclasses.asdict(spec)))

    monkeypatch.setattr(static_model, "distill_into", fake_distill)
    cfg = EncoderConfig(name="static", model_cache_dir=str(tmp_path), static_dim=384,
                        static_sif_coefficient=0.0, static_dtype="float32")
    folder, spec = static_model_folder(cfg)
    assert (spec.pca_dims, spec.sif_coefficient, spec.quantize_to) == (384, 0.0, "float32")
    assert folder == tmp_path / spec.key and "-pca384-sif0-float32" in spec.key
    assert json.loads((folder / "build.json").read_text())["quantize_to"] == "float32"


@pytest.mark.parametrize("bad", [{"static_sif_coefficient": -1e-4}, {"static_sif_coefficient": 1.0},
                                 {"static_dtype": "int8"}, {"static_dim": 1}])
def test_static_settings_are_validated(bad):
    with pytest.raises(ValueError, match="encoder.static_"):
        EncoderConfig(name="static", **bad).validate()


def test_static_encoder_reuses_its_cache_and_clips_huge_prompts(static_config, monkeypatch):
    from banditroute.policy import static_model

    monkeypatch.setattr(static_model, "distill_into", lambda *a, **k: pytest.fail("rebuilt a cached static model"))
    enc = make_encoder(static_config)
    tail = CJK_PROMPT[-enc.max_chars:]
    np.testing.assert_array_equal(enc.encode([CJK_PROMPT]), enc.encode([tail]))
    assert enc.encode([""]).tolist() == [[0.0] * enc.dim]  # nothing to average: a zero vector, not NaN


def test_mean_rows_handles_empty_and_ragged_lists():
    table = np.arange(12, dtype=np.float16).reshape(4, 3)
    out = mean_rows(table, [[0, 2], [], [3]])
    np.testing.assert_allclose(out, [[3, 4, 5], [0, 0, 0], [9, 10, 11]])
    assert out.dtype == np.float32 and mean_rows(table, [[], []]).shape == (2, 3)


def test_publish_atomically_one_winner_under_concurrent_builds(tmp_path):
    final = tmp_path / "cache" / "model"
    barrier = threading.Barrier(4)

    def build(tag):
        def run(folder):
            (folder / "part.txt").write_text(tag)
            barrier.wait()  # every builder has a complete private copy before anyone renames
            (folder / "done.txt").write_text(tag)
        return run

    results = []
    threads = [threading.Thread(target=lambda t=t: results.append(publish_atomically(final, build(t)))) for t in "abcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [final] * 4
    assert (final / "part.txt").read_text() == (final / "done.txt").read_text() in set("abcd")
    assert sorted(p.name for p in final.parent.iterdir()) == ["model"]  # no temporary folder left behind


def test_publish_atomically_failed_build_leaves_nothing(tmp_path):
    final = tmp_path / "model"

    def broken(folder):
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("distillation failed")

    with pytest.raises(RuntimeError):
        publish_atomically(final, broken)
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_refuses_an_encoder_it_was_not_trained_with(static_config, tmp_path):
    from banditroute.policy.train import NetworkConfig, TrainConfig, train_bandit_policy
    from banditroute.serve.core import RouterCore
    from banditroute.testkit.synthetic import make_routing_data

    data = make_routing_data(n=48)
    enc = make_encoder(static_config)
    cfg = TrainConfig(epochs=2, batch_size=16, seed=0, network=NetworkConfig(hidden_dim=16, n_hidden_layers=1, preference_dim=8))
    policy, _, _ = train_bandit_policy(data, enc.encode(data.prompts), cfg, static_config, enc.encoder_id)
    path = policy.save(tmp_path / "policy")

    core = RouterCore.from_checkpoint(str(path), device="cpu")  # rebuilds the same static encoder from meta.encoder
    assert core.encoder_id == enc.encoder_id
    [result] = core.route_batch([(CJK_PROMPT + " Question 1: python loop", 0.5, None, "explore")])
    assert result.error is None and result.model in data.models and 0 < result.probability <= 1
    # Another token window, a non-default clip, or MiniLM: different vectors, so the checkpoint refuses them.
    for overrides in ({"max_tokens": 128}, {"chars_per_token": 8}, {"name": "minilm"}):
        with pytest.raises(ValueError, match="encoder mismatch"):
            RouterCore.from_checkpoint(str(path), device="cpu", encoder_overrides=overrides)
