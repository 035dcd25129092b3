"""A prototype, not part of the package: a Hopper causal forward in Gluon whose softmax runs
while the P V product holds the tensor cores (FlashAttention-3's pipelining within a warp
group), which triton 3.6 does not produce from the Triton forward.

    python benchmarks/gluon_prototype.py     # on an H100/H200: checks and times it

K and V tiles come through TMA into a ring of STAGES buffers, each with an mbarrier; the
tensors are contiguous (B, H, S, D) bf16 seen as (B*H*S, D). Its figures against cuDNN and
flexdsl are in RESULTS.md ("B=8 S=1024").
"""
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.experimental.gluon.language.nvidia.hopper import (
    tma, mbarrier, fence_async_shared, warpgroup_mma, warpgroup_mma_wait)

LOG2E = 1.4426950408889634


@gluon.jit
def fwd(q_desc, k_desc, v_desc, O, LSE, S, n_bh, qk_scale,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
        STAGES: gl.constexpr, CAUSAL: gl.constexpr, num_warps: gl.constexpr):
    pid = gl.program_id(0)
    tiles = gl.cdiv(S, BLOCK_M)
    rank = pid // n_bh
    bh = pid - rank * n_bh
    tile = tiles - 1 - rank
    m0 = tile * BLOCK_M
    row0 = bh * S

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_o: gl.constexpr = gl.SliceLayout(0, o_layout)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bar.index(i), count=1)
        mbarrier.init(v_bar.index(i), count=1)
    fence_async_shared()

    if CAUSAL:
        n_tiles = gl.cdiv(gl.minimum(S, m0 + BLOCK_M), BLOCK_N)
        full = (m0 + 1) // BLOCK_N
    else:
        n_tiles = gl.cdiv(S, BLOCK_N)
        full = S // BLOCK_N
    kv_bytes: gl.constexpr = BLOCK_N * HEAD_DIM * 2

    mbarrier.expect(q_bar, BLOCK_M * HEAD_DIM * 2)
    tma.async_copy_global_to_shared(q_desc, [row0 + m0, 0], q_bar, q_smem)
    for i in gl.static_range(STAGES):
        ok = i < n_tiles
        mbarrier.expect(k_bar.index(i), kv_bytes, pred=ok)
        tma.async_copy_global_to_shared(k_desc, [row0 + i * BLOCK_N, 0], k_bar.index(i), k_smem.index(i), pred=ok)
        mbarrier.expect(v_bar.index(i), kv_bytes, pred=ok)
        tma.async_copy_global_to_shared(v_desc, [row0 + i * BLOCK_N, 0], v_bar.index(i), v_smem.index(i), pred=ok)

    rows = m0 + gl.arange(0, BLOCK_M, layout=row_s)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)

    # Tile 0: its scores, then its probabilities.
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_bar.index(0), 0)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=[s])
    gl.thread_barrier()
    ok = STAGES < n_tiles
    mbarrier.expect(k_bar.index(0), kv_bytes, pred=ok)
    tma.async_copy_global_to_shared(k_desc, [row0 + STAGES * BLOCK_N, 0], k_bar.index(0), k_smem.index(0), pred=ok)
    if 0 >= full:
        cols = gl.arange(0, BLOCK_N, layout=col_s)
        keep = (rows[:, None] >= cols[None, :]) & (cols[None, :] < S)
        s = gl.where(keep, s, -float("inf"))
    m_i = gl.max(s, 1) * qk_scale
    m_i = gl.where(m_i == -float("inf"), 0.0, m_i)
    p = gl.exp2(s * qk_scale - m_i[:, None])
    l_i = gl.sum(p, 1)
    p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)

    # Step j: issue S_j = Q K_j^T, then O += P_{j-1} V_{j-1}; wait for S_j only (the older
    # group), run the softmax of S_j while the PV product runs, then wait for it, refill the
    # two freed buffers and rescale O.
    for j in range(1, n_tiles):
        st = j % STAGES
        ph = (j // STAGES) & 1
        pst = (j - 1) % STAGES
        pph = ((j - 1) // STAGES) & 1
        mbarrier.wait(k_bar.index(st), ph)
        s = warpgroup_mma(q_smem, k_smem.index(st).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        mbarrier.wait(v_bar.index(pst), pph)
        acc = warpgroup_mma(p_op, v_smem.index(pst), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=[s])
        if j >= full:
            cols = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=col_s)
            keep = (rows[:, None] >= cols[None, :]) & (cols[None, :] < S)
            s = gl.where(keep, s, -float("inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        acc, p_op = warpgroup_mma_wait(0, deps=[acc, p_op])
        # Every warp is past its reads of the two buffers before the copy engine refills them.
        gl.thread_barrier()
        nxt = j + STAGES
        ok = nxt < n_tiles
        mbarrier.expect(k_bar.index(st), kv_bytes, pred=ok)
        tma.async_copy_global_to_shared(k_desc, [row0 + nxt * BLOCK_N, 0], k_bar.index(st), k_smem.index(st), pred=ok)
        ok = nxt - 1 < n_tiles
        mbarrier.expect(v_bar.index(pst), kv_bytes, pred=ok)
        tma.async_copy_global_to_shared(v_desc, [row0 + (nxt - 1) * BLOCK_N, 0], v_bar.index(pst), v_smem.index(pst), pred=ok)
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        m_i = m_new

    last = n_tiles - 1
    mbarrier.wait(v_bar.index(last % STAGES), (last // STAGES) & 1)
    acc = warpgroup_mma(p_op, v_smem.index(last % STAGES), acc, is_async=True)
    acc, p_op = warpgroup_mma_wait(0, deps=[acc, p_op])

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bar.index(i))
        mbarrier.invalidate(v_bar.index(i))

    out = acc / gl.convert_layout(l_i, row_o)[:, None]
    o_rows = m0 + gl.arange(0, BLOCK_M, layout=row_o)
    o_cols = gl.arange(0, HEAD_DIM, layout=col_o)
    o_ptr = O + (row0 + o_rows)[:, None].to(gl.int64) * HEAD_DIM + o_cols[None, :]
    gl.store(o_ptr, out.to(gl.bfloat16), mask=(o_rows < S)[:, None])
    lse = (m_i + gl.log2(l_i)) / 1.4426950408889634
    gl.store(LSE + bh.to(gl.int64) * S + rows, lse, mask=rows < S)


def run(q, k, v, causal=True, BLOCK_M=64, BLOCK_N=64, STAGES=2, num_warps=4):
    B, H, S, D = q.shape
    o = torch.empty_like(q)
    lse = torch.empty(B * H, S, device=q.device, dtype=torch.float32)
    lay_q = gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], gl.bfloat16)
    lay_k = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], gl.bfloat16)
    q2, k2, v2 = (t.reshape(B * H * S, D) for t in (q, k, v))
    qd = TensorDescriptor(q2, list(q2.shape), list(q2.stride()), [BLOCK_M, D], lay_q)
    kd = TensorDescriptor(k2, list(k2.shape), list(k2.stride()), [BLOCK_N, D], lay_k)
    vd = TensorDescriptor(v2, list(v2.shape), list(v2.stride()), [BLOCK_N, D], lay_k)
    grid = (triton.cdiv(S, BLOCK_M) * B * H,)
    fwd[grid](qd, kd, vd, o, lse, S, B * H, D ** -0.5 * LOG2E, BLOCK_M, BLOCK_N, D, STAGES, causal,
              num_warps=num_warps)
    return o, lse


def bench(fn, n=200):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    cache = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    for i in range(n):
        cache.zero_()
        start[i].record()
        fn()
        end[i].record()
    torch.cuda.synchronize()
    t = sorted(s.elapsed_time(e) for s, e in zip(start, end))
    return t[n // 2]


if __name__ == "__main__":
    from torch.nn.attention import sdpa_kernel, SDPBackend
    import torch.nn.functional as F
    torch.manual_seed(0)
    rows = []
    for (B, H, S, D) in [(8, 16, 1024, 128), (2, 16, 4096, 128), (1, 4, 1000, 128)]:
        q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
        for cfg in [(64, 64, 2, 4), (64, 128, 2, 4), (64, 64, 3, 4), (128, 64, 2, 8), (128, 128, 2, 8)]:
            try:
                o, lse = run(q, k, v, True, *cfg)
                err = float((o.float() - ref).abs().max())
                ms = bench(lambda: run(q, k, v, True, *cfg)) if S != 1000 else 0.0
                rows.append(f"{B},{H},{S},{D} gluon {cfg}: {ms:.4f} ms err {err:.3g}")
            except Exception as e:
                rows.append(f"{B},{H},{S},{D} gluon {cfg}: {type(e).__name__} {str(e)[-300:]}")
            print(rows[-1], flush=True)
        if S == 1000:
            continue
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            rows.append(f"{B},{H},{S},{D} cudnn: {bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)):.4f}")
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            rows.append(f"{B},{H},{S},{D} flash: {bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)):.4f}")
        try:
            import flexdsl
            att = flexdsl.compile("where q >= kv")
            rows.append(f"{B},{H},{S},{D} flexdsl: {bench(lambda: att(q, k, v)):.4f}")
        except Exception as e:
            rows.append(f"flexdsl: {e}")
    print("\n".join(rows))
