"""Runners and timing: each method's compiled step, the ReMoRA merge and the matmul peak, timed call by call.

A runner compiles its program ahead of time (``compile_s``), and ``step()`` runs it once, waits for
the result with ``block_until_ready`` and records the wall time in ``times``;
:func:`run_interleaved` times several runners round-robin so that background load hits them alike.
Beside them: the compiled programs' memory (:func:`peak_memory_bytes`) and XLA FLOPs, the
device's practical matmul peak (:func:`measure_peak_matmul`, :class:`MatmulRunner`) and a one-line
description of the device.
"""

from __future__ import annotations

import math
import os
import pathlib
import platform
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from mora_jax import adapters as adapters_lib
from mora_jax import assembly, sharding
from mora_jax.bench.methods import MethodSpec


def peak_memory_bytes(compiled) -> int | None:
    """Static peak memory of a compiled executable from XLA's buffer assignment, or None.

    ``argument + output − alias + temp`` of ``compiled.memory_analysis()``: every input buffer
    (frozen weights, trainables, optimizer state, batch), every output buffer not written in place
    over a donated input, and the temporaries of the step (activations kept for the backward pass,
    gradients, optimizer intermediates). It is what one call needs live on the device at once;
    it excludes the allocator's overhead, the generated code and arrays the caller holds besides.
    """
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not implemented on some backends
        return None
    if stats is None:
        return None
    try:
        total = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
                 + stats.temp_size_in_bytes)
    except AttributeError:
        return None
    return int(total)


def memory_stats(compiled) -> dict | None:
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if stats is None:
        return None
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")
    return {k.replace("_size_in_bytes", "_bytes"): int(getattr(stats, k, 0)) for k in keys}


def xla_flops(compiled) -> float | None:
    """FLOPs XLA's cost analysis counts for a compiled executable (matmuls and elementwise), or None."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def time_calls(fn: Callable[[], Any], *, repeats: int, warmup: int = 1) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn`` (each waited on with ``block_until_ready``)."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return times


def measure_peak_matmul(dtype="float32", *, size: int = 2048, chain: int = 4, repeats: int = 5) -> dict:
    """The device's practical dense-matmul throughput for ``dtype``: a jitted chain of ``chain``
    ``size × size`` matmuls (:class:`MatmulRunner`), best of ``repeats`` runs after one untimed run.
    Returns ``{"flops": FLOP/s, ...}``."""
    runner = MatmulRunner(dtype, size=size, chain=chain)
    run_interleaved([runner], repeats, warmup=1)
    runner.release()
    return {"flops": runner.flops, "size": size, "chain": chain, "best_s": min(runner.times),
            "median_s": statistics.median(runner.times)}


class MatmulRunner:
    """The peak-matmul chain as a runner, so that it can be timed interleaved with the steps (under
    the same background load); ``flops`` is the best throughput seen."""

    def __init__(self, dtype="float32", *, size: int = 2048, chain: int = 4):
        dtype = jnp.dtype(dtype)
        key_a, key_b = jax.random.split(jax.random.key(0))
        self.a = jax.random.normal(key_a, (size, size), jnp.float32).astype(dtype)
        self.b = (jax.random.normal(key_b, (size, size), jnp.float32) / math.sqrt(size)).astype(dtype)

        def chained(a, b):
            x = a
            for _ in range(chain):
                x = x @ b
            return x

        self.compiled = jax.jit(chained).lower(self.a, self.b).compile()
        self.work = chain * 2.0 * size ** 3
        self.times: list[float] = []

    def step(self, record: bool = True) -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(self.compiled(self.a, self.b))
        dt = time.perf_counter() - t0
        if record:
            self.times.append(dt)
        return dt

    @property
    def flops(self) -> float:
        return self.work / min(self.times)

    def release(self):
        self.a = self.b = self.compiled = None


def device_description() -> str:
    device = jax.devices()[0]
    text = f"{device.platform}:{device.device_kind}"
    if device.platform == "cpu":
        cpu = platform.processor() or ""
        try:
            for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        text += f" ({cpu}, {os.cpu_count()} cores)".replace("(, ", "(")
    return text


def assemble(run) -> assembly.Assembly:
    """``run`` assembled by :func:`mora_jax.assembly.assemble` on one device (the benchmark times one
    device: its model FLOPs utilisation is against that device's matmul peak)."""
    return assembly.assemble(run, devices=jax.local_devices()[:1])


class StepRunner:
    """One method's training step on the benchmark's assembled run, built by
    :func:`mora_jax.assembly.build_steps` and started by :func:`mora_jax.assembly.initial_state` exactly
    as a run of that method builds and starts it (``spec.run_config(base.config)``), its state
    placed on the run's mesh. ``step()`` is one ``steps.train(state, batch)``: the frozen weights
    pass through untouched, the trainables and the optimizer state are donated and updated in place.

    ``compiled`` is the same program compiled ahead of time (``steps.lower_train``), for its memory,
    cost analysis and HLO; JAX caches it, so the first ``step()`` does not compile again.
    """

    def __init__(self, spec: MethodSpec | None, base: assembly.Assembly, params, batch, *, tuned: bool = True):
        """``spec``: the method timed (None: the run's own method, adapter, dropout and all).
        ``base``: the benchmark's run, assembled (model, mesh, layout). ``params``: its base weights.
        ``batch``: this process's rows (numpy or arrays), sharded with ``steps.shard_batch``.
        ``tuned``: ``compiler_options="auto"`` (a run's default:
        :func:`mora_jax.xla_tuning.train_step_compiler_options` for the mesh's platform), else None."""
        self.spec = spec
        config = spec.run_config(base.config) if spec is not None else base.config
        state = assembly.initial_state(params, config, base.layout)
        self.trainable_params = adapters_lib.count_params(state.trainables)
        self.steps = assembly.build_steps(config, base.model, base.mesh, compiler_options="auto" if tuned else None)
        self.compiler_options = self.steps.compiler_options
        self.state = self.steps.place(state)
        self.batch = self.steps.shard_batch(batch)
        t0 = time.perf_counter()
        self.compiled = self.steps.lower_train(self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - t0
        self.times: list[float] = []

    def step(self, record: bool = True) -> float:
        t0 = time.perf_counter()
        self.state, metrics = self.steps.train(self.state, self.batch)
        jax.block_until_ready((self.state.replace(frozen=None), metrics))
        dt = time.perf_counter() - t0
        if record:
            self.times.append(dt)
        self.last_loss = metrics["loss"]
        return dt

    def release(self):
        self.steps = self.state = self.batch = self.compiled = None


class MergeRunner:
    """A ReMoRA merge of the whole model: the same builder's ``steps.merge(state, None)``, timed call by
    call like the step.

    The state owns its frozen weights (a private copy of the placed ones), so every merge donates
    them and writes the merged kernels in place, as a run's merges do once its first merge has
    produced weights of its own (:meth:`mora_jax.steps.Steps.owns_frozen`); ``compiled`` is that
    donating merge compiled ahead of time (``steps.lower_merge``).
    """

    def __init__(self, spec: MethodSpec, base: assembly.Assembly, params):
        self.spec = spec
        config = spec.run_config(base.config)
        state = assembly.initial_state(params, config, base.layout)
        # A non-zero m, as after training (the cost does not depend on the values).
        state = state.replace(trainables={**state.trainables,
                                          "adapters": jax.tree_util.tree_map(lambda x: x + 1e-3, state.adapters)})
        self.steps = assembly.build_steps(config, base.model, base.mesh)
        placed = self.steps.place(state)  # its frozen weights are the caller's: borrowed, never donated
        # Steps tells borrowed weights from owned ones by id(): keep the borrowed arrays alive so that
        # no later array can take one of their ids.
        self._borrowed = (state.frozen, placed.frozen)
        own = sharding.place(placed.frozen, self.steps.state_shardings(placed).frozen)
        self.state = placed.replace(frozen=own)
        if not self.steps.owns_frozen(self.state):
            raise AssertionError("the merge runner's state must own its frozen weights (so the merge donates them)")
        t0 = time.perf_counter()
        self.compiled = self.steps.lower_merge(self.state, None, donate=True).compile()
        self.compile_s = time.perf_counter() - t0
        self.times: list[float] = []

    def step(self, record: bool = True) -> float:
        t0 = time.perf_counter()
        self.state = self.steps.merge(self.state, None)
        jax.block_until_ready(self.state)
        dt = time.perf_counter() - t0
        if record:
            self.times.append(dt)
        return dt

    def release(self):
        self.steps = self.state = self.compiled = self._borrowed = None


def run_interleaved(runners: Sequence, steps: int, warmup: int, interleave: bool = True) -> None:
    """``warmup`` untimed calls of each runner, then ``steps`` timed calls of each: one call of every
    runner per round (``interleave``), or each runner's calls in a row."""
    for runner in runners:
        for _ in range(warmup):
            runner.step(record=False)
    if interleave:
        for _ in range(steps):
            for runner in runners:
                runner.step()
    else:
        for runner in runners:
            for _ in range(steps):
                runner.step()


__all__ = ["MatmulRunner", "assemble", "MergeRunner", "StepRunner", "device_description", "measure_peak_matmul", "memory_stats",
           "peak_memory_bytes", "run_interleaved", "time_calls", "xla_flops"]
