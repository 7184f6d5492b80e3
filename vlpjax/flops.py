"""Analytic model FLOPs of a pretraining step, and the MFU they imply.

Counts the matrix multiplications of the forward pass (2 FLOPs per
multiply-add), attention scores and context included, for the backbone and the
pretraining heads the design computes; a training step is 3x the forward
(backward = 2x forward), as in MaxText and the PaLM paper's MFU. Element-wise
work (softmax, GELU, LayerNorm) is left out, as is conventional.
"""
from __future__ import annotations

import ml_collections

# Dense bf16 peak FLOP/s per chip, by `jax.Device.device_kind` prefix.
PEAK_FLOPS = {
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v5': 459e12,
    'TPU v6 lite': 918e12,
    'TPU v6e': 918e12,
    'NVIDIA H200': 989e12,
    'NVIDIA H100': 989e12,
    'NVIDIA A100': 312e12,
    'NVIDIA L4': 121e12,
}


def peak_flops(device_kind: str) -> float | None:
  """Peak bf16 FLOP/s of one device, or None where unknown (e.g. CPU)."""
  for prefix, peak in PEAK_FLOPS.items():
    if device_kind.startswith(prefix):
      return peak
  return None


def _dense(tokens: int, d_in: int, d_out: int) -> float:
  return 2.0 * tokens * d_in * d_out


def _attention_core(queries: int, keys: int, width: int) -> float:
  """Scores (Q K^T) and context (P V)."""
  return 2 * _dense(queries, width, keys)


def _bert_layer(tokens: int, hidden: int, ffn: int) -> float:
  return (4 * _dense(tokens, hidden, hidden) + _attention_core(tokens, tokens, hidden)
          + 2 * _dense(tokens, hidden, ffn))


def _cross_attention(queries: int, q_width: int, keys: int, k_width: int,
                     inner: int, out_width: int) -> float:
  return (_dense(queries, q_width, inner) + 2 * _dense(keys, k_width, inner)
          + _attention_core(queries, keys, inner) + _dense(queries, inner, out_width))


def _mlm_head(predictions: int, hidden: int, vocab: int) -> float:
  return _dense(predictions, hidden, hidden) + _dense(predictions, hidden, vocab)


def forward_flops(model: ml_collections.ConfigDict, text_len: int, regions: int,
                  mlm_predictions: int) -> float:
  """Forward FLOPs for one example of the design's pretraining module."""
  t, r, p = text_len, regions, mlm_predictions
  h, ffn, vocab, feat = (model.hidden_size, model.intermediate_size, model.vocab_size,
                         model.feature_dim)
  heads = _mlm_head(p, h, vocab) + _dense(1, h, h) + _dense(1, h, 2)  # + pooler, matching
  if model.name == 'visualbert':
    return _dense(r, feat, h) + model.num_layers * _bert_layer(t + r, h, ffn) + heads
  if model.name == 'uniter':
    region_heads = (2 * _dense(r, h, h) + _dense(r, h, feat)
                    + _dense(r, h, model.num_region_classes))
    return (_dense(r, feat, h) + _dense(r, 7, h)
            + model.num_layers * _bert_layer(t + r, h, ffn) + heads + region_heads)
  if model.name == 'lxmert':
    cross = (_cross_attention(t, h, r, h, h, h) + _cross_attention(r, h, t, h, h, h)
             + _bert_layer(t, h, ffn) + _bert_layer(r, h, ffn))
    region_heads = _dense(r, h, h) + _dense(
        r, h, model.num_object_labels + model.num_attr_labels + feat)
    qa = _dense(1, h, 2 * h) + _dense(1, 2 * h, model.num_answers)
    return (_dense(r, feat, h) + _dense(r, 4, h)
            + model.num_language_layers * _bert_layer(t, h, ffn)
            + model.num_relation_layers * _bert_layer(r, h, ffn)
            + model.num_cross_layers * cross + heads + region_heads + qa)
  if model.name == 'vilbert':
    hv, bi = model.v_hidden_size, model.bi_hidden_size
    co_layer = (_cross_attention(t, h, r, hv, bi, h) + _cross_attention(r, hv, t, h, bi, hv)
                + 2 * _dense(t, h, ffn) + 2 * _dense(r, hv, model.v_intermediate_size))
    region_heads = _dense(r, hv, hv) + _dense(r, hv, model.num_region_classes)
    poolers = _dense(1, h, bi) + _dense(1, hv, bi) + _dense(1, bi, 2)
    return (_dense(r, feat, hv) + _dense(r, 5, hv)
            + model.num_layers * _bert_layer(t, h, ffn)
            + model.v_num_layers * _bert_layer(r, hv, model.v_intermediate_size)
            + len(model.v_biattention_id) * co_layer
            + _mlm_head(p, h, vocab) + region_heads + poolers)
  raise ValueError(f'no FLOPs formula for model {model.name!r}')


def model_flops_per_example(model: ml_collections.ConfigDict, text_len: int,
                            regions: int, mlm_predictions: int | None = None) -> float:
  """Forward + backward model FLOPs of one example in a pretraining step.

  `mlm_predictions` (gathered MLM slots) defaults to 15% of the text, rounded up.
  """
  if mlm_predictions is None:
    mlm_predictions = -(-3 * text_len // 20)
  return 3.0 * forward_flops(model, text_len, regions, mlm_predictions)


def mfu(flops_per_step: float, seconds_per_step: float, device_kind: str,
        num_devices: int) -> float | None:
  """Model FLOPs utilisation: achieved / (peak per device x devices); None on CPU."""
  peak = peak_flops(device_kind)
  if peak is None or seconds_per_step <= 0:
    return None
  return flops_per_step / seconds_per_step / (peak * num_devices)
