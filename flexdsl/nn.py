"""flexdsl as a torch module: ``flexdsl.nn.Attention(spec, **defaults)``.

    >>> import torch, flexdsl.nn
    >>> attn = flexdsl.nn.Attention("score + slope[h] * (kv - q) where q >= kv",
    ...                             slope=torch.nn.Parameter(torch.tensor([0.5, 0.25])))
    >>> [name for name, _ in attn.named_parameters()]
    ['slope']
    >>> q = k = v = torch.randn(1, 2, 5, 8)
    >>> attn(q, k, v).shape
    torch.Size([1, 2, 5, 8])

Tensors given as defaults become module state, so ``.to(device)`` and ``state_dict()`` carry
them: an ``nn.Parameter`` is learned (gradients reach it through the attention), any other
tensor is a buffer. Scalars are compile-time defaults. A call may override any of them.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Union

import torch

from .config import SpecFile, example_tensors, read
from .errors import SpecCallError

class Attention(torch.nn.Module):
    """Attention by a spec, as a module; ``forward(q, k, v, **params_and_tensors)``.

    q is (B, Hq, Sq, D), k and v (B, Hkv, Skv, D), as for :class:`flexdsl.Attention`.
    """

    def __init__(self, spec, *, scale: float | None = None, **defaults):
        super().__init__()
        from .api import compile
        from .bind import check_names
        scalars = {n: v for n, v in defaults.items() if not isinstance(v, torch.Tensor)}
        tensors = {n: v for n, v in defaults.items() if isinstance(v, torch.Tensor)}
        self.attention = compile(spec, **scalars)
        check_names(self.attention.spec, tensors)
        for name, tensor in tensors.items():
            if hasattr(self, name):
                spec_text = self.attention.spec.text
                raise SpecCallError(
                    f"a tensor named '{name}' would hide an attribute of the module",
                    spec=spec_text, span=self.attention.spec.signature.tensors[name].uses[0].span,
                    hint="rename the tensor in the spec")
            if isinstance(tensor, torch.nn.Parameter):
                self.register_parameter(name, tensor)
            else:
                self.register_buffer(name, tensor)
        self.tensor_names = tuple(tensors)
        self.scale = scale

    @classmethod
    def from_config(cls, config: Union[str, os.PathLike, Mapping, SpecFile],
                    key: str | None = None, *, heads: int | None = None, seed: int = 0,
                    **defaults) -> "Attention":
        """A module from a spec file or a config table (see :func:`flexdsl.config.read`).

        The table's parameters are defaults. Its tensor recipes whose sizes depend on neither
        the lengths nor the batch are model state, made once here with ``heads`` and ``seed``:
        ``learnable = true`` makes an ``nn.Parameter``, otherwise a buffer. Other recipes
        describe per-call data (document ids, say), which ``forward`` takes.

        >>> attn = Attention.from_config({
        ...     "spec": "score + slope[h] * (kv - q) where q >= kv",
        ...     "tensors": {"slope": {"kind": "alibi_slopes", "learnable": True}}}, heads=4)
        >>> attn.slope.shape, attn.slope.requires_grad
        (torch.Size([4]), True)
        """
        spec_file = config if isinstance(config, SpecFile) else read(config, key)
        state = [name for name, recipe in spec_file.tensors.items()
                 if not recipe.per_call and name not in defaults]
        made = example_tensors(spec_file, heads=heads, seed=seed, only=state,
                               params={n: v for n, v in defaults.items()
                                       if not isinstance(v, torch.Tensor)})
        for name, tensor in made.items():
            if spec_file.tensors[name].learnable:
                made[name] = torch.nn.Parameter(tensor)
        return cls(spec_file.spec, **{**spec_file.params, **made, **defaults})

    def forward(self, q, k, v, *, scale: float | None = None, return_lse: bool = False,
                **params_and_tensors: Any):
        state = {name: getattr(self, name) for name in self.tensor_names}
        return self.attention(q, k, v, scale=self.scale if scale is None else scale,
                              return_lse=return_lse, **{**state, **params_and_tensors})

    def extra_repr(self) -> str:
        return repr(str(self.attention.spec))
