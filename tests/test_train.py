"""End-to-end pretraining on the embedded tiny world (VisualBERT tiny, 8 CPU devices):
outputs, exact resume, gradient accumulation, NaN stop, damaged checkpoints,
config errors, init-from.

Compiled programs go to a persistent cache shared by the module's runs, so the
resumed runs reuse the uninterrupted run's executables.
"""
import json
import os
import shutil

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from configs import visualbert
from vlpjax import checkpointing, config_lib, flops, metrics as metrics_lib, optim, sharding
from vlpjax import state as state_lib, step as step_lib, train
from vlpjax.data import input_pipeline, tables, tokenizer
from vlpjax.models import get_design, get_model, layers
from vlpjax.tasks import pretrain as pretrain_task

# Runs stop after NUM_STEPS of a 1000-step schedule: test_main and the SIGTERM test
# in test_checkpointing use the same schedule, so all share one compiled step.
NUM_STEPS = 4
SCHEDULE_STEPS = 1000


pytestmark = pytest.mark.usefixtures('compile_cache')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def run_config(data_dir: str, **train_overrides) -> ml_collections.ConfigDict:
  """VisualBERT tiny on the tiny world, 8 devices data-parallel, batch 8."""
  config = config_lib.make_config(visualbert.model_config('tiny'), 'tiny')
  config.data.size = 'tiny'
  config.data.data_dir = data_dir
  config.model.vocab_size = tables.dataset_info(config.data)['vocab_size']
  config.train.update(global_batch_size=8, num_steps=SCHEDULE_STEPS,
                      max_steps_this_run=NUM_STEPS, log_every_steps=1)
  config.train.update(train_overrides)
  config.checkpoint.every_steps = 2
  return config


def read_metrics(workdir) -> list[dict]:
  with open(os.path.join(workdir, metrics_lib.METRICS_FILE), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def reference_run(data_dir, tmp_path_factory):
  """An uninterrupted run of NUM_STEPS steps: (workdir, returned metrics)."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  return workdir, train.train_and_evaluate(run_config(data_dir), workdir)


def test_run_writes_metrics_tensorboard_and_checkpoints(reference_run):
  workdir, final = reference_run
  records = read_metrics(workdir)
  assert [r['step'] for r in records] == list(range(1, NUM_STEPS + 1))
  for record in records:
    assert {'loss', 'mlm', 'sentence_image', 'grad_norm', 'learning_rate'} <= record.keys()
    np.testing.assert_allclose(record['loss'], record['mlm'] + record['sentence_image'],
                               rtol=1e-5)
  assert all(k in records[-1] for k in ('examples_per_second', 'eta_seconds'))
  assert final['loss'] == records[-1]['loss']
  # Linear warmup over 10% of the schedule: the rate of update s is 5e-5 * s / 100.
  np.testing.assert_allclose([r['learning_rate'] for r in records],
                             [5e-5 * s / 100 for s in range(NUM_STEPS)], rtol=1e-5)
  assert os.listdir(os.path.join(workdir, metrics_lib.TENSORBOARD_DIR))
  assert json.load(open(os.path.join(workdir, 'config.json')))['model']['name'] == 'visualbert'
  assert sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints'))
                if d.isdigit()) == [2, 4]


def test_stopped_and_resumed_run_has_the_same_losses(reference_run, data_dir, tmp_path):
  reference = read_metrics(reference_run[0])
  workdir = str(tmp_path)
  train.train_and_evaluate(run_config(data_dir, max_steps_this_run=3), workdir)
  first = read_metrics(workdir)
  assert [r['step'] for r in first] == [1, 2, 3]
  assert sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints'))
                if d.isdigit()) == [2, 3]
  train.train_and_evaluate(run_config(data_dir, max_steps_this_run=1), workdir)  # from 3
  resumed = read_metrics(workdir)
  assert [r['step'] for r in resumed] == [1, 2, 3, 4]
  for got, want in zip(resumed, reference):
    for key in ('loss', 'mlm', 'sentence_image', 'grad_norm'):
      np.testing.assert_allclose(got[key], want[key], rtol=1e-6, err_msg=f"step {want['step']}")


def test_nonfinite_loss_keeps_only_checkpoints_whose_next_step_was_finite(data_dir, tmp_path):
  """A learning rate of 1e30 from update 2 on (a one-step warmup from 0): step 2's
  loss is still finite, but the parameters it saves give NaN at step 3. That
  checkpoint is removed; with the cause gone (a sane rate), the rerun resumes from
  step 1 and trains on."""
  config = run_config(data_dir, learning_rate=1e30, warmup_fraction=1 / SCHEDULE_STEPS)
  config.checkpoint.every_steps = 1
  config.model.dropout_rate = config.model.attention_dropout_rate = 0.0
  with pytest.raises(train.NonFiniteLossError,
                     match=r'step 3: non-finite .*loss=(nan|inf).*; removed the checkpoint of '
                           r'step 2, whose parameters gave them; a rerun resumes from step 1$'):
    train.train_and_evaluate(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1']
  restored = ocp.StandardCheckpointer().restore(tmp_path / 'checkpoints' / '1' / 'state')
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(restored))
  # The gradient buffers a CPU run keeps are not checkpointed.
  assert state_lib.keeps_grad_buffers(config.train)
  assert restored.get('grads') is None

  final = train.train_and_evaluate(run_config(data_dir, max_steps_this_run=2), str(tmp_path))
  records = read_metrics(tmp_path)
  assert [r['step'] for r in records] == [1, 2, 3]
  assert all(np.isfinite(r['loss']) and np.isfinite(r['grad_norm']) for r in records)
  assert final['loss'] == records[-1]['loss']


def test_run_killed_while_saving_resumes_and_logs_each_step_once(reference_run, data_dir,
                                                                 tmp_path, caplog):
  """Killed while saving step 3 (orbax's unfinished directory of it left behind),
  a run has logged step 3 already; the rerun removes the leftover, resumes from
  step 2, and its steps replace the logged ones."""
  workdir = str(tmp_path)
  train.train_and_evaluate(run_config(data_dir, max_steps_this_run=3), workdir)
  checkpoints = tmp_path / 'checkpoints'
  os.rename(checkpoints / '3', checkpoints / f'3{ocp.path.atomicity_types.TMP_DIR_SUFFIX}')
  assert [r['step'] for r in read_metrics(workdir)] == [1, 2, 3]

  with caplog.at_level('WARNING'):
    train.train_and_evaluate(run_config(data_dir, max_steps_this_run=2), workdir)  # from 2
  records, reference = read_metrics(workdir), read_metrics(reference_run[0])
  assert [r['step'] for r in records] == [1, 2, 3, 4]
  for got, want in zip(records, reference):
    np.testing.assert_allclose(got['loss'], want['loss'], rtol=1e-6, err_msg=f"step {want['step']}")
  assert f'removing {checkpoints}/3.orbax-checkpoint-tmp' in caplog.text
  assert sorted(os.listdir(checkpoints)) == ['2', '4']


def largest_data_file(checkpoint) -> str:
  data = checkpoint / 'state' / 'ocdbt.process_0' / 'd'
  return max((data / name for name in os.listdir(data)), key=os.path.getsize)


def flip_bytes(path) -> None:
  """Inverts 64 bytes in the middle of the file at `path` (bit rot)."""
  with open(path, 'r+b') as f:
    middle = os.path.getsize(path) // 2
    f.seek(middle)
    flipped = bytes(b ^ 0xff for b in f.read(64))
    f.seek(middle)
    f.write(flipped)


CORRUPTIONS = {
    'truncated data file': (lambda c: os.truncate(largest_data_file(c), 100), 'state'),
    'altered data file': (lambda c: flip_bytes(largest_data_file(c)), 'state'),
    'empty _METADATA': (lambda c: open(c / 'state' / '_METADATA', 'w').close(), 'state'),
    'truncated iterator JSON': (
        lambda c: os.truncate(c / 'data_iterator' / 'process_0-of-1.json', 50),
        'data_iterator/process_0-of-1.json'),
    'missing item directory': (lambda c: shutil.rmtree(c / 'data_iterator'), 'data_iterator'),
}


@pytest.mark.parametrize('corruption', CORRUPTIONS)
def test_unreadable_newest_checkpoint_is_moved_aside_and_the_one_before_resumed(
    reference_run, data_dir, tmp_path, caplog, corruption):
  corrupt, bad_path = CORRUPTIONS[corruption]
  workdir = tmp_path / 'run'
  shutil.copytree(reference_run[0], workdir)   # checkpoints of steps 2 and 4
  checkpoints = workdir / 'checkpoints'
  corrupt(checkpoints / '4')
  with caplog.at_level('WARNING'):
    train.train_and_evaluate(run_config(data_dir, max_steps_this_run=1), str(workdir))
  assert f'checkpoint: {checkpoints}/4/{bad_path}: ' in caplog.text
  assert f'moved {checkpoints}/4, which does not read back, to {checkpoints}/4.corrupt' in (
      caplog.text)
  assert sorted(os.listdir(checkpoints)) == ['2', '3', '4.corrupt']
  records, reference = read_metrics(workdir), read_metrics(reference_run[0])
  assert [r['step'] for r in records] == [1, 2, 3]
  assert records[2]['loss'] == pytest.approx(reference[2]['loss'], rel=1e-6)


def test_unreadable_newest_checkpoint_stops_the_run_with_on_corrupt_fail(reference_run,
                                                                         data_dir, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(reference_run[0], workdir)
  bad = workdir / 'checkpoints' / '4' / 'data_iterator' / 'process_0-of-1.json'
  os.truncate(bad, 50)
  config = run_config(data_dir, max_steps_this_run=1)
  config.checkpoint.on_corrupt = 'fail'
  with pytest.raises(checkpointing.CheckpointCorruptError) as error:
    train.train_and_evaluate(config, str(workdir))
  assert str(error.value).startswith(f'{bad}: JSONDecodeError: Expecting value')
  assert '\n' not in str(error.value)
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']


def one_step_on_one_device(config, batch):
  mesh = sharding.make_mesh(config, jax.devices()[:1])
  rules = sharding.logical_axis_rules(config)
  model = get_model(config.model)
  tx, schedule = optim.make_optimizer(config.train, get_design(config.model.name))
  batch_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  input_specs = step_lib.model_input_specs(config, pretrain_task, 'all', batch_spec)
  _, shardings = state_lib.abstract_train_state(model, tx, input_specs, mesh, rules)
  state = state_lib.init_train_state(model, tx, input_specs, config.seed, shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = step_lib.make_train_step(config, model, tx, schedule, mesh, shardings, pretrain_task, 'all')
    state, metrics = step(state, batch)
  return jax.device_get(metrics), jax.device_get(state.params)


def test_gradient_accumulation_gives_the_full_batch_update(data_dir):
  """Masking is drawn once per global batch and the losses see all outputs, so
  4 microbatches give the full batch's loss and update (dropout off)."""
  config = run_config(data_dir, warmup_fraction=0.0)
  config.mesh.shape = (1, 1, 1)
  config.model.dropout_rate = config.model.attention_dropout_rate = 0.0
  config = pretrain_task.with_vocab_token_ids(
      config, tokenizer.read_vocab(tables.vocab_file(config.data)))
  batch = next(input_pipeline.make_pretraining_iterator(config.data, 'visualbert',
                                                        global_batch_size=8, seed=0))
  full_metrics, full_params = one_step_on_one_device(config, batch)
  config.train.grad_accum_steps = 4
  micro_metrics, micro_params = one_step_on_one_device(config, batch)
  for key in ('loss', 'mlm', 'sentence_image', 'grad_norm'):
    np.testing.assert_allclose(micro_metrics[key], full_metrics[key], rtol=1e-5, err_msg=key)
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(full_params),
                               jax.tree_util.tree_leaves(micro_params)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-6,
                               err_msg=jax.tree_util.keystr(path))


@pytest.fixture
def compile_events():
  """Names of the jax compile events recorded while the test runs."""
  events = []
  def listener(event, duration, **kwargs):
    del duration, kwargs
    if 'compile' in event:
      events.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  yield events
  jax.monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize('field, value, message', [
    ('mesh.shape', (3, -1, 1), r'config.mesh.shape=\(3, -1, 1\) does not divide the 8'),
    ('train.global_batch_size', 12, 'global_batch_size=12 must be a multiple of 8'),
    ('train.grad_accum_steps', 2, 'global_batch_size=8 must be a multiple of 16'),
    ('model.name', 'clip', "config.model.name must be one of .* got 'clip'"),
    ('pretrain.tasks', ('mlm', 'itm'), r"config.pretrain.tasks \('mlm', 'itm'\) for visualbert"),
    ('model.feature_dim', 48,
     "config.model.feature_dim=48 but the dataset 'vlp_world' has region feature "
     'width 40'),
    ('model.vocab_size', 100, 'config.model.vocab_size=100 is smaller than the tokenizer'),
    ('init.source', 'hf:/tmp/x', "config.init.source must be '', 'workdir:DIR', 'orbax:DIR' or 'bert:DIR'"),
])
def test_bad_configs_fail_before_compiling(data_dir, tmp_path, compile_events, field, value,
                                           message):
  config = run_config(data_dir)
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path))
  assert not compile_events
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_qa_task_needs_qa_data(data_dir, tmp_path):
  from configs import lxmert  # pylint: disable=g-import-not-at-top
  config = config_lib.make_config(lxmert.model_config('tiny'), 'tiny')
  assert config.data.qa   # make_config turns QA data on for LXMERT's 'qa' task
  config.data.update(size='tiny', data_dir=data_dir, qa=False)
  info = tables.dataset_info(config.data)
  config.model.update(vocab_size=info['vocab_size'], num_object_labels=8, num_attr_labels=10,
                      num_answers=34)
  with pytest.raises(ValueError, match="'qa' but config.data.qa is False"):
    pretrain_task.check_against_data(config, info)
  config.data.qa = True
  pretrain_task.check_against_data(config, info)
  config.model.num_object_labels = 9
  with pytest.raises(ValueError, match=r'num_object_labels=9 .* has object classes \(less background\): 8'):
    pretrain_task.check_against_data(config, info)


def test_schedule_and_weight_decay_mask():
  config = ml_collections.ConfigDict(dict(learning_rate=1e-4, warmup_fraction=0.1,
                                          num_steps=100, end_learning_rate=0.0))
  schedule = optim.learning_rate_schedule(config)
  np.testing.assert_allclose([schedule(s) for s in (0, 5, 10, 55, 100)],
                             [0.0, 5e-5, 1e-4, 5e-5, 0.0], atol=1e-12)
  params = {'layer': {'dense': {'kernel': 0, 'bias': 0}, 'norm': {'scale': 0, 'bias': 0}},
            'word_embeddings': {'embedding': 0}, 'mrfr_bias': 0,
            'region_embeddings': {'feature_norm': {'scale': 0}, 'norm': {'scale': 0}}}
  # LXMERT: BERT's rule by the last name.
  assert optim.decay_mask(get_design('lxmert'))(params) == {
      'layer': {'dense': {'kernel': True, 'bias': False},
                'norm': {'scale': False, 'bias': False}},
      'word_embeddings': {'embedding': True}, 'mrfr_bias': True,
      'region_embeddings': {'feature_norm': {'scale': False}, 'norm': {'scale': False}}}
  # UNITER: no decay on any name containing 'bias' or 'LayerNorm.weight'; its
  # feature_norm (img_layer_norm there) is not called LayerNorm, so it decays.
  assert optim.decay_mask(get_design('uniter'))(params) == {
      'layer': {'dense': {'kernel': True, 'bias': False},
                'norm': {'scale': False, 'bias': False}},
      'word_embeddings': {'embedding': True}, 'mrfr_bias': False,
      'region_embeddings': {'feature_norm': {'scale': True}, 'norm': {'scale': False}}}
  assert optim.decay_mask(get_design('vilbert'))(params)['mrfr_bias'] is False


@pytest.mark.parametrize('scale', [0.1, 10.0])
def test_clip_by_global_norm_matches_optax(scale):
  grads = {'a': jax.random.normal(jax.random.key(0), (5, 7)) * scale,
           'b': {'c': jax.random.normal(jax.random.key(1), (11,)) * scale}}
  ours, _ = optim.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
  want, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
  assert jax.tree.structure(ours) == jax.tree.structure(want)
  for got, expected in zip(jax.tree.leaves(ours), jax.tree.leaves(want)):
    np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert float(optax.global_norm(ours)) == pytest.approx(min(1.0, float(optax.global_norm(grads))),
                                                        rel=1e-6)


def test_head_lr_multiplier_scales_only_the_heads_updates():
  train_config = config_lib.train_config('uniter')
  train_config.update(num_steps=10, warmup_fraction=0.0)
  params = {'backbone': {'dense': {'kernel': np.ones((3, 2), np.float32)}},
            'answer_head': {'kernel': np.ones((2, 4), np.float32),
                            'bias': np.zeros((4,), np.float32)}}
  grads = jax.tree.map(lambda p: np.full_like(p, 0.5), params)
  updates = {}
  for multiplier in (1.0, 10.0):
    train_config.head_lr_multiplier = multiplier
    tx, _ = optim.make_optimizer(train_config, get_design('uniter'))
    updates[multiplier], _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(updates[10.0]['backbone']['dense']['kernel'],
                                updates[1.0]['backbone']['dense']['kernel'])
  for got, base in zip(jax.tree.leaves(updates[10.0]['answer_head']),
                       jax.tree.leaves(updates[1.0]['answer_head'])):
    np.testing.assert_allclose(got, 10 * base, rtol=1e-6)  # decay included
    assert np.abs(base).min() > 0


def test_design_optimizer_defaults():
  uniter = config_lib.train_config('uniter')
  assert (uniter.learning_rate, uniter.adam_b2, uniter.weight_decay, uniter.grad_clip_norm,
          uniter.warmup_fraction * uniter.num_steps) == (5e-5, 0.98, 0.01, 5.0, 10_000)
  assert config_lib.train_config('lxmert').warmup_fraction == 0.05
  assert config_lib.train_config('vilbert').warmup_fraction == 0.1
  assert config_lib.train_config('visualbert').learning_rate == 5e-5


@pytest.fixture(scope='module', params=[False, True], ids=['per_layer', 'scan_layers'])
def fresh_state(data_dir, request):
  """A VisualBERT tiny state over data 2 x fsdp 2 x tensor 2 and what built it,
  its layers one module each or scanned (`model.scan_layers`)."""
  config = run_config(data_dir)
  config.mesh.shape = (2, 2, 2)
  config.model.scan_layers = request.param
  mesh = sharding.make_mesh(config)
  rules = sharding.logical_axis_rules(config)
  model = get_model(config.model)
  tx, _ = optim.make_optimizer(config.train, get_design(config.model.name))
  iterator = input_pipeline.make_pretraining_iterator(config.data, 'visualbert',
                                                      global_batch_size=8, seed=0)
  input_specs = step_lib.model_input_specs(config, pretrain_task, 'all', train.peek_batch_spec(iterator))
  abstract, shardings = state_lib.abstract_train_state(model, tx, input_specs, mesh, rules)
  state = state_lib.init_train_state(model, tx, input_specs, config.seed, shardings)
  return config, state, abstract


def test_init_from_orbax_backbone(fresh_state, tmp_path):
  config, state, abstract = fresh_state
  backbone = jax.tree.map(lambda x: x + 1.0, state.params['backbone'])
  with ocp.StandardCheckpointer() as saver:
    saver.save(tmp_path / 'backbone', backbone)
  new = state_lib.init_from(f'orbax:{tmp_path}/backbone', config.model, state, abstract)
  for got, want in zip(jax.tree_util.tree_leaves(new.params['backbone']),
                       jax.tree_util.tree_leaves(backbone)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.sharding == want.sharding
  heads = [k for k in state.params if k != 'backbone']
  assert heads
  for key in heads:
    for got, want in zip(jax.tree_util.tree_leaves(new.params[key]),
                         jax.tree_util.tree_leaves(state.params[key])):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_init_from_bert(fresh_state, tmp_path):
  transformers = pytest.importorskip('transformers')
  config, state, abstract = fresh_state
  model = config.model
  bert = transformers.BertModel(transformers.BertConfig(
      vocab_size=model.vocab_size, hidden_size=model.hidden_size,
      num_hidden_layers=model.num_layers, num_attention_heads=model.num_heads,
      intermediate_size=model.intermediate_size,
      max_position_embeddings=model.max_position_embeddings,
      type_vocab_size=model.type_vocab_size))
  bert.save_pretrained(tmp_path / 'bert')
  new = state_lib.init_from(f'bert:{tmp_path}/bert', config.model, state, abstract)
  table = new.params['backbone']['embeddings']['word_embeddings']['embedding']
  np.testing.assert_allclose(np.asarray(table)[:config.model.vocab_size],
                             bert.embeddings.word_embeddings.weight.detach().numpy(), rtol=1e-6)
  assert table.sharding == state.params['backbone']['embeddings']['word_embeddings'][
      'embedding'].sharding
  # The layers too, a scanned stack filled through the per-layer layout.
  query = layers.unstacked_layers(jax.device_get(new.params['backbone']))['layer_0'][
      'attention']['query']['kernel']
  np.testing.assert_allclose(
      query.reshape(model.hidden_size, -1),
      bert.encoder.layer[0].attention.self.query.weight.detach().numpy().T, rtol=1e-6)


def test_every_objective_is_compiled_before_step_1(data_dir, tmp_path, monkeypatch):
  """UNITER samples one of four objectives per step: all four programs are built
  before the first step, not when a step first samples one (here 1 step)."""
  from configs import uniter  # pylint: disable=import-outside-toplevel
  config = config_lib.make_config(uniter.model_config('tiny'), 'tiny')
  config.data.update(size='tiny', data_dir=data_dir)
  info = tables.dataset_info(config.data)
  config.model.update(vocab_size=info['vocab_size'], num_region_classes=info['num_object_classes'])
  config.train.update(global_batch_size=8, num_steps=SCHEDULE_STEPS, max_steps_this_run=1)
  built = []
  make = step_lib.make_train_step
  monkeypatch.setattr(step_lib, 'make_train_step',
                      lambda *args: built.append(args[-1]) or make(*args))
  train.train_and_evaluate(config, str(tmp_path))
  assert built == list(config.pretrain.tasks) == ['itm', 'mlm', 'mrfr', 'mrckl']


def test_mfu_counts_each_steps_own_flops(data_dir, tmp_path, monkeypatch):
  """MFU over a logging interval uses the FLOPs of the steps it covers (UNITER's
  objectives differ in their heads), over the compute dtype's peak."""
  monkeypatch.setitem(flops.PEAK_FLOPS, 'cpu', dict(float32=1e12))
  step_flops = lambda step: 1e9 * step
  writer = metrics_lib.MetricWriter(str(tmp_path), start_step=0, total_steps=10,
                                    examples_per_step=8, step_flops=step_flops,
                                    compute_dtype='float32')
  try:
    writer.write(1, {'loss': 1.0})
    record = writer.write(4, {'loss': 1.0})
  finally:
    writer.close()
  seconds_per_step = 8 / record['examples_per_second']
  assert record['mfu'] * 1e12 * jax.device_count() * seconds_per_step == pytest.approx(
      (2e9 + 3e9 + 4e9) / 3)
  # The loop hands the writer each objective's FLOPs.
  workdir = str(tmp_path / 'run')
  config = run_config(data_dir)
  train.train_and_evaluate(config, workdir)
  records = read_metrics(workdir)
  assert all(r['mfu'] > 0 for r in records[1:])


def test_nan_metrics_stay_out_of_tensorboard(tmp_path, caplog):
  """An accuracy over no examples is NaN: metrics.jsonl keeps it, TensorBoard
  gets only the finite values (and tensorboardX no warning)."""
  writer = metrics_lib.MetricWriter(str(tmp_path), start_step=0, total_steps=2,
                                    examples_per_step=8)
  try:
    writer.write_eval(2, 'ev', {'accuracy': 0.5, 'accuracy_number': float('nan')}, 1.0)
  finally:
    writer.close()
  (record,) = read_metrics(str(tmp_path))
  assert record['ev/accuracy'] == 0.5 and np.isnan(record['ev/accuracy_number'])
  events = b''.join(p.read_bytes() for p in (tmp_path / metrics_lib.TENSORBOARD_DIR).iterdir())
  assert b'ev/accuracy' in events and b'ev/accuracy_number' not in events
  assert not any('NaN or Inf' in r.getMessage() for r in caplog.records)
