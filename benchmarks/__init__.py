"""GPU benchmarks of pr1_jax (scripts; `python3 -m benchmarks.<name>` or `python3 benchmarks/<name>.py`)."""
