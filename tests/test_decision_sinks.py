"""LocalDecisionLog after a write error: the torn segment is abandoned, later decisions stay readable."""

from __future__ import annotations

import time

import pytest

from banditroute.core.records import DecisionRecord, decisions_to_table
from banditroute.serve.decision_sinks import SEGMENT_SUFFIX, LocalDecisionLog, read_decision_log


def batch(*ids: str):
    return decisions_to_table([DecisionRecord(i, time.time(), [0.1, 0.2], 0.5, ["a", "b"], "a", 0.6, 1) for i in ids])


class TornWriter:
    """Writes half a batch's bytes to the segment, then fails (a full disk, an I/O error mid-write)."""

    def __init__(self, sink: LocalDecisionLog):
        self.sink = sink

    def write_table(self, table):
        self.sink._file.write(b"\xff\xff\xff\xff\x10\x00\x00\x00torn-batch")
        self.sink._file.flush()
        raise OSError("No space left on device (test)")

    def close(self):
        raise AssertionError("a torn segment must not get an end-of-stream marker after the torn batch")


def test_a_write_error_starts_a_new_segment_so_later_decisions_stay_readable(tmp_path):
    sink = LocalDecisionLog({"path": str(tmp_path)})
    sink.emit_table(batch("d0", "d1"))
    sink._writer = TornWriter(sink)
    with pytest.raises(OSError, match="No space left"):
        sink.emit_table(batch("lost"))  # never acknowledged: the Router answers 503
    sink.emit_table(batch("d2"))
    sink.emit_table(batch("d3"))
    sink.close()
    assert read_decision_log(tmp_path).column("decision_id").to_pylist() == ["d0", "d1", "d2", "d3"]
    assert len(list(tmp_path.glob(f"*{SEGMENT_SUFFIX}"))) == 2 and sink.segments_abandoned == 1
