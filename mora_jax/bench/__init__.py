"""Benchmarks of mora-jax: what a training step costs, and where its time goes.

Not part of the library: nothing in ``mora_jax`` outside this package imports it (a test checks),
and importing it imports none of its modules. The entry points are ``train/benchmark.py`` and
``train/profile_step.py``; ``docs/benchmarks.md`` has the results.

* :mod:`~mora_jax.bench.methods`: the methods compared (full, LoRA, MoRA types), the model and batch
  of a ``configs/bench_*.py`` config.
* :mod:`~mora_jax.bench.runners`: each method's compiled step, built by :func:`mora_jax.steps.build_steps`
  as the training loop builds it, the ReMoRA merge and the matmul peak, timed call by call.
* :mod:`~mora_jax.bench.harness`: the side-by-side interleaved measurement, targets, the scaling study.
* :mod:`~mora_jax.bench.report`: the JSON schema, tables and plots.
* :mod:`~mora_jax.bench.peer`: the same model in PyTorch (HF transformers + PEFT; torch is optional).
* :mod:`~mora_jax.bench.profile`: one compiled step, fusion by fusion, from a ``jax.profiler`` trace.
* :mod:`~mora_jax.bench.generation`: prefill and decode tokens/s of ``mora_jax.generate``, and the
  compiled FLOPs of a decode step for a short and a long prefix (``train.benchmark --generation``).
"""
