"""What a checkpoint records about itself: its JSON metadata and the fingerprint of the frozen weights.

:class:`CheckpointMetadata` is the ``meta`` item of every checkpoint (readable without touching an
array). When a checkpoint does not save the frozen base weights (no ReMoRA merge has changed them),
it records :func:`frozen_fingerprint`, a few exact values of each of them, so that restoring with
other weights (another source, or merged weights passed as the initial ones) is an error rather
than a silently wrong model.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mora_jax.adapters import MoRAAdapter
from mora_jax.checkpoint.integrity import METADATA_FORMAT, CheckpointMismatch

_SAMPLES_PER_AXIS = 4  # frozen-weight fingerprint: a 4 x 4 (x ...) grid of values per leaf


@dataclasses.dataclass(frozen=True)
class CheckpointMetadata:
    """The JSON item of one checkpoint (readable without touching any array).

    Attributes:
      step: the step the checkpoint was saved at.
      data_state: the data iterator's ``get_state()`` dict.
      mora_type: MoRA operator type of the adapters at that step (ReMoRA switches it at merges);
        None when there are no MoRA adapters (LoRA, full fine-tuning).
      frozen_changed: whether the frozen base weights differed from the run's initial weights.
      frozen_saved: whether this checkpoint holds the frozen base weights (== ``frozen_changed``).
      rng_impl: PRNG implementation name of the typed key (None for a raw ``uint32`` key).
      run_config: the Checkpointer's ``run_config``.
      meta: the caller's ``meta`` dict given to :meth:`Checkpointer.save`.
      frozen_fingerprint: sampled values of the frozen weights when they were not saved.
    """

    step: int
    data_state: dict | None
    mora_type: int | list[int] | None
    frozen_changed: bool
    frozen_saved: bool
    rng_impl: str | None
    run_config: dict | None
    meta: dict
    frozen_fingerprint: dict | None = None
    format: str = METADATA_FORMAT

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> "CheckpointMetadata":
        if record.get("format") != METADATA_FORMAT:
            raise ValueError(f"unsupported checkpoint metadata format {record.get('format')!r}; expected "
                             f"{METADATA_FORMAT!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in fields})


def _is_mora(x) -> bool:
    return isinstance(x, MoRAAdapter)


def with_mora_type(tree, mora_type: int):
    """``tree`` (a TrainState, an adapter tree, an optimizer state, abstract or not) with every
    :class:`MoRAAdapter` node's static ``mora_type`` replaced.

    Use it to turn a restore target built from the run's initial config into the structure of a
    checkpoint taken after ReMoRA switched types (:meth:`Checkpointer.restore` does it for you, from
    :attr:`CheckpointMetadata.mora_type`).
    """
    return jax.tree_util.tree_map(
        lambda x: x.replace(mora_type=mora_type) if _is_mora(x) else x, tree, is_leaf=_is_mora
    )


def is_typed_key(x) -> bool:
    """Whether ``x`` is a typed PRNG key (saved as its key data)."""
    return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def abstract_leaf(x):
    """A ``jax.ShapeDtypeStruct`` for a leaf (array or struct), keeping its sharding if it has one."""
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def _fingerprint_tree(tree):
    """A few values of every leaf, on a small grid of indices per axis (exact float32 values)."""

    def sample(x):
        if x.ndim == 0:
            return x.astype(jnp.float32).reshape(1)
        grid = [np.unique(np.linspace(0, n - 1, _SAMPLES_PER_AXIS).astype(np.int64)) if n else np.arange(0)
                for n in x.shape]
        return x[np.ix_(*grid)].astype(jnp.float32).reshape(-1)

    return jax.tree_util.tree_map(sample, tree)


_fingerprint_jit = jax.jit(_fingerprint_tree)


def frozen_fingerprint(frozen) -> dict[str, list[float]]:
    """JSON-able fingerprint of a weight tree: ``{key path: sampled values}``.

    Exact sampled values (not sums), so it does not depend on the sharding or the reduction order,
    yet differs for other weights (another seed or source) and for merged weights.
    """
    sampled = _fingerprint_jit(frozen)
    if jax.process_count() > 1:  # sampled values of arrays sharded across hosts
        from jax.experimental import multihost_utils

        sampled = multihost_utils.process_allgather(sampled, tiled=True)
    sampled = jax.device_get(sampled)
    flat, _ = jax.tree_util.tree_flatten_with_path(sampled)
    return {jax.tree_util.keystr(path): [float(v) for v in np.asarray(values)] for path, values in flat}


def fingerprint_mismatch(expected: Mapping[str, list], actual: Mapping[str, list]) -> str | None:
    """A description of the first difference between two fingerprints, or None if they agree."""
    if set(expected) != set(actual):
        missing, extra = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
        return f"different parameters (missing {missing[:5]}, unexpected {extra[:5]})"
    for name in sorted(expected):
        if not np.array_equal(np.asarray(expected[name]), np.asarray(actual[name]), equal_nan=True):
            return f"{name} differs (sampled values {expected[name][:3]}... vs {actual[name][:3]}...)"
    return None


def check_initial_frozen(where: str, info: CheckpointMetadata, abstract_frozen, initial_frozen) -> None:
    """``initial_frozen`` must be given, have ``abstract_frozen``'s structure, and be the weights the
    checkpoint ``where`` (described by ``info``) was trained from."""
    if initial_frozen is None:
        raise ValueError(
            f"{where} did not save the frozen base weights (no ReMoRA merge had changed them): pass "
            "initial_frozen=, the base weights loaded from the run's source (the frozen part of the initial params)."
        )
    expected = jax.tree_util.tree_map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), abstract_frozen)
    given = jax.tree_util.tree_map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), initial_frozen)
    if jax.tree_util.tree_structure(expected) != jax.tree_util.tree_structure(given) or expected != given:
        raise ValueError("initial_frozen does not have the structure, shapes and dtypes of "
                         "abstract_state.frozen; were they loaded for another model or config?")
    if info.frozen_fingerprint is not None:
        mismatch = fingerprint_mismatch(info.frozen_fingerprint, frozen_fingerprint(initial_frozen))
        if mismatch:
            raise CheckpointMismatch(
                f"the base weights given (initial_frozen) are not the base weights {where} was trained from "
                f"({mismatch}): resume with the model the run started from (the same model.hf_path, or model.preset "
                "and seed)")


def json_copy(value, what: str):
    """A deep copy of ``value`` through JSON (so later mutation by the caller cannot leak into an
    asynchronous save), with a clear error for values JSON cannot hold."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON-serialisable (dicts, lists, str, numbers, bool, None): {e}") from None


__all__ = ["CheckpointMetadata", "abstract_leaf", "check_initial_frozen", "fingerprint_mismatch", "frozen_fingerprint",
           "is_typed_key", "json_copy", "with_mora_type"]
