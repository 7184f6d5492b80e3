"""vlpjax.evaluators.common: every example once (padded, masked), exact sums over
processes, prediction files merged in order; one process on 8 CPU devices and two
processes (4 CPU devices each, gloo) through `jax.distributed`, GQA's exact-match
statistics and submission file included."""
import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import evaluator_worker
from vlpjax.evaluators import common

NUM_EXAMPLES, GLOBAL_BATCH_SIZE = 37, 16


def data_sharding() -> NamedSharding:
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  return NamedSharding(mesh, PartitionSpec('data'))


def make_batch(indices: np.ndarray) -> dict[str, np.ndarray]:
  assert ((0 <= indices) & (indices < NUM_EXAMPLES)).all(), indices
  return {'value': indices.astype(np.int32) * 3 + 1,
          'pair': np.stack([indices, -indices], axis=1).astype(np.float32)}


def test_num_batches():
  assert common.num_batches(37, 16) == 3
  assert common.num_batches(32, 16) == 2
  assert common.num_batches(1, 16) == 1
  assert common.num_batches(0, 16) == 0
  with pytest.raises(ValueError, match='global_batch_size'):
    common.num_batches(37, 0)
  with pytest.raises(ValueError, match='num_examples'):
    common.num_batches(-1, 16)


def test_eval_batches_on_mesh_see_every_example_once():
  sharding = data_sharding()
  batches = list(common.eval_batches(NUM_EXAMPLES, GLOBAL_BATCH_SIZE, make_batch, sharding))
  assert len(batches) == 3
  indices = []
  for batch in batches:
    assert set(batch) == {'value', 'pair', '_mask', '_index'}
    for key, value in batch.items():
      assert isinstance(value, jax.Array) and value.sharding == sharding, key
      assert value.shape[0] == GLOBAL_BATCH_SIZE
      assert {s.data.shape[0] for s in value.addressable_shards} == {2}
    mask, index = np.asarray(batch['_mask']), np.asarray(batch['_index'])
    assert mask.dtype == np.bool_ and index.dtype == np.int32
    value = np.asarray(batch['value'])
    np.testing.assert_array_equal(value[mask], index[mask] * 3 + 1)
    # Padding rows are masked, carry index -1 and reuse example 0.
    assert (index[~mask] == -1).all()
    assert (value[~mask] == 1).all()
    indices.extend(index[mask].tolist())
  assert indices == list(range(NUM_EXAMPLES))
  assert np.asarray(batches[-1]['_mask']).sum() == NUM_EXAMPLES - 2 * GLOBAL_BATCH_SIZE


def test_masked_statistics_are_exact():
  # value = 3 * index + 1, so (value - 1) // 3 recovers the index on device.
  stats = jax.jit(lambda b: (b['_mask'].sum(), ((b['value'] - 1) // 3 * b['_mask']).sum()))
  count = total = 0
  host = {'count': np.int64(0), 'sum': np.int64(0)}
  for batch in common.eval_batches(NUM_EXAMPLES, GLOBAL_BATCH_SIZE, make_batch,
                                   data_sharding()):
    c, s = jax.device_get(stats(batch))
    count, total = count + int(c), total + int(s)
    # The host-side route: this process's rows, summed over processes.
    mask, index = common.local_rows(batch['_mask']), common.local_rows(batch['_index'])
    host['count'] += mask.sum()
    host['sum'] += index[mask].astype(np.int64).sum()
  assert (count, total) == (NUM_EXAMPLES, sum(range(NUM_EXAMPLES)))
  host = common.process_sum(host)
  assert (int(host['count']), int(host['sum'])) == (NUM_EXAMPLES, sum(range(NUM_EXAMPLES)))


def test_eval_batches_without_sharding_are_numpy(monkeypatch, caplog):
  requested = []

  def recording_make_batch(indices):
    requested.append(indices.copy())
    return make_batch(indices)

  monkeypatch.setattr(common, 'PROGRESS_SECONDS', 0.0)  # a progress line every batch
  with caplog.at_level('INFO'):
    batches = list(common.eval_batches(NUM_EXAMPLES, GLOBAL_BATCH_SIZE, recording_make_batch,
                                       None))
  assert len(batches) == 3
  assert 'evaluating: 2 of 3 batches' in caplog.text and 'ETA' in caplog.text
  assert all(isinstance(v, np.ndarray) and v.shape[0] == GLOBAL_BATCH_SIZE
             for b in batches for v in b.values())
  index = np.concatenate([b['_index'] for b in batches])
  mask = np.concatenate([b['_mask'] for b in batches])
  assert index[mask].tolist() == list(range(NUM_EXAMPLES))
  assert (index[~mask] == -1).all() and (~mask).sum() == 3 * GLOBAL_BATCH_SIZE - NUM_EXAMPLES
  assert max(r.max() for r in requested) == NUM_EXAMPLES - 1


def test_eval_batches_exact_multiple_and_empty():
  batches = list(common.eval_batches(32, 16, lambda i: {'x': i}, data_sharding()))
  assert len(batches) == 2 and all(np.asarray(b['_mask']).all() for b in batches)
  assert list(common.eval_batches(0, 16, lambda i: {'x': i}, data_sharding())) == []


def test_eval_batches_errors():
  with pytest.raises(ValueError, match='does not split'):
    next(common.eval_batches(37, 12, lambda i: {'x': i}, data_sharding()))
  with pytest.raises(ValueError, match="'x' of shape"):
    next(common.eval_batches(37, 16, lambda i: {'x': i[:3]}, None))
  with pytest.raises(ValueError, match='_mask'):
    next(common.eval_batches(37, 16, lambda i: {'_mask': i}, None))


def test_local_rows_of_a_sharded_array_and_of_numpy():
  x = jax.device_put(np.arange(32).reshape(16, 2), data_sharding())
  np.testing.assert_array_equal(common.local_rows(x), np.arange(32).reshape(16, 2))
  np.testing.assert_array_equal(common.local_rows(np.arange(3)), np.arange(3))


def test_batch_replicated_over_a_second_mesh_axis():
  # ('data', 'tensor') = (4, 2): each block of rows lives on two devices.
  mesh = jax.make_mesh((4, 2), ('data', 'tensor'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  sharding = NamedSharding(mesh, PartitionSpec('data'))
  np.testing.assert_array_equal(common.local_row_indices(16, sharding), np.arange(16))
  batches = list(common.eval_batches(NUM_EXAMPLES, GLOBAL_BATCH_SIZE, make_batch, sharding))
  index = np.concatenate([common.local_rows(b['_index']) for b in batches])
  assert index[index >= 0].tolist() == list(range(NUM_EXAMPLES))


def test_process_sum_on_one_process_keeps_int64_and_float64():
  tree = {'big': np.int64(2**40 + 1), 'fine': np.float64(1 + 2**-40),
          'flags': np.array([True, False, True]), 'per_type': np.array([3, 2**35], np.int64),
          'python': 5, 'jax': jax.numpy.float32(2.5)}
  got = common.process_sum(tree)
  assert got['big'] == 2**40 + 1 and got['big'].dtype == np.int64
  assert got['fine'] == 1 + 2**-40 and got['fine'].dtype == np.float64
  np.testing.assert_array_equal(got['flags'], [1, 0, 1])
  assert got['flags'].dtype == np.int64
  np.testing.assert_array_equal(got['per_type'], [3, 2**35])
  assert got['python'] == 5 and isinstance(got['jax'], np.ndarray) and got['jax'] == 2.5
  assert common.process_sum({}) == {}


def test_prediction_file_merged_in_order(tmp_path):
  path = tmp_path / 'preds' / 'vqa_val.json'
  rng = np.random.default_rng(0)
  records = [{'_index': np.int32(i), 'question_id': np.int64(1000 + i), 'answer': 'yes'}
             for i in rng.permutation(NUM_EXAMPLES)]
  common.write_prediction_parts(str(path), records)
  merged = json.loads(path.read_text())
  assert merged == [{'question_id': 1000 + i, 'answer': 'yes'} for i in range(NUM_EXAMPLES)]
  assert sorted(os.listdir(path.parent)) == ['vqa_val.json']


def test_prediction_file_sort_key_and_private_keys(tmp_path):
  path = tmp_path / 'p.json'
  common.write_prediction_parts(path, [{'id': 2, '_x': 0}, {'id': 1, '_x': 1}],
                                sort_key=lambda r: r['id'], drop_private_keys=False)
  assert json.loads(path.read_text()) == [{'id': 1, '_x': 1}, {'id': 2, '_x': 0}]
  with pytest.raises(KeyError, match="sort key '_index'"):
    common.write_prediction_parts(path, [{'id': 1}])


def test_missing_part_is_named(tmp_path):
  path = tmp_path / 'p.json'
  common.part_path(path, 0, 2).write_text('{"_index": 0}\n')
  with pytest.raises(FileNotFoundError, match=r'p\.json\.part-1-of-2'):
    common.merge_prediction_parts(path, 2)


def test_should_run():
  runs = [s for s in range(1, 26) if common.should_run(s, 1, 25, log_steps=10)]
  assert runs == [1, 10, 20, 25]
  assert common.should_run(7, 7, 25, 10)  # a resumed run reports at its first step
  quiet = dict(at_first_step=False, at_last_step=False)
  assert [s for s in range(1, 26) if common.should_run(s, 1, 25, 10, **quiet)] == [10, 20]
  assert common.schedule(ml_collections.ConfigDict(dict(log_steps=3, at_last_step=False))) == (
      dict(log_steps=3, at_first_step=True, at_last_step=False))
  with pytest.raises(ValueError, match='log_steps'):
    common.should_run(1, 1, 2, 0)


def eval_entry(**overrides):
  return dict(dict(type='vqa', split='val', batch_size=16, log_steps=100), **overrides)


def test_evaluator_configs():
  evals = ml_collections.ConfigDict({'vqa_val': eval_entry(pred='vqa'),
                                     'gqa_testdev': eval_entry(type='gqa')})
  got = common.evaluator_configs(evals)
  assert [name for name, _ in got] == ['gqa_testdev', 'vqa_val']
  assert got[1][1].pred == 'vqa' and isinstance(got[1][1], ml_collections.ConfigDict)
  assert common.evaluator_configs({'x': eval_entry()})[0][1].type == 'vqa'
  assert common.evaluator_configs(None) == []


@pytest.mark.parametrize('entry, message', [
    (eval_entry(batch_size=0), 'config.evals.vqa_val.batch_size must be a positive int, got 0'),
    (eval_entry(log_steps=True), 'config.evals.vqa_val.log_steps must be a positive int'),
    (eval_entry(log_steps=2.5), 'config.evals.vqa_val.log_steps must be a positive int'),
    (eval_entry(type=''), 'config.evals.vqa_val.type must be a non-empty string'),
    ({k: v for k, v in eval_entry().items() if k != 'split'},
     'config.evals.vqa_val.split is missing'),
    (3, 'config.evals.vqa_val must be a dict'),
])
def test_evaluator_configs_name_the_bad_field(entry, message):
  with pytest.raises(ValueError, match=message):
    common.evaluator_configs({'vqa_val': entry})


def test_build_evaluators_by_type():
  """One evaluator per entry, in `evaluator_configs` order, from its type's factory;
  an unknown type names the entry, the task and the valid types."""
  config = ml_collections.ConfigDict({'evals': {'b_val': eval_entry(type='y', split='val'),
                                                'a_test': eval_entry(type='x', split='test')}})
  factory = lambda kind: lambda *args: (kind, *args)
  built = common.build_evaluators(config, 'demo', {'x': factory('x'), 'y': factory('y')},
                                  'model', 'mesh', '/workdir')
  assert [(kind, name, entry.split, model, mesh, workdir)
          for kind, name, entry, _, model, mesh, workdir in built] == [
              ('x', 'a_test', 'test', 'model', 'mesh', '/workdir'),
              ('y', 'b_val', 'val', 'model', 'mesh', '/workdir')]
  assert built[0][3] is config
  with pytest.raises(ValueError, match=r"config\.evals\.b_val\.type='y': the demo task has "
                     r"evaluators of type 'x' or 'z'"):
    common.build_evaluators(config, 'demo', {'x': factory('x'), 'z': factory('z')},
                            None, None, '')


def test_evaluator_protocol():
  class Constant:
    name, log_steps = 'const', 10

    def run(self, params, step):
      yield 'accuracy', float(params) * step

  assert isinstance(Constant(), common.Evaluator)
  assert list(Constant().run(0.5, 2)) == [('accuracy', 1.0)]


def test_two_processes(tmp_path):
  path, gqa_path = tmp_path / 'preds.json', tmp_path / 'gqa.json'
  results = evaluator_worker.run_two_processes([path, gqa_path])
  big, fraction = 2**40, 2.0**-30
  for i, result in enumerate(results):
    assert result['process_index'] == i
    assert result['num_batches'] == 3
    assert result['jitted_count'] == NUM_EXAMPLES
    assert result['count'] == NUM_EXAMPLES
    assert result['big_sum'] == big * sum(range(NUM_EXAMPLES)) + NUM_EXAMPLES
    assert result['float_sum'] == sum(range(NUM_EXAMPLES)) + NUM_EXAMPLES * fraction
    assert result['dtypes'] == ['int64', 'int64', 'float64']
    # GQA: the 13 multiples of 3 in [0, 37) are wrong.
    assert (result['gqa_correct'], result['gqa_count']) == (NUM_EXAMPLES - 13, NUM_EXAMPLES)
    # SNLI-VE: the 10 multiples of 4 in [0, 37) are wrong.
    assert (result['snli_ve_correct'], result['snli_ve_count']) == (NUM_EXAMPLES - 10,
                                                                    NUM_EXAMPLES)
  # Process p builds rows [8p, 8p + 8) of each global batch of 16.
  assert results[0]['seen'] == [*range(0, 8), *range(16, 24), *range(32, 37)]
  assert results[1]['seen'] == [*range(8, 16), *range(24, 32)]
  merged = json.loads(path.read_text())
  assert merged == [{'question_id': i, 'answer': f'answer {i}'} for i in range(NUM_EXAMPLES)]
  assert json.loads(gqa_path.read_text()) == [
      {'questionId': str(i), 'prediction': f'answer {i}'} for i in range(NUM_EXAMPLES)]
  assert sorted(os.listdir(tmp_path)) == ['gqa.json', 'preds.json']
