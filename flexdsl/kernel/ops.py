"""flexdsl attention as a torch.library custom op, with autograd.

Being a custom op lets a ``torch.compile(fullgraph=True)`` model call flexdsl without a graph
break: the compiler sees one opaque op with known output shapes. A compiled spec is found
through a string key, since ops take no Python objects.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..analysis.plan import MaskAnalysis
from . import launch
from .compile import CompiledSpec


@dataclass
class Entry:
    """What the op needs to run one spec: its kernels, analysis and argument conventions."""
    kernels: CompiledSpec
    analysis: MaskAnalysis
    params: tuple[str, ...]          # the order of the op's ``params`` list
    int_params: frozenset[str]
    tensors: tuple[str, ...]         # the order of the op's ``tensors`` list
    configs: Optional[launch.Configs] = None   # overrides of the default tiles, per pass
    _settings: dict = field(default_factory=dict, init=False, repr=False)
    _prepared: dict = field(default_factory=dict, init=False, repr=False)

    @property
    def gradient_tensors(self) -> tuple[str, ...]:
        return self.kernels.source.gradient_tensors

    def settings(self, q) -> launch.Settings:
        """The launch settings for q's head dim, dtype and device, worked out once."""
        key = (q.shape[3], q.dtype, q.device)
        found = self._settings.get(key)
        if found is None:
            found = self._settings[key] = launch.settings(
                self.kernels, q.shape[3], q.dtype, q.device, self.configs)
        return found

    def prepared(self, q, k, v, scale: float, params) -> launch.Prepared:
        """The launches for this call's geometry, worked out on its first call. ``params``
        are floats in signature order (ints among them become ints here)."""
        key = (q.shape, q.stride(), k.shape, k.stride(), v.stride(), q.dtype, q.device, scale,
               *params)
        found = self._prepared.get(key)
        if found is None:
            values = tuple(int(value) if name in self.int_params else value
                           for name, value in zip(self.params, params))
            found = launch.Prepared(self.kernels, self.analysis, self.settings(q), q, k, v,
                                    scale, values)
            if len(self._prepared) > 64:
                self._prepared.clear()
            self._prepared[key] = found
        return found

    def forward(self, q, k, v, scale: float, params, tensors):
        """(out, lse)."""
        return launch.forward(self.prepared(q, k, v, scale, params), q, k, v, tensors)

    def backward(self, prepared: launch.Prepared, q, k, v, out, lse, grad_out, grad_lse,
                 tensors, tensor_grads: bool = True):
        """dq, dk, dv and the gradients of ``gradient_tensors``, in their tensors' dtypes
        (None unless ``tensor_grads``)."""
        dq, dk, dv, grads = launch.backward(prepared, q, k, v, out, lse, grad_out, tensors,
                                            grad_lse=grad_lse, tensor_grads=tensor_grads)
        if not grads:
            return dq, dk, dv, [None] * len(self.gradient_tensors)
        by_name = dict(zip(self.tensors, tensors))
        return dq, dk, dv, [grads[name].to(by_name[name].dtype) if name in grads else None
                            for name in self.gradient_tensors]


registry: dict[str, Entry] = {}


@torch.library.custom_op("flexdsl::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensors: list[torch.Tensor],
              params: list[float], key: str, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return registry[key].forward(q, k, v, scale, params, tensors)


@attention.register_fake
def _(q, k, v, tensors, params, key, scale):
    batch, heads, q_len, head_dim = q.shape
    return (q.new_empty(batch, heads, q_len, head_dim),
            q.new_empty(batch, heads, q_len, dtype=torch.float32))


@torch.library.custom_op("flexdsl::attention_backward", mutates_args=())
def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, grad_out: torch.Tensor,
                       grad_lse: Optional[torch.Tensor], tensors: list[torch.Tensor],
                       params: list[float], key: str, scale: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    entry = registry[key]
    return entry.backward(entry.prepared(q, k, v, scale, params), q, k, v, out, lse, grad_out,
                          grad_lse, tensors)


@attention_backward.register_fake
def _(q, k, v, out, lse, grad_out, grad_lse, tensors, params, key, scale):
    entry = registry[key]
    by_name = dict(zip(entry.tensors, tensors))
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            [torch.empty_like(by_name[name]) for name in entry.gradient_tensors])


def _setup_context(ctx, inputs, output):
    q, k, v, tensors, params, key, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *tensors)
    ctx.params, ctx.key, ctx.scale = params, key, scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, *tensors = ctx.saved_tensors
    dq, dk, dv, grads = attention_backward(q, k, v, out, lse, grad_out, grad_lse, tensors,
                                           ctx.params, ctx.key, ctx.scale)
    entry = registry[ctx.key]
    by_name = dict(zip(entry.gradient_tensors, grads))
    # A gradient the kernels computed goes back whatever the saved tensor says of
    # requires_grad (under torch.compile saved tensors need not say it).
    tensor_grads = [by_name[name] if name in by_name else
                    _gradient_or_zeros(None, t, t.requires_grad)
                    for name, t in zip(entry.tensors, tensors)]
    # A list of numbers takes None as its gradient; an empty list counts as a list of tensors.
    params_grad = None if ctx.params else []
    return dq, dk, dv, tensor_grads, params_grad, None, None


torch.library.register_autograd("flexdsl::attention", _backward, setup_context=_setup_context)


def _gradient_or_zeros(gradient, tensor, needed: bool):
    """A tensor's gradient, or zeros for a float tensor that needs one but that the score
    uses only through steps (ceil, a comparison), as a gradient that is 0 everywhere."""
    if not needed:
        return None
    if gradient is None and tensor.is_floating_point():
        return torch.zeros_like(tensor)
    return gradient


class _EagerAttention(torch.autograd.Function):
    """The same forward and backward as the custom op, for eager calls: the op's dispatcher
    and argument flattening cost more than a short kernel takes."""

    @staticmethod
    def forward(ctx, q, k, v, entry: Entry, prepared: launch.Prepared, *tensors):
        out, lse = launch.forward(prepared, q, k, v, tensors)
        # An unused output's gradient comes as None, not as zeros to allocate, fill and read.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, out, lse, *tensors)
        ctx.entry, ctx.prepared = entry, prepared
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        if not torch.is_grad_enabled():
            return _EagerAttention._gradients(ctx, grad_out, grad_lse)
        # create_graph=True: a second derivative may come.
        with torch.no_grad():
            grads = _EagerAttention._gradients(ctx, grad_out, grad_lse)
        return _without_second_derivative(grads, [t for t in ctx.saved_tensors
                                                  if t.requires_grad])

    @staticmethod
    def _gradients(ctx, grad_out, grad_lse):
        q, k, v, out, lse, *tensors = ctx.saved_tensors
        if grad_out is None:   # only lse was used
            grad_out = torch.zeros_like(out)
        entry = ctx.entry
        needs = ctx.needs_input_grad[5:]
        if not any(needs):
            dq, dk, dv, _ = entry.backward(ctx.prepared, q, k, v, out, lse, grad_out, grad_lse,
                                           tensors, tensor_grads=False)
            return (dq, dk, dv, None, None, *(None for _ in tensors))
        wanted = {name for name, need in zip(entry.tensors, needs) if need}
        dq, dk, dv, grads = entry.backward(ctx.prepared, q, k, v, out, lse, grad_out, grad_lse,
                                           tensors,
                                           tensor_grads=bool(wanted & set(entry.gradient_tensors)))
        by_name = dict(zip(entry.gradient_tensors, grads))
        return (dq, dk, dv, None, None,
                *(_gradient_or_zeros(by_name.get(name), t, need)
                  for name, t, need in zip(entry.tensors, tensors, needs)))


class _NoSecondDerivative(torch.autograd.Function):
    """A gradient of flexdsl attention taken with create_graph=True: its value, tied in the
    graph to the attention's inputs, so that differentiating it again (a gradient penalty)
    raises instead of counting the kernels' gradients as constants."""

    @staticmethod
    def forward(ctx, gradient, *inputs):
        return gradient.view_as(gradient)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            "flexdsl attention has no second derivative: its backward kernels compute the "
            "gradients without a graph (create_graph=True, e.g. a gradient penalty)")


def _without_second_derivative(grads: tuple, inputs: list) -> tuple:
    return tuple(_NoSecondDerivative.apply(g, *inputs) if isinstance(g, torch.Tensor) else g
                 for g in grads)


def run(q, k, v, tensors: list, entry: Entry, prepared: launch.Prepared):
    """(out, lse) in eager mode: through autograd when a gradient is wanted, else the forward
    alone. (While torch.compile traces, the custom op ``attention`` runs instead.)"""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                    or any(t.requires_grad for t in tensors)):
        return _EagerAttention.apply(q, k, v, entry, prepared, *tensors)
    return launch.forward(prepared, q, k, v, tensors)
