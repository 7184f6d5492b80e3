"""Analytic FLOPs against XLA's own count of the compiled forward pass."""
import importlib

import jax
import numpy as np
import pytest

from vlpjax import flops
from vlpjax.data import synthetic
from vlpjax.models import get_design, get_model

TEXT_LEN, REGIONS, PREDICTIONS = 20, 36, 4


def _small_model(design: str):
  """(model config, pretraining model, regions, one example's inputs, abstract
  params) of the design's 'small' size."""
  config = importlib.import_module(f'configs.{design}').model_config('small')
  model = get_model(config)
  regions = REGIONS + (design == 'vilbert')
  batch = synthetic.synthetic_batch(config, 1, TEXT_LEN, regions)
  inputs = {k: batch[k] for k in ('input_ids', 'text_mask', 'region_feats', 'region_loc',
                                  'region_mask')}
  inputs['mlm_positions'] = np.arange(1, PREDICTIONS + 1, dtype=np.int32)[None]
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), **inputs))
  return config, model, regions, inputs, params


@pytest.mark.parametrize('design', ['visualbert', 'vilbert', 'lxmert', 'uniter'])
def test_analytic_forward_flops_match_xla(design):
  config, model, regions, inputs, params = _small_model(design)
  counted = jax.jit(lambda p: model.apply(p, **inputs)).lower(params).compile(
      ).cost_analysis()['flops']
  analytic = flops.forward_flops(config, TEXT_LEN, regions, PREDICTIONS)
  # XLA also counts element-wise work (softmax, GELU, LayerNorm), which the
  # analytic count leaves out by convention: a few percent at these widths.
  assert analytic <= counted <= 1.15 * analytic, (analytic, counted)


# Each loss component's model output (what a step with only that loss reads).
OUTPUTS = {'mlm': 'mlm_logits', 'itm': 'itm_logits', 'mrfr': 'mrfr_pred', 'mrc': 'mrc_logits',
           'mrckl': 'mrc_logits', 'matched': 'matched_logits', 'obj': 'obj_logits',
           'attr': 'attr_logits', 'feat': 'feat_pred', 'qa': 'qa_logits',
           'region_kl': 'region_logits', 'alignment': 'alignment_logits',
           'sentence_image': 'sentence_image_logits'}


@pytest.mark.parametrize('design', ['visualbert', 'vilbert', 'lxmert', 'uniter'])
def test_flops_count_only_the_heads_a_step_uses(design):
  """A step of one loss reads one head's output; XLA drops the other heads, and
  the analytic count for that component follows. (Both streams' outputs are
  read too: a two-stream design's MLM alone would let XLA drop the last
  vision FFN, which no summed step does.)"""
  config, model, regions, inputs, params = _small_model(design)
  backbone = flops.forward_flops(config, TEXT_LEN, regions, PREDICTIONS, components=())
  everything = flops.forward_flops(config, TEXT_LEN, regions, PREDICTIONS)
  heads = 0.0
  for component in get_design(design).recipe.components:
    def read(p, key=OUTPUTS[component]):
      outputs = model.apply(p, **inputs)
      return outputs[key].sum() + outputs['text'].sum() + outputs['vision'].sum()
    counted = jax.jit(read).lower(params).compile().cost_analysis()['flops']
    analytic = flops.forward_flops(config, TEXT_LEN, regions, PREDICTIONS, (component,))
    assert backbone < analytic <= counted <= 1.15 * analytic, (component, analytic, counted)
    heads += analytic - backbone
  # Heads that share a transform (LXMERT's region heads, UNITER's MRC twice) count once.
  assert everything - backbone <= heads


def test_mfu_and_peaks():
  assert flops.peak_flops('cpu') is None
  assert flops.peak_flops('TPU v5 lite') == 197e12
  assert flops.mfu(1e12, 1.0, 'NVIDIA H100 80GB HBM3', 2) == pytest.approx(1e12 / (2 * 989e12))
  # An fp32 run is measured against the fp32 (TF32) peak, not the bf16 one.
  assert flops.mfu(1e12, 1.0, 'NVIDIA H100 80GB HBM3', 1, 'float32') == pytest.approx(
      1e12 / 494e12)
  assert flops.peak_flops('TPU v4', 'float32') == flops.peak_flops('TPU v4')
  assert flops.peak_flops('NVIDIA A100-SXM4-40GB', 'float16') == 312e12
  with pytest.raises(ValueError, match='int8'):
    flops.peak_flops('TPU v4', 'int8')
  assert flops.mfu(1e12, 1.0, 'cpu', 1) is None
