"""Small synthetic routing data sets with a known structure, for fast tests."""

from __future__ import annotations

import numpy as np

from banditroute.core.data import RoutingData

TOPICS = ("math", "code", "trivia")
WORDS = {
    "math": "integral derivative equation algebra sum prime number solve".split(),
    "code": "python function loop compile bug array string return".split(),
    "trivia": "capital river president history city country war king".split(),
}


def make_routing_data(n: int = 120, seed: int = 0, with_responses: bool = False) -> RoutingData:
    """Three models: 'cheap-math' is good (and cheap) on math only, 'cheap-code' on code only,
    'expensive' is good everywhere and costs 20x more. The best model depends on the prompt
    AND on the preference, which is exactly what a router must learn."""
    rng = np.random.default_rng(seed)
    topics = rng.choice(TOPICS, size=n)
    prompts = [
        f"Question {i}: " + " ".join(rng.choice(WORDS[t], size=6)) + f" ({t})" for i, t in enumerate(topics)
    ]
    models = ("cheap-math", "cheap-code", "expensive")
    p_good = np.array([[0.95 if t == "math" else 0.1, 0.95 if t == "code" else 0.1, 0.9] for t in topics])
    scores = (rng.uniform(size=(n, 3)) < p_good).astype(np.float32)
    costs = np.column_stack([np.full(n, 1e-4), np.full(n, 1e-4), np.full(n, 2e-3)]) * rng.uniform(0.8, 1.2, size=(n, 3))
    responses = None
    if with_responses:
        responses = np.array([[f"answer of {m} to {i}" for m in models] for i in range(n)], dtype=object)
    return RoutingData(
        sample_ids=np.array([f"s{i}" for i in range(n)]),
        prompts=prompts,
        eval_names=np.array(topics),
        models=models,
        scores=scores,
        costs=costs,
        responses=responses,
        source="synthetic",
    )
