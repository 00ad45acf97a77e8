"""Entry point: benchmark MoRA vs LoRA vs full fine-tuning on this device (see mora_jax.bench.harness).

    python -m train.benchmark --config configs/bench_tiny.py --out results.json
    python -m train.benchmark --config configs/bench_250m.py --out benchmarks/cpu_250m.json
    python -m train.benchmark --config configs/bench_tiny.py --scaling --out scaling.json   # + .md, .png
    python -m train.benchmark --config configs/bench_250m.py --quantized --out benchmarks/cpu_250m_quantized.json  # frozen base in none/int8/int4/nf4
    python -m train.benchmark --config configs/bench_tiny.py --peer --out peer.json         # + PyTorch rows (HF PEFT LoRA, MoRA)
    python -m train.benchmark --config configs/bench_tiny.py --config.benchmark.peft_methods="('dora','pissa','hira')" --peer ...
    python -m train.benchmark --config configs/bench_tiny.py --config.benchmark.steps=20 --config.train.batch_size=8 ...
    python -m train.benchmark --config configs/bench_250m.py --topology=v5e:2x2   # + TPU plan estimates (tpu extra)
    python -m train.benchmark --config configs/bench_250m.py --generation --out benchmarks/cpu_250m_generation.json
    python -m train.benchmark --config configs/bench_smollm2.py --peer --out benchmarks/cpu_smollm2.json
    python -m train.benchmark --config configs/bench_smollm2.py --config.model.hf_path=DIR ...  # a checkpoint's shape and weights
    python -m train.benchmark --config configs/math_finetune.py:chat --config.model.hf_path=DIR  # any run config

The config is a run config plus a ``benchmark`` section (``mora_jax.bench.config``; a run config
without one is benchmarked with the section's defaults): the model (``model.preset`` or
``model.hf_path``), dtypes, batch and sequence length are the run's.

Writes ``--out`` (JSON) and a markdown report beside it (same name, ``.md``), and prints a table.
JSON schema (extra keys such as "ratios", "details", "delta_weight", "targets", "peer", "peer_comparison", "xla_tuning" may follow):

    {"device": str, "dtype": str, "peak_matmul_flops": float,
     "model": {"name": str, "params": int, "batch": int, "seq_len": int},
     "results": [{"method": "full"|"lora"|"mora"|"dora"|"pissa"|"hira", "r": int|null, "mora_type": int|null,
                  "step_s": float, "tokens_per_s": float, "model_flops_per_step": float,
                  "mfu": float, "peak_mem_bytes": int|null}],
     "merge": {"step_s": float, "merge_s": float}}

With --generation it times mora_jax.generate instead (mora_jax.bench.generation): {"device", "dtype", "model",
"generation": {"rows": [per batch: prefill and decode tokens/s, compiled FLOPs, ...], "flops": {decode step
and prefill FLOPs for a short and a long prefix}, ...}}.
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

from mora_jax import logs
from mora_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "benchmark configuration (configs/bench_*.py), or any run config")
_OUT = flags.DEFINE_string("out", "results.json", "JSON file to write (a .md report is written beside it)")
_SCALING = flags.DEFINE_bool("scaling", False, "run the scaling study instead (JSON + .md table + .png plot)")
_QUANTIZED = flags.DEFINE_bool("quantized", False, "run the quantized-base comparison instead: LoRA and MoRA steps on "
                               "the frozen base in each format of benchmark.quant_formats (bytes, peak memory, "
                               "step time; JSON + .md)")
_TOPOLOGY = flags.DEFINE_string("topology", None, "also plan every method for this TPU slice (e.g. v5e:2x2) with the TPU "
                                 "planner: memory per chip and estimated step time beside the CPU measurements")
_GENERATION = flags.DEFINE_bool("generation", False, "run the generation benchmark instead: prefill and decode "
                                 "tokens/s of mora_jax.generate, compiled FLOPs of a decode step for a short and a "
                                 "long prefix (JSON + .md)")
_GEN_BATCHES = flags.DEFINE_list("generation_batches", None, "--generation: prompts per call "
                                  "(default: benchmark.generation.batches)")
_GEN_PROMPT_LEN = flags.DEFINE_integer("generation_prompt_len", None, "--generation: prompt tokens "
                                       "(default: benchmark.generation.prompt_len)")
_GEN_NEW_TOKENS = flags.DEFINE_integer("generation_new_tokens", None, "--generation: new tokens "
                                       "(default: benchmark.generation.new_tokens)")
_GEN_REPEATS = flags.DEFINE_integer("generation_repeats", None, "--generation: timed calls per program "
                                    "(default: benchmark.generation.repeats)")
_PEER = flags.DEFINE_bool("peer", False, "also time the same model in PyTorch, in the same rotation: full, HF PEFT "
                          "LoRA (and DoRA, PiSSA, HiRA of benchmark.peft_methods), the reference MoRA, and generation (needs torch, transformers, peft)")


def main(argv):
    del argv
    logs.apply_verbosity_flag()  # other libraries' INFO lines only with --verbosity
    from mora_jax import distributed
    distributed.initialize()  # multi-host: join the cluster before any device use; one process: a no-op
    from mora_jax.bench import harness, peer, report
    from mora_jax.bench.config import BenchConfig

    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config configs/bench_tiny.py")
    try:
        config = BenchConfig.from_config(_CONFIG.value)  # every field checked before anything compiles
    except ValueError as e:
        sys.exit(f"error: config: {e}")
    out = pathlib.Path(_OUT.value)
    modes = [name for name, on in (("--generation", _GENERATION.value), ("--scaling", _SCALING.value),
                                   ("--quantized", _QUANTIZED.value)) if on]
    extras = [name for name, on in (("--peer", _PEER.value), ("--topology", _TOPOLOGY.value)) if on]
    if len(modes) > 1 or (modes and extras):
        sys.exit(f"error: {' and '.join(modes + extras)} do not combine: {modes[0]} runs instead of the methods "
                 "table that --peer and --topology extend; run them separately")
    if _PEER.value:  # fail before spending minutes on the JAX side
        try:
            peer.import_peer()
        except peer.PeerUnavailable as e:
            sys.exit(str(e))
    if _TOPOLOGY.value:  # a bad slice name or a missing libtpu: say so before the CPU benchmark runs
        from mora_jax.plan import PlanError, parse_topology, topology_devices

        try:
            topology_devices(parse_topology(_TOPOLOGY.value))
        except PlanError as e:
            sys.exit(f"error: {e}")
    if _GENERATION.value:
        _run_generation(config, out)
        return
    if _SCALING.value:
        result = harness.run_scaling(config)
        report.write_json(_recorded(result), out)
        text = report.scaling_markdown(result)
        out.with_suffix(".md").write_text(text + "\n")
        report.plot_scaling(result, out.with_suffix(".png"))
        print(text)
        print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
        return
    if _QUANTIZED.value:
        from mora_jax.bench import quantized

        try:
            result = quantized.run_quantized(config)
        except UserError as e:  # e.g. a block size that does not divide a kernel's input features
            sys.exit(f"error: {e}")
        report.write_json(_recorded(result), out)
        text = quantized.markdown(result)
        out.with_suffix(".md").write_text(text + "\n")
        print(text)
        print(f"wrote {out} and {out.with_suffix('.md')}")
        return
    result = harness.run_benchmark(config, with_peer=_PEER.value)
    tpu_table = ""
    if _TOPOLOGY.value:
        from mora_jax.bench import tpu

        result["tpu_plan"] = tpu.plan_methods(config.run, _TOPOLOGY.value, result["results"])
        tpu_table = "\n\n" + tpu.side_by_side(result)
    report.validate_schema(result)
    report.write_json(_recorded(result), out)
    out.with_suffix(".md").write_text(report.report(result, markdown=True) + tpu_table + "\n")
    print(report.report(result) + tpu_table)
    print(f"wrote {out} and {out.with_suffix('.md')}")


def _recorded(result: dict) -> dict:
    """``result`` with the command that made it and its provenance (commit, versions, machine)."""
    from mora_jax.experiments.provenance import provenance

    return {**result, "command": " ".join(["python -m train.benchmark", *sys.argv[1:]]), "provenance": provenance()}


def _run_generation(config, out: pathlib.Path) -> None:
    import dataclasses

    from mora_jax.bench import generation, report

    given = {"batches": tuple(int(b) for b in _GEN_BATCHES.value) if _GEN_BATCHES.value else None,
             "prompt_len": _GEN_PROMPT_LEN.value, "new_tokens": _GEN_NEW_TOKENS.value, "repeats": _GEN_REPEATS.value}
    try:  # the config's benchmark.generation, with the flags given
        settings = dataclasses.replace(config.generation, **{k: v for k, v in given.items() if v is not None})
    except ValueError as e:
        sys.exit(f"error: {e}")
    result = generation.run_generation(config.run, settings)
    generation.validate_generation(result)
    report.write_json(_recorded(result), out)
    out.with_suffix(".md").write_text(generation.generation_report(result, markdown=True) + "\n")
    print(generation.generation_report(result))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    app.run(main)
