"""The version agents report in heartbeats and benchmarks record beside their figures."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedplane-common")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
