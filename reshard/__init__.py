"""Rewrite a Hugging Face checkpoint as one safetensors file per layer group, for streaming."""

__version__ = "0.1.0"
