"""Fine-tuning and evaluation end to end on the tiny world (8 CPU devices): a
pretraining run, VQA fine-tuning from its backbone with evaluators on splits the
eval batch does not divide, `vlpjax.evaluate` on the checkpoint, and the
per-design config defaults."""
import importlib
import json
import logging
import os
import subprocess
import sys

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from benchmarks import vqa_prior
import vlpjax
from vlpjax import checkpointing, config_lib, evaluate, train
from vlpjax.data import input_pipeline, tables
from vlpjax.tasks import vqa, vqa_accuracy

pytestmark = pytest.mark.usefixtures('compile_cache')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_BATCH = 24  # a multiple of the 8 devices that does not divide the splits (16)


def tiny_config(design: str, data_dir: str, task: str = 'pretrain') -> ml_collections.ConfigDict:
  arg = 'tiny' if task == 'pretrain' else f'tiny,task={task}'
  config = importlib.import_module(f'configs.{design}').get_config(arg)
  config.data.update(size='tiny', data_dir=data_dir)
  config_lib.fit_model_to_tables(config)  # the label spaces of the tiny world
  config.train.update(global_batch_size=8, num_steps=4, log_every_steps=1)
  config.checkpoint.every_steps = 2
  return config


def vqa_config(design: str, data_dir: str) -> ml_collections.ConfigDict:
  config = tiny_config(design, data_dir, 'vqa')
  for evaluator in config.evals.values():
    evaluator.batch_size = EVAL_BATCH
  config.evals.vqa_val.log_steps = 2
  return config


def split_questions(data_dir: str, split: str) -> list[int]:
  config = ml_collections.ConfigDict(dict(input_pipeline.default_data_config(), size='tiny',
                                          data_dir=data_dir))
  return sorted(vqa.read_ground_truth(vqa.open_questions(config, split,
                                                         with_ground_truth=True)))


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def pretrained(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('uniter_pretrain'))
  train.train_and_evaluate(tiny_config('uniter', data_dir), workdir)
  return workdir


@pytest.fixture(scope='module')
def finetuned(data_dir, pretrained, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('uniter_vqa'))
  config = vqa_config('uniter', data_dir)
  config.init.source = f'workdir:{pretrained}'
  config.evals.vqa_test.at_first_step = False
  return workdir, config, train.train_and_evaluate(config, workdir)


def test_vqa_starts_from_the_pretrained_backbone(data_dir, pretrained, caplog):
  config = vqa_config('uniter', data_dir)
  model = vqa.make_model(config)
  batch = vqa.make_train_iterator(config, None)
  first = next(batch)
  abstract = jax.eval_shape(lambda: nn.meta.unbox(model.init(
      jax.random.key(0), **vqa.make_inputs(config, first, None, 'vqa')[0])['params']))
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
      abstract)
  with caplog.at_level(logging.WARNING):
    loaded, step = checkpointing.restore_workdir_params(pretrained, abstract['backbone'],
                                                        subtree='backbone')
    keys = checkpointing.workdir_param_keys(pretrained)
  assert step == 4 and 'backbone' in keys
  assert not caplog.records  # orbax's misplaced "Metadata file does not exist" included
  # The newest checkpoint (step 4) read whole, without a target.
  with ocp.StandardCheckpointer() as reader:
    stored = reader.restore(os.path.join(pretrained, 'checkpoints', '4', 'state'))
  assert jax.tree.structure(loaded) == jax.tree.structure(stored['params']['backbone'])
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(stored['params']['backbone'])):
    np.testing.assert_array_equal(got, want)
  with pytest.raises(FileNotFoundError, match='no train checkpoint'):
    checkpointing.restore_workdir_params(os.path.dirname(pretrained) + '/none',
                                         abstract['backbone'], subtree='backbone')
  with pytest.raises(ValueError, match='does not fit the model'):
    checkpointing.restore_workdir_params(pretrained, abstract['backbone'])
  # A converted pretraining checkpoint (a params save, as vlpjax.convert writes):
  # its backbone alone is read for the task's model.
  converted = os.path.join(os.path.dirname(pretrained), 'converted_uniter')
  with ocp.StandardCheckpointer() as writer:
    writer.save(converted, stored['params'])
  assert checkpointing.stored_top_level_keys(converted) > {'backbone'}
  backbone = checkpointing.restore_params(converted, abstract['backbone'], subtree='backbone')
  for got, want in zip(jax.tree.leaves(backbone), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match=r'\(backbone\) does not fit the model'):
    checkpointing.restore_params(converted, abstract['answer_head'], subtree='backbone')


def test_finetune_scores_every_question_once(data_dir, finetuned):
  workdir, config, final = finetuned
  assert np.isfinite(final['loss']) and 'bce' in final and 'train_score' in final
  records = read_metrics(workdir)
  val = [r for r in records if 'vqa_val/count' in r]
  # Every 2 steps, and at the first (1) and last (4) step.
  assert [r['step'] for r in val] == [1, 2, 4]
  # vqa_test (log_steps 4) with at_first_step=False: at the last step only.
  assert [r['step'] for r in records if 'vqa_test/count' in r] == [4]
  for split, name in (('validation', 'vqa_val'), ('test', 'vqa_test')):
    questions = split_questions(data_dir, split)
    assert len(questions) % EVAL_BATCH  # the last batch is padded
    counts = [r[f'{name}/count'] for r in records if f'{name}/count' in r]
    assert counts and all(c == len(questions) for c in counts)
    with open(os.path.join(workdir, 'predictions', f'{name}_step4.json'),
              encoding='utf-8') as f:
      predictions = json.load(f)
    assert sorted(p['question_id'] for p in predictions) == questions
    assert all(set(p) == {'question_id', 'answer'} for p in predictions)
    answers = set(tables.answer_vocab(config.data))
    assert all(p['answer'] in answers for p in predictions)
  assert not [f for f in os.listdir(os.path.join(workdir, 'predictions')) if '.part-' in f]


def test_evaluate_reproduces_the_runs_last_evaluation(data_dir, finetuned):
  workdir, config, _ = finetuned
  last = {k: v for r in read_metrics(workdir) if r['step'] == 4 for k, v in r.items()}
  results = evaluate.evaluate(vqa_config('uniter', data_dir), workdir)
  for name, metrics in results.items():
    for metric, value in metrics.items():
      if np.isfinite(value):
        assert value == pytest.approx(last[f'{name}/{metric}'], abs=1e-9), (name, metric)
  with open(os.path.join(workdir, 'eval_step4.json'), encoding='utf-8') as f:
    assert json.load(f).keys() == results.keys()
  with pytest.raises(FileNotFoundError, match='no train checkpoint of step 3'):
    evaluate.evaluate(vqa_config('uniter', data_dir), workdir, checkpoint_step=3)
  # The command line, as the README shows it, on the same run.
  os.remove(os.path.join(workdir, 'eval_step4.json'))
  overrides = [f'--config.data.data_dir={data_dir}', '--config.data.size=tiny',
               *(f'--config.model.{k}={v}' for k, v in config.model.items()
                 if k in ('vocab_size', 'num_region_classes')),
               '--config.evals.vqa_val.batch_size=24', '--config.evals.vqa_test.batch_size=24']
  done = subprocess.run(
      [sys.executable, '-m', 'vlpjax.evaluate', '--config=configs/uniter.py:tiny,task=vqa',
       f'--workdir={workdir}', '--checkpoint_step=4', *overrides],
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO),
      capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  with open(os.path.join(workdir, 'eval_step4.json'), encoding='utf-8') as f:
    assert json.load(f)['vqa_val']['count'] == results['vqa_val']['count']


@pytest.mark.slow
@pytest.mark.parametrize('design', ['visualbert', 'vilbert', 'lxmert'])
def test_other_designs_finetune_on_vqa(design, data_dir, tmp_path):
  config = vqa_config(design, data_dir)
  config.train.num_steps = 2
  config.evals = ml_collections.ConfigDict({'vqa_val': config.evals.vqa_val})
  final = train.train_and_evaluate(config, str(tmp_path))
  kind = vqa.resolve_loss(vqa.resolve_head(design))
  assert np.isfinite(final[kind])
  counts = [r['vqa_val/count'] for r in read_metrics(str(tmp_path)) if 'vqa_val/count' in r]
  assert counts == [len(split_questions(data_dir, 'validation'))] * 2


def test_validation_losses_count_every_sentence_once(data_dir, tmp_path):
  def run(batch_size, workdir):
    config = tiny_config('uniter', data_dir)
    config.train.num_steps = 1
    config.evals = ml_collections.ConfigDict(dict(val=dict(
        type='loss', split='validation', batch_size=batch_size, log_steps=1)))
    train.train_and_evaluate(config, workdir)
    (record,) = [r for r in read_metrics(workdir) if 'val/count' in r]
    return record

  sentences = len(tfds.data_source('vlp_world/tiny_captions', data_dir=data_dir)['validation'])
  padded_more, padded_less = run(24, str(tmp_path / 'a')), run(16, str(tmp_path / 'b'))
  assert padded_more['val/count'] == padded_less['val/count'] == sentences < 16
  assert set(padded_more) >= {'val/itm', 'val/mlm', 'val/mrfr', 'val/mrckl', 'val/wra'}
  # ITM masks nothing: the padding rows change nothing.
  assert padded_more['val/itm'] == pytest.approx(padded_less['val/itm'], rel=1e-6)
  assert padded_more['val/wra'] == pytest.approx(padded_less['val/wra'], rel=1e-5)


def test_config_arguments_and_per_design_text_length():
  uniter = importlib.import_module('configs.uniter')
  visualbert = importlib.import_module('configs.visualbert')
  assert uniter.get_config('base').data.max_text_len == 60
  assert visualbert.get_config('base').data.max_text_len == 128
  assert importlib.import_module('configs.lxmert').get_config('base').data.max_text_len == 20
  assert importlib.import_module('configs.vilbert').get_config('base').data.max_text_len == 36
  # The embedded world's sentences are short: two of them for VisualBERT.
  assert visualbert.get_config('small').data.max_text_len == 40
  assert uniter.get_config('small').data.max_text_len == 20
  config = uniter.get_config('base,task=vqa')
  assert config.task == 'vqa' and config.train.num_steps == vqa.RECIPES['uniter']['num_steps']
  assert config.train.learning_rate == 8e-5 and set(config.evals) == {'vqa_val', 'vqa_test'}
  assert config.train.head_lr_multiplier == 10.0
  # A task sets its own text length: a question, not a caption (pair).
  for design, length in vqa.TEXT_LENGTHS.items():
    module = importlib.import_module(f'configs.{design}')
    assert module.get_config('base,task=vqa').data.max_text_len == length
    assert module.get_config('small,task=vqa').data.max_text_len == vqa.WORLD_TEXT_LENGTH
  small = uniter.get_config('small')
  assert small.task == 'pretrain' and small.evals.val.type == 'loss'
  assert not uniter.get_config('base').evals
  with pytest.raises(ValueError, match="expected SIZE\\[,task=TASK\\], got 'tsk=vqa'"):
    uniter.get_config('base,tsk=vqa')
  with pytest.raises(ValueError, match="config.task must be one of .* got 'nope'"):
    uniter.get_config('base,task=nope')
  assert config_lib.config_arg('small,task=vqa') == ('small', {'task': 'vqa'})


def test_load_answers_like_the_evaluator(data_dir, finetuned):
  workdir, config, _ = finetuned
  model = vlpjax.load(workdir)
  assert model.step == 4 and model.answers == tables.answer_vocab(config.data)
  images = tfds.data_source('vlp_world/tiny_images', data_dir=data_dir)['train']
  questions = tfds.data_source('vlp_world/tiny_vqa', data_dir=data_dir)['validation']
  image_index = questions[0]['image_index']
  rows = [q for q in (questions[i] for i in range(len(questions)))
          if q['image_index'] == image_index]
  image = images[image_index]
  answers = model.answer([q['question'].decode() for q in rows], image['features'],
                         image['boxes'], (image['image_w'], image['image_h']))
  with open(os.path.join(workdir, 'predictions', 'vqa_val_step4.json'), encoding='utf-8') as f:
    evaluated = {p['question_id']: p['answer'] for p in json.load(f)}
  assert answers == [evaluated[int(q['question_id'])] for q in rows]
  with pytest.raises(ValueError, match=r'features must be \[N, 40\]'):
    model.answer(['?'], np.zeros((2, 3)), np.zeros((2, 4)), (1, 1))


@pytest.mark.slow  # 111 s on 2 cores: four LXMERT programs
def test_lxmert_vqa_head_starts_from_its_pretraining_qa_head(data_dir, tmp_path):
  pretrain = tiny_config('lxmert', data_dir)
  assert pretrain.data.qa  # LXMERT's image-QA objective
  pretrain.train.num_steps = 1
  pretrain.evals = ml_collections.ConfigDict()
  train.train_and_evaluate(pretrain, str(tmp_path / 'pre'))
  answers = tables.answer_vocab(pretrain.data)
  with open(tmp_path / 'pre' / 'answers.txt', encoding='utf-8') as f:
    assert f.read().splitlines() == answers
  config = vqa_config('lxmert', data_dir)
  config.evals = ml_collections.ConfigDict()
  config.train.update(num_steps=1, learning_rate=0.0)  # the initial params are saved
  config.init.source = f'workdir:{tmp_path / "pre"}'
  train.train_and_evaluate(config, str(tmp_path / 'vqa'))
  head, _ = checkpointing.restore_workdir_params(tmp_path / 'pre', subtree='answer_head')
  tuned, _ = checkpointing.restore_workdir_params(tmp_path / 'vqa', subtree='answer_head')
  # Same answer vocabulary: the whole head is the pretrained one.
  for got, want in zip(jax.tree.leaves(tuned), jax.tree.leaves(head)):
    np.testing.assert_array_equal(got, want)
  config.vqa.head_from_pretraining = False
  train.train_and_evaluate(config, str(tmp_path / 'fresh'))
  fresh, _ = checkpointing.restore_workdir_params(tmp_path / 'fresh', subtree='answer_head')
  assert not np.array_equal(fresh['output']['kernel'], head['output']['kernel'])


def test_vqa_prior_report_agrees_with_the_evaluator(data_dir, finetuned, tmp_path):
  """`benchmarks.vqa_prior` on the fine-tuned run: its accuracy is the test
  evaluator's of the same checkpoint, every answered question is counted once,
  and the prior is the official accuracy of the training split's constant."""
  workdir, config, _ = finetuned
  last = {k: v for r in read_metrics(workdir) if r['step'] == 4 for k, v in r.items()}
  out = tmp_path / 'prior.json'
  run, = vqa_prior.main([f'--workdirs={workdir}', '--batch_size=24', f'--out={out}'])['runs']
  figures = run['figures']
  assert figures['all']['accuracy'] == pytest.approx(last['vqa_test/accuracy'], abs=1e-9)
  assert figures['all']['count'] == last['vqa_test/count'] == len(split_questions(data_dir,
                                                                                  'test'))
  answer_types = [k.split('/', 1)[1] for k in figures if k.startswith('answer_type/')]
  assert 'yes/no' in answer_types and set(answer_types) <= set(run['constant_answers'])
  for answer_type in answer_types:
    mine, key = figures[f'answer_type/{answer_type}'], answer_type.replace('/', '_')
    assert mine['count'] == last[f'vqa_test/count_{key}']
    assert mine['accuracy'] == pytest.approx(last[f'vqa_test/accuracy_{key}'], abs=1e-9)
    assert 0 <= mine['prior'] <= 1 and 0 <= mine['gives_prior'] <= 1
  truth = vqa.read_ground_truth(vqa.open_questions(config.data, 'test',
                                                   with_ground_truth=True))
  yes_no = [gt.answers for gt in truth.values() if gt.answer_type == 'yes/no']
  assert figures['answer_type/yes/no']['prior'] == pytest.approx(np.mean(
      [vqa_accuracy.question_accuracy(run['constant_answers']['yes/no'], a) for a in yes_no]))
  assert 0 <= figures['answer_type/yes/no']['yes_no_auc'] <= 1
  assert figures['question_type/exist']['yes_no_auc'] is None  # all 'no' on the tiny split
  assert sum(f['count'] for k, f in figures.items() if k.startswith('question_type/')) == (
      figures['all']['count'])
  assert json.loads(out.read_text())[0]['figures'] == figures
