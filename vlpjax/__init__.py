"""vlpjax: the four classic vision-language fusion designs in JAX/Flax."""
