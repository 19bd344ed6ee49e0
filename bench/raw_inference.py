#!/usr/bin/env python
"""Raw RouterCore throughput: batched encoder + policy, no Ray, no HTTP.

Runs anywhere torch + transformers are installed (Ray is NOT needed: the lead
can run it on a GPU box). Three numbers per batch size:

- end_to_end: ``RouterCore.route_batch`` on prompt texts: tokenizer call +
  encoder forward + policy forward + one device->host copy + result objects.
  This is what one Router replica does per batch (minus the decision log).
- forward_only: the same on pre-tokenized inputs (encoder forward + policy
  forward + the one copy): the accelerator's share.
- tokenize_only: the host tokenizer alone, as route_batch calls it (long
  texts clipped to the token window first); tokenize_unclipped: without the clip.
- ingress_rows / forward_from_rows: ``placement: replica`` split in two
  (serve/tokens.py): an ingress replica tokenizing a group into token-id rows,
  and the Router replica padding the rows and running the forward passes.

``--synthetic-tokens N`` adds forward_only on random token ids of length N
(the "batch 256 x 128 tokens" reference setting).

    python bench/raw_inference.py --policy runs/bench_policy/policy \
        --data ../shared/data/routerbench/train.parquet --batch-sizes 64 --duration-s 20 \
        --out bench/results/raw_cpu.json
    # GPU, weights carried in a folder named all-MiniLM-L6-v2 (same encoder_id):
    python bench/raw_inference.py --policy ckpt --prompts prompts.json --model-path all-MiniLM-L6-v2 \
        --device cuda --batch-sizes 64,256,1024 --synthetic-tokens 128 --out raw_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def load_prompts(data: str | None, prompts: str | None, limit: int, seed: int = 0) -> list[str]:
    """Prompt texts from a routing-data file (Parquet only: no pickle from disk) or a JSON list of strings."""
    if prompts:
        texts = json.loads(Path(prompts).read_text())
    else:
        import pandas as pd

        path = Path(data)
        frame = pd.read_parquet(path)
        texts = [str(p) for p in frame["prompt"]]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))[:limit]
    return [texts[i] for i in order]


def _sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize()


def _run_for(fn, duration_s: float, min_iters: int = 3, max_iters: int = 1_000_000) -> list[float]:
    times: list[float] = []
    end = time.perf_counter() + duration_s
    while (time.perf_counter() < end or len(times) < min_iters) and len(times) < max_iters:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _summary(times: list[float], batch: int) -> dict:
    arr = np.asarray(times)
    return {
        "batches": len(arr),
        "prompts_per_s": float(batch * len(arr) / arr.sum()),
        "batch_ms_p50": float(np.percentile(arr, 50) * 1000),
        "batch_ms_p99": float(np.percentile(arr, 99) * 1000),
    }


def measure_raw(core, prompts: list[str], batch_size: int, duration_s: float, warmup: int = 2,
                synthetic_tokens: int | None = None, seed: int = 0, end_to_end_only: bool = False,
                min_iters: int = 3) -> dict:
    """Throughput of one RouterCore at ``batch_size`` (see module docstring)."""
    import torch

    from banditroute.serve.core import RouteRequest

    rng = np.random.default_rng(seed)
    models = core.models
    batches = []
    for start in range(0, max(len(prompts), batch_size), batch_size):
        idx = [(start + j) % len(prompts) for j in range(batch_size)]
        batches.append([RouteRequest(prompts[i], float(rng.uniform()), None, "explore" if j % 2 else "greedy")
                        for j, i in enumerate(idx)])
        if len(batches) >= 8:
            break
    state = {"i": 0}

    def end_to_end():
        core.route_batch(batches[state["i"] % len(batches)])
        state["i"] += 1

    for _ in range(warmup):
        end_to_end()
    out = {"batch_size": batch_size, "end_to_end": _summary(_run_for(end_to_end, duration_s, min_iters), batch_size)}
    if end_to_end_only:
        return out

    encoder = core.encoder
    host = np.zeros((batch_size, 2 + len(models)), np.float32)
    host[:, 0], host[:, 1], host[:, 2:] = rng.uniform(size=batch_size), 1.0, 1.0
    policy = core.policy
    if hasattr(encoder, "tokenize"):
        texts = [r.text for r in batches[0]]
        tokens = encoder.tokenize(texts)

        def forward_only():
            core.decide_embedded(policy, encoder.embed_tokens(tokens), host)

        def tokenize_only():
            core.tokenize(texts)  # what route_batch does: long texts clipped first

        def tokenize_unclipped():
            encoder.tokenize(texts)

        rows = core.tokenizer.rows(texts)

        def ingress_rows():
            core.tokenizer.rows(texts)  # placement replica: what an ingress replica does per group

        def forward_from_rows():
            core.decide_embedded(policy, core.embed_rows(rows, texts), host)  # ... and the Router replica then

        for _ in range(warmup):
            forward_only()
        out["forward_only"] = _summary(_run_for(forward_only, duration_s / 2), batch_size)
        out["ingress_rows"] = _summary(_run_for(ingress_rows, min(5.0, duration_s / 4)), batch_size)
        out["forward_from_rows"] = _summary(_run_for(forward_from_rows, duration_s / 2), batch_size)
        out["forward_only"]["tokens_per_prompt"] = int(tokens["input_ids"].shape[1])
        out["tokenize_only"] = _summary(_run_for(tokenize_only, min(5.0, duration_s / 4)), batch_size)
        out["tokenize_unclipped"] = _summary(_run_for(tokenize_unclipped, min(5.0, duration_s / 4)), batch_size)
        if synthetic_tokens:
            vocab = int(getattr(encoder.tokenizer, "vocab_size", 30000))
            ids = torch.randint(1000, vocab, (batch_size, synthetic_tokens), generator=torch.Generator().manual_seed(seed))
            synth = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
            if core.device.type == "cuda":
                synth = {k: v.pin_memory() for k, v in synth.items()}

            def synthetic():
                core.decide_embedded(policy, encoder.embed_tokens(synth), host)

            for _ in range(warmup):
                synthetic()
            out["forward_only_synthetic"] = _summary(_run_for(synthetic, duration_s / 2), batch_size)
            out["forward_only_synthetic"]["tokens_per_prompt"] = synthetic_tokens
    _sync(core.device)
    return out


def environment(core) -> dict:
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(core.device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "encoder_id": core.encoder_id,
        "dtype": str(getattr(core.encoder, "dtype", "float32")),
    }
    if core.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(core.device)
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True, help="policy checkpoint folder")
    parser.add_argument("--data", default="../shared/data/routerbench/train.parquet", help="routing data (prompt column)")
    parser.add_argument("--prompts", help="JSON list of prompt strings (instead of --data)")
    parser.add_argument("--max-prompts", type=int, default=2048)
    parser.add_argument("--batch-sizes", default="64", help="comma-separated")
    parser.add_argument("--duration-s", type=float, default=20.0, help="seconds per end-to-end measurement")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model-path", help="encoder weights folder (overrides the bundled MiniLM)")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0 = torch default)")
    parser.add_argument("--synthetic-tokens", type=int, help="also time forward-only on random ids of this length")
    parser.add_argument("--out", help="write the JSON result here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from banditroute.serve.core import RouterCore

    overrides = {"model_path": args.model_path} if args.model_path else None
    core = RouterCore.from_checkpoint(args.policy, device=args.device, seed=0, torch_threads=args.torch_threads,
                                      encoder_overrides=overrides)
    assert "ray" not in sys.modules, "raw inference must not import Ray"
    prompts = load_prompts(args.data, args.prompts, args.max_prompts)
    result = {"mode": "raw", "environment": environment(core), "n_prompts": len(prompts),
              "command": " ".join([Path(sys.executable).name] + sys.argv), "points": []}
    for bs in [int(x) for x in args.batch_sizes.split(",")]:
        point = measure_raw(core, prompts, bs, args.duration_s, synthetic_tokens=args.synthetic_tokens)
        result["points"].append(point)
        line = f"batch {bs:5d}: end-to-end {point['end_to_end']['prompts_per_s']:10.1f} prompts/s"
        if "forward_only" in point:
            line += f" | forward-only {point['forward_only']['prompts_per_s']:10.1f} ({point['forward_only']['tokens_per_prompt']} tok)"
            line += (f" | tokenize-only {point['tokenize_only']['prompts_per_s']:10.1f}"
                     f" (unclipped {point['tokenize_unclipped']['prompts_per_s']:.1f})")
        if "forward_from_rows" in point:
            line += (f" | ingress rows {point['ingress_rows']['prompts_per_s']:10.1f}"
                     f" | forward from rows {point['forward_from_rows']['prompts_per_s']:10.1f}")
        if "forward_only_synthetic" in point:
            line += f" | synthetic {args.synthetic_tokens} tok {point['forward_only_synthetic']['prompts_per_s']:10.1f}"
        print(line, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
