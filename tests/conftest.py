"""Test-wide setup: 8 virtual CPU devices so mesh tests can run anywhere.

Set before any test module touches a jax backend; single-device tests simply
use the first device.
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
