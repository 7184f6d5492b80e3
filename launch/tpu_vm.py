#!/usr/bin/env python3
r"""Pretrain on Cloud TPU VM slices from queued resources, and keep the run going.

  launch/tpu_vm.py --name=vlp-v5e --zone=us-west4-a --accelerator=v5litepod-16 \
      --data-dir=gs://my-bucket/tfds \
      configs/uniter.py:base gs://my-bucket/runs/uniter \
      --config.model.dtype=bfloat16 --config.mesh.shape='(-1,4,1)'

What it does, in order (`--dry-run` prints each command instead of running it):
  1. packs this checkout's HEAD (`git archive`) and writes run.sh beside it;
  2. requests the slice as a queued resource (`gcloud compute tpus queued-resources
     create`, spot by default, `--provisioning=reserved` for a reservation,
     `--node-count=N` for N slices joined over DCN: nodes NAME-0 ... NAME-{N-1})
     with the runtime version of the accelerator (v4, v5e, v5p, v6e), and waits
     until it is ACTIVE;
  3. on every worker of every node: unpacks the code into ~/vlpjax, installs the
     pinned `jax[tpu]` and vlpjax once per VM, and puts run.sh in ~/vlpjax_run/;
  4. starts run.sh detached (setsid nohup) on every worker: the same
     `python3 -m vlpjax.main --config=CONFIG --workdir=WORKDIR FLAG...` everywhere,
     with TFDS_DATA_DIR, JAX_COMPILATION_CACHE_DIR (WORKDIR/jax_cache by default)
     and LIBTPU_INIT_ARGS (if given) set; each worker's log goes to
     ~/vlpjax_run/ and is copied to WORKDIR/logs/ every minute and at the end;
  5. supervises: every --poll-seconds it reads the queued resource's state and
     the run's status on worker 0. A slice that is preempted (the queued
     resource leaves ACTIVE) is deleted and requested again, and the same
     command reruns, which resumes from the newest checkpoint in WORKDIR (a
     preempted run saves one on SIGTERM). A run that finishes (exit 0) ends the
     supervisor with 0; one that fails ends it with 1, leaving the slice up for
     inspection (`--delete` removes it).

Stopping the supervisor (Ctrl-C) leaves the slice and the run going; rerunning
the same command picks them up again (a worker whose run is alive is left
alone). WORKDIR should be on gs:// so that checkpoints outlive the VMs. Only the
Python standard library and the gcloud CLI are needed on the machine that runs
this.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Sequence

# The jax release the tests run with; `--jax-version` overrides it.
JAX_VERSION = '0.10.2'
LIBTPU_RELEASES = 'https://storage.googleapis.com/jax-releases/libtpu_releases.html'
# https://cloud.google.com/tpu/docs/runtimes ("PyTorch and JAX"), by the
# accelerator type's prefix (v5litepod-16 is a v5e slice of 16 chips).
RUNTIME_VERSIONS = {
    'v4': 'tpu-ubuntu2204-base',
    'v5litepod': 'v2-alpha-tpuv5-lite',
    'v5p': 'v2-alpha-tpuv5',
    'v6e': 'v2-alpha-tpuv6e',
}
# Queued resource states (QueuedResourceState.State): on the way to ACTIVE, and gone.
PENDING_STATES = ('CREATING', 'ACCEPTED', 'WAITING_FOR_RESOURCES', 'PROVISIONING')
GONE_STATES = ('FAILED', 'SUSPENDING', 'SUSPENDED', 'DELETING')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# On every worker, under $HOME.
CODE_DIR = 'vlpjax'
RUN_DIR = 'vlpjax_run'
BUNDLE = 'vlpjax.tar.gz'
RUN_SCRIPT = 'vlpjax-run.sh'  # copied to ~ beside the bundle, moved to ~/vlpjax_run/run.sh
PREEMPTED_MARK = 'preempted: saved step'  # vlpjax/train.py logs it after the SIGTERM save


def runtime_version(accelerator: str) -> str:
  """The TPU software version for an accelerator type such as 'v5litepod-16'."""
  prefix = accelerator.split('-', 1)[0]
  if prefix not in RUNTIME_VERSIONS:
    raise ValueError(f'unknown accelerator {accelerator!r}: expected one of '
                     f'{", ".join(p + "-N" for p in RUNTIME_VERSIONS)} '
                     '(or pass --runtime-version)')
  return RUNTIME_VERSIONS[prefix]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='launch/tpu_vm.py', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--name', required=True, help='queued resource id (and node id or prefix)')
  parser.add_argument('--zone', required=True)
  parser.add_argument('--accelerator', required=True,
                      help='accelerator type of one slice, e.g. v4-32, v5litepod-16, v5p-32, v6e-16')
  parser.add_argument('--project', help='Google Cloud project (default: gcloud config)')
  parser.add_argument('--runtime-version', help='default: by accelerator, see RUNTIME_VERSIONS')
  parser.add_argument('--provisioning', choices=('spot', 'reserved', 'on-demand'), default='spot',
                      help='spot (default; preemptible), reserved (a reservation) or on-demand')
  parser.add_argument('--node-count', type=int, default=1,
                      help='slices; more than 1 makes a multi-slice run over DCN')
  parser.add_argument('--data-dir', help='TFDS data dir (gs://...): TFDS_DATA_DIR and '
                      '--config.data.data_dir')
  parser.add_argument('--compilation-cache-dir',
                      help='JAX_COMPILATION_CACHE_DIR (default: WORKDIR/jax_cache)')
  parser.add_argument('--libtpu-init-args', default='', help='LIBTPU_INIT_ARGS on every worker')
  parser.add_argument('--jax-version', default=JAX_VERSION, help='pinned jax[tpu] version')
  parser.add_argument('--poll-seconds', type=float, default=60)
  parser.add_argument('--max-recreations', type=int, default=100,
                      help='give up after this many preemptions')
  parser.add_argument('--no-supervise', action='store_true',
                      help='start the run and return instead of supervising it')
  parser.add_argument('--delete', action='store_true',
                      help='delete the queued resource (and its VMs) and exit')
  parser.add_argument('--dry-run', action='store_true', help='print the commands, run nothing')
  parser.add_argument('config', help='config file and argument, e.g. configs/uniter.py:base')
  parser.add_argument('workdir', help='run directory, gs://... so checkpoints survive preemption')
  parser.add_argument('flags', nargs=argparse.REMAINDER,
                      help='further vlpjax.main flags, passed on exactly as given')
  args = parser.parse_args(argv)
  if args.node_count < 1:
    parser.error('--node-count must be >= 1')
  if not args.runtime_version:
    try:
      args.runtime_version = runtime_version(args.accelerator)
    except ValueError as e:
      parser.error(str(e))
  if not args.compilation_cache_dir:
    args.compilation_cache_dir = args.workdir.rstrip('/') + '/jax_cache'
  return args


class Launcher:
  """Builds the commands (every one an argv list) and runs or prints them."""

  def __init__(self, args: argparse.Namespace, out=sys.stdout):
    self.args = args
    self.out = out
    staging = os.path.join(tempfile.gettempdir(), f'vlpjax-launch-{args.name}')
    self.bundle = os.path.join(staging, BUNDLE)
    self.run_script_path = os.path.join(staging, RUN_SCRIPT)

  # ---- the commands ----------------------------------------------------------

  @property
  def nodes(self) -> list[str]:
    """TPU VM node ids: the queued resource's id, or id-0 ... for multi-slice."""
    if self.args.node_count == 1:
      return [self.args.name]
    return [f'{self.args.name}-{i}' for i in range(self.args.node_count)]

  def _where(self) -> list[str]:
    where = [f'--zone={self.args.zone}']
    if self.args.project:
      where.append(f'--project={self.args.project}')
    return where

  def archive_command(self) -> list[str]:
    return ['git', '-C', REPO, 'archive', '--format=tar.gz', '-o', self.bundle, 'HEAD']

  def create_command(self) -> list[str]:
    a = self.args
    command = ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', a.name,
               *self._where(), f'--accelerator-type={a.accelerator}',
               f'--runtime-version={a.runtime_version}']
    if a.node_count == 1:
      command.append(f'--node-id={a.name}')
    else:
      command += [f'--node-count={a.node_count}', f'--node-prefix={a.name}']
    if a.provisioning == 'spot':
      command.append('--spot')
    elif a.provisioning == 'reserved':
      command.append('--reserved')
    return command

  def describe_command(self) -> list[str]:
    return ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe', self.args.name,
            *self._where(), '--format=value(state.state)']

  def delete_command(self) -> list[str]:
    return ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', self.args.name,
            *self._where(), '--force', '--quiet']

  def scp_command(self, node: str) -> list[str]:
    return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', self.bundle, self.run_script_path,
            f'{node}:', *self._where(), '--worker=all']

  def ssh_command(self, node: str, remote: str, worker: str = 'all') -> list[str]:
    return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', node, *self._where(),
            f'--worker={worker}', f'--command={remote}']

  def run_argv(self) -> list[str]:
    """The training command every worker runs."""
    a = self.args
    argv = ['python3', '-m', 'vlpjax.main', f'--config={a.config}', f'--workdir={a.workdir}']
    if a.data_dir:
      argv.append(f'--config.data.data_dir={a.data_dir}')  # before FLAGS: a FLAG wins
    if a.node_count > 1:
      # Data parallel across the slices (DCN); a dcn_shape among FLAGS wins.
      argv.append(f'--config.mesh.dcn_shape=({a.node_count},1,1)')
    return argv + list(a.flags)

  def run_env(self) -> dict[str, str]:
    a = self.args
    env = {'JAX_COMPILATION_CACHE_DIR': a.compilation_cache_dir}
    if a.data_dir:
      env['TFDS_DATA_DIR'] = a.data_dir
    if a.libtpu_init_args:
      env['LIBTPU_INIT_ARGS'] = a.libtpu_init_args
    return env

  def run_script(self) -> str:
    """~/vlpjax_run/run.sh: one run on one worker, detached from any ssh session.

    Writes its pid while it runs and, when the run ends, `status`: `done`,
    `preempted` (saved at a SIGTERM and exited) or `failed <exit code>`.
    """
    q = shlex.quote
    logs = self.args.workdir.rstrip('/') + '/logs'
    if logs.startswith('gs://'):
      copy = f'gcloud storage cp --quiet "$log" {q(logs)}/"$(hostname)".log'
    else:
      copy = f'mkdir -p {q(logs)} && cp "$log" {q(logs)}/"$(hostname)".log'
    exports = '\n'.join(f'export {k}={q(v)}' for k, v in self.run_env().items())
    return f'''#!/bin/bash
# One vlpjax run on this TPU VM worker (written by launch/tpu_vm.py).
set -u
run_dir="$HOME/{RUN_DIR}"
log="$run_dir/$(hostname)-$(date -u +%Y%m%dT%H%M%SZ).log"
cd "$HOME/{CODE_DIR}" || exit 1
{exports}
copy_log() {{ {copy} || true; }}
rm -f "$run_dir/status"
echo "$$" > "$run_dir/pid"
{shlex.join(self.run_argv())} >> "$log" 2>&1 &
child=$!
# A shutdown sends SIGTERM to every process; pass one sent to this script on too.
trap 'kill -TERM "$child" 2>/dev/null' TERM
(while sleep 60; do copy_log; done) &
copier=$!
while :; do
  wait "$child" && rc=0 || rc=$?
  kill -0 "$child" 2>/dev/null || break
done
if [ "$rc" -ne 0 ]; then
  status="failed $rc"
elif grep -q {q(PREEMPTED_MARK)} "$log"; then
  status=preempted
else
  status="done"
fi
kill "$copier" 2>/dev/null
echo "$status" >> "$log"
copy_log
echo "$status" > "$run_dir/status"
rm -f "$run_dir/pid"
'''

  def _alive_check(self) -> str:
    return (f'[ -f "$HOME/{RUN_DIR}/pid" ] && kill -0 "$(cat "$HOME/{RUN_DIR}/pid")" '
            '2>/dev/null')

  def setup_remote(self) -> str:
    """Per worker: code into ~/vlpjax, pinned jax[tpu] + vlpjax once, run.sh in place."""
    pin = f'jax[tpu]=={self.args.jax_version}'
    marker = f'"$HOME/{RUN_DIR}/.installed-{self.args.jax_version}"'
    return '\n'.join([
        f'if {self._alive_check()}; then echo "vlpjax: a run is going on $(hostname), left as is"; '
        'exit 0; fi',
        'set -e',
        f'mkdir -p "$HOME/{RUN_DIR}"',
        f'rm -rf "$HOME/{CODE_DIR}" && mkdir "$HOME/{CODE_DIR}"',
        f'tar -xzf "$HOME/{BUNDLE}" -C "$HOME/{CODE_DIR}"',
        f'if [ ! -f {marker} ]; then',
        f'  python3 -m pip install -q {shlex.quote(pin)} -f {LIBTPU_RELEASES} -e "$HOME/{CODE_DIR}"',
        f'  touch {marker}',
        'fi',
        f'mv -f "$HOME/{RUN_SCRIPT}" "$HOME/{RUN_DIR}/run.sh"',
    ])

  def start_remote(self) -> str:
    """Per worker: start run.sh detached, unless a run is alive there."""
    return (f'if {self._alive_check()}; then echo "vlpjax: already running on $(hostname)"; '
            f'else setsid nohup bash "$HOME/{RUN_DIR}/run.sh" > /dev/null 2>&1 < /dev/null & fi')

  def status_remote(self) -> str:
    # The status file first: run.sh writes it just before removing its pid, and a
    # new run removes it before writing one.
    return (f'if [ -f "$HOME/{RUN_DIR}/status" ]; then cat "$HOME/{RUN_DIR}/status"; '
            f'elif {self._alive_check()}; then echo running; else echo absent; fi')

  # ---- running them ----------------------------------------------------------

  def say(self, text: str) -> None:
    print(text, file=self.out, flush=True)

  def show(self, command: Sequence[str]) -> None:
    self.say(shlex.join(command))

  def call(self, command: Sequence[str], check: bool = True, capture: bool = False
           ) -> subprocess.CompletedProcess:
    self.show(command)
    return subprocess.run(command, check=check, text=True,
                          stdout=subprocess.PIPE if capture else None)

  def call_all(self, commands: Sequence[Sequence[str]], attempts: int = 5) -> None:
    """Runs commands at once (one per node), retrying the ones that fail (ssh to a
    VM that just became ACTIVE can fail for a while; every command here may be
    repeated), and raises if one still fails after `attempts`."""
    pending = list(commands)
    for attempt in range(attempts):
      if attempt:
        self.say(f'# {len(pending)} command(s) failed; retrying ({attempt + 1}/{attempts})')
        time.sleep(self.args.poll_seconds)
      for command in pending:
        self.show(command)
      processes = [subprocess.Popen(command) for command in pending]
      pending = [c for c, p in zip(pending, processes) if p.wait() != 0]
      if not pending:
        return
    raise subprocess.CalledProcessError(1, pending[0])

  def state(self) -> str | None:
    """The queued resource's state, or None if it does not exist (or cannot be read)."""
    result = self.call(self.describe_command(), check=False, capture=True)
    return (result.stdout.strip() or None) if result.returncode == 0 else None

  def run_status(self) -> str:
    """running, done, preempted, failed N, absent, or unknown (worker 0 unreachable)."""
    result = self.call(self.ssh_command(self.nodes[0], self.status_remote(), worker='0'),
                       check=False, capture=True)
    lines = result.stdout.strip().splitlines()
    return lines[-1].strip() if result.returncode == 0 and lines else 'unknown'

  def acquire(self) -> None:
    """Makes the queued resource ACTIVE: requests it (again) and waits."""
    state = self.state()
    while state != 'ACTIVE':
      if state in GONE_STATES:
        self.say(f'# queued resource {self.args.name} is {state}: deleting it to request it again')
        self.call(self.delete_command(), check=False)
        state = None
      if state is None:
        self.call(self.create_command(), check=False)
      time.sleep(self.args.poll_seconds)
      state = self.state()
      self.say(f'# {self.args.name}: {state}')

  def prepare_and_start(self) -> None:
    self.call_all([self.scp_command(node) for node in self.nodes])
    self.call_all([self.ssh_command(node, self.setup_remote()) for node in self.nodes])
    self.call_all([self.ssh_command(node, self.start_remote()) for node in self.nodes])

  def dry_run(self) -> int:
    """Prints what a launch runs, in order, without running anything."""
    if self.args.delete:
      self.show(self.delete_command())
      return 0
    self.show(self.archive_command())
    self.say('# request the slice, then poll until the state is ACTIVE:')
    self.show(self.create_command())
    self.show(self.describe_command())
    self.say('# on every node (all workers):')
    for node in self.nodes:
      self.show(self.scp_command(node))
    for node in self.nodes:
      self.show(self.ssh_command(node, self.setup_remote()))
    for node in self.nodes:
      self.show(self.ssh_command(node, self.start_remote()))
    if not self.args.no_supervise:
      self.say(f'# then every {self.args.poll_seconds:g} s, the state and the run on worker 0:')
      self.show(self.describe_command())
      self.show(self.ssh_command(self.nodes[0], self.status_remote(), worker='0'))
      self.say('# a state other than ACTIVE (preempted): delete, request again, and '
               'everything from the create above once more:')
      self.show(self.delete_command())
      self.say('# a run that stopped at a SIGTERM on a slice that stayed up: the start above again')
    self.say(f'# {self.run_script_path} (~/vlpjax_run/run.sh on every worker):')
    for line in self.run_script().splitlines():
      self.say(f'#   {line}' if line else '#')
    return 0

  def launch(self) -> int:
    if self.args.dry_run:
      return self.dry_run()
    if self.args.delete:
      return self.call(self.delete_command(), check=False).returncode
    os.makedirs(os.path.dirname(self.bundle), exist_ok=True)
    self.call(self.archive_command())
    with open(self.run_script_path, 'w', encoding='utf-8') as f:
      f.write(self.run_script())
    self.acquire()
    self.prepare_and_start()
    if self.args.no_supervise:
      return 0
    recreations = 0
    while True:
      time.sleep(self.args.poll_seconds)
      state = self.state()
      if state in PENDING_STATES:
        continue
      if state == 'ACTIVE':
        status = self.run_status()
        self.say(f'# {self.args.name}: ACTIVE, run {status}')
        if status == 'done':
          return 0
        if status.startswith('failed'):
          self.say(f'# the run failed; logs: {self.args.workdir.rstrip("/")}/logs/ '
                   f'(delete the slice with --delete)')
          return 1
        if status == 'preempted':  # stopped at a SIGTERM, and the slice stayed up
          self.call_all([self.ssh_command(node, self.start_remote()) for node in self.nodes])
        elif status == 'absent':  # VMs replaced under the same queued resource
          self.prepare_and_start()
        continue
      recreations += 1
      self.say(f'# {self.args.name}: {state} (preempted), recreation {recreations}')
      if recreations > self.args.max_recreations:
        self.say(f'# giving up after {self.args.max_recreations} recreations')
        return 1
      self.acquire()
      self.prepare_and_start()


def main(argv: Sequence[str]) -> int:
  return Launcher(parse_args(argv)).launch()


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
