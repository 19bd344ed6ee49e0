"""`banditroute onboard`: add a new model to an identity policy's pool from a short quiz."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from banditroute.policy.encoders import DEFAULT_CACHE_DIR

HELP = "onboard a new model into an identity policy from N quiz prompts (no retraining); prints the checkpoint path last"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", required=True, help="identity policy checkpoint folder (kind 'identity')")
    parser.add_argument("--model", required=True, help="name of the new model (as its upstream knows it)")
    parser.add_argument("--price", required=True, help="expected USD cost of one call of the new model (>= 0)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--scores", metavar="FILE", help="quiz results (.csv/.parquet): 'score' in [0,1] + 'prompt' or 'sample_id'")
    source.add_argument("--from-data", metavar="PATH", help="routing data (RouterBench layout) holding a score column for --model")
    source.add_argument("--upstream", metavar="URL", help="OpenAI-compatible base URL: ask the model the quiz live (needs --data and a scorer)")
    parser.add_argument("--data", help="routing data: prompt pool for --upstream/--quiz-out, and sample_id lookup for --scores")
    parser.add_argument("--quiz", type=int, default=30, help="number of quiz prompts (default 30; the most informative are picked)")
    parser.add_argument("--quiz-strategy", choices=("adaptive", "stratified", "information", "random"), default="adaptive",
                        help="how quiz prompts are picked: adaptive (default; ask in batches, refit, ask where the model is still "
                             "uncertain), stratified (fixed: one per k-means stratum, most informative), information, random. "
                             "--quiz-out always writes a fixed stratified quiz")
    parser.add_argument("--out", help="write the updated checkpoint here (default: update the policy's registry in place)")
    parser.add_argument("--replace", action="store_true", help="re-onboard a model that is already registered")
    parser.add_argument("--quiz-out", metavar="FILE", help="only write the chosen quiz prompts (sample_id, prompt) as CSV and exit")
    parser.add_argument("--scorer", choices=("reference", "replay"), default="reference",
                        help="--upstream scorer: 'reference' (needs --references) or 'replay' (the replay upstream's logged score)")
    parser.add_argument("--references", metavar="FILE", help="CSV/Parquet with sample_id, reference (for --scorer reference)")
    parser.add_argument("--upstream-model", help="model name to send upstream (default: --model)")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="embedding cache folder ('none' disables it)")
    parser.add_argument("--device", default="auto", help="torch device for the encoder: auto, cpu, cuda")


def parse_price(text: str) -> float:
    from banditroute.policy.model_registry import RegistryError

    try:
        return float(text)
    except (TypeError, ValueError):
        raise RegistryError(f"--price: expected a number of USD per call, got {text!r}") from None


def embed_for_policy(policy, prompts, args) -> np.ndarray:
    from dataclasses import replace

    from banditroute.policy.encoders import embed_prompts

    enc = replace(policy.meta.encoder, device=args.device)
    cache_dir = None if args.cache_dir == "none" else args.cache_dir
    emb, encoder_id = embed_prompts(list(prompts), enc, cache_dir)
    if policy.meta.encoder_id and encoder_id != policy.meta.encoder_id:
        raise ValueError(f"encoder {encoder_id!r} does not match the policy's {policy.meta.encoder_id!r}")
    return emb


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from banditroute.core.data import load_routing_data
    from banditroute.policy.checkpoint import load_policy
    from banditroute.policy.identity_policy import IdentityPolicy
    from banditroute.policy.model_registry import RegistryError, validate_name, validate_price
    from banditroute.policy.onboard import (
        QuizError,
        check_quiz_size,
        choose_quiz,
        onboard_model,
        onboard_model_adaptive,
        quiz_results_from_data,
        read_quiz_results,
        save_policy_atomically,
    )
    from banditroute.policy.quiz_runner import QuizRunner, ReferenceScorer, ReplayLoggedScorer

    policy = load_policy(args.policy)
    if not isinstance(policy, IdentityPolicy):
        raise ValueError(
            f"{args.policy}: a {policy.kind!r} checkpoint has a fixed pool of models; "
            "onboarding needs an identity policy (kind 'identity')"
        )
    # Cheap checks first: nothing is computed (or registered) with a bad name or price.
    name = validate_name(args.model)
    price = validate_price(name, parse_price(args.price))
    if name in policy.registry and not args.replace:
        raise RegistryError(f"model {name!r} is already registered in {args.policy} (pass --replace to re-onboard it)")
    n = int(args.quiz)
    data = load_routing_data(args.data) if args.data else None

    if args.quiz_out:
        if data is None:
            raise QuizError("--quiz-out needs --data (the prompt pool to choose from)")
        check_quiz_size(n, len(data), str(args.data))
        fixed = "stratified" if args.quiz_strategy == "adaptive" else args.quiz_strategy
        quiz = choose_quiz(policy, embed_for_policy(policy, data.prompts, args), n, fixed)
        frame = pd.DataFrame({"sample_id": data.sample_ids[quiz], "prompt": [data.prompts[i] for i in quiz]})
        Path(args.quiz_out).parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(args.quiz_out, index=False)
        print(f"wrote the {n} most informative quiz prompts for a new model to {args.quiz_out}; "
              "add a 'score' column with the model's scores and run onboard --scores")
        print(args.quiz_out)
        return 0

    if args.from_data:
        results = quiz_results_from_data(load_routing_data(args.from_data), name)
    elif args.scores:
        results = read_quiz_results(args.scores, data, name)
    elif args.upstream:
        if data is None:
            raise QuizError("--upstream needs --data (the prompt pool to choose the quiz from)")
        from banditroute.policy.onboard import QuizResults

        results = QuizResults(list(data.prompts), np.full(len(data), np.nan, np.float32), [str(s) for s in data.sample_ids], str(args.data))
    else:
        raise QuizError("give the new model's quiz scores: --scores FILE, --from-data PATH or --upstream URL")
    check_quiz_size(n, len(results), results.source or "quiz results")

    if args.upstream:
        if args.scorer == "replay":
            scorer = ReplayLoggedScorer()
        else:
            if not args.references:
                raise QuizError("--scorer reference needs --references FILE (sample_id, reference)")
            scorer = ReferenceScorer.from_file(args.references)
        runner = QuizRunner(args.upstream, args.upstream_model or name, scorer)

        def answer(ix: np.ndarray) -> np.ndarray:
            return runner.run([results.prompts[i] for i in ix], [results.sample_ids[i] for i in ix])
    else:

        def answer(ix: np.ndarray) -> np.ndarray:
            return results.scores[ix]

    emb = embed_for_policy(policy, results.prompts, args)
    # Work on a detached registry; it replaces the live one only after the quiz and fit succeeded.
    live = policy.registry
    policy.registry = live.copy()
    if args.quiz_strategy == "adaptive":
        entry, quiz, scores = onboard_model_adaptive(policy, name, price, emb, answer, n, replace=args.replace)
    else:
        quiz = choose_quiz(policy, emb, n, args.quiz_strategy)
        scores = answer(quiz)
        entry = onboard_model(policy, name, price, emb[quiz], scores, replace=args.replace)
    if not args.out:
        policy.registry = live
        entry = live.add(name, price, entry.mu, entry.sigma, n_observations=entry.n_observations, source="quiz", replace=args.replace)
    if args.out:
        ckpt = save_policy_atomically(policy, args.out)
    else:
        ckpt = Path(args.policy)
    print(
        f"onboarded {name!r} from {n} quiz prompts (mean quiz score {float(np.mean(scores)):.3f}); "
        f"identity mu={json.dumps([round(v, 3) for v in entry.mu])} sigma={json.dumps([round(v, 3) for v in entry.sigma])}; "
        f"price {entry.price:.6g} USD/call; pool: {len(policy.registry.models)} models"
    )
    print(ckpt)
    return 0
