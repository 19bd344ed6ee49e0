"""How banditroute's long-lived Ray actors are created (feedback, learner, parameter server)."""

from __future__ import annotations

from typing import Any


def get_or_create_detached_actor(
    actor_cls: type, name: str, namespace: str | None, *args: Any, max_concurrency: int, num_cpus: float, **options: Any
) -> Any:
    """The named actor ``name``, created from ``actor_cls(*args)`` if missing.

    Detached (it outlives the driver that started it) and restarted without
    limit: each of these actors recovers its state from storage on restart.
    """
    import ray

    return (
        ray.remote(actor_cls)
        .options(
            name=name,
            namespace=namespace,
            get_if_exists=True,
            lifetime="detached",
            max_restarts=-1,
            max_concurrency=max_concurrency,
            num_cpus=num_cpus,
            **options,
        )
        .remote(*args)
    )
