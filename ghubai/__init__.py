"""GhubAi: many local inference machines served as one OpenAI-compatible API."""

__version__ = "0.1.0"
