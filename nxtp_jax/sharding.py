"""Device mesh, logical-axis rules, and sharded initialisation.

Parameters carry logical axis names; `rules` map each name to a mesh axis (or None
for replication). A logical name with no rule is an error, never a silent
replication.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from nxtp_jax.configs.base import LOGICAL_AXIS_RULES  # their one home: the experiment config

MESH_AXES = ("data", "fsdp", "tensor")


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """The one (data, fsdp, tensor) mesh constructor. `shape` sizes may use -1 once for "all remaining devices".

    `jax.make_mesh` lays the axes out along the hardware topology (TPU torus, NVLink
    islands); over several TPU slices data (else fsdp) spans the slices. Axes are Auto:
    sharding constraints apply and XLA propagates the rest.
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = dict(data=-1, fsdp=1, tensor=1) if shape is None else {a: int(shape.get(a, 1)) for a in MESH_AXES}
    known = int(np.prod([s for s in sizes.values() if s != -1]))
    if list(sizes.values()).count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
    sizes = {a: (len(devices) // known if s == -1 else s) for a, s in sizes.items()}
    if int(np.prod(list(sizes.values()))) != len(devices):
        raise ValueError(f"mesh {sizes} needs {int(np.prod(list(sizes.values())))} devices, found {len(devices)}")
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices == 1:
        return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=axis_types, devices=devices)
    # Several TPU slices talk over the data-center network: one axis (data, else fsdp) spans them,
    # the rest stays inside a slice, as MaxText's DCN parallelism does.
    across = next((a for a in ("data", "fsdp") if sizes[a] % slices == 0), None)
    if across is None:
        raise ValueError(f"mesh {sizes} over {slices} slices: data or fsdp must be a multiple of {slices}")
    dcn = tuple(slices if a == across else 1 for a in MESH_AXES)
    ici = tuple(sizes[a] // n for a, n in zip(MESH_AXES, dcn))
    return Mesh(mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices), MESH_AXES, axis_types=axis_types)


def local_mesh(fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh over this process's devices (all of them by default): inference needs no cross-host collectives.

    Every process of a multi-host run gets a mesh of its own devices, never process 0's. `fsdp=-1` (as in
    a config's mesh) takes the devices that `tensor` leaves, and data parallelism none.
    """
    devices = list(devices if devices is not None else jax.local_devices())
    if len(devices) % (abs(fsdp) * tensor):
        raise ValueError(
            f"expected the {len(devices)} local devices to split into fsdp={fsdp} x tensor={tensor} groups; "
            "set mesh.fsdp and mesh.tensor to divisors of the devices per host"
        )
    return make_mesh({"data": 1 if fsdp == -1 else -1, "fsdp": fsdp, "tensor": tensor}, devices)


def one_device_mesh() -> Mesh:
    """This process's first device, as a mesh: the default for single-image inference and initialisation."""
    return local_mesh(devices=jax.local_devices()[:1])


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> NamedSharding:
    """Leading (batch) dimension over the mesh axes of the logical "batch" axis, in training and evaluation alike."""
    return nn.logical_to_mesh_sharding(PartitionSpec("batch"), mesh, tuple(rules))


def check_rules(logical_specs: Any, rules: Sequence[tuple[str, Any]]) -> None:
    known = {name for name, _ in rules}
    missing = set()
    for spec in jax.tree_util.tree_leaves(logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)):
        if isinstance(spec, PartitionSpec):
            missing |= {a for a in spec if a is not None and a not in known}
    if missing:
        raise ValueError(f"no sharding rule for logical axes {sorted(missing)}; add them to the config's logical_axis_rules")


def check_divisible(abstract_variables: Any, logical_specs: Any, shardings: Any) -> None:
    """Every sharded dimension splits evenly over its mesh axes (jit's in/out shardings require it);
    the error names the parameter, its size and logical axis, and the mesh axes that do not divide it."""
    leaves = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(abstract_variables))
    specs = jax.tree_util.tree_leaves(logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    for (path, leaf), logical, named in zip(leaves, specs, jax.tree_util.tree_leaves(shardings)):
        for dim, (size, axes) in enumerate(zip(leaf.shape, named.spec)):
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            ways = int(np.prod([named.mesh.shape[a] for a in axes]))
            if size % ways:
                name = jax.tree_util.keystr(path, simple=True, separator="/")
                raise ValueError(
                    f"{name} has {size} along {logical[dim]!r}, which mesh axes {axes} "
                    f"({ways} devices) do not divide; choose mesh sizes that divide it"
                )


def param_shardings(abstract_variables: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for the (unboxed) variables that `abstract_variables` (boxed, from eval_shape) describes."""
    specs = nn.get_partition_spec(abstract_variables)
    check_rules(specs, rules)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, tuple(rules))
    check_divisible(abstract_variables, specs, shardings)
    return shardings


def init_sharded(init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
    """Runs `init_fn(rng)` (a Flax `init` returning boxed variables) straight into its shardings.

    `eval_shape` first, then one jit with out_shardings: the full model never sits
    on one device and is never materialised in another dtype first.
    """
    abstract = jax.eval_shape(init_fn, rng)
    shardings = param_shardings(abstract, mesh, rules)

    def init(key):
        # XLA's CPU buffer plan for the default threefry generator needs 2.5-5x the params'
        # memory in temporaries (16.7 GiB for the 1.78B model); the rbg generator needs ~0.1x.
        return nn.meta.unbox(init_fn(jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl="rbg")))

    return jax.jit(init, out_shardings=shardings)(rng)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
