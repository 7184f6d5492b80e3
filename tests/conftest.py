"""Test-wide setup: 8 virtual CPU devices so mesh tests can run anywhere, and
the fixtures many modules use (`compile_cache`, the tiny world's `data_dir` and
`data_config`).

The devices are set before any test module touches a jax backend; single-device
tests simply use the first device.
"""
import jax
from jax.experimental.compilation_cache import compilation_cache
import pytest

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_platforms', 'cpu')


@pytest.fixture(scope='module')
def compile_cache(tmp_path_factory):
  """A persistent compilation cache for one module (restored afterwards), shared
  with the training subprocesses it starts; use with
  `pytestmark = pytest.mark.usefixtures('compile_cache')`."""
  previous = (jax.config.jax_compilation_cache_dir,
              jax.config.jax_persistent_cache_min_compile_time_secs)
  compilation_cache.reset_cache()
  compilation_cache.set_cache_dir(str(tmp_path_factory.getbasetemp() / 'jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  yield
  compilation_cache.reset_cache()
  jax.config.update('jax_compilation_cache_dir', previous[0])
  jax.config.update('jax_persistent_cache_min_compile_time_secs', previous[1])


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """A temporary data_dir with the embedded tiny world's tables, built once for the module."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from vlpjax.data import input_pipeline, tables  # pylint: disable=g-import-not-at-top
  directory = str(tmp_path_factory.mktemp('tfds'))
  tables.dataset_info(ml_collections.ConfigDict(dict(
      input_pipeline.default_data_config(), size='tiny', data_dir=directory)))
  return directory


@pytest.fixture(scope='module')
def data_config(tmp_path_factory):
  """The embedded tiny world's data config (all its regions, no prefetching), its
  tables built once for the module in a temporary data_dir."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from vlpjax.data import input_pipeline, tables, vlp_world  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(dict(
      input_pipeline.default_data_config(), size='tiny',
      data_dir=str(tmp_path_factory.mktemp('tfds')),
      max_regions=vlp_world.WORLD_SIZES['tiny'].num_regions, prefetch_batches=0))
  tables.dataset_info(config)  # builds the tables
  return config
