"""Mesh/rules/shardings, and the sharded train step against a single device.

Runs on 8 virtual CPU devices. One step under data-parallel 8, fsdp 4 x data 2
and tensor 2 x data 4 must give the loss and updated parameters of the
single-device step (fp32, dropout on: the RNG does not depend on the sharding).
VisualBERT runs by default; the other designs are `slow` (compiles dominate).
"""
import dataclasses
import functools
import importlib
import re

import jax
import flax.linen as nn
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vlpjax import config_lib, optim, sharding, state as state_lib, step as step_lib, train
from vlpjax.data import synthetic
from vlpjax.models import get_design, get_model
from vlpjax.tasks import pretrain as pretrain_task

# (data, fsdp, tensor)
MESHES = {'data8': (8, 1, 1), 'fsdp4_data2': (2, 4, 1), 'tensor2_data4': (4, 1, 2)}
BATCH, TEXT_LEN, REGIONS = 16, 12, 6


def tiny_config(design: str) -> ml_collections.ConfigDict:
  config = config_lib.make_config(
      importlib.import_module(f'configs.{design}').model_config('tiny'))
  config.train.global_batch_size = BATCH
  config.train.warmup_fraction = 0.0   # a nonzero learning rate at step 0
  config.train.num_steps = 10
  return config


def synthetic_batch(config: ml_collections.ConfigDict, seed: int = 0) -> dict[str, np.ndarray]:
  return synthetic.synthetic_batch(config.model, BATCH, TEXT_LEN, REGIONS, seed)


def setup(config: ml_collections.ConfigDict, mesh_shape: tuple[int, int, int],
          batch: dict[str, np.ndarray]):
  """(config, mesh, rules, model, tx, schedule, task, input specs, state shardings)."""
  config = config.copy_and_resolve_references()
  config.mesh.shape = mesh_shape
  mesh = sharding.make_mesh(config, jax.devices()[:int(np.prod(mesh_shape))])
  train.validate_config(config, mesh)
  rules = sharding.logical_axis_rules(config)
  model = get_model(config.model)
  tx, schedule = optim.make_optimizer(config.train, get_design(config.model.name))
  task = pretrain_task.objectives(config)[0]
  batch_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  input_specs = step_lib.model_input_specs(config, pretrain_task, task, batch_spec)
  _, shardings = state_lib.abstract_train_state(model, tx, input_specs, mesh, rules)
  return config, mesh, rules, model, tx, schedule, task, input_specs, shardings


def one_step(config: ml_collections.ConfigDict, mesh_shape: tuple[int, int, int],
             batch: dict[str, np.ndarray], initial_state: state_lib.TrainState | None = None):
  """(initial state, host metrics, state after one step) on a mesh of `mesh_shape`.

  `initial_state` (host arrays) is placed in the mesh's shardings; without it the
  state is initialised from the seed.
  """
  config, mesh, rules, model, tx, schedule, task, input_specs, shardings = setup(
      config, mesh_shape, batch)
  if initial_state is None:
    state = state_lib.init_train_state(model, tx, input_specs, config.seed, shardings)
    initial_state = jax.device_get(state)
  else:
    state = jax.device_put(initial_state, shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = step_lib.make_train_step(config, model, tx, schedule, mesh, shardings, pretrain_task, task)
    global_batch = jax.device_put(batch, sharding.batch_sharding(mesh, config.mesh.data_axes))
    state, metrics = step(state, global_batch)
  return initial_state, {k: float(v) for k, v in jax.device_get(metrics).items()}, state


def tiny_config_for(design: str, dropout: bool) -> ml_collections.ConfigDict:
  config = tiny_config(design)
  if not dropout:   # halves the compile time of the default test
    config.model.dropout_rate = config.model.attention_dropout_rate = 0.0
  return config


@functools.cache
def single_device_reference(design: str, dropout: bool):
  config = tiny_config_for(design, dropout)
  return one_step(config, (1, 1, 1), synthetic_batch(config))


def assert_trees_close(actual, expected, rtol, atol, atol_of_leaf_max=0.0) -> None:
  """Leafwise allclose; `atol_of_leaf_max` adds that fraction of the leaf's largest
  magnitude to `atol`, since a sum's rounding error in a different reduction order
  scales with its terms, not with its (possibly cancelling) result."""
  expected_leaves = jax.tree_util.tree_leaves_with_path(expected)
  actual_leaves = jax.tree_util.tree_leaves(actual)
  assert len(actual_leaves) == len(expected_leaves)
  for (path, want), got in zip(expected_leaves, actual_leaves):
    want = np.asarray(want)
    scale = float(np.abs(want).max()) if want.size else 0.0
    np.testing.assert_allclose(np.asarray(got), want, rtol=rtol,
                               atol=atol + atol_of_leaf_max * scale,
                               err_msg=jax.tree_util.keystr(path))


def check_matches_single_device(design: str, mesh_name: str, dropout: bool) -> None:
  config = tiny_config_for(design, dropout)
  initial, ref_metrics, ref_state = single_device_reference(design, dropout)
  _, metrics, state = one_step(config, MESHES[mesh_name], synthetic_batch(config), initial)
  assert metrics.keys() == ref_metrics.keys()
  for name, value in ref_metrics.items():
    np.testing.assert_allclose(metrics[name], value, rtol=2e-5, atol=1e-6, err_msg=name)
  assert ref_metrics['learning_rate'] > 0
  assert_trees_close(state.params, ref_state.params, rtol=1e-4, atol=2e-6)
  assert_trees_close(state.opt_state, ref_state.opt_state, rtol=1e-4, atol=1e-9,
                     atol_of_leaf_max=1e-5)
  # The params really are sharded as the mesh asks (not replicated everywhere).
  sizes = dict(zip(config.mesh.axes, MESHES[mesh_name]))
  used = {axis for leaf in jax.tree_util.tree_leaves(state.params) for dim in leaf.sharding.spec
          if dim for axis in (dim if isinstance(dim, tuple) else (dim,)) if sizes[axis] > 1}
  assert used == {'data8': set(), 'fsdp4_data2': {'fsdp'}, 'tensor2_data4': {'tensor'}}[mesh_name]


@pytest.mark.parametrize('mesh_name', list(MESHES))
def test_visualbert_sharded_step_matches_single_device(mesh_name):
  check_matches_single_device('visualbert', mesh_name, dropout=False)


@pytest.mark.slow
@pytest.mark.parametrize('mesh_name', list(MESHES))
@pytest.mark.parametrize('design', ['visualbert', 'vilbert', 'lxmert', 'uniter'])
def test_sharded_step_with_dropout_matches_single_device(design, mesh_name):
  check_matches_single_device(design, mesh_name, dropout=True)


def test_lxmert_step_gathers_no_region_features():
  """LXMERT's replacement features come from the rows' own device (8 per
  device, DONOR_GROUP 8): the compiled step all-gathers no region feature, and
  MLM masking picks its slots per row (no all-gather of the text positions)."""
  config = tiny_config('lxmert')
  config.train.global_batch_size = 64
  batch = synthetic.synthetic_batch(config.model, 64, TEXT_LEN, REGIONS, 0)
  config, mesh, rules, model, tx, schedule, task, input_specs, shardings = setup(
      config, MESHES['data8'], batch)
  state = state_lib.init_train_state(model, tx, input_specs, config.seed, shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = step_lib.make_train_step(config, model, tx, schedule, mesh, shardings,
                                    pretrain_task, task)
    global_batch = jax.device_put(batch, sharding.batch_sharding(mesh, config.mesh.data_axes))
    hlo = step.lower(state, global_batch).compile().as_text()
  gathers = [line for line in hlo.splitlines() if 'all-gather' in line and ' = ' in line]
  feature_dim = config.model.feature_dim
  assert not [g for g in gathers if re.search(rf'\[[0-9,]*,{feature_dim}\]', g.split(' = ')[1]
                                                .split(' ')[0])], gathers
  assert not [g for g in gathers if '/inputs/' in g], gathers


def test_state_is_initialised_sharded_with_single_device_values():
  """Init under jit with out_shardings over fsdp 4 x tensor 2: each array arrives
  in its shards, with the values a single device computes."""
  config = tiny_config_for('visualbert', dropout=False)
  initial, _, _ = single_device_reference('visualbert', False)
  batch = synthetic_batch(config)
  config, _, _, model, tx, _, _, input_specs, shardings = setup(config, (1, 4, 2), batch)
  state = state_lib.init_train_state(model, tx, input_specs, config.seed, shardings)
  for array, wanted in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(shardings)):
    assert array.sharding == wanted
  kernel = state.params['backbone']['layer_0']['ffn']['intermediate']['kernel']
  assert kernel.addressable_shards[0].data.shape == (kernel.shape[0] // 4, kernel.shape[1] // 2)
  assert_trees_close(state, initial, rtol=0, atol=0)


def test_resolve_mesh_shape():
  assert sharding.resolve_mesh_shape((-1, 2, 1), 8) == (4, 2, 1)
  assert sharding.resolve_mesh_shape((2, 2, 2), 8) == (2, 2, 2)
  with pytest.raises(ValueError, match=r'config.mesh.shape=\(3, -1, 1\) does not divide'):
    sharding.resolve_mesh_shape((3, -1, 1), 8)
  with pytest.raises(ValueError, match='uses 4 devices but 8 are present'):
    sharding.resolve_mesh_shape((2, 2, 1), 8)
  with pytest.raises(ValueError, match='at most one -1'):
    sharding.resolve_mesh_shape((-1, -1, 1), 8)


def test_make_mesh_axes_and_types():
  config = tiny_config('visualbert')
  config.mesh.shape = (-1, 2, 2)
  mesh = sharding.make_mesh(config)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  config.mesh.data_axes = ('data', 'replica')
  with pytest.raises(ValueError, match=r"data_axes names \['replica'\]"):
    sharding.make_mesh(config)


def test_logical_rules_must_name_mesh_axes():
  config = tiny_config('visualbert')
  config.mesh.logical_axis_rules = (('batch', 'data'), ('mlp', 'model'))
  with pytest.raises(ValueError, match=r"rule for 'mlp' names mesh axes \['model'\]"):
    sharding.logical_axis_rules(config)


def test_param_shardings_follow_rules_and_fit_shapes():
  """fsdp 4 x tensor 2: Megatron/ZeRO placement; a dim the axes don't divide stays whole."""
  config = tiny_config('visualbert')
  config.mesh.shape = (1, 4, 2)
  config.model.vocab_size = 121   # odd, but its table is padded to 128 rows
  config.model.intermediate_size = 63   # odd: cannot split over tensor=2
  mesh = sharding.make_mesh(config)
  rules = sharding.logical_axis_rules(config)
  model = get_model(config.model)
  tx, _ = optim.make_optimizer(config.train, get_design(config.model.name))
  batch = synthetic_batch(config)
  batch_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  input_specs = step_lib.model_input_specs(config, pretrain_task, 'all', batch_spec)
  abstract, shardings = state_lib.abstract_train_state(model, tx, input_specs, mesh, rules)
  flat = {jax.tree_util.keystr(p): s.spec for p, s in
          jax.tree_util.tree_leaves_with_path(shardings.params)}
  query = [k for k in flat if k.endswith("['attention']['query']['kernel']")][0]
  assert flat[query] == P('fsdp', 'tensor', None)          # [embed, heads, kv]
  ffn_in = [k for k in flat if k.endswith("['ffn']['intermediate']['kernel']")][0]
  assert flat[ffn_in] == P('fsdp', None)                   # [embed, mlp 63] kept whole
  word = [k for k in flat if k.endswith("['word_embeddings']['embedding']")][0]
  assert flat[word] == P('tensor', 'fsdp')                 # [vocab 128, embed]
  assert abstract.params['backbone']['embeddings']['word_embeddings']['embedding'].shape[0] == 128
  assert flat["['mlm_head']['bias']"] == P('tensor')
  # Adam moments are placed like their params; the step is replicated.
  mu = shardings.opt_state[1][0].mu
  assert jax.tree.map(lambda s: s.spec, mu) == jax.tree.map(lambda s: s.spec, shardings.params)
  assert shardings.step.spec == P()
  # The abstract state carries the shardings (used to restore straight into shards).
  assert abstract.params is not None and all(
      a.sharding == s for a, s in zip(jax.tree_util.tree_leaves(abstract),
                                      jax.tree_util.tree_leaves(shardings)))


def test_batch_must_divide_data_axes():
  config = tiny_config('visualbert')
  config.mesh.shape = (4, 2, 1)
  config.train.global_batch_size = 12
  mesh = sharding.make_mesh(config)
  with pytest.raises(ValueError, match='global_batch_size=12 must be a multiple of 8'):
    train.validate_config(config, mesh)
  config.train.global_batch_size = 8
  config.train.grad_accum_steps = 2
  with pytest.raises(ValueError, match='global_batch_size=8 must be a multiple of 16'):
    train.validate_config(config, mesh)


def test_gradient_buffers_are_donated_and_change_no_value():
  """`state_lib.with_grad_buffers`: the compiled step aliases the buffers to its
  gradient outputs (written in place, no fresh memory) and the update is the
  single-device one."""
  config = tiny_config_for('visualbert', dropout=False)
  initial, ref_metrics, ref_state = single_device_reference('visualbert', False)
  batch = synthetic_batch(config)
  config, mesh, rules, model, tx, schedule, task, _, shardings = setup(
      config, MESHES['fsdp4_data2'], batch)
  state = jax.device_put(initial, shardings)
  buffered, buffered_shardings = state_lib.with_grad_buffers(state, shardings)
  assert buffered_shardings.grads == shardings.params
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    global_batch = jax.device_put(batch, sharding.batch_sharding(mesh, config.mesh.data_axes))
    aliased = {}
    for name, (st, sh) in dict(plain=(state, shardings),
                               buffered=(buffered, buffered_shardings)).items():
      step = step_lib.make_train_step(config, model, tx, schedule, mesh, sh, pretrain_task, task)
      aliased[name] = step.lower(st, global_batch).compile().memory_analysis().alias_size_in_bytes
    new_state, metrics = step(buffered, global_batch)
  param_shard_bytes = sum(
      np.prod(s.shard_shape(p.shape)) * p.dtype.itemsize for p, s in
      zip(jax.tree_util.tree_leaves(initial.params), jax.tree_util.tree_leaves(shardings.params)))
  assert aliased['buffered'] - aliased['plain'] == param_shard_bytes
  for name, value in jax.device_get(metrics).items():
    np.testing.assert_allclose(value, ref_metrics[name], rtol=2e-5, atol=1e-6, err_msg=name)
  assert_trees_close(new_state.params, ref_state.params, rtol=1e-4, atol=2e-6)
  grads = jax.tree_util.tree_leaves(new_state.grads)
  assert all(np.isfinite(g).all() for g in grads) and any(np.abs(g).max() > 0 for g in grads)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FakeHostDevice:
  """A device without `slice_index` (as CPU/GPU): slices are its processes."""
  id: int
  process_index: int
  platform: str = 'gpu'
  device_kind: str = 'fake gpu'


@dataclasses.dataclass(frozen=True, kw_only=True)
class FakeTpuDevice(FakeHostDevice):
  """A TPU v4 chip (one core) at `coords` in its slice's physical torus."""
  slice_index: int
  coords: tuple[int, int, int]
  core_on_chip: int = 0
  platform: str = 'tpu'
  device_kind: str = 'TPU v4'


def fake_tpu_slices(num_slices: int, torus: tuple[int, int, int]) -> list[FakeTpuDevice]:
  """`num_slices` slices of a `torus` of chips each, ids in slice order, two
  processes per slice."""
  per_slice = int(np.prod(torus))
  return [FakeTpuDevice(id=s * per_slice + i, process_index=2 * s + 2 * i // per_slice,
                        slice_index=s, coords=tuple(int(c) for c in np.unravel_index(i, torus[::-1])[::-1]))
          for s in range(num_slices) for i in range(per_slice)]


def multislice_config(shape, dcn_shape) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(dict(mesh=sharding.mesh_config()))
  config.mesh.shape, config.mesh.dcn_shape = shape, dcn_shape
  return config


def slice_indices(mesh: jax.sharding.Mesh, attr: str = 'slice_index') -> np.ndarray:
  return np.vectorize(lambda d: getattr(d, attr))(mesh.devices)


def test_multislice_mesh_keeps_each_slice_contiguous_along_the_dcn_axis():
  """2 slices of 2x2 chips, data parallel across them: mesh[0] is slice 0, mesh[1] slice 1."""
  devices = fake_tpu_slices(2, (2, 2, 1))
  mesh = sharding.make_mesh(multislice_config((-1, 2, 2), (2, 1, 1)), devices)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  np.testing.assert_array_equal(slice_indices(mesh), np.arange(2)[:, None, None] * np.ones((2, 2, 2)))
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
  # 2 slices of 2x2x2 chips, per-slice data 2: the data axis (4) is slice 0 then slice 1.
  devices = fake_tpu_slices(2, (2, 2, 2))
  mesh = sharding.make_mesh(multislice_config((2, 2, 2), (-1, 1, 1)), devices)
  assert mesh.devices.shape == (4, 2, 2)
  np.testing.assert_array_equal(slice_indices(mesh)[:, 0, 0], [0, 0, 1, 1])
  assert all(len(set(slice_indices(mesh)[i].flat)) == 1 for i in range(4))
  # Across slices along fsdp instead: only that axis leaves the slice.
  mesh = sharding.make_mesh(multislice_config((2, -1, 2), (1, 2, 1)), devices)
  assert mesh.devices.shape == (2, 4, 2)
  np.testing.assert_array_equal(slice_indices(mesh)[0, :, 0], [0, 0, 1, 1])


def test_multislice_mesh_without_slice_index_groups_by_process():
  devices = [FakeHostDevice(id=i, process_index=i // 4) for i in reversed(range(8))]
  mesh = sharding.make_mesh(multislice_config((-1, 1, 2), (2, 1, 1)), devices)
  assert mesh.devices.shape == (4, 1, 2)
  np.testing.assert_array_equal(slice_indices(mesh, 'process_index')[:, 0, 0], [0, 0, 1, 1])


def test_multislice_mesh_errors():
  devices = fake_tpu_slices(2, (2, 2, 1))
  cases = [
      ((-1, 2, 2), (2, 1), r'config.mesh.axes=.* and config.mesh.dcn_shape=\(2, 1\) differ in length'),
      ((-1, 2, 2), (1, 1, 1), r'config.mesh.dcn_shape=\(1, 1, 1\) uses 1 slices .* but 2 are present'),
      ((-1, 2, 2), (4, 1, 1), r'config.mesh.dcn_shape=\(4, 1, 1\) does not divide the 2 slices'),
      ((-1, 2, 2), (-1, -1, 1), r'config.mesh.dcn_shape=\(-1, -1, 1\): .*at most one -1'),
      ((-1, 2, 2), (2, 1.5, 1), r'config.mesh.dcn_shape: 1.5 is not an integer'),
      ((-1, 4, 2), (2, 1, 1), r'config.mesh.shape \(per slice\)=\(-1, 4, 2\) does not divide '
                              r'the 4 devices of each of the 2 slices'),
      ((1, 2, 1), (2, 1, 1), r'config.mesh.shape \(per slice\)=\(1, 2, 1\) uses 2 devices of '
                             r'each of the 2 slices but 4 are present'),
  ]
  for shape, dcn_shape, message in cases:
    with pytest.raises(ValueError, match=message):
      sharding.make_mesh(multislice_config(shape, dcn_shape), devices)
  with pytest.raises(ValueError, match=r'slices \(devices by slice_index\) differ in size'):
    sharding.make_mesh(multislice_config((-1, 1, 1), (2, 1, 1)), devices[:7])


def test_multislice_mesh_on_one_host_is_the_single_slice_mesh():
  """The 8 CPU devices are one process, so one slice: dcn (1,1,1) changes nothing
  and more slices are refused."""
  config = multislice_config((-1, 2, 2), ())
  single = sharding.make_mesh(config)
  config.mesh.dcn_shape = (1, 1, 1)
  hybrid = sharding.make_mesh(config)
  assert hybrid.shape == single.shape and hybrid.axis_types == single.axis_types
  np.testing.assert_array_equal(hybrid.devices, single.devices)
  config.mesh.dcn_shape = (2, 1, 1)
  with pytest.raises(ValueError, match=r'does not divide the 1 slices \(devices by process_index\)'):
    sharding.make_mesh(config)
