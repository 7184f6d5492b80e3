"""The GQA task (`vlpjax.tasks.gqa`): the gqa table builder on GQA's and LXMERT's
files, the embedded world's gqa table, exact-match accuracy and the submission
format, and a short fine-tune on the tiny world (8 CPU devices) whose evaluators
score every question once on splits the eval batch does not divide."""
import importlib
import json
import math

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

import real_format_fixtures as fx
import task_testing as tt
from test_finetune import tiny_config
import vlpjax
from vlpjax.data import annotations_builder as ab
from vlpjax.data import formats, tables, vlp_world
from vlpjax.data import world as world_lib
from vlpjax.tasks import TASKS, get_task, gqa, vqa

pytestmark = pytest.mark.usefixtures('compile_cache')
EVAL_BATCH = 24  # a multiple of the 8 devices that does not divide the splits (16)

# ----------------------------------------------------------------------------
# The builder, on tiny files in the real formats.

# Image ids as LXMERT's GQA TSVs store them: Visual Genome's, and GQA's own 'n' ids.
VG_IDS, TESTDEV_IDS = ['2354786', '2375429', 'n161313'], ['2417916']
# (question id, image id, question, answer); GQA's ids are text, some with a leading 0.
QUESTIONS = {
    'train': [('02930152', '2354786', 'Is the sky dark?', 'yes'),
              ('02930160', '2354786', 'What is on the table?', 'cup'),
              ('07333408', 'n161313', 'Which color is the car?', 'red'),
              ('07333409', '2375429', 'Is it a man?', 'yes')],
    'validation': [('201640614', '2375429', 'Who is wearing the hat?', 'man'),
                   ('201640615', 'n161313', 'Is the car red?', 'yes')],
    'testdev': [('20968379', '2417916', 'What color is the cup?', 'red')],
    'test': [('201971873', '2354786', 'What is on the table?', None)],
}
BALANCED_FILES = ab.Gqa.DEFAULT_FILES
LXMERT_FILES = dict(ab.Gqa.LXMERT_FILES)


def build_gqa(root, config, *args):
  """`python -m vlpjax.data.annotations_builder gqa` against lxmert_tsv/gqa."""
  tt.build_table('gqa', 'lxmert_tsv/gqa', root, config, *args)


@pytest.fixture(scope='module')
def gqa_root(tmp_path_factory):
  """LXMERT's two GQA TSVs as one images table, and the questions in both formats."""
  root = tmp_path_factory.mktemp('gqa')
  tt.build_lxmert_images(root, 'gqa', {'vg_gqa_obj36.tsv': VG_IDS,
                                       'gqa_testdev_obj36.tsv': TESTDEV_IDS})
  for split, questions in QUESTIONS.items():
    fx.write_gqa_questions(str(root / BALANCED_FILES[split]), questions)
    fx.write_lxmert_gqa(str(root / LXMERT_FILES[split]), questions)
  return root


def test_builder_reads_gqa_and_lxmert_files_alike(gqa_root):
  build_gqa(gqa_root, 'tiny_balanced')  # the command line's defaults: exact ids, every split
  build_gqa(gqa_root, 'tiny_lxmert',
            *(f'--file={role}={name}' for role, name in LXMERT_FILES.items()))
  image_rows = {image_id: row for row, image_id in enumerate(VG_IDS + TESTDEV_IDS)}
  # Train's answers, most frequent first, ties alphabetical.
  vocab = ['yes', 'cup', 'red']
  for name in ('gqa/tiny_balanced', 'gqa/tiny_lxmert'):
    assert ab.answer_vocab(name, str(gqa_root / 'data')) == vocab
    for split, questions in QUESTIONS.items():
      rows = tt.read_split(gqa_root, name, split)
      assert [(r['question_id'].decode(), r['image_id'].decode(), r['question'].decode(),
               r['answer'].decode()) for r in rows] == [
                   (q, i, t, a or '') for q, i, t, a in questions], (name, split)
      assert [r['image_index'] for r in rows] == [image_rows[i] for _, i, _, _ in questions]
      for row, (_, _, _, answer) in zip(rows, questions):
        labels = [vocab.index(answer)] if answer in vocab else []
        np.testing.assert_array_equal(row['answer_labels'], labels)
        np.testing.assert_array_equal(row['answer_scores'], [1.0] * len(labels))
  # 'man' is no training answer: stored for the evaluator, without a target.
  assert not len(tt.read_split(gqa_root, 'gqa/tiny_lxmert', 'validation')[0]['answer_labels'])


def test_builder_errors_name_the_file_and_question(gqa_root, tmp_path):
  fx.write_gqa_questions(str(tmp_path / 'train.json'), QUESTIONS['train'])
  missing_image = ('201640616', 'n999', 'Is it there?', 'no')
  fx.write_gqa_questions(str(tmp_path / 'val.json'), QUESTIONS['validation'] + [missing_image])
  args = ['--images_data_dir', str(gqa_root / 'data'), '--file=train=train.json',
          '--file=validation=val.json', '--splits', 'train', 'validation']
  with pytest.raises(formats.FormatError,
                     match=r"val\.json: question 201640616: missing image: 'n999'"):
    build_gqa(tmp_path, 'errors', *args)
  fx.write_gqa_questions(str(tmp_path / 'val.json'), QUESTIONS['validation'] + [
      missing_image, ('201640617', '2375429', 'Is it?', None)])
  with pytest.raises(formats.FormatError,
                     match=r'val\.json: question 201640617: missing answer'):
    build_gqa(tmp_path, 'errors', *args)
  build_gqa(tmp_path, 'errors', *args, '--on_error', 'skip')
  rows = tt.read_split(tmp_path, 'gqa/errors', 'validation')
  assert [r['question_id'] for r in rows] == [b'201640614', b'201640615']
  assert tt.build_report(tmp_path, 'gqa/errors')['by_reason'] == {'missing image': 1,
                                                                  'missing answer': 1}
  # LXMERT's label holds GQA's one answer.
  fx.write_lxmert_gqa(str(tmp_path / 'train.json'), QUESTIONS['train'])
  entries = json.loads((tmp_path / 'train.json').read_text())
  entries[2]['label'] = {'red': 1.0, 'blue': 0.5}
  (tmp_path / 'train.json').write_text(json.dumps(entries))
  with pytest.raises(formats.FormatError, match=r'train\.json: question 07333408: label must '
                     r'be \{answer: 1\.0\}'):
    build_gqa(tmp_path, 'bad_label', *args)


# ----------------------------------------------------------------------------
# The embedded world's gqa table, and examples from it.


def test_world_gqa_table_asks_the_vqa_questions_with_their_true_answer(data_config):
  world_config = vlp_world.WORLD_SIZES['tiny']
  scenes = world_lib.make_world(world_config).scenes
  assert tables.answer_vocab(data_config, 'gqa') == list(world_lib.ANSWERS)
  for split in world_lib.SPLITS:
    rows = [r for r in tfds.data_source('vlp_world/tiny_gqa', split=split,
                                        data_dir=data_config.data_dir)]
    vqa_rows = [r for r in tfds.data_source('vlp_world/tiny_vqa', split=split,
                                            data_dir=data_config.data_dir)]
    assert [(r['question_id'].decode(), r['question'], r['image_index']) for r in rows] == [
        (str(r['question_id']), r['question'], r['image_index']) for r in vqa_rows]
    for row in rows:
      # The generator's answer, not the annotators' majority.
      k = int(row['question_id']) % world_config.questions_per_image
      answer = world_lib.questions(scenes[row['image_index']], world_config)[k]['answer']
      assert row['answer'].decode() == answer
      np.testing.assert_array_equal(row['answer_labels'], [world_lib.ANSWERS.index(answer)])
      np.testing.assert_array_equal(row['answer_scores'], [1.0])


def test_lxmert_answer_vocab_file_remaps_the_targets(data_config, tmp_path):
  """LXMERT's `trainval_ans2label.json` as the answer vocabulary: one-hot targets
  at its index of the answer string."""
  reordered = list(world_lib.ANSWERS)[::-1]
  path = tmp_path / 'trainval_ans2label.json'
  path.write_text(json.dumps({answer: index for index, answer in enumerate(reordered)}))
  examples, answers = vqa.open_examples(data_config, 'lxmert', split='validation',
                                        answer_vocab_file=str(path), table='gqa')
  assert answers == reordered
  batch = examples.examples(np.arange(4))
  _, true_answers = gqa.read_answers(data_config, 'validation')
  np.testing.assert_array_equal(batch['answer_scores'].argmax(-1),
                                [reordered.index(a) for a in true_answers[:4]])
  np.testing.assert_array_equal(batch['answer_scores'].sum(-1), np.ones(4))


# ----------------------------------------------------------------------------
# Metric and submission file.


def test_exact_match_compares_strings_as_they_are():
  predicted = ['yes', 'Yes', '2', 'man ', 'cup', 'red']
  truth = ['yes', 'yes', 'two', 'man', '', 'red']  # '': no answer (a submission question)
  stats = gqa.exact_match_stats(predicted, truth)
  assert stats == {'correct': 2, 'count': 5}
  assert all(v.dtype == np.int64 for v in stats.values())
  assert gqa.summary(stats) == {'accuracy': 0.4, 'count': 5}
  assert np.isnan(gqa.summary(gqa.exact_match_stats([], []))['accuracy'])
  with pytest.raises(ValueError, match='2 predictions but 1 answers'):
    gqa.exact_match_stats(['a', 'b'], ['a'])


def test_submission_records():
  records = gqa.submission_records(np.array(['02930152', '201640614'], object), ['yes', 'man'])
  assert json.loads(json.dumps(records)) == [
      {'questionId': '02930152', 'prediction': 'yes'},
      {'questionId': '201640614', 'prediction': 'man'}]
  with pytest.raises(ValueError, match='1 question ids but 2 answers'):
    gqa.submission_records(['1'], ['a', 'b'])


def test_config_recipes_and_evaluators():
  assert 'gqa' in TASKS and get_task('gqa') is gqa
  lxmert = importlib.import_module('configs.lxmert').get_config('base,task=gqa')
  assert lxmert.task == 'gqa' and lxmert.data.max_text_len == 20
  assert (lxmert.train.global_batch_size, lxmert.train.learning_rate) == (32, 1e-5)
  assert lxmert.train.num_steps == math.ceil(4 * (943_000 + 132_062) / 32)  # 4 epochs
  assert {k: (v.type, v.split) for k, v in lxmert.evals.items()} == {
      'gqa_testdev': ('gqa', 'testdev'), 'gqa_test': ('gqa', 'test')}
  # No published GQA recipe: the design's VQA one.
  uniter = importlib.import_module('configs.uniter').get_config('base,task=gqa')
  assert uniter.train.to_dict() == importlib.import_module('configs.uniter').get_config(
      'base,task=vqa').train.to_dict()
  small = importlib.import_module('configs.visualbert').get_config('small,task=gqa')
  assert {k: v.split for k, v in small.evals.items()} == {'gqa_val': 'validation',
                                                          'gqa_test': 'test'}
  small.evals = ml_collections.ConfigDict({'gqa_val': dict(small.evals.gqa_val, type='vqa')})
  with pytest.raises(ValueError, match="the gqa task has evaluators of type 'gqa'"):
    gqa.make_evaluators(small, None, None, '')


# ----------------------------------------------------------------------------
# Fine-tuning from the command line's config, end to end.


def finetune(design, data_dir, workdir, num_steps=4):
  """`configs/<design>.py:tiny,task=gqa` on the tiny world, evaluated every 2
  steps on validation and at the end on test, in batches of EVAL_BATCH:
  (the run's config, its last metrics, its metrics.jsonl records)."""
  return tt.finetune(tiny_config(design, data_dir, 'gqa'), workdir, num_steps, EVAL_BATCH)


def test_finetune_scores_every_question_once_and_loads(data_config, tmp_path):
  """VisualBERT (the cheapest tiny design to compile; its '? [MASK]' head and KL)."""
  workdir = str(tmp_path)
  config, final, records = finetune('visualbert', data_config.data_dir, workdir)
  assert np.isfinite(final['kl'])
  assert [r['step'] for r in records if 'gqa_val/count' in r] == [1, 2, 4]
  answers = tables.answer_vocab(config.data, 'gqa')
  for name, split in (('gqa_val', 'validation'), ('gqa_test', 'test')):
    question_ids, true_answers = gqa.read_answers(config.data, split)
    assert len(question_ids) % EVAL_BATCH
    logged = [r for r in records if f'{name}/count' in r]
    assert logged and all(r[f'{name}/count'] == len(question_ids) for r in logged)
    predictions = tt.predictions_of(workdir, name, 4)
    assert [p['questionId'] for p in predictions] == list(question_ids)  # in split order
    assert all(set(p) == {'questionId', 'prediction'} and p['prediction'] in answers
               for p in predictions)
    correct = sum(p['prediction'] == a for p, a in zip(predictions, true_answers))
    assert logged[-1][f'{name}/accuracy'] == correct / len(question_ids)
  tt.assert_parts_merged(workdir)
  # `vlpjax.load` answers an image's questions as the evaluator did.
  model = vlpjax.load(workdir)
  assert model.step == 4 and model.answers == answers
  rows, image = tt.rows_of_first_image(data_config.data_dir, 'tiny_gqa')
  evaluated = {p['questionId']: p['prediction']
               for p in tt.predictions_of(workdir, 'gqa_val', 4)}
  assert model.answer([q['question'].decode() for q in rows], *tt.image_inputs(image)) == [
      evaluated[q['question_id'].decode()] for q in rows]


@pytest.mark.slow
@pytest.mark.parametrize('design', ['lxmert', 'uniter', 'vilbert'])
def test_other_designs_finetune_on_gqa(design, data_config, tmp_path):
  config, final, records = finetune(design, data_config.data_dir, str(tmp_path), num_steps=2)
  assert np.isfinite(final[vqa.resolve_loss(vqa.resolve_head(design))])
  count = len(gqa.read_answers(config.data, 'validation')[0])
  assert [r['gqa_val/count'] for r in records if 'gqa_val/count' in r] == [count] * 2
