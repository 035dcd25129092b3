"""Which calls the warp-specialised Hopper forward serves, and launching it.

The rendered Triton forward serves every spec. For the two plainest ones, the bare dot product
with no mask or a causal mask (``score``, ``where q >= kv`` and what solves to the same keys),
an H100/H200 runs a hand-written Gluon forward (``hopper_gluon.py``) instead, where the call
allows it (``eligible``: among others, keys in whole 128-key tiles): a loader warp and two
consumer warp groups in a persistent program, the structure of FlashAttention-3 and cuDNN,
which Triton's compiler does not produce from the generated loop. On the H200 it took the
causal forward at B=8 H=16 S=1024 D=128 from 0.110 ms to 0.090 (cuDNN 0.088), and at B=2 S=4096
from 0.289 to 0.244-0.250 (cuDNN 0.265). The backward is the rendered one: it reads the same lse.

``FLEXDSL_HOPPER_FORWARD=0`` turns it off (the rendered forward then serves these specs too).
If Gluon cannot compile the kernel (a triton whose experimental API moved), the call falls
back to the rendered forward, with one warning.
"""
from __future__ import annotations

import functools
import math
import os
import warnings

import torch

from .. import ir
from ..analysis.plan import MaskAnalysis
from ..check import constant_value
from .compile import interpreting

LOG2E = 1.4426950408889634
# Heads whose items run together (heavy rows first within them): their keys stay in L2. On the
# H200 at B=8 H=16 S=1024: groups of 32 heads 0.090 ms, 16 0.091, 64 0.094, all 128 0.108.
HEAD_GROUP = 32


def mask_kind(analysis: MaskAnalysis) -> str | None:
    """"causal" or "full" if the spec is the bare score with keys 0..q or all keys; else None.
    From the solved mask, so that ``kv <= q`` or ``kv < q + 1`` qualify as ``q >= kv`` does."""
    spec = analysis.spec.spec
    if spec.score != ir.Name("score"):
        return None
    conjunctions = analysis.by_query.conjunctions
    if len(conjunctions) != 1:
        return None
    c = conjunctions[0]
    if c.rows or c.documents or c.residual:
        return None
    lower = [constant_value(b) for b in c.lower]
    if not all(b is not None and b <= 0 for b in lower):
        return None   # kv >= c with a constant c <= 0 holds for every key
    if not c.upper:
        return "full"
    if c.upper == (ir.Name("q"),):
        return "causal"
    return None


def enabled() -> bool:
    """``FLEXDSL_HOPPER_FORWARD=0`` turns the Hopper forward off for call geometries prepared
    after it is set (each is decided once, on its first call)."""
    return os.environ.get("FLEXDSL_HOPPER_FORWARD", "1") not in ("", "0")


def serves(kind: str | None, q, k, v, scale: float, chosen_tile: bool) -> bool:
    """Whether a call of this geometry goes to the Hopper forward (see ``eligible``); never
    under the interpreter, and not where the caller chose the forward's tile."""
    if kind is None or chosen_tile or not enabled() or interpreting() \
            or q.device.type != "cuda":
        return False
    return eligible(torch.cuda.get_device_capability(q.device), q.dtype, k.dtype, v.dtype,
                    tuple(q.shape), tuple(k.shape), scale,
                    all(t.is_contiguous() for t in (q, k, v)))


def eligible(capability: tuple, q_dtype, k_dtype, v_dtype, q_shape: tuple, k_shape: tuple,
             scale: float, contiguous: bool) -> bool:
    """An sm_90 GPU; 16-bit q, k and v of one dtype, contiguous; head dim 64 or 128; a
    positive finite scale; no empty dimension; and a key length that is a whole number of the
    kernel's 128-key tiles. The kernel reads k and v as one (rows, D) matrix, so a head's last
    partial tile would hold the next head's first keys: their scores are masked, but a
    non-finite value among them would still reach the output as 0 * inf (descriptors that
    stop at each head, rank 3, are the way to lift this)."""
    if capability != (9, 0) or not contiguous:
        return False
    if q_dtype not in (torch.bfloat16, torch.float16) or not k_dtype == v_dtype == q_dtype:
        return False
    if q_shape[3] not in (64, 128) or not (scale > 0 and math.isfinite(scale)):
        return False
    if 0 in q_shape or 0 in k_shape:
        return False
    return k_shape[2] % 128 == 0


_broken: dict = {}      # (head dim, dtype, causal): why the Gluon kernel did not compile
_compiled: set = set()  # (head dim, dtype, causal) that compiled
launches = 0            # calls the Hopper forward served (the GPU tests read it)


class Forward:
    """The Hopper forward for one call geometry (launch.Prepared keeps one where ``serves``)."""

    def __init__(self, kind: str, q, k, scale: float):
        batch, heads, q_len, head_dim = q.shape
        self.causal = kind == "causal"
        self.q_len, self.kv_len = q_len, k.shape[2]
        self.n_bh, self.heads, self.group = batch * heads, heads, heads // k.shape[1]
        self.head_dim = head_dim
        self.qk_scale = scale * LOG2E
        items = math.ceil(q_len / 128) * batch * heads
        self.programs = min(items,
                            torch.cuda.get_device_properties(q.device).multi_processor_count)
        self.head_group = min(HEAD_GROUP, self.n_bh)
        self._layouts = None

    def __call__(self, q, k, v, out, lse) -> bool:
        """Writes out and lse; False (nothing written) if the kernel is not to be had, the
        tensors do not start on 16 bytes as TMA needs, or a CUDA graph is being captured (the
        work counter belongs to a stream, and a graph replays on others)."""
        key = (self.head_dim, q.dtype, self.causal)
        if key in _broken or any(t.data_ptr() % 16 for t in (q, k, v, out)) \
                or torch.cuda.is_current_stream_capturing():
            return False
        try:
            kernel, gl, descriptor = _gluon()
        except Exception as error:   # an experimental API: fall back, once
            return _fall_back(key, error)
        args = (*self._descriptors(gl, descriptor, q, k, v), out, lse, _counter(q.device),
                self.q_len, self.kv_len, self.n_bh, self.heads, self.group, self.head_group,
                self.qk_scale, self.head_dim, self.causal)
        launch = kernel[(self.programs,)]
        if key not in _compiled:
            try:   # the first launch compiles
                launch(*args, num_warps=4)
            except Exception as error:
                return _fall_back(key, error)
            _compiled.add(key)
        else:
            launch(*args, num_warps=4)
        global launches
        launches += 1
        return True

    def _descriptors(self, gl, TensorDescriptor, q, k, v) -> tuple:
        """q, k and v as (rows, D) matrices for TMA: 64-row query tiles, 128-row key tiles."""
        d = self.head_dim
        if self._layouts is None:
            element = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
            self._layouts = (gl.NVMMASharedLayout.get_default_for([64, d], element),
                             gl.NVMMASharedLayout.get_default_for([128, d], element))
        q_layout, kv_layout = self._layouts
        q_rows, kv_rows = q.numel() // d, k.numel() // d
        return (TensorDescriptor(q, [q_rows, d], [d, 1], [64, d], q_layout),
                TensorDescriptor(k, [kv_rows, d], [d, 1], [128, d], kv_layout),
                TensorDescriptor(v, [kv_rows, d], [d, 1], [128, d], kv_layout))


@functools.lru_cache(maxsize=None)
def _gluon():
    """The kernel, Gluon's language module and its TensorDescriptor: imported on the first
    call served (Gluon is not needed, nor perhaps importable, elsewhere), then kept."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from . import hopper_gluon
    return hopper_gluon.attention_forward, gl, TensorDescriptor


def _fall_back(key, error) -> bool:
    _broken[key] = f"{type(error).__name__}: {error}"
    warnings.warn("flexdsl: the Hopper forward did not compile, the generated forward serves "
                  f"instead ({_broken[key][:300]})", RuntimeWarning)
    return False


_counters: dict = {}


def _counter(device) -> torch.Tensor:
    """The work counter of the current stream (zero between launches: the kernel's last
    program resets it). One a stream, so that launches on two streams never share one."""
    stream = torch.cuda.current_stream(device)
    key = (device.index, stream.cuda_stream)
    found = _counters.get(key)
    if found is None:
        found = _counters[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return found
