"""One process of the two-process evaluator test in tests/test_evaluators.py.

Usage: python tests/evaluator_worker.py PORT PROCESS_ID PREDICTIONS_PATH GQA_PATH
Prints one line `RESULT {json}` with what this process saw and summed; writes a
prediction file and, with GQA's statistics over the same rows, a GQA
submission file.
"""
import json
import sys

import jax
import numpy as np

NUM_EXAMPLES, GLOBAL_BATCH_SIZE = 37, 16
BIG = 2**40          # int64 sums past int32 (JAX x64 is off)
FRACTION = 2.0**-30  # float64 sums that float32 would round


def make_batch(indices: np.ndarray) -> dict[str, np.ndarray]:
  return {'value': indices.astype(np.int32) * 3 + 1}


def main(port: int, process_id: int, predictions_path: str, gqa_path: str) -> None:
  jax.distributed.initialize(f'localhost:{port}', num_processes=2, process_id=process_id)
  from vlpjax.evaluators import common  # pylint: disable=g-import-not-at-top
  from vlpjax.tasks import gqa  # pylint: disable=g-import-not-at-top

  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  masked_count = jax.jit(lambda mask: mask.astype(np.int32).sum())
  count, big_sum, float_sum, jitted_count = np.int64(0), np.int64(0), np.float64(0), 0
  records, seen, num_batches = [], [], 0
  for batch in common.eval_batches(NUM_EXAMPLES, GLOBAL_BATCH_SIZE, make_batch, sharding):
    num_batches += 1
    assert batch['_mask'].shape == (GLOBAL_BATCH_SIZE,), batch['_mask'].shape
    mask = common.local_rows(batch['_mask'])
    index = common.local_rows(batch['_index']).astype(np.int64)
    value = common.local_rows(batch['value'])
    assert mask.shape == (GLOBAL_BATCH_SIZE // 2,), mask.shape
    assert (value[mask] == index[mask] * 3 + 1).all()
    assert (index[~mask] == -1).all()
    real = index[mask]
    seen.extend(real.tolist())
    count += mask.sum()
    big_sum += (real * BIG + 1).sum()
    float_sum += (real + FRACTION).sum()
    # A jitted statistic over the global batch is replicated: no process_sum.
    jitted_count += int(jax.device_get(masked_count(batch['_mask'])))
    records.extend({'_index': i, 'question_id': i, 'answer': f'answer {i}'}
                   for i in real)
  try:  # a replicated global array already holds every process's part
    common.process_sum(masked_count(batch['_mask']))
    raise AssertionError('process_sum accepted a global array')
  except ValueError as e:
    assert 'global jax.Array' in str(e), e
  totals = common.process_sum({'count': count, 'big_sum': big_sum, 'float_sum': float_sum})
  common.write_prediction_parts(predictions_path, records[::-1])  # merge must sort
  # GQA's exact match of this process's rows: every third prediction wrong.
  predicted = [f'answer {i}' for i in seen]
  gqa_stats = common.process_sum(gqa.exact_match_stats(
      predicted, [f'answer {i}' if i % 3 else 'other' for i in seen]))
  submission = gqa.submission_records([str(i) for i in seen], predicted)
  common.write_prediction_parts(gqa_path, [dict(record, _index=i) for record, i in
                                           zip(submission, seen)][::-1])
  print('RESULT ' + json.dumps(dict(
      process_index=jax.process_index(), num_batches=num_batches, seen=seen,
      jitted_count=jitted_count, count=int(totals['count']), big_sum=int(totals['big_sum']),
      float_sum=float(totals['float_sum']), gqa_correct=int(gqa_stats['correct']),
      gqa_count=int(gqa_stats['count']),
      dtypes=[str(totals[k].dtype) for k in ('count', 'big_sum', 'float_sum')])), flush=True)


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
