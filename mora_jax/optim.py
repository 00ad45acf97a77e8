"""Optimizers that train only what should train.

Two equivalent ways, both with no optimizer state for frozen parameters:

1. ``partition`` → differentiate and optimize only the trainable tree (what the training loop does;
   frozen kernels then get no weight gradient at all)::

       trainables, frozen = mora_jax.partition(params, adapters, config)
       opt_state = tx.init(trainables)
       grads = jax.grad(loss)(trainables, frozen, batch)

2. ``masked`` → one optax transformation over the whole ``{'params', 'adapters'}`` tree that sends
   frozen leaves through ``optax.set_to_zero`` (stateless), for code that keeps a single tree.
   (A bare ``optax.masked`` would pass frozen gradients through unchanged.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from mora_jax.adapters import combine, flatten, split, trainable_patterns, unflatten
from mora_jax.errors import ConfigError
from mora_jax.methods import AdapterConfig
from mora_jax.quant.transform import check_not_trained

TRAINABLE, FROZEN = "trainable", "frozen"


def partition(params, adapters, config: AdapterConfig, *, dtype=jnp.float32):
    """``(trainables, frozen)``: ``trainables = {'params': <unfrozen base params>, 'adapters': adapters}``
    cast to ``dtype`` (float32: a master copy for bf16 models), ``frozen`` the rest of ``params``
    untouched. :func:`unpartition` is the inverse."""
    unfrozen, frozen = split(params, trainable_patterns(config))
    check_not_trained(unfrozen)  # a quantized kernel is never trained in full
    # Copies (never aliases of the caller's arrays), so that a jitted step may donate them.
    unfrozen = jax.tree_util.tree_map(lambda x: jnp.array(x, dtype=dtype, copy=True), unfrozen)
    adapters = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), adapters)
    return {"params": unfrozen, "adapters": adapters}, frozen


def unpartition(trainables, frozen, *, params_dtypes=None):
    """``(params, adapters)`` from :func:`partition`'s output. ``params_dtypes`` (a tree like params, or a
    dtype) casts the trained base params back to the model's parameter dtype."""
    unfrozen = trainables["params"]
    if params_dtypes is not None:
        if isinstance(params_dtypes, dict):
            flat_dtypes = flatten(params_dtypes)
            cast = {p: v.astype(flat_dtypes[p]) for p, v in flatten(unfrozen).items()}
        else:
            cast = {p: v.astype(params_dtypes) for p, v in flatten(unfrozen).items()}
        unfrozen = unflatten(cast)
    return combine(unfrozen, frozen), trainables["adapters"]


def param_labels(variables, config: AdapterConfig):
    """``'trainable'`` / ``'frozen'`` for every leaf of ``{'params': params, 'adapters': adapters}``."""
    unfrozen, _ = split(variables["params"], trainable_patterns(config), allow_empty=True)
    trainable_paths = set(flatten(unfrozen))
    labels = {"params": unflatten({p: (TRAINABLE if p in trainable_paths else FROZEN)
                                   for p in flatten(variables["params"])})}
    if "adapters" in variables:
        labels["adapters"] = jax.tree_util.tree_map(lambda _: TRAINABLE, variables["adapters"])
    return labels


def masked(tx: optax.GradientTransformation, config: AdapterConfig) -> optax.GradientTransformation:
    """``tx`` on the adapters and unfrozen params of a ``{'params', 'adapters'}`` tree; frozen leaves get
    zero updates and no state (``optax.multi_transform`` with ``set_to_zero``)."""
    return optax.multi_transform(
        {TRAINABLE: tx, FROZEN: optax.set_to_zero()}, lambda variables: param_labels(variables, config)
    )


def adamw(learning_rate, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.0, clip_norm: float | None = 1.0) -> optax.GradientTransformation:
    """AdamW with global-norm clipping and float32 moments, the loop's default optimizer.

    ``learning_rate`` is a float or an optax schedule; it is injected as a hyperparameter so the
    loop can restart it (ReMoRA) without rebuilding the optimizer.
    """
    def make(learning_rate):
        return optax.chain(
            optax.clip_by_global_norm(clip_norm) if clip_norm else optax.identity(),
            optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mu_dtype=jnp.float32),
        )

    return optax.inject_hyperparams(make)(learning_rate=learning_rate)


def is_optimizer_name(name: str) -> bool:
    """Whether :func:`from_name` knows ``name`` (``"adamw"`` or an optax optimizer function)."""
    return name == "adamw" or (isinstance(name, str) and callable(getattr(optax, name, None)))


def from_name(name: str, learning_rate, *, peak_lr: float | None = None, **kwargs) -> optax.GradientTransformation:
    """Any optax optimizer by name (``"adamw"``, ``"lion"``, ``"sgd"``, ...), with its learning rate
    injected as a hyperparameter (the loop sets it every step). ``"adamw"`` uses :func:`adamw`
    without clipping (the train step clips globally).

    ``peak_lr``: the updates are also scaled by ``peak_lr``, a second injected hyperparameter (an
    array in the optimizer state, not a constant of the compiled step), so the schedule gives the
    shape (peak 1) and runs that differ only in their peak learning rate run one compiled program
    (a learning-rate sweep). Equivalent for optimizers whose update is proportional to the learning
    rate (AdamW with its decoupled weight decay, SGD, Lion, ...)."""
    if name == "adamw" and peak_lr is None:
        return adamw(learning_rate, clip_norm=None, **kwargs)
    if name == "adamw":
        factory = functools.partial(optax.adamw, mu_dtype=jnp.float32)
    else:
        if not is_optimizer_name(name):
            raise ConfigError(f"unknown optimizer {name!r}: use the name of an optax optimizer, e.g. adamw, lion, sgd")
        factory = getattr(optax, name)
    try:
        if peak_lr is None:
            return optax.inject_hyperparams(factory)(learning_rate=learning_rate, **kwargs)
        factory(learning_rate=1.0, **kwargs)  # a wrong argument fails here, not inside the first step
    except TypeError as e:
        raise ConfigError(f"optimizer {name!r} does not accept {sorted(kwargs)}: {e}") from None

    def scaled(learning_rate, peak_lr):
        return optax.chain(factory(learning_rate=learning_rate, **kwargs), optax.scale(peak_lr))

    return optax.inject_hyperparams(scaled)(learning_rate=learning_rate, peak_lr=peak_lr)


def peak_learning_rate(opt_state):
    """The ``peak_lr`` hyperparameter of a :func:`from_name` state made with one (an array), else 1."""
    hyperparams = getattr(opt_state, "hyperparams", None) or {}
    return hyperparams.get("peak_lr", 1.0)


def state_bytes(opt_state) -> int:
    """Bytes held by an optimizer state's arrays."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(opt_state) if hasattr(x, "dtype")))


__all__ = ["adamw", "from_name", "masked", "param_labels", "partition", "peak_learning_rate", "state_bytes",
           "unpartition"]
