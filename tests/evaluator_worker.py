"""One process of the two-process evaluator test in tests/test_evaluators.py.

Usage: python tests/evaluator_worker.py PORT PROCESS_ID PREDICTIONS_PATH GQA_PATH
Prints one line `RESULT {json}` with what this process saw and summed; writes a
prediction file and, with GQA's statistics over the same rows, a GQA
submission file; sums SNLI-VE's accuracy statistics over the same rows.

       python tests/evaluator_worker.py retrieval PORT PROCESS_ID PREDICTIONS_BASE
(tests/test_retrieval.py) scores `retrieval_matrix()` in blocks through the
retrieval evaluator's functions and prints `RESULT {json}` with the metrics
and the image rows this process scored; writes the two prediction files.

       python tests/evaluator_worker.py nlvr2 PORT PROCESS_ID PREDICTIONS_PATH
(tests/test_nlvr2.py) scores NLVR2 judgements of the 37 examples through the
NLVR2 evaluator's functions and prints `RESULT {json}` with the rows this
process saw and the summed accuracy and consistency; writes the CSV file.

       python tests/evaluator_worker.py vcr PORT PROCESS_ID PREDICTIONS_PATH
(tests/test_vcr.py) scores VCR candidates of the 37 examples through the VCR
evaluator's functions and prints `RESULT {json}` with the rows this process
saw and the summed accuracies; writes the leaderboard CSV.

       python tests/evaluator_worker.py refexp PORT PROCESS_ID PREDICTIONS_PATH
(tests/test_refexp.py) scores predicted boxes of the 37 expressions through
the refexp evaluator's functions and prints `RESULT {json}` with the rows this
process saw and the summed accuracy; writes the prediction file.

The tests start the two processes with `run_two_processes`.
"""
import json
import os
import socket
import subprocess
import sys
from typing import Any, Sequence

import jax
import numpy as np

NUM_EXAMPLES, GLOBAL_BATCH_SIZE = 37, 16
BIG = 2**40          # int64 sums past int32 (JAX x64 is off)
FRACTION = 2.0**-30  # float64 sums that float32 would round


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def run_two_processes(args: Sequence[str], mode: str | None = None) -> list[dict[str, Any]]:
  """Runs this script as the two processes of one `jax.distributed` job (4 CPU
  devices each, gloo collectives), `evaluator_worker.py [MODE] PORT PROCESS_ID
  ARGS...`, and returns each process's `RESULT` object, in process order, after
  checking that both exited 0 and printed one."""
  port = free_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='4', PYTHONPATH=REPO,
             JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo')
  procs = [subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), *([mode] if mode else []), str(port), str(i),
       *map(str, args)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=600)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  results = []
  for i, (proc, output) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0, f'process {i}:\n{output[-4000:]}'
    lines = [l for l in output.splitlines() if l.startswith('RESULT ')]
    assert lines, f'process {i} printed no result:\n{output[-4000:]}'
    results.append(json.loads(lines[-1][len('RESULT '):]))
  return results


def make_batch(indices: np.ndarray) -> dict[str, np.ndarray]:
  return {'value': indices.astype(np.int32) * 3 + 1}


def main(port: int, process_id: int, predictions_path: str, gqa_path: str) -> None:
  jax.distributed.initialize(f'localhost:{port}', num_processes=2, process_id=process_id)
  from vlpjax.evaluators import common  # pylint: disable=g-import-not-at-top
  from vlpjax.tasks import gqa  # pylint: disable=g-import-not-at-top
  from vlpjax.tasks import snli_ve  # pylint: disable=g-import-not-at-top

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
  # SNLI-VE's accuracy of this process's rows: every fourth label wrong.
  labels = snli_ve.LABELS
  snli_ve_stats = common.process_sum(snli_ve.accuracy_stats(
      [labels[i % 3] for i in seen],
      [labels[(i + 1) % 3] if i % 4 == 0 else labels[i % 3] for i in seen]))
  print('RESULT ' + json.dumps(dict(
      process_index=jax.process_index(), num_batches=num_batches, seen=seen,
      jitted_count=jitted_count, count=int(totals['count']), big_sum=int(totals['big_sum']),
      float_sum=float(totals['float_sum']), gqa_correct=int(gqa_stats['correct']),
      gqa_count=int(gqa_stats['count']), snli_ve_correct=int(snli_ve_stats['correct']),
      snli_ve_count=int(snli_ve_stats['count']),
      dtypes=[str(totals[k].dtype) for k in ('count', 'big_sum', 'float_sum')])), flush=True)


# Retrieval: 13 images (blocks of 8: the last padded) x their 1-3 captions each
# (blocks of 5), scored by a dot product of small integer vectors (ties).
RETRIEVAL_IMAGES, RETRIEVAL_BLOCKS = 13, (8, 5)


def retrieval_matrix() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(image vectors [13, 3], caption vectors [C, 3], caption_image [C])."""
  rng = np.random.default_rng(0)
  caption_image = np.repeat(np.arange(RETRIEVAL_IMAGES), np.arange(RETRIEVAL_IMAGES) % 3 + 1)
  return (rng.integers(0, 3, (RETRIEVAL_IMAGES, 3)).astype(np.float32),
          rng.integers(0, 3, (len(caption_image), 3)).astype(np.float32), caption_image)


def retrieval_main(port: int, process_id: int, predictions_base: str) -> None:
  jax.distributed.initialize(f'localhost:{port}', num_processes=2, process_id=process_id)
  from vlpjax.tasks import retrieval  # pylint: disable=g-import-not-at-top

  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  images, captions, caption_image = retrieval_matrix()
  image_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  caption_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  score = jax.jit(lambda params, i, c: i['v'] @ c['v'].T,
                  out_shardings=jax.sharding.NamedSharding(
                      mesh, jax.sharding.PartitionSpec('data', None)))
  positions, scores = retrieval.score_rows(
      score, None, RETRIEVAL_IMAGES, lambda rows: {'v': images[rows]}, len(caption_image),
      lambda rows: {'v': captions[rows]}, *RETRIEVAL_BLOCKS, image_sharding, caption_sharding)
  metrics, top_images, top_captions, _ = retrieval.process_metrics(positions, scores,
                                                                   caption_image)
  retrieval.write_predictions(predictions_base, [f'c{i}' for i in range(len(caption_image))],
                              [f'i{i}' for i in range(RETRIEVAL_IMAGES)], positions,
                              top_images, top_captions)
  print('RESULT ' + json.dumps(dict(process_index=jax.process_index(), metrics=metrics,
                                    positions=positions.tolist())), flush=True)


# NLVR2: example i asks sentence i // 3 (identifier `dev-<i // 3>-<i % 3>-0`,
# so sentences straddle the two processes' rows); the multiples of 5 are wrong.
NLVR2_SENTENCES = -(-NUM_EXAMPLES // 3)


def nlvr2_main(port: int, process_id: int, predictions_path: str) -> None:
  jax.distributed.initialize(f'localhost:{port}', num_processes=2, process_id=process_id)
  from vlpjax.evaluators import common  # pylint: disable=g-import-not-at-top
  from vlpjax.tasks import nlvr2  # pylint: disable=g-import-not-at-top

  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  identifiers = np.array([f'dev-{i // 3}-{i % 3}-0' for i in range(NUM_EXAMPLES)], object)
  groups = nlvr2.sentence_groups(identifiers)
  stats, records, seen = nlvr2.zero_stats(NLVR2_SENTENCES), [], []
  for batch in common.eval_batches(NUM_EXAMPLES, GLOBAL_BATCH_SIZE, make_batch, sharding):
    mask = common.local_rows(batch['_mask'])
    real = common.local_rows(batch['_index']).astype(np.int64)[mask]
    seen.extend(real.tolist())
    predicted = ['False' if i % 5 == 0 else 'True' for i in real]
    stats = nlvr2.merge_stats(stats, nlvr2.pair_stats(predicted, ['True'] * len(real),
                                                      groups[real], NLVR2_SENTENCES))
    records += [dict(record, _index=int(i)) for record, i in
                zip(nlvr2.prediction_records(identifiers[real], predicted), real)]
  summary = nlvr2.summary(common.process_sum(stats))
  common.write_prediction_parts(predictions_path, records[::-1], render=nlvr2.csv_text)
  print('RESULT ' + json.dumps(dict(process_index=jax.process_index(), seen=seen,
                                    summary=summary)), flush=True)


def vcr_scores(i: int) -> tuple[np.ndarray, int, int]:
  """Example i's scores [20] (answers, then rationales given each answer) and its
  (answer, rationale) labels: the best answer is i % 4, right unless i % 5 == 0;
  the best rationale given any answer is i % 3, right unless i % 7 == 0; the
  last example has no labels (as VCR's test)."""
  scores = np.zeros((5, 4), np.float32)
  scores[0, i % 4] = 2.0
  scores[1:, i % 3] = 1.0
  if i == NUM_EXAMPLES - 1:
    return scores.reshape(-1), -1, -1
  return (scores.reshape(-1), (i + 1) % 4 if i % 5 == 0 else i % 4,
          (i % 3 + 1) % 4 if i % 7 == 0 else i % 3)


def vcr_main(port: int, process_id: int, predictions_path: str) -> None:
  jax.distributed.initialize(f'localhost:{port}', num_processes=2, process_id=process_id)
  from vlpjax.evaluators import common  # pylint: disable=g-import-not-at-top
  from vlpjax.tasks import vcr  # pylint: disable=g-import-not-at-top

  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  stats, records, seen = vcr.zero_stats(), [], []
  for batch in common.eval_batches(NUM_EXAMPLES, GLOBAL_BATCH_SIZE, make_batch, sharding):
    mask = common.local_rows(batch['_mask'])
    real = common.local_rows(batch['_index']).astype(np.int64)[mask]
    seen.extend(real.tolist())
    scored = [vcr_scores(i) for i in real]  # none in a batch of padding alone
    scores = np.array([s for s, _, _ in scored], np.float32).reshape(-1, 20)
    answer_label = np.array([a for _, a, _ in scored], np.int64)
    rationale_label = np.array([r for _, _, r in scored], np.int64)
    stats = vcr.merge_stats(stats, vcr.choice_stats(
        scores[:, :4], scores[:, 4:], answer_label, rationale_label))
    records += [dict(record, _index=int(i)) for record, i in zip(vcr.prediction_records(
        [f'val-{i}' for i in real], vcr.probabilities(scores)), real)]
  summary = vcr.summary(common.process_sum(stats))
  common.write_prediction_parts(predictions_path, records[::-1], render=vcr.csv_text)
  print('RESULT ' + json.dumps(dict(process_index=jax.process_index(), seen=seen,
                                    summary=summary)), flush=True)


def refexp_boxes(i: int) -> tuple[list[float], list[float]]:
  """Expression i's (predicted, target) boxes: wrong (IoU 0) when i % 4 == 0."""
  return ([5.0, 5.0, 6.0, 6.0] if i % 4 == 0 else [0.0, 0.0, 2.0, 2.0]), [0.0, 0.0, 2.0, 2.0]


def refexp_main(port: int, process_id: int, predictions_path: str) -> None:
  jax.distributed.initialize(f'localhost:{port}', num_processes=2, process_id=process_id)
  from vlpjax.evaluators import common  # pylint: disable=g-import-not-at-top
  from vlpjax.tasks import gqa, refexp  # pylint: disable=g-import-not-at-top

  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  stats, records, seen = {'correct': np.int64(0), 'count': np.int64(0)}, [], []
  for batch in common.eval_batches(NUM_EXAMPLES, GLOBAL_BATCH_SIZE, make_batch, sharding):
    mask = common.local_rows(batch['_mask'])
    real = common.local_rows(batch['_index']).astype(np.int64)[mask]
    seen.extend(real.tolist())
    boxes = [refexp_boxes(i) for i in real]  # none in a batch of padding alone
    predicted = np.array([p for p, _ in boxes], np.float32).reshape(-1, 4)
    target = np.array([t for _, t in boxes], np.float32).reshape(-1, 4)
    batch_stats = refexp.accuracy_stats(predicted, target)
    stats = {k: stats[k] + batch_stats[k] for k in stats}
    records += [dict(record, _index=int(i)) for record, i in zip(refexp.prediction_records(
        {'ref_id': 100 + real}, real % 3, predicted), real)]
  summary = gqa.summary(common.process_sum(stats))
  common.write_prediction_parts(predictions_path, records[::-1])
  print('RESULT ' + json.dumps(dict(process_index=jax.process_index(), seen=seen,
                                    summary=summary)), flush=True)


if __name__ == '__main__':
  if sys.argv[1] == 'retrieval':
    retrieval_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
  elif sys.argv[1] == 'nlvr2':
    nlvr2_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
  elif sys.argv[1] == 'vcr':
    vcr_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
  elif sys.argv[1] == 'refexp':
    refexp_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
  else:
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
