"""Metrics sink: (sum, count) reduction, stdout/JSONL output, process-0 only, and TensorBoard
event files checked with an independent protobuf decoder."""

import io
import json
import math
import struct

import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from topd_jax.train.metrics import (MetricsSink, PairAccumulator, crc32c, format_summary,
                                    reduce_pairs, rewind_jsonl)


def test_pairs_reduce_as_global_sum_over_global_count():
    got = reduce_pairs({"loss": (np.float32(6.0), np.int32(4)), "lr": 1e-3, "empty": (0.0, 0)})
    assert got["loss"] == 1.5 and got["lr"] == pytest.approx(1e-3) and math.isnan(got["empty"])


def test_accumulated_pairs_are_not_a_mean_of_means():
    acc = PairAccumulator()
    acc.add({"kl": (1.0, 1), "steps": 1})
    acc.add({"kl": (30.0, 10), "steps": 1})
    out = reduce_pairs(acc.pop())
    assert out["kl"] == pytest.approx(31 / 11) and out["kl"] != pytest.approx((1 + 3) / 2)
    assert out["steps"] == 1.0 and acc.pop() == {}


def test_stdout_and_jsonl_get_one_reduced_line_per_write(tmp_path):
    stream = io.StringIO()
    with MetricsSink(tmp_path, process_index=0, stream=stream, tensorboard=False) as sink:
        sink.write(1, {"loss": (3.0, 2), "lr": 2e-6})
        sink.write(2, {"loss": (float("nan"), 1)})
    lines = stream.getvalue().splitlines()
    assert lines == ["step 1 | loss 1.5 | lr 2e-06", "step 2 | loss nan"]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and rows[0]["loss"] == 1.5 and rows[0]["lr"] == 2e-6
    assert rows[1]["loss"] is None and "time" in rows[1]  # NaN is not JSON: null


def test_only_process_zero_writes(tmp_path):
    stream = io.StringIO()
    out = tmp_path / "run"
    with MetricsSink(out, process_index=1, stream=stream) as sink:
        assert sink.write(5, {"loss": (1.0, 2)}) == {"loss": 0.5}
    assert stream.getvalue() == "" and not out.exists()


def test_crc32c_matches_the_standard_check_value():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


def _event_class():
    """tensorflow.Event / Summary built from a descriptor here, independent of our encoder."""
    f = descriptor_pb2.FileDescriptorProto(name="ev_test.proto", package="tft")
    summ = f.message_type.add(name="Summary")
    val = summ.nested_type.add(name="Value")
    L, T = descriptor_pb2.FieldDescriptorProto, descriptor_pb2.FieldDescriptorProto
    val.field.add(name="tag", number=1, type=T.TYPE_STRING, label=L.LABEL_OPTIONAL)
    val.field.add(name="simple_value", number=2, type=T.TYPE_FLOAT, label=L.LABEL_OPTIONAL)
    summ.field.add(name="value", number=1, type=T.TYPE_MESSAGE, label=L.LABEL_REPEATED,
                   type_name=".tft.Summary.Value")
    ev = f.message_type.add(name="Event")
    ev.field.add(name="wall_time", number=1, type=T.TYPE_DOUBLE, label=L.LABEL_OPTIONAL)
    ev.field.add(name="step", number=2, type=T.TYPE_INT64, label=L.LABEL_OPTIONAL)
    ev.field.add(name="file_version", number=3, type=T.TYPE_STRING, label=L.LABEL_OPTIONAL)
    ev.field.add(name="summary", number=5, type=T.TYPE_MESSAGE, label=L.LABEL_OPTIONAL,
                 type_name=".tft.Summary")
    slog = f.message_type.add(name="SessionLog")
    slog.field.add(name="status", number=1, type=T.TYPE_INT32, label=L.LABEL_OPTIONAL)
    ev.field.add(name="session_log", number=7, type=T.TYPE_MESSAGE, label=L.LABEL_OPTIONAL,
                 type_name=".tft.SessionLog")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tft.Event"))


def _masked(data):
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _read_records(path):
    buf, out = path.read_bytes(), []
    while buf:
        (n,) = struct.unpack("<Q", buf[:8])
        assert struct.unpack("<I", buf[8:12])[0] == _masked(buf[:8])
        data = buf[12:12 + n]
        assert struct.unpack("<I", buf[12 + n:16 + n])[0] == _masked(data)
        out.append(data)
        buf = buf[16 + n:]
    return out


def test_tensorboard_event_file_decodes_with_protobuf(tmp_path):
    with MetricsSink(tmp_path, process_index=0, stream=io.StringIO(), jsonl=False) as sink:
        sink.write(7, {"loss": (3.0, 4), "lr": 1e-3})
        sink.write(8, {"loss": (1.0, 4)})
    (path,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    Event = _event_class()
    events = [Event.FromString(r) for r in _read_records(path)]
    assert events[0].file_version == "brain.Event:2"
    assert [e.step for e in events[1:]] == [7, 8] and events[1].wall_time > 1e9
    assert {v.tag: v.simple_value for v in events[1].summary.value} == \
        {"loss": 0.75, "lr": pytest.approx(1e-3)}
    assert [(v.tag, v.simple_value) for v in events[2].summary.value] == [("loss", 0.25)]


def test_summary_line_format():
    assert format_summary(3, {"a": 0.123456, "tok/s": 12345.6}) == "step 3 | a 0.1235 | tok/s 1.235e+04"


def test_resume_drops_rows_after_the_restored_step_and_a_torn_last_line(tmp_path):
    with MetricsSink(tmp_path, process_index=0, stream=io.StringIO(), tensorboard=False) as sink:
        for step in (0, 1, 2, 3):
            sink.write(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # killed mid-write
    with MetricsSink(tmp_path, process_index=0, stream=io.StringIO(), tensorboard=False,
                     resume_from=1) as sink:
        sink.write(2, {"loss": 20.0})
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(0, 0.0), (1, 1.0), (2, 20.0)]
    assert rewind_jsonl(tmp_path / "metrics.jsonl", 5) == 0 and rewind_jsonl(tmp_path / "absent", 0) == 0
    assert rewind_jsonl(tmp_path / "metrics.jsonl", -1) == 3
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_rewinds_tensorboard_events_and_marks_the_purge_step(tmp_path):
    with MetricsSink(tmp_path, process_index=0, stream=io.StringIO(), jsonl=False) as sink:
        for step in (1, 2, 3):
            sink.write(step, {"loss": float(step)})
    (old,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    with open(old, "ab") as f:
        f.write(b"\x05\x00\x00")  # a torn record from the kill
    with MetricsSink(tmp_path, process_index=0, stream=io.StringIO(), jsonl=False, resume_from=2) as sink:
        sink.write(3, {"loss": 30.0})
    Event = _event_class()
    events = [Event.FromString(r) for p in sorted((tmp_path / "tb").glob("events.out.tfevents.*"))
              for r in _read_records(p)]
    scalars = [(e.step, e.summary.value[0].simple_value) for e in events if e.HasField("summary")]
    assert scalars == [(1, 1.0), (2, 2.0), (3, 30.0)]
    starts = [e.step for e in events if e.HasField("session_log")]
    assert starts == [3] and all(e.session_log.status == 1 for e in events if e.HasField("session_log"))
    # -1 (a fresh run): the old summaries go, and a file left with a header only is removed.
    with MetricsSink(tmp_path, process_index=0, stream=io.StringIO(), jsonl=False, resume_from=-1):
        pass
    events = [Event.FromString(r) for p in (tmp_path / "tb").glob("events.out.tfevents.*")
              for r in _read_records(p)]
    assert not [e for e in events if e.HasField("summary")]


def test_summary_lines_go_through_tqdm_write_so_a_bar_is_redrawn(tmp_path, monkeypatch):
    from topd_jax.train import metrics
    calls = []
    monkeypatch.setattr(metrics.tqdm, "write", lambda s, file=None: calls.append((s, file)))
    stream = io.StringIO()
    with MetricsSink(tmp_path, process_index=0, stream=stream, jsonl=False, tensorboard=False) as sink:
        sink.write(4, {"loss": 0.5})
    assert calls == [("step 4 | loss 0.5", stream)]


class _FakeWandb:
    """Stands in for the ``wandb`` module: records init / log / finish."""

    def __init__(self):
        self.calls = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return self

    def log(self, values, step):
        self.calls.append(("log", dict(values), step))

    def finish(self):
        self.calls.append(("finish",))


def test_wandb_gets_the_reduced_rows_when_on_and_is_not_imported_when_off(tmp_path, monkeypatch):
    import sys
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    init = {"project": "p", "entity": None, "name": "n", "config": {"steps": 2}, "dir": str(tmp_path)}
    with MetricsSink(tmp_path, process_index=0, stream=io.StringIO(), wandb=init) as sink:
        sink.write(1, {"loss": (3.0, 2), "lr": 1e-3})
        sink.write(2, {"loss": (float("nan"), 0)})
    assert fake.calls[0] == ("init", init)
    assert fake.calls[1] == ("log", {"loss": 1.5, "lr": 1e-3}, 1)
    assert fake.calls[2][0] == "log" and fake.calls[2][2] == 2 and math.isnan(fake.calls[2][1]["loss"])
    assert fake.calls[3:] == [("finish",)]
    fake.calls.clear()
    with MetricsSink(tmp_path / "off", process_index=0, stream=io.StringIO()) as sink:  # default: off
        sink.write(1, {"loss": 1.0})
    with MetricsSink(tmp_path / "p1", process_index=1, wandb=init) as sink:  # not process 0
        sink.write(1, {"loss": 1.0})
    assert fake.calls == []


def test_wandb_on_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    from topd_jax.train.metrics import WandbMissingError
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(WandbMissingError, match=r"logging.wandb=true needs the wandb package.*logging.wandb=false"):
        MetricsSink(tmp_path, process_index=0, wandb={"project": "p"})


def test_the_loop_passes_project_entity_name_and_the_config_to_wandb(tmp_path):
    from tests._train_tiny import tiny_config
    from topd_jax.config.loader import to_dict
    from topd_jax.train.loop import wandb_init
    assert wandb_init(tiny_config(tmp_path), tmp_path) is None  # off by default
    cfg = tiny_config(tmp_path, "logging.wandb=true", "logging.wandb_project=topd", "logging.wandb_name=run1")
    assert wandb_init(cfg, tmp_path) == {"project": "topd", "entity": None, "name": "run1",
                                         "config": to_dict(cfg), "dir": str(tmp_path)}


def test_an_unfinished_log_interval_survives_a_checkpoint_as_json():
    """The loop saves the accumulator with each checkpoint: after a resume the interval's
    mean covers the steps before the checkpoint too (logging.every > 1)."""
    acc = PairAccumulator()
    acc.add({"kl": (3.0, 2), "loss": 1.0})
    acc.add({"kl": (float("nan"), 1), "loss": 2.0})
    state = json.loads(json.dumps(acc.get_state(), allow_nan=False))  # strict JSON
    resumed = PairAccumulator()
    resumed.set_state(state)
    resumed.add({"loss": 6.0})
    out = reduce_pairs(resumed.pop())
    assert out["loss"] == 3.0 and math.isnan(out["kl"])
    acc.pop()
    assert acc.get_state() == {}
