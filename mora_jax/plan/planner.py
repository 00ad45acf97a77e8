"""Compile a run's steps for a TPU slice from any machine, and say whether they fit and how fast they may go.

:func:`plan` takes a run config (:class:`mora_jax.run_config.RunConfig`) and a topology name. It
assembles the run over the slice's chips (compile-only devices from ``libtpu``) exactly as a
training run is assembled (:func:`mora_jax.assembly.assemble`: the mesh of ``config.mesh``, the
compiled steps, and the state a run would start from as shapes only: no weights, no data, no
tokenizer); then it compiles the
train, eval and ReMoRA-merge programs for that slice and reads, per chip:

* memory: XLA's buffer assignment (``memory_analysis``): arguments, outputs, the part of the outputs
  written in place over donated arguments, temporaries, and the program itself;
* cost: XLA's ``cost_analysis`` as reported (it counts a loop body once), and the project's own
  count from the HLO with every loop weighed by its trip count (:mod:`mora_jax.plan.hlo`);
* an **estimate** of the step time: a roofline of the compiled step (:mod:`mora_jax.plan.roofline`).

A program that does not fit the chip's HBM is refused by the TPU compiler itself; the plan records
the compiler's figures and ``fits: false``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from mora_jax import adapters as adapters_lib
from mora_jax import assembly, sharding
from mora_jax import flops as flops_lib
from mora_jax.methods import MoRAConfig
from mora_jax.models.attention import flash_pairs
from mora_jax.plan import chips as chips_lib
from mora_jax.plan import hlo as hlo_lib
from mora_jax.plan import roofline
from mora_jax.plan.chips import PlanError
from mora_jax.run_config import RunConfig

# The arrays of every batch the data pipelines produce (mora_jax.data: int32, (batch, seq_len)).
BATCH_KEYS = ("input_ids", "loss_mask", "segment_ids", "positions")
STEP_NAMES = ("train", "eval", "merge")


def model_config(config: RunConfig):
    """The ``LlamaConfig`` of ``config.model`` (:func:`mora_jax.assembly.model_config`); bad input is a
    :class:`PlanError`."""
    try:
        return assembly.model_config(config)
    except (ValueError, FileNotFoundError) as e:
        raise PlanError(str(e)) from None


def _with_shardings(tree, shardings):
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _leaf_bytes_per_chip(leaf) -> int:
    """Bytes one chip holds of a ShapeDtypeStruct with a sharding (the largest shard); 4-bit codes at
    half a byte (XLA packs them two to a byte)."""
    shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
    dtype = jnp.dtype(leaf.dtype)
    bits = jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer) else 8 * dtype.itemsize
    return -(-bits * math.prod(shape) // 8)


def _bytes_per_chip(tree) -> int:
    """Bytes one chip holds of a tree of ShapeDtypeStructs with shardings (the largest shards)."""
    return sum(_leaf_bytes_per_chip(leaf) for leaf in jax.tree_util.tree_leaves(tree))


def _bytes_per_chip_by_dtype(tree) -> dict[str, int]:
    """:func:`_bytes_per_chip` by dtype: a quantized base's codes (``int4``, ``uint4``, ``int8``), their
    scales and the weights left in float (embeddings, head, norms)."""
    out: dict[str, int] = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        name = jnp.dtype(leaf.dtype).name
        out[name] = out.get(name, 0) + _leaf_bytes_per_chip(leaf)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


_SIZE = re.compile(r"([\d.]+)\s*([KMGT]?)i?B?\b")
_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}


def _out_of_memory(message: str) -> dict | None:
    """The TPU compiler's out-of-memory refusal as ``{"required_bytes", "available_bytes", "message"}``."""
    if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
        return None

    def size(pattern):
        match = re.search(pattern, message)
        if not match:
            return None
        value = _SIZE.match(match.group(1))
        return int(float(value.group(1)) * _UNITS[value.group(2)]) if value else None

    required = size(r"required[^(]*\(([^)]+)\)") or size(r"Used ([\d.]+\s*[KMGT]?)")
    available = size(r"available HBM \(([^)]+)\)") or size(r"Used [\d.]+\s*[KMGT]? of ([\d.]+\s*[KMGT]?)")
    line = next((l.strip() for l in message.splitlines() if "memory" in l.lower()), message.strip().splitlines()[0])
    return {"required_bytes": required, "available_bytes": available, "message": line[:400]}


def runs_attention_kernel(kernels: dict) -> bool:
    """Whether a compiled step's custom kernels (by name) include the Pallas attention kernels."""
    return any(_is_attention_kernel(name) for name in kernels)


def _is_attention_kernel(name: str) -> bool:
    return any(tag in name for tag in ("mha", "flash", "attention"))


def attention_kernel_flops(config: RunConfig, llama_config, chips: int):
    """FLOPs per chip of the Pallas attention kernels a compiled step runs (their matmuls are inside
    the kernel, out of the HLO's sight), from the kernels' call counts. A call is one layer's attention
    on one micro-batch (the HLO's counts already multiply layers, micro-batches and recomputation); per
    call on one chip, one ``QKᵀ``-sized product is ``2·pairs·N·H`` for each of the chip's share of the
    micro-batch's sequences and heads, where ``pairs`` are the query-key pairs of the blocks the
    kernel's causal mask does not skip (:func:`mora_jax.models.attention.flash_pairs`: ``3/4`` of
    ``T²`` at ``T = 2·block``, not ``1/2``). The forward kernel does 2 such products, the ``dq``
    kernel 3 and the ``dkv`` kernel 4 (both recompute ``QKᵀ``)."""
    pairs = flash_pairs(config.train.seq_len, causal=True, sliding_window=llama_config.sliding_window)
    unit = 2.0 * config.train.batch_size * pairs * llama_config.num_attention_heads * llama_config.resolved_head_dim
    unit /= chips * config.train.grad_accum

    def count(kernels: dict) -> float:
        total = 0.0
        for name, calls in kernels.items():
            if not _is_attention_kernel(name):
                continue
            products = 3 if "dq" in name.replace("dkv", "") else 4 if "dkv" in name else 2
            total += calls * products * unit
        return total

    return count


def compile_step(lowered, chip: chips_lib.ChipSpec, *, name: str, kernel_flops=None, hlo_dir: str | None = None) -> dict:
    """Compile one lowered step for the slice and describe it (see the module docstring);
    ``kernel_flops(kernels)`` gives the FLOPs per chip of the custom kernels it runs; with ``hlo_dir``
    the compiled program's HLO text is written there as ``<name>.hlo.txt`` (what the counts are read from)."""
    t0 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - XLA reports everything as JaxRuntimeError
        oom = _out_of_memory(str(e))
        if oom is None:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PlanError(f"compiling the {name} step failed: {first}") from None
        required = oom["required_bytes"]  # the compiler's figure: its temporaries alone, so a lower bound
        return {"fits": False, "compiled": False, "compile_s": round(time.perf_counter() - t0, 1),
                "bytes_per_chip": {"arguments": None, "outputs": None, "aliased": None, "temp": required, "code": None,
                                   "total": required},
                "compiler_refusal": oom, "collectives": {}, "xla_flops": None, "xla_bytes_accessed": None,
                "estimated_step_s": None, "bound": None}
    compile_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    text = compiled.as_text()
    if hlo_dir:
        os.makedirs(hlo_dir, exist_ok=True)
        with open(os.path.join(hlo_dir, f"{name}.hlo.txt"), "w") as f:
            f.write(text)
    stats = hlo_lib.analyze(text)
    used = {"arguments": int(memory.argument_size_in_bytes), "outputs": int(memory.output_size_in_bytes),
            "aliased": int(memory.alias_size_in_bytes), "temp": int(memory.temp_size_in_bytes),
            "code": int(memory.generated_code_size_in_bytes)}
    used["total"] = used["arguments"] + used["outputs"] - used["aliased"] + used["temp"] + used["code"]
    extra = kernel_flops(stats.kernels) if kernel_flops is not None else 0.0
    estimate = roofline.estimate(stats, chip, kernel_flops=extra)
    return {
        "fits": used["total"] <= chip.hbm_bytes, "compiled": True, "compile_s": round(compile_s, 1),
        "bytes_per_chip": used,
        "collectives": {kind: {k: v for k, v in c.items()} for kind, c in sorted(stats.collectives.items())},
        "xla_flops": float(cost.get("flops", 0.0)), "xla_bytes_accessed": float(cost.get("bytes accessed", 0.0)),
        "hlo_matmul_flops": stats.matmul_flops, "hlo_hbm_bytes": stats.hbm_bytes,
        "hbm_bytes_by_op": stats.hbm_bytes_by_op,
        "kernels": stats.kernels, "kernel_flops": extra,
        "loop_trip_counts": stats.loop_trip_counts, "unknown_trip_counts": stats.unknown_trip_counts,
        **estimate,
    }


@dataclasses.dataclass
class Prepared:
    """What :func:`prepare` builds once per (config, topology): the compiled steps' builder and its
    abstract arguments."""

    config: RunConfig
    topology: chips_lib.Topology
    llama_config: Any
    steps: Any
    state: Any
    batch: dict
    hosts: int


def prepare(config: RunConfig, topology: chips_lib.Topology | str, devices: Sequence | None = None) -> Prepared:
    """Assemble the run for ``topology`` (:func:`mora_jax.assembly.assemble`): its steps and the
    abstract state and batch they compile for; bad input is a :class:`PlanError`."""
    topology = chips_lib.parse_topology(topology) if isinstance(topology, str) else topology
    devices = list(devices) if devices is not None else chips_lib.topology_devices(topology)
    try:
        assembled = assembly.assemble(config, devices=devices)
    except (ValueError, FileNotFoundError) as e:
        raise PlanError(f"{e} (the {topology.name} slice has {topology.chips} chips)") from None
    steps = assembled.steps
    state = assembled.abstract_state()
    state = _with_shardings(state, steps.state_shardings(state))
    shape = (config.train.batch_size, config.train.seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=steps.batch_sharding) for k in BATCH_KEYS}
    hosts = len({d.process_index for d in devices})
    return Prepared(config, topology, assembled.model_config, steps, state, batch, hosts)


def _merges(config: RunConfig, state) -> bool:
    return bool(config.remora.every) and bool(adapters_lib.flatten(state.trainables["adapters"]))


def model_flops(config: RunConfig, llama_config, *, skip_masked_attention: bool = False) -> float:
    """The project's FLOP model (:mod:`mora_jax.flops`) for one optimizer step of ``config``;
    ``skip_masked_attention`` when the step's attention kernel skips the masked products."""
    adapter = config.initial_adapter_config()
    trained_lm_head = any(re.fullmatch(p, "lm_head/kernel") for p in adapter.unfreeze)
    return flops_lib.model_flops_per_step(
        llama_config, config.train.batch_size, config.train.seq_len, config.method, getattr(adapter, "r", None),
        adapter.mora_type if isinstance(adapter, MoRAConfig) else None, trained_lm_head=trained_lm_head,
        skip_masked_attention=skip_masked_attention)


def plan(config: RunConfig, topology: chips_lib.Topology | str, *, steps: Sequence[str] = STEP_NAMES,
         devices: Sequence | None = None, progress=None, hlo_dir: str | None = None) -> dict:
    """Compile ``steps`` of ``config`` for ``topology`` and return the plan (a JSON-able dict; see
    ``train/plan.py`` for its fields). ``progress(message)`` is called before each compile; with
    ``hlo_dir`` each compiled step's HLO text is written there (:func:`compile_step`)."""
    unknown = set(steps) - set(STEP_NAMES)
    if unknown:
        raise PlanError(f"unknown step(s) {sorted(unknown)}: choose from {STEP_NAMES}")
    prepared = prepare(config, topology, devices)
    topology, chip, mesh = prepared.topology, prepared.topology.chip, prepared.steps.mesh
    state, batch = prepared.state, prepared.batch
    result: dict[str, Any] = {
        "kind": "mora-jax TPU plan (compiled ahead of time; times are estimates)",
        "topology": topology.name, "chips": topology.chips, "hosts": prepared.hosts,
        "device_kind": chip.device_kind, "hbm_bytes_per_chip": chip.hbm_bytes,
        "chip": {"bf16_flops": chip.bf16_flops, "hbm_bytes_per_s": chip.hbm_bytes_per_s,
                 "ici_bytes_per_s": chip.ici_bytes_per_s, "ici_ports": chip.ici_ports, "source": chip.source},
        "mesh": dict(mesh.shape),
        "run": _run_summary(config, prepared),
        "state_bytes_per_chip": {"frozen": _bytes_per_chip(state.frozen),
                                 "frozen_by_dtype": _bytes_per_chip_by_dtype(state.frozen),
                                 "trainables": _bytes_per_chip(state.trainables),
                                 "opt_state": _bytes_per_chip(state.opt_state)},
        "steps": {},
    }
    say = progress or (lambda message: None)
    kernel_flops = attention_kernel_flops(config, prepared.llama_config, topology.chips)
    resident = sum(v for k, v in result["state_bytes_per_chip"].items() if k != "frozen_by_dtype")
    if "train" in steps and resident > chip.hbm_bytes:
        say(f"the state alone exceeds a {topology.name} chip's HBM: not compiling the train step")
        result["steps"]["train"] = _state_exceeds_hbm(resident, chip)
    elif "train" in steps:
        say(f"compiling the train step for {topology.name} ...")
        train = compile_step(prepared.steps.lower_train(state, batch), chip, name="train",
                             kernel_flops=kernel_flops, hlo_dir=hlo_dir)
        _add_state_to_refusal(train, resident)
        # The Pallas kernel skips masked blocks: the model FLOPs count the causal pairs only (an MFU
        # estimate must not credit the step with products no chip computes)
        train["model_flops_per_step"] = model_flops(
            config, prepared.llama_config, skip_masked_attention=runs_attention_kernel(train.get("kernels") or {}))
        train["estimated_mfu"] = roofline.mfu(train, chip, topology.chips)
        if train.get("estimated_step_s"):
            train["estimated_tokens_per_s"] = config.train.batch_size * config.train.seq_len / train["estimated_step_s"]
        result["steps"]["train"] = train
    if "eval" in steps:
        if config.data.eval_source:
            say(f"compiling the eval step for {topology.name} ...")
            result["steps"]["eval"] = compile_step(prepared.steps.lower_eval(state, batch), chip, name="eval",
                                                     kernel_flops=kernel_flops, hlo_dir=hlo_dir)
        else:
            result["steps"]["eval"] = None
            result["eval_note"] = "the run evaluates nothing (data.eval_source is empty): set it to plan the eval step"
    if getattr(config.data, "accuracy_source", ""):
        result["accuracy_note"] = ("data.accuracy_source: the accuracy's generation (KV-cache decoding) is another "
                                   "program, not planned here")
    if "merge" in steps:
        if _merges(config, state):
            next_type = config.remora.type_at(config.remora.every) if config.method == "mora" else None
            say(f"compiling the ReMoRA merge for {topology.name} ...")
            # The first merge may not donate the frozen weights (they are the caller's): the larger one.
            merge = compile_step(prepared.steps.lower_merge(state, next_type, donate=False), chip, name="merge",
                                 hlo_dir=hlo_dir)
            merge["next_mora_type"] = next_type
            result["steps"]["merge"] = merge
        else:
            result["steps"]["merge"] = None
            result["merge_note"] = "no ReMoRA merges in this run (remora.every = 0, or no adapters)"
    _resident_after_merge(result)
    result["fits"] = all(s["fits"] for s in result["steps"].values() if s is not None)
    return result


def _add_state_to_refusal(step: dict, resident: int) -> None:
    """The compiler's out-of-memory figure is its temporaries alone: a refused step's total adds the
    state it takes as arguments (frozen weights, trainables, optimizer state; the batch is small)."""
    memory = step["bytes_per_chip"]
    if step["compiled"] or memory["arguments"] is not None or memory["temp"] is None:
        return
    memory["arguments"] = resident
    memory["total"] = memory["temp"] + resident


def _state_exceeds_hbm(resident: int, chip: chips_lib.ChipSpec) -> dict:
    """The train step of a run whose state (frozen weights, trainables, optimizer state) per chip is
    already more than the chip's HBM: it cannot fit whatever the step's temporaries, and compiling it
    (minutes for a 70B model) would tell nothing more. Its memory is that lower bound."""
    return {"fits": False, "compiled": False, "compile_s": 0.0,
            "bytes_per_chip": {"arguments": resident, "outputs": None, "aliased": None, "temp": None, "code": None,
                               "total": resident},
            "not_compiled": f"the state alone is {resident / chips_lib.GiB:.2f} GiB per chip, over the chip's "
                            f"{chip.hbm_bytes / chips_lib.GiB:.0f} GiB of HBM (a lower bound: activations come on top)",
            "collectives": {}, "xla_flops": None, "xla_bytes_accessed": None, "estimated_step_s": None, "bound": None}


def _resident_after_merge(result: dict) -> None:
    """After the first ReMoRA merge the loop still holds the frozen weights it started from
    (``loop.run`` keeps them for a restore, the caller keeps its params): the train step then runs
    beside a second copy of them. Charged to the train step's fit."""
    train = result["steps"].get("train")
    if train is None or not result["steps"].get("merge") or not train["compiled"]:
        return
    extra = result["state_bytes_per_chip"]["frozen"]
    train["bytes_per_chip"]["after_first_merge"] = train["bytes_per_chip"]["total"] + extra
    train["fits"] = train["bytes_per_chip"]["after_first_merge"] <= result["hbm_bytes_per_chip"]


def _run_summary(config: RunConfig, prepared: Prepared) -> dict:
    adapter = config.initial_adapter_config()
    llama = prepared.llama_config
    return {
        "method": config.method, "r": getattr(adapter, "r", None), "mora_type": getattr(adapter, "mora_type", None),
        "model": config.model.hf_path or config.model.preset,
        "layers": llama.num_hidden_layers, "hidden_size": llama.hidden_size, "vocab_size": llama.vocab_size,
        "dtype": config.model.dtype, "param_dtype": config.model.param_dtype,
        "quantize": _quantize_summary(config), "loss_chunk": config.train.loss_chunk,
        "remat_policy": config.model.remat_policy, "scan_layers": config.model.scan_layers,
        "batch_size": config.train.batch_size, "seq_len": config.train.seq_len, "grad_accum": config.train.grad_accum,
        "per_chip_micro_batch": config.train.batch_size / config.train.grad_accum / _batch_shards(prepared),
        "remora_every": config.remora.every,
    }


def _quantize_summary(config: RunConfig) -> dict:
    """The base's storage: ``{"format": "none"}`` for a float base, else the quantization's fields."""
    quantize = getattr(config.model, "quantize", None)
    if quantize is None or getattr(quantize, "format", "none") == "none":
        return {"format": "none"}
    return {k: v for k, v in dataclasses.asdict(quantize).items()}


def _batch_shards(prepared: Prepared) -> int:
    n = 1
    for axis in sharding.batch_axes(prepared.steps.mesh):
        n *= prepared.steps.mesh.shape[axis]
    return n


def to_json(result: dict) -> str:
    return json.dumps(result, indent=2, default=_json_default) + "\n"


def _json_default(value):
    if isinstance(value, (set, tuple)):
        return sorted(value) if isinstance(value, set) else list(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON-able: {type(value).__name__}")


__all__ = ["BATCH_KEYS", "STEP_NAMES", "Prepared", "compile_step", "model_config", "model_flops",
           "plan", "prepare", "runs_attention_kernel", "to_json"]
