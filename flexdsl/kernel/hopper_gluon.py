"""The warp-specialised Hopper forward, in Gluon (``triton.experimental.gluon``): the device code
that ``hopper.py`` launches. Imported only on an sm_90 GPU: Gluon has no interpreter.

One persistent program a multiprocessor, three roles (FlashAttention-3's structure):
- a loader warp fetches work items (128 query rows of one head) from a global counter, heavy
  causal items first within groups of heads, and copies each item's query tile and its key and
  value tiles (128 keys) into shared memory through TMA: a two-slot ring with "full" and "free"
  mbarriers, the queries double-buffered so that the next item's are in while this one runs;
- two consumer warp groups, 64 query rows each, issue this key tile's QK product and the last
  tile's PV product together and run the softmax while the PV product holds the tensor cores;
  they take turns issuing (a ping-pong through two mbarriers), so one's softmax overlaps the
  other's products.
Items are dealt dynamically: with causal rows of unequal length, a fixed deal left programs
idle at the end (0.108 ms against 0.090 on the H200 at B=8 H=16 S=1024 D=128).
"""
from __future__ import annotations

from triton.experimental import gluon

from . import hopper
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)

# triton 3.6 names the TMA load async_copy_global_to_shared; later versions async_load.
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared

BLOCK_M = gl.constexpr(128)   # query rows an item (64 a consumer warp group)
BLOCK_N = gl.constexpr(128)   # keys a ring slot
STAGES = gl.constexpr(2)
LOG2E = gl.constexpr(hopper.LOG2E)


@gluon.jit
def _item(t, q_len, kv_len, n_bh, heads, group, head_group, CAUSAL: gl.constexpr):
    """Work item t: its first query row, query and key/value row offsets, and key tiles.
    Items run in groups of ``head_group`` heads (their keys stay in L2), within a group by
    row tile, the longest causal rows first."""
    tiles = gl.cdiv(q_len, BLOCK_M)
    per_group = tiles * head_group
    grp = t // per_group
    r = t - grp * per_group
    size = gl.minimum(head_group, n_bh - grp * head_group)
    rank = r // size
    bh = grp * head_group + r - rank * size
    if CAUSAL:
        m0 = (tiles - 1 - rank) * BLOCK_M
        n_tiles = gl.cdiv(gl.minimum(kv_len, m0 + BLOCK_M), BLOCK_N)
    else:
        m0 = rank * BLOCK_M
        n_tiles = gl.cdiv(kv_len, BLOCK_N)
    b = bh // heads
    kv_head = b * (heads // group) + (bh - b * heads) // group
    return m0, bh, bh * q_len, kv_head * kv_len, n_tiles


@gluon.jit
def _masked(s, rows, tile, kv_len, col_layout: gl.constexpr, CAUSAL: gl.constexpr):
    """Scores of key tile ``tile`` with -inf past kv_len and, causal, above the diagonal."""
    cols = tile * BLOCK_N + gl.arange(0, BLOCK_N, layout=col_layout)
    keep = cols[None, :] < kv_len
    if CAUSAL:
        keep = keep & (rows[:, None] >= cols[None, :])
    return gl.where(keep, s, -float("inf"))


@gluon.jit
def _consumer(wg: gl.constexpr, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, q_free, k_free,
              v_free, turn, item_smem, O, LSE, q_len, kv_len, n_bh, heads, group, head_group,
              qk_scale, HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr):
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
    item_layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    zero_s = gl.zeros([64, BLOCK_N], gl.float32, layout=s_layout)
    total = gl.cdiv(q_len, BLOCK_M) * n_bh
    it = 0       # key tiles taken from the ring so far
    k = 0        # items done
    turns = 0    # turns taken on the tensor cores
    mbarrier.wait(q_bar.index(wg), 0)
    t = gl.max(item_smem.index(0).load(item_layout), 0)
    while t < total:
        m0, bh, q_row0, kv_row0, n_tiles = _item(t, q_len, kv_len, n_bh, heads, group,
                                                 head_group, CAUSAL)
        r0 = m0 + wg * 64
        # Key tiles from this one on need the mask (the diagonal, or past kv_len).
        if CAUSAL:
            first_masked = gl.minimum((r0 + 1) // BLOCK_N, kv_len // BLOCK_N)
        else:
            first_masked = kv_len // BLOCK_N
        qb = k % 2
        q = q_smem.index(qb * 2 + wg)
        rows = r0 + gl.arange(0, 64, layout=row_s)

        st = it % STAGES
        mbarrier.wait(k_bar.index(st), (it // STAGES) & 1)
        mbarrier.wait(turn.index(wg), turns & 1)
        s = warpgroup_mma(q, k_smem.index(st).permute((1, 0)), zero_s, use_acc=False,
                          is_async=True)
        mbarrier.arrive(turn.index(1 - wg))
        turns += 1
        s = warpgroup_mma_wait(0, deps=[s])
        mbarrier.arrive(k_free.index(st))
        if n_tiles == 1:
            mbarrier.arrive(q_free.index(qb * 2 + wg))
        if first_masked == 0:
            s = _masked(s, rows, 0, kv_len, col_s, CAUSAL)
        m_i = gl.max(s, 1) * qk_scale
        p = gl.exp2(s * qk_scale - m_i[:, None])
        l_i = gl.sum(p, 1)
        p_op = gl.convert_layout(p.to(v_smem.dtype), p_layout)
        acc = gl.zeros([64, HEAD_DIM], gl.float32, layout=o_layout)

        for j in range(1, n_tiles):
            g = it + j
            st = g % STAGES
            pst = (g - 1) % STAGES
            mbarrier.wait(k_bar.index(st), (g // STAGES) & 1)
            mbarrier.wait(v_bar.index(pst), ((g - 1) // STAGES) & 1)
            mbarrier.wait(turn.index(wg), turns & 1)
            s = warpgroup_mma(q, k_smem.index(st).permute((1, 0)), zero_s, use_acc=False,
                              is_async=True)
            acc = warpgroup_mma(p_op, v_smem.index(pst), acc, is_async=True)
            mbarrier.arrive(turn.index(1 - wg))
            turns += 1
            s = warpgroup_mma_wait(1, deps=[s])
            mbarrier.arrive(k_free.index(st))
            if j == n_tiles - 1:
                mbarrier.arrive(q_free.index(qb * 2 + wg))
            if j >= first_masked:
                s = _masked(s, rows, j, kv_len, col_s, CAUSAL)
            m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
            alpha = gl.exp2(m_i - m_new)
            p = gl.exp2(s * qk_scale - m_new[:, None])
            l_i = l_i * alpha + gl.sum(p, 1)
            acc, p_op = warpgroup_mma_wait(0, deps=[acc, p_op])
            mbarrier.arrive(v_free.index(pst))
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            p_op = gl.convert_layout(p.to(v_smem.dtype), p_layout)
            m_i = m_new

        g = it + n_tiles - 1
        mbarrier.wait(v_bar.index(g % STAGES), (g // STAGES) & 1)
        mbarrier.wait(turn.index(wg), turns & 1)
        acc = warpgroup_mma(p_op, v_smem.index(g % STAGES), acc, is_async=True)
        mbarrier.arrive(turn.index(1 - wg))
        turns += 1
        acc, p_op = warpgroup_mma_wait(0, deps=[acc, p_op])
        mbarrier.arrive(v_free.index(g % STAGES))
        it += n_tiles
        k += 1

        out = acc / gl.convert_layout(l_i, row_o)[:, None]
        o_rows = r0 + gl.arange(0, 64, layout=row_o)
        o_cols = gl.arange(0, HEAD_DIM, layout=col_o)
        o_ptr = O + (q_row0 + o_rows)[:, None].to(gl.int64) * HEAD_DIM + o_cols[None, :]
        gl.store(o_ptr, out.to(O.dtype.element_ty), mask=(o_rows < q_len)[:, None])
        lse = (m_i + gl.log2(l_i)) / LOG2E
        gl.store(LSE + q_row0.to(gl.int64) + rows, lse, mask=rows < q_len)
        qb = k % 2
        mbarrier.wait(q_bar.index(qb * 2 + wg), (k // 2) & 1)
        t = gl.max(item_smem.index(qb).load(item_layout), 0)


@gluon.jit
def _consumer_1(q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, q_free, k_free, v_free, turn,
                item_smem, O, LSE, q_len, kv_len, n_bh, heads, group, head_group, qk_scale,
                HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr):
    _consumer(1, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, q_free, k_free, v_free, turn,
              item_smem, O, LSE, q_len, kv_len, n_bh, heads, group, head_group, qk_scale,
              HEAD_DIM, CAUSAL)


@gluon.jit
def _loader(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, q_free,
            k_free, v_free, item_smem, counter, q_len, kv_len, n_bh, heads, group, head_group,
            HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr):
    kv_bytes: gl.constexpr = BLOCK_N * HEAD_DIM * 2
    q_bytes: gl.constexpr = 64 * HEAD_DIM * 2
    item_layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    total = gl.cdiv(q_len, BLOCK_M) * n_bh
    programs = gl.num_programs(0)
    it = 0
    k = 0
    t = gl.program_id(0)
    while t < total:
        m0, bh, q_row0, kv_row0, n_tiles = _item(t, q_len, kv_len, n_bh, heads, group,
                                                 head_group, CAUSAL)
        qb = k % 2
        for wg in gl.static_range(2):
            mbarrier.wait(q_free.index(qb * 2 + wg), ((k // 2) & 1) ^ 1, pred=k >= 2)
        # The consumers read the item's number once its queries have landed (the barrier's
        # arrival orders this write before them).
        item_smem.index(qb).store(gl.full([1], t, gl.int32, item_layout))
        for wg in gl.static_range(2):
            mbarrier.expect(q_bar.index(qb * 2 + wg), q_bytes)
            _tma_load(q_desc, [q_row0 + m0 + wg * 64, 0], q_bar.index(qb * 2 + wg),
                      q_smem.index(qb * 2 + wg))
        for j in range(n_tiles):
            g = it + j
            st = g % STAGES
            free_phase = ((g // STAGES) & 1) ^ 1
            mbarrier.wait(k_free.index(st), free_phase, pred=g >= STAGES)
            mbarrier.expect(k_bar.index(st), kv_bytes)
            _tma_load(k_desc, [kv_row0 + j * BLOCK_N, 0], k_bar.index(st), k_smem.index(st))
            mbarrier.wait(v_free.index(st), free_phase, pred=g >= STAGES)
            mbarrier.expect(v_bar.index(st), kv_bytes)
            _tma_load(v_desc, [kv_row0 + j * BLOCK_N, 0], v_bar.index(st), v_smem.index(st))
        it += n_tiles
        k += 1
        t = programs + gl.atomic_add(counter, 1)
    # No next item: say so to both consumers. Every program asks once past the end, so the
    # last to ask got total + programs - 1; it resets the counter for the next launch.
    qb = k % 2
    for wg in gl.static_range(2):
        mbarrier.wait(q_free.index(qb * 2 + wg), ((k // 2) & 1) ^ 1, pred=k >= 2)
    item_smem.index(qb).store(gl.full([1], t, gl.int32, item_layout))
    for wg in gl.static_range(2):
        mbarrier.arrive(q_bar.index(qb * 2 + wg))
    if t == total + programs - 1:
        gl.store(counter, 0)


@gluon.jit(do_not_specialize=["q_len", "kv_len", "n_bh", "heads", "group", "head_group"])
def attention_forward(q_desc, k_desc, v_desc, O, LSE, counter, q_len, kv_len, n_bh, heads,
                      group, head_group, qk_scale, HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr):
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [4, 64, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
    q_free = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
    k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    item_smem = gl.allocate_shared_memory(gl.int32, [2, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    for i in gl.static_range(4):
        mbarrier.init(q_bar.index(i), count=1)
        mbarrier.init(q_free.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bar.index(i), count=1)
        mbarrier.init(v_bar.index(i), count=1)
        mbarrier.init(k_free.index(i), count=2)   # one arrival a consumer warp group
        mbarrier.init(v_free.index(i), count=2)
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    fence_async_shared()
    mbarrier.arrive(turn.index(0))   # warp group 0 takes the first turn

    gl.warp_specialize([
        (_consumer, (0, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, q_free, k_free, v_free,
                     turn, item_smem, O, LSE, q_len, kv_len, n_bh, heads, group, head_group,
                     qk_scale, HEAD_DIM, CAUSAL)),
        (_consumer_1, (q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, q_free, k_free, v_free,
                       turn, item_smem, O, LSE, q_len, kv_len, n_bh, heads, group, head_group,
                       qk_scale, HEAD_DIM, CAUSAL)),
        (_loader, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, q_free,
                   k_free, v_free, item_smem, counter, q_len, kv_len, n_bh, heads, group,
                   head_group, HEAD_DIM, CAUSAL)),
    ], [4, 1], [240, 24])
