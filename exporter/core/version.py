"""The installed edge-export version, written into every output's provenance and every stage key that
depends on our own code."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edge-export")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
