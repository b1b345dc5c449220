"""Fedplane: a multi-cluster federation control plane for batch and AI jobs."""

__version__ = "0.1.0"
