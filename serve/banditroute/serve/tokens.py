"""The encoder's tokenizer on its own: where text becomes token ids, and how ids travel.

A Router replica on a GPU is bound by its host tokenizer, not by the GPU
(docs/serving.md): so with ``placement: replica`` the ingress replicas (CPU,
many) tokenize and send token ids, and the GPU replica only runs forward
passes. Both sides use one :class:`PromptTokenizer`: the Router replica's,
shipped to the ingress without the encoder's weights (:meth:`without_model`),
so the ids an ingress sends are exactly the ones the replica would make.

- :meth:`PromptTokenizer.tokenize`: one tokenizer call on a batch of texts,
  long texts clipped first (same ids, see the method);
- :meth:`PromptTokenizer.rows`: that batch split into one unpadded row per text
  (``{"input_ids": int32[n], ...}``, attention mask left out: it is all ones);
- :meth:`PromptTokenizer.collate`: rows back into one padded batch, equal to
  tokenizing those texts together.

Only encoders with ``tokenize`` + ``embed_tokens`` (MiniLM) have one; the
others (hashing, static) are cheap enough to be given text. No Ray here.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Sequence

import numpy as np
import torch

CLIP_CHARS_PER_TOKEN = 6
"""Texts longer than max_tokens * this are clipped before tokenizing (BERT WordPiece: ~4.2 chars/token on RouterBench, p99 4.4)."""
TIGHT_CLIP_CHARS_PER_TOKEN = 2
"""A long text with no whitespace near its end (CJK: one token per character) is cut to max_tokens * this
characters: ~3x fewer characters to tokenize than CLIP_CHARS_PER_TOKEN, still filling the token window."""
_WHITESPACE = re.compile(r"\s")
_MASK = "attention_mask"

TokenRow = dict[str, np.ndarray]
"""One text's tokenizer outputs, unpadded (int32 arrays of one length), attention mask left out."""


def has_tokenizer(encoder: Any) -> bool:
    """Whether ``encoder`` splits into a tokenizer and a forward pass (``tokenize`` + ``embed_tokens``)."""
    return hasattr(encoder, "tokenize") and hasattr(encoder, "embed_tokens")


class PromptTokenizer:
    """An encoder's ``tokenize`` with the long-text clip, plus splitting batches into rows and back."""

    def __init__(self, encoder: Any):
        if not has_tokenizer(encoder):
            raise TypeError(f"{type(encoder).__name__} has no tokenize/embed_tokens: give it text")
        self.encoder = encoder
        self.encoder_id = str(getattr(encoder, "encoder_id", ""))
        self.clip_fallbacks = 0
        """Batches re-tokenized unclipped because a clipped row did not fill the token window."""

    def without_model(self) -> "PromptTokenizer":
        """A copy holding the encoder without its weights, on the host: what ingress replicas run."""
        view = copy.copy(self.encoder)
        if hasattr(view, "model"):
            view.model = None
        if hasattr(view, "device"):
            view.device = torch.device("cpu")  # no pinned memory: the ingress has no GPU
        return PromptTokenizer(view)

    def tokenize(self, texts: Sequence[str]) -> Any:
        """The encoder's tokenizer on ``texts``, with long texts clipped first (same token ids).

        The encoder keeps the last ``max_tokens`` tokens (left truncation), but a
        tokenizer call still pays for the whole text, and on a GPU replica the
        host tokenizer, not the GPU, bounds throughput. So a text longer than
        ``max_tokens * CLIP_CHARS_PER_TOKEN`` characters is cut to its tail,
        starting at a whitespace (a word boundary for BERT-style tokenizers, so
        the tail's tokens are exactly the full text's last tokens). A tail with
        no whitespace in its first half (CJK, a run of symbols) is cut by
        characters to its last ``max_tokens * TIGHT_CLIP_CHARS_PER_TOKEN``
        (the encoder itself would cut such a text by characters too, only
        later): a 100,000-character prompt without spaces then costs what an
        ordinary window-filling prompt costs. If a clipped row does not fill
        the token window (a tail of unusually long tokens), the whole batch is
        re-tokenized as the encoder alone would (its own character clip bounds
        that too).
        """
        max_tokens = getattr(self.encoder, "max_tokens", None)
        tokenizer = getattr(self.encoder, "tokenizer", None)
        if not max_tokens or getattr(tokenizer, "truncation_side", "right") != "left":
            return self.encoder.tokenize(texts)
        limit = int(max_tokens) * CLIP_CHARS_PER_TOKEN
        clipped, rows = list(texts), []
        for i, text in enumerate(texts):
            if len(text) > limit:
                tail = text[-limit:]
                match = _WHITESPACE.search(tail, 0, len(tail) // 2)
                clipped[i] = tail[match.end():] if match is not None else text[-int(max_tokens) * TIGHT_CLIP_CHARS_PER_TOKEN:]
                rows.append(i)
        batch = self.encoder.tokenize(clipped)
        if rows and bool((batch[_MASK][rows].sum(dim=1) < max_tokens).any()):
            self.clip_fallbacks += 1
            batch = self.encoder.tokenize(list(texts))
        return batch

    def rows(self, texts: Sequence[str]) -> list[TokenRow]:
        """One tokenizer call on ``texts``, split into one unpadded row per text."""
        batch = self.tokenize(texts)
        keep = batch[_MASK].bool().numpy()
        arrays = {k: v.numpy() for k, v in batch.items() if k != _MASK}
        return [{k: a[i][keep[i]].astype(np.int32) for k, a in arrays.items()} for i in range(len(keep))]

    def collate(self, rows: Sequence[TokenRow], pin: bool = False) -> dict[str, torch.Tensor]:
        """Rows into one padded batch (the tokenizer's padding side and pad ids), as ``tokenize`` returns it."""
        tokenizer = self.encoder.tokenizer
        width = max(len(r["input_ids"]) for r in rows)
        left = getattr(tokenizer, "padding_side", "right") == "left"
        pads = {"input_ids": int(tokenizer.pad_token_id or 0), "token_type_ids": int(getattr(tokenizer, "pad_token_type_id", 0))}
        out = {k: np.full((len(rows), width), pads.get(k, 0), dtype=np.int64) for k in rows[0]}
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            span = slice(width - n, width) if left else slice(0, n)
            for k, values in row.items():
                out[k][i, span] = values
            mask[i, span] = 1
        out[_MASK] = mask
        batch = {k: torch.from_numpy(v) for k, v in out.items()}
        return {k: v.pin_memory() for k, v in batch.items()} if pin else batch
