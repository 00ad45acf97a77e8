"""Benchmarks of mora-jax: what a training step costs, and where its time goes.

Not part of the library: nothing in ``mora_jax`` outside this package imports it (a test checks),
and importing it imports none of its modules. The entry points are ``train/benchmark.py``,
``train/profile_step.py`` and ``train/step_variants.py``; ``docs/benchmarks.md`` has the results.

* :mod:`~mora_jax.bench.config`: a benchmark config, a run config plus one ``benchmark`` section
  (``configs/bench_*.py``); the run is assembled by :mod:`mora_jax.assembly` like any run.
* :mod:`~mora_jax.bench.methods`: the methods compared (full, LoRA, MoRA types), each the benchmark's
  run with its adapter, and the random token batch.
* :mod:`~mora_jax.bench.runners`: each method's compiled step, built by :mod:`mora_jax.assembly`
  as the training loop builds it, the ReMoRA merge and the matmul peak, timed call by call.
* :mod:`~mora_jax.bench.harness`: the side-by-side interleaved measurement, targets, the scaling study.
* :mod:`~mora_jax.bench.report`: the JSON schema, tables and plots.
* :mod:`~mora_jax.bench.peer`: the same model in PyTorch (HF transformers + PEFT; torch is optional),
  timed in the same rotation, and its generation.
* :mod:`~mora_jax.bench.profile`: one compiled step, fusion by fusion, from a ``jax.profiler`` trace.
* :mod:`~mora_jax.bench.generation`: prefill and decode tokens/s of ``mora_jax.generate``, and the
  compiled FLOPs of a decode step for a short and a long prefix (``train.benchmark --generation``).
* :mod:`~mora_jax.bench.variants`: a run's own train step against variants of its config (dtype,
  micro-batches, vocabulary, remat...), side by side (``train.step_variants``).
"""
