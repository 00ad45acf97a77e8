"""The TPU planner: compile a run's steps for a TPU slice from a CPU machine, and read what they need.

``python -m train.plan --config=configs/c4_pretrain.py:1b --topology=v5e:2x4`` is its command line.
Nothing here needs a TPU: ``libtpu`` (the ``tpu`` extra) compiles for a named slice with
compile-only devices while JAX's default backend stays the CPU.

* :mod:`~mora_jax.plan.chips`: the TPU generations (HBM, bf16 peak, bandwidths, with sources) and
  slice topologies (``v5e:2x4``).
* :mod:`~mora_jax.plan.planner`: the run's train / eval / ReMoRA-merge steps, built by
  :func:`mora_jax.steps.build_steps` as the loop builds them, compiled for the slice; memory per
  chip, fit, cost.
* :mod:`~mora_jax.plan.hlo`: FLOPs, HBM traffic and collectives read from the compiled HLO, loops
  weighed by their trip counts (XLA's cost analysis counts a scanned layer once);
  :mod:`~mora_jax.plan.hlo_parse` reads the HLO text.
* :mod:`~mora_jax.plan.roofline`: the step-time estimate and MFU.
* :mod:`~mora_jax.plan.advice`: what to change when a plan does not fit; :mod:`~mora_jax.plan.search`:
  mesh shapes, remat policies and micro-batch counts tried in turn; :mod:`~mora_jax.plan.report`:
  the tables.
"""

from mora_jax.plan.chips import CHIPS, ChipSpec, PlanError, Topology, parse_topology, topology_devices
from mora_jax.plan.planner import STEP_NAMES, model_config, plan, prepare, to_json

__all__ = ["CHIPS", "ChipSpec", "PlanError", "STEP_NAMES", "Topology", "model_config", "parse_topology", "plan",
           "prepare", "to_json", "topology_devices"]
