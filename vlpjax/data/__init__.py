"""Data: the embedded vision-language world, real-format builders and the input pipeline."""
