"""The pure training step: trainables-only gradients, gradient accumulation, clipping, AdamW.

State is explicit and split the way the memory should be:

* ``frozen``: base parameters that are not trained (in the model's ``param_dtype``, e.g. bf16);
  adapted kernels live here and change only at ReMoRA merges;
* ``trainables = {'params': <unfrozen base params>, 'adapters': <adapter tree>}`` in float32;
* ``opt_state = {'params': ..., 'adapters': ...}``: one optimizer state per group, so ReMoRA can
  give the adapters fresh moments and step count while fully trained parameters keep theirs.

``train_step`` and ``eval_step`` are pure functions of ``(state, batch)``; :mod:`mora_jax.steps`
compiles them over a device mesh with shardings and donation.
Frozen kernels get no weight gradient: only ``trainables`` are differentiated.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from mora_jax import adapters as adapters_lib
from mora_jax.chunked_loss import chunked_cross_entropy
from mora_jax.intercept import apply_model
from mora_jax.methods import AdapterConfig
from mora_jax.optim import partition, peak_learning_rate, unpartition
from mora_jax.quant.formats import is_quantized

Batch = dict[str, jax.Array]
MODEL_INPUTS = ("attention_mask", "segment_ids", "positions")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # completed optimizer updates, int32 scalar
    frozen: Any
    trainables: Any
    opt_state: Any
    rng: jax.Array  # typed PRNG key, for adapter dropout

    @property
    def adapters(self):
        return self.trainables["adapters"]

    def params(self, params_dtypes="model"):
        """The full base parameter tree (frozen + trained). Trained leaves are cast to
        ``params_dtypes``: by default the model's storage dtype (:func:`params_dtype`), None keeps
        their float32 master copy."""
        if isinstance(params_dtypes, str) and params_dtypes == "model":
            params_dtypes = params_dtype(self)
        return unpartition(self.trainables, self.frozen, params_dtypes=params_dtypes)[0]


def params_dtype(state) -> Any:
    """The model's storage dtype of base parameters: that of the frozen weights (a bf16 model stays
    bf16 when its trained parameters are cast back), or None when nothing is frozen."""
    leaves = jax.tree_util.tree_leaves(state.frozen, is_leaf=is_quantized)  # a quantized kernel: its float dtype
    return jnp.dtype(leaves[0].dtype) if leaves else None


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static configuration of the train step (hashable; closed over by jit).

    Attributes:
      grad_accum: micro-batches per optimizer step; the batch's leading dim is split into them.
      clip_norm: global-norm gradient clipping over all trainables (None/0 = off).
      z_loss: optional z-loss coefficient on the log-partition (0 = off).
      loss_chunk: compute the loss this many positions at a time, never holding the whole batch's
        float32 logits (:mod:`mora_jax.chunked_loss`; 0 = off: the plain loss).
    """

    grad_accum: int = 1
    clip_norm: float | None = 1.0
    z_loss: float = 0.0
    loss_chunk: int = 0


def create_train_state(params, adapters, config: AdapterConfig, tx: optax.GradientTransformation, rng) -> TrainState:
    """Split ``params`` into frozen/trainable (float32 master copy) and initialise per-group optimizer state."""
    trainables, frozen = partition(params, adapters, config)
    opt_state = {name: tx.init(tree) for name, tree in trainables.items()}
    return TrainState(step=jnp.zeros((), jnp.int32), frozen=frozen, trainables=trainables, opt_state=opt_state, rng=rng)


def next_token_loss(logits_BxTxV, batch: Batch, z_loss: float = 0.0):
    """Sum of next-token cross-entropy over positions with ``loss_mask`` (position t predicts token t+1),
    and the number of such positions. Computed in float32."""
    targets_BxT, weights_BxT = next_token_targets(batch)
    logits = logits_BxTxV.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets_BxT)
    if z_loss:
        ce = ce + z_loss * jax.nn.logsumexp(logits, axis=-1) ** 2
    ce = jnp.where(weights_BxT > 0, ce, 0.0)  # a non-finite logit at an unweighted position stays out
    return jnp.sum(ce * weights_BxT), jnp.sum(weights_BxT)


def next_token_targets(batch: Batch):
    """Targets and float32 weights ``(B, T)`` of the next-token loss: all T positions with shifted
    targets and the last one weighted 0 (the same sum as slicing ``logits[:, :-1]``, without copying
    the ``(B, T-1, V)`` logits and padding their gradient back)."""
    ids_BxT = batch["input_ids"]
    mask_BxT = batch.get("loss_mask", jnp.ones_like(ids_BxT)).astype(jnp.float32)
    return jnp.roll(ids_BxT, -1, axis=1), mask_BxT.at[:, -1].set(0.0)


def _forward_loss(model, trainables, frozen, batch, rng, step_config, params_dtypes):
    params, adapters = unpartition(trainables, frozen, params_dtypes=params_dtypes)
    kwargs = {name: batch[name] for name in MODEL_INPUTS if name in batch}
    rngs = {"dropout": rng} if rng is not None else None
    if step_config.loss_chunk and step_config.loss_chunk < batch["input_ids"].shape[1]:
        h_BxTxD = apply_model(model, params, batch["input_ids"], adapters=adapters, rngs=rngs, method="hidden",
                              **kwargs)

        def head(h_BxCxD, i):  # an adapter's dropout on the head draws a fresh mask per chunk
            chunk_rngs = {"dropout": jax.random.fold_in(rng, i)} if rng is not None else None
            return apply_model(model, params, h_BxCxD, adapters=adapters, rngs=chunk_rngs, method="head")

        targets_BxT, weights_BxT = next_token_targets(batch)
        total = chunked_cross_entropy(head, h_BxTxD, targets_BxT, weights_BxT, step_config.loss_chunk,
                                      step_config.z_loss)
        return total, jnp.sum(weights_BxT)
    logits = apply_model(model, params, batch["input_ids"], adapters=adapters, rngs=rngs, **kwargs)
    return next_token_loss(logits, batch, step_config.z_loss)


def loss_and_grads(model, state: TrainState, batch: Batch, step_config: StepConfig, rng=None):
    """Mean loss, float32 gradients w.r.t. ``state.trainables`` and token count, accumulated over
    ``step_config.grad_accum`` micro-batches with ``lax.scan`` (the mean is over all tokens)."""
    params_dtypes = params_dtype(state)
    grad_fn = jax.value_and_grad(
        lambda t, b, key: _forward_loss(model, t, state.frozen, b, key, step_config, params_dtypes), has_aux=True
    )
    n = step_config.grad_accum
    if n == 1:
        (loss_sum, count), grads = grad_fn(state.trainables, batch, rng)
    else:
        micro = jax.tree_util.tree_map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)
        keys = jax.random.split(rng, n) if rng is not None else None

        def body(carry, inputs):
            grads_acc, loss_acc, count_acc = carry
            mb, key = inputs
            (loss_sum, count), grads = grad_fn(state.trainables, mb, key)
            grads_acc = jax.tree_util.tree_map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
            return (grads_acc, loss_acc + loss_sum, count_acc + count), None

        zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32), state.trainables)
        (grads, loss_sum, count), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), (micro, keys))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree_util.tree_map(lambda g: g.astype(jnp.float32) / denom, grads)
    return loss_sum / denom, grads, count


def train_step(state: TrainState, batch: Batch, *, model, tx: optax.GradientTransformation,
               schedule: Callable, step_config: StepConfig = StepConfig(), use_dropout: bool = False):
    """One optimizer step. Returns ``(new_state, metrics)``: loss, grad norm, learning rate, token
    count, and the norm of the updated trainables, a cheap on-device check that the new state is
    finite (a non-finite update shows there even when the loss, computed before it, was finite)."""
    rng, step_rng = jax.random.split(state.rng)
    loss, grads, count = loss_and_grads(model, state, batch, step_config, step_rng if use_dropout else None)
    grad_norm = optax.tree.norm(grads)
    if step_config.clip_norm:
        scale = jnp.minimum(1.0, step_config.clip_norm / (grad_norm + 1e-6))
        grads = jax.tree_util.tree_map(lambda g: g * scale, grads)
    lr = schedule(state.step)
    new_trainables, new_opt_state = {}, {}
    for name, tree in state.trainables.items():
        opt_state = _set_learning_rate(state.opt_state[name], lr)
        updates, new_opt_state[name] = tx.update(grads[name], opt_state, tree)
        new_trainables[name] = optax.apply_updates(tree, updates)
    new_state = state.replace(step=state.step + 1, trainables=new_trainables, opt_state=new_opt_state, rng=rng)
    lr = lr * peak_learning_rate(next(iter(state.opt_state.values())))  # with OptimConfig.lr_in_state
    return new_state, {"loss": loss, "grad_norm": grad_norm, "learning_rate": lr, "tokens": count,
                       "trainables_norm": optax.tree.norm(new_trainables)}


def _set_learning_rate(opt_state, lr):
    """Overwrite an ``optax.inject_hyperparams`` state's learning rate (our schedules live outside optax
    so that ReMoRA restarts and the per-group states share one clock)."""
    if hasattr(opt_state, "hyperparams") and "learning_rate" in opt_state.hyperparams:
        hyperparams = dict(opt_state.hyperparams)
        hyperparams["learning_rate"] = jnp.asarray(lr, hyperparams["learning_rate"].dtype)
        return opt_state._replace(hyperparams=hyperparams)
    return opt_state


def eval_step(state: TrainState, batch: Batch, *, model, step_config: StepConfig = StepConfig()):
    """Summed loss and token count over ``batch`` (no dropout), for perplexity over a held-out split."""
    loss_sum, count = _forward_loss(model, state.trainables, state.frozen, batch, None, step_config, params_dtype(state))
    return {"loss_sum": loss_sum, "tokens": count}


def logits_fn(model, state: TrainState, input_ids, **kwargs):
    """Logits of the model as trained so far (adapters unmerged)."""
    return apply_model(model, state.params(), input_ids, adapters=state.adapters, **kwargs)


def trainable_summary(state: TrainState) -> str:
    n_train = adapters_lib.count_params(state.trainables)
    n_total = adapters_lib.count_params(state.frozen) + adapters_lib.count_params(state.trainables["params"])
    n_adapter = adapters_lib.count_params(state.trainables["adapters"])
    return (f"trainable parameters: {n_train:,} ({n_adapter:,} in adapters) of {n_total + n_adapter:,} "
            f"({100.0 * n_train / max(n_total + n_adapter, 1):.3f}%)")
