"""Worked examples that use fastbn: small NumPy networks (``nn``) and the demo that
measures what normalization does (``python -m fastbn demo``, ``demo``)."""
