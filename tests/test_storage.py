"""Runs on gs://: workdir, data dir, checkpoints, metrics, TensorBoard, predictions,
evaluation and weight conversion, against a local Cloud Storage emulator
(`gcs_emulator`, in memory) that every client vlpjax uses is pointed at:
gcsfs (epath), tensorstore (orbax's arrays), google-cloud-cpp (ArrayRecord) and
google-cloud-storage (tensorboardX).

The commands run in an empty working directory with an empty HOME: a path that
bypassed `vlpjax.paths` (an `open('gs://...')`, `os.makedirs`) would leave a local
`gs:` directory behind, or find nothing, and fail the test.
"""
import json
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest
import torch
import transformers

from test_main import REPO, cpu_env

pytest.importorskip('gcp_storage_emulator')
import gcs_emulator  # pylint: disable=g-import-not-at-top,wrong-import-position

BUCKET = 'vlpjax-test'


@pytest.fixture(scope='module')
def emulator():
  """The emulator's URL, serving BUCKET until the module's tests are done."""
  with gcs_emulator.serve(BUCKET) as url:
    yield url


def gcs_env(url: str, tmp_path, tmp_path_factory) -> dict[str, str]:
  home = tmp_path / 'home'
  home.mkdir()
  return dict(cpu_env(tmp_path_factory), HOME=str(home),
              STORAGE_EMULATOR_HOST=url,            # gcsfs, google-cloud-storage
              TENSORSTORE_GCS_HTTP_URL=url,         # tensorstore (orbax)
              CLOUD_STORAGE_EMULATOR_ENDPOINT=url,  # google-cloud-cpp (ArrayRecord)
              GOOGLE_AUTH_TOKEN_FOR_TESTING='test',
              GOOGLE_CLOUD_PROJECT='test',
              GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT='false')  # no bucket-layout probe


def stored_objects(url: str, prefix: str) -> list[str]:
  """Names of the bucket's objects under `prefix`, from the emulator's JSON API."""
  names, token = [], ''
  while True:
    query = urllib.parse.urlencode({'prefix': prefix, **({'pageToken': token} if token else {})})
    with urllib.request.urlopen(f'{url}/storage/v1/b/{BUCKET}/o?{query}') as response:
      listing = json.load(response)
    names += [item['name'] for item in listing.get('items', [])]
    token = listing.get('nextPageToken')
    if not token:
      return names


def read_object(url: str, name: str) -> bytes:
  quoted = urllib.parse.quote(name, safe='')
  with urllib.request.urlopen(f'{url}/storage/v1/b/{BUCKET}/o/{quoted}?alt=media') as response:
    return response.read()


def run(args: list[str], cwd, env) -> subprocess.CompletedProcess:
  result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  return result


def test_run_resume_evaluate_and_convert_on_gcs(emulator, tmp_path, tmp_path_factory):
  env = gcs_env(emulator, tmp_path, tmp_path_factory)
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  workdir, data_dir = f'gs://{BUCKET}/runs/vqa', f'gs://{BUCKET}/tfds'
  config = f'--config={REPO}/configs/visualbert.py:tiny,task=vqa'
  train = ['-m', 'vlpjax.main', config, f'--workdir={workdir}',
           f'--config.data.data_dir={data_dir}', '--config.data.size=tiny',
           '--config.model.vocab_size=144',
           '--config.train.global_batch_size=8', '--config.train.num_steps=4',
           '--config.train.log_every_steps=1', '--config.checkpoint.every_steps=2',
           '--config.evals.vqa_val.log_steps=2', '--config.evals.vqa_val.batch_size=16',
           '--config.train.max_steps_this_run=2']

  # A first run builds the tiny world into the bucket and stops at step 2; the
  # second resumes there and finishes.
  run(train, cwd, env)
  resumed = run(train, cwd, env)
  assert 'checkpoint: restored step 2 from gs://' in resumed.stderr, resumed.stderr[-3000:]
  assert 'step 4/4 |' in resumed.stderr, resumed.stderr[-3000:]

  stored = stored_objects(emulator, 'runs/vqa/')
  for expected in ('config.json', 'vocab.txt', 'answers.txt', 'metrics.jsonl'):
    assert f'runs/vqa/{expected}' in stored, stored
  assert any(n.startswith('runs/vqa/checkpoints/4/') for n in stored), stored
  assert any(n.startswith('runs/vqa/tensorboard/') for n in stored), stored
  assert any(n.startswith('runs/vqa/predictions/vqa_val_step4') for n in stored), stored
  assert any(n.endswith('.array_record-00000-of-00001') for n in stored_objects(emulator, 'tfds/')
             ) or stored_objects(emulator, 'tfds/vlp_world/'), 'no world tables in the bucket'
  steps = [json.loads(line)['step'] for line in
           read_object(emulator, 'runs/vqa/metrics.jsonl').decode().splitlines()]
  assert sorted(set(steps)) == [1, 2, 3, 4], steps

  evaluated = run(['-m', 'vlpjax.evaluate', config, f'--workdir={workdir}',
                   f'--config.data.data_dir={data_dir}', '--config.data.size=tiny',
                   '--config.model.vocab_size=144',
                   '--config.evals.vqa_val.batch_size=16'], cwd, env)
  result = json.loads(read_object(emulator, 'runs/vqa/eval_step4.json'))
  assert 0 <= result['vqa_val']['accuracy'] <= 1, evaluated.stderr[-2000:]

  # Weight conversion: a transformers checkpoint imported into the bucket, and
  # exported from there to a PyTorch state dict in the bucket.
  torch.manual_seed(0)
  transformers.VisualBertForPreTraining(transformers.VisualBertConfig(
      vocab_size=144, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=128, max_position_embeddings=64, type_vocab_size=2,
      visual_embedding_dim=40)).save_pretrained(tmp_path / 'hf')
  tiny = [f'--config={REPO}/configs/visualbert.py:tiny', '--config.model.vocab_size=144']
  imported, exported = f'gs://{BUCKET}/conv/visualbert', f'gs://{BUCKET}/conv/visualbert.safetensors'
  run(['-m', 'vlpjax.convert', '--from=hf-visualbert', f'--src={tmp_path / "hf"}',
       f'--out={imported}', *tiny], cwd, env)
  run(['-m', 'vlpjax.convert', '--to=torch', f'--src={imported}', f'--out={exported}', *tiny],
      cwd, env)
  stored = stored_objects(emulator, 'conv/')
  assert any(n.startswith('conv/visualbert/') for n in stored), stored
  assert 'conv/visualbert.safetensors' in stored, stored

  # Nothing reached the local disk.
  assert not list(cwd.iterdir()), list(cwd.iterdir())
  assert not [p for p in (tmp_path / 'home').rglob('*') if 'tensorflow_datasets' in str(p)]
