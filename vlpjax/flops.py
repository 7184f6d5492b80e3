"""Analytic model FLOPs of a pretraining step, and the MFU they imply.

Counts the matrix multiplications of the forward pass (2 FLOPs per
multiply-add), attention scores and context included, for the backbone and the
pretraining heads a step's losses use (XLA drops the others: UNITER's MLM step
pays for no ITM or region head); a training step is 3x the forward (backward =
2x forward), as in MaxText and the PaLM paper's MFU. Element-wise work (softmax,
GELU, LayerNorm) is left out, as is conventional.
"""
from __future__ import annotations

from typing import Collection

import ml_collections


def _peaks(half: float, single: float) -> dict[str, float]:
  """Peaks by compute dtype: 16-bit `half`, float32 `single`."""
  return dict(bfloat16=half, float16=half, float32=single)


# Dense peak FLOP/s per chip, by `jax.Device.device_kind` prefix and compute
# dtype. float32 is what XLA's default matmul precision gives it: one bf16 pass
# on TPU (the bf16 peak), TF32 tensor cores on NVIDIA (half the bf16 rate).
PEAK_FLOPS = {
    'TPU v4': _peaks(275e12, 275e12),
    'TPU v5 lite': _peaks(197e12, 197e12),
    'TPU v5e': _peaks(197e12, 197e12),
    'TPU v5p': _peaks(459e12, 459e12),
    'TPU v5': _peaks(459e12, 459e12),
    'TPU v6 lite': _peaks(918e12, 918e12),
    'TPU v6e': _peaks(918e12, 918e12),
    'NVIDIA H200': _peaks(989e12, 494e12),
    'NVIDIA H100': _peaks(989e12, 494e12),
    'NVIDIA A100': _peaks(312e12, 156e12),
    'NVIDIA L4': _peaks(121e12, 60e12),
}


def peak_flops(device_kind: str, dtype: str = 'bfloat16') -> float | None:
  """Peak FLOP/s of one device in compute dtype `dtype` (`config_lib.DTYPES`),
  or None where unknown (e.g. CPU)."""
  for prefix, peaks in PEAK_FLOPS.items():
    if device_kind.startswith(prefix):
      if dtype not in peaks:
        raise ValueError(f'no peak FLOP/s for dtype {dtype!r} (have {sorted(peaks)})')
      return peaks[dtype]
  return None


def dense(tokens: int, d_in: int, d_out: int) -> float:
  """A Dense layer over `tokens` positions."""
  return 2.0 * tokens * d_in * d_out


def attention_core(queries: int, keys: int, width: int) -> float:
  """Scores (Q K^T) and context (P V)."""
  return 2 * dense(queries, width, keys)


def bert_layer(tokens: int, hidden: int, ffn: int) -> float:
  """A BERT layer: Q, K, V, output projections, attention core, FFN."""
  return (4 * dense(tokens, hidden, hidden) + attention_core(tokens, tokens, hidden)
          + 2 * dense(tokens, hidden, ffn))


def cross_attention(queries: int, q_width: int, keys: int, k_width: int,
                    inner: int, out_width: int) -> float:
  """Attention of `queries` over `keys` of another stream."""
  return (dense(queries, q_width, inner) + 2 * dense(keys, k_width, inner)
          + attention_core(queries, keys, inner) + dense(queries, inner, out_width))


def uses(components: Collection[str] | None, *names: str) -> bool:
  """Whether the loss `components` (None: all) include any of `names`: the
  designs' FLOP formulas count a head only then."""
  return components is None or any(name in components for name in names)


def mlm_head(predictions: int, hidden: int, vocab: int) -> float:
  """The MLM transform and the tied decoder (`vocab` rows: the padded table) at
  the gathered positions."""
  return dense(predictions, hidden, hidden) + dense(predictions, hidden, vocab)


def pooler_and_matching(hidden: int) -> float:
  """The pooler and a 2-way matching head on one pooled vector."""
  return dense(1, hidden, hidden) + dense(1, hidden, 2)


def forward_flops(model: ml_collections.ConfigDict, text_len: int, regions: int,
                  mlm_predictions: int, components: Collection[str] | None = None) -> float:
  """Forward FLOPs for one example of the design's pretraining module with the
  heads of the loss `components` (None: all), the design's own formula
  (`Design.forward_flops`)."""
  from vlpjax.models import design  # pylint: disable=g-import-not-at-top
  return design.get_design(model.name).forward_flops(model, text_len, regions,
                                                      mlm_predictions, components)


def model_flops_per_example(model: ml_collections.ConfigDict, text_len: int,
                            regions: int, mlm_predictions: int | None = None,
                            components: Collection[str] | None = None) -> float:
  """Forward + backward model FLOPs of one example in a pretraining step whose
  losses are `components` (None: every head).

  `mlm_predictions` (gathered MLM slots) defaults to 15% of the text, rounded up.
  """
  if mlm_predictions is None:
    mlm_predictions = -(-3 * text_len // 20)
  return 3.0 * forward_flops(model, text_len, regions, mlm_predictions, components)


def mfu(flops_per_step: float, seconds_per_step: float, device_kind: str,
        num_devices: int, dtype: str = 'bfloat16') -> float | None:
  """Model FLOPs utilisation: achieved / (the `dtype` peak per device x
  devices); None on CPU."""
  peak = peak_flops(device_kind, dtype)
  if peak is None or seconds_per_step <= 0:
    return None
  return flops_per_step / seconds_per_step / (peak * num_devices)
