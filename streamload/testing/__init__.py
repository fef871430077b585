"""Testing aids for code that loads models with streamload, on machines without GPUs.

Like ``httpx.MockTransport`` or ``structlog.testing``: public, documented, stable.
"""
