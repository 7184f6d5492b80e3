"""`python -m vlpjax.convert`: checkpoints -> orbax params -> PyTorch state dicts."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from configs import uniter as uniter_config
from configs import vilbert as vilbert_config
from vlpjax import checkpointing
from vlpjax import convert
from vlpjax.checkpoints import original

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, 'tests', 'data', 'reference')


def _fixture_weights(name):
  with np.load(os.path.join(REFERENCE, f'{name}_tiny.npz'), allow_pickle=False) as data:
    return {k[len('param/'):]: data[k] for k in data.files if k.startswith('param/')}


def _save_torch(weights, path):
  torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, path)
  return str(path)


def _cli(*args, cwd=ROOT):
  """`python -m vlpjax.convert ARGS` run in `cwd` (with only the installed package
  importable when that is outside the checkout)."""
  return subprocess.run(
      [sys.executable, '-m', 'vlpjax.convert', *args], cwd=cwd, capture_output=True,
      text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'), check=False)


def _run_cli(*args, cwd=ROOT):
  result = _cli(*args, cwd=cwd)
  assert result.returncode == 0, result.stderr[-3000:]


def _fails_with(message, *args, cwd=ROOT):
  result = _cli(*args, cwd=cwd)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr[-3000:]
  return result


def _assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_cli_uniter_to_orbax_and_back(tmp_path):
  """The original .pt -> orbax (restores to the same params) -> .safetensors
  (the original state dict again, tied copies included, bit for bit)."""
  weights = _fixture_weights('uniter')
  src = _save_torch(weights, tmp_path / 'uniter_tiny.pt')
  config_arg = f'--config={ROOT}/configs/uniter.py:tiny'
  _run_cli('--from=uniter', f'--src={src}', f'--out={tmp_path}/orbax', config_arg)
  config = uniter_config.model_config('tiny')
  restored = checkpointing.restore_params(str(tmp_path / 'orbax'),
                                          convert.abstract_params(config, True))
  expected = original.import_uniter(config, src, convert.abstract_params(config, True))
  _assert_trees_equal(jax.device_get(restored), expected)

  _run_cli('--to=torch', f'--src={tmp_path}/orbax', f'--out={tmp_path}/back.safetensors',
           config_arg)
  exported = load_file(str(tmp_path / 'back.safetensors'))
  assert sorted(exported) == sorted(weights)
  for key, value in weights.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_vilbert_backbone_only(tmp_path):
  """--target=backbone keeps the backbone of a pretraining .bin; the export is
  the bare BertModel state dict (q_dense left out)."""
  weights = _fixture_weights('vilbert')
  src = _save_torch(weights, tmp_path / 'pytorch_model.bin')
  config = vilbert_config.model_config('tiny')
  params = convert.import_checkpoint(config, 'vilbert', src, pretraining=False)
  convert.save_params(params, str(tmp_path / 'orbax'))
  assert 'backbone' not in checkpointing.stored_top_level_keys(str(tmp_path / 'orbax'))
  written = convert.export_to_torch(config, str(tmp_path / 'orbax'), str(tmp_path / 'torch'))
  assert written == str(tmp_path / 'torch' / 'model.safetensors')
  exported = load_file(written)
  expected = {k[len('bert.'):]: v for k, v in weights.items()
              if k.startswith('bert.') and 'q_dense' not in k}
  assert sorted(exported) == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_bert_source_fills_the_text_side(tmp_path):
  config = uniter_config.model_config('tiny')
  bert = transformers.BertModel(transformers.BertConfig(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size,
      num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
      intermediate_size=config.intermediate_size,
      max_position_embeddings=config.max_position_embeddings))
  bert.save_pretrained(tmp_path / 'bert')
  state = {k: v.numpy() for k, v in bert.state_dict().items()}
  params = convert.import_checkpoint(config, 'bert', str(tmp_path / 'bert'), seed=3)
  backbone = params['backbone']
  table = backbone['embeddings']['word_embeddings']['embedding']
  np.testing.assert_array_equal(table[:config.vocab_size], state['embeddings.word_embeddings.weight'])
  np.testing.assert_array_equal(table[config.vocab_size:], 0.0)  # the padding rows
  np.testing.assert_array_equal(backbone['layer_1']['ffn']['output']['kernel'],
                                state['encoder.layer.1.output.dense.weight'].T)
  np.testing.assert_array_equal(backbone['pooler']['dense']['bias'], state['pooler.dense.bias'])
  # The rest is freshly initialised (N(0, 0.02) kernels, LayerNorm 1/0).
  regions = backbone['region_embeddings']
  assert 0.015 < np.std(regions['feature_projection']['kernel']) < 0.025
  np.testing.assert_array_equal(regions['norm']['scale'], 1.0)


def test_hf_source(tmp_path):
  """--from=hf-visualbert goes through hf.import_hf into the backbone."""
  from configs import visualbert as visualbert_config  # pylint: disable=import-outside-toplevel
  config = visualbert_config.model_config('tiny')
  hf_model = transformers.VisualBertModel(transformers.VisualBertConfig(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size,
      num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads,
      intermediate_size=config.intermediate_size,
      max_position_embeddings=config.max_position_embeddings,
      visual_embedding_dim=config.feature_dim))
  hf_model.save_pretrained(tmp_path / 'hf')
  params = convert.import_checkpoint(config, 'hf-visualbert', str(tmp_path / 'hf'),
                                     pretraining=False)
  np.testing.assert_array_equal(
      params['embeddings']['word_embeddings']['embedding'][:config.vocab_size],
      hf_model.embeddings.word_embeddings.weight.detach().numpy())


def test_errors(tmp_path):
  config = uniter_config.model_config('tiny')
  with pytest.raises(ValueError, match='--from=vilbert loads into vilbert, but the config '
                     'is uniter'):
    convert.import_checkpoint(config, 'vilbert', 'unused.bin')
  with pytest.raises(ValueError, match='--from must be one of'):
    convert.import_checkpoint(config, 'detectron', 'unused.pkl')
  (tmp_path / 'taken').mkdir()
  with pytest.raises(FileExistsError, match='exists'):
    convert.save_params({'w': np.zeros(2)}, str(tmp_path / 'taken'))


@pytest.mark.parametrize('nesting', ['training_checkpoint', 'data_parallel'])
def test_cli_reads_training_checkpoints_from_another_directory(tmp_path, nesting):
  """A .pt that nests the state dict ({'model': sd, 'epoch': 3}, or 'state_dict'
  with DataParallel's 'module.' keys), converted from outside the checkout with
  relative paths; then exported back from the relative orbax directory."""
  weights = _fixture_weights('uniter')
  tensors = {k: torch.from_numpy(v) for k, v in weights.items()}
  saved = ({'model': tensors, 'epoch': 3, 'optimizer': {'state': {}, 'lr': 1e-4}}
           if nesting == 'training_checkpoint'
           else {'state_dict': {f'module.{k}': v for k, v in tensors.items()}, 'step': 7})
  (tmp_path / 'ckpt').mkdir()
  torch.save(saved, tmp_path / 'ckpt' / 'train_state.pt')
  config_arg = f'--config={ROOT}/configs/uniter.py:tiny'
  _run_cli('--from=uniter', '--src=ckpt/train_state.pt', '--out=conv/uniter_tiny', config_arg,
           cwd=tmp_path)
  config = uniter_config.model_config('tiny')
  abstract = convert.abstract_params(config, True)
  _assert_trees_equal(
      jax.device_get(checkpointing.restore_params(tmp_path / 'conv' / 'uniter_tiny', abstract)),
      original.import_uniter(config, weights, abstract))
  _run_cli('--to=torch', '--src=conv/uniter_tiny', '--out=back', config_arg, cwd=tmp_path)
  exported = load_file(str(tmp_path / 'back' / 'model.safetensors'))
  assert sorted(exported) == sorted(weights)


def test_cli_errors_name_the_cause(tmp_path):
  config_arg = f'--config={ROOT}/configs/uniter.py:tiny'
  vilbert = _save_torch(_fixture_weights('vilbert'), tmp_path / 'pytorch_model.bin')
  result = _fails_with("has no 'uniter.' keys", '--from=uniter', f'--src={vilbert}',
                       f'--out={tmp_path}/out', config_arg)
  assert "another model's file (check --from and --src)" in result.stderr
  assert '--target=backbone' in result.stderr

  (tmp_path / 'broken.safetensors').write_bytes(b'not a safetensors file')
  _fails_with(f'{tmp_path}/broken.safetensors: cannot read it as a .safetensors weight file',
              '--from=uniter', f'--src={tmp_path}/broken.safetensors',
              f'--out={tmp_path}/out', config_arg)
  (tmp_path / 'broken.pt').write_bytes(b'not a pickle')
  _fails_with(f'{tmp_path}/broken.pt: cannot read it as a .pt weight file', '--from=uniter',
              f'--src={tmp_path}/broken.pt', f'--out={tmp_path}/out', config_arg)
  torch.save({'epoch': 3, 'optimizer': {'lr': torch.ones(())}}, tmp_path / 'no_weights.pt')
  _fails_with(f"{tmp_path}/no_weights.pt holds no state dict: its entries {{'epoch': 'int', "
              "'optimizer': 'dict'}", '--from=uniter', f'--src={tmp_path}/no_weights.pt',
              f'--out={tmp_path}/out', config_arg)

  # An existing --out fails before --src is read (here: before finding it missing).
  (tmp_path / 'taken').mkdir()
  _fails_with(f'--out=taken exists ({tmp_path}/taken)', '--from=uniter',
              '--src=missing.pt', '--out=taken', config_arg, cwd=tmp_path)
  _fails_with(f'missing.pt: not found ({tmp_path}/missing.pt)', '--from=bert', '--src=missing.pt',
              '--out=new', config_arg, cwd=tmp_path)

  # orbax directories: missing, or a training workdir rather than params.
  _fails_with(f'params checkpoint missing: not found ({tmp_path}/missing)', '--to=torch',
              '--src=missing', '--out=back.safetensors', config_arg, cwd=tmp_path)
  (tmp_path / 'workdir' / 'checkpoints' / '2').mkdir(parents=True)
  _fails_with('it looks like a vlpjax workdir (it has checkpoints/)', '--to=torch',
              '--src=workdir', '--out=back.safetensors', config_arg, cwd=tmp_path)


@pytest.mark.parametrize('override, message', [
    ('--config.train.nope=1', "--config.train.nope: config.train has no field 'nope'"),
    ('--config.model.param_dtype=float13', 'config.model.param_dtype must be one of'),
    ('--config.mesh.shape=(2,a,1)', "config.mesh.shape: could not parse '(2,a,1)'"),
])
def test_cli_config_errors_are_one_line(tmp_path, override, message):
  result = _fails_with(message, '--from=uniter', f'--src={tmp_path}/unused.pt',
                       f'--out={tmp_path}/out', f'--config={ROOT}/configs/uniter.py:tiny',
                       override)
  assert 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith('FATAL Flags parsing error: ')
