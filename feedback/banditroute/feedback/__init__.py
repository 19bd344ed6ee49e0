"""The feedback side: join rewards to decisions, durable event log, batches to the learner.

- ``join``: the pure join logic (window, first reward wins, duplicates, late, unknown).
- ``log``: the durable Parquet event/decision log (local folder or S3).
- ``batching``: size/max-delay batching and group commit.
- ``spool``: the bounded local-disk spool for log parts while storage is down.
- ``durable``: log writes that fall back to the spool, and the spool drain.
- ``recovery``: rebuilding the join state from the logs and the spool after a restart.
- ``delivery``: micro-batches to the learner, one call in flight, back-off.
- ``clock``: the time seam (now, sleep, timed wait) every timed step goes through.
- ``config``: FeedbackConfig.
- ``service``: FeedbackService (asyncio; join + log + learner delivery, wired together).
- ``actor``: the named, detached, restartable Ray actor around it.

The decision sink and the ``POST /v1/feedback`` handler that talk to the actor are serve's.
"""
