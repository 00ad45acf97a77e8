"""Every compiled step of a run, built in one place: train, eval and the ReMoRA merge.

:func:`build_steps` turns the pure functions (:func:`mora_jax.training.train_step`,
:func:`mora_jax.training.eval_step`, :func:`mora_jax.remora.merge_and_reset`) into ``jax.jit``
programs over a device mesh, with ``in_shardings`` / ``out_shardings`` from the sharding rules and
donation. The loop, the benchmark harness, the TPU planner and the tests all call it, so whatever
they time or compile is the step a run executes.

* **One path.** Without a mesh the steps run on a 1-device mesh of the default device: the same
  shardings, the same jit, the same donation as on a pod slice.
* **Activations.** Steps are traced under the mesh and the logical-axis rules, so the model's
  ``nn.with_logical_constraint`` annotations become sharding constraints.
* **Donation: one rule.** The frozen base weights usually belong to the caller (the params handed
  to the loop), so a step never deletes them: the train step takes them as a separate input that is
  neither donated nor returned (no copy of the base model per step) and donates everything else in
  place. The ReMoRA merge writes new frozen weights; it donates the old ones only when this run
  produced them (after a first merge, or restored from a checkpoint), never the ones passed to
  :meth:`Steps.place`. :meth:`Steps.owns_frozen` is that rule.
* **Structure changes.** A merge can change the adapters' static metadata (MoRA's ``mora_type``);
  compiled functions are cached per state structure and reuse the same sharding leaves.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh, NamedSharding

from mora_jax import mesh as mesh_lib
from mora_jax import remora, sharding, training, xla_tuning
from mora_jax.sharding import DEFAULT_RULES, ShardingRules


def default_mesh() -> Mesh:
    """The mesh used when none is given: the default device alone (one process), or every device
    as data parallelism (several processes, where each must hold a part of the batch)."""
    if jax.process_count() == 1:
        return mesh_lib.make_mesh(mesh_lib.MeshConfig(axis_sizes=(1, 1, 1)), devices=jax.devices()[:1])
    return mesh_lib.make_mesh(mesh_lib.MeshConfig())


def abstract(tree):
    """``jax.ShapeDtypeStruct``s (with shardings, where the leaves have them) for a tree of arrays."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def _restructure(shardings, like):
    """``shardings`` re-wrapped in the pytree structure of ``like`` (same leaves, same order).

    ``jax.jit`` compares sharding trees with the argument's structure, static metadata included,
    and a ReMoRA merge changes that metadata (MoRA's ``mora_type``)."""
    treedef = jax.tree_util.tree_structure(like)
    if jax.tree_util.tree_structure(shardings) == treedef:
        return shardings
    leaves = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    if len(leaves) != treedef.num_leaves:
        raise ValueError(
            f"the state has {treedef.num_leaves} arrays but its shardings have {len(leaves)}: the state's "
            "structure changed (other adapters or optimizer); build the steps for this state")
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _structure_key(tree, *static):
    return (jax.tree_util.tree_structure(tree), *static)


class Steps:
    """The compiled steps of one run on one mesh. Build with :func:`build_steps`.

    ``train(state, batch) -> (state, metrics)``, ``eval(state, batch) -> {'loss_sum', 'tokens'}`` and
    ``merge(state, next_type) -> state`` take device batches (:meth:`shard_batch` makes them from
    this process's numpy rows); ``lower_*`` give the ``jax.stages.Lowered`` of the same programs for
    abstract arguments (``jax.ShapeDtypeStruct`` with shardings), e.g. to compile for a TPU topology.
    """

    def __init__(self, model, tx: optax.GradientTransformation, schedule: Callable,
                 step_config: training.StepConfig, mesh: Mesh, rules: ShardingRules, *,
                 use_dropout: bool, reset_optimizer: bool, compiler_options: Mapping[str, Any] | None):
        self.model, self.tx, self.schedule, self.step_config = model, tx, schedule, step_config
        self.mesh, self.rules = mesh, rules
        self.use_dropout, self.reset_optimizer = use_dropout, reset_optimizer
        self.compiler_options = dict(compiler_options) if compiler_options else None
        self.replicated = mesh_lib.replicated(mesh)
        self.batch_sharding = sharding.batch_sharding(mesh, rules)
        self._flax_rules = rules.flax_rules(mesh)
        self._cache: dict = {}
        self._borrowed: set[int] = set()
        self._borrowed_arrays: list = []
        self._shardings = None

    # ----- layout ---------------------------------------------------------------------------

    def state_shardings(self, state) -> training.TrainState:
        """``NamedSharding``s of ``state`` (concrete or abstract) by the sharding rules; computed
        once per run and reused for every structure the state takes."""
        if self._shardings is None:
            self._shardings = sharding.state_shardings(abstract(state), self.mesh, self.rules)
        return _restructure(self._shardings, state)

    def place(self, state: training.TrainState) -> training.TrainState:
        """``state`` laid out on the mesh, ready to be donated to :meth:`train`.

        Everything but the frozen weights is copied (donating it never deletes the caller's
        arrays); the frozen weights are put in place without a copy where they already are, and
        are remembered as borrowed: no step deletes them (see the module docstring)."""
        shardings = self.state_shardings(state)
        frozen = mesh_lib.put(state.frozen, shardings.frozen)
        # Hold the borrowed arrays (not just their ids: a freed array's id could be reused by a
        # weight this run produced, which would then never be donated).
        self._borrowed_arrays = jax.tree_util.tree_leaves(frozen) + jax.tree_util.tree_leaves(state.frozen)
        self._borrowed = {id(x) for x in self._borrowed_arrays}
        rest = sharding.place(state.replace(frozen=None), shardings.replace(frozen=None))
        return rest.replace(frozen=frozen)

    def owns_frozen(self, state: training.TrainState) -> bool:
        """Whether ``state``'s frozen weights were produced by this run (a merge or a restore) and may
        be donated; False while any of them is one of the weights handed to :meth:`place`."""
        return not any(id(x) in self._borrowed for x in jax.tree_util.tree_leaves(state.frozen))

    def shard_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """Global device arrays from this process's rows of a batch (see :func:`sharding.shard_batch`)."""
        return sharding.shard_batch(batch, self.mesh, self.rules)

    def _traced(self, fn):
        def traced(*args):
            with nn.logical_axis_rules(self._flax_rules):
                return fn(*args)
        return traced

    def _jit(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    # ----- train ----------------------------------------------------------------------------

    def _train_jit(self, state):
        def build():
            state_sh = self.state_shardings(state)

            def step(frozen, rest, batch):
                new_state, metrics = training.train_step(
                    rest.replace(frozen=frozen), batch, model=self.model, tx=self.tx, schedule=self.schedule,
                    step_config=self.step_config, use_dropout=self.use_dropout)
                return new_state.replace(frozen=None), metrics

            rest_sh = state_sh.replace(frozen=None)
            return jax.jit(self._traced(step),
                           in_shardings=(state_sh.frozen, rest_sh, self.batch_sharding),
                           out_shardings=(rest_sh, self.replicated), donate_argnums=(1,),
                           compiler_options=self.compiler_options)
        return self._jit(("train", _structure_key(state)), build)

    def train(self, state: training.TrainState, batch) -> tuple[training.TrainState, dict]:
        """One optimizer step; ``state`` (all but its frozen weights) is donated."""
        with sharding.use_mesh(self.mesh, self.rules):
            rest, metrics = self._train_jit(state)(state.frozen, state.replace(frozen=None), batch)
        return rest.replace(frozen=state.frozen), metrics

    def lower_train(self, state, batch) -> jax.stages.Lowered:
        with sharding.use_mesh(self.mesh, self.rules):
            return self._train_jit(state).lower(state.frozen, state.replace(frozen=None), batch)

    # ----- eval -----------------------------------------------------------------------------

    def _eval_jit(self, state):
        def build():
            fn = functools.partial(training.eval_step, model=self.model, step_config=self.step_config)
            return jax.jit(self._traced(fn), in_shardings=(self.state_shardings(state), self.batch_sharding),
                           out_shardings=self.replicated)
        return self._jit(("eval", _structure_key(state)), build)

    def eval(self, state: training.TrainState, batch) -> dict:
        """Summed loss and token count of ``batch`` (nothing donated)."""
        with sharding.use_mesh(self.mesh, self.rules):
            return self._eval_jit(state)(state, batch)

    def lower_eval(self, state, batch) -> jax.stages.Lowered:
        with sharding.use_mesh(self.mesh, self.rules):
            return self._eval_jit(state).lower(state, batch)

    # ----- ReMoRA merge ---------------------------------------------------------------------

    def _merge_jit(self, state, next_type, donate: bool):
        def build():
            fn = self._traced(functools.partial(remora.merge_and_reset, tx=self.tx, next_type=next_type,
                                                reset_optimizer=self.reset_optimizer))
            in_sh = self.state_shardings(state)
            with sharding.use_mesh(self.mesh, self.rules):
                out_sh = _restructure(in_sh, jax.eval_shape(fn, state))
            return jax.jit(fn, in_shardings=(in_sh,), out_shardings=out_sh, donate_argnums=(0,) if donate else ())
        return self._jit(("merge", _structure_key(state, next_type, donate)), build)

    def merge(self, state: training.TrainState, next_type: int | None) -> training.TrainState:
        """Fold the adapters into the frozen weights and start fresh ones (MoRA: of ``next_type``).
        Donates the state, its frozen weights included when :meth:`owns_frozen`."""
        with sharding.use_mesh(self.mesh, self.rules):
            return self._merge_jit(state, next_type, self.owns_frozen(state))(state)

    def lower_merge(self, state, next_type: int | None, *, donate: bool = True) -> jax.stages.Lowered:
        with sharding.use_mesh(self.mesh, self.rules):
            return self._merge_jit(state, next_type, donate).lower(state)


def build_steps(model, tx: optax.GradientTransformation, schedule: Callable,
                step_config: training.StepConfig = training.StepConfig(), *, mesh: Mesh | None = None,
                rules: ShardingRules | None = None, use_dropout: bool = False, reset_optimizer: bool = True,
                compiler_options: Mapping[str, Any] | None | str = "auto") -> Steps:
    """The compiled train / eval / merge steps of a run.

    Args:
      model: a Flax model (``mora_jax.apply_model`` applies it with adapters).
      tx: the optax optimizer, applied to each trainable group (its learning rate is set every
        step from ``schedule``; clipping is global, in the step).
      mesh: the device mesh (:func:`mora_jax.mesh.make_mesh`); None = :func:`default_mesh`.
      rules: sharding rules (default :data:`mora_jax.sharding.DEFAULT_RULES`).
      use_dropout: pass a dropout rng to the model (adapter dropout).
      reset_optimizer: fresh adapter optimizer state at each merge (ReMoRA).
      compiler_options: XLA options of the train step; ``"auto"`` =
        :func:`mora_jax.xla_tuning.train_step_compiler_options` for the mesh's platform.
    """
    mesh = mesh if mesh is not None else default_mesh()
    if isinstance(compiler_options, str):
        compiler_options = xla_tuning.train_step_compiler_options(xla_tuning.mesh_platform(mesh))
    return Steps(model, tx, schedule, step_config, mesh, rules or DEFAULT_RULES, use_dropout=use_dropout,
                 reset_optimizer=reset_optimizer, compiler_options=compiler_options)


__all__ = ["Steps", "abstract", "build_steps", "default_mesh"]
