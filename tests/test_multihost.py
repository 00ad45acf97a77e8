"""Multi-process training on one machine: two JAX processes × 4 CPU devices, joined by
``mora_jax.distributed.initialize`` over 127.0.0.1 (gloo collectives), must train exactly like
one process with 8 devices (tests/multihost_worker.py does the training)."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")
REPO = WORKER.parent.parent
TIMEOUT_S = 240
# Cheaper CPU code generation: the three workers compile on two cores; numerics are unchanged
# in kind and all three runs use the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _gloo_available() -> bool:
    """Whether this jaxlib was built with gloo CPU collectives (the cross-process transport on CPU)."""
    try:
        from jax._src.lib import _jax as extension
    except ImportError:
        try:
            from jax._src.lib import xla_extension as extension  # jaxlib < 0.6
        except ImportError:
            return False
    return hasattr(extension, "make_gloo_tcp_collectives")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: pathlib.Path, devices: int, extra_args=()) -> subprocess.Popen:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.Popen(
        [sys.executable, str(WORKER), "--out", str(out), *extra_args],
        env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _wait_all(procs: dict[str, subprocess.Popen]) -> dict[str, str]:
    """Wait for every process (killing all of them if one hangs past the timeout); their outputs."""
    outputs = {}
    try:
        for name, proc in procs.items():
            outputs[name] = proc.communicate(timeout=TIMEOUT_S)[0]
    except subprocess.TimeoutExpired:
        for proc in procs.values():
            proc.kill()
        logs = {name: proc.communicate()[0][-3000:] for name, proc in procs.items()}
        pytest.fail(f"multi-process run did not finish within {TIMEOUT_S} s; outputs:\n{logs}")
    failed = {name: outputs[name][-3000:] for name, proc in procs.items() if proc.returncode != 0}
    assert not failed, f"worker(s) failed: {failed}"
    return outputs


@pytest.mark.multiprocess
@pytest.mark.skipif(not _gloo_available(), reason="this jaxlib has no gloo CPU collectives, needed for multi-process CPU runs")
def test_two_processes_train_like_one(tmp_path):
    port = _free_port()
    procs = {
        "single": _launch(tmp_path / "single.json", devices=8),
        **{
            f"process{i}": _launch(
                tmp_path / f"process{i}.json", devices=4,
                extra_args=("--num-processes", "2", "--process-id", str(i), "--coordinator", f"127.0.0.1:{port}"),
            )
            for i in range(2)
        },
    }
    _wait_all(procs)
    results = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in procs}

    single, p0, p1 = results["single"], results["process0"], results["process1"]
    assert (single["process_count"], single["global_devices"]) == (1, 8)
    for i, r in enumerate((p0, p1)):
        assert (r["process_index"], r["process_count"], r["global_devices"], r["local_devices"]) == (i, 2, 8, 4)
    # each process fed its own half of the global batch of 8 rows
    assert single["rows"] == [0, 8] and sorted([p0["rows"], p1["rows"]]) == [[0, 4], [4, 8]]
    # parameters are sharded across the processes: 4 local shards of an fsdp × tensor split
    assert p0["q_proj_spec"] == single["q_proj_spec"] == ["fsdp", "tensor"]
    assert p0["q_proj_local_shard_shapes"] == [[32, 32]] * 4

    assert len(single["losses"]) == 3
    np.testing.assert_allclose(p0["losses"], single["losses"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(p1["losses"], p0["losses"], rtol=0, atol=0)  # replicated metrics agree exactly
    np.testing.assert_allclose(p0["trainables_abs_sum"], single["trainables_abs_sum"], rtol=1e-5)
    assert len(set(single["losses"])) == 3  # the steps ran on different batches and updated the state


def test_process_batch_slice_single_process():
    """With one process, this process feeds every row, with or without a batch sharding."""
    from mora_jax import distributed
    from mora_jax import mesh as mesh_lib
    from mora_jax import sharding as shd

    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(("data", "fsdp", "tensor"), (2, 2, 2)))
    assert distributed.process_batch_slice(8) == slice(0, 8)
    assert distributed.process_batch_slice(8, shd.batch_sharding(mesh)) == slice(0, 8)
