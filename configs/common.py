"""Defaults shared by every design's config: model dtype/attention fields.

The design configs (`configs/<design>.py`) build on these.
"""
import ml_collections


def model_defaults() -> ml_collections.ConfigDict:
  """Fields every design's model config has."""
  return ml_collections.ConfigDict(dict(
      dtype='float32',            # compute dtype; 'bfloat16' on accelerators
      param_dtype='float32',      # master weights stay fp32
      attention_impl='auto',      # 'xla', 'cudnn' or 'auto' (cuDNN on GPU for bf16/fp16)
      dropout_rate=0.1,
      attention_dropout_rate=0.1,  # >0 in training takes the explicit attention path
      remat=False,                # nn.remat per layer
  ))


def make_config(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The full run config around a design's model config (train/data fields to come)."""
  return ml_collections.ConfigDict(dict(model=model))
