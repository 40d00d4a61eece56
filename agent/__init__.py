"""Hearth's node agent: config, hardware, profiles, models, serving, mesh, API and CLI."""

__version__ = "0.1.0"
