"""TPU names as users type them -> libtpu's topology arguments, and each chip's published figures.

    parse("v5p-64")        # 32 chips: v5p:2x4x4 (v4 and v5p names count TensorCores, two per chip)
    parse("v5litepod-16")  # 16 chips: v5e:4x4 (v5e and v6e names count chips)
    parse("v5e:4x4")       # JAX's own form

JAX-free, so names can be checked before libtpu is imported.
"""

from __future__ import annotations

import dataclasses
import math
import re

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One chip's published figures (per chip; bf16 dense peak)."""

    generation: str  # the prefix of libtpu's topology names
    hbm_bytes: int
    peak_flops: float  # FLOP/s
    hbm_bandwidth: float  # bytes/s
    source: str  # where the three figures are published
    cores_in_name: int  # TensorCores per chip that names like "v4-8" count
    dims: int  # 2-D (v5e, v6e) or 3-D (v4, v5p) torus
    chip_config: str  # libtpu's chip_config_name: "megacore" runs both cores of a chip as one device


CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1200e9, "https://cloud.google.com/tpu/docs/v4", 2, 3, "megacore"),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 819e9, "https://cloud.google.com/tpu/docs/v5e", 1, 2, "default"),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2765e9, "https://cloud.google.com/tpu/docs/v5p", 2, 3, "megacore"),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1640e9, "https://cloud.google.com/tpu/docs/v6e", 1, 2, "default"),
}
# Other spellings of a generation in accelerator names (Cloud's v5litepod-N).
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "v5": "v5p"}
# libtpu spells v5p topologies "v5:..." (as MaxText's accelerator_to_spec_map does).
LIBTPU_PREFIX = {"v4": "v4", "v5e": "v5e", "v5p": "v5", "v6e": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as the user typed it
    chip: Chip
    shape: tuple[int, ...]  # chips along each torus axis

    @property
    def num_chips(self) -> int:
        return math.prod(self.shape)

    @property
    def libtpu_name(self) -> str:
        return f"{LIBTPU_PREFIX[self.chip.generation]}:{'x'.join(map(str, self.shape))}"

    def libtpu_kwargs(self) -> dict:
        """Keyword arguments of `jax.experimental.topologies.get_topology_desc` (MaxText's
        accelerator_to_spec_map): one-chip and 8-chip 2-D slices are one host; others have 4 chips per host."""
        if self.chip.dims == 2 and self.num_chips in (1, 8) and len(self.shape) == 2:
            host = (*self.shape, 1)
        else:
            host = (2, 2, 1)
        full = (*self.shape, 1)[:3]
        return {
            "topology_name": self.libtpu_name,
            "chip_config_name": self.chip.chip_config,
            "chips_per_host_bounds": tuple(min(h, f) for h, f in zip(host, full)),
            "wrap": tuple(len(self.shape) == 3 and min(self.shape) >= 4 for _ in range(3)),
        }


# Slice shapes by chip count, as Cloud TPU provisions them.
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8), 256: (4, 8, 8)}

_ACCELERATOR = re.compile(r"^(v\d+[a-z]*)-(\d+)$")
_JAX_FORM = re.compile(r"^(v\d+[a-z]*):(\d+(?:x\d+)*)$")


def _chip(generation: str, name: str) -> Chip:
    chip = CHIPS.get(ALIASES.get(generation, generation))
    if chip is None:
        raise ValueError(f"compile.topology {name!r}: expected a TPU generation in {sorted(CHIPS)}, found {generation!r}")
    return chip


def parse(name: str) -> Topology:
    """`v4-32`, `v5e-16`, `v5litepod-16`, `v5p-64`, `v6e-8`, or `v5e:4x4` -> a Topology."""
    text = name.strip().lower()
    if m := _JAX_FORM.match(text):
        chip = _chip(m.group(1), name)
        shape = tuple(int(d) for d in m.group(2).split("x"))
        if len(shape) != chip.dims:
            raise ValueError(f"compile.topology {name!r}: a {chip.generation} slice has {chip.dims} axes, found {len(shape)}")
        return Topology(name, chip, shape)
    if m := _ACCELERATOR.match(text):
        chip = _chip(m.group(1), name)
        count = int(m.group(2))
        chips, rest = divmod(count, chip.cores_in_name)
        shapes = SHAPES_2D if chip.dims == 2 else SHAPES_3D
        if rest or chips not in shapes:
            sizes = [n * chip.cores_in_name for n in shapes]
            raise ValueError(f"compile.topology {name!r}: expected {chip.generation}-N with N in {sizes}, found {count}")
        return Topology(name, chip, shapes[chips])
    raise ValueError(f"compile.topology: expected a name like v4-32, v5e-16, v5litepod-16, v5p-64, v6e-8 or v5e:4x4, found {name!r}")
