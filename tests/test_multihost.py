"""Two local processes (4 CPU devices each, gloo collectives) train through
`jax.distributed`: a run stopped at step 2 and resumed from its checkpoint gives
the losses of an uninterrupted two-process run."""
import json
import os
import socket
import subprocess
import sys

import ml_collections
import pytest

from vlpjax.data import input_pipeline, tables
from vlpjax.tasks import vqa

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 4


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def run_two_processes(workdir: str, data_dir: str, cache_dir: str, *overrides: str,
                      config: str = 'configs/visualbert.py:tiny') -> None:
  """Runs `vlpjax.main` as processes 0 and 1 of one job; raises if either fails."""
  port = free_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='4', PYTHONPATH=REPO,
             JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo', JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'vlpjax.main', f'--config={config}',
       f'--workdir={workdir}', f'--coordinator_address=localhost:{port}',
       '--num_processes=2', f'--process_id={i}',
       f'--config.data.data_dir={data_dir}', '--config.data.size=tiny',
       '--config.model.vocab_size=144', '--config.train.global_batch_size=8',
       f'--config.train.num_steps={NUM_STEPS}', '--config.train.log_every_steps=1',
       '--config.checkpoint.every_steps=2', *overrides],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=900)[0] for p in procs]
  for i, (proc, output) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0, f'process {i}:\n{output[-4000:]}'
  assert 'process 1 of 2, 4 local / 8 global devices' in outputs[1]


def run_one_process(workdir: str, data_dir: str, cache_dir: str, *overrides: str,
                    config: str = 'configs/visualbert.py:tiny') -> None:
  """Runs `vlpjax.main` as one process over the same 8 CPU devices."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='8', PYTHONPATH=REPO,
             JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  result = subprocess.run(
      [sys.executable, '-m', 'vlpjax.main', f'--config={config}', f'--workdir={workdir}',
       f'--config.data.data_dir={data_dir}', '--config.data.size=tiny',
       '--config.model.vocab_size=144', '--config.train.global_batch_size=8',
       f'--config.train.num_steps={NUM_STEPS}', '--config.train.log_every_steps=1',
       '--config.checkpoint.every_steps=2', *overrides],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]


def losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return {r['step']: r['loss'] for r in map(json.loads, f)}


@pytest.mark.slow
def test_two_processes_stop_resume_and_match(tmp_path):
  data_dir, cache_dir = str(tmp_path / 'tfds'), str(tmp_path / 'jax_cache')
  # Build the tiny world once, not by both processes at the same time.
  tables.dataset_info(ml_collections.ConfigDict(dict(input_pipeline.default_data_config(),
                                                       size='tiny', data_dir=data_dir)))
  resumed, reference = str(tmp_path / 'resumed'), str(tmp_path / 'reference')
  run_two_processes(resumed, data_dir, cache_dir, '--config.train.max_steps_this_run=2')
  assert {'process_0-of-2.json', 'process_1-of-2.json'} <= set(
      os.listdir(os.path.join(resumed, 'checkpoints', '2', 'data_iterator')))
  run_two_processes(resumed, data_dir, cache_dir)
  run_two_processes(reference, data_dir, cache_dir)
  got, want = losses(resumed), losses(reference)
  assert sorted(got) == sorted(want) == list(range(1, NUM_STEPS + 1))
  for step in want:
    assert got[step] == pytest.approx(want[step], rel=1e-6), step


@pytest.mark.slow
def test_two_processes_evaluate_every_question_once(tmp_path):
  """VQA fine-tuning over 2 processes: each evaluator scores every question of
  its split once (16, with an eval batch of 24: the last batch is padded), the
  statistics are summed and the prediction parts merged by process 0."""
  data_dir, cache_dir = str(tmp_path / 'tfds'), str(tmp_path / 'jax_cache')
  data_config = ml_collections.ConfigDict(dict(input_pipeline.default_data_config(), size='tiny',
                                               data_dir=data_dir))
  tables.dataset_info(data_config)
  workdir = str(tmp_path / 'vqa')
  run_two_processes(workdir, data_dir, cache_dir, '--config.evals.vqa_val.batch_size=24',
                    '--config.evals.vqa_test.batch_size=24',
                    '--config.evals.vqa_val.log_steps=2',
                    config='configs/visualbert.py:tiny,task=vqa')
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    records = [json.loads(line) for line in f]
  for name, split in (('vqa_val', 'validation'), ('vqa_test', 'test')):
    questions = sorted(vqa.read_ground_truth(vqa.open_questions(
        data_config, split, with_ground_truth=True)))
    counts = [r[f'{name}/count'] for r in records if f'{name}/count' in r]
    assert counts and all(c == len(questions) for c in counts), (name, counts)
    with open(os.path.join(workdir, 'predictions', f'{name}_step{NUM_STEPS}.json'),
              encoding='utf-8') as f:
      assert sorted(p['question_id'] for p in json.load(f)) == questions
  assert not [f for f in os.listdir(os.path.join(workdir, 'predictions')) if '.part-' in f]


@pytest.mark.slow
def test_resume_on_another_number_of_processes_matches(tmp_path):
  """2 processes for 2 steps, resumed on 1 process (and the reverse): the same
  global examples, so the losses of an uninterrupted run."""
  data_dir, cache_dir = str(tmp_path / 'tfds'), str(tmp_path / 'jax_cache')
  tables.dataset_info(ml_collections.ConfigDict(dict(input_pipeline.default_data_config(),
                                                       size='tiny', data_dir=data_dir)))
  reference = str(tmp_path / 'reference')
  run_two_processes(reference, data_dir, cache_dir)
  two_then_one, one_then_two = str(tmp_path / 'two_then_one'), str(tmp_path / 'one_then_two')
  run_two_processes(two_then_one, data_dir, cache_dir, '--config.train.max_steps_this_run=2')
  run_one_process(two_then_one, data_dir, cache_dir)
  run_one_process(one_then_two, data_dir, cache_dir, '--config.train.max_steps_this_run=2')
  run_two_processes(one_then_two, data_dir, cache_dir)
  want = losses(reference)
  for workdir in (two_then_one, one_then_two):
    got = losses(workdir)
    assert sorted(got) == sorted(want) == list(range(1, NUM_STEPS + 1)), workdir
    for step in want:
      assert got[step] == pytest.approx(want[step], rel=1e-5), (workdir, step)
