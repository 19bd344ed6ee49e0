"""The ``ReplayUpstream`` deployment (only with ``replay.enabled``): runs the replay server in Serve.

The server itself (serve/replay.py, no Ray) answers chat completions as
"model X" with X's logged response; the ingress sends every pool model
without an explicit upstream to the base URL this deployment reports.
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve

from banditroute.serve.config import as_router_config
from banditroute.serve.replay import ReplayIndex, ReplayServer

logger = logging.getLogger("banditroute.serve")


@serve.deployment(name="ReplayUpstream", num_replicas=1)
class ReplayUpstream:
    """Starts the replay server (serve/replay.py) in this replica; ``url()`` gives its base URL."""

    def __init__(self, config: dict[str, Any]):
        cfg = as_router_config(config).replay
        self.server = ReplayServer(ReplayIndex.from_path(cfg.data_path), cfg.host, cfg.port, cfg.stream_chunk_chars)
        self.server.start()
        logger.info("replay upstream at %s", self.server.base_url)

    async def url(self) -> str:
        return self.server.base_url

    def __del__(self):
        try:
            self.server.stop()
        except Exception:  # noqa: BLE001
            pass
