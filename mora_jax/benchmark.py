"""Benchmark harness: step time, model FLOPs utilisation, memory and merge cost of MoRA vs LoRA vs full.

One process, one device, one model, one batch shape: the jitted training step
(:func:`mora_jax.training.train_step`, jitted exactly as :func:`mora_jax.loop.run` does it: frozen
weights passed through, trainables and optimizer state donated) is compiled ahead of time for

* full fine-tuning of the seven projections of every block,
* LoRA at ``r_small`` and ``r_large``,
* MoRA of each type in ``mora_types`` (default 1 and 6) at ``r_small`` and ``r_large``,

then every step is timed with ``block_until_ready`` (compile excluded; ``warmup`` untimed steps
first; the timed steps of all methods are interleaved round-robin so that background load hits
every method alike; the median is reported). A ReMoRA merge of the whole model
(:func:`mora_jax.remora.merge_and_reset`, jitted with the state donated) is timed the same way.

Alongside: the device's practical dense-matmul peak for the same dtype (a chain of large jitted
matmuls, best of several runs), the analytic model FLOPs of each method
(:func:`model_flops_per_step`) and so the MFU, the compiled step's memory (see
:func:`peak_memory_bytes`) and a ``delta_weight`` micro-benchmark against the time to write an
output of the same size. :func:`run_scaling` sweeps tokens, rank and kernel size.

Entry point: ``python -m train.benchmark --config configs/bench_tiny.py --out results.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import platform
import statistics
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mora_jax import adapters as adapters_lib
from mora_jax import ops, optim, remora, training, xla_tuning
from mora_jax.config import LLAMA_TARGETS, FullConfig, LoRAConfig, MoRAConfig
from mora_jax.models.llama import LLAMA_CONFIGS, LlamaConfig, LlamaForCausalLM, count_params, init_params

# The JSON schema (top level, "model", each "results" row, "merge"); other top-level keys are extras.
SCHEMA_TOP = ("device", "dtype", "peak_matmul_flops", "model", "results", "merge")
SCHEMA_MODEL = ("name", "params", "batch", "seq_len")
SCHEMA_ROW = ("method", "r", "mora_type", "step_s", "tokens_per_s", "model_flops_per_step", "mfu", "peak_mem_bytes")
SCHEMA_MERGE = ("step_s", "merge_s")


# ---------------------------------------------------------------------------------------------
# Model FLOPs.
# ---------------------------------------------------------------------------------------------


def llama_kernel_shapes(config: LlamaConfig) -> dict[str, tuple[int, int]]:
    """``{projection: (in_features k, out_features d)}`` of one LLaMA block."""
    D, F = config.hidden_size, config.intermediate_size
    H, N, K = config.resolved_head_dim, config.num_attention_heads, config.resolved_kv_heads
    return {"q_proj": (D, N * H), "k_proj": (D, K * H), "v_proj": (D, K * H), "o_proj": (N * H, D),
            "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}


def mora_chunks_used(in_features: int, out_features: int, r_hat: int) -> int:
    """Type 6: chunks of the (wrap-padded) input whose rotated product reaches the output.

    The input is cut into ``ceil(k/r̂)`` chunks; their products are concatenated and truncated (or
    tiled) to ``d``, so only the first ``ceil(min(d, n·r̂)/r̂)`` chunks matter.
    """
    n = -(-in_features // r_hat)
    return min(n, -(-out_features // r_hat))


def adapter_flops_per_token(k: int, d: int, method: str, r: int, mora_type: int | None = None) -> tuple[float, float]:
    """``(forward, input_gradient)`` matmul FLOPs per token of one adapter on a ``k × d`` kernel.

    LoRA: forward ``x@a`` and ``(xa)@b`` = ``2·r·(k+d)``; backward: ``d(xa) = dy@bᵀ`` and ``∇b`` (``2·r·d``
    each), ``∇a`` (``2·k·r``) and the input gradient ``dx = d(xa)@aᵀ`` (``2·k·r``), so backward =
    2 × forward of which ``2·k·r`` is the input gradient.
    MoRA types 1–4: compression/decompression are sums/copies (no matmul), ``z@m`` = ``2·r̂²``;
    backward ``∇m = zᵀ·du`` and ``dz = du·mᵀ``, one forward's worth each. Type 6: the same per chunk
    that reaches the output (:func:`mora_chunks_used`), ``2·n·r̂²``.
    """
    if method == "lora":
        return 2.0 * r * (k + d), 2.0 * k * r
    if method == "mora":
        r_hat = ops.rank_hat(k, d, r, mora_type)
        n = mora_chunks_used(k, d, r_hat) if mora_type == 6 else 1
        fwd = 2.0 * n * r_hat * r_hat
        return fwd, fwd
    raise ValueError(f"adapter method must be 'lora' or 'mora', got {method!r}")


def flop_breakdown(config: LlamaConfig, batch: int, seq_len: int, method: str, r: int | None = None,
                   mora_type: int | None = None, *, skip_dead_input_grads: bool = True) -> dict[str, float]:
    """Matmul FLOPs of one training step of a LLaMA model, by part (see :func:`model_flops_per_step`)."""
    if method not in ("full", "lora", "mora", "frozen"):
        raise ValueError(f"method must be 'full', 'lora', 'mora' or 'frozen', got {method!r}")
    if method in ("lora", "mora") and not r:
        raise ValueError(f"{method} needs a rank r")
    if method == "mora" and mora_type is None:
        raise ValueError("mora needs a mora_type")
    tokens = batch * seq_len
    L, D, V = config.num_hidden_layers, config.hidden_size, config.vocab_size
    H, N = config.resolved_head_dim, config.num_attention_heads
    shapes = llama_kernel_shapes(config)
    block_params = sum(k * d for k, d in shapes.values())
    matmul_params = L * block_params + D * V  # LM head (or tied embedding.attend) included
    # Layer 0's q/k/v input gradient would flow only into the frozen embeddings: nothing needs it.
    dead = sum(k * d for p, (k, d) in shapes.items() if p in ("q_proj", "k_proj", "v_proj"))
    attention_forward = L * 4.0 * batch * seq_len * seq_len * N * H  # QKᵀ and PV, no causal skipping
    out = {
        "forward": 2.0 * matmul_params * tokens,
        "attention_forward": attention_forward,
        "input_grad": 2.0 * (matmul_params - (dead if skip_dead_input_grads else 0)) * tokens,
        "attention_backward": 2.0 * attention_forward,  # dP, dV, dQ, dK
        "weight_grad": 2.0 * L * block_params * tokens if method == "full" else 0.0,
        "adapter": 0.0,
    }
    if method in ("lora", "mora"):
        per_token = 0.0
        for proj, (k, d) in shapes.items():
            fwd, in_grad = adapter_flops_per_token(k, d, method, r, mora_type)
            per_token += L * 3.0 * fwd
            if skip_dead_input_grads and proj in ("q_proj", "k_proj", "v_proj"):
                per_token -= in_grad
        out["adapter"] = per_token * tokens
    return out


def model_flops_per_step(config: LlamaConfig, batch: int, seq_len: int, method: str, r: int | None = None,
                         mora_type: int | None = None, *, skip_dead_input_grads: bool = True) -> float:
    """The matmul FLOPs one training step of ``method`` really needs (a multiply-add = 2 FLOPs).

    For a LLaMA model with all seven projections of every block adapted (or, for ``"full"``,
    trained), ``tokens = batch·seq_len``, ``P`` = the projections' and LM head's parameters:

    * forward: ``2·P·tokens`` plus attention ``QKᵀ`` and ``PV``: ``4·B·T²·N·H`` per layer (the full
      ``T × T`` product: the implementation masks, it does not skip);
    * backward, every kernel: the input gradient, another ``2·P·tokens``; attention backward is
      twice its forward;
    * backward, trained kernels (``"full"`` only): the weight gradient, another ``2·P_blocks·tokens``
      (the LM head is frozen in every method);
    * adapters (``"lora"``/``"mora"``): their own matmuls, three times the forward
      (:func:`adapter_flops_per_token`): LoRA ``2·tokens·r·(k+d)·3``; MoRA ``2·tokens·r̂²·3`` (types
      1–4) or ``2·tokens·n·r̂²·3`` (type 6, ``n`` chunks reaching the output);
    * ``"frozen"``: the base model alone with every kernel frozen (what any adapter method pays
      before its adapter matmuls), so ``full − frozen`` is exactly the weight-gradient term.

    Embedding lookups, norms, softmax, the loss and the optimizer are not matmuls and not counted.
    With ``skip_dead_input_grads`` (default) the input gradients of layer 0's q/k/v projections
    (kernels and adapters) are not counted: they flow only into the frozen embeddings, and JAX's
    autodiff never computes them. ``False`` gives the plain textbook formula.
    """
    return float(sum(flop_breakdown(config, batch, seq_len, method, r, mora_type,
                                    skip_dead_input_grads=skip_dead_input_grads).values()))


# ---------------------------------------------------------------------------------------------
# Measurement helpers.
# ---------------------------------------------------------------------------------------------


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
    ``size × size`` matmuls, best of ``repeats`` runs. Returns ``{"flops": FLOP/s, ...}``."""
    dtype = jnp.dtype(dtype)
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (size, size), jnp.float32).astype(dtype)
    b = (jax.random.normal(key_b, (size, size), jnp.float32) / math.sqrt(size)).astype(dtype)

    @jax.jit
    def chained(a, b):
        x = a
        for _ in range(chain):
            x = x @ b
        return x

    compiled = chained.lower(a, b).compile()
    times = time_calls(lambda: compiled(a, b), repeats=repeats, warmup=1)
    flops = chain * 2.0 * size ** 3
    return {"flops": flops / min(times), "size": size, "chain": chain, "best_s": min(times),
            "median_s": statistics.median(times)}


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


# ---------------------------------------------------------------------------------------------
# Methods and their jitted steps.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    method: str  # "full", "lora" or "mora"
    r: int | None = None
    mora_type: int | None = None

    @property
    def label(self) -> str:
        if self.method == "full":
            return "full"
        if self.method == "lora":
            return f"lora r={self.r}"
        return f"mora{self.mora_type} r={self.r}"

    def adapter_config(self, alpha: float = 16.0):
        if self.method == "full":
            return FullConfig(targets=(LLAMA_TARGETS,))
        if self.method == "lora":
            return LoRAConfig(r=self.r, alpha=alpha, targets=(LLAMA_TARGETS,))
        return MoRAConfig(r=self.r, mora_type=self.mora_type, targets=(LLAMA_TARGETS,))


def method_specs(r_values: Sequence[int], mora_types: Sequence[int], include_full: bool = True) -> list[MethodSpec]:
    specs = [MethodSpec("full")] if include_full else []
    for r in r_values:
        specs.append(MethodSpec("lora", r))
        specs += [MethodSpec("mora", r, t) for t in mora_types]
    return specs


def llama_config_from(config) -> tuple[str, LlamaConfig]:
    """``(name, LlamaConfig)`` from a benchmark config: the preset with dtype and overrides applied."""
    name = config.model
    if name not in LLAMA_CONFIGS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(LLAMA_CONFIGS)}")
    overrides = config.get("model_overrides", None) or {}
    overrides = dict(overrides.to_dict() if hasattr(overrides, "to_dict") else overrides)
    if int(config.get("num_layers", 0) or 0):
        overrides["num_hidden_layers"] = int(config.num_layers)
    param_dtype = config.get("param_dtype", "") or config.dtype
    cfg = LLAMA_CONFIGS[name].replace(dtype=config.dtype, param_dtype=param_dtype,
                                      scan_layers=bool(config.get("scan_layers", False)),
                                      remat_policy=config.get("remat_policy", "none"), **overrides)
    if overrides:
        name += "(" + ",".join(f"{k}={v}" for k, v in sorted(overrides.items())) + ")"
    return name, cfg


def make_batch(llama_config: LlamaConfig, batch: int, seq_len: int, seed: int = 0) -> dict:
    ids = np.random.default_rng(seed).integers(0, llama_config.vocab_size, (batch, seq_len))
    ids = jnp.asarray(ids, jnp.int32)
    return {"input_ids": ids, "loss_mask": jnp.ones_like(ids)}


def _without_frozen(out):
    new_state, metrics = out
    return new_state.replace(frozen=None), metrics


class StepRunner:
    """One method's compiled training step and its state, as :func:`mora_jax.loop.run` jits it:
    ``jit(step, donate_argnums=1)(frozen, state_without_frozen, batch)`` (frozen weights pass
    through untouched; trainables and optimizer state are updated in place)."""

    def __init__(self, spec: MethodSpec, model, params, batch, *, seed: int = 0, lr: float = 1e-4,
                 layout=None, step_config: training.StepConfig = training.StepConfig(), tuned: bool = True):
        """``tuned``: compile with :func:`mora_jax.xla_tuning.train_step_compiler_options`, as the loop does."""
        self.spec = spec
        self.compiler_options = xla_tuning.train_step_compiler_options() if tuned else None
        adapter_config = spec.adapter_config()
        rng = jax.random.key(seed)
        adapters = adapters_lib.init_adapters(params, adapter_config, jax.random.fold_in(rng, 1), layout=layout)
        self.tx = optim.adamw(lr, clip_norm=None)  # clipping is global over both groups, in the step
        state = training.create_train_state(params, adapters, adapter_config, self.tx, jax.random.fold_in(rng, 2))
        self.trainable_params = adapters_lib.count_params(state.trainables)
        schedule = optax.constant_schedule(lr)
        tx = self.tx
        jitted = jax.jit(
            lambda frozen, rest, b: _without_frozen(training.train_step(
                rest.replace(frozen=frozen), b, model=model, tx=tx, schedule=schedule, step_config=step_config)),
            donate_argnums=1, compiler_options=self.compiler_options)
        self.frozen = state.frozen
        self.rest = state.replace(frozen=None)
        self.batch = batch
        t0 = time.perf_counter()
        self.compiled = jitted.lower(self.frozen, self.rest, batch).compile()
        self.compile_s = time.perf_counter() - t0
        self.times: list[float] = []

    def step(self, record: bool = True) -> float:
        t0 = time.perf_counter()
        self.rest, metrics = self.compiled(self.frozen, self.rest, self.batch)
        jax.block_until_ready((self.rest, metrics))
        dt = time.perf_counter() - t0
        if record:
            self.times.append(dt)
        self.last_loss = metrics["loss"]
        return dt

    def release(self):
        self.frozen = self.rest = self.compiled = None


class MergeRunner:
    """``jit(merge_and_reset, donate_argnums=0)`` on a MoRA state whose frozen weights are a private
    copy (so donation merges in place), timed call by call like the step."""

    def __init__(self, spec: MethodSpec, params, *, seed: int = 0, layout=None):
        self.spec = spec
        adapter_config = spec.adapter_config()
        rng = jax.random.key(seed)
        own_params = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), params)
        adapters = adapters_lib.init_adapters(own_params, adapter_config, jax.random.fold_in(rng, 1), layout=layout)
        # A non-zero m, as after training (the cost does not depend on the values).
        adapters = jax.tree_util.tree_map(lambda x: x + 1e-3, adapters)
        tx = optim.adamw(1e-4, clip_norm=None)
        self.state = training.create_train_state(own_params, adapters, adapter_config, tx, jax.random.fold_in(rng, 2))
        merge = jax.jit(lambda s: remora.merge_and_reset(s, tx=tx, next_type=None), donate_argnums=0)
        t0 = time.perf_counter()
        self.compiled = merge.lower(self.state).compile()
        self.compile_s = time.perf_counter() - t0
        self.times: list[float] = []

    def step(self, record: bool = True) -> float:
        t0 = time.perf_counter()
        self.state = self.compiled(self.state)
        jax.block_until_ready(self.state)
        dt = time.perf_counter() - t0
        if record:
            self.times.append(dt)
        return dt

    def release(self):
        self.state = self.compiled = None


def _interleaved(runners: Sequence, steps: int, warmup: int, interleave: bool = True) -> None:
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


# ---------------------------------------------------------------------------------------------
# delta_weight micro-benchmark.
# ---------------------------------------------------------------------------------------------


def delta_weight_benchmark(in_features: int, out_features: int, r: int, mora_types: Iterable[int], *,
                           repeats: int = 5, seed: int = 0) -> dict:
    """``delta_weight`` (float32 ``k × d``) of each type versus writing an output of the same size.

    Baselines: ``fill`` (``jnp.full((k, d), s)``: write only) and ``copy`` (``x + 1``: read and
    write). ``ratio_to_fill`` = median ``delta_weight`` time / median fill time (1 = as fast as
    writing the output). Also ``merge_s``: ``K + ΔK`` into a donated ``K`` (one kernel's merge).
    """
    k, d = int(in_features), int(out_features)
    out: dict[str, Any] = {"in_features": k, "out_features": d, "r": int(r), "bytes": 4 * k * d}
    fill = jax.jit(lambda s: jnp.full((k, d), s, jnp.float32)).lower(jnp.float32(1.0)).compile()
    out["fill_s"] = statistics.median(time_calls(lambda: fill(jnp.float32(1.0)), repeats=repeats))
    x = jnp.ones((k, d), jnp.float32)
    copy = jax.jit(lambda x: x + 1.0).lower(x).compile()
    out["copy_s"] = statistics.median(time_calls(lambda: copy(x), repeats=repeats))
    rows = []
    for t in mora_types:
        r_hat = ops.rank_hat(k, d, r, t)
        m = jax.random.normal(jax.random.key(seed), (r_hat, r_hat), jnp.float32) * 0.01
        fn = jax.jit(functools.partial(ops.delta_weight, in_features=k, out_features=d, mora_type=t))
        compiled = fn.lower(m).compile()
        dw = statistics.median(time_calls(lambda: compiled(m), repeats=repeats))
        merge_fn = jax.jit(lambda K, m, t=t: ops.merge_into(K, m, in_features=k, out_features=d, mora_type=t),
                           donate_argnums=0)
        kernel = [jnp.zeros((k, d), jnp.float32)]
        merge_compiled = merge_fn.lower(kernel[0], m).compile()

        def merge_once():
            kernel[0] = merge_compiled(kernel[0], m)
            return kernel[0]

        merge_s = statistics.median(time_calls(merge_once, repeats=repeats))
        rows.append({"mora_type": int(t), "r_hat": r_hat, "delta_weight_s": dw, "ratio_to_fill": dw / out["fill_s"],
                     "ratio_to_copy": dw / out["copy_s"], "merge_s": merge_s,
                     "merge_ratio_to_copy": merge_s / out["copy_s"]})
        del kernel
    out["types"] = rows
    return out


# ---------------------------------------------------------------------------------------------
# The benchmark.
# ---------------------------------------------------------------------------------------------


def _median(times: Sequence[float]) -> float:
    return float(statistics.median(times))


def run_benchmark(config, *, log: Callable[[str], None] = print) -> dict:
    """Run the whole benchmark described by ``config`` (see ``configs/bench_*.py``); returns the
    result dict (the JSON schema in the module docstring of ``train/benchmark.py``)."""
    name, llama_config = llama_config_from(config)
    model = LlamaForCausalLM(llama_config)
    batch_size, seq_len = int(config.batch), int(config.seq_len)
    tokens = batch_size * seq_len
    r_values = tuple(dict.fromkeys((int(config.r_small), int(config.r_large))))
    mora_types = tuple(int(t) for t in config.mora_types)
    log(f"device: {device_description()}; model {name}, batch {batch_size} x seq {seq_len}, {config.dtype}")

    peak = measure_peak_matmul(config.dtype, size=int(config.matmul_size), chain=int(config.matmul_chain),
                               repeats=int(config.matmul_repeats))
    log(f"peak matmul ({config.matmul_size}^3 x{config.matmul_chain}, {config.dtype}): {peak['flops'] / 1e9:.1f} GFLOP/s")

    params = init_params(llama_config, jax.random.key(int(config.seed)))
    layout = None
    if llama_config.scan_layers:
        layout = adapters_lib.dense_layout(model, jnp.zeros((1, 8), jnp.int32))
    n_params = count_params(params)
    batch = make_batch(llama_config, batch_size, seq_len, int(config.seed))

    specs = method_specs(r_values, mora_types)
    runners = []
    for spec in specs:
        runner = StepRunner(spec, model, params, batch, seed=int(config.seed), lr=float(config.lr), layout=layout)
        log(f"compiled {spec.label:<14} in {runner.compile_s:6.1f} s")
        runners.append(runner)
    # Ablation: the small-rank adapter steps compiled without mora_jax.xla_tuning's options.
    untuned = []
    if config.get("xla_tuning_ablation", False) and xla_tuning.train_step_compiler_options() is not None:
        for spec in specs:
            if spec.method != "full" and spec.r == int(config.r_small):
                untuned.append(StepRunner(spec, model, params, batch, seed=int(config.seed), lr=float(config.lr),
                                          layout=layout, tuned=False))
                log(f"compiled {spec.label:<14} without XLA tuning in {untuned[-1].compile_s:6.1f} s")
    merge_spec = MethodSpec("mora", int(config.merge_r or config.r_large), int(config.merge_type))
    merger = MergeRunner(merge_spec, params, seed=int(config.seed), layout=layout)
    log(f"compiled merge ({merge_spec.label}) in {merger.compile_s:6.1f} s")

    # The matmul chain also runs once per round, so the peak is measured under the same load as the steps.
    matmul = MatmulRunner(config.dtype, size=int(config.matmul_size), chain=int(config.matmul_chain))
    _interleaved([*runners, *untuned, merger, matmul], int(config.steps), int(config.warmup), bool(config.get("interleave", True)))
    peak["flops_interleaved"] = matmul.flops
    peak["flops_before"] = peak["flops"]
    peak["flops"] = max(peak["flops"], matmul.flops)
    log(f"peak matmul, best over the run: {peak['flops'] / 1e9:.1f} GFLOP/s")

    results, details = [], []
    for runner in runners:
        spec = runner.spec
        step_s = _median(runner.times)
        flops = model_flops_per_step(llama_config, batch_size, seq_len, spec.method, spec.r, spec.mora_type)
        results.append({
            "method": spec.method, "r": spec.r, "mora_type": spec.mora_type, "step_s": step_s,
            "tokens_per_s": tokens / step_s, "model_flops_per_step": flops,
            "mfu": flops / step_s / peak["flops"], "peak_mem_bytes": peak_memory_bytes(runner.compiled),
        })
        details.append({
            "label": spec.label, "step_s_min": min(runner.times), "step_s_all": runner.times,
            "compile_s": runner.compile_s, "trainable_params": runner.trainable_params,
            "xla_flops": xla_flops(runner.compiled), "memory": memory_stats(runner.compiled),
            "flops": flop_breakdown(llama_config, batch_size, seq_len, spec.method, spec.r, spec.mora_type),
            "loss": float(runner.last_loss),
        })
    step_for_merge = next(row["step_s"] for row in results
                          if row["method"] == "mora" and row["r"] == merge_spec.r and row["mora_type"] == merge_spec.mora_type)
    merge_s = _median(merger.times)
    merge = {"step_s": step_for_merge, "merge_s": merge_s}
    merge_details = {"method": "mora", "r": merge_spec.r, "mora_type": merge_spec.mora_type,
                     "merge_s_all": merger.times, "compile_s": merger.compile_s,
                     "peak_mem_bytes": peak_memory_bytes(merger.compiled), "memory": memory_stats(merger.compiled),
                     "kernels": sum(math.prod(a.m.shape[:-2]) for a in adapters_lib.flatten(merger.state.adapters).values()),
                     "merge_over_step": merge_s / step_for_merge}
    tuned_step = {runner.spec: _median(runner.times) for runner in runners}
    tuning = {"compiler_options": xla_tuning.train_step_compiler_options(), "ablation": [
        {"label": r.spec.label, "method": r.spec.method, "r": r.spec.r, "mora_type": r.spec.mora_type,
         "step_s_tuned": tuned_step[r.spec], "step_s_untuned": _median(r.times),
         "tuned_over_untuned": tuned_step[r.spec] / _median(r.times), "step_s_untuned_all": r.times}
        for r in untuned]}
    for runner in [*runners, *untuned, merger, matmul]:
        runner.release()

    out = {
        "device": device_description(),
        "dtype": str(jnp.dtype(config.dtype).name),
        "peak_matmul_flops": float(peak["flops"]),
        "model": {"name": name, "params": int(n_params), "batch": batch_size, "seq_len": seq_len},
        "results": results,
        "merge": merge,
        "ratios": ratios(results),
        "details": details,
        "merge_details": merge_details,
        "peak_matmul": peak,
        "xla_tuning": tuning,
        "settings": {"steps": int(config.steps), "warmup": int(config.warmup),
                     "interleave": bool(config.get("interleave", True)), "jax": jax.__version__,
                     "peak_mem_bytes": "argument + output - alias + temp of compiled.memory_analysis()",
                     "xla_flops": "compiled.cost_analysis()['flops'] (matmuls and elementwise); with scan_layers "
                                  "XLA counts the scanned layer body once"},
    }
    dw = config.get("delta_weight")
    if dw is not None and dw.get("enabled", True):
        out["delta_weight"] = delta_weight_benchmark(int(dw.in_features), int(dw.out_features), int(dw.r),
                                                     tuple(dw.mora_types), repeats=int(dw.repeats))
        log("delta_weight " + ", ".join(
            f"type {row['mora_type']}: {row['delta_weight_s'] * 1e3:.1f} ms ({row['ratio_to_fill']:.2f}x fill)"
            for row in out["delta_weight"]["types"]) + f"; fill {out['delta_weight']['fill_s'] * 1e3:.1f} ms")
    out["targets"] = check_targets(out)
    return out


def ratios(results: Sequence[Mapping]) -> dict:
    """Step-time and memory ratios: ``mora{t}_r{r}/lora_r{r}`` and ``mora{t}_r{r}/full``, ``lora_r{r}/full``."""
    full = next((row for row in results if row["method"] == "full"), None)
    lora = {row["r"]: row for row in results if row["method"] == "lora"}
    out: dict[str, dict] = {"step": {}, "memory": {}}

    def add(name, a, b):
        out["step"][name] = a["step_s"] / b["step_s"]
        if a["peak_mem_bytes"] and b["peak_mem_bytes"]:
            out["memory"][name] = a["peak_mem_bytes"] / b["peak_mem_bytes"]

    for row in results:
        if row["method"] == "mora":
            tag = f"mora{row['mora_type']}_r{row['r']}"
            if row["r"] in lora:
                add(f"{tag}/lora_r{row['r']}", row, lora[row["r"]])
            if full is not None:
                add(f"{tag}/full", row, full)
        elif row["method"] == "lora" and full is not None:
            add(f"lora_r{row['r']}/full", row, full)
    return out


def check_targets(result: Mapping) -> dict:
    """The performance targets of the benchmark issue, each ``{"value", "limit", "met"}``."""
    rows = result["results"]
    full = next(row for row in rows if row["method"] == "full")
    lora = {row["r"]: row for row in rows if row["method"] == "lora"}
    targets: dict[str, dict] = {}

    def put(name, value, limit, le=True):
        if value is None:
            targets[name] = {"value": None, "limit": limit, "met": None}
        else:
            targets[name] = {"value": value, "limit": limit, "met": bool(value <= limit if le else value >= limit)}

    for row in rows:
        if row["method"] != "mora":
            continue
        tag = f"mora{row['mora_type']}_r{row['r']}"
        put(f"a: {tag} step / lora step", row["step_s"] / lora[row["r"]]["step_s"], 1.05)
        put(f"b: {tag} step / full step", row["step_s"] / full["step_s"], 0.70)
        put(f"c: {tag} mfu", row["mfu"], 0.70, le=False)
        mem = (row["peak_mem_bytes"] / full["peak_mem_bytes"]
               if row["peak_mem_bytes"] and full["peak_mem_bytes"] else None)
        put(f"d: {tag} memory / full memory", mem, 0.45)
    put("e: merge / step", result["merge"]["merge_s"] / result["merge"]["step_s"], 0.5)
    if "delta_weight" in result:
        for row in result["delta_weight"]["types"]:
            put(f"e: delta_weight type {row['mora_type']} / output write", row["ratio_to_fill"], 2.0)
    for row in result.get("peer_comparison", []):
        tag = "full" if row["method"] == "full" else (
            f"lora_r{row['r']}" if row["method"] == "lora" else f"mora{row['mora_type']}_r{row['r']}")
        put(f"f: {tag} tokens/s / PyTorch's", row["speedup"], 1.2, le=False)
    return targets


# ---------------------------------------------------------------------------------------------
# Reports.
# ---------------------------------------------------------------------------------------------


def _fmt_bytes(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB"


def results_table(result: Mapping, markdown: bool = False) -> str:
    """The results as a table (plain text, or markdown)."""
    header = ["method", "r", "type", "step s", "tokens/s", "GFLOP/step", "MFU", "peak mem", "vs LoRA", "vs full"]
    ratio = result.get("ratios", {}).get("step", {})
    lines = []
    for row in result["results"]:
        tag = f"mora{row['mora_type']}_r{row['r']}"
        vs_lora = ratio.get(f"{tag}/lora_r{row['r']}")
        vs_full = ratio.get(f"{tag}/full") if row["method"] == "mora" else ratio.get(f"lora_r{row['r']}/full")
        lines.append([row["method"], "-" if row["r"] is None else str(row["r"]),
                      "-" if row["mora_type"] is None else str(row["mora_type"]),
                      f"{row['step_s']:.4f}", f"{row['tokens_per_s']:,.0f}", f"{row['model_flops_per_step'] / 1e9:.2f}",
                      f"{100 * row['mfu']:.1f}%", _fmt_bytes(row["peak_mem_bytes"]),
                      "-" if vs_lora is None else f"{vs_lora:.2f}x", "-" if vs_full is None else f"{vs_full:.2f}x"])
    return _table(header, lines, markdown)


def _table(header, lines, markdown: bool) -> str:
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = lambda row: "  ".join(str(x).rjust(w) for x, w in zip(row, widths))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def report(result: Mapping, markdown: bool = False) -> str:
    """Header, results table, merge, delta_weight and targets as text (or markdown)."""
    m = result["model"]
    parts = [f"{'**' if markdown else ''}{m['name']}{'**' if markdown else ''}: {m['params']:,} parameters, "
             f"batch {m['batch']} x seq {m['seq_len']}, {result['dtype']}, on {result['device']}; "
             f"measured matmul peak {result['peak_matmul_flops'] / 1e9:.1f} GFLOP/s",
             "", results_table(result, markdown), ""]
    md = result.get("merge_details", {})
    parts.append(f"ReMoRA merge of the whole model (mora{md.get('mora_type')} r={md.get('r')}, "
                 f"{md.get('kernels')} kernels): {result['merge']['merge_s']:.4f} s = "
                 f"{result['merge']['merge_s'] / result['merge']['step_s']:.2f}x its training step "
                 f"({result['merge']['step_s']:.4f} s)")
    if "delta_weight" in result:
        dw = result["delta_weight"]
        parts += ["", f"delta_weight {dw['in_features']}x{dw['out_features']} r={dw['r']} (float32, "
                  f"{dw['bytes'] / 2**20:.0f} MiB): write-only fill {dw['fill_s'] * 1e3:.1f} ms, "
                  f"read+write copy {dw['copy_s'] * 1e3:.1f} ms", ""]
        header = ["type", "r_hat", "delta_weight ms", "/ fill", "/ copy", "K+dK (donated) ms", "/ copy"]
        lines = [[str(row["mora_type"]), str(row["r_hat"]), f"{row['delta_weight_s'] * 1e3:.1f}",
                  f"{row['ratio_to_fill']:.2f}x", f"{row['ratio_to_copy']:.2f}x", f"{row['merge_s'] * 1e3:.1f}",
                  f"{row['merge_ratio_to_copy']:.2f}x"] for row in dw["types"]]
        parts.append(_table(header, lines, markdown))
    tuning = result.get("xla_tuning") or {}
    if tuning.get("ablation"):
        parts += ["", f"XLA tuning ({tuning['compiler_options']}), same steps compiled without it:", ""]
        header = ["method", "step s tuned", "step s untuned", "tuned / untuned"]
        lines = [[row["label"], f"{row['step_s_tuned']:.4f}", f"{row['step_s_untuned']:.4f}",
                  f"{row['tuned_over_untuned']:.2f}x"] for row in tuning["ablation"]]
        parts.append(_table(header, lines, markdown))
    if result.get("targets"):
        parts += ["", "targets:" if not markdown else "Targets:", ""]
        header = ["target", "value", "limit", "met"]
        lines = [[name, "n/a" if t["value"] is None else f"{t['value']:.3f}", f"{t['limit']}",
                  {True: "yes", False: "NO", None: "n/a"}[t["met"]]] for name, t in result["targets"].items()]
        parts.append(_table(header, lines, markdown))
    if result.get("peer"):
        parts += ["", "PyTorch peer (HF transformers + PEFT, same CPU):", ""]
        header = ["framework", "method", "r", "type", "step s", "tokens/s", "MFU", "MFU vs torch matmul peak"]
        lines = [[p["framework"], p["method"], "-" if p["r"] is None else str(p["r"]),
                  "-" if p.get("mora_type") is None else str(p["mora_type"]), f"{p['step_s']:.4f}",
                  f"{p['tokens_per_s']:,.0f}", f"{100 * p['mfu']:.1f}%",
                  f"{100 * p.get('mfu_vs_torch_peak', float('nan')):.1f}% of {p.get('torch_peak_matmul_flops', 0) / 1e9:.0f} GFLOP/s"]
                 for p in result["peer"]]
        parts.append(_table(header, lines, markdown))
    if result.get("peer_comparison"):
        parts += ["", "mora-jax vs PyTorch, same method (tokens/s):", ""]
        header = ["method", "r", "type", "mora-jax", "PyTorch", "speed-up"]
        lines = [[c["method"], "-" if c["r"] is None else str(c["r"]), "-" if c["mora_type"] is None else str(c["mora_type"]),
                  f"{c['tokens_per_s']:,.0f}", f"{c['peer_tokens_per_s']:,.0f}", f"{c['speedup']:.2f}x"]
                 for c in result["peer_comparison"]]
        parts.append(_table(header, lines, markdown))
    return "\n".join(parts)


def validate_schema(result: Mapping) -> None:
    """Raise ``ValueError`` unless ``result`` has the benchmark JSON schema's keys and types."""
    missing = [k for k in SCHEMA_TOP if k not in result]
    if missing:
        raise ValueError(f"missing top-level keys {missing}")
    if set(result["model"]) != set(SCHEMA_MODEL):
        raise ValueError(f"model keys {sorted(result['model'])} != {sorted(SCHEMA_MODEL)}")
    if set(result["merge"]) != set(SCHEMA_MERGE):
        raise ValueError(f"merge keys {sorted(result['merge'])} != {sorted(SCHEMA_MERGE)}")
    for row in result["results"]:
        if set(row) != set(SCHEMA_ROW):
            raise ValueError(f"result row keys {sorted(row)} != {sorted(SCHEMA_ROW)}")
        if row["method"] not in ("full", "lora", "mora"):
            raise ValueError(f"unknown method {row['method']!r}")


def write_json(result: Mapping, path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Scaling study.
# ---------------------------------------------------------------------------------------------


def _row(point: Mapping, llama_config, batch_size: int, seq_len: int, peak_flops: float) -> dict:
    spec = point["spec"]
    step_s = _median(point["times"])
    flops = model_flops_per_step(llama_config, batch_size, seq_len, spec.method, spec.r, spec.mora_type)
    return {"method": spec.method, "r": spec.r, "mora_type": spec.mora_type, "batch": batch_size,
            "seq_len": seq_len, "tokens": batch_size * seq_len, "step_s": step_s, "step_s_min": min(point["times"]),
            "tokens_per_s": batch_size * seq_len / step_s, "model_flops_per_step": flops,
            "mfu": flops / step_s / peak_flops, "peak_mem_bytes": point["peak_mem_bytes"]}


def run_scaling(config, *, log: Callable[[str], None] = print) -> dict:
    """Step time versus tokens (sequence length, batch) and rank, and merge time versus kernel size.

    Each sweep compiles all its points first and then times them interleaved round-robin (with the
    matmul peak in the rotation), like :func:`run_benchmark`, so the ratios within a sweep are
    measured under the same load; a point shared by several sweeps (the base batch x seq_len at
    r_small) is timed again in each.
    """
    sc = config.scaling
    name, llama_config = llama_config_from(config)
    model = LlamaForCausalLM(llama_config)
    seed, lr = int(config.seed), float(config.lr)
    steps, warmup = int(sc.steps), int(sc.warmup)
    params = init_params(llama_config, jax.random.key(seed))
    layout = adapters_lib.dense_layout(model, jnp.zeros((1, 8), jnp.int32)) if llama_config.scan_layers else None
    matmul = MatmulRunner(config.dtype, size=int(config.matmul_size), chain=int(config.matmul_chain))
    token_specs = [MethodSpec("full"), MethodSpec("lora", int(config.r_small)),
                   *(MethodSpec("mora", int(config.r_small), int(t)) for t in config.mora_types)]
    base_b, base_t = int(config.batch), int(config.seq_len)
    def sweep(title, points):
        log(title)
        done: dict = {}  # (spec, batch, seq_len) -> {"spec", "times", "peak_mem_bytes"}
        runners = []
        for spec, b, t in points:
            if (spec, b, t) in done:
                continue
            runner = StepRunner(spec, model, params, make_batch(llama_config, b, t, seed), seed=seed, lr=lr, layout=layout)
            runner.point = (b, t)
            runners.append(runner)
        _interleaved([*runners, matmul], steps, warmup)
        for runner in runners:
            done[(runner.spec, *runner.point)] = {"spec": runner.spec, "times": runner.times,
                                                  "peak_mem_bytes": peak_memory_bytes(runner.compiled)}
            log(f"  {runner.spec.label:<14} batch {runner.point[0]:>3} seq {runner.point[1]:>5}: "
                f"{_median(runner.times):.4f} s")
            runner.release()
        return [(done[spec, b, t], b, t) for spec, b, t in points]

    raw_seq = sweep("step time vs sequence length", [(s, base_b, int(t)) for t in sc.seq_lens for s in token_specs])
    raw_batch = sweep("step time vs batch", [(s, int(b), base_t) for b in sc.batches for s in token_specs])
    rank_points = [(MethodSpec("full"), base_b, base_t)]
    for r in sc.ranks:
        rank_points.append((MethodSpec("lora", int(r)), base_b, base_t))
        rank_points += [(MethodSpec("mora", int(r), int(t)), base_b, base_t) for t in config.mora_types]
    raw_rank = sweep("step time vs rank", rank_points)
    peak_flops = matmul.flops
    log(f"matmul peak (best, interleaved): {peak_flops / 1e9:.1f} GFLOP/s")
    vs_seq, vs_batch, vs_rank = ([_row(point, llama_config, b, t, peak_flops) for point, b, t in raw]
                                 for raw in (raw_seq, raw_batch, raw_rank))
    log("delta_weight vs kernel size")
    vs_kernel = []
    for k, d in sc.kernel_sizes:
        row = delta_weight_benchmark(int(k), int(d), int(sc.merge_r), tuple(config.mora_types), repeats=int(sc.repeats))
        vs_kernel.append(row)
        log(f"  {k}x{d}: fill {row['fill_s'] * 1e3:.2f} ms; " + ", ".join(
            f"type {x['mora_type']} {x['delta_weight_s'] * 1e3:.2f} ms ({x['ratio_to_fill']:.2f}x)" for x in row["types"]))
    return {"device": device_description(), "dtype": jnp.dtype(config.dtype).name,
            "peak_matmul_flops": peak_flops,
            "model": {"name": name, "params": count_params(params), "batch": base_b, "seq_len": base_t},
            "settings": {"steps": steps, "warmup": warmup, "jax": jax.__version__, "interleaved": True},
            "vs_seq_len": vs_seq, "vs_batch": vs_batch, "vs_rank": vs_rank, "vs_kernel_size": vs_kernel}


def _label(row) -> str:
    return MethodSpec(row["method"], row["r"], row["mora_type"]).label


def scaling_markdown(scaling: Mapping) -> str:
    m = scaling["model"]
    out = [f"Scaling study: **{m['name']}** ({m['params']:,} parameters), {scaling['dtype']}, on {scaling['device']}; "
           f"matmul peak {scaling['peak_matmul_flops'] / 1e9:.1f} GFLOP/s; median of {scaling['settings']['steps']} steps.", ""]
    for key, title in (("vs_seq_len", "Step time (s) vs sequence length (batch %d)" % m["batch"]),
                       ("vs_batch", "Step time (s) vs batch (seq_len %d)" % m["seq_len"])):
        rows = scaling[key]
        labels = list(dict.fromkeys(_label(r) for r in rows))
        xs = list(dict.fromkeys((r["batch"], r["seq_len"]) for r in rows))
        header = ["batch x seq (tokens)"] + labels + [f"{lbl} MFU" for lbl in labels]
        lines = []
        for b, t in xs:
            cell = {_label(r): r for r in rows if (r["batch"], r["seq_len"]) == (b, t)}
            lines.append([f"{b} x {t} ({b * t})"] + [f"{cell[l]['step_s']:.4f}" for l in labels]
                         + [f"{100 * cell[l]['mfu']:.1f}%" for l in labels])
        out += [f"**{title}**", "", _table(header, lines, True), ""]
    rows = scaling["vs_rank"]
    full = next(r for r in rows if r["method"] == "full")
    ranks = sorted({r["r"] for r in rows if r["r"]})
    types = sorted({r["mora_type"] for r in rows if r["mora_type"]})
    header = ["r", "lora s"] + [f"mora{t} s" for t in types] + [f"mora{t}/lora" for t in types] + [f"mora{t}/full" for t in types]
    lines = []
    for r in ranks:
        lora = next(x for x in rows if x["method"] == "lora" and x["r"] == r)
        mora = {x["mora_type"]: x for x in rows if x["method"] == "mora" and x["r"] == r}
        lines.append([str(r), f"{lora['step_s']:.4f}"] + [f"{mora[t]['step_s']:.4f}" for t in types]
                     + [f"{mora[t]['step_s'] / lora['step_s']:.2f}" for t in types]
                     + [f"{mora[t]['step_s'] / full['step_s']:.2f}" for t in types])
    out += [f"**Step time vs rank** (full fine-tuning: {full['step_s']:.4f} s)", "", _table(header, lines, True), ""]
    header = ["k x d", "MiB", "fill ms", "copy ms"] + [
        f"type {t['mora_type']} {h}" for t in scaling["vs_kernel_size"][0]["types"] for h in ("ms", "/ fill")]
    lines = []
    for row in scaling["vs_kernel_size"]:
        lines.append([f"{row['in_features']}x{row['out_features']}", f"{row['bytes'] / 2**20:.1f}",
                      f"{row['fill_s'] * 1e3:.2f}", f"{row['copy_s'] * 1e3:.2f}"]
                     + [v for t in row["types"] for v in (f"{t['delta_weight_s'] * 1e3:.2f}", f"{t['ratio_to_fill']:.2f}x")])
    out += ["**delta_weight (merge) time vs kernel size** (r=%d)" % scaling["vs_kernel_size"][0]["r"], "",
            _table(header, lines, True), ""]
    return "\n".join(out)


def plot_scaling(scaling: Mapping, path) -> pathlib.Path:
    """Three panels: step time vs tokens, vs rank, and delta_weight time vs kernel size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    rows = scaling["vs_seq_len"] + scaling["vs_batch"]
    for label in dict.fromkeys(_label(r) for r in rows):
        for key, style in (("vs_seq_len", "-o"), ("vs_batch", "--s")):
            pts = sorted((r["tokens"], r["step_s"]) for r in scaling[key] if _label(r) == label)
            ax.plot(*zip(*pts), style, label=f"{label} ({'seq' if key == 'vs_seq_len' else 'batch'})")
    ax.set(xscale="log", yscale="log", xlabel="tokens per step", ylabel="step time (s)", title="Step time vs tokens")
    ax.legend(fontsize=7)
    ax = axes[1]
    rows = scaling["vs_rank"]
    full = next(r for r in rows if r["method"] == "full")
    for label_of in sorted({(r["method"], r["mora_type"]) for r in rows if r["method"] != "full"}, key=str):
        pts = sorted((r["r"], r["step_s"]) for r in rows if (r["method"], r["mora_type"]) == label_of)
        ax.plot(*zip(*pts), "-o", label=label_of[0] + (str(label_of[1]) if label_of[1] else ""))
    ax.axhline(full["step_s"], color="k", ls=":", label="full")
    ax.set(xscale="log", xlabel="r", ylabel="step time (s)", title="Step time vs rank")
    ax.legend(fontsize=8)
    ax = axes[2]
    rows = scaling["vs_kernel_size"]
    elems = [r["in_features"] * r["out_features"] for r in rows]
    ax.plot(elems, [r["fill_s"] for r in rows], "k:o", label="write output (fill)")
    ax.plot(elems, [r["copy_s"] for r in rows], "k--o", label="copy (read+write)")
    for i, t in enumerate(rows[0]["types"]):
        ax.plot(elems, [r["types"][i]["delta_weight_s"] for r in rows], "-o", label=f"delta_weight type {t['mora_type']}")
    ax.set(xscale="log", yscale="log", xlabel="kernel elements k*d", ylabel="time (s)", title="delta_weight vs kernel size")
    ax.legend(fontsize=8)
    fig.suptitle(f"{scaling['model']['name']} on {scaling['device']} ({scaling['dtype']})", fontsize=9)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = [
    "MethodSpec",
    "adapter_flops_per_token",
    "check_targets",
    "delta_weight_benchmark",
    "flop_breakdown",
    "llama_kernel_shapes",
    "measure_peak_matmul",
    "model_flops_per_step",
    "peak_memory_bytes",
    "plot_scaling",
    "report",
    "results_table",
    "run_benchmark",
    "run_scaling",
    "scaling_markdown",
    "validate_schema",
    "write_json",
]
