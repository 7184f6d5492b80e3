"""Weight import/export between vlpjax params and published PyTorch checkpoints."""
