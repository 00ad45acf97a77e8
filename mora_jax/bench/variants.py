"""A run's own train step against variants of its config, timed side by side: where a step's time goes.

Each variant is the run config with some fields changed (``"f32: model.dtype=float32
model.param_dtype=float32"``); the first is the run as given. For each, the run's own step (its
method, adapter and dropout, ``grad_accum``, dtypes, remat) is assembled as a run assembles it
(:func:`mora_jax.bench.runners.assemble`, the weights of :func:`mora_jax.assembly.load_params`),
compiled ahead of time (``compile_s``), then every variant is timed interleaved round-robin on the
same batch: the first batch of the run's own data pipeline when ``data.source`` is set, else random
tokens. Beside the steps: the data pipeline's time per batch, and the two token counts of a step:
every position of the batch (what the step computes) and the loss tokens (what a run's
``tokens_per_s`` counts; a fine-tuning batch has loss only on the responses).

Entry point: ``python -m train.step_variants`` (``benchmarks/README.md`` has a result).
"""

from __future__ import annotations

import ast
import dataclasses
import statistics
import time
from typing import Callable, Sequence

import numpy as np

from mora_jax import data as data_lib
from mora_jax import recipes
from mora_jax.bench.methods import make_batch, model_name
from mora_jax.bench.report import _table
from mora_jax.bench.runners import StepRunner, assemble, device_description, run_interleaved
from mora_jax.run_config import RunConfig


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    changes: tuple[tuple[str, object], ...] = ()

    @classmethod
    def parse(cls, text: str) -> "Variant":
        """``"name: a.b=1 c.d=float32"`` (values are Python literals, else strings)."""
        name, sep, rest = text.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"variant {text!r}: write it as 'NAME: field=value field=value', e.g. "
                             "'f32: model.dtype=float32 model.param_dtype=float32'")
        changes = []
        for item in rest.split():
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise ValueError(f"variant {name.strip()!r}: {item!r} is not field=value")
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pass
            changes.append((key, value))
        return cls(name.strip(), tuple(changes))

    def apply(self, config: dict) -> RunConfig:
        """The run config ``config`` (a plain dict of its sections) with this variant's changes."""
        out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
        for key, value in self.changes:
            *path, last = key.split(".")
            node = out
            for part in path:
                if not isinstance(node.get(part), dict):
                    raise ValueError(f"variant {self.name!r}: the config has no section {key.rsplit('.', 1)[0]!r}")
                node[part] = dict(node[part])
                node = node[part]
            node[last] = value
        return RunConfig.from_dict(out)


def _pipeline(run: RunConfig, task: str, batches: int):
    """``(first batch, seconds per later batch)`` of the run's data pipeline."""
    tokenizer = data_lib.Tokenizer(run.data.tokenizer or run.model.hf_path)
    train_batches, _ = recipes.build_data(run, task, tokenizer)
    first = next(train_batches)
    times = []
    for _ in range(batches):
        t0 = time.perf_counter()
        next(train_batches)
        times.append(time.perf_counter() - t0)
    return first, times


def variant_runs(config, variants: Sequence[Variant]) -> list[tuple[Variant, RunConfig]]:
    """Each variant's run config, from the run ``config`` (a ConfigDict or dict; a ``benchmark``
    section is ignored); every one is checked (``ValueError``) before anything compiles."""
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    config.pop("benchmark", None)
    return [(v, v.apply(config)) for v in variants]


def run_variants(runs: Sequence[tuple[Variant, RunConfig]], *, steps: int = 5, warmup: int = 1,
                 task: str = "finetune", pipeline_batches: int = 20, log: Callable[[str], None] = print) -> dict:
    """Time each variant's run (:func:`variant_runs`; the first should be the run as given,
    ``Variant("run")``) on the first run's batch, interleaved."""
    first_run = runs[0][1]
    pipeline = None
    if first_run.data.source:
        batch, times = _pipeline(first_run, task, pipeline_batches)
        pipeline = {"task": task, "batches": len(times), "s_per_batch": statistics.median(times),
                    "s_per_batch_all": times}
        log(f"data pipeline: {statistics.median(times) * 1e3:.1f} ms per batch (median of {len(times)})")
    else:
        batch = None
    entries, weights = [], {}
    for variant, run in runs:
        base = assemble(run)
        # one copy of the weights per model (they do not depend on remat or attention)
        m = run.model
        key = repr((m.hf_path, m.preset, m.dtype, m.param_dtype, m.scan_layers, sorted(m.overrides.items()), run.seed))
        if key not in weights:
            weights[key] = base.load_params()
        params = weights[key]
        vocab = base.model_config.vocab_size
        if batch is None:
            rows = make_batch(base.model_config, run.train.batch_size, run.train.seq_len, run.seed)
        else:  # the pipeline's batch (ids folded into a smaller vocabulary where a variant has one)
            rows = {k: (np.asarray(v) % vocab if k == "input_ids" else np.asarray(v)) for k, v in batch.items()}
        runner = StepRunner(None, base, params, rows)
        log(f"{variant.name}: compiled in {runner.compile_s:.1f} s")
        entries.append((variant, run, base, runner, rows))
    run_interleaved([e[3] for e in entries], steps, warmup)
    out_rows = []
    for variant, run, base, runner, rows in entries:
        positions = int(np.asarray(rows["input_ids"]).size)
        loss_tokens = int(np.asarray(rows["loss_mask"]).sum())
        step_s = statistics.median(runner.times)
        out_rows.append({"variant": variant.name, "changes": {k: v for k, v in variant.changes},
                         "model": model_name(run), "dtype": run.model.dtype, "grad_accum": run.train.grad_accum,
                         "remat_policy": run.model.remat_policy, "method": run.method,
                         "step_s": step_s, "step_s_min": min(runner.times), "step_s_max": max(runner.times),
                         "step_s_all": runner.times, "compile_s": runner.compile_s,
                         "positions": positions, "loss_tokens": loss_tokens,
                         "positions_per_s": positions / step_s, "loss_tokens_per_s": loss_tokens / step_s,
                         "over_first": step_s / statistics.median(entries[0][3].times),
                         "loss": float(runner.last_loss)})
        runner.release()
    return {"device": device_description(), "settings": {"steps": steps, "warmup": warmup, "interleaved": True},
            "run": first_run.to_dict(), "pipeline": pipeline, "rows": out_rows}


def variants_markdown(result) -> str:
    lines = [f"On {result['device']}; median of {result['settings']['steps']} interleaved steps per variant "
             f"(after {result['settings']['warmup']} untimed).", ""]
    header = ["variant", "changes", "step s (min-max)", "/ first", "compile s", "positions/s", "loss tokens/s"]
    rows = [[r["variant"], " ".join(f"{k}={v}" for k, v in r["changes"].items()) or "(the run as given)",
             f"{r['step_s']:.3f} ({r['step_s_min']:.3f}-{r['step_s_max']:.3f})", f"{r['over_first']:.2f}x",
             f"{r['compile_s']:.1f}", f"{r['positions_per_s']:,.0f}", f"{r['loss_tokens_per_s']:,.0f}"]
            for r in result["rows"]]
    lines.append(_table(header, rows, True))
    first = result["rows"][0]
    lines += ["", f"A step of the run as given computes {first['positions']} positions, {first['loss_tokens']} of them "
              "in the loss (a run's tokens_per_s counts the loss tokens)."]
    if result.get("pipeline"):
        p = result["pipeline"]
        lines.append(f"Data pipeline: {p['s_per_batch'] * 1e3:.1f} ms per batch (median of {p['batches']}), "
                     f"{100 * p['s_per_batch'] / first['step_s']:.1f}% of the run's step.")
    return "\n".join(lines)


__all__ = ["Variant", "run_variants", "variant_runs", "variants_markdown"]
