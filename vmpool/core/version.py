"""The installed package's version (for --version and vmpool_build_info)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    try:
        return version("vmpool")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"
