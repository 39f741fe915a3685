"""Run a converted model layer by layer: `from runtime import LayeredModel`."""

from .model import LayeredModel

__all__ = ["LayeredModel"]
