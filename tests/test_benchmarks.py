"""The accelerator MFU script runs end to end on the CPU at tiny sizes (its
figures are not checked: a test never asserts a timing); the VQA prior report's
statistics."""
import json

import numpy as np
import pytest

from benchmarks import mfu, vqa_prior
from vlpjax.tasks import vqa

pytestmark = pytest.mark.usefixtures('compile_cache')


@pytest.mark.slow  # 61 s on 2 cores
def test_mfu_script_searches_the_batch_and_times_each_variant(tmp_path, monkeypatch):
  monkeypatch.setattr(mfu, 'memory_limit', lambda: 2**30)
  out = tmp_path / 'mfu.json'
  report = mfu.main(['--designs=uniter', '--size=tiny', '--steps=1', '--max_batch=64',
                     f'--out={out}'])
  assert json.loads(out.read_text()) == json.loads(json.dumps(report))
  entry = report['designs']['uniter']
  search = entry['largest_batch']
  assert search['batch'] == 64 and search['batch'] % 8 == 0
  assert 0 < search['memory_gib'] <= mfu.MEMORY_HEADROOM * search['limit_gib']
  assert entry['variants']['cudnn'].startswith('skipped')  # no GPU here
  for variant in ('explicit', 'xla'):
    result = entry['variants'][variant]
    assert result['batch'] == 64 and result['objective'] == 'itm'
    assert result['compile_s'] > 0 and result['step_s'] > 0 and result['mfu'] is None
  assert entry['attention_dropout_cost'] > 0
  assert report['skipped'] == []


def test_step_profile_groups_every_op_of_the_step():
  """The profile's groups cover the step: its matmuls, optimizer and inputs
  (named scopes) are found, and the shares add up."""
  from benchmarks import step_profile  # pylint: disable=import-outside-toplevel
  result = step_profile.profile('uniter', 'tiny', 8, 1)
  groups = result['groups']
  assert set(groups) == set(step_profile.GROUPS)
  assert sum(g['share'] for g in groups.values()) == pytest.approx(1.0)
  assert groups['matmuls']['thread_s'] > 0 and groups['optimizer']['thread_s'] > 0
  assert step_profile.group_of('fusion', True, 'jit(train_step)/optimizer/mul') == 'matmuls'
  assert step_profile.group_of('add', False, 'jit(train_step)/optimizer/add') == 'optimizer'
  assert step_profile.group_of('add', False, 'jit(f)/M/backbone/layer_0/ffn/output_norm/add'
                               ) == 'layer norms'


def test_vqa_prior_auc_and_constant_answers():
  """The yes/no AUC against hand cases, and each type's constant: the most common
  majority answer after normalisation."""
  yes = np.array([True, True, False, False])
  assert vqa_prior.roc_auc(yes, np.array([3., 2., 1., 0.])) == 1.0
  assert vqa_prior.roc_auc(yes, np.array([0., 1., 2., 3.])) == 0.0
  assert vqa_prior.roc_auc(yes, np.zeros(4)) == 0.5  # ties count half
  assert vqa_prior.roc_auc(yes, np.array([3., 0., 1., 2.])) == 0.5
  assert np.isnan(vqa_prior.roc_auc(np.ones(3, bool), np.arange(3.)))
  truth = {1: vqa.GroundTruth(('Yes',) * 6 + ('no',) * 4, 'yes/no'),
           2: vqa.GroundTruth(('yes',) * 3 + ('no',) * 7, 'yes/no'),
           3: vqa.GroundTruth(('no',) * 10, 'yes/no'),
           4: vqa.GroundTruth(('two',) * 10, 'number'),
           5: vqa.GroundTruth((), None)}  # no answers (a test split): skipped
  assert vqa_prior.constant_answers(truth) == {'yes/no': 'no', 'number': '2'}
  assert vqa_prior.majority_answer(['Yes', 'yes.', 'no']) == 'yes'
