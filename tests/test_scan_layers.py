"""`model.scan_layers`: each stack of repeated layers as one `nn.scan`
(`layers.layer_stack`), computing what the per-layer modules compute; params
convert between the two layouts (`layers.layers_like`), and every reader of a
checkpoint takes either layout. Decoding with scanned caches is in
test_caption.py."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec

import test_sharding
from test_backbone_contract import B, DESIGNS, INPUTS, P, make_inputs, seq2seq_mask
from test_backbone_contract import tiny_config as tiny_model_config
from test_finetune import tiny_config
from vlpjax import checkpointing, convert, train
from vlpjax.models import get_model, layers

pytestmark = pytest.mark.usefixtures('compile_cache')

# The scanned stacks of each design's tiny config. ViLBERT scans its text layers
# up to the first Co-TRM and each run of repeated [text, vision, Co-TRM]
# segments: tiny has none, the variant two (base five).
STACKS = dict(visualbert={'layers'}, uniter={'layers'},
              lxmert={'text_layers', 'vision_layers', 'cross_layers'}, vilbert={'text_layers'},
              vilbert_segments={'text_layers', 'co_layer_1_blocks'})
VARIANTS = dict(vilbert_segments=('vilbert', dict(
    num_layers=5, v_num_layers=3, v_biattention_id=[0, 1, 2], t_biattention_id=[2, 3, 4])))


def variant_config(case):
  design, fields = VARIANTS.get(case, (case, {}))
  config = tiny_model_config(design)
  config.update(fields)
  return design, config


def scanned(config):
  config = config.copy_and_resolve_references()
  config.scan_layers = True
  return config


def init_params(config, name):
  inputs = make_inputs(config, name)
  args = tuple(inputs[k] for k in INPUTS) + (jnp.tile(jnp.arange(1, P + 1)[None], (B, 1)),)
  params = nn.meta.unbox(get_model(config).init(jax.random.key(1), *args))['params']
  return args, jax.device_get(params)


def leaves(tree):
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize('case', [*DESIGNS, *VARIANTS])
def test_scanned_layers_compute_what_per_layer_modules_do(case):
  design, config = variant_config(case)
  args, params = init_params(config, design)
  _, scanned_init = init_params(scanned(config), design)
  assert {k for k, v in scanned_init['backbone'].items() if layers.has_scanned_stack({k: v})} \
      == STACKS[case]
  stacked = layers.layers_like(params, scanned_init)
  assert jax.tree.structure(stacked) == jax.tree.structure(scanned_init)
  for key, value in leaves(stacked).items():
    assert value.shape == leaves(scanned_init)[key].shape, key
  # Back to one entry per layer, exactly.
  back = layers.layers_like(stacked, params)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for key, value in leaves(params).items():
    np.testing.assert_array_equal(leaves(back)[key], value, err_msg=key)
  # The pretraining model's outputs, and the backbone's attention under a mask.
  want = leaves(get_model(config).apply({'params': params}, *args))
  got = leaves(get_model(scanned(config)).apply({'params': stacked}, *args))
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_allclose(got[key], want[key], atol=1e-6, rtol=1e-6, err_msg=key)
  run = lambda c, p: get_model(c, pretraining=False).apply(
      {'params': p['backbone']}, *args[:len(INPUTS)], return_attention=True,
      attention_mask=seq2seq_mask())['attention']
  want, got = run(config, params), run(scanned(config), stacked)
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], atol=1e-6, rtol=1e-6, err_msg=key)


@pytest.mark.slow  # LXMERT 139 s on 2 cores; the forward parity tests run by default
@pytest.mark.parametrize('design', ['lxmert', 'uniter'])
def test_scanned_training_equals_per_layer_training(design, data_dir, tmp_path):
  """Three steps of pretraining (dropout off; UNITER's steps cycle through its
  tasks) from the same per-layer params (`init.source=orbax:`, converted for the
  scanned model) give the same losses and params; then each run fine-tunes on
  VQA from the other's workdir (the reader converts the layout)."""
  config = tiny_config(design, data_dir)
  start = str(tmp_path / 'start')
  convert.save_params(init_params(config.model, design)[1], start)
  runs = {}
  for scan in (False, True):
    config = tiny_config(design, data_dir)
    config.model.update(dropout_rate=0.0, attention_dropout_rate=0.0, scan_layers=scan)
    config.train.num_steps = 3
    config.init.source = f'orbax:{start}'
    workdir = str(tmp_path / f'scan{scan}')
    runs[scan] = (workdir, train.train_and_evaluate(config, workdir))
  for key in ('loss',):
    np.testing.assert_allclose(runs[True][1][key], runs[False][1][key], rtol=2e-5)
  per_layer, _ = checkpointing.restore_workdir_params(runs[False][0])
  stacked, _ = checkpointing.restore_workdir_params(runs[True][0])
  assert layers.has_scanned_stack(stacked) and not layers.has_scanned_stack(per_layer)
  got = leaves(layers.layers_like(stacked, per_layer))
  for key, value in leaves(per_layer).items():
    np.testing.assert_allclose(got[key], value, atol=2e-6, rtol=1e-4, err_msg=key)
  # The per-layer run's checkpoint into a scanned model, and back.
  for scan, source in ((True, runs[False][0]), (False, runs[True][0])):
    config = tiny_config(design, data_dir, 'vqa')
    config.model.scan_layers = scan
    config.train.num_steps = 1
    config.init.source = f'workdir:{source}'
    for evaluator in config.evals.values():
      evaluator.update(at_first_step=False, at_last_step=False)
    workdir = str(tmp_path / f'vqa_scan{scan}')
    train.train_and_evaluate(config, workdir)
  tuned = {scan: checkpointing.restore_workdir_params(str(tmp_path / f'vqa_scan{scan}'),
                                                      subtree='backbone')[0]
           for scan in (False, True)}
  assert layers.has_scanned_stack(tuned[True]) and not layers.has_scanned_stack(tuned[False])


def test_params_checkpoint_reads_into_either_layout(tmp_path):
  """A converted (per-layer) params save read into a scanned model's abstract
  params, and a scanned save into a per-layer model's."""
  config = tiny_model_config('lxmert')
  _, params = init_params(config, 'lxmert')
  _, scanned_init = init_params(scanned(config), 'lxmert')
  stacked = layers.layers_like(params, scanned_init)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = lambda tree: jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), tree)
  for name, tree, other in (('per_layer', params, stacked), ('scanned', stacked, params)):
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(tmp_path / name, tree)
    read = checkpointing.restore_params(tmp_path / name, abstract(other))
    assert jax.tree.structure(read) == jax.tree.structure(other)
    for key, value in leaves(other).items():
      np.testing.assert_array_equal(leaves(read)[key], value, err_msg=f'{name} {key}')
    backbone = checkpointing.restore_params(tmp_path / name, abstract(other['backbone']),
                                            subtree='backbone')
    for key, value in leaves(other['backbone']).items():
      np.testing.assert_array_equal(leaves(backbone)[key], value, err_msg=f'{name} {key}')


@pytest.mark.parametrize('mesh_name', ['fsdp4_data2', 'tensor2_data4'])
def test_scanned_step_is_sharded_and_matches_one_device(mesh_name):
  """The stacked params shard as their layers do, the 'layers' axis whole; one
  LXMERT step on the mesh equals the single-device step."""
  config = test_sharding.tiny_config('lxmert')
  config.model.update(dropout_rate=0.0, attention_dropout_rate=0.0, scan_layers=True)
  batch = test_sharding.synthetic_batch(config)
  initial, want_metrics, want = test_sharding.one_step(config, (1, 1, 1), batch)
  _, metrics, state = test_sharding.one_step(config, test_sharding.MESHES[mesh_name], batch,
                                             initial)
  for name, value in want_metrics.items():
    np.testing.assert_allclose(metrics[name], value, rtol=2e-5, atol=1e-6, err_msg=name)
  test_sharding.assert_trees_close(state.params, want.params, rtol=1e-4, atol=2e-6)
  query = state.params['backbone']['text_layers']['text_layer_0']['attention']['query']['kernel']
  assert query.shape[0] == config.model.num_language_layers
  # [layers, embed, heads, kv]: a layer's placement (test_sharding), the stack axis whole.
  assert query.sharding.spec == PartitionSpec(None, 'fsdp', 'tensor', None)


def test_scanned_layers_under_remat_give_the_same_gradients():
  config = tiny_model_config('uniter')
  args, params = init_params(config, 'uniter')
  _, scanned_init = init_params(scanned(config), 'uniter')
  stacked = layers.layers_like(params, scanned_init)

  def gradients(model_config, p):
    model = get_model(model_config)
    loss = lambda p: sum(jnp.sum(x ** 2) for x in jax.tree.leaves(
        model.apply({'params': p}, *args)) if jnp.issubdtype(x.dtype, jnp.floating))
    return jax.grad(loss)(p)

  want = leaves(gradients(config, params))
  remat = scanned(config)
  remat.remat = True
  got = leaves(layers.layers_like(gradients(remat, stacked), params))
  for key in want:  # recomputed activations round differently: a sum of squares of every output
    np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5, err_msg=key)
