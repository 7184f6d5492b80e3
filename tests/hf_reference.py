"""Helpers for parity tests against transformers' PyTorch classes."""
import torch


def perturb_(model: torch.nn.Module) -> torch.nn.Module:
  """Random values everywhere (HF inits LayerNorms to 1/0 and biases to 0,
  which would hide swapped or missing mappings); returns the model in eval mode."""
  torch.manual_seed(0)
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.1 * torch.randn_like(param))
  return model.eval()
