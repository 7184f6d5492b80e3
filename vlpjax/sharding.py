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

import collections
import logging
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
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
    ('layers', None),  # the stacked axis of scanned layers (model.scan_layers)
)


def mesh_config() -> ml_collections.ConfigDict:
  """The `config.mesh` section: axis names and sizes, data axes, logical rules."""
  return ml_collections.ConfigDict(dict(
      axes=DEFAULT_MESH_AXES,
      shape=(-1, 1, 1),             # one -1: fill with the remaining devices
      # Multi-slice (ICI within a slice, DCN across): () is one slice; else the
      # number of slices along each axis (at most one -1), e.g. (2, 1, 1) = data
      # parallel over 2 slices, and `shape` is then the per-slice (ICI) shape.
      dcn_shape=(),
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


def mesh_shape(mesh_config: ml_collections.ConfigDict, field: str = 'shape') -> tuple[int, ...]:
  """`config.mesh.shape` (or the sizes field `field`, e.g. `dcn_shape`), checked
  to be integers.

  Raises:
    ValueError naming the field if an entry is not an integer. An override that
    is not a tuple of integers (`--config.mesh.shape='(2,a,1)'`) reaches the
    config as one string, which is reported as the parse error it is.
  """
  shape = tuple(getattr(mesh_config, field))
  bad = [s for s in shape if isinstance(s, bool) or not isinstance(s, int)]
  if bad:
    what = (f'could not parse {bad[0]!r} as a tuple of integers' if isinstance(bad[0], str)
            else f'{bad[0]!r} is not an integer')
    example = ("'(2,1,1)' (slices per axis)" if field == 'dcn_shape'
               else "'(-1,2,1)' (one -1: the remaining devices)")
    raise ValueError(f'config.mesh.{field}: {what}; give one size per axis of '
                     f"config.mesh.axes={tuple(mesh_config.axes)}, e.g. "
                     f'--config.mesh.{field}={example}')
  return shape


def resolve_mesh_shape(shape: Sequence[int], num_devices: int,
                       field: str = 'config.mesh.shape',
                       unit: str = 'devices') -> tuple[int, ...]:
  """Replaces the single -1 in `shape` so that the product is `num_devices`.

  `field` and `unit` name the sizes and what they count in the errors (e.g.
  `config.mesh.dcn_shape` and 'slices').

  Raises:
    ValueError (naming `field`) if the sizes cannot cover the devices.
  """
  shape = tuple(int(s) for s in shape)
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f'{field}={shape}: sizes must be positive, with at most '
                     'one -1 (fill)')
  known = math.prod(s for s in shape if s != -1)
  if num_devices % known:
    raise ValueError(f'{field}={shape} does not divide the {num_devices} {unit}')
  if -1 in shape:
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f'{field}={shape} uses {math.prod(shape)} {unit} but '
                     f'{num_devices} are present; use -1 for one axis to fill')
  return shape


def hybrid_device_array(ici_shape: Sequence[int], dcn_shape: Sequence[int],
                        devices: Sequence[jax.Device]) -> np.ndarray:
  """Devices of a multi-slice mesh, for `jax.sharding.Mesh`.

  Args:
    ici_shape: sizes within one slice (`config.mesh.shape`), at most one -1.
    dcn_shape: number of slices along each axis (`config.mesh.dcn_shape`), of
      the same length, at most one -1.
    devices: the devices of all slices.

  Returns:
    An array of shape `ici_shape * dcn_shape` (elementwise, -1s resolved) made of
    one `ici_shape` block per slice, the blocks laid out in `dcn_shape` in slice
    order; so only the axes with a dcn size > 1 cross slices.

  Raises:
    ValueError naming `config.mesh.dcn_shape` or `config.mesh.shape` if the
    slices differ in size or the shapes do not cover the slices and devices.
  """
  # TPU devices carry the index of their slice; CPU and GPU devices do not, so
  # there each process (one host, whose devices share fast links) is a slice.
  process_is_granule = not all(hasattr(d, 'slice_index') for d in devices)
  key = 'process_index' if process_is_granule else 'slice_index'
  slice_sizes = collections.Counter(getattr(d, key) for d in devices)
  if len(set(slice_sizes.values())) > 1:
    raise ValueError(f'config.mesh.dcn_shape: the slices (devices by {key}) differ in size: '
                     f'{dict(sorted(slice_sizes.items()))} devices')
  num_slices = len(slice_sizes)
  per_slice = len(devices) // num_slices
  dcn_shape = resolve_mesh_shape(dcn_shape, num_slices, 'config.mesh.dcn_shape',
                                 f'slices (devices by {key})')
  ici_shape = resolve_mesh_shape(ici_shape, per_slice, 'config.mesh.shape (per slice)',
                                 f'devices of each of the {num_slices} slices')
  # Splitting a physical axis is only a fallback (used when no whole-axis
  # assignment fits), so any per-slice shape that factors the slice works.
  return mesh_utils.create_hybrid_device_mesh(
      ici_shape, dcn_shape, devices, process_is_granule=process_is_granule,
      allow_split_physical_axes=True)


def make_mesh(config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the mesh of `config.mesh` over `devices` (default: all devices).

  With `config.mesh.dcn_shape` set the mesh spans slices: axis i has size
  `shape[i] * dcn_shape[i]` (see `hybrid_device_array`). Axes are `Auto`
  (classic GSPMD sharding propagation), which linen's logical partitioning needs.
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
  axis_types = (AxisType.Auto,) * len(axes)
  dcn_shape = mesh_shape(config.mesh, 'dcn_shape')
  if dcn_shape:
    if len(dcn_shape) != len(axes):
      raise ValueError(f'config.mesh.axes={axes} and config.mesh.dcn_shape={dcn_shape} '
                       'differ in length')
    return Mesh(hybrid_device_array(shape, dcn_shape, devices), axes, axis_types=axis_types)
  shape = resolve_mesh_shape(shape, len(devices))
  return jax.make_mesh(shape, axes, axis_types=axis_types, devices=devices)


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
