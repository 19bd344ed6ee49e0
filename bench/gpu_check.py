#!/usr/bin/env python
"""GPU code-path check of the Router replica's inference core (RouterCore, no Ray): correct on CUDA, same as CPU.

What a CUDA Router replica does per batch, checked against the CPU path:

1. ``bound_probabilities`` (the exploration floor/ceiling projection) on the
   same random inputs gives the same result on CUDA and CPU (max abs diff),
   and its invariants hold on CUDA (sums to 1, bounds, masked zeros);
2. ``RouterCore.route_batch`` on CUDA (fp16 encoder) and on CPU (fp32) over
   the same prompts: explore propensities respect the floor, greedy picks
   agree, probabilities agree to fp16 tolerance;
3. a weights swap on CUDA installs the new version between batches.

Writes a JSON result; exits 1 if any check fails. Ray is not needed:

    python bench/gpu_check.py --policy ckpt --prompts prompts.json --model-path all-MiniLM-L6-v2 --out gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from raw_inference import load_prompts  # noqa: E402


def check_projection(device: str, floor: float, ceiling: float, seed: int = 0) -> dict:
    import torch

    from banditroute.policy.exploration import bound_probabilities

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4096, 11, generator=g) * 6.0
    mask = torch.rand(4096, 11, generator=g) > 0.3
    mask[:, 0] = True
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    cpu = bound_probabilities(probs, mask, floor, ceiling)
    gpu = bound_probabilities(probs.to(device), mask.to(device), floor, ceiling).cpu()
    k = mask.sum(dim=1, keepdim=True).float()
    lo, hi = torch.minimum(torch.full_like(k, floor), 1.0 / k), torch.maximum(torch.full_like(k, ceiling), 1.0 / k)
    inside = ((gpu >= lo - 1e-6) | ~mask) & ((gpu <= hi + 1e-6) | ~mask)
    return {
        "rows": int(probs.shape[0]),
        "max_abs_diff_cuda_vs_cpu": float((gpu - cpu).abs().max()),
        "max_sum_error": float((gpu.sum(dim=1) - 1).abs().max()),
        "all_within_bounds": bool(inside.all()),
        "masked_exactly_zero": bool((gpu[~mask] == 0).all()),
    }


def route(core, prompts: list[str], mode: str):
    from banditroute.serve.core import RouteRequest

    return core.route_batch([RouteRequest(text=p, w_cost=(i % 11) / 10.0, mode=mode) for i, p in enumerate(prompts)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True, help="BaRP checkpoint folder")
    parser.add_argument("--prompts", help="JSON list of prompt strings")
    parser.add_argument("--data", default="../shared/data/routerbench/train.parquet")
    parser.add_argument("--model-path", help="encoder weights folder (named all-MiniLM-L6-v2 for the same encoder_id)")
    parser.add_argument("--n", type=int, default=512, help="prompts routed on each device")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", help="write the JSON result here")
    args = parser.parse_args(argv)
    import torch

    from banditroute.core.records import WeightsSnapshot
    from banditroute.serve.core import RouterCore

    overrides = {"model_path": args.model_path} if args.model_path else None
    prompts = load_prompts(args.data, args.prompts, args.n)
    result: dict = {"command": "python " + " ".join(sys.argv), "device": args.device, "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    gpu = RouterCore.from_checkpoint(args.policy, device=args.device, seed=0, encoder_overrides=overrides)
    cpu = RouterCore.from_checkpoint(args.policy, device="cpu", seed=0, encoder_overrides=overrides)
    floor, ceiling = gpu.exploration_floor, gpu.exploration_ceiling
    result["projection"] = check_projection(args.device, floor, ceiling)

    started = time.perf_counter()
    explore_gpu = route(gpu, prompts, "explore")
    greedy_gpu, greedy_cpu = route(gpu, prompts, "greedy"), route(cpu, prompts, "greedy")
    result["route_s_cuda"] = time.perf_counter() - started
    k = len(gpu.models)
    floor_eff = min(floor, 1.0 / k)
    prob_diff = max(abs(a.probabilities[m] - b.probabilities[m]) for a, b in zip(greedy_gpu, greedy_cpu) for m in a.candidates)
    agree = sum(a.model == b.model for a, b in zip(greedy_gpu, greedy_cpu)) / len(prompts)
    result["route"] = {
        "prompts": len(prompts),
        "models": k,
        "explore_min_propensity": min(r.probability for r in explore_gpu),
        "floor_effective": floor_eff,
        "explore_propensities_at_least_floor": all(r.probability >= floor_eff - 1e-6 for r in explore_gpu),
        "explore_probabilities_sum_to_1": max(abs(sum(r.probabilities.values()) - 1.0) for r in explore_gpu) < 1e-4,
        "greedy_propensity_is_1": all(r.probability == 1.0 for r in greedy_gpu),
        "greedy_agreement_cuda_fp16_vs_cpu_fp32": agree,
        "max_probability_diff_cuda_vs_cpu": prob_diff,
        "errors": sum(not r.ok for r in explore_gpu + greedy_gpu),
    }
    before = gpu.policy_version
    state = gpu.policy.state()
    swapped = gpu.swap_weights(WeightsSnapshot(policy_version=before + 5, state=state, created_at=time.time(), trained_through=0.0))
    result["swap"] = {"before": before, "after": swapped, "served_after": route(gpu, prompts[:8], "explore")[0].policy_version}

    p, r = result["projection"], result["route"]
    checks = {
        "projection_matches_cpu": p["max_abs_diff_cuda_vs_cpu"] < 1e-5,
        "projection_invariants": p["all_within_bounds"] and p["masked_exactly_zero"] and p["max_sum_error"] < 1e-5,
        "explore_floor": r["explore_propensities_at_least_floor"] and r["explore_probabilities_sum_to_1"],
        "greedy": r["greedy_propensity_is_1"] and r["greedy_agreement_cuda_fp16_vs_cpu_fp32"] >= 0.97,
        "no_errors": r["errors"] == 0,
        "swap": result["swap"]["after"] == before + 5 == result["swap"]["served_after"],
    }
    result["checks"] = checks
    result["ok"] = all(checks.values())
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
