"""The benchmark: step time, model FLOPs utilisation, memory and merge cost of MoRA vs LoRA vs full.

One process, one device, one model, one batch shape: the training step that the loop runs
(:func:`mora_jax.steps.build_steps`, see :class:`mora_jax.bench.runners.StepRunner`) is compiled
ahead of time for

* full fine-tuning of the seven projections of every block,
* LoRA at ``r_small`` and ``r_large``,
* MoRA of each type in ``mora_types`` (default 1 and 6) at ``r_small`` and ``r_large``,
* the PEFT family of ``peft_methods`` (DoRA, PiSSA, HiRA; default none) at ``r_small``,

then every step is timed with ``block_until_ready`` (compile excluded; ``warmup`` untimed steps
first; the timed steps of all methods are interleaved round-robin so that background load hits
every method alike; the median is reported). A ReMoRA merge of the whole model (the same
builder's merge, with the state and its frozen weights donated) is timed the same way.

Alongside: the device's practical dense-matmul peak for the same dtype (a chain of large jitted
matmuls, best of several runs), the analytic model FLOPs of each method
(:func:`mora_jax.flops.model_flops_per_step`) and so the MFU, the compiled step's memory
(:func:`mora_jax.bench.runners.peak_memory_bytes`) and a ``delta_weight`` micro-benchmark against
the time to write an output of the same size. :func:`run_scaling` sweeps tokens, rank and kernel
size. :mod:`mora_jax.bench.report` renders the results.

The benchmark's run (model, mesh, layout, base weights) is assembled from the config's run part by
:func:`mora_jax.assembly.assemble`, and every method's steps and state are built from that run with
the method's adapter (:class:`mora_jax.bench.runners.StepRunner`): a ``configs/bench_*.py`` file is a
run config plus a ``benchmark`` section (:mod:`mora_jax.bench.config`).

Entry point: ``python -m train.benchmark --config configs/bench_tiny.py --out results.json``.
"""

from __future__ import annotations

import functools
import math
import statistics
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp

from mora_jax import adapters as adapters_lib
from mora_jax import ops
from mora_jax.bench import peer as peer_lib
from mora_jax.bench.config import BenchConfig
from mora_jax.bench.methods import MethodSpec, make_batch, method_specs, model_name, row_spec
from mora_jax.bench.runners import (
    MatmulRunner,
    MergeRunner,
    StepRunner,
    assemble,
    device_description,
    measure_peak_matmul,
    memory_stats,
    peak_memory_bytes,
    run_interleaved,
    time_calls,
    xla_flops,
)
from mora_jax.flops import flop_breakdown, model_flops_per_step
from mora_jax.models.params import count_params


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

def _median(times: Sequence[float]) -> float:
    return float(statistics.median(times))


def run_benchmark(config, *, with_peer: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run the whole benchmark described by ``config`` (a ``configs/bench_*.py`` ConfigDict or a
    :class:`~mora_jax.bench.config.BenchConfig`); returns the result dict (the JSON schema in the
    module docstring of ``train/benchmark.py``).

    ``with_peer``: also time the same methods in PyTorch (:mod:`mora_jax.bench.peer`), in the same
    rotation as mora-jax's steps (so background load hits both frameworks alike), with PyTorch's own
    matmul peak; and, with ``benchmark.peer.generation``, generation in both frameworks."""
    bench = BenchConfig.from_config(config)
    run = bench.run
    base = assemble(run)
    llama_config, name = base.model_config, model_name(run)
    batch_size, seq_len, seed, dtype = run.train.batch_size, run.train.seq_len, run.seed, run.model.dtype
    tokens = batch_size * seq_len
    log(f"device: {device_description()}; model {name}, batch {batch_size} x seq {seq_len}, {dtype}")

    peak = measure_peak_matmul(dtype, size=bench.matmul_size, chain=bench.matmul_chain, repeats=bench.matmul_repeats)
    log(f"peak matmul ({bench.matmul_size}^3 x{bench.matmul_chain}, {dtype}): {peak['flops'] / 1e9:.1f} GFLOP/s")

    params = base.load_params()
    n_params = count_params(params)
    batch = make_batch(llama_config, batch_size, seq_len, seed)

    specs = method_specs(bench.ranks, bench.mora_types, include_full=bench.full, peft_methods=bench.peft_methods)
    runners = []
    for spec in specs:
        runner = StepRunner(spec, base, params, batch)
        log(f"compiled {spec.label:<14} in {runner.compile_s:6.1f} s")
        runners.append(runner)
    # Ablation: the small-rank adapter steps compiled without mora_jax.xla_tuning's options.
    untuned = []
    tuned_options = runners[0].compiler_options  # what "auto" chose for this platform (None: nothing to ablate)
    if bench.xla_tuning_ablation and tuned_options is not None:
        for spec in specs:
            if spec.method in ("lora", "mora") and spec.r == bench.r_small:
                untuned.append(StepRunner(spec, base, params, batch, tuned=False))
                log(f"compiled {spec.label:<14} without XLA tuning in {untuned[-1].compile_s:6.1f} s")
    merge_spec = MethodSpec("mora", bench.merge_r or bench.r_large, bench.merge_type)
    merger = MergeRunner(merge_spec, base, params)
    log(f"compiled merge ({merge_spec.label}) in {merger.compile_s:6.1f} s")
    torch_models = torch_matmul = None
    torch_steps = []
    if with_peer:
        torch_models = peer_lib.TorchModels(llama_config, dtype=dtype, attention=bench.peer.attention,
                                            threads=bench.peer.threads, seed=seed)
        torch_matmul, torch_steps = peer_lib.peer_runners(bench, torch_models, batch, log=log)

    # The matmul chain also runs once per round, so the peak is measured under the same load as the steps.
    matmul = MatmulRunner(dtype, size=bench.matmul_size, chain=bench.matmul_chain)
    peer_rotation = [torch_matmul, *torch_steps] if with_peer else []
    run_interleaved([*runners, *untuned, merger, matmul, *peer_rotation], bench.steps, bench.warmup, bench.interleave)
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
    # the merge against its own MoRA step (or LoRA's at that rank when that MoRA is not timed)
    step_for_merge = next(row["step_s"] for row in sorted(results, key=lambda row: row["method"] != "mora")
                          if row["r"] == merge_spec.r and row["mora_type"] in (merge_spec.mora_type, None))
    merge_s = _median(merger.times)
    merge = {"step_s": step_for_merge, "merge_s": merge_s}
    merge_details = {"method": "mora", "r": merge_spec.r, "mora_type": merge_spec.mora_type,
                     "merge_s_all": merger.times, "compile_s": merger.compile_s,
                     "peak_mem_bytes": peak_memory_bytes(merger.compiled), "memory": memory_stats(merger.compiled),
                     "kernels": sum(math.prod(a.m.shape[:-2]) for a in adapters_lib.flatten(merger.state.adapters).values()),
                     "merge_over_step": merge_s / step_for_merge}
    tuned_step = {runner.spec: _median(runner.times) for runner in runners}
    tuning = {"compiler_options": tuned_options, "ablation": [
        {"label": r.spec.label, "method": r.spec.method, "r": r.spec.r, "mora_type": r.spec.mora_type,
         "step_s_tuned": tuned_step[r.spec], "step_s_untuned": _median(r.times),
         "tuned_over_untuned": tuned_step[r.spec] / _median(r.times), "step_s_untuned_all": r.times}
        for r in untuned]}
    peer_rows = peer_lib.peer_rows(bench, llama_config, torch_matmul, torch_steps, peak["flops"]) if with_peer else []
    for runner in [*runners, *untuned, merger, matmul, *peer_rotation]:
        runner.release()

    out = {
        "device": device_description(),
        "dtype": str(jnp.dtype(dtype).name),
        "peak_matmul_flops": float(peak["flops"]),
        "model": {"name": name, "params": int(n_params), "batch": batch_size, "seq_len": seq_len},
        "results": results,
        "merge": merge,
        "ratios": ratios(results),
        "details": details,
        "merge_details": merge_details,
        "peak_matmul": peak,
        "xla_tuning": tuning,
        "settings": {"steps": bench.steps, "warmup": bench.warmup, "interleave": bench.interleave, "jax": jax.__version__,
                     "run": run.to_dict(),
                     "peak_mem_bytes": "argument + output - alias + temp of compiled.memory_analysis()",
                     "xla_flops": "compiled.cost_analysis()['flops'] (matmuls and elementwise); with scan_layers "
                                  "XLA counts the scanned layer body once"},
    }
    if with_peer:
        out["peer"] = peer_rows
        out["peer_comparison"] = peer_lib.peer_comparison(out)
        if bench.peer.generation:
            out["peer_generation"] = peer_lib.generation_comparison(bench, base.model, params, torch_models, log=log)
    dw = bench.delta_weight
    if dw.enabled:
        out["delta_weight"] = delta_weight_benchmark(dw.in_features, dw.out_features, dw.r, dw.mora_types,
                                                     repeats=dw.repeats)
        log("delta_weight " + ", ".join(
            f"type {row['mora_type']}: {row['delta_weight_s'] * 1e3:.1f} ms ({row['ratio_to_fill']:.2f}x fill)"
            for row in out["delta_weight"]["types"]) + f"; fill {out['delta_weight']['fill_s'] * 1e3:.1f} ms")
    out["targets"] = check_targets(out)
    for name, t in out["targets"].items():
        if name.startswith("h:") and "flop_floor" in t:
            log(f"{name}: FLOP floor {t['flop_floor']:.3f} (flops.model_flops_per_step), limit {t['limit']:.3f}")
    return out


def ratios(results: Sequence[Mapping]) -> dict:
    """Step-time and memory ratios: ``{tag}/lora_r{r}`` of each adapter method but LoRA (``mora6_r8``,
    ``dora_r8``, ...: :attr:`MethodSpec.tag`) and ``{tag}/full`` of each, LoRA's included."""
    full = next((row for row in results if row["method"] == "full"), None)
    lora = {row["r"]: row for row in results if row["method"] == "lora"}
    out: dict[str, dict] = {"step": {}, "memory": {}}

    def add(name, a, b):
        out["step"][name] = a["step_s"] / b["step_s"]
        if a["peak_mem_bytes"] and b["peak_mem_bytes"]:
            out["memory"][name] = a["peak_mem_bytes"] / b["peak_mem_bytes"]

    for row in results:
        if row["method"] == "full":
            continue
        tag = row_spec(row).tag
        if row["method"] != "lora" and row["r"] in lora:
            add(f"{tag}/lora_r{row['r']}", row, lora[row["r"]])
        if full is not None:
            add(f"{tag}/full", row, full)
    return out


def check_targets(result: Mapping) -> dict:
    """The performance targets of the benchmark issue, each ``{"value", "limit", "met"}``."""
    rows = result["results"]
    full = next((row for row in rows if row["method"] == "full"), None)
    lora = {row["r"]: row for row in rows if row["method"] == "lora"}
    targets: dict[str, dict] = {}

    def put(name, value, limit, le=True) -> dict:
        if value is None:
            targets[name] = {"value": None, "limit": limit, "met": None}
        else:
            targets[name] = {"value": value, "limit": limit, "met": bool(value <= limit if le else value >= limit)}
        return targets[name]

    for row in rows:
        if row["method"] != "mora":
            continue
        tag = f"mora{row['mora_type']}_r{row['r']}"
        put(f"a: {tag} step / lora step", row["step_s"] / lora[row["r"]]["step_s"], 1.05)
        if full is not None:
            put(f"b: {tag} step / full step", row["step_s"] / full["step_s"], 0.70)
        put(f"c: {tag} mfu", row["mfu"], 0.70, le=False)
        if full is not None:
            mem = (row["peak_mem_bytes"] / full["peak_mem_bytes"]
                   if row["peak_mem_bytes"] and full["peak_mem_bytes"] else None)
            put(f"d: {tag} memory / full memory", mem, 0.45)
    _peft_family_targets(result, lora, put)
    put("e: merge / step", result["merge"]["merge_s"] / result["merge"]["step_s"], 0.5)
    if "delta_weight" in result:
        for row in result["delta_weight"]["types"]:
            put(f"e: delta_weight type {row['mora_type']} / output write", row["ratio_to_fill"], 2.0)
    for row in result.get("peer_comparison", []):
        tag = row_spec(row).tag
        put(f"f: {tag} tokens/s / PyTorch's", row["speedup"], 1.2, le=False)
        if row["method"] in ("lora", "mora") and row.get("step_over_peft_lora") is not None:
            put(f"g: {tag} step / PyTorch PEFT lora_r{row['r']} step", row["step_over_peft_lora"], 1.0)
    return targets


# The PEFT family's step-time goals against LoRA at the same rank (issue 20): DoRA's absolute; PiSSA is
# LoRA at run time (the limit is noise); HiRA's relative to its own FLOP floor.
PEFT_STEP_LIMITS = {"dora": 1.25, "pissa": 1.05, "hira": 1.05}


def _peft_family_targets(result: Mapping, lora: Mapping[int, Mapping], put) -> None:
    """``h: {tag} step / lora step`` of each DoRA, PiSSA and HiRA row (:data:`PEFT_STEP_LIMITS`). HiRA's
    limit is 1.05 × its FLOP floor, ``model_flops_per_step`` of HiRA over LoRA's (recorded as
    ``flop_floor``): its A/B gradients need each kernel's dense ``xᵀ·dy``."""
    for row in result["results"]:
        if row["method"] not in PEFT_STEP_LIMITS or row["r"] not in lora:
            continue
        base = lora[row["r"]]
        name = f"h: {row_spec(row).tag} step / lora step"
        limit = PEFT_STEP_LIMITS[row["method"]]
        if row["method"] == "hira":
            floor = row["model_flops_per_step"] / base["model_flops_per_step"]
            put(name, row["step_s"] / base["step_s"], limit * floor)["flop_floor"] = floor
        else:
            put(name, row["step_s"] / base["step_s"], limit)


def _row(point: Mapping, llama_config, batch_size: int, seq_len: int, peak_flops: float) -> dict:
    spec = point["spec"]
    step_s = _median(point["times"])
    flops = model_flops_per_step(llama_config, batch_size, seq_len, spec.method, spec.r, spec.mora_type)
    return {"method": spec.method, "r": spec.r, "mora_type": spec.mora_type, "batch": batch_size,
            "seq_len": seq_len, "tokens": batch_size * seq_len, "step_s": step_s, "step_s_min": min(point["times"]),
            "tokens_per_s": batch_size * seq_len / step_s, "model_flops_per_step": flops,
            "mfu": flops / step_s / peak_flops, "peak_mem_bytes": point["peak_mem_bytes"]}


def run_scaling(config, *, log: Callable[[str], None] = print) -> dict:
    """Step time versus tokens (sequence length, batch) and rank, and merge time versus kernel size;
    full fine-tuning, LoRA, MoRA of ``mora_types`` and the PEFT family of ``peft_methods``.

    Each sweep compiles all its points first and then times them interleaved round-robin (with the
    matmul peak in the rotation), like :func:`run_benchmark`, so the ratios within a sweep are
    measured under the same load; a point shared by several sweeps (the base batch x seq_len at
    r_small) is timed again in each.
    """
    bench = BenchConfig.from_config(config)
    run, sc = bench.run, bench.scaling
    base = assemble(run)
    llama_config, name, seed = base.model_config, model_name(run), run.seed
    steps, warmup = sc.steps, sc.warmup
    params = base.load_params()
    matmul = MatmulRunner(run.model.dtype, size=bench.matmul_size, chain=bench.matmul_chain)
    token_specs = [MethodSpec("full"), MethodSpec("lora", bench.r_small),
                   *(MethodSpec("mora", bench.r_small, t) for t in bench.mora_types),
                   *(MethodSpec(m, bench.r_small) for m in bench.peft_methods)]
    base_b, base_t = run.train.batch_size, run.train.seq_len
    def sweep(title, points):
        log(title)
        done: dict = {}  # (spec, batch, seq_len) -> {"spec", "times", "peak_mem_bytes"}
        runners = []
        for spec, b, t in points:
            if (spec, b, t) in done:
                continue
            runner = StepRunner(spec, base, params, make_batch(llama_config, b, t, seed))
            runner.point = (b, t)
            runners.append(runner)
        run_interleaved([*runners, matmul], steps, warmup)
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
        rank_points.append((MethodSpec("lora", r), base_b, base_t))
        rank_points += [(MethodSpec("mora", r, t), base_b, base_t) for t in bench.mora_types]
        rank_points += [(MethodSpec(m, r), base_b, base_t) for m in bench.peft_methods]
    raw_rank = sweep("step time vs rank", rank_points)
    peak_flops = matmul.flops
    log(f"matmul peak (best, interleaved): {peak_flops / 1e9:.1f} GFLOP/s")
    vs_seq, vs_batch, vs_rank = ([_row(point, llama_config, b, t, peak_flops) for point, b, t in raw]
                                 for raw in (raw_seq, raw_batch, raw_rank))
    log("delta_weight vs kernel size")
    vs_kernel = []
    for k, d in sc.kernel_sizes:
        row = delta_weight_benchmark(k, d, sc.merge_r, bench.mora_types, repeats=sc.repeats)
        vs_kernel.append(row)
        log(f"  {k}x{d}: fill {row['fill_s'] * 1e3:.2f} ms; " + ", ".join(
            f"type {x['mora_type']} {x['delta_weight_s'] * 1e3:.2f} ms ({x['ratio_to_fill']:.2f}x)" for x in row["types"]))
    return {"device": device_description(), "dtype": jnp.dtype(run.model.dtype).name,
            "peak_matmul_flops": peak_flops,
            "model": {"name": name, "params": count_params(params), "batch": base_b, "seq_len": base_t},
            "settings": {"steps": steps, "warmup": warmup, "jax": jax.__version__, "interleaved": True},
            "vs_seq_len": vs_seq, "vs_batch": vs_batch, "vs_rank": vs_rank, "vs_kernel_size": vs_kernel}


__all__ = ["check_targets", "delta_weight_benchmark", "ratios", "run_benchmark", "run_scaling"]
