"""`python -m benchmarks.compare`: the design x task matrix at equal steps and at
equal training FLOPs, its table, CSV and plots, and resuming without rerunning."""
import csv

from PIL import Image
import pytest

from benchmarks import compare
from vlpjax import train

pytestmark = pytest.mark.usefixtures('compile_cache')


def read_csv(path):
  with open(path, encoding='utf-8') as f:
    return list(csv.DictReader(f))


@pytest.mark.slow  # 2-3 minutes here: 11 tiny runs
def test_equal_steps_and_equal_flops_cells_resume(data_dir, tmp_path, monkeypatch):
  workdir = str(tmp_path / 'compare')
  args = ['--workdir', workdir, '--quick', '--designs=uniter,lxmert', '--tasks=vqa',
          f'--data_dir={data_dir}']
  table = compare.main(args)
  rows = read_csv(tmp_path / 'compare' / 'comparison.csv')
  assert len(rows) == 2 * 2 * 2  # designs x inits x budgets, one task and seed
  assert {(r['design'], r['init'], r['budget']) for r in rows} == {
      (d, i, b) for d in ('uniter', 'lxmert') for i in compare.INITS for b in compare.BUDGETS}
  by = {(r['design'], r['init'], r['budget']): r for r in rows}

  comparison = compare.Comparison(compare.Settings(**compare.QUICK, data_dir=data_dir), workdir)
  uniter, lxmert = (comparison.flops_per_step(d, 'vqa') for d in ('uniter', 'lxmert'))
  assert lxmert > uniter  # the two-stream design costs more per example
  assert int(by['lxmert', 'scratch', 'flops']['finetune_steps']) == max(
      1, round(compare.QUICK['finetune_steps'] * uniter / lxmert))
  for init in compare.INITS:
    # Equal FLOPs: within one of its own steps of the reference's budget.
    reference = float(by['uniter', init, 'flops']['finetune_flops'])
    assert abs(float(by['lxmert', init, 'flops']['finetune_flops']) - reference) <= lxmert
    assert by['uniter', init, 'flops']['value'] == by['uniter', init, 'steps']['value']
  pretrained = by['lxmert', 'pretrained', 'steps']
  assert int(pretrained['pretrain_steps']) == compare.QUICK['pretrain_steps']
  assert float(pretrained['total_flops']) == pytest.approx(
      float(pretrained['pretrain_flops']) + float(pretrained['finetune_flops']))
  assert float(by['lxmert', 'scratch', 'steps']['pretrain_flops']) == 0
  for row in rows:
    assert 0 <= float(row['value']) <= 1 and row['metric'] == 'accuracy'
  # The reference's two budgets are one run each.
  cells = sorted(p.name for p in (tmp_path / 'compare' / 'cells').iterdir())
  assert len([c for c in cells if c.startswith('vqa_uniter')]) == 2
  assert len([c for c in cells if c.startswith('pretrain_')]) == 3
  assert '| uniter | pretrained | steps |' in table
  for png in ('pretraining_loss.png', 'metric_vs_flops.png'):
    with Image.open(tmp_path / 'compare' / png) as image:
      assert image.format == 'PNG'

  def fail(*unused):
    raise AssertionError('a finished cell ran again')

  monkeypatch.setattr(train, 'train_and_evaluate', fail)
  assert compare.main(args) == table


def test_bad_names_are_usage_errors(tmp_path):
  with pytest.raises(SystemExit, match='--tasks'):
    compare.main(['--workdir', str(tmp_path), '--tasks=vqa,nope'])
  with pytest.raises(SystemExit, match='--designs'):
    compare.main(['--workdir', str(tmp_path), '--designs=bert'])


@pytest.mark.slow
def test_quick_runs_every_task(data_dir, tmp_path):
  """Every task of the matrix for a two-stream and a single-stream design (the
  default test runs the other two with both budgets)."""
  workdir = str(tmp_path / 'compare')
  compare.main(['--workdir', workdir, '--quick', '--designs=vilbert,visualbert',
                '--budgets=flops', f'--data_dir={data_dir}'])
  rows = read_csv(tmp_path / 'compare' / 'comparison.csv')
  assert len(rows) == 2 * len(compare.TASKS) * 2
  assert {r['task'] for r in rows} == set(compare.TASKS)
  assert all(r['value'] != '' for r in rows)


def test_a_workdir_of_other_settings_is_refused(tmp_path):
  compare.Comparison(compare.Settings(**compare.QUICK), str(tmp_path))
  with pytest.raises(ValueError,
                     match=r'other settings \(batch_size, .*pretrain_steps, size, world'):
    compare.Comparison(compare.Settings(), str(tmp_path))
