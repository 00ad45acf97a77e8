"""metrics.jsonl on resume: truncated back to the restored step, a partial last line (a kill during a
write) dropped, no step written twice; non-finite metrics stop the flush."""

import json

import numpy as np
import pytest

from mora_jax.metrics import MetricsWriter, NonFiniteMetrics


def _steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_resume_truncates_to_the_restored_step_and_drops_a_partial_line(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False)
    for step in range(1, 11):
        writer.write(step, {"loss": 1.0 / step})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "lo')  # killed in the middle of a write
    with pytest.raises(json.JSONDecodeError):
        _steps(tmp_path / "metrics.jsonl")

    writer = MetricsWriter(tmp_path, resume_step=8, tensorboard=False)  # the checkpoint was step 8
    assert _steps(tmp_path / "metrics.jsonl") == list(range(1, 9))
    for step in range(9, 13):  # the resumed run logs 9.. again
        writer.write(step, {"loss": 1.0 / step})
    writer.close()
    steps = _steps(tmp_path / "metrics.jsonl")
    assert steps == list(range(1, 13)) and len(set(steps)) == len(steps)
    assert [row["step"] for row in writer.history()] == steps


def test_a_fresh_start_keeps_no_old_rows(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 3, "loss": 1.0}\n{"step": 4')
    writer = MetricsWriter(tmp_path, resume_step=0, tensorboard=False)
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    writer.close()


def test_flush_refuses_non_finite_metrics(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False)
    finite = {"loss": np.float32(2.0), "grad_norm": np.float32(1.0), "trainables_norm": np.float32(3.0),
              "tokens": np.float32(8), "learning_rate": np.float32(1e-3)}
    writer.add(1, finite)
    writer.add(2, {**finite, "trainables_norm": np.float32(np.inf)})
    with pytest.raises(NonFiniteMetrics, match="trainables_norm became inf at step 2"):
        writer.flush(2)
    writer.close()
    assert not (tmp_path / "metrics.jsonl").exists() or _steps(tmp_path / "metrics.jsonl") == []


def test_throughput_leaves_out_compiling_steps_and_untimed_work(tmp_path, monkeypatch):
    """tokens_per_s counts the loss tokens, positions_per_s every position of the batches; a step
    added with timed=False (it compiled) and the time spent in untimed() (callbacks such as the
    accuracy evaluation, even when they write a line from inside) are left out of both."""
    clock = [100.0]
    monkeypatch.setattr("mora_jax.metrics.time.perf_counter", lambda: clock[0])
    writer = MetricsWriter(tmp_path, tensorboard=False)
    metrics = {"loss": np.float32(2.0), "grad_norm": np.float32(1.0), "tokens": np.float32(16),
               "learning_rate": np.float32(1e-3)}
    with writer.untimed():
        clock[0] += 30.0  # the first step compiles
    writer.add(1, metrics, positions=512, timed=False)
    writer.flush(1)  # only a compiling step since the clock started: no throughput to report
    for step in (2, 3):
        clock[0] += 2.0
        writer.add(step, metrics, positions=512)
    with writer.untimed():
        clock[0] += 50.0  # a callback generating answers...
        writer.flush(3)  # ...that writes its line from inside
        clock[0] += 7.0
    clock[0] += 2.0
    writer.add(4, metrics, positions=512)
    writer.flush(4)
    writer.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "tokens_per_s" not in rows[0] and "positions_per_s" not in rows[0]
    assert rows[1]["tokens_per_s"] == pytest.approx(32 / 4.0) and rows[1]["positions_per_s"] == pytest.approx(1024 / 4.0)
    assert rows[2]["tokens_per_s"] == pytest.approx(16 / 2.0) and rows[2]["positions_per_s"] == pytest.approx(512 / 2.0)
