"""flexdsl: attention variants written as one line of text, lowered to fused kernels.

>>> import flexdsl
>>> attn = flexdsl.compile("score + slope[h] * (kv - q) where q >= kv")
>>> sorted(attn.spec.signature.tensors)
['slope']
"""
from .api import Attention, KernelOptions, check, compile, load, parse
from .errors import SpecCallError, SpecError, SpecSyntaxError, SpecTypeError
from .ir import unparse

__all__ = ["Attention", "KernelOptions", "SpecCallError", "SpecError", "SpecSyntaxError", "SpecTypeError",
           "check", "compile", "load", "parse", "unparse"]
__version__ = "0.1.0"
