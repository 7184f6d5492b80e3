"""Test-wide setup: 8 virtual CPU devices so mesh tests can run anywhere.

Set before any test module touches a jax backend; single-device tests simply
use the first device.
"""
import jax

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_platforms', 'cpu')
