"""Which nnx layers can carry an adapter, and how an adapted layer computes ``y + Δy``.

A layer is adapted in place, without touching the model's code: its class is swapped for a
subclass (:class:`AdaptedLinear`, :class:`AdaptedLinearGeneral`, :class:`AdaptedEinsum`, or one made
once per other registered class) whose ``__call__`` is the original call plus the adapter's
contribution, computed in activation space with :mod:`mora_jax.ops` (``ΔK`` is never built in the
forward or backward pass, so the frozen kernel gets no weight gradient). Nothing else about the
layer changes: its kernel keeps its path, value, dtype and sharding, and the model's parameter tree
gains only the adapter variables next to the kernel (``kernel_mora_m``, or ``kernel_lora_a`` /
``kernel_lora_b`` as qwix names them) and one static attribute, ``mora_spec``
(:class:`AdapterSpec`: method, MoRA type, ``r``, shapes; part of the graph definition, so ``jit``
specialises on it like the linen adapters' pytree metadata).

Every supported layer reduces to ``y = x ⋅ K`` contracting some kernel axes (``in``) with input
axes and producing the other kernel axes (``out``); the adapter sees ``x`` as rows of
``k = prod(in)`` features and returns rows of ``d = prod(out)``, exactly like a 2-D linen Dense
kernel (``(k, d)`` in the kernel's axis order), so adapter trees convert between the two sides.

Layers stacked with ``nnx.vmap`` (a kernel with leading stack axes, the layers run one at a time by
``nnx.scan``, as MaxText and Tunix scan their models) get adapters stacked the same way
(:func:`kernel_layout`, ``AdapterSpec.stack_shape``): inside the scan each layer sees its own slice
of the kernel and of the adapter; merging folds each layer's adapter into its slice.

Supported out of the box: ``nnx.Linear``, ``nnx.LinearGeneral`` (without ``batch_axis``) and
``nnx.Einsum`` (any equation whose kernel axes are each either contracted with the input or kept in
the output), and their subclasses. :func:`register_einsum_layer` adds a model's own einsum module
(e.g. Tunix's ``Einsum`` with its ``w`` parameter).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from mora_jax import dora, ops
from mora_jax.adapters import MoRAAdapter
from mora_jax.quant.formats import as_float

SPEC_ATTR = "mora_spec"
DROPOUT_ATTR = "mora_dropout"
NORM_ATTR = "mora_dora_norm"  # a merged DoRA layer's column norms (mora_jax.nnx.merge)


# ---------------------------------------------------------------------------------------------
# The static description of one adapter.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """Static metadata of the adapter on one layer (hashable: it lives in the graph definition).

    Attributes:
      method: ``"mora"``, ``"lora"``, ``"hira"`` (HiRA: LoRA's ``a``, ``b`` applied as ``K ⊙ (a·b)``,
        :mod:`mora_jax.hira`), ``"dora"`` (LoRA's ``a``, ``b`` and a magnitude, :mod:`mora_jax.dora`) or
        ``"pissa"`` (LoRA at run time; started from the kernel's SVD, :mod:`mora_jax.pissa`).
      kernel: name of the adapted kernel attribute (``"kernel"``; ``"w"`` for Tunix's Einsum).
      in_shape / out_shape: the kernel's contracted and output axes (``k = prod(in_shape)``).
      perm: kernel axes in ``(*in axes, *out axes)`` order (the identity for Linear/LinearGeneral).
      r: LoRA rank (MoRA: the rank whose parameter count ``r̂²`` matches).
      mora_type: MoRA operator type (1, 2, 3, 4, 6); None for LoRA.
      alpha / rslora: LoRA scale ``α/r`` (``α/√r``).
      dropout: dropout rate on the adapter input.
      niter: PiSSA's SVD (None exact, an int the randomized one), run again at ReMoRA restarts.
      magnitude: MoRA with a DoRA-style trainable magnitude (``MoRAConfig(magnitude=True)``): the layer
        computes ``x·(mag/n) ⊙ (K + ΔK)`` column-wise, ``n = ‖K + ΔK‖_c`` detached, as the linen path.
      merged: ``ΔK`` is folded into the kernel and the adapter is skipped (:func:`mora_jax.nnx.merge_adapters`).
      stack_shape: leading axes of a kernel stacked over layers (``nnx.vmap``-made layers run under
        ``nnx.scan``, as MaxText and Tunix scan their models): the adapter's variables are stacked the
        same way, and everything above describes one layer. ``()`` for a layer of its own.
    """

    method: str
    kernel: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    perm: tuple[int, ...]
    r: int
    mora_type: int | None = None
    alpha: float | None = None
    rslora: bool = False
    dropout: float = 0.0
    merged: bool = False
    stack_shape: tuple[int, ...] = ()
    niter: int | None = None
    magnitude: bool = False

    @property
    def rescaled(self) -> bool:
        """The adapter carries a magnitude (DoRA, or MoRA with one): its last variable, ``(*stack, *out_shape)``."""
        return self.method == "dora" or (self.method == "mora" and self.magnitude)

    @property
    def in_features(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_features(self) -> int:
        return math.prod(self.out_shape)

    @property
    def r_hat(self) -> int:
        """MoRA's ``r̂`` (the side of ``M``)."""
        return ops.rank_hat(self.in_features, self.out_features, self.r, self.mora_type)

    @property
    def lora_scale(self) -> float:
        return ops.lora_scale(self.r, self.alpha, self.rslora)

    @property
    def names(self) -> tuple[str, ...]:
        """Attribute names of the adapter variables on the layer."""
        if self.method == "mora":
            return (f"{self.kernel}_mora_m",) + ((f"{self.kernel}_mora_magnitude",) if self.magnitude else ())
        if self.method == "hira":
            return (f"{self.kernel}_hira_a", f"{self.kernel}_hira_b")
        if self.method == "dora":  # PEFT's lora_magnitude_vector
            return (f"{self.kernel}_lora_a", f"{self.kernel}_lora_b", f"{self.kernel}_lora_magnitude")
        return (f"{self.kernel}_lora_a", f"{self.kernel}_lora_b")

    def replace(self, **changes) -> "AdapterSpec":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------
# Layer kinds: the kernel's contraction, and the input/output as rows.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Einsum:
    """A parsed ``lhs,rhs->out`` with the kernel as ``rhs``; ``lead`` are the input's kept axes."""

    lhs: str
    rhs: str
    out: str
    contracted: str  # kernel letters summed with the input, in kernel order
    kept: str  # kernel letters in the output, in kernel order
    lead: str  # input letters (and '...') kept in the output, in input order


def _parse_einsum(equation: str, kernel_ndim: int, where: str) -> _Einsum:
    eq = equation.replace(" ", "")
    if "->" not in eq or eq.count(",") != 1:
        raise NotImplementedError(f"{where}: einsum {equation!r} is not of the form 'x,kernel->y'")
    operands, out = eq.split("->")
    lhs, rhs = operands.split(",")
    if "." in rhs:
        raise NotImplementedError(f"{where}: einsum {equation!r} has an ellipsis in the kernel operand")
    if len(rhs) != kernel_ndim:
        raise ValueError(f"{where}: einsum {equation!r} names {len(rhs)} kernel axes, the kernel has {kernel_ndim}")
    lhs_letters = lhs.replace("...", "")
    contracted = "".join(c for c in rhs if c in lhs_letters and c not in out)
    kept = "".join(c for c in rhs if c in out and c not in lhs_letters)
    other = [c for c in rhs if c not in contracted and c not in kept]
    if other:
        raise NotImplementedError(
            f"{where}: einsum {equation!r}: kernel axes {other} are batch axes (in the input and the output) or "
            "summed over the kernel alone; an adapter needs every kernel axis contracted with the input or kept "
            "in the output"
        )
    dropped = [c for c in lhs_letters if c not in rhs and c not in out]
    if dropped or not contracted or not kept:
        raise NotImplementedError(f"{where}: einsum {equation!r} is not a linear map of the input's features")
    lead = lhs
    for c in contracted:
        lead = lead.replace(c, "")
    return _Einsum(lhs=lhs, rhs=rhs, out=out, contracted=contracted, kept=kept, lead=lead)


class LayerKind:
    """How one layer class contracts its kernel. Subclasses implement ``layer_ndim``, ``axes``,
    ``to_rows`` and ``from_rows`` (and ``declared_shape`` when the layer records its kernel's shape)."""

    kernel: str = "kernel"
    input_arg: str = "inputs"

    def layer_ndim(self, layer) -> int:
        """The rank of one layer's kernel (a kernel stacked over layers has more axes, in front)."""
        raise NotImplementedError

    def declared_shape(self, layer) -> tuple[int, ...] | None:
        """One layer's kernel shape as the layer's configuration gives it, or None when it does not."""
        return None

    def axes(self, layer) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(in axes, out axes)`` of one layer's kernel (static, from the layer's configuration)."""
        raise NotImplementedError

    def to_rows(self, layer, x, args, kwargs):
        """``(x_BxK, lead_shape)``: the input as rows of ``k`` features."""
        raise NotImplementedError

    def from_rows(self, layer, delta_BxD, lead_shape, args, kwargs):
        """The rows' ``Δy`` in the layer's output layout."""
        raise NotImplementedError


class LinearKind(LayerKind):
    def layer_ndim(self, layer):
        return 2

    def declared_shape(self, layer):
        return (layer.in_features, layer.out_features)

    def axes(self, layer):
        return (0,), (1,)

    def to_rows(self, layer, x, args, kwargs):
        return x, x.shape[:-1]

    def from_rows(self, layer, delta_BxD, lead_shape, args, kwargs):
        return delta_BxD


class LinearGeneralKind(LayerKind):
    def layer_ndim(self, layer):
        return len(layer.in_features) + len(layer.out_features)

    def declared_shape(self, layer):
        return tuple(layer.in_features) + tuple(layer.out_features)

    def axes(self, layer):
        if layer.batch_axis:
            raise NotImplementedError("adapters on nnx.LinearGeneral with batch_axis are not supported")
        n_in, n_out = len(layer.in_features), len(layer.out_features)
        return tuple(range(n_in)), tuple(range(n_in, n_in + n_out))

    def to_rows(self, layer, x, args, kwargs):
        n_in = len(layer.axis)
        axes = [a % x.ndim for a in layer.axis]
        x = jnp.moveaxis(x, axes, list(range(x.ndim - n_in, x.ndim)))
        lead = x.shape[: x.ndim - n_in]
        return x.reshape(*lead, -1), lead

    def from_rows(self, layer, delta_BxD, lead_shape, args, kwargs):
        return delta_BxD.reshape(*lead_shape, *layer.out_features)


class EinsumKind(LayerKind):
    """``jnp.einsum(equation, x, kernel)``; the equation from the call or from ``einsum_attr``."""

    def __init__(self, kernel: str = "kernel", einsum_attr: str = "einsum_str", input_arg: str = "inputs",
                 call_arg: str | None = "einsum_str"):
        self.kernel, self.einsum_attr, self.input_arg, self.call_arg = kernel, einsum_attr, input_arg, call_arg

    def _parsed(self, layer, args=(), kwargs=None) -> _Einsum:
        equation = None
        if self.call_arg is not None and kwargs and kwargs.get(self.call_arg) is not None:
            equation = kwargs[self.call_arg]
        elif self.call_arg is not None and len(args) > 1 and isinstance(args[1], str):
            equation = args[1]
        if equation is None:
            equation = getattr(layer, self.einsum_attr)
        kernel_ndim = len(getattr(layer, self.kernel).shape)
        return _parse_einsum(equation, kernel_ndim, type(layer).__name__)

    def layer_ndim(self, layer):
        equation = str(getattr(layer, self.einsum_attr)).replace(" ", "")
        operands = equation.split("->")[0].split(",")
        return len(operands[1]) if len(operands) == 2 else len(getattr(layer, self.kernel).shape)

    def declared_shape(self, layer):
        shape = getattr(layer, "kernel_shape", None) if self.call_arg is not None else None  # nnx.Einsum's
        return tuple(shape) if shape is not None else None

    def axes(self, layer):
        equation = getattr(layer, self.einsum_attr)
        e = _parse_einsum(equation, self.layer_ndim(layer), type(layer).__name__)
        return tuple(e.rhs.index(c) for c in e.contracted), tuple(e.rhs.index(c) for c in e.kept)

    def to_rows(self, layer, x, args, kwargs):
        e = self._parsed(layer, args, kwargs)
        x = jnp.einsum(f"{e.lhs}->{e.lead}{e.contracted}", x)
        lead = x.shape[: x.ndim - len(e.contracted)]
        return x.reshape(*lead, -1), lead

    def from_rows(self, layer, delta_BxD, lead_shape, args, kwargs):
        e = self._parsed(layer, args, kwargs)
        kernel_shape = getattr(layer, self.kernel).shape
        kept_shape = tuple(kernel_shape[e.rhs.index(c)] for c in e.kept)
        delta = delta_BxD.reshape(*lead_shape, *kept_shape)
        return jnp.einsum(f"{e.lead}{e.kept}->{e.out}", delta)


# ---------------------------------------------------------------------------------------------
# Registry: layer class -> kind, and the adapted subclass of each.
# ---------------------------------------------------------------------------------------------

_KINDS: dict[type, LayerKind] = {
    nnx.Linear: LinearKind(),
    nnx.LinearGeneral: LinearGeneralKind(),
    nnx.Einsum: EinsumKind(),
}
_ADAPTED: dict[type, type] = {}  # base class -> adapted subclass


def register_einsum_layer(cls: type, *, kernel: str = "w", einsum_attr: str = "einsum_str",
                          input_arg: str = "x") -> None:
    """Let adapters attach to a model's own einsum layer class.

    ``cls`` must compute ``jnp.einsum(getattr(self, einsum_attr), x, getattr(self, kernel))`` (plus an
    optional bias) in ``__call__(x)``, as Tunix's and many Gemma-style models' ``Einsum`` modules do::

        from tunix.models.llama3 import model as llama3
        mora_jax.nnx.register_einsum_layer(llama3.Einsum, kernel="w")
    """
    if not (isinstance(cls, type) and issubclass(cls, nnx.Module)):
        raise TypeError(f"register_einsum_layer needs an nnx.Module subclass, got {cls!r}")
    _KINDS[cls] = EinsumKind(kernel=kernel, einsum_attr=einsum_attr, input_arg=input_arg, call_arg=None)


def kind_of(layer_or_cls) -> LayerKind | None:
    """The :class:`LayerKind` of a layer (or class), or None when adapters cannot attach to it."""
    cls = layer_or_cls if isinstance(layer_or_cls, type) else type(layer_or_cls)
    for base in cls.__mro__:
        if base in _KINDS:
            return _KINDS[base]
    return None


def kernel_layout(layer) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(stack shape, in axes, out axes)`` of a supported layer's kernel, the axes counted in the whole
    kernel: a kernel with more axes than one layer's (made by ``nnx.vmap``, run by ``nnx.scan``) is
    stacked on its leading axes, which must be followed by the layer's own kernel shape."""
    kind = kind_of(layer)
    shape = tuple(getattr(layer, kind.kernel).shape)
    n = len(shape) - kind.layer_ndim(layer)
    name = type(layer).__name__
    if n < 0:
        raise ValueError(f"{name}: the kernel has shape {shape}, fewer axes than the layer's {kind.layer_ndim(layer)}")
    declared = kind.declared_shape(layer)
    if declared is not None and shape[n:] != tuple(declared):
        raise ValueError(
            f"{name}: the kernel has shape {shape}, which does not end in the layer's own kernel shape "
            f"{tuple(declared)}; layers stacked with nnx.vmap can carry adapters when the stack axes lead "
            "(in_axes=0 / out_axes=0)")
    in_axes, out_axes = kind.axes(layer)
    return shape[:n], tuple(a + n for a in in_axes), tuple(a + n for a in out_axes)


def supported_layer_names() -> list[str]:
    return sorted(f"{c.__module__}.{c.__qualname__}" for c in _KINDS)


def is_adapted(layer) -> bool:
    return isinstance(layer, _AdaptedMixin)


class _AdaptedMixin(nnx.Module):
    """``y = base_call(x) + Δy(x)`` unless the adapter is merged. Mixed in before the layer's class."""

    def __call__(self, *args, **kwargs):
        spec: AdapterSpec = getattr(self, SPEC_ATTR)
        if spec.stack_shape and len(getattr(self, spec.kernel).shape) > len(spec.perm):
            raise ValueError(
                f"{type(self).__name__}: the layer is stacked over {spec.stack_shape} (kernel "
                f"{tuple(getattr(self, spec.kernel).shape)}); call it one layer at a time, inside the nnx.scan (or "
                "nnx.vmap) over its leading axis")
        y = super().__call__(*args, **kwargs)
        if spec.merged:
            return y
        kind = kind_of(type(self))
        x = args[0] if args else kwargs[kind.input_arg]
        x_BxK, lead = kind.to_rows(self, x, args, kwargs)
        x_BxK = x_BxK.astype(y.dtype)
        dropout = getattr(self, DROPOUT_ATTR, None)
        if dropout is not None:
            x_BxK = dropout(x_BxK)
        delta_BxD = adapter_delta(self, spec, x_BxK)
        return y + kind.from_rows(self, delta_BxD, lead, args, kwargs).astype(y.dtype)


class AdaptedLinear(_AdaptedMixin, nnx.Linear):
    """An ``nnx.Linear`` carrying a MoRA or LoRA adapter (made by :func:`mora_jax.nnx.attach`)."""


class AdaptedLinearGeneral(_AdaptedMixin, nnx.LinearGeneral):
    """An ``nnx.LinearGeneral`` carrying a MoRA or LoRA adapter."""


class AdaptedEinsum(_AdaptedMixin, nnx.Einsum):
    """An ``nnx.Einsum`` carrying a MoRA or LoRA adapter."""


_ADAPTED.update({nnx.Linear: AdaptedLinear, nnx.LinearGeneral: AdaptedLinearGeneral, nnx.Einsum: AdaptedEinsum})


def mixed_class(registry: dict, mixin: type, cls: type, prefix: str, namespace: dict) -> type:
    """The subclass ``(mixin, cls)`` of ``cls``, made once per class and kept in ``registry``: published
    in ``namespace`` (a module's globals) under a unique name ``<prefix><cls name>``, so that graph
    definitions holding it compare equal across models and pickle. ``cls`` already mixed: itself."""
    if issubclass(cls, mixin):
        return cls
    if cls not in registry:
        name, n = f"{prefix}{cls.__name__}", 1
        while name in namespace:
            name, n = f"{prefix}{cls.__name__}_{n}", n + 1
        made = type(name, (mixin, cls), {"__module__": namespace["__name__"], "__qualname__": name})
        namespace[name] = registry[cls] = made
    return registry[cls]


def unmixed_class(registry: dict, cls: type) -> type:
    """The class :func:`mixed_class` made ``cls`` from (``cls`` itself when it made none)."""
    for base, made in registry.items():
        if made is cls:
            return base
    return cls


def adapted_class(cls: type) -> type:
    """The adapted subclass of ``cls`` (one per class, so graph definitions compare equal)."""
    return mixed_class(_ADAPTED, _AdaptedMixin, cls, "Adapted", globals())


def base_class(cls: type) -> type:
    """The original class of an adapted layer class."""
    return unmixed_class(_ADAPTED, cls)


# ---------------------------------------------------------------------------------------------
# The adapter's contribution and its dense update, through mora_jax.ops.
# ---------------------------------------------------------------------------------------------


def adapter_arrays(layer, spec: AdapterSpec) -> tuple[jax.Array, ...]:
    """The adapter's arrays in ``(k, ·)`` / ``(·, d)`` layout: ``(m,)`` or ``(a_KxR, b_RxD)``, then the
    magnitude ``(d,)`` of DoRA (and of MoRA with one), after any stack axes (those of a stacked layer
    seen whole, outside ``nnx.scan``)."""
    if spec.method == "mora":
        m = getattr(layer, spec.names[0])[...]
        arrays = (m,)
        lead = m.shape[:-2]
    else:
        a = getattr(layer, spec.names[0])[...]
        b = getattr(layer, spec.names[1])[...]
        lead = a.shape[: a.ndim - len(spec.in_shape) - 1]
        arrays = (a.reshape(*lead, spec.in_features, spec.r), b.reshape(*lead, spec.r, spec.out_features))
    if spec.rescaled:
        arrays += (getattr(layer, spec.names[-1])[...].reshape(*lead, spec.out_features),)
    return arrays


def magnitude_node(arrays, spec: AdapterSpec):
    """The linen adapter (:class:`mora_jax.dora.DoRAAdapter`, or :class:`mora_jax.adapters.MoRAAdapter` with
    a magnitude) of one layer's arrays: its column norm, merge and unmerge are the linen path's own."""
    if spec.method == "mora":
        return MoRAAdapter(m=arrays[0], magnitude=arrays[1], in_features=spec.in_features,
                           out_features=spec.out_features, mora_type=spec.mora_type, r=spec.r)
    return dora.DoRAAdapter(a=arrays[0], b=arrays[1], magnitude=arrays[2], in_features=spec.in_features,
                            out_features=spec.out_features, alpha=spec.alpha, rslora=spec.rslora)


def adapter_delta(layer, spec: AdapterSpec, x_BxK):
    """``Δy`` for rows ``x (..., k)``: :func:`mora_jax.ops.apply_mora` / :func:`mora_jax.ops.apply_lora`;
    HiRA's ``x·(K ⊙ a·b)`` (a second matmul beside the layer's own: unlike the linen path, which runs one
    matmul with ``K ⊙ (1 + a·b)``, the nnx layer's own call is kept as it is)."""
    arrays = adapter_arrays(layer, spec)
    if spec.rescaled:  # (mag/n − 1) ⊙ (x·K) + (mag/n) ⊙ Δy, n = ‖K + ΔK‖_c detached (mora_jax.dora)
        # The layer's own output includes its bias (and has its own layout), so x·K is computed again here.
        kernel_KxD = kernel_as_matrix(kernel_float(layer, spec), spec)
        base = jnp.matmul(x_BxK, kernel_KxD.astype(x_BxK.dtype))
        node = magnitude_node(arrays, spec)
        norm_D = node.weight_norm(kernel_KxD)
        ratio_D = (arrays[-1].astype(jnp.float32) / norm_D).astype(x_BxK.dtype)
        return (ratio_D - 1) * base + ratio_D * node.delta(x_BxK).astype(x_BxK.dtype)
    if spec.method == "hira":
        kernel_KxD = kernel_as_matrix(kernel_float(layer, spec), spec).astype(jnp.float32)
        update_KxD = kernel_KxD * jnp.matmul(arrays[0].astype(jnp.float32), arrays[1].astype(jnp.float32))
        return jnp.matmul(x_BxK, update_KxD.astype(x_BxK.dtype))
    if spec.method == "mora":
        return ops.apply_mora(x_BxK, arrays[0], in_features=spec.in_features, out_features=spec.out_features,
                              mora_type=spec.mora_type)
    return ops.apply_lora(x_BxK, arrays[0], arrays[1], scale=spec.lora_scale)


def kernel_float(layer, spec: AdapterSpec):
    """The layer's kernel in its own layout, as float: a quantized one (:mod:`mora_jax.nnx.quant`) dequantized."""
    return as_float(getattr(layer, spec.kernel).get_value())


def kernel_as_matrix(kernel, spec: AdapterSpec):
    """The kernel as ``(k, d)`` (its in axes first, in kernel order)."""
    return jnp.transpose(kernel, spec.perm).reshape(spec.in_features, spec.out_features)


def matrix_as_kernel(matrix_KxD, spec: AdapterSpec):
    """Inverse of :func:`kernel_as_matrix`."""
    permuted = matrix_KxD.reshape(*spec.in_shape, *spec.out_shape)
    inverse = [0] * len(spec.perm)
    for i, axis in enumerate(spec.perm):
        inverse[axis] = i
    return jnp.transpose(permuted, inverse)


def rescaled_folded_kernel(kernel, arrays, spec: AdapterSpec, norms=None):
    """The merge ``(mag/n)·(K + ΔK)`` of DoRA (or MoRA with a magnitude) with ``n`` (``norms=None``; returns
    ``(kernel, n)``), or its undoing with the ``n`` of the merge (returns ``(kernel, norms)``); a stacked
    kernel layer by layer."""
    n = kernel.ndim - len(spec.perm)
    if n:
        flat_norms = None if norms is None else norms.reshape(-1, norms.shape[-1])
        per_layer = jax.vmap(lambda k, xs, nn: rescaled_folded_kernel(k, xs, spec, nn),
                             in_axes=(0, 0, None if norms is None else 0))
        flat, out_norms = per_layer(kernel.reshape(-1, *kernel.shape[n:]),
                                    tuple(x.reshape(-1, *x.shape[n:]) for x in arrays), flat_norms)
        return flat.reshape(kernel.shape), out_norms.reshape(*kernel.shape[:n], -1)
    node = magnitude_node(arrays, spec)
    matrix = kernel_as_matrix(kernel, spec)
    if norms is None:
        merged, norms = node.merged_kernel(matrix)
    else:
        merged = node.unmerge_kernel(matrix.astype(jnp.float32), norms)
    return matrix_as_kernel(merged.astype(kernel.dtype), spec), norms


def folded_kernel(kernel, arrays, spec: AdapterSpec, sign: float):
    """``K + sign·ΔK`` in the kernel's layout (float32 accumulate, the kernel's dtype out); a stacked
    kernel layer by layer."""
    n = kernel.ndim - len(spec.perm)
    if n:
        per_layer = jax.vmap(lambda k, *xs: folded_kernel(k, xs, spec, sign))
        flat = per_layer(kernel.reshape(-1, *kernel.shape[n:]), *(x.reshape(-1, *x.shape[n:]) for x in arrays))
        return flat.reshape(kernel.shape)
    matrix = kernel_as_matrix(kernel, spec)
    if spec.method == "mora":
        matrix = ops.merge_into(matrix, arrays[0], in_features=spec.in_features, out_features=spec.out_features,
                                mora_type=spec.mora_type, sign=sign)
    elif spec.method == "hira":  # K ⊙ (1 + a·b), undone by division (mora_jax.hira)
        factor = 1.0 + jnp.matmul(arrays[0].astype(jnp.float32), arrays[1].astype(jnp.float32))
        matrix32 = matrix.astype(jnp.float32)
        matrix = (matrix32 * factor if sign > 0 else matrix32 / factor).astype(kernel.dtype)
    else:
        delta = ops.lora_delta_weight(arrays[0], arrays[1], scale=spec.lora_scale)
        matrix = (matrix.astype(jnp.float32) + jnp.float32(sign) * delta).astype(kernel.dtype)
    return matrix_as_kernel(matrix, spec)

