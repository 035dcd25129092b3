"""IR -> Triton: expression lowering and kernel rendering."""
from .render import KernelSource, render

__all__ = ["KernelSource", "render"]
