"""The pretraining entry point as two processes × 4 CPU devices (127.0.0.1, gloo) trains exactly like
one process with 8 devices: the same losses and evaluations, each process reading only its own shard
of the corpus, ReMoRA merges and checkpoints on the way, an exact resume of both processes from a
checkpoint, and one merged Hugging Face export, gathered from parameters sharded across both
processes, that loads with the same logits."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from mora_jax import data as data_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 900
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
SEQ_LEN = 64  # configs/c4_pretrain.py:tiny


def _gloo_available() -> bool:
    try:
        from jax._src.lib import _jax as extension
    except ImportError:
        return False
    return hasattr(extension, "make_gloo_tcp_collectives")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_row_documents(tokenizer, lines, count: int) -> list[str]:
    """Documents of exactly SEQ_LEN tokens with their EOS, so that each fills one packed row: then
    a global batch holds the same documents however the corpus is split over processes (process p
    reads documents p, p + P, ...), and one process and two must compute the same losses."""
    docs, words = [], []
    for line in lines:
        words += line.split()
        for n in range(1, len(words) + 1):
            length = len(tokenizer.encode(" ".join(words[:n]))) + 1
            if length == SEQ_LEN:
                docs.append(" ".join(words[:n]))
                words = words[n:]
                break
            if length > SEQ_LEN:  # no prefix fits exactly: start afresh
                words = words[n:]
                break
        if len(docs) == count:
            return docs
    raise AssertionError(f"only {len(docs)} documents of {SEQ_LEN} tokens")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    data_lib.write_synthetic_corpus(d / "train_tok.txt", 1500, seed=0)
    data_lib.train_tokenizer(str(d / "train_tok.txt"), str(d / "tok"), vocab_size=512)
    tokenizer = data_lib.Tokenizer(str(d / "tok.model"))
    lines = list(data_lib.synthetic_corpus_lines(3000, seed=2))
    docs = _one_row_documents(tokenizer, lines, 112)
    (d / "corpus.txt").write_text("\n".join(docs[:96]) + "\n")  # 12 global batches of 8 rows (10 are read)
    # 15 held-out documents: one batch of 8 for one process; 8 + 7 documents, so 2 batches and 1, for two
    # processes, which must both stop after one (the same 8 documents)
    (d / "corpus_eval.txt").write_text("\n".join(docs[96:111]) + "\n")
    return d


def _launch(corpus, workdir, devices: int, extra=(), log=None) -> subprocess.Popen:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}",
               PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    args = [
        "--config=configs/c4_pretrain.py:tiny", f"--config.workdir={workdir}",
        f"--config.data.source={corpus / 'corpus.txt'}", f"--config.data.eval_source={corpus / 'corpus_eval.txt'}",
        f"--config.data.tokenizer={corpus / 'tok.model'}", "--config.train.progress=False",
        "--config.train.steps=10", "--config.train.log_every=1", "--config.train.eval_every=4",
        "--config.remora.every=3", "--config.checkpoint.every=4", "--config.train.eval_batches=0",
        # parameters sharded over all 8 devices of both processes: the export must gather them
        "--config.mesh.data=1", "--config.mesh.fsdp=-1",
    ]
    return subprocess.Popen([sys.executable, "-m", "train.pretrain", *args, *extra], env=env, cwd=str(REPO),
                            stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _metrics(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _documents_read(output: str) -> int:
    match = re.search(r"pretraining data: (\d+) documents", output)
    assert match, output[-2000:]
    return int(match.group(1))


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(not _gloo_available(), reason="this jaxlib has no gloo CPU collectives")
def test_pretraining_entry_point_on_two_processes_equals_one(corpus, tmp_path):
    def two_processes():
        port = _free_port()
        return {f"process{i}": _launch(corpus, tmp_path / "multi", devices=4,
                                       extra=(f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                              f"--process_id={i}"))
                for i in range(2)}

    outputs = _wait({"single": _launch(corpus, tmp_path / "single", devices=8), **two_processes()})
    single, multi = _metrics(tmp_path / "single"), _metrics(tmp_path / "multi")
    assert [s for s, _ in _losses(single)] == list(range(1, 11))
    assert [s for s, _ in _losses(multi)] == list(range(1, 11))
    np.testing.assert_allclose([v for _, v in _losses(multi)], [v for _, v in _losses(single)], rtol=0, atol=2e-5)
    np.testing.assert_allclose([v for _, v in _evals(multi)], [v for _, v in _evals(single)], rtol=0, atol=2e-5)
    assert [s for s, _ in _evals(single)] == [4, 8, 10]
    assert _merges(multi) == _merges(single) == [(3, 2), (6, 3), (9, 4)]
    assert len({round(v, 6) for _, v in _losses(single)}) == 10  # the steps trained on different batches

    # each process read only its own half of the documents (single: 10 steps × 8 rows; each process: × 4)
    assert _documents_read(outputs["single"]) == 80 and _documents_read(outputs["process0"]) == 40
    assert "pretraining data" not in outputs["process1"]  # process 0 alone reports and writes
    checkpoints = tmp_path / "multi" / "checkpoints"
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [4, 8, 10]

    # both processes resume exactly from step 8, each from its own position in its shard
    shutil.rmtree(checkpoints / "10")
    shutil.rmtree(tmp_path / "multi" / "export")
    outputs = _wait(two_processes())
    assert all("resumed from step 8" in out for out in outputs.values()), outputs["process1"][-2000:]
    resumed = {s: v for s, v in _losses(_metrics(tmp_path / "multi"))}
    np.testing.assert_allclose([resumed[9], resumed[10]], [dict(_losses(single))[s] for s in (9, 10)], rtol=0, atol=2e-5)

    # the merged export, gathered from fsdp-sharded parameters across both processes, equals one process's
    import jax.numpy as jnp

    from mora_jax import hf

    ids = jnp.asarray(np.arange(64).reshape(2, 32) % 500, jnp.int32)
    logits = {}
    for name in ("single", "multi"):
        export = tmp_path / name / "export"
        assert (export / "adapter" / "adapter_config.json").exists()
        model, params = hf.load_llama(export / "merged")
        logits[name] = np.asarray(model.apply({"params": params}, ids))
    np.testing.assert_allclose(logits["multi"], logits["single"], rtol=0, atol=5e-5)


def _two_processes(corpus, workdir, extra=(), logs=(None, None)) -> dict[str, subprocess.Popen]:
    port = _free_port()
    return {f"process{i}": _launch(corpus, workdir, devices=4,
                                   extra=(f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                          f"--process_id={i}", *extra), log=logs[i])
            for i in range(2)}


def _communicate(procs: dict[str, subprocess.Popen], timeout: float) -> dict[str, str]:
    try:
        return {name: proc.communicate(timeout=timeout)[0] for name, proc in procs.items()}
    except subprocess.TimeoutExpired:  # before the processes agreed, one waited in a step forever
        for proc in procs.values():
            proc.kill()
        pytest.fail(f"hung: { {n: p.communicate()[0][-1500:] for n, p in procs.items()} }")


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(not _gloo_available(), reason="this jaxlib has no gloo CPU collectives")
def test_processes_stop_together_when_one_shard_ends_first_or_one_is_terminated(corpus, tmp_path):
    # 23 documents of one row each, one pass: process 0 reads 12 (3 batches of 4 rows), process 1 reads 11
    docs = (corpus / "corpus.txt").read_text().splitlines()[:23]
    (tmp_path / "short.txt").write_text("\n".join(docs) + "\n")
    finite = ("--config.data.num_epochs=1", f"--config.data.source={tmp_path / 'short.txt'}",
              "--config.train.steps=50", "--config.train.eval_every=0", "--config.data.eval_source=")
    procs = _two_processes(corpus, tmp_path / "finite", finite)
    outputs = _communicate(procs, timeout=600)
    assert all(p.returncode == 0 for p in procs.values()), {n: o[-1500:] for n, o in outputs.items()}
    stops = {name: re.search(r"data exhausted after (\d+) steps", out) for name, out in outputs.items()}
    assert all(stops.values()), {n: o[-1500:] for n, o in outputs.items()}
    assert {m.group(1) for m in stops.values()} == {"2"}  # the same step on both: process 1 has 2 whole batches
    assert "on another process" in outputs["process0"] and "on another process" not in outputs["process1"]

    # SIGTERM to process 1 alone: both save the same step and exit (their output goes to files: a pipe
    # nobody reads while we wait for the steps would fill up and stop them)
    logs = [open(tmp_path / f"term{i}.log", "w") for i in range(2)]
    procs = _two_processes(corpus, tmp_path / "term", ("--config.train.steps=400", "--config.train.eval_every=0",
                                                       "--config.data.eval_source=", "--config.remora.every=0"),
                           logs=logs)
    metrics = tmp_path / "term" / "metrics.jsonl"
    deadline = time.monotonic() + 600
    def steps_logged() -> int:
        try:
            return len(_losses(_metrics(tmp_path / "term"))) if metrics.exists() else 0
        except json.JSONDecodeError:  # a line being written
            return 0

    while steps_logged() < 3:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs.values()), \
            [(tmp_path / f"term{i}.log").read_text()[-1500:] for i in range(2)]
        time.sleep(0.5)
    procs["process1"].send_signal(signal.SIGTERM)
    _communicate(procs, timeout=600)
    for log in logs:
        log.close()
    outputs = {f"process{i}": (tmp_path / f"term{i}.log").read_text() for i in range(2)}
    assert all(p.returncode == 0 for p in procs.values()), {n: o[-1500:] for n, o in outputs.items()}
    saved = {name: re.search(r"SIGTERM: saving a checkpoint at step (\d+)", out) for name, out in outputs.items()}
    assert all(saved.values()) and len({m.group(1) for m in saved.values()}) == 1, outputs
    assert "received by another process" in outputs["process0"]
    step = saved["process0"].group(1)
    assert (tmp_path / "term" / "checkpoints" / step).is_dir()
    assert all(f"preempted (resume by running the same command) at step {step}" in out for out in outputs.values())


def _wait(procs: dict[str, subprocess.Popen]) -> dict[str, str]:
    outputs = {}
    try:
        for name, proc in procs.items():
            outputs[name] = proc.communicate(timeout=TIMEOUT_S)[0]
    except subprocess.TimeoutExpired:
        for proc in procs.values():
            proc.kill()
        pytest.fail(f"not finished in {TIMEOUT_S} s: { {n: p.communicate()[0][-2000:] for n, p in procs.items()} }")
    failed = {n: outputs[n][-3000:] for n, p in procs.items() if p.returncode != 0}
    assert not failed, failed
    for name in procs:
        assert "finished at step 10" in outputs[name], outputs[name][-2000:]
    return outputs


def _losses(rows):
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _evals(rows):
    return [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]


def _merges(rows):
    return [(r["step"], r.get("mora_type")) for r in rows if r.get("remora_merge")]


# ---- start-up and per-process state, in this (single) process -------------------------------------------
def test_initialize_is_a_no_op_for_one_process(monkeypatch):
    from mora_jax import distributed

    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.detect_cluster() is None  # not a TPU pod, SLURM, MPI or Kubernetes job
    assert distributed.initialize() is False
    assert distributed.initialize(num_processes=1) is False
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    assert distributed.initialize() is False


def test_initialize_names_what_a_multi_process_run_is_missing(monkeypatch):
    from mora_jax import distributed

    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=r"missing: coordinator address, process id.*--coordinator_address"):
        distributed.initialize(num_processes=2)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    with pytest.raises(ValueError, match=r"process_id=2 is not in \[0, num_processes=2\)"):
        distributed.initialize("127.0.0.1:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' is not an integer"):
        distributed.initialize()


def test_per_process_data_states_round_trip_and_refuse_another_process_count():
    from mora_jax import distributed

    state = {"epoch": 1, "records_read": 7}
    assert distributed.gather_process_states(state) == state  # one process: as is
    assert distributed.own_process_state(state) == state
    with pytest.raises(ValueError, match="written by 2 processes, this run has 1.*resume with 2 processes"):
        distributed.own_process_state({"per_process": [state, state]})
    assert distributed.own_process_state({"per_process": [state]}) == state
