"""The package version: one definition, read by pyproject.toml (setuptools dynamic version) and by artefacts."""

__version__ = "0.1.0"
