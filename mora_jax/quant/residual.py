"""Merges kept exactly beside a quantized kernel (``model.quantize.merge``).

Re-quantizing a merged kernel to 4 bits rounds away most of a merge period's update
(``docs/quantization.md``). The alternative kept here: a ReMoRA / ReLoRA merge into a quantized kernel
adds the adapter to a frozen :class:`MergeResidual` that travels inside the kernel's leaf
(``QuantizedKernel.residual``), and the layer computes ``x·dequant(codes) + Σ Δy(x)`` in activation
space, like a live adapter. Nothing is rounded: the kernel a leaf stands for is
``dequant(codes) + ΔK_residual`` exactly (``formats.dequantize`` builds it for export and merges).

The residual's shapes are fixed when the run's state is made (:func:`add_slots`), so a merge changes
no shape (no recompilation, checkpoints restore into the same structure):

* **MoRA** (without a magnitude): ``ΔK`` is linear in ``m`` for a fixed operator type, so one frozen
  ``m`` per type of ``remora.type_cycle`` holds the sum of every merged ``m`` of that type. Cost: one
  MoRA operator per type per layer call (``r̂²`` numbers per kernel and type), less the live type's,
  which rides on the live adapter (:meth:`MergeResidual.fold_into`).
* **LoRA**: the merged factors sit side by side in one rank ``r·n`` pair (``n`` = the run's merges),
  the ``k``-th merge's in block ``k`` (a per-kernel counter says which is next); unused blocks are zero.
  Cost: a LoRA of rank ``r·n`` per layer call.

DoRA, PiSSA, HiRA and MoRA with a magnitude change the kernel non-linearly at a merge; their merges
re-quantize (the config refuses ``merge='residual'`` for them).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from mora_jax.adapters import LoRAAdapter, MoRAAdapter, flatten, keeps_merges_beside_codes, unflatten
from mora_jax.quant.formats import is_quantized


@flax.struct.dataclass
class MergeResidual:
    """The merged updates of one quantized kernel ``(*stack, k, d)``.

    ``mora``: frozen MoRA adapters, one per operator type, each the sum of that type's merged ``m``;
    ``lora``: a frozen LoRA of rank ``r·n`` (merge ``j`` in rank block ``j``) or None;
    ``count``: ``(*stack,)`` int32, the LoRA blocks filled so far (per layer of a stacked kernel, so
    ``nn.scan`` slices it like every other leaf)."""

    mora: tuple = ()
    lora: LoRAAdapter | None = None
    count: jax.Array | None = None

    def _adapters(self):
        return [*self.mora, *([self.lora] if self.lora is not None else [])]

    @property
    def empty(self) -> bool:
        """No slot left (a single-type cycle's only ``m`` rides on the live adapter)."""
        return not self._adapters()

    def delta(self, x_BxK):
        """``Σ Δy`` of the kept merges for inputs ``(..., k)`` (single layer), in float32."""
        out = None
        for adapter in self._adapters():
            y = adapter.delta(x_BxK).astype(jnp.float32)
            out = y if out is None else out + y
        return out

    def delta_weight(self):
        """``ΔK`` of the kept merges, ``(*stack, k, d)`` float32."""
        out = None
        for adapter in self._adapters():
            w = adapter.delta_weight()
            out = w if out is None else out + w
        return out

    def absorb(self, adapter, sign: float = 1.0) -> "MergeResidual":
        """The residual with ``sign·ΔK(adapter)`` added exactly. Undoing a LoRA merge (``sign < 0``)
        removes the last block when it holds ``adapter``'s factors; MoRA subtracts from its type's sum."""
        if not keeps_merges_beside_codes(adapter):
            raise ValueError(f"a {type(adapter).__name__} merge cannot be kept beside a quantized kernel: only LoRA "
                             "and MoRA without a magnitude can (model.quantize.merge='requantize' re-quantizes instead)")
        if type(adapter) is MoRAAdapter:
            for i, kept in enumerate(self.mora):
                if kept.mora_type == adapter.mora_type and kept.m.shape == adapter.m.shape:
                    mora = list(self.mora)
                    mora[i] = kept.replace(m=kept.m + sign * adapter.m.astype(jnp.float32))
                    return self.replace(mora=tuple(mora))
            raise ValueError(f"no kept slot for a MoRA type-{adapter.mora_type} merge: the residual holds types "
                             f"{[k.mora_type for k in self.mora]} (the run's remora.type_cycle)")
        if self.lora is not None:
            r = adapter.r
            blocks = self.lora.r // r
            if sign > 0:
                block = self.count  # (*stack,)
                count = self.count + 1
            else:
                block = self.count - 1
                count = self.count - 1
            # rank position j belongs to block j // r: write the adapter's factors into block `block`
            hit = (jnp.arange(self.lora.r) // r)[None, :] == jnp.reshape(block, (-1, 1))  # (layers, r·n)
            hit = hit.reshape(*self.count.shape, self.lora.r)
            scale = adapter.scale / self.lora.scale  # the kept pair's scale is 1 (see add_slots)
            a = jnp.tile(adapter.a.astype(jnp.float32), (1,) * (adapter.a.ndim - 1) + (blocks,))
            b = jnp.tile(scale * adapter.b.astype(jnp.float32), (1,) * (adapter.b.ndim - 2) + (blocks, 1))
            if sign > 0:
                new_a = jnp.where(hit[..., None, :], a, self.lora.a)
                new_b = jnp.where(hit[..., :, None], b, self.lora.b)
            else:
                new_a = jnp.where(hit[..., None, :], 0.0, self.lora.a)
                new_b = jnp.where(hit[..., :, None], 0.0, self.lora.b)
            return self.replace(lora=self.lora.replace(a=new_a, b=new_b), count=count)
        raise ValueError("a LoRA merge, but this residual has no LoRA slot (it was made for MoRA)")

    def fold_into(self, adapter):
        """``(residual, adapter)`` computing the same output with one operator less: the kept ``m`` of the
        live MoRA adapter's type added to the live ``m`` (``ΔK`` is linear in ``m``, so the output and the
        gradient with respect to the live ``m`` are unchanged). Other adapters: unchanged."""
        if type(adapter) is not MoRAAdapter or adapter.magnitude is not None:
            return self, adapter
        for i, kept in enumerate(self.mora):
            if kept.mora_type == adapter.mora_type and kept.m.shape == adapter.m.shape:
                rest = self.replace(mora=self.mora[:i] + self.mora[i + 1:])
                return rest, adapter.replace(m=adapter.m + kept.m.astype(adapter.m.dtype))
        return self, adapter

    def cleared(self) -> "MergeResidual":
        """The same slots, empty (after the kept updates were folded into re-quantized codes)."""
        zeros = lambda tree: jax.tree_util.tree_map(jnp.zeros_like, tree)  # noqa: E731
        return MergeResidual(mora=zeros(self.mora), lora=zeros(self.lora), count=zeros(self.count))


def _slots(adapter, type_cycle, merges: int) -> MergeResidual:
    if type(adapter) is MoRAAdapter:
        types = tuple(dict.fromkeys(type_cycle)) if adapter.mora_type in type_cycle else (adapter.mora_type,)
        return MergeResidual(mora=tuple(
            adapter.replace(m=jnp.zeros_like(adapter.m, jnp.float32), mora_type=t, dropout=0.0) for t in types))
    stack = adapter.a.shape[:-2]
    rank = adapter.r * max(int(merges), 1)
    kept = LoRAAdapter(a=jnp.zeros((*stack, adapter.in_features, rank), jnp.float32),
                       b=jnp.zeros((*stack, rank, adapter.out_features), jnp.float32),
                       in_features=adapter.in_features, out_features=adapter.out_features,
                       alpha=float(rank), rslora=False, dropout=0.0)  # scale alpha/r = 1
    return MergeResidual(lora=kept, count=jnp.zeros(stack, jnp.int32))


def add_slots(params, adapters, *, type_cycle=(1, 2, 3, 4), merges: int = 1):
    """``params`` with an empty :class:`MergeResidual` in every quantized kernel targeted by an adapter
    that keeps its merges there (``adapters.keeps_merges_beside_codes``): MoRA one ``m`` per type of
    ``type_cycle`` (any number of merges), LoRA room for ``merges`` merges (a LoRA merge past them
    would find no free block and be lost: size it with :func:`merges_in_run`). Other leaves are
    returned as they are."""
    flat = flatten(params)
    for path, adapter in flatten(adapters).items():
        leaf = flat.get(path)
        if is_quantized(leaf) and keeps_merges_beside_codes(adapter) and leaf.residual is None:
            flat[path] = leaf.replace(residual=_slots(adapter, tuple(type_cycle), merges))
    return unflatten(flat)


def merges_in_run(steps: int, every: int) -> int:
    """How many merges a run of ``steps`` merging every ``every`` steps makes (none at its last step)."""
    return max((int(steps) - 1) // int(every), 0) if every else 0


__all__ = ["MergeResidual", "add_slots", "merges_in_run"]
