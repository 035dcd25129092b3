"""Launching a compiled Triton kernel directly, without Triton's per-call argument binding.

Triton's launch path binds and specialises every argument in Python: about 60 us a launch on
the lent H200's host, more than a short kernel runs. After a kernel's first launch through
Triton, later calls whose arguments specialise the same way call its compiled launcher
directly, as Triton itself does at the end of ``JITFunction.run`` (the same call in triton 3.6
to 3.9; other versions and the interpreter always go through Triton). The launcher is found
by the raw ints of the call (strides and lengths repeat from step to step) and each tensor's
dtype and alignment, picked out by position: half the cost of specialising every argument
(a training step with a documents mask: 36 -> 18 us on the development machine).
"""
from __future__ import annotations

import functools
import operator

import torch

from .compile import interpreting

_launchers: dict[tuple, tuple] = {}
# Per key, which arguments are ints and which tensors: a launch's arguments keep their kinds in
# their places (the key names the kernel and the spec), so getters pick them out in C.
_layouts: dict[tuple, tuple] = {}
_quick: dict[tuple, tuple] = {}


def supported() -> bool:
    return _supported(interpreting())


@functools.lru_cache(maxsize=None)
def _supported(interpret: bool) -> bool:
    if interpret or not torch.cuda.is_available():
        return False
    import triton
    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    return (major, minor) >= (3, 6) and (major, minor) <= (3, 9)


def specialisation(args, Tensor=torch.Tensor) -> tuple:
    """What Triton specialises a compiled kernel on, per argument: a tensor's dtype and 16-byte
    alignment; an int's width, whether it is 1 and whether 16 divides it (also for ints Triton
    does not specialise on, which only makes this key finer). One comprehension, ints first:
    most arguments are strides and lengths, and this runs for every launch."""
    return tuple([(a == 1) + 2 * (a & 15 == 0) + 4 * (-2147483648 <= a <= 2147483647)
                  if type(a) is int else
                  (a.dtype, a.data_ptr() & 15 == 0) if isinstance(a, Tensor) else type(a)
                  for a in args])


def launch(key, device, grid, args) -> bool:
    """Launch through the remembered compiled launcher, if there is one for this key (which
    names the kernel, its configuration and constants), device and these arguments'
    specialisation; False if the caller must go through Triton."""
    layout = _layouts.get(key)
    if layout is None:
        return False
    # The raw ints (strides, lengths: the same from step to step) and each tensor's dtype and
    # alignment find the launcher without specialising every argument in Python.
    ints, tensors = layout
    quick = (key, device, ints(args),
             tuple([(t.dtype, t.data_ptr() & 15 == 0) for t in tensors(args)]))
    entry = _quick.get(quick)
    if entry is None:
        entry = _launchers.get((key, device, specialisation(args)))
        if entry is None:
            return False
        if len(_quick) > 4096:
            _quick.clear()
        _quick[quick] = entry
    compiled, tail, knobs = entry
    stream = _raw_stream(device)
    full = (*args, *tail)
    grid = (*grid, 1, 1)[:3]
    enter_hook = knobs.runtime.launch_enter_hook
    compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata,
                 compiled.launch_metadata(grid, stream, *full) if enter_hook else None,
                 enter_hook, knobs.runtime.launch_exit_hook, *full)
    return True


def _raw_stream(device) -> int:
    """The current stream's handle, without making a torch.cuda.Stream object when this torch
    offers the lighter call (CUDA builds do)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw(device) if raw is not None else torch.cuda.current_stream(device).cuda_stream


def remember(key, device, kernel, compiled, args, meta) -> None:
    """After a launch through Triton: keep its compiled kernel for ``launch``."""
    if device is None or compiled is None or not hasattr(compiled, "packed_metadata") \
            or not supported():
        return
    from triton import knobs
    names = kernel.arg_names[len(args):]
    if set(names) != set(meta):   # a constexpr left to its default: take the slow path
        return
    if len(_launchers) > 4096:
        _launchers.clear()
        _quick.clear()
        _layouts.clear()
    _launchers[(key, device, specialisation(args))] = (
        compiled, tuple(meta[name] for name in names), knobs)
    _layouts[key] = (_getter([i for i, a in enumerate(args) if type(a) is int]),
                     _getter([i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]))


def _getter(positions: list[int]):
    """A function of the argument tuple giving the tuple of the arguments at ``positions``."""
    if len(positions) > 1:
        return operator.itemgetter(*positions)
    if positions:
        return lambda args, i=positions[0]: (args[i],)
    return lambda args: ()
