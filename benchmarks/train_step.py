r"""Pretraining step speed of each design, beside the PyTorch references.

  python -m benchmarks.train_step [--sizes=tiny,base] [--batch=8] [--steps=5]
      [--rounds=3] [--hugepages] [--dtype=float32] [--designs=...]
      [--torch=lxmert,visualbert]

For each design and size: compile time, steps/s, examples/s, peak memory and, on
accelerators, MFU (analytic FLOPs, `vlpjax.flops`), on synthetic batches of text
length 20 and 36 regions on whatever devices exist (the step is the real jitted,
sharded `step.make_train_step`). The transformers `LxmertForPreTraining` and
`VisualBertForPreTraining` run the same shapes (forward, backward, AdamW) in
fp32 on the CPU. In the same run, a case of its own measures the machine's
matmul rate in the step's dtype (a jitted 2048 x 2048 x 2048 product, best of 10
in each round, best over the rounds), and each step's model FLOP/s is reported
as a share of it (`matmul_share`): how close the step comes to what the machine
does on one large product.

Each case runs in its own process (so that peak memory is its own), `--rounds`
times, the cases taking turns so that a busy spell of a shared machine falls on
all of them; a case's step time is the median over its rounds of the median of
its timed steps. Repeat rounds load the step from a persistent compilation cache.
`--hugepages` runs every case, PyTorch's too, with glibc's malloc asking for
transparent huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1): on CPU, page
faults on freshly allocated buffers are a large share of a step. Figures go to
stdout and to benchmarks/results/train_step.json.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

TEXT_LEN, REGIONS = 20, 36
MATMUL_SIZE = 2048
HUGEPAGES_ENV = {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
RESULTS = os.path.join(os.path.dirname(__file__), 'results', 'train_step.json')


def _peak_memory_bytes() -> int:
  """Device peak where the backend reports it, else this process's peak RSS."""
  import jax  # pylint: disable=import-outside-toplevel
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use'])
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PretrainingStep:
  """The real jitted, sharded pretraining step (`step.make_train_step`) of a
  design on a synthetic batch of text length 20 and 36 regions (37 for ViLBERT,
  its [IMG] slot), its first objective, with the train state as
  `train_and_evaluate` makes it. `overrides` are `config.model` fields. With
  `materialize=False` the state and batch are only shapes: enough to compile
  and read the program's memory, not to run it.
  """

  def __init__(self, design: str, size: str, batch_size: int, dtype: str,
               materialize: bool = True, **overrides):
    import jax  # pylint: disable=import-outside-toplevel
    from vlpjax import optim, sharding, state as state_lib, step as step_lib, train  # pylint: disable=import-outside-toplevel
    from vlpjax.tasks import pretrain as pretrain_task  # pylint: disable=import-outside-toplevel
    from vlpjax.data import synthetic  # pylint: disable=import-outside-toplevel
    from vlpjax.models import get_design, get_model  # pylint: disable=import-outside-toplevel

    config = importlib.import_module(f'configs.{design}').get_config(size)
    config.train.global_batch_size = batch_size
    config.model.update(dtype=dtype, **overrides)
    if not materialize:
      config.train.keep_grad_buffers = False
    self.mesh = sharding.make_mesh(config)
    train.validate_config(config, self.mesh)
    self.rules = sharding.logical_axis_rules(config)
    model = get_model(config.model)
    tx, schedule = optim.make_optimizer(config.train, get_design(config.model.name))
    self.objective = pretrain_task.objectives(config)[0]
    regions = REGIONS + (1 if design == 'vilbert' else 0)
    host_batch = synthetic.synthetic_batch(config.model, batch_size, TEXT_LEN, regions)
    batch_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in host_batch.items()}
    input_specs = step_lib.model_input_specs(config, pretrain_task, self.objective, batch_spec)
    self.abstract, shardings = state_lib.abstract_train_state(model, tx, input_specs,
                                                              self.mesh, self.rules)
    batch_sharding = sharding.batch_sharding(self.mesh, config.mesh.data_axes)
    if materialize:
      self.state = state_lib.init_train_state(model, tx, input_specs, config.seed, shardings)
      if state_lib.keeps_grad_buffers(config.train):
        self.state, shardings = state_lib.with_grad_buffers(self.state, shardings)
      self.batch = jax.device_put(host_batch, batch_sharding)
    else:
      self.state = self.abstract
      self.batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
                    for k, v in batch_spec.items()}
    self.config = config
    self.flops_per_step = batch_size * pretrain_task.flops_per_example(
        config, input_specs, self.objective)
    self._jitted = step_lib.make_train_step(config, model, tx, schedule, self.mesh, shardings,
                                            pretrain_task, self.objective)
    self.compiled = None

  def compile(self) -> float:
    """Compiles the step; returns the seconds it took."""
    import flax.linen as nn  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel
    start = time.perf_counter()
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      self.compiled = self._jitted.lower(self.state, self.batch).compile()
    return time.perf_counter() - start

  def memory_bytes(self) -> int:
    """The compiled step's device memory: arguments, outputs and temporaries,
    less what the donated state's outputs reuse."""
    memory = self.compiled.memory_analysis()
    return int(memory.argument_size_in_bytes + memory.output_size_in_bytes
               + memory.temp_size_in_bytes - memory.alias_size_in_bytes)

  def time_steps(self, steps: int) -> tuple[float, float]:
    """(median seconds of `steps` timed steps after one warm-up, the last loss)."""
    import jax  # pylint: disable=import-outside-toplevel
    self.state, metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      self.state, metrics = self.compiled(self.state, self.batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
    return statistics.median(times), float(metrics['loss'])


def run_vlpjax(design: str, size: str, batch_size: int, steps: int, dtype: str) -> dict:
  """Times `steps` jitted pretraining steps of `design`/`size`."""
  import jax  # pylint: disable=import-outside-toplevel
  from vlpjax import flops  # pylint: disable=import-outside-toplevel

  step = PretrainingStep(design, size, batch_size, dtype)
  compile_s = step.compile()
  step_s, loss = step.time_steps(steps)
  device = jax.devices()[0]
  return dict(
      impl='vlpjax', design=design, size=size, task=step.objective, dtype=dtype,
      batch=batch_size, devices=jax.device_count(), device_kind=device.device_kind,
      compile_s=compile_s, step_s=step_s, steps_per_s=1 / step_s,
      examples_per_s=batch_size / step_s, peak_memory_gib=_peak_memory_bytes() / 2**30,
      model_tflops_per_step=step.flops_per_step / 1e12,
      model_gflops_per_s=step.flops_per_step / step_s / 1e9,
      mfu=flops.mfu(step.flops_per_step, step_s, device.device_kind, jax.device_count(), dtype),
      loss=loss)


def matmul_rate(dtype: str, n: int = MATMUL_SIZE, repeats: int = 10) -> dict:
  """This machine's matmul rate: a jitted [n, n] x [n, n] product in `dtype`,
  best of `repeats` (2 n^3 FLOPs each)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  a, b = (jax.random.normal(jax.random.key(i), (n, n), dtype) for i in range(2))
  product = jax.jit(jnp.matmul)
  jax.block_until_ready(product(a, b))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(product(a, b))
    best = min(best, time.perf_counter() - start)
  return dict(impl='matmul', design=f'{n}^3', size='-', task='-', dtype=dtype, batch=n,
              device_kind=jax.devices()[0].device_kind, compile_s=0.0, step_s=best,
              steps_per_s=1 / best, examples_per_s=0.0, peak_memory_gib=0.0,
              model_tflops_per_step=2 * n**3 / 1e12, model_gflops_per_s=2 * n**3 / best / 1e9,
              mfu=None, loss=0.0)


def run_torch(design: str, batch_size: int, steps: int) -> dict:
  """Times `steps` of the transformers pretraining model (fp32, CPU): forward
  with every pretraining loss, backward, AdamW."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  b, t, r = batch_size, TEXT_LEN, REGIONS
  input_ids = torch.randint(106, 30522, (b, t))
  mlm_labels = torch.where(torch.rand(b, t) < 0.15, input_ids, -100)
  matched = torch.randint(0, 2, (b,))
  if design == 'lxmert':
    config = transformers.LxmertConfig()
    model = transformers.LxmertForPreTraining(config)
    inputs = dict(
        input_ids=input_ids, attention_mask=torch.ones(b, t, dtype=torch.long),
        visual_feats=torch.rand(b, r, 2048), visual_pos=torch.rand(b, r, 4),
        masked_lm_labels=mlm_labels, matched_label=matched,
        obj_labels={
            'obj': (torch.randint(0, 1600, (b, r)), torch.rand(b, r)),
            'attr': (torch.randint(0, 400, (b, r)), torch.rand(b, r)),
            'feat': (torch.rand(b, r, 2048), torch.rand(b, r))},
        ans=torch.randint(0, config.num_qa_labels, (b,)))
  elif design == 'visualbert':
    model = transformers.VisualBertForPreTraining(
        transformers.VisualBertConfig(visual_embedding_dim=2048))
    inputs = dict(
        input_ids=input_ids, attention_mask=torch.ones(b, t, dtype=torch.long),
        visual_embeds=torch.rand(b, r, 2048),
        visual_attention_mask=torch.ones(b, r, dtype=torch.long),
        labels=torch.cat([mlm_labels, torch.full((b, r), -100)], 1),
        sentence_image_labels=matched)
  else:
    raise ValueError(f'no PyTorch reference for {design}')
  model.train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

  def step():
    optimizer.zero_grad()
    loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    return loss

  step()  # warm-up
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  return dict(impl=f'torch {torch.__version__}', design=design, size='base', task='all',
              dtype='float32', batch=batch_size, devices=1, device_kind='cpu',
              compile_s=0.0, step_s=step_s, steps_per_s=1 / step_s,
              examples_per_s=batch_size / step_s,
              peak_memory_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              model_tflops_per_step=None, mfu=None, loss=float(loss))


def machine() -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  return dict(platform=platform.platform(), processor=platform.processor(),
              cpu_count=os.cpu_count(), python=platform.python_version(),
              jax=jax.__version__, backend=jax.default_backend(),
              devices=[d.device_kind for d in jax.devices()],
              load_average=os.getloadavg())


def run_child(module: str, flags: list[str], env: dict[str, str]) -> tuple[dict | None, str]:
  """`python -m module flags` in a child process: (the dict of its last
  'RESULT {json}' line, or None if it failed; the tail of its stderr)."""
  proc = subprocess.run([sys.executable, '-m', module, *flags], capture_output=True,
                        text=True, check=False, env=env)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
  if proc.returncode or not lines:
    return None, f'exit {proc.returncode}\n{proc.stderr[-3000:]}'
  return json.loads(lines[-1][len('RESULT '):]), proc.stderr[-3000:]


def run_case(case: str, args: argparse.Namespace, env: dict[str, str]) -> dict | None:
  """One case in a child process; its result dict, or None (reported) if it failed."""
  result, errors = run_child('benchmarks.train_step', [
      f'--one={case}', f'--batch={args.batch}', f'--steps={args.steps}',
      f'--dtype={args.dtype}'], env)
  if result is None:
    print(f'{case}: failed {errors}', file=sys.stderr)
  return result


def combine_rounds(rounds: list[dict]) -> dict:
  """A case's result over its rounds: the median step time; compile time and
  peak memory from the first round (later rounds load the compiled step)."""
  result = dict(rounds[0])
  step_s = statistics.median(r['step_s'] for r in rounds)
  result.update(step_s=step_s, steps_per_s=1 / step_s,
                examples_per_s=result['batch'] / step_s,
                round_step_s=[r['step_s'] for r in rounds])
  if result.get('model_gflops_per_s'):
    result['model_gflops_per_s'] = result['model_tflops_per_step'] * 1e3 / step_s
  if result['mfu'] is not None:
    result['mfu'] = rounds[0]['mfu'] * rounds[0]['step_s'] / step_s
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--designs', default='visualbert,vilbert,lxmert,uniter')
  parser.add_argument('--sizes', default='tiny,base')
  parser.add_argument('--torch', default='lxmert,visualbert',
                      help='designs to time in PyTorch too (base, fp32, CPU); "" for none')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--steps', type=int, default=5, help='timed steps per round')
  parser.add_argument('--rounds', type=int, default=3, help='turns each case takes')
  parser.add_argument('--hugepages', action='store_true',
                      help='GLIBC_TUNABLES=glibc.malloc.hugetlb=1 for every case')
  parser.add_argument('--dtype', default='float32', help="compute dtype, e.g. 'bfloat16'")
  parser.add_argument('--out', default=RESULTS)
  parser.add_argument('--one', help=argparse.SUPPRESS)  # child process: one case
  args = parser.parse_args()

  if args.one:
    kind, design, size = args.one.split(':')
    if kind == 'matmul':
      result = matmul_rate(args.dtype)
    elif kind == 'torch':
      result = run_torch(design, args.batch, args.steps)
    else:
      result = run_vlpjax(design, size, args.batch, args.steps, args.dtype)
    print('RESULT ' + json.dumps(result))
    return

  cases = ['matmul:-:-']
  cases += [f'jax:{d}:{s}' for s in args.sizes.split(',') for d in args.designs.split(',')]
  cases += [f'torch:{d}:base' for d in filter(None, args.torch.split(','))]
  rounds = {case: [] for case in cases}
  with tempfile.TemporaryDirectory() as cache_dir:
    env = {**os.environ, 'JAX_COMPILATION_CACHE_DIR': cache_dir,
           'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
           'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0',
           **(HUGEPAGES_ENV if args.hugepages else {})}
    for round_number in range(args.rounds):
      for case in cases:
        result = run_case(case, args, env)
        if result is None:
          continue
        rounds[case].append(result)
        print(f"round {round_number + 1}/{args.rounds} {result['impl']:>16} "
              f"{result['design']:>10} {result['size']:>5} {result['task']:>6} "
              f"compile {result['compile_s']:6.1f}s  {result['step_s']:7.3f} s/step", flush=True)
  results = [combine_rounds(r) for case, r in rounds.items() if r and case != 'matmul:-:-']
  matmul = min(rounds['matmul:-:-'], key=lambda r: r['step_s'], default=None)
  if matmul is not None:
    print(f"{args.dtype} matmul {MATMUL_SIZE}^3, best of every round: "
          f"{matmul['model_gflops_per_s']:.1f} GFLOP/s")
    for result in results:
      if result.get('model_gflops_per_s'):
        result['matmul_share'] = result['model_gflops_per_s'] / matmul['model_gflops_per_s']
  print(f'\nmedian over rounds (batch {args.batch}, {args.steps} steps per round, '
        f'hugepages {"on" if args.hugepages else "off"}):')
  for result in results:
    mfu = f"{result['mfu']:.1%}" if result['mfu'] else '-'
    share = (f"  {result['model_gflops_per_s']:.1f} GFLOP/s = {result['matmul_share']:.0%} "
             'of the matmul rate' if 'matmul_share' in result else '')
    print(f"{result['impl']:>16} {result['design']:>10} {result['size']:>5} "
          f"{result['task']:>6} compile {result['compile_s']:6.1f}s  "
          f"{result['steps_per_s']:7.3f} steps/s  {result['examples_per_s']:8.1f} ex/s  "
          f"peak {result['peak_memory_gib']:.2f} GiB  MFU {mfu}{share}", flush=True)

  speedups = {}
  for design in filter(None, args.torch.split(',')):
    ours = [r for r in results if r['impl'] == 'vlpjax' and r['design'] == design
            and r['size'] == 'base' and r['dtype'] == 'float32']
    ref = [r for r in results if r['impl'].startswith('torch') and r['design'] == design]
    if ours and ref:
      speedups[design] = ours[0]['examples_per_s'] / ref[0]['examples_per_s']
      print(f'{design}: vlpjax / PyTorch examples/s = {speedups[design]:.2f}x')
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w', encoding='utf-8') as f:
    json.dump(dict(machine=machine(), text_len=TEXT_LEN, regions=REGIONS,
                   batch=args.batch, steps=args.steps, rounds=args.rounds,
                   hugepages=args.hugepages, results=results,
                   matmul=matmul,
                   speedup_vs_torch=speedups), f, indent=2)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
