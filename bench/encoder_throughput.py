#!/usr/bin/env python
"""Raw prompt-encoder throughput, one process: prompts/s of each registered encoder on real prompts.

For each encoder (default: minilm, static) on the same prompts:

- bulk: ``encoder.encode`` over the prompt list (the encoder's own batching),
  repeated for at least ``--duration-s / --rounds`` seconds, in ``--rounds``
  rounds that alternate the encoders; median prompts/s, and the median of the
  per-round static/minilm ratios.
- single: one prompt per call (what a lightly loaded router sees); median ms.
- long inputs: one 100,000-character prompt without whitespace (CJK) and one
  with (English words), median ms per call, next to the single-prompt median:
  every encoder clips by characters before tokenizing, so these should cost
  about what an ordinary prompt does; ``*_unclipped`` is the same call with
  the clip switched off, for contrast.
- make_s: seconds to construct the encoder (for 'static': load from the
  cache, or distil on first use; ``built`` says which).

    .venv/bin/python bench/encoder_throughput.py --threads 2 \
        --out bench/results/encoder_throughput_cpu2.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_prompts(path: str, limit: int, seed: int = 0) -> list[str]:
    import numpy as np
    import pandas as pd

    texts = [str(p) for p in pd.read_parquet(path, columns=["prompt"])["prompt"]]
    order = np.random.default_rng(seed).permutation(len(texts))[:limit]
    return [texts[i] for i in order]


def median_ms(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def make(name: str, cache_dir: str | None):
    """(encoder, seconds to construct it, whether a static model was distilled for it)."""
    from banditroute.policy.encoders import EncoderConfig, make_encoder

    cfg = EncoderConfig(name=name, device="cpu", **({"model_cache_dir": cache_dir} if cache_dir else {}))
    cached = set(Path(cfg.model_cache_dir).expanduser().glob("static-*"))
    t0 = time.perf_counter()
    encoder = make_encoder(cfg)
    seconds = time.perf_counter() - t0
    built = name == "static" and set(Path(cfg.model_cache_dir).expanduser().glob("static-*")) != cached
    return encoder, seconds, built


def bulk_rate(encoder, prompts: list[str], min_seconds: float) -> float:
    """prompts/s of ``encoder.encode(prompts)``, repeated for at least ``min_seconds`` (at least one pass)."""
    encoded = 0
    t0 = time.perf_counter()
    while encoded == 0 or time.perf_counter() - t0 < min_seconds:
        encoder.encode(prompts)
        encoded += len(prompts)
    return encoded / (time.perf_counter() - t0)


def latencies(encoder, prompts: list[str], single_calls: int) -> dict:
    ordinary = iter(prompts[:single_calls])
    cjk = "漢字" * 50_000
    words = "lorem ipsum dolor sit amet " * 3_704  # ~100,000 characters
    out = {
        "max_chars": int(encoder.max_chars),
        "single_prompt_median_ms": median_ms(lambda: encoder.encode([next(ordinary)]), min(single_calls, len(prompts))),
        "long_100k_cjk_median_ms": median_ms(lambda: encoder.encode([cjk]), 5),
        "long_100k_words_median_ms": median_ms(lambda: encoder.encode([words]), 5),
    }
    max_chars, encoder.max_chars = encoder.max_chars, 10**9  # what the clip saves: the same calls without it
    out["long_100k_cjk_unclipped_median_ms"] = median_ms(lambda: encoder.encode([cjk]), 3)
    out["long_100k_words_unclipped_median_ms"] = median_ms(lambda: encoder.encode([words]), 3)
    encoder.max_chars = max_chars
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/routerbench/train.parquet"))
    ap.add_argument("--encoders", default="minilm,static")
    ap.add_argument("--limit", type=int, default=256, help="prompts per pass (a seeded random sample)")
    ap.add_argument("--duration-s", type=float, default=30.0, help="minimum bulk time per encoder, over all rounds (at least one pass a round)")
    ap.add_argument("--rounds", type=int, default=3, help="bulk measurements per encoder, alternating encoders")
    ap.add_argument("--single-calls", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the MiniLM forward)")
    ap.add_argument("--model-cache-dir", help="static model cache (default: the encoder config's)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/encoder_throughput.json"))
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    prompts = load_prompts(args.data, args.limit)
    load_before = os.getloadavg()
    names = args.encoders.split(",")
    built = {n: make(n, args.model_cache_dir) for n in names}
    for encoder, _, _ in built.values():
        encoder.encode(prompts[:32])  # warm-up: lazy inits, allocator
    # Rounds alternate the encoders, so load from other processes on a shared machine hits both alike.
    rates: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for n in names:
            rates[n].append(bulk_rate(built[n][0], prompts, args.duration_s / args.rounds))
    rows = []
    for n in names:
        encoder, make_s, was_built = built[n]
        rows.append({
            "encoder": n, "encoder_id": encoder.encoder_id, "dim": int(encoder.dim),
            "make_s": round(make_s, 2), "built": bool(was_built),
            "prompts_per_s": round(statistics.median(rates[n]), 1),
            "prompts_per_s_rounds": [round(r, 1) for r in rates[n]],
            **latencies(encoder, prompts, args.single_calls),
        })
    report = {
        "data": args.data,
        "prompts": len(prompts),
        "mean_prompt_chars": round(sum(map(len, prompts)) / len(prompts), 1),
        "torch_threads": args.threads,
        "rounds": args.rounds,
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "encoders": rows,
    }
    if "minilm" in rates and "static" in rates:
        ratios = [s / m for s, m in zip(rates["static"], rates["minilm"])]
        report["static_speedup_bulk_median"] = round(statistics.median(ratios), 1)
        report["static_speedup_single_prompt"] = round(
            rows[names.index("minilm")]["single_prompt_median_ms"] / rows[names.index("static")]["single_prompt_median_ms"], 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
