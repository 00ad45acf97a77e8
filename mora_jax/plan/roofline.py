"""The planner's step-time estimate: a roofline of the compiled step, per chip.

Three lower bounds on the time of one step, from the compiled program's own counts
(:class:`mora_jax.plan.hlo.HloStats`, loops weighed by their trip counts) and the chip's figures
(:data:`mora_jax.plan.chips.CHIPS`):

* compute: matmul FLOPs (the HLO's dots, plus those inside custom kernels such as Pallas flash
  attention, which the planner counts from the model) / the chip's bf16 peak (the MXUs; elementwise
  work is not counted);
* memory: HBM bytes read and written / HBM bandwidth;
* communication: the bytes each chip sends in its collectives (ring algorithms: ``(g-1)/g`` of the
  data for an all-gather, reduce-scatter or all-to-all over ``g`` chips, twice that for an
  all-reduce) / the bandwidth of one bidirectional ring over a mesh axis (two of the chip's ICI
  ports, one direction each).

A quantized base's weights enter as what the compiled program does with them: the int8 / 4-bit
codes it reads from HBM are in the memory bound at their own width (``dequantize.code_hbm_bytes``),
and a dequantized copy the compiler writes to HBM instead of fusing it into the matmul is there too.
The dequantization itself (a convert and a multiply per weight element, for each use of the weight:
forward, recomputation, backward) is elementwise work on the vector units; it is counted
(``dequantize.elements``, with its ratio to the matmul FLOPs) but, like all elementwise work, not
timed: no vector-unit peak is published for these chips.

``estimated_step_s`` is the largest of the three (perfect overlap) and ``bound`` names it;
``estimated_step_s_serial`` is their sum (no overlap). Both are estimates: real steps lose time to
fusions below peak, latencies and imperfect overlap, and a collective that spans two mesh axes may use
more links than one ring.
"""

from __future__ import annotations

from mora_jax.plan.chips import ChipSpec
from mora_jax.plan.hlo import HloStats


def estimate(stats: HloStats, chip: ChipSpec, *, kernel_flops: float = 0.0) -> dict:
    times = {
        "compute": (stats.matmul_flops + kernel_flops) / chip.bf16_flops,
        "memory": stats.hbm_bytes / chip.hbm_bytes_per_s,
        "communication": stats.wire_bytes / chip.ici_link_bytes_per_s,
    }
    bound = max(times, key=times.get)
    out = {"roofline_s": {k: v for k, v in times.items()}, "estimated_step_s": times[bound],
           "estimated_step_s_serial": sum(times.values()), "bound": bound}
    if stats.dequant_elements:
        matmul = stats.matmul_flops + kernel_flops
        out["dequantize"] = {
            "elements": stats.dequant_elements, "code_hbm_bytes": stats.code_hbm_bytes,
            "code_share_of_hbm_bytes": stats.code_hbm_bytes / stats.hbm_bytes if stats.hbm_bytes else None,
            # a convert and a scale multiply per element, against the matmuls' multiply-adds
            "elementwise_ops_per_matmul_flop": 2 * stats.dequant_elements / matmul if matmul else None,
        }
    return out


def mfu(step: dict, chip: ChipSpec, chips: int) -> float | None:
    """Model FLOPs (the project's FLOP model) per second of the estimated step, over the slice's peak."""
    seconds = step.get("estimated_step_s")
    if not seconds or not step.get("model_flops_per_step"):
        return None
    return step["model_flops_per_step"] / (seconds * chips * chip.bf16_flops)


__all__ = ["estimate", "mfu"]
