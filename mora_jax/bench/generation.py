"""The generation benchmark: prefill and decode tokens/s of :func:`mora_jax.generate`, and the
compiled FLOPs of a decode step for a short and a long prefix.

For each batch size, two programs are timed interleaved round-robin (compile excluded, ``warmup``
untimed calls, the median of ``repeats`` timed calls):

* the **prefill** alone: :func:`mora_jax.generate.lower_prefill`, the function ``generate``'s
  program runs first (the prompt through the model into a fresh cache sized as ``generate`` sizes
  it), compiled ahead of time;
* the whole **generate**: the public ``mora_jax.generate`` call, greedy, no adapter, never stopping
  at an EOS (``eos_token_id=[]``), so it always runs the prefill and ``new_tokens - 1`` decode steps.

Prefill tokens/s = ``batch · prompt_len / prefill_s``; decode = ``(generate_s − prefill_s) /
(new_tokens − 1)`` per step, decode tokens/s = ``batch / that`` (one new token per row per step;
the step's token choice and bookkeeping in the loop included).

Beside the times, XLA's ``cost_analysis()`` FLOPs of the compiled programs: the prefill and the
decode step at each measured shape, and at batch 1 a decode step against a cache of ``short`` and
of ``long`` slots next to a prefill of ``short`` and of ``long`` tokens (what re-encoding the
prefix for each new token would cost). ``generate`` sizes its cache to ``prompt + new tokens − 1``
slots and a step attends over every slot under a mask, so a step's FLOPs grow with the cache length
by the attention read only.

Entry point: ``python -m train.benchmark --config configs/bench_250m.py --generation --out ...``.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mora_jax.bench.methods import model_name
from mora_jax.bench.report import _table
from mora_jax.bench.runners import assemble, device_description, run_interleaved, xla_flops
from mora_jax.generate import generate, lower_decode_step, lower_prefill
from mora_jax.models.params import count_params
from mora_jax.run_config import RunConfig

# Keys of each "generation" row of the JSON and of its "flops" comparison.
GENERATION_ROW = ("batch", "prompt_len", "new_tokens", "decode_steps", "cache_len", "prefill_s", "generate_s",
                  "decode_s_per_step", "prefill_tokens_per_s", "decode_tokens_per_s", "generate_new_tokens_per_s",
                  "prefill_flops", "decode_step_flops", "prefill_s_all", "generate_s_all", "generate_first_call_s",
                  "prefill_compile_s")
GENERATION_FLOPS = ("batch", "short", "long", "decode_step", "prefill", "decode_step_long_over_short",
                    "prefill_long_over_short", "prefill_long_over_decode_step_long", "note")


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    batches: tuple[int, ...] = (1, 8)  # prompts per call
    prompt_len: int = 128  # prompt tokens per row
    new_tokens: int = 32  # tokens generated per row (the first by the prefill, the others by decode steps)
    repeats: int = 3  # timed calls per program (median)
    warmup: int = 1  # untimed calls per program after compiling
    flops_long: int = 0  # the long prefix of the FLOPs comparison (0 = the model's max_position_embeddings)

    def __post_init__(self):
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"batches must be positive, got {self.batches}")
        if self.prompt_len < 1 or self.new_tokens < 2:
            raise ValueError(f"need prompt_len >= 1 and new_tokens >= 2 (one decode step at least), got "
                             f"{self.prompt_len} and {self.new_tokens}")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"need repeats >= 1 and warmup >= 0, got {self.repeats} and {self.warmup}")


class PrefillRunner:
    """The compiled prefill of a ``(batch, prompt_len)`` prompt, timed call by call."""

    def __init__(self, model, params, ids_BxP, new_tokens: int):
        self.params, self.ids = params, jnp.asarray(ids_BxP, jnp.int32)
        self.mask = jnp.ones_like(self.ids)
        t0 = time.perf_counter()
        self.compiled = lower_prefill(model, params, batch_size=self.ids.shape[0], prompt_length=self.ids.shape[1],
                                      max_new_tokens=new_tokens).compile()
        self.compile_s = time.perf_counter() - t0
        self.times: list[float] = []

    def step(self, record: bool = True) -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(self.compiled(self.params, None, self.ids, self.mask))
        dt = time.perf_counter() - t0
        if record:
            self.times.append(dt)
        return dt

    def release(self):
        self.params = self.ids = self.mask = self.compiled = None


class GenerateRunner:
    """One public ``mora_jax.generate`` call (greedy, never stopping early), timed call by call; the
    constructor's call compiles it (``first_call_s``: compile and one run)."""

    def __init__(self, model, params, ids_BxP, new_tokens: int):
        self.model, self.params, self.ids, self.new_tokens = model, params, np.asarray(ids_BxP, np.int32), new_tokens
        self.times: list[float] = []
        self.first_call_s = self.step(record=False)

    def step(self, record: bool = True) -> float:
        t0 = time.perf_counter()
        out = generate(self.model, self.params, self.ids, max_new_tokens=self.new_tokens, eos_token_id=[])
        jax.block_until_ready(out)
        dt = time.perf_counter() - t0
        if out.shape != (self.ids.shape[0], self.new_tokens):
            raise AssertionError(f"generate returned {out.shape}, expected {(self.ids.shape[0], self.new_tokens)}")
        if record:
            self.times.append(dt)
        return dt

    def release(self):
        self.model = self.params = self.ids = None


def _step_flops(model, params, batch: int, cache_len: int) -> float | None:
    return xla_flops(lower_decode_step(model, params, batch_size=batch, cache_length=cache_len).compile())


def _prefill_flops(model, params, batch: int, prompt_len: int) -> float | None:
    return xla_flops(lower_prefill(model, params, batch_size=batch, prompt_length=prompt_len,
                                   max_new_tokens=1).compile())


def flops_comparison(model, params, short: int, long: int) -> dict:
    """Compiled FLOPs at batch 1 of a decode step against ``short`` and ``long`` cache slots and of
    a prefill of ``short`` and ``long`` tokens, with their ratios."""
    step = {"short": _step_flops(model, params, 1, short), "long": _step_flops(model, params, 1, long)}
    prefill = {"short": _prefill_flops(model, params, 1, short), "long": _prefill_flops(model, params, 1, long)}
    ratio = lambda a, b: None if a is None or b is None else a / b
    return {"batch": 1, "short": int(short), "long": int(long), "decode_step": step, "prefill": prefill,
            "decode_step_long_over_short": ratio(step["long"], step["short"]),
            "prefill_long_over_short": ratio(prefill["long"], prefill["short"]),
            "prefill_long_over_decode_step_long": ratio(prefill["long"], step["long"]),
            "note": "XLA cost_analysis() FLOPs of the compiled programs (matmuls and elementwise). generate sizes "
                    "its cache to prompt + new tokens - 1 slots and a decode step attends over every slot under a "
                    "mask, so its FLOPs grow with the cache length by the attention read only; a prefill of L "
                    "tokens is what re-encoding an L-token prefix for each new token would cost."}


def run_generation(run: RunConfig, settings: GenerationSettings = GenerationSettings(), *,
                   log: Callable[[str], None] = print) -> dict:
    """Time prefill and decode of ``mora_jax.generate`` on the model of a run config, assembled as
    a run assembles it (a preset's random weights or the checkpoint's; random prompt tokens);
    returns the JSON result."""
    base = assemble(run)
    model, llama_config, name = base.model, base.model_config, model_name(run)
    params = base.load_params()
    P, N = settings.prompt_len, settings.new_tokens
    long = settings.flops_long or llama_config.max_position_embeddings
    if P + N > llama_config.max_position_embeddings or not P <= long <= llama_config.max_position_embeddings:
        raise ValueError(f"prompt_len {P} + new_tokens {N} and the long prefix {long} must fit the model's "
                         f"max_position_embeddings {llama_config.max_position_embeddings}")
    dtype = str(jnp.dtype(llama_config.dtype).name)
    log(f"generation: device {device_description()}; model {name}, {dtype}, batches {list(settings.batches)}, "
        f"prompt {P} + {N} new tokens")
    rng = np.random.default_rng(run.seed)
    pairs = []
    for batch in settings.batches:
        ids = rng.integers(0, llama_config.vocab_size, (batch, P)).astype(np.int32)
        prefill = PrefillRunner(model, params, ids, N)
        whole = GenerateRunner(model, params, ids, N)
        log(f"batch {batch}: prefill compiled in {prefill.compile_s:.1f} s, generate's first call "
            f"{whole.first_call_s:.1f} s")
        pairs.append((batch, prefill, whole))
    run_interleaved([r for _, prefill, whole in pairs for r in (prefill, whole)], settings.repeats, settings.warmup)

    rows = []
    for batch, prefill, whole in pairs:
        prefill_s, generate_s = statistics.median(prefill.times), statistics.median(whole.times)
        decode_s = (generate_s - prefill_s) / (N - 1)
        rows.append({
            "batch": batch, "prompt_len": P, "new_tokens": N, "decode_steps": N - 1, "cache_len": P + N - 1,
            "prefill_s": prefill_s, "generate_s": generate_s, "decode_s_per_step": decode_s,
            "prefill_tokens_per_s": batch * P / prefill_s,
            "decode_tokens_per_s": batch / decode_s if decode_s > 0 else None,
            "generate_new_tokens_per_s": batch * N / generate_s,
            "prefill_flops": xla_flops(prefill.compiled),
            "decode_step_flops": _step_flops(model, params, batch, P + N - 1),
            "prefill_s_all": prefill.times, "generate_s_all": whole.times,
            "generate_first_call_s": whole.first_call_s, "prefill_compile_s": prefill.compile_s,
        })
        prefill.release()
        whole.release()
    comparison = flops_comparison(model, params, P, long)
    return {
        "device": device_description(),
        "dtype": dtype,
        "model": {"name": name, "params": int(count_params(params)), "layers": llama_config.num_hidden_layers,
                  "max_position_embeddings": llama_config.max_position_embeddings},
        "generation": {
            "what": "mora_jax.generate, greedy, base model (a preset's random weights or the checkpoint's, no "
                    "adapter), never stopping at an EOS; prefill = the compiled prefill alone (mora_jax.generate.lower_prefill); decode per step = "
                    "(generate - prefill) / (new_tokens - 1); compile excluded; median of the timed calls, the "
                    "programs interleaved round-robin",
            "settings": dataclasses.asdict(settings) | {"flops_long": long},
            "rows": rows,
            "flops": comparison,
            "jax": jax.__version__,
        },
    }


def validate_generation(result: Mapping) -> None:
    """Raise ``ValueError`` unless ``result`` has the generation JSON's keys."""
    for key in ("device", "dtype", "model", "generation"):
        if key not in result:
            raise ValueError(f"missing top-level key {key!r}")
    gen = result["generation"]
    if not gen.get("rows"):
        raise ValueError("generation has no rows")
    for row in gen["rows"]:
        if set(row) != set(GENERATION_ROW):
            raise ValueError(f"generation row keys {sorted(row)} != {sorted(GENERATION_ROW)}")
    if set(gen["flops"]) != set(GENERATION_FLOPS):
        raise ValueError(f"generation flops keys {sorted(gen['flops'])} != {sorted(GENERATION_FLOPS)}")


def _gflop(x) -> str:
    return "n/a" if x is None else f"{x / 1e9:.4g}"


def generation_report(result: Mapping, markdown: bool = False) -> str:
    """The timings and the FLOPs comparison as text (or markdown)."""
    gen, m, s = result["generation"], result["model"], result["generation"]["settings"]
    bold = "**" if markdown else ""
    parts = [f"{bold}Generation{bold}: {m['name']} ({m['params']:,} parameters), {result['dtype']}, on "
             f"{result['device']}; greedy mora_jax.generate, no adapter; compile excluded, median of "
             f"{s['repeats']} interleaved calls after {s['warmup']} warmup", ""]
    header = ["batch", "prompt", "new", "prefill ms", "prefill tok/s", "decode ms/step", "decode tok/s",
              "generate ms", "prefill GFLOP", "step GFLOP"]
    lines = [[str(r["batch"]), str(r["prompt_len"]), str(r["new_tokens"]), f"{r['prefill_s'] * 1e3:,.1f}",
              f"{r['prefill_tokens_per_s']:,.0f}", f"{r['decode_s_per_step'] * 1e3:,.1f}",
              "n/a" if r["decode_tokens_per_s"] is None else f"{r['decode_tokens_per_s']:,.1f}",
              f"{r['generate_s'] * 1e3:,.1f}", _gflop(r["prefill_flops"]), _gflop(r["decode_step_flops"])]
             for r in gen["rows"]]
    parts += [_table(header, lines, markdown), ""]
    f = gen["flops"]
    ratio = lambda x: "n/a" if x is None else f"{x:.2f}x"
    parts += [f"Compiled FLOPs at batch 1 (XLA cost_analysis), prefix {f['short']} vs {f['long']} tokens:", ""]
    header = ["program", f"{f['short']} tokens", f"{f['long']} tokens", "long / short"]
    lines = [["decode step (1 new token, cache of that many slots)", _gflop(f["decode_step"]["short"]),
              _gflop(f["decode_step"]["long"]), ratio(f["decode_step_long_over_short"])],
             ["prefill (re-encoding that prefix)", _gflop(f["prefill"]["short"]), _gflop(f["prefill"]["long"]),
              ratio(f["prefill_long_over_short"])]]
    parts += [_table(header, lines, markdown), "",
              f"At {f['long']} tokens a re-encoding costs {ratio(f['prefill_long_over_decode_step_long'])} a cached "
              "decode step."]
    return "\n".join(parts)


__all__ = ["GENERATION_FLOPS", "GENERATION_ROW", "GenerateRunner", "GenerationSettings", "PrefillRunner",
           "flops_comparison", "generation_report", "run_generation", "validate_generation"]
