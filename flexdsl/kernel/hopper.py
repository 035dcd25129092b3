"""Which calls the warp-specialised Hopper forward serves, and launching it.

The rendered Triton forward serves every spec. For the two plainest ones, the bare dot product
with no mask or a causal mask (``score``, ``where q >= kv`` and what solves to the same keys),
an H100/H200 runs a hand-written Gluon forward instead (``hopper_gluon.py``): a loader warp and
two consumer warp groups in a persistent program, the structure of FlashAttention-3 and cuDNN,
which Triton's compiler does not produce from the generated loop. On the H200 it took the
causal forward at B=8 H=16 S=1024 D=128 from 0.110 ms to 0.090 (cuDNN 0.088), and at B=2 S=4096
from 0.289 to 0.244-0.250 (cuDNN 0.265). The backward is the rendered one: it reads the same lse.

``FLEXDSL_HOPPER_FORWARD=0`` turns it off (the rendered forward then serves these specs too).
If Gluon cannot compile the kernel (a triton whose experimental API moved), the call falls
back to the rendered forward, with one warning.
"""
from __future__ import annotations

import math
import os
import warnings

import torch

from .. import ir
from ..analysis.plan import MaskAnalysis

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
    if not all(isinstance(b, ir.Num) and b.value <= 0 for b in c.lower):
        return None   # kv >= 0 holds for every key; any other lower bound does not
    if not c.upper:
        return "full"
    if c.upper == (ir.Name("q"),):
        return "causal"
    return None


def enabled() -> bool:
    return os.environ.get("FLEXDSL_HOPPER_FORWARD", "1") not in ("", "0")


def serves(kind: str | None, q, k, v, scale: float, chosen_tile: bool) -> bool:
    """Whether a call of this geometry goes to the Hopper forward: an sm_90 GPU, 16-bit
    contiguous q, k and v, head dim 64 or 128, a positive scale, no forward tile the caller
    chose, and keys to attend to."""
    if kind is None or chosen_tile or not enabled() or q.device.type != "cuda":
        return False
    if torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    if q.dtype not in (torch.bfloat16, torch.float16) or not k.dtype == v.dtype == q.dtype:
        return False
    if q.shape[3] not in (64, 128) or not (scale > 0 and math.isfinite(scale)):
        return False
    if k.shape[2] == 0 or q.shape[2] == 0:
        return False
    return all(t.is_contiguous() for t in (q, k, v))


_broken: dict = {}      # (head dim, dtype): why the Gluon kernel did not compile
_compiled: set = set()  # (head dim, dtype) that compiled
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
        self.items = math.ceil(q_len / 128) * batch * heads
        self.programs = min(self.items,
                            torch.cuda.get_device_properties(q.device).multi_processor_count)
        self.head_group = min(HEAD_GROUP, self.n_bh)
        self._layouts = None

    def __call__(self, q, k, v, out, lse) -> bool:
        """Writes out and lse; False (nothing written) if the kernel is not to be had or the
        tensors do not start on 16 bytes, as TMA needs."""
        key = (self.head_dim, q.dtype)
        if key in _broken or any(t.data_ptr() % 16 for t in (q, k, v, out)):
            return False
        try:
            from . import hopper_gluon
            self._launch(hopper_gluon, q, k, v, out, lse)
        except Exception as error:   # an experimental API: fall back, once
            if key in _compiled:
                raise
            _broken[key] = f"{type(error).__name__}: {error}"
            warnings.warn("flexdsl: the Hopper forward did not compile, the generated forward "
                          f"serves instead ({_broken[key][:300]})", RuntimeWarning)
            return False
        _compiled.add(key)
        global launches
        launches += 1
        return True

    def _launch(self, module, q, k, v, out, lse):
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
        d = self.head_dim
        if self._layouts is None:
            element = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
            self._layouts = (gl.NVMMASharedLayout.get_default_for([64, d], element),
                             gl.NVMMASharedLayout.get_default_for([128, d], element))
        q_layout, kv_layout = self._layouts
        q_rows, kv_rows = q.numel() // d, k.numel() // d
        q_desc = TensorDescriptor(q, [q_rows, d], [d, 1], [64, d], q_layout)
        k_desc = TensorDescriptor(k, [kv_rows, d], [d, 1], [128, d], kv_layout)
        v_desc = TensorDescriptor(v, [kv_rows, d], [d, 1], [128, d], kv_layout)
        module.attention_forward[(self.programs,)](
            q_desc, k_desc, v_desc, out, lse, _counter(q.device), self.q_len, self.kv_len,
            self.n_bh, self.heads, self.group, self.head_group, self.qk_scale, d, self.causal,
            num_warps=4)


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
