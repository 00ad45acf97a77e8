"""TPU generations and slice topologies: what a planner needs to know about the chips it compiles for.

:data:`CHIPS` holds, per TPU generation, the figures the roofline uses (bf16 peak, HBM capacity and
bandwidth, ICI bandwidth and ports), each with its source. :func:`parse_topology` reads a slice name
such as ``v5e:2x4`` or ``v4:2x2x2`` and :func:`topology_devices` asks ``libtpu`` for the chips of that
slice as compile-only devices (no TPU needed: the default backend stays the CPU).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

GiB = 1024 ** 3


class PlanError(ValueError):
    """Bad planner input (unknown topology, missing libtpu, a mesh that does not fit the slice):
    its message is one line naming the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """Per-chip figures of one TPU generation.

    Attributes:
      name: the generation as written in a topology name (``v5e``).
      libtpu_name: the name ``libtpu`` knows it by.
      device_kind: ``jax.Device.device_kind`` of its chips.
      dims: mesh dimensions of a slice (2 = 2D torus, 3 = 3D torus).
      chip_config: ``libtpu`` chip configuration (``megacore``: both TensorCores of a chip as one
        device, how JAX runs v4 and v5p).
      hbm_bytes: HBM per chip.
      bf16_flops: peak dense bf16 matmul FLOP/s per chip.
      hbm_bytes_per_s: HBM bandwidth per chip.
      ici_bytes_per_s: bidirectional inter-chip-interconnect bandwidth per chip, all ports together.
      ici_ports: ICI ports per chip.
      source: where the figures come from.
    """

    name: str
    libtpu_name: str
    device_kind: str
    dims: int
    chip_config: str
    hbm_bytes: int
    bf16_flops: float
    hbm_bytes_per_s: float
    ici_bytes_per_s: float
    ici_ports: int
    source: str

    @property
    def ici_link_bytes_per_s(self) -> float:
        """Bidirectional bandwidth of one ICI port: what a bidirectional ring over one mesh axis
        sends per chip per second (one direction on each of two ports)."""
        return self.ici_bytes_per_s / self.ici_ports


CHIPS: dict[str, ChipSpec] = {
    "v4": ChipSpec(
        "v4", "v4", "TPU v4", 3, "megacore", hbm_bytes=32 * GiB, bf16_flops=275e12, hbm_bytes_per_s=1200e9,
        ici_bytes_per_s=6 * 90e9, ici_ports=6,
        source="cloud.google.com/tpu/docs/v4 (275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s); ICI: 6 ports of "
               "90 GB/s bidirectional each (jax-ml.github.io/scaling-book, 'How to think about TPUs')"),
    "v5e": ChipSpec(
        "v5e", "v5e", "TPU v5 lite", 2, "default", hbm_bytes=16 * GiB, bf16_flops=197e12, hbm_bytes_per_s=819e9,
        ici_bytes_per_s=400e9, ici_ports=4,
        source="cloud.google.com/tpu/docs/v5e (197 TFLOP/s bf16, 16 GiB HBM at 819 GB/s, 400 GB/s "
               "bidirectional ICI per chip over 4 ports)"),
    "v5p": ChipSpec(
        "v5p", "v5", "TPU v5", 3, "megacore", hbm_bytes=95 * GiB, bf16_flops=459e12, hbm_bytes_per_s=2765e9,
        ici_bytes_per_s=1200e9, ici_ports=6,
        source="cloud.google.com/tpu/docs/v5p (459 TFLOP/s bf16, 95 GiB HBM2e at 2765 GB/s, 1200 GB/s "
               "bidirectional ICI per chip; 3D torus, 6 ports)"),
    "v6e": ChipSpec(
        "v6e", "v6e", "TPU v6 lite", 2, "default", hbm_bytes=32 * GiB, bf16_flops=918e12, hbm_bytes_per_s=1638e9,
        ici_bytes_per_s=800e9, ici_ports=4,
        source="cloud.google.com/tpu/docs/v6e (918 TFLOP/s bf16, 32 GiB HBM at 1638 GB/s, 800 GB/s "
               "bidirectional ICI per chip over 4 ports)"),
}
# Other spellings of the generations.
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p", "v6": "v6e", "trillium": "v6e", "v4p": "v4"}
MAX_CHIPS = {"v4": 4096, "v5e": 256, "v5p": 8960, "v6e": 256}
HOST_BOUNDS = (2, 2, 1)  # chips per host of a multi-host slice: a 2x2 tray (4 chips per VM)


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice: ``chip`` generation, ``dims`` chips along each axis of its torus."""

    chip: ChipSpec
    dims: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.chip.name}:{'x'.join(map(str, self.dims))}"

    @property
    def chips(self) -> int:
        return math.prod(self.dims)


def parse_topology(name: str) -> Topology:
    """``"v5e:2x4"`` -> :class:`Topology`; a name libtpu would not know is a :class:`PlanError`."""
    known = ", ".join(f"{c}:{'x'.join(['2'] * spec.dims)}" for c, spec in CHIPS.items())
    match = re.fullmatch(r"\s*([A-Za-z0-9]+)\s*[:\-]\s*(\d+(?:x\d+)*)\s*", str(name or ""))
    if not match:
        raise PlanError(f"topology {name!r} is not GENERATION:AxB[xC]; use e.g. {known}")
    generation = match.group(1).lower()
    generation = ALIASES.get(generation, generation)
    if generation not in CHIPS:
        raise PlanError(f"unknown TPU generation {match.group(1)!r} in topology {name!r}: "
                        f"choose one of {sorted(CHIPS)} (e.g. {known})")
    chip = CHIPS[generation]
    dims = tuple(int(d) for d in match.group(2).split("x"))
    if len(dims) == 2 and chip.dims == 3:
        dims = (*dims, 1)
    if len(dims) != chip.dims or min(dims) < 1:
        raise PlanError(f"topology {name!r}: {chip.name} slices have {chip.dims} dimensions "
                        f"(e.g. {chip.name}:{'x'.join(['2'] * chip.dims)})")
    if math.prod(dims) > MAX_CHIPS[chip.name]:
        raise PlanError(f"topology {name!r} has {math.prod(dims)} chips, more than a {chip.name} pod "
                        f"({MAX_CHIPS[chip.name]}); use a smaller slice")
    return Topology(chip, dims)


def _host_bounds(topology: Topology) -> tuple[int, int, int]:
    """Chips per host along each axis: v5e/v6e slices of up to 8 chips are one VM (``2x4``: one
    8-chip host); larger ones, and every v4/v5p slice, are 2x2 trays, one per VM."""
    dims = (*topology.dims, 1, 1)[:3]
    if topology.chip.dims == 2 and topology.chips <= 8:
        return dims
    return tuple(min(h, d) for h, d in zip(HOST_BOUNDS, dims))


def _has_tpu_chips() -> bool:
    try:
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # noqa: BLE001 - a private helper of jax: assume a TPU VM, change nothing
        return True


def topology_devices(topology: Topology) -> list:
    """The chips of ``topology`` as compile-only ``jax.Device``s (``libtpu`` from the ``tpu`` extra).

    On a machine without TPU chips it sets, unless already set, ``ALLOW_MULTIPLE_LIBTPU_LOAD``
    (compiling for a topology opens no TPU, so several planners or tests may load libtpu at once)
    and the variables a TPU VM's metadata server would give (``TPU_SKIP_MDS_QUERY``,
    ``TPU_ACCELERATOR_TYPE``, ``TPU_WORKER_HOSTNAMES``: without them libtpu logs warnings that do
    not apply); on a TPU VM it changes nothing."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise PlanError("libtpu is not installed: install the tpu extra (pip install -e '.[tpu]'), which "
                        "brings the libtpu matching the pinned jax") from None
    if not _has_tpu_chips():
        for key, value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_SKIP_MDS_QUERY", "1"),
                           ("TPU_ACCELERATOR_TYPE", f"{topology.chip.name}-{topology.chips}"),
                           ("TPU_WORKER_HOSTNAMES", "localhost")):
            os.environ.setdefault(key, value)
    from jax.experimental import topologies

    dims = "x".join(map(str, topology.dims))
    try:
        desc = topologies.get_topology_desc(
            topology_name=f"{topology.chip.libtpu_name}:{dims}", platform="tpu",
            chip_config_name=topology.chip.chip_config, chips_per_host_bounds=_host_bounds(topology))
    except Exception as e:  # noqa: BLE001 - libtpu's errors are JaxRuntimeErrors with long messages
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PlanError(f"libtpu cannot make topology {topology.name!r}: {first}") from None
    devices = list(desc.devices)
    if len(devices) != topology.chips:
        raise PlanError(f"libtpu made {len(devices)} devices for {topology.name!r} ({topology.chips} chips): "
                        "this libtpu does not match the pinned jax; reinstall the tpu extra")
    return devices


__all__ = ["ALIASES", "CHIPS", "ChipSpec", "GiB", "PlanError", "Topology", "parse_topology", "topology_devices"]
