"""One process of the multi-process training check (driven by tests/test_multihost.py).

Trains the tiny LLaMA with MoRA (embeddings, LM head and norms unfrozen) for a few steps on a
``data 2 × fsdp 2 × tensor 2`` mesh over every device of every process, each process feeding
only its own rows of the global batch, and writes the losses to a JSON file. Run with one
process (8 local devices) or several (``--num-processes``, ``--process-id``, ``--coordinator``,
each with its share of the devices); the results must agree.

The caller sets ``JAX_PLATFORMS=cpu`` and ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
in the environment: they must be in place before JAX starts.
"""

from __future__ import annotations

import argparse
import json
import pathlib

GLOBAL_BATCH, LENGTH = 8, 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=pathlib.Path, help="JSON file for this process's results")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--coordinator", default=None, help="host:port of process 0 (multi-process runs)")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    from mora_jax import distributed

    if args.num_processes > 1:  # before anything touches a JAX device
        distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id,
                               initialization_timeout=120)

    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    import mora_jax as mj
    from mora_jax import mesh as mesh_lib
    from mora_jax import sharding as shd
    from mora_jax import training
    from mora_jax.models.config import LLAMA_CONFIGS
    from mora_jax.models.llama import LlamaForCausalLM
    from mora_jax.steps import build_steps

    cfg = dataclasses.replace(LLAMA_CONFIGS["tiny"], num_attention_heads=8, num_key_value_heads=4)
    model = LlamaForCausalLM(cfg)
    adapter_config = mj.MoRAConfig(r=4, mora_type=1, unfreeze=mj.LLAMA_FULLY_TRAINED)
    tx = mj.optim.adamw(3e-3)

    def init_state(seed):
        key = jax.random.key(seed)
        params = model.init(key, jnp.zeros((1, 8), jnp.int32))["params"]
        adapters = mj.init_adapters(params, adapter_config, jax.random.fold_in(key, 1))
        return training.create_train_state(params, adapters, adapter_config, tx, jax.random.fold_in(key, 2))

    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(("data", "fsdp", "tensor"), (2, 2, 2)))
    state, state_sh = shd.init_sharded_state(init_state, np.int32(0), mesh=mesh)
    steps = build_steps(model, tx, lambda s: 3e-3, training.StepConfig(), mesh=mesh)
    assert steps.state_shardings(state) == state_sh  # the builder lays the state out as init did
    rows = distributed.process_batch_slice(GLOBAL_BATCH, shd.batch_sharding(mesh))

    losses = []
    for i in range(args.steps):
        # every process knows the global batch here; a real loader would read only its own rows
        ids = np.random.default_rng(i).integers(0, cfg.vocab_size, (GLOBAL_BATCH, LENGTH)).astype(np.int32)
        state, metrics = steps.train(state, steps.shard_batch({"input_ids": ids[rows]}))
        losses.append(float(metrics["loss"]))

    with shd.use_mesh(mesh):
        checksum = jax.jit(lambda t: sum(jnp.sum(jnp.abs(x)) for x in jax.tree_util.tree_leaves(t)),
                           out_shardings=mesh_lib.replicated(mesh))(state.trainables)
    q = state.frozen["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    result = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "global_devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "rows": [rows.start, rows.stop],
        "losses": losses,
        "trainables_abs_sum": float(checksum),
        "q_proj_spec": [list(e) if isinstance(e, tuple) else e for e in q.sharding.spec],
        "q_proj_local_shard_shapes": [list(s.data.shape) for s in q.addressable_shards],
    }
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
