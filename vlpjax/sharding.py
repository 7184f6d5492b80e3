"""Device mesh, logical-axis rules and shardings for params, train state and batches.

The mesh has named axes from the config (default `('data', 'fsdp', 'tensor')`,
sizes with one -1 meaning "the remaining devices"). Parameters carry logical axis
names (see `vlpjax.models.layers`); `config.mesh.logical_axis_rules` maps them to
mesh axes, first matching rule wins per array and a mesh axis is used at most
once per array (flax's rule semantics). So with the default rules the batch of an
activation takes `('data', 'fsdp')` and its `embed` axis stays whole, while a
parameter's `embed` axis is split over `fsdp` (ZeRO-3 style) and `mlp`/`heads`/
`vocab` over `tensor` (Megatron style).

A parameter dimension that the chosen mesh axes do not divide (a tiny vocabulary,
an odd head count) is left unsharded instead; `state_shardings` logs each such
case so nothing happens silently.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax._src import clusters  # the environments jax.distributed.initialize() detects
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_MESH_AXES = ('data', 'fsdp', 'tensor')
# Order matters: 'batch' claims data and fsdp first, so activations never
# shard their 'embed' axis over fsdp (only parameters do).
DEFAULT_LOGICAL_AXIS_RULES = (
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('regions', None),
    ('embed', 'fsdp'),
    ('embed_out', 'tensor'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv', None),
    ('vocab', 'tensor'),
    ('feature', None),
    ('loc', None),
    ('positions', None),
    ('types', None),
)


def mesh_config() -> ml_collections.ConfigDict:
  """The `config.mesh` section: axis names and sizes, data axes, logical rules."""
  return ml_collections.ConfigDict(dict(
      axes=DEFAULT_MESH_AXES,
      shape=(-1, 1, 1),             # one -1: fill with the remaining devices
      data_axes=('data', 'fsdp'),   # mesh axes the batch is split over
      logical_axis_rules=DEFAULT_LOGICAL_AXIS_RULES,
  ))


def cluster_detected() -> bool:
  """True on a cluster (Cloud TPU, Slurm, Open MPI, Kubernetes) that
  `jax.distributed.initialize()` can configure from the environment."""
  return any(env.is_env_present() for env in clusters.ClusterEnv._cluster_types  # pylint: disable=protected-access
             if not env.opt_in_only_method)


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> None:
  """Starts multi-process JAX from explicit arguments or the cluster environment;
  a no-op on a single machine. Call before any other JAX use.

  Raises:
    ValueError if only some of the three arguments are given.
  """
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError('coordinator_address, num_processes and process_id go together, '
                       f'got {explicit}')
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif cluster_detected():
    jax.distributed.initialize()
  else:
    return
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def mesh_shape(mesh_config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """`config.mesh.shape`, checked to be integers.

  Raises:
    ValueError naming the field if an entry is not an integer. An override that
    is not a tuple of integers (`--config.mesh.shape='(2,a,1)'`) reaches the
    config as one string, which is reported as the parse error it is.
  """
  shape = tuple(mesh_config.shape)
  bad = [s for s in shape if isinstance(s, bool) or not isinstance(s, int)]
  if bad:
    what = (f'could not parse {bad[0]!r} as a tuple of integers' if isinstance(bad[0], str)
            else f'{bad[0]!r} is not an integer')
    raise ValueError(f'config.mesh.shape: {what}; give one size per axis of '
                     f"config.mesh.axes={tuple(mesh_config.axes)}, e.g. "
                     "--config.mesh.shape='(-1,2,1)' (one -1: the remaining devices)")
  return shape


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces the single -1 in `shape` so that the product is `num_devices`.

  Raises:
    ValueError (naming `config.mesh.shape`) if the sizes cannot cover the devices.
  """
  shape = tuple(int(s) for s in shape)
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f'config.mesh.shape={shape}: sizes must be positive, with at most '
                     'one -1 (fill)')
  known = math.prod(s for s in shape if s != -1)
  if num_devices % known:
    raise ValueError(f'config.mesh.shape={shape} does not divide the {num_devices} devices')
  if -1 in shape:
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f'config.mesh.shape={shape} uses {math.prod(shape)} devices but '
                     f'{num_devices} are present; use -1 for one axis to fill')
  return shape


def make_mesh(config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the mesh of `config.mesh` over `devices` (default: all devices).

  Axes are `Auto` (classic GSPMD sharding propagation), which linen's logical
  partitioning needs.
  """
  axes = tuple(config.mesh.axes)
  shape = mesh_shape(config.mesh)
  if len(axes) != len(shape):
    raise ValueError(f'config.mesh.axes={axes} and config.mesh.shape={shape} differ in '
                     'length')
  unknown = set(config.mesh.data_axes) - set(axes)
  if unknown:
    raise ValueError(f'config.mesh.data_axes names {sorted(unknown)}, not in '
                     f'config.mesh.axes={axes}')
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(shape, len(devices))
  return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes),
                       devices=devices)


def logical_axis_rules(config: ml_collections.ConfigDict) -> Rules:
  """`config.mesh.logical_axis_rules` as a tuple of (logical, mesh axes) pairs.

  Raises:
    ValueError if a rule names a mesh axis that `config.mesh.axes` lacks.
  """
  rules = tuple((str(name), tuple(m) if isinstance(m, (list, tuple)) else m)
                for name, m in config.mesh.logical_axis_rules)
  mesh_axes = set(config.mesh.axes)
  for name, target in rules:
    targets = target if isinstance(target, tuple) else (target,)
    bad = [t for t in targets if t is not None and t not in mesh_axes]
    if bad:
      raise ValueError(f'config.mesh.logical_axis_rules: rule for {name!r} names mesh '
                       f'axes {bad} not in config.mesh.axes={tuple(config.mesh.axes)}')
  return rules


def data_parallel_size(mesh: Mesh, data_axes: Sequence[str]) -> int:
  """Number of batch shards: product of the sizes of `data_axes`."""
  return math.prod(mesh.shape[a] for a in data_axes)


def batch_sharding(mesh: Mesh, data_axes: Sequence[str]) -> NamedSharding:
  """Leading (batch) axis split over `data_axes`, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(tuple(data_axes)))


def _fit_to_shape(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh,
                  path: str) -> PartitionSpec:
  """Drops mesh axes from dimensions they do not divide, logging each drop."""
  fitted = []
  for dim, (size, axes) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape))):
    names = axes if isinstance(axes, tuple) else (axes,) if axes else ()
    shards = math.prod(mesh.shape[n] for n in names)
    if size % shards:
      logging.info('sharding: %s dim %d (size %d) is not divisible by mesh axes %s '
                   '(%d shards); kept whole', path, dim, size, names, shards)
      axes = None
    fitted.append(axes)
  return PartitionSpec(*fitted)


def shardings_from_logical(logical_specs: Any, abstract: Any, mesh: Mesh,
                           rules: Rules) -> Any:
  """NamedShardings for `abstract` (a tree of arrays/ShapeDtypeStructs).

  Args:
    logical_specs: the same tree with a PartitionSpec of logical names per leaf
      (as `nn.get_partition_spec` gives for boxed params; PartitionSpec() for
      unnamed leaves such as a step counter).
  """
  mesh_specs = nn.logical_to_mesh(logical_specs, rules)
  def fit(path, spec, leaf):
    spec = _fit_to_shape(spec, tuple(leaf.shape), mesh, jax.tree_util.keystr(path))
    return NamedSharding(mesh, spec)
  return jax.tree_util.tree_map_with_path(
      fit, mesh_specs, abstract, is_leaf=lambda x: isinstance(x, PartitionSpec))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def describe(shardings: Any, abstract: Any) -> str:
  """A short summary: bytes per device of `abstract` under `shardings`."""
  total = sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize
              for a in jax.tree_util.tree_leaves(abstract))
  per_device = sum(
      np.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
      for s, a in zip(jax.tree_util.tree_leaves(shardings),
                      jax.tree_util.tree_leaves(abstract)))
  return f'{total / 2**20:.1f} MiB in all, {per_device / 2**20:.1f} MiB per device'
