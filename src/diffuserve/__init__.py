"""diffuserve: an OpenAI-compatible server for text-to-image diffusion models."""

__version__ = "0.1.0"
