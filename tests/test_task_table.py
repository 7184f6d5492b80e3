"""benchmarks/task_table.py: the commands it runs and the table it reads back."""
import json

from benchmarks import task_table


def test_command_runs_only_the_test_evaluators_at_the_last_step():
  args = task_table.command('uniter', 'refexp', 'small', 50, '/w', '/pre')
  assert args[1:4] == ['-m', 'vlpjax.main', '--config=configs/uniter.py:small,task=refexp']
  assert '--config.train.num_steps=50' in args and '--config.init.source=workdir:/pre' in args
  evals = {a.split('.')[2]: int(a.rsplit('=', 1)[1]) for a in args if '.log_steps=' in a}
  assert evals == {'refexp_test': 50, 'refexp_test_gt': 50, 'refexp_val': 51, 'refexp_val_gt': 51}
  # Nothing runs at the first step; only the test evaluators at the last.
  flags = {a.split('.')[2]: a.rsplit('=', 1)[1] for a in args if '.at_last_step=' in a}
  assert flags == {'refexp_test': 'True', 'refexp_test_gt': 'True', 'refexp_val': 'False',
                   'refexp_val_gt': 'False'}
  assert len([a for a in args if a.endswith('.at_first_step=False')]) == 4
  assert not [a for a in task_table.command('lxmert', 'vcr', 'small', 5, '/w', None)
              if a.startswith('--config.init')]


def test_metric_and_markdown(tmp_path):
  with open(tmp_path / 'metrics.jsonl', 'w', encoding='utf-8') as f:
    for record in ({'step': 10, 'retrieval_test/r_mean': 0.25}, {'step': 20, 'loss': 1.0},
                   {'step': 20, 'retrieval_test/r_mean': 0.5}):
      f.write(json.dumps(record) + '\n')
  assert task_table.test_metric(str(tmp_path), 'retrieval', 20) == 0.5
  assert task_table.test_metric(str(tmp_path), 'retrieval', 30) is None
  assert task_table.test_metric(str(tmp_path / 'none'), 'retrieval', 20) is None
  cells = [dict(design='uniter', task='retrieval', init='scratch', value=0.5),
           dict(design='uniter', task='vcr', init='pretrained', value=0.125)]
  assert task_table.markdown(cells, ['retrieval', 'vcr'], ['uniter']).splitlines() == [
      '| design | init | retrieval (r_mean) | vcr (q_ar_accuracy) |', '| --- | --- | --- | --- |',
      '| uniter | scratch | 0.500 | - |', '| uniter | pretrained | - | 0.125 |']


def test_tables_of_several_invocations_add_up(tmp_path):
  results = str(tmp_path / 'task_table.json')
  first = [dict(design='uniter', task='vqa', init='scratch', value=0.5, seconds=9.0)]
  assert task_table.merged_cells(first, 200, 'small', results) == first
  with open(results, 'w', encoding='utf-8') as f:
    json.dump(dict(steps=200, size='small', cells=first), f)
  second = [dict(design='lxmert', task='vqa', init='scratch', value=0.25, seconds=3.0)]
  assert task_table.merged_cells(second, 200, 'small', results) == first + second
  redone = [dict(first[0], value=0.75)]
  assert task_table.merged_cells(redone, 200, 'small', results) == redone
  read_back = [dict(first[0], seconds=None)]  # reused, not rerun: the earlier entry stays
  assert task_table.merged_cells(read_back, 200, 'small', results) == first
  assert task_table.merged_cells(second, 100, 'small', results) == second  # another table
