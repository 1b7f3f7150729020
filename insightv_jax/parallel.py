"""Device mesh, the logical-axis rules table, and sharding helpers.

Model code names the axes of every parameter and activation *logically*
(`embed`, `heads`, `mlp`, ...). The single table `LOGICAL_RULES` maps those names
onto the mesh axes `("data", "fsdp", "tensor")`. Changing parallelism means
changing the mesh shape or this table, never model code.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from insightv_jax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    # vision parameters
    ("patch", None),
    ("vision_embed", "fsdp"),
    ("vision_mlp", "tensor"),
    ("vision_heads", "tensor"),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_vocab", "tensor"),
)


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `("data", "fsdp", "tensor")` mesh with Auto axis types.

    One axis may be -1 and absorbs the remaining devices. Auto axis types keep
    sharded embedding lookups working.
    """
    cfg = cfg or MeshConfig()
    devices = list(devices if devices is not None else jax.devices())
    shape = [cfg.data, cfg.fsdp, cfg.tensor]
    if shape.count(-1) > 1:
        raise ConfigError("mesh: at most one of data/fsdp/tensor may be -1")
    known = math.prod(s for s in shape if s != -1)
    if any(s == 0 or s < -1 for s in shape):
        raise ConfigError(f"mesh: axis sizes must be positive or -1, got {shape}")
    if -1 in shape:
        if len(devices) % known:
            raise ConfigError(f"mesh: {len(devices)} devices do not divide by {known}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ConfigError(
            f"mesh: data×fsdp×tensor = {'×'.join(map(str, shape))} needs "
            f"{math.prod(shape)} devices, have {len(devices)}"
        )
    return jax.make_mesh(
        tuple(shape),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def platform(mesh: Mesh | None = None) -> str:
    """The platform (cpu, gpu, tpu) programs run on: that of `mesh`'s devices,
    else JAX's default backend. Kernel choices (the attention implementation)
    are resolved from it once, where a model is built (`models.factory`)."""
    if mesh is not None:
        return mesh.devices.flat[0].platform
    return jax.default_backend()


def run_mesh(cfg: MeshConfig) -> Mesh:
    """The mesh of an RL run (`insightv rl`, `rl-toy`): `make_mesh(cfg)`, except that on
    one host a mesh of explicit sizes (no -1) smaller than the host takes its first
    devices, e.g. `mesh.fsdp=1` for a single-device run beside fake CPU devices."""
    sizes = (cfg.data, cfg.fsdp, cfg.tensor)
    if -1 in sizes or jax.process_count() > 1:
        return make_mesh(cfg)
    return make_mesh(cfg, jax.devices()[: math.prod(sizes)])


def single_device_mesh() -> Mesh:
    """A 1×1×1 mesh on the first device (unsharded reference runs)."""
    return make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])


def logical_to_spec(
    logical_axes: Sequence[str | None] | None,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, str | tuple[str, ...] | None]] = LOGICAL_RULES,
) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec.

    With `shape` and `mesh`, a mesh axis that does not divide its dimension (or
    is already used by an earlier dimension) is dropped, so odd sizes fall back
    to replication instead of failing.
    """
    if logical_axes is None:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(logical_axes):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        kept = []
        size = shape[i] if shape is not None else None
        for ax in axes:
            if ax in used:
                continue
            if mesh is not None and size is not None:
                n = mesh.shape[ax]
                if size % (n * math.prod(mesh.shape[a] for a in kept)):
                    continue
            kept.append(ax)
        used.update(kept)
        spec.append(kept[0] if len(kept) == 1 else (tuple(kept) if kept else None))
    return PartitionSpec(*spec)


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedShardings for every variable of an (abstract) NNX state, from its
    logical `out_sharding` metadata and the rules table."""

    def one(var):
        names = var.get_metadata().get("out_sharding")
        spec = logical_to_spec(names, var.get_value().shape, mesh)
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain_sharding(x: jax.Array, *logical_axes: str | None) -> jax.Array:
    """`with_sharding_constraint` by logical names under the current mesh (no-op
    outside a mesh or on one device)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return x
    spec = logical_to_spec(logical_axes, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def batch_shards(rows: int) -> int:
    """How many pieces the current mesh cuts a batch of `rows` rows into
    (1 outside a mesh): the groups a per-shard computation works within."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return 1
    axes = logical_to_spec(("act_batch",), (rows,), mesh)[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape[a] for a in axes)


def initialize_distributed() -> None:
    """Multi-host initialisation from the environment.

    TPU pods configure themselves; elsewhere set `JAX_COORDINATOR_ADDRESS`,
    `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` (SLURM variables also work).
    Single-process runs need nothing and this returns at once.
    """
    if jax.distributed.is_initialized():
        return
    coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
    nproc = os.environ.get("JAX_NUM_PROCESSES")
    if coordinator and nproc:
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(nproc),
            process_id=int(os.environ.get("JAX_PROCESS_ID", "0")),
        )
    elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("SLURM_NTASKS", "1") != "1":
        jax.distributed.initialize()
