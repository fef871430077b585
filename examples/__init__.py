"""Runnable examples: ``python -m examples.server``, ``examples.mixed_gpu_cpu``,
``examples.json_logs``."""
