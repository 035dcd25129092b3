"""Launching a compiled Triton kernel directly, without Triton's per-call argument binding.

Triton's launch path binds and specialises every argument in Python: about 60 us a launch on
the lent H200's host, more than a short kernel runs. After a kernel's first launch through
Triton, later calls whose arguments specialise the same way call its compiled launcher
directly, as Triton itself does at the end of ``JITFunction.run`` (the same call in triton 3.6
to 3.9; other versions and the interpreter always go through Triton).
"""
from __future__ import annotations

import functools

import torch

from .compile import interpreting

_launchers: dict[tuple, tuple] = {}


def supported() -> bool:
    return _supported(interpreting())


@functools.lru_cache(maxsize=None)
def _supported(interpret: bool) -> bool:
    if interpret or not torch.cuda.is_available():
        return False
    import triton
    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    return (major, minor) >= (3, 6) and (major, minor) <= (3, 9)


def specialisation(args) -> tuple:
    """What Triton specialises a compiled kernel on, per argument: a tensor's dtype and 16-byte
    alignment; an int's width, whether it is 1 and whether 16 divides it (also for ints Triton
    does not specialise on, which only makes this key finer)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append((a.dtype, a.data_ptr() % 16 == 0))
        elif type(a) is int:
            out.append((a == 1, a % 16 == 0, -2**31 <= a < 2**31))
        else:
            out.append(type(a))
    return tuple(out)


def launch(key, grid, args) -> bool:
    """Launch through the remembered compiled launcher, if there is one for this key and
    these arguments' specialisation; False if the caller must go through Triton."""
    if not _launchers and not supported():
        return False
    device = args[0].device.index if isinstance(args[0], torch.Tensor) else None
    entry = _launchers.get((key, device, specialisation(args)))
    if entry is None:
        return False
    compiled, tail, knobs = entry
    stream = torch.cuda.current_stream(device).cuda_stream
    full = (*args, *tail)
    grid = (*grid, 1, 1)[:3]
    compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata,
                 compiled.launch_metadata(grid, stream, *full),
                 knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *full)
    return True


def remember(key, kernel, compiled, args, meta) -> None:
    """After a launch through Triton: keep its compiled kernel for ``launch``."""
    if compiled is None or not hasattr(compiled, "packed_metadata") \
            or not supported():
        return
    from triton import knobs
    names = kernel.arg_names[len(args):]
    if set(names) != set(meta):   # a constexpr left to its default: take the slow path
        return
    device = args[0].device.index if isinstance(args[0], torch.Tensor) else None
    if len(_launchers) > 4096:
        _launchers.clear()
    _launchers[(key, device, specialisation(args))] = (
        compiled, tuple(meta[name] for name in names), knobs)
