"""The core of self-attention, one function for every platform: ``softmax(q·kᵀ·scale + mask)·v``.

:func:`dot_product_attention` takes queries, keys and values after the rotary embedding, with
grouped-query heads (``N = K·G`` query heads, ``K`` key/value heads; query head ``n`` reads key/value
head ``n // G``, as HF's ``repeat_kv``), and runs one of four implementations:

=========  ==========================================================================================
``xla``    the einsum / softmax / einsum of HF's eager attention: a ``(T, S)`` score matrix per head
           (any platform; the only one with attention dropout and arbitrary dense or additive masks).
``flash``  JAX's Pallas TPU kernel (``jax.experimental.pallas.ops.tpu.splash_attention``): blockwise,
           no ``(T, S)`` matrix in HBM, causal and sliding-window masks as block sparsity, packed
           sequences as segment ids, grouped-query heads natively. TPU only (or interpreted, see
           :func:`interpret_kernels`). Under a mesh it runs per device in a ``shard_map`` over the
           batch and head axes of the logical-axis rules.
``cudnn``  ``jax.nn.dot_product_attention(implementation="cudnn")``, cuDNN's fused flash attention:
           GPU only, bfloat16/float16, head size a multiple of 8 up to 128 (256 on Hopper).
``auto``   by platform: ``flash`` on TPU, ``cudnn`` on GPU where its constraints allow, ``xla``
           otherwise (and on CPU); also ``xla`` wherever the chosen kernel cannot run the request
           (attention dropout, a dense or additive mask the kernel does not take).
=========  ==========================================================================================

The platform is that of the ambient mesh (``jax.set_mesh`` / :func:`mora_jax.sharding.use_mesh`), so
compiling ahead of time for a TPU topology from a CPU host picks the TPU kernel; without a mesh it is
``jax.default_backend()``. Asking for a kernel on a platform that cannot run it is a ``ValueError``
naming what to use instead.

Masks. Attention is causal (queries are the last ``T`` of the ``S`` key positions) unless
``causal=False`` or a dense ``mask`` is given alone; ``segment_ids`` (B, T) keep attention within a
packed sequence (query and key must have the same id, and key id 0 is padding); ``sliding_window=w``
lets a query at position ``i`` see keys ``j`` with ``i - w < j`` (``w`` keys including itself:
Mistral's convention). ``mask`` is a dense boolean mask (True = attend) broadcastable to
``(B, K, G, T, S)``, complete in itself (a KV-cache step's), or a :class:`SegmentMask`, the form the
kernels take instead of a ``(T, S)`` matrix; ``bias`` adds an additive float mask. Every constraint
given is applied (they are and-ed).

Shape suffixes: B batch, T query length, S key length, N query heads, K key/value heads, G query
heads per key/value head, H head size.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "xla", "flash", "cudnn")
# What "auto" picks on each platform (before the kernel's own constraints are checked).
AUTO_BY_PLATFORM = {"tpu": "flash", "gpu": "cudnn", "cuda": "cudnn", "rocm": "xla", "cpu": "xla"}
_KERNEL_PLATFORMS = {"flash": ("tpu",), "cudnn": ("gpu", "cuda")}
_KERNEL_LANES = 128  # the Pallas TPU kernel tiles the sequence in multiples of 128
_INTERPRET = contextvars.ContextVar("mora_jax_attention_interpret", default=False)


def check_implementation(implementation: str, where: str = "attention") -> str:
    """``implementation`` if it is one of :data:`IMPLEMENTATIONS`, else a ``ValueError``."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"{where}={implementation!r} is not an attention implementation; use one of {IMPLEMENTATIONS}")
    return implementation


@contextlib.contextmanager
def interpret_kernels(enabled: bool = True):
    """Run the Pallas kernel in interpret mode (on any platform, slowly) in functions *traced*
    inside this context: for checking ``attention="flash"`` numerics on a CPU."""
    token = _INTERPRET.set(enabled)
    try:
        yield
    finally:
        _INTERPRET.reset(token)


def current_platform() -> str:
    """The platform the computation being built is for: the ambient mesh's, else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    platform = getattr(device, "platform", None)
    return platform or jax.default_backend()


def resolve(implementation: str, platform: str | None = None, *, interpret: bool | None = None) -> str:
    """The implementation ``implementation`` stands for on ``platform`` (default: the current one):
    ``auto`` by platform, an explicit kernel checked against the platform (``ValueError`` if it
    cannot run there). The kernel's own shape/dtype constraints are checked at call time."""
    check_implementation(implementation)
    platform = (platform or current_platform()).lower()
    interpret = _INTERPRET.get() if interpret is None else interpret
    if implementation == "auto":
        return "flash" if interpret else AUTO_BY_PLATFORM.get(platform, "xla")
    if implementation in _KERNEL_PLATFORMS and platform not in _KERNEL_PLATFORMS[implementation]:
        if implementation == "flash" and interpret:
            return implementation
        needs = {"flash": "a TPU (it is JAX's Pallas TPU kernel)", "cudnn": "an NVIDIA GPU with cuDNN"}[implementation]
        raise ValueError(
            f"attention={implementation!r} needs {needs}, but this computation is for {platform!r}; use "
            f"attention='auto' (flash on TPU, cudnn on GPU, the einsum elsewhere) or 'xla'"
            + (" (or mora_jax.models.attention.interpret_kernels() to interpret the kernel)" if implementation == "flash" else ""))
    return implementation


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SegmentMask:
    """Which keys each query sees, in the form the kernels take instead of a ``(T, S)`` matrix:
    ``segment_ids`` (B, T) int32, attention only within equal ids, 0 = padding; causal; and, with
    ``sliding_window``, at most that many keys back (the query itself included)."""

    segment_ids: jax.Array
    sliding_window: int | None = dataclasses.field(default=None, metadata=dict(static=True))

    @classmethod
    def from_inputs(cls, shape: tuple[int, int], attention_mask=None, segment_ids=None, *,
                    sliding_window: int | None = None) -> "SegmentMask":
        """From a model's inputs: ``segment_ids`` (packed sequences, 0 = padding) and/or an
        ``attention_mask`` (1 = token, 0 = padding key); neither = one sequence per row.

        For every real token this is the mask of the dense path; a padding query sees only
        padding keys (the dense path gives it a row of all keys or none: its output is unused)."""
        ids = jnp.ones(shape, jnp.int32) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
        if attention_mask is not None:
            ids = jnp.where(jnp.asarray(attention_mask) != 0, ids, 0)
        return cls(jnp.broadcast_to(ids, shape), sliding_window)


def takes_segment_mask(implementation: str, platform: str | None = None) -> bool:
    """Whether ``implementation`` on ``platform`` (default: the current one) wants a
    :class:`SegmentMask` rather than a dense ``(T, S)`` mask (a kernel, not the einsum)."""
    return resolve(implementation, platform) != "xla"


def dense_mask(query_length: int, key_length: int, *, causal: bool = True, segment_ids=None,
               key_segment_ids=None, sliding_window: int | None = None) -> jax.Array | None:
    """Boolean ``(B or 1, 1, 1, T, S)`` mask of the given constraints (None if there are none)."""
    offset = key_length - query_length
    q_idx = jnp.arange(query_length)[:, None] + offset
    k_idx = jnp.arange(key_length)[None, :]
    mask = None

    def both(a, b):
        return b if a is None else a & b

    if causal:
        mask = both(mask, (q_idx >= k_idx)[None])
    if sliding_window is not None:
        mask = both(mask, (q_idx - k_idx < sliding_window)[None])
    if segment_ids is not None:
        key_ids = segment_ids if key_segment_ids is None else key_segment_ids
        same = (segment_ids[:, :, None] == key_ids[:, None, :]) & (key_ids != 0)[:, None, :]
        mask = both(mask, same)
    return None if mask is None else mask[:, None, None]


def dot_product_attention(
    q_BxTxNxH: jax.Array,
    k_BxSxKxH: jax.Array,
    v_BxSxKxH: jax.Array,
    mask: jax.Array | SegmentMask | None = None,
    *,
    implementation: str = "xla",
    segment_ids: jax.Array | None = None,
    bias: jax.Array | None = None,
    causal: bool | None = None,
    sliding_window: int | None = None,
    scale: float | None = None,
    dropout: Callable[[jax.Array], jax.Array] | None = None,
    dtype: Any = None,
    interpret: bool | None = None,
    block_size: int | None = None,
) -> jax.Array:
    """``(B, T, N, H)`` attention output (module docstring: implementations and masks).

    Args:
      q_BxTxNxH, k_BxSxKxH, v_BxSxKxH: queries, keys, values (after RoPE), ``N`` a multiple of ``K``.
      mask: a dense boolean mask broadcastable to ``(B, K, G, T, S)`` (True = attend), taken as
        complete unless ``causal`` / ``segment_ids`` / ``sliding_window`` are also given; or a
        :class:`SegmentMask` (segment ids, causal, its sliding window).
      implementation: ``auto``, ``xla``, ``flash`` or ``cudnn``.
      segment_ids: ``(B, T)`` packed-sequence ids (self-attention, ``T == S``), 0 = padding.
      bias: additive float mask broadcastable to ``(B, K, G, T, S)`` (``xla`` and ``cudnn``).
      causal: mask keys after the query (the query at ``i`` is key position ``i + S - T``);
        default True, except with a dense ``mask`` (then False: the mask says it all).
      sliding_window: each query sees at most this many keys, itself included.
      scale: the score scale (default ``H ** -0.5``).
      dropout: ``probs -> probs`` applied to the attention probabilities (``xla`` only; pass None
        when inactive).
      dtype: the probabilities' and output's dtype (default ``q``'s).
      interpret: run the Pallas kernel interpreted (default: :func:`interpret_kernels`' setting).
      block_size: the Pallas kernel's query/key block (a multiple of 128; default the largest of
        512, 256, 128 that divides the padded length).
    """
    B, T, N, H = q_BxTxNxH.shape
    _, S, K, _ = k_BxSxKxH.shape
    if k_BxSxKxH.shape != v_BxSxKxH.shape or k_BxSxKxH.shape[0] != B or k_BxSxKxH.shape[3] != H:
        raise ValueError(f"k {k_BxSxKxH.shape} and v {v_BxSxKxH.shape} must be (B, S, K, H) with q's B and H "
                         f"(q is {q_BxTxNxH.shape})")
    if N % K:
        raise ValueError(f"{N} query heads are not a multiple of {K} key/value heads (grouped-query attention)")
    if isinstance(mask, SegmentMask):
        if segment_ids is not None or (sliding_window is not None and mask.sliding_window is not None):
            raise ValueError("give segment_ids and sliding_window once: in mask=SegmentMask(...) or as arguments")
        mask, segment_ids, sliding_window = None, mask.segment_ids, mask.sliding_window or sliding_window
    if causal is None:
        causal = mask is None
    if segment_ids is not None and (T != S or tuple(segment_ids.shape) != (B, T)):
        raise ValueError(f"segment_ids {tuple(segment_ids.shape)} must be (B, T) = {(B, T)} for self-attention (T == S)")
    if sliding_window is not None and (isinstance(sliding_window, bool) or int(sliding_window) < 1):
        raise ValueError(f"sliding_window must be a positive number of keys or None, got {sliding_window!r}")
    interpret = _INTERPRET.get() if interpret is None else interpret
    dtype = jnp.dtype(dtype or q_BxTxNxH.dtype)
    scale = H**-0.5 if scale is None else scale

    chosen = resolve(implementation, interpret=interpret)
    if chosen != "xla":
        obstacles = _obstacles(chosen, q_BxTxNxH, k_BxSxKxH, mask=mask, bias=bias, dropout=dropout,
                               dtype=dtype, causal=causal, sliding_window=sliding_window)
        if obstacles:
            if implementation != "auto":
                raise ValueError(f"attention={implementation!r} cannot run this call: {'; '.join(obstacles)}. "
                                 "Use attention='xla' (or 'auto', which falls back to it)")
            logger.debug("attention: %s cannot run (%s); using xla", chosen, "; ".join(obstacles))
            chosen = "xla"
    if chosen == "flash":
        out = _flash(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids, causal=causal, sliding_window=sliding_window,
                     scale=scale, interpret=interpret, block_size=block_size)
    elif chosen == "cudnn":
        out = _cudnn(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask, segment_ids, bias, causal=causal,
                     sliding_window=sliding_window, scale=scale, dtype=dtype)
    else:
        extra = dense_mask(T, S, causal=causal, segment_ids=segment_ids, sliding_window=sliding_window)
        mask = extra if mask is None else (mask if extra is None else mask & extra)
        out = _xla(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask, bias, scale=scale, dropout=dropout, dtype=dtype)
    return out.astype(dtype)


def _obstacles(chosen, q, k, *, mask, bias, dropout, dtype, causal, sliding_window) -> list[str]:
    """Why the kernel ``chosen`` cannot run this call (empty: it can)."""
    H = q.shape[-1]
    out = []
    if dropout is not None:
        out.append("it has no attention dropout (set attention_dropout=0 or train deterministically)")
    if chosen == "flash":
        if mask is not None:
            out.append("the Pallas kernel takes causal / segment_ids / sliding_window, not a dense mask")
        if bias is not None:
            out.append("the Pallas kernel takes no additive bias")
        if q.shape[1] != k.shape[1]:
            out.append(f"the Pallas kernel does self-attention only (T={q.shape[1]} queries, S={k.shape[1]} keys)")
    elif chosen == "cudnn":
        if dtype.name not in ("bfloat16", "float16") or q.dtype.name not in ("bfloat16", "float16"):
            out.append(f"cuDNN attention needs bfloat16 or float16 inputs, got {q.dtype.name} (set model.dtype)")
        if H % 8 or H > 256:
            out.append(f"cuDNN attention needs a head size that is a multiple of 8, at most 256 (got {H})")
        if mask is not None and mask.ndim != 5:
            out.append(f"a dense mask must be broadcastable to (B, K, G, T, S), got shape {tuple(mask.shape)}")
        if (mask is not None or bias is not None) and (q.shape[1] % 2 or k.shape[1] % 2):
            out.append("cuDNN attention with a mask needs even sequence lengths")
        if sliding_window is not None and not causal:
            out.append("cuDNN's sliding window needs causal attention")
    return out


# ---- xla: the einsum (HF eager-attention numerics) ------------------------------------------------------
def _xla(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask, bias, *, scale, dropout, dtype):
    B, T, N, H = q_BxTxNxH.shape
    K = k_BxSxKxH.shape[2]
    G = N // K
    # Query head n uses key/value head n // G (HF repeat_kv), hence the (K, G) split of N.
    q_BxTxKxGxH = q_BxTxNxH.reshape(B, T, K, G, H)
    scores_BxKxGxTxS = jnp.einsum("btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH) * scale
    if bias is not None:
        scores_BxKxGxTxS = scores_BxKxGxTxS.astype(jnp.float32) + bias
    if mask is not None:
        scores_BxKxGxTxS = jnp.where(mask, scores_BxKxGxTxS.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs_BxKxGxTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(dtype)
    if dropout is not None:
        probs_BxKxGxTxS = dropout(probs_BxKxGxTxS)
    out_BxTxKxGxH = jnp.einsum("bkgts,bskh->btkgh", probs_BxKxGxTxS, v_BxSxKxH)
    return out_BxTxKxGxH.reshape(B, T, N, H)


# ---- flash: the Pallas TPU splash-attention kernel -------------------------------------------------------
def _block(length: int, block_size: int | None) -> int:
    if block_size is not None:
        if block_size % _KERNEL_LANES or length % block_size:
            raise ValueError(f"block_size={block_size} must be a multiple of {_KERNEL_LANES} dividing the "
                             f"(padded) sequence length {length}")
        return block_size
    return next(b for b in (512, 256, 128) if length % b == 0)


def flash_pairs(length: int, *, causal: bool = True, sliding_window: int | None = None,
                block_size: int | None = None) -> int:
    """Query-key pairs, per head and sequence, whose products the Pallas kernel computes for a sequence of
    ``length``: the kernel pads it to a multiple of 128, tiles the ``(T, T)`` scores in blocks (as
    :func:`dot_product_attention` chooses them) and skips the blocks its mask leaves empty, so a causal
    mask costs ``n(n+1)/2`` of ``n²`` blocks, not half of the products (``3/4`` at ``T = 2·block``)."""
    padded = length + (-length % _KERNEL_LANES)
    block = _block(padded, block_size)
    n = padded // block
    computed = 0
    for distance in range(-(n - 1), n):  # query block - key block; n - |distance| blocks lie at each distance
        lowest, highest = distance * block - (block - 1), distance * block + (block - 1)  # of q - k in the block
        keep = highest >= 0 if causal else True
        if sliding_window is not None:
            keep = keep and lowest <= sliding_window - 1 and (causal or highest >= -(sliding_window - 1))
        computed += (n - abs(distance)) * keep
    return computed * block * block


def _splash_kernel(heads: int, length: int, *, causal: bool, sliding_window: int | None, block: int,
                   interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    shape = (length, length)
    if sliding_window is not None:
        one = splash.LocalMask(shape, window_size=(sliding_window - 1, 0 if causal else sliding_window - 1), offset=0)
    elif causal:
        one = splash.CausalMask(shape)
    else:
        one = splash.FullMask(shape)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mha(splash.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)


def _mesh_specs(B: int, N: int, K: int):
    """``(mesh, batch axes, head axes)`` to shard the kernel over (None: no mesh in context)."""
    import flax.linen as nn

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None, None, None
    spec = nn.logical_to_mesh_axes(("batch", "heads"))

    def usable(axes, *sizes):
        axes = tuple(a for a in ((axes,) if isinstance(axes, str) else (axes or ())) if a in mesh.shape)
        count = math.prod(mesh.shape[a] for a in axes)
        if any(size % count for size in sizes):
            logger.warning("attention kernel: %s of sizes %s do not split over mesh axes %s; not sharded there",
                           "dimensions", sizes, axes)
            return None
        return axes or None

    return mesh, usable(spec[0], B), usable(spec[1], N, K)


def _flash(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids, *, causal, sliding_window, scale, interpret, block_size):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    B, T, N, H = q_BxTxNxH.shape
    K = k_BxSxKxH.shape[2]
    pad = -T % _KERNEL_LANES
    if pad and segment_ids is None:  # padding keys get id 0: no real query sees them
        segment_ids = jnp.ones((B, T), jnp.int32)
    q_BxNxTxH = jnp.swapaxes(q_BxTxNxH * jnp.asarray(scale, q_BxTxNxH.dtype), 1, 2)
    k_BxKxTxH = jnp.swapaxes(k_BxSxKxH, 1, 2)
    v_BxKxTxH = jnp.swapaxes(v_BxSxKxH, 1, 2)
    if pad:
        widths = ((0, 0), (0, 0), (0, pad), (0, 0))
        q_BxNxTxH, k_BxKxTxH, v_BxKxTxH = (jnp.pad(x, widths) for x in (q_BxNxTxH, k_BxKxTxH, v_BxKxTxH))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)))
    length = T + pad
    block = _block(length, block_size)
    seg = None if segment_ids is None else segment_ids.astype(jnp.int32)

    def local(q, k, v, seg):
        kernel = _splash_kernel(q.shape[1], length, causal=causal, sliding_window=sliding_window, block=block,
                                interpret=interpret)
        if seg is None:
            return jax.vmap(kernel)(q, k, v)
        return jax.vmap(kernel)(q, k, v, splash.SegmentIds(seg, seg))

    mesh, batch_axes, head_axes = _mesh_specs(B, N, K)
    if mesh is None:
        out_BxNxTxH = local(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, seg)
    else:
        P = jax.sharding.PartitionSpec
        qkv_spec = P(batch_axes, head_axes, None, None)
        args = (q_BxNxTxH, k_BxKxTxH, v_BxKxTxH) + (() if seg is None else (seg,))
        specs = (qkv_spec,) * 3 + (() if seg is None else (P(batch_axes, None),))
        fn = (lambda q, k, v: local(q, k, v, None)) if seg is None else local
        out_BxNxTxH = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=qkv_spec, check_vma=False)(*args)
    return jnp.swapaxes(out_BxNxTxH[:, :, :T], 1, 2)


# ---- cudnn: jax.nn.dot_product_attention(implementation="cudnn") ---------------------------------------
def _cudnn(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask, segment_ids, bias, *, causal, sliding_window, scale, dtype):
    B, T, N, H = q_BxTxNxH.shape
    S = k_BxSxKxH.shape[1]

    K = k_BxSxKxH.shape[2]

    def as_bnts(x):  # broadcastable to (B, K, G, T, S) -> (B|1, N|1, T, S)
        x = jnp.asarray(x)
        if x.shape[1] == x.shape[2] == 1:
            return x.reshape(x.shape[0], 1, *x.shape[3:])
        x = jnp.broadcast_to(x, (x.shape[0], K, N // K, *x.shape[3:]))
        return x.reshape(x.shape[0], N, *x.shape[3:])

    mask_4d = None if mask is None else as_bnts(mask)
    if segment_ids is not None:
        seg = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids != 0)[:, None, :]
        mask_4d = seg[:, None] if mask_4d is None else mask_4d & seg[:, None]
    bias_4d = None if bias is None else as_bnts(jnp.asarray(bias, dtype))
    window = None if sliding_window is None else (sliding_window - 1, 0)
    if T != S and (causal or window):  # queries are the last T key positions: cuDNN's masks assume T == S
        band = dense_mask(T, S, causal=causal, sliding_window=sliding_window)[:, 0]
        mask_4d = band if mask_4d is None else mask_4d & band
        causal, window = False, None
    return jax.nn.dot_product_attention(
        q_BxTxNxH.astype(dtype), k_BxSxKxH.astype(dtype), v_BxSxKxH.astype(dtype), bias=bias_4d, mask=mask_4d,
        scale=scale, is_causal=causal, local_window_size=window, implementation="cudnn")


__all__ = ["AUTO_BY_PLATFORM", "IMPLEMENTATIONS", "SegmentMask", "check_implementation", "current_platform",
           "dense_mask", "dot_product_attention", "flash_pairs", "interpret_kernels", "resolve", "takes_segment_mask"]
