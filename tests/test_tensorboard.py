"""TensorBoard event files beside metrics.jsonl: written without TensorFlow, read back here.

The reader below parses the files as TensorBoard does: records of a little-endian uint64 length,
its masked CRC-32C, the payload and the payload's masked CRC-32C; each payload an ``Event``
protocol buffer (tensorboardX's copy of TensorBoard's ``event.proto``).
"""

import glob
import json
import os
import struct
import sys

import pytest

from adc_jax import tensorboard_writer, train

tensorboardX = pytest.importorskip("tensorboardX", reason="pip install 'adc-jax[tensorboard]'")
from tensorboardX.proto.event_pb2 import Event  # noqa: E402
from tensorboardX.record_writer import masked_crc32c  # noqa: E402


def read_events(path):
    events = []
    with open(path, "rb") as f:
        while header := f.read(8):
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", f.read(4))[0] == masked_crc32c(header)
            payload = f.read(length)
            assert struct.unpack("<I", f.read(4))[0] == masked_crc32c(payload)
            events.append(Event.FromString(payload))
    return events


def scalars(workdir):
    """``{tag: {step: value}}`` over every event file in ``workdir``, oldest file first."""
    out = {}
    for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
        for event in read_events(path):
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


ROWS = [
    {"step": 2, "loss": 2.5, "bytes_up": 1024, "steps_per_second": 3.0},
    {"step": 4, "loss": 1.25, "bytes_up": 2048, "steps_per_second": 3.5},
    {"step": 4, "test_accuracy": 0.375, "bytes_up": 2048},
]


def test_metrics_rows_become_scalars_beside_metrics_jsonl(tmp_path):
    writer = train.MetricsWriter(str(tmp_path), tensorboard=True)
    for row in ROWS:
        writer.write(row)
    writer.close()
    assert [json.loads(line) for line in open(tmp_path / "metrics.jsonl")] == ROWS
    got = scalars(tmp_path)
    assert got == {
        "loss": {2: 2.5, 4: 1.25},
        "bytes_up": {2: 1024.0, 4: 2048.0},
        "steps_per_second": {2: 3.0, 4: 3.5},
        "test_accuracy": {4: 0.375},
    }
    assert "tensorflow" not in sys.modules


def test_a_resumed_run_tells_tensorboard_to_drop_the_later_events(tmp_path):
    first = tensorboard_writer.TensorBoardWriter(tmp_path)
    first.write({"step": 6, "loss": 1.0})
    first.close()
    resumed = tensorboard_writer.TensorBoardWriter(tmp_path, start_step=4)
    resumed.write({"step": 5, "loss": 0.5})
    resumed.close()
    newest = sorted(glob.glob(os.path.join(tmp_path, "events.out.tfevents.*")))[-1]
    # TensorBoard purges the events at steps >= 5 of older files when it reads this one.
    starts = [e.step for e in read_events(newest) if e.HasField("session_log")]
    assert starts == [5]


def test_without_tensorboardx_the_metrics_are_still_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import now raises ImportError
    assert tensorboard_writer.open_writer(tmp_path) is None
    writer = train.MetricsWriter(str(tmp_path), tensorboard=True)
    writer.write(ROWS[0])
    writer.close()
    assert not glob.glob(os.path.join(tmp_path, "events.out.tfevents.*"))
    assert json.loads(open(tmp_path / "metrics.jsonl").read()) == ROWS[0]
