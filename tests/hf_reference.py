"""Helpers for parity tests against transformers' and the authors' PyTorch code."""
import jax.numpy as jnp
import numpy as np
import torch


def unpadded_logits(logits, vocab_size: int) -> np.ndarray:
  """MLM logits [..., V'] over the padded word table -> [..., vocab_size], the
  references' vocabulary, after checking that the padding ids' are masked."""
  logits = np.asarray(logits)
  assert (logits[..., vocab_size:] == jnp.finfo(logits.dtype).min).all()
  return logits[..., :vocab_size]


def perturb_(model: torch.nn.Module) -> torch.nn.Module:
  """Random values everywhere (HF inits LayerNorms to 1/0 and biases to 0,
  which would hide swapped or missing mappings); returns the model in eval mode."""
  torch.manual_seed(0)
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.1 * torch.randn_like(param))
  return model.eval()
