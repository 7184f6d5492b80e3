"""vlpjax: the four classic vision-language fusion designs in JAX/Flax.

`vlpjax.load(workdir)` returns a trained model ready to predict (`vlpjax/loading.py`).
"""


def load(workdir: str, step: int | None = None):
  """See `vlpjax.loading.load`; imported on use, so `import vlpjax` stays light."""
  from vlpjax import loading  # pylint: disable=g-import-not-at-top
  return loading.load(workdir, step)
