"""``@triton.jit`` helpers shared by the forward and backward kernels (forward.py, backward.py).

Every attention kernel runs on a 1-D grid laid out as (blocks of rows fastest, then heads, then an
outer index: the batch example, or the batch split of the shared-prefix gradient);
``program_coordinates`` turns the program id into those coordinates. CUDA caps grid y and z at
65535, and B * H can exceed that, so nothing sits on y or z.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

# Rounds of Philox4x32 per dropout draw: 7, as FlashAttention 2 and composable_kernel draw their
# attention dropout (Salmon et al., 2011: Philox4x32 passes TestU01's BigCrush from 7 rounds; 10 is
# curand's margin). Each round costs 4 integer instructions per call on sm_90 with DROPOUT_PTX (two
# wide multiplies, two 3-input XORs; 6 with DROPOUT_PORTABLE), and the philox calls are most of a
# dropout loop's extra work. ``reference.philox4x32`` computes the same draws.
PHILOX_ROUNDS: tl.constexpr = tl.constexpr(7)

# The attention kernels' DROPOUT constexpr: 0 (no attention dropout), or which Philox4x32 they run;
# the bits are the same either way (launch.dropout_mode chooses):
# - DROPOUT_PORTABLE: tl.philox itself. Any backend, and Triton's interpreter. Its tl.umulhi and
#   32-bit multiply stay two instructions per product on sm_80 / sm_90 (IMAD.HI.U32, IMAD).
# - DROPOUT_PTX: ``philox`` with PTX=True, one ``mul.wide.u32`` per product (inline PTX, one
#   IMAD.WIDE.U32). Compiled kernels on NVIDIA GPUs only (the interpreter cannot run inline
#   assembly). Written without assembly, as a 64-bit multiply, the wider state makes Triton's layout
#   pass give up on recomputing the philox in the MMA layout and convert the words through shared
#   memory instead. ``philox`` with PTX=False (the same rounds, tl.umulhi multiplies) is what the
#   interpreter tests against tl.philox (tests/test_dropout_numbering.py).
# - DROPOUT_PTX_KEYS: DROPOUT_PTX with the 14 round keys computed on the host
#   (``launch.philox_round_keys``) and passed as kernel arguments in place of the seed, the
#   ``seed`` a kernel hands down being then the tuple of them (``philox_keyed``). ptxas reads them from
#   the constant bank where a round needs them; computed in the kernel (seed + r x constant) they are
#   uniform values that the dK/dV kernels, out of registers, held in ordinary ones and spilled
#   (``prefix_attention_backward`` chooses: the real keys' dK/dV kernel always, the prefix dK/dV
#   kernel at D=128; the forward, dQ and the prefix dK/dV kernel at D=64 did not spill, and there
#   the argument reads cost their loops 1-2%).
DROPOUT_PORTABLE: tl.constexpr = tl.constexpr(1)
DROPOUT_PTX: tl.constexpr = tl.constexpr(2)
DROPOUT_PTX_KEYS: tl.constexpr = tl.constexpr(3)


@triton.jit
def mul_hi_lo(a, B: tl.constexpr, PTX: tl.constexpr):
    """(hi, lo): the high and low 32 bits of the 64-bit product of the uint32 tensor ``a`` and the
    32-bit constant B. PTX: one ``mul.wide.u32`` (compiled NVIDIA kernels only, see DROPOUT_PTX)."""
    if PTX:
        return tl.inline_asm_elementwise(
            "{ .reg .b64 product; mul.wide.u32 product, $2, $3; mov.b64 {$1, $0}, product; }",
            "=r,=r,r,r", [a, tl.full(a.shape, B, tl.uint32)], dtype=(tl.uint32, tl.uint32), is_pure=True,
            pack=1)
    else:
        return tl.umulhi(a, B), tl.mul(a, B, sanitize_overflow=False)


@triton.jit
def philox_round(c0, c1, c2, c3, k0, k1, PTX: tl.constexpr):
    """One Philox4x32 round of the uint32 counter words (c0, c1, c2, c3) with round keys (k0, k1)."""
    hi_a, lo_a = mul_hi_lo(c0, 0xD2511F53, PTX)
    hi_b, lo_b = mul_hi_lo(c2, 0xCD9E8D57, PTX)
    return hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a


@triton.jit
def philox(seed, c0, c1, c2, c3, n_rounds: tl.constexpr, PTX: tl.constexpr):
    """``tl.philox(seed, c0, c1, c2, c3, n_rounds)`` for 32-bit counters, bit for bit: Philox4x32
    with key (seed low 32 bits, seed high 32 bits); the four uint32 words. PTX: each product is one
    wide multiply (``mul_hi_lo``)."""
    seed = tl.cast(seed, tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = tl.cast(c0, tl.uint32, bitcast=True)
    c1 = tl.cast(c1, tl.uint32, bitcast=True)
    c2 = tl.cast(c2, tl.uint32, bitcast=True)
    c3 = tl.cast(c3, tl.uint32, bitcast=True)
    for _ in tl.static_range(n_rounds):
        c0, c1, c2, c3 = philox_round(c0, c1, c2, c3, k0, k1, PTX)
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def philox_keyed(keys, c0, c1, c2, c3, n_rounds: tl.constexpr, PTX: tl.constexpr):
    """``philox`` with its round keys given: keys[2 r], keys[2 r + 1] are round r's (the key words
    plus r times the Weyl constants, mod 2**32), each passed as key + 2**32 (``launch.
    philox_round_keys``) and read through its low 32 bits; the same four words, bit for bit."""
    c0 = tl.cast(c0, tl.uint32, bitcast=True)
    c1 = tl.cast(c1, tl.uint32, bitcast=True)
    c2 = tl.cast(c2, tl.uint32, bitcast=True)
    c3 = tl.cast(c3, tl.uint32, bitcast=True)
    for r in tl.static_range(n_rounds):
        c0, c1, c2, c3 = philox_round(c0, c1, c2, c3, keys[2 * r].to(tl.uint32), keys[2 * r + 1].to(tl.uint32), PTX)
    return c0, c1, c2, c3


@triton.jit
def runtime_zero(finite_scalar):
    """0.0 that the compiler cannot see is zero (``finite_scalar * 0.0``; finite_scalar: a finite fp32
    kernel argument). Dropout zeroes the dropped weights with tl.where(keep, p, zero) right before
    converting them to 16 bits for a matmul; with a constant zero LLVM moves the select past the
    conversion (fptrunc(select(c, x, 0)) -> select(c, fptrunc(x), 0)), which on sm_90 costs two
    16-bit selects and three byte permutes per pair of weights instead of two FSELs."""
    return finite_scalar * 0.0


@triton.jit
def loop_variant_zero(i, PTX: tl.constexpr):
    """int32 0 computed from a loop's counter i, which the compiler cannot see is 0 where PTX (kernels
    compiled for an NVIDIA GPU: an inline-PTX ``and`` with 0, not pure); elsewhere (the interpreter,
    ROCm) a plain 0.
    Offsets built from it inside the loop stay in the loop: LLVM would otherwise hoist their
    loop-invariant part (a tile of 64-bit pointers, of positions) out of the loop and hold it in
    registers (ptxas spilling it) across everything the loop does."""
    if PTX:
        zero = tl.inline_asm_elementwise("and.b32 $0, $1, 0;", "=r,r", [i.to(tl.int32)], dtype=tl.int32,
                                         is_pure=False, pack=1)
    else:
        zero = 0
    return zero


@triton.jit
def opaque(x, PTX: tl.constexpr):
    """x (an int32 tensor) through an inline-PTX move the compiler cannot see through where PTX
    (not pure: never merged with another opaque(x), never hoisted out of a loop); x itself elsewhere.
    What is computed from it is computed where it is written: an epilogue's pointer tiles are then
    not built ahead of the loops before it and held across them."""
    if PTX:
        x = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [tl.cast(x, tl.int32)], dtype=tl.int32, is_pure=False,
                                      pack=1)
    return x


@triton.jit
def opaque_pointer(ptr, PTX: tl.constexpr):
    """ptr (a scalar pointer) through an inline-PTX move the compiler cannot see through where PTX
    (not pure); ptr itself elsewhere. Inside a loop, nothing computed from it is hoisted out of the
    loop: LLVM reassociates a pointer's loop-invariant offsets (a tile's per-thread columns) onto a
    kernel argument and holds the result across the loop."""
    if PTX:
        address = tl.inline_asm_elementwise("mov.b64 $0, $1;", "=l,l", [ptr.to(tl.int64)], dtype=tl.int64,
                                            is_pure=False, pack=1)
        ptr = address.to(ptr.dtype)
    return ptr


@triton.jit
def program_coordinates(num_rows, num_heads, BLOCK: tl.constexpr, FRESH_PID: tl.constexpr = False):
    """(outer, head, start, offs) of this program in a 1-D grid of cdiv(num_rows, BLOCK) row blocks
    (fastest) x num_heads x outer: outer and head as int64, the block's first row ``start`` and its
    rows ``offs`` = start + arange(BLOCK) (some past num_rows in the last block).
    FRESH_PID (kernels compiled for an NVIDIA GPU): from a fresh read of the program id and of
    num_rows, num_heads (inline PTX, not pure, so the compiler cannot reuse an earlier computation,
    the divisors' included): for an epilogue, so that the coordinates are not held in registers
    (spilled) across the kernel's loops."""
    if FRESH_PID:
        pid, num_rows, num_heads = tl.inline_asm_elementwise(
            "mov.u32 $0, %ctaid.x; mov.b32 $1, $3; mov.b32 $2, $4;", "=r,=r,=r,r,r",
            [tl.cast(num_rows, tl.int32), tl.cast(num_heads, tl.int32)], dtype=(tl.int32, tl.int32, tl.int32),
            is_pure=False, pack=1)
    else:
        pid = tl.program_id(0)
    num_blocks = tl.cdiv(num_rows, BLOCK)
    start = (pid % num_blocks) * BLOCK
    pid_outer_head = pid // num_blocks
    outer = (pid_outer_head // num_heads).to(tl.int64)
    head = (pid_outer_head % num_heads).to(tl.int64)
    return outer, head, start, start + tl.arange(0, BLOCK)


@triton.jit
def sequence_extent(CU_SEQLENS, n):
    """(start, length) of packed sequence n: CU_SEQLENS[n] (int64) and CU_SEQLENS[n + 1] - CU_SEQLENS[n]."""
    start = tl.load(CU_SEQLENS + n)
    return start.to(tl.int64), tl.load(CU_SEQLENS + n + 1) - start


@triton.jit
def query_rows(CU_SEQLENS_Q, CU_SEQLENS_K, b, h, num_q_heads, q_len, k_len, stat_rows, VARLEN: tl.constexpr):
    """(q_start, q_len, k_start, k_len, stat_base) of (example b, query head h): its first query and key
    rows, its query and key counts, and where its rows of LSE / delta start. Batched: starts 0, the
    given lengths, (b * Hq + h) * Sq. VARLEN (b is a packed sequence): its rows and lengths from
    cu_seqlens, and LSE laid out (Hq, total_q) with stat_rows = total_q."""
    stat_base = (b * num_q_heads + h) * q_len
    q_start = 0
    k_start = 0
    if VARLEN:
        q_start, q_len = sequence_extent(CU_SEQLENS_Q, b)
        k_start, k_len = sequence_extent(CU_SEQLENS_K, b)
        stat_base = h * stat_rows + q_start
    return q_start, q_len, k_start, k_len, stat_base


@triton.jit
def dropout_real_lane(prefix_len):
    """The dropout lane of real key 0: the prefix run of lanes padded to a multiple of 16, so that
    every key tile starts on a 16-key group (see ``attention_dropout_keep``)."""
    return (prefix_len + 15) // 16 * 16


@triton.jit
def attention_dropout_keep(seed, first_row, key_lane, threshold, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                           DROPOUT: tl.constexpr):
    """(BLOCK_R, BLOCK_K) keep mask of the attention weights of rows first_row.. (query rows) and
    key lanes key_lane.. (prefix key n: lane n; real key n: lane ``dropout_real_lane(P)`` + n),
    shared by the forward and backward kernels: a 16-bit random lane >= threshold, so
    P(keep) = 1 - threshold / 65536.

    first_row: int64 id of the tile's first query row (stat_base + start_m: unique per example,
    head and query; start_m a multiple of 16); key_lane: a multiple of 16. BLOCK_R, BLOCK_K:
    multiples of 16. DROPOUT: DROPOUT_PORTABLE (tl.philox), DROPOUT_PTX (``philox``) or
    DROPOUT_PTX_KEYS (``philox_keyed``; seed: the tuple of round keys), the same bits.

    One philox call (PHILOX_ROUNDS rounds, 4 x 32 bits = 8 16-bit lanes) draws the lanes
    of a 2 x 2 x 2 cell of the tile: rows (i, i + 8) x keys (j, j + 8) x keys (j, j + 1), for
    i % 16 < 8, j % 16 < 8, j even. Those are the elements one thread holds of the MMA accumulator of a (query, key) tile
    on sm_80 and sm_90 (row bit 3, key bits 0 and 3 are register bits there), so the mask is drawn
    where the scores live, with no layout conversion. The call's counter is (c0 = the cell's key
    index key // 16 * 4 + (key % 8) // 2, (c1, c2) = the id of row i, c3 = 0); lane
    4 * [row i + 8] + 2 * [key j + 8] + [key j + 1] of the 8 (lane l: bits 16 (l % 2).. of word l // 2)."""
    cells_r: tl.constexpr = BLOCK_R // 16
    cells_k: tl.constexpr = BLOCK_K // 16
    row = (first_row + (tl.arange(0, cells_r) * 16)[:, None, None, None]
           + tl.arange(0, 8)[None, :, None, None])  # (R/16, 8, 1, 1) int64: row i of each cell
    key = (key_lane // 4 + (tl.arange(0, cells_k) * 4)[:, None] + tl.arange(0, 4)[None, :])[None, None, :, :]
    c0, c1, c2 = key.to(tl.uint32), row.to(tl.uint32), (row >> 32).to(tl.uint32)
    if DROPOUT == DROPOUT_PTX_KEYS:  # seed: the round keys (interpreted: tl.umulhi products, for tests)
        r0, r1, r2, r3 = philox_keyed(seed, c0, c1, c2, 0, PHILOX_ROUNDS, KEYED_PTX)
    elif DROPOUT == DROPOUT_PTX:
        r0, r1, r2, r3 = philox(seed, c0, c1, c2, 0, PHILOX_ROUNDS, True)
    else:  # Triton's own (faster in the interpreter than ``philox``'s rounds run there)
        r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, 0, n_rounds=PHILOX_ROUNDS)
    # (R/16, 8, K/16, 4, key bit 3, row bit 3): word 2 * [row i + 8] + [key j + 8]
    words = tl.join(tl.join(r0, r1), tl.join(r2, r3))
    # lane >= threshold for both 16-bit halves, as unsigned 32-bit compares against threshold << 16
    # (tl.cast, not .to: a threshold of 1 reaches a compiled kernel as a constant, which Triton specialises)
    high_threshold = (tl.cast(threshold, tl.int32) << 16).to(tl.uint32, bitcast=True)
    keep = tl.join((words << 16) >= high_threshold, words >= high_threshold)  # (..., key bit 0)
    keep = tl.permute(keep, (0, 5, 1, 2, 4, 3, 6))  # (R/16, row bit 3, 8, K/16, key bit 3, 4, key bit 0)
    return tl.reshape(keep, (BLOCK_R, BLOCK_K))


@triton.jit
def consecutive_lanes_keep(seed, row_lanes, key_lane, threshold, BLOCK_R: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    """(BLOCK_R, BLOCK_K) keep mask of the prefix dropout (``prefix_dropout_keep``): 16-bit random lane
    >= threshold. row_lanes: (BLOCK_R,) int64 lane of each row's first element; key_lane: the tile's
    first element, a multiple of 8. One philox call (tl.randint4x, PHILOX_ROUNDS rounds: 4 x 32 bits)
    gives the lanes of 8 consecutive elements; P(keep) = 1 - threshold / 65536."""
    counters = (row_lanes[:, None] + key_lane) // 8 + tl.arange(0, BLOCK_K // 8)[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counters, n_rounds=PHILOX_ROUNDS)
    words = tl.join(tl.join(r0, r1), tl.join(r2, r3))  # (BLOCK_R, BLOCK_K / 8, 2, 2)
    lanes = tl.join(words & 0xFFFF, words >> 16)  # (BLOCK_R, BLOCK_K / 8, 2, 2, 2)
    return tl.reshape(lanes, (BLOCK_R, BLOCK_K)) >= threshold


@triton.jit
def _bitwise_or(a, b):
    return a | b


@triton.jit
def consecutive_lanes_keep_bits(seed, row_lanes, key_lane, threshold, BLOCK_R: tl.constexpr,
                                BLOCK_K: tl.constexpr):
    """``consecutive_lanes_keep``'s mask packed into int32 words: (BLOCK_R, BLOCK_K // WORD) with
    WORD = min(32, BLOCK_K), bit j of word (r, w) being element (r, WORD * w + j) of the mask
    (``unpack_keep_bits`` unpacks it). A kernel that needs a mask again after its loops holds it
    in 1/32 of the registers: 2 a thread for a 128 x 128 tile on 8 warps, where the mask takes 64.
    Each philox call's 8 lanes become 8 bits of one word."""
    WORD: tl.constexpr = min(32, BLOCK_K)
    counters = (row_lanes[:, None] + key_lane) // 8 + tl.arange(0, BLOCK_K // 8)[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counters, n_rounds=PHILOX_ROUNDS)
    # Element 8 c + 4 i + 2 j + h: word r_(i + 2 j)'s low (h = 0) or high (h = 1) 16 bits, the order
    # of consecutive_lanes_keep's joins (r0, r2, r1, r3).
    byte = ((r0 & 0xFFFF) >= threshold).to(tl.int32) | (((r0 >> 16) >= threshold).to(tl.int32) << 1)
    byte |= (((r2 & 0xFFFF) >= threshold).to(tl.int32) << 2) | (((r2 >> 16) >= threshold).to(tl.int32) << 3)
    byte |= (((r1 & 0xFFFF) >= threshold).to(tl.int32) << 4) | (((r1 >> 16) >= threshold).to(tl.int32) << 5)
    byte |= (((r3 & 0xFFFF) >= threshold).to(tl.int32) << 6) | (((r3 >> 16) >= threshold).to(tl.int32) << 7)
    bytes_of_words = tl.reshape(byte, (BLOCK_R, BLOCK_K // WORD, WORD // 8))
    return tl.reduce(bytes_of_words << (8 * tl.arange(0, WORD // 8))[None, None, :], 2, _bitwise_or)


@triton.jit
def unpack_keep_bits(words, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """The (BLOCK_R, BLOCK_K) keep mask that ``consecutive_lanes_keep_bits`` packed into words."""
    WORD: tl.constexpr = min(32, BLOCK_K)
    bits = (words[:, :, None] >> tl.arange(0, WORD)[None, None, :]) & 1
    return tl.reshape(bits, (BLOCK_R, BLOCK_K)) != 0


@triton.jit
def prefix_dropout_keep(seed, b, kv_h, which, num_kv_heads, prefix_len, head_dim, n, threshold,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FIRST_CHANNEL: tl.constexpr = 0,
                        PACKED: tl.constexpr = False):
    """(BLOCK_N, BLOCK_D) keep mask of P-Tuning v2's prefix dropout for example b, KV head kv_h,
    prefix positions n (BLOCK_N,) and channels FIRST_CHANNEL..FIRST_CHANNEL + BLOCK_D (a multiple of
    8: the head dim's tail part, ``split_head_dim``): ``which`` 0 for the keys, 1 for the values.

    Lane numbering: row ((b * Hkv + kv_h) * 2 + which) * P + n has round_up(D, 8) lanes, one per
    channel, drawn as ``consecutive_lanes_keep`` draws them (8 lanes per philox call); the same for
    every query and query head that reads this KV head, and regenerated identically in backward.
    PACKED: the same mask packed into int32 words (``consecutive_lanes_keep_bits``)."""
    width = (head_dim + 7) // 8 * 8
    rows = ((b * num_kv_heads + kv_h) * 2 + which) * prefix_len + n.to(tl.int64)
    if PACKED:
        keep = consecutive_lanes_keep_bits(seed, rows * width, FIRST_CHANNEL, threshold, BLOCK_N, BLOCK_D)
    else:
        keep = consecutive_lanes_keep(seed, rows * width, FIRST_CHANNEL, threshold, BLOCK_N, BLOCK_D)
    return keep


@triton.jit
def drop_prefix_kv(k, v, seed, b, kv_h, num_kv_heads, prefix_len, head_dim, n, threshold, scale,
                   PREFIX_DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   FIRST_CHANNEL: tl.constexpr = 0):
    """A loaded pair of (BLOCK_N, BLOCK_D) prefix K and V tiles of example b, channels
    FIRST_CHANNEL.., with their prefix dropout applied (kept elements times ``scale``, the rest 0;
    K's lanes ``which`` 0, V's 1); the tiles themselves without PREFIX_DROPOUT."""
    if PREFIX_DROPOUT:
        keep_k = prefix_dropout_keep(seed, b, kv_h, 0, num_kv_heads, prefix_len, head_dim, n, threshold,
                                     BLOCK_N, BLOCK_D, FIRST_CHANNEL)
        k = tl.where(keep_k, k * scale, 0.0).to(k.dtype)
        keep_v = prefix_dropout_keep(seed, b, kv_h, 1, num_kv_heads, prefix_len, head_dim, n, threshold,
                                     BLOCK_N, BLOCK_D, FIRST_CHANNEL)
        v = tl.where(keep_v, v * scale, 0.0).to(v.dtype)
    return k, v


@triton.jit
def example_prefix(PREFIX_INDEX, PREFIX_LENGTHS, b, entry_step, prefix_len,
                   HAS_INDEX: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """(entry, length) of example b's prefix: the bank entry PREFIX_INDEX[b] (HAS_INDEX), else
    b * entry_step (1 for a per-example prefix, 0 for a shared one); its length
    PREFIX_LENGTHS[entry] (HAS_LENGTHS), else P."""
    if HAS_INDEX:
        entry = tl.load(PREFIX_INDEX + b).to(tl.int64)
    else:
        entry = b * entry_step
    length = prefix_len
    if HAS_LENGTHS:
        length = tl.load(PREFIX_LENGTHS + entry)
    return entry, length


@triton.jit
def tanh(x):
    """tanh from exp2 (the interpreter and every GPU have it): 1 - 2 / (2^(2x log2 e) + 1); saturates
    to +-1 without NaN."""
    return 1.0 - 2.0 / (tl.math.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def log2_scores(qk, qk_scale_log2, softcap_in, softcap_out, SOFTCAP: tl.constexpr):
    """log2-domain scores of a raw q k^T tile: qk * scale * log2(e), or with SOFTCAP (Gemma 2's logit
    softcapping) softcap * tanh(qk * scale / softcap) * log2(e); softcap_in = scale / softcap,
    softcap_out = softcap * log2(e)."""
    if SOFTCAP:
        return softcap_out * tanh(qk * softcap_in)
    return qk * qk_scale_log2


@triton.jit
def relative_bias(BIAS_ROW, rel, bias_center, bias_last):
    """T5's relative position bias in the log2 domain for a tile of relative positions rel (int, any
    2-D shape) = key position - query position: BIAS_ROW[rel + L - 1] * log2(e) (bias_center = L - 1;
    the index is clamped to [0, bias_last], which only rows / keys outside the attention reach).
    BIAS_ROW: the query head's row of the (Hq, 2L - 1) float32 bias per relative position (the table
    gathered through the bucket map once per call by the launcher: one gather per score here)."""
    index = tl.minimum(tl.maximum(rel + bias_center, 0), bias_last)
    return tl.load(BIAS_ROW + index) * 1.4426950408889634


@triton.jit
def relative_bucket(BIAS_BUCKETS, rel, bias_center, bias_last):
    """The bucket ids BIAS_BUCKETS[rel + L - 1] of a tile of relative positions (for the table's gradient)."""
    return tl.load(BIAS_BUCKETS + tl.minimum(tl.maximum(rel + bias_center, 0), bias_last))


@triton.jit
def add_relative_bias(s, BIAS_ROW, key_pos, query_pos, bias_center, bias_last, BIAS: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) log2-domain scores s plus the relative bias of keys at key_pos (BLOCK_N,)
    for queries at query_pos (BLOCK_M,) (any common origin); s itself without BIAS."""
    if BIAS:
        s = s + relative_bias(BIAS_ROW, key_pos[None, :] - query_pos[:, None], bias_center, bias_last)
    return s


@triton.jit
def accumulate_bucket_grad(dbias, ds, bucket, NB_BLOCK: tl.constexpr):
    """dbias (NB_BLOCK,) float32 plus the sums of the gradient tile ds over the entries of each
    bucket (``bucket``: the tile's bucket ids, ds's shape). Loops over the buckets the tile holds only
    (a few near the diagonal, one far from it); a fixed order, so deterministic."""
    lo = tl.min(tl.min(bucket, 1), 0)
    hi = tl.max(tl.max(bucket, 1), 0)
    offs = tl.arange(0, NB_BLOCK)
    for bb in range(lo, hi + 1):
        total = tl.sum(tl.sum(tl.where(bucket == bb, ds, 0.0), 1), 0)
        dbias = tl.where(offs == bb, dbias + total, dbias)
    return dbias


@triton.jit
def load_tile(base, rows, stride_row, offs_d, row_valid, d_valid, UPCAST: tl.constexpr):
    """A (rows, BLOCK_D) tile of a row-major (S, D) matrix with unit last stride; masked entries read 0.

    UPCAST: compute in fp32 (the interpreter's bf16 tl.dot is wrong)."""
    tile = tl.load(base + rows[:, None].to(tl.int64) * stride_row + offs_d[None, :],
                   mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def load_full_tile(base, rows, stride_row, offs_d, d_valid, EVEN_D: tl.constexpr, UPCAST: tl.constexpr):
    """``load_tile`` for rows known to be in range: no row mask, and no mask at all when EVEN_D
    (head_dim == BLOCK_D)."""
    ptrs = base + rows[:, None].to(tl.int64) * stride_row + offs_d[None, :]
    if EVEN_D:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=d_valid[None, :], other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def descriptor_batch(b, VARLEN: tl.constexpr):
    """The batch index of example b's rows in a ``launch.tma_descriptor`` view: b, or 0 for packed
    sequences (viewed as one batch of all rows, as the pointer path's batch stride 0 reads them)."""
    batch = b
    if VARLEN:
        batch = 0
    return batch


@triton.jit
def load_full_rows(DESC, batch, head, first_row, base, rows, stride_row, offs_d, d_valid, EVEN_D: tl.constexpr,
                   UPCAST: tl.constexpr, TMA: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """``load_full_tile`` of rows first_row + (0..BLOCK_ROWS) (``rows``), all in range. TMA: through
    the tensor descriptor DESC of the 4-D (batch, head, row, D) tensor (``launch.tma_descriptor``:
    block (1, 1, BLOCK_ROWS, BLOCK_D), channels past head_dim read 0), at (batch, head, first_row);
    else through pointers (base: the (batch, head) matrix, as for ``load_full_tile``)."""
    if TMA:
        tile = DESC.load([tl.cast(batch, tl.int32), tl.cast(head, tl.int32), tl.cast(first_row, tl.int32),
                          0]).reshape(BLOCK_ROWS, BLOCK_D)
        if UPCAST:
            tile = tile.to(tl.float32)
    else:
        tile = load_full_tile(base, rows, stride_row, offs_d, d_valid, EVEN_D, UPCAST)
    return tile


@triton.jit
def load_edge_rows(DESC, batch, head, first_row, base, rows, stride_row, offs_d, row_valid, d_valid,
                   UPCAST: tl.constexpr, TMA: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """``load_tile`` of an edge tile, rows first_row + (0..BLOCK_ROWS) (``rows``) where row_valid.
    TMA: through DESC as ``load_full_rows``, for a tile whose invalid rows are past the end of the
    descriptor's (batch, head) matrix (TMA reads them as 0) or rows of real data the caller masks
    out of the scores (a prefix entry's rows past its length, keys the causal mask or window hides,
    and in the general padding-mask loop every key before Sk, which its pointer loads read anyway);
    the callers do not use it for the contiguous padding mask's edge tiles (their pointer loads
    read no key past the last attended one; TMA there compiled to more spills at D=64), nor past a
    packed sequence's end but in the prefix dK/dV kernel (the next sequence's query rows, weighted 0:
    the LSE of a row past the sequence's end reads +inf there)."""
    if TMA:
        tile = load_full_rows(DESC, batch, head, first_row, base, rows, stride_row, offs_d, d_valid, True, UPCAST,
                              TMA, BLOCK_ROWS, BLOCK_D)
    else:
        tile = load_tile(base, rows, stride_row, offs_d, row_valid, d_valid, UPCAST)
    return tile


@triton.jit
def load_tail_tile(base, rows, stride_row, offs_t, row_valid, t_valid, UPCAST: tl.constexpr,
                   BLOCK_D_TAIL: tl.constexpr):
    """``load_tile`` of the head dim's tail part, channels offs_t (BLOCK_D_TAIL,) (``split_head_dim``),
    or None without one (BLOCK_D_TAIL == 0)."""
    tile = None
    if BLOCK_D_TAIL > 0:
        tile = load_tile(base, rows, stride_row, offs_t, row_valid, t_valid, UPCAST)
    return tile


@triton.jit
def load_full_tail_rows(TAIL_DESC, batch, head, first_row, base, rows, stride_row, offs_t, t_valid,
                        EVEN_TAIL: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                        BLOCK_D_TAIL: tl.constexpr):
    """``load_full_rows`` of the head dim's tail part: channels offs_t (BLOCK_D_TAIL,) through pointers,
    or TAIL_DESC (a descriptor of the tensor's channels from the first tail channel on) with TMA;
    EVEN_TAIL: every tail channel is < head_dim. None without a tail (BLOCK_D_TAIL == 0)."""
    tile = None
    if BLOCK_D_TAIL > 0:
        tile = load_full_rows(TAIL_DESC, batch, head, first_row, base, rows, stride_row, offs_t, t_valid, EVEN_TAIL,
                              UPCAST, TMA, BLOCK_ROWS, BLOCK_D_TAIL)
    return tile


@triton.jit
def load_edge_tail_rows(TAIL_DESC, batch, head, first_row, base, rows, stride_row, offs_t, row_valid, t_valid,
                        UPCAST: tl.constexpr, TMA: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                        BLOCK_D_TAIL: tl.constexpr):
    """``load_edge_rows`` of the head dim's tail part (as ``load_full_tail_rows``), or None without one."""
    tile = None
    if BLOCK_D_TAIL > 0:
        tile = load_edge_rows(TAIL_DESC, batch, head, first_row, base, rows, stride_row, offs_t, row_valid, t_valid,
                              UPCAST, TMA, BLOCK_ROWS, BLOCK_D_TAIL)
    return tile


@triton.jit
def dot_tail(acc, a_tail, b_tail, DOT_PRECISION: tl.constexpr):
    """acc + a_tail @ b_tail^T: the head dim's tail part's share of a product that contracts over the
    head dim (scores q k^T, dP = dO v^T; a_tail (M, BLOCK_D_TAIL), b_tail (N, BLOCK_D_TAIL)); acc
    itself when the tails are None (no tail)."""
    if a_tail is not None:
        acc = tl.dot(a_tail, tl.trans(b_tail), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def key_bounds(KEY_BOUNDS, b, k_len, HAS_KPM: tl.constexpr):
    """(lo, hi, contiguous) of example b's attended real keys: with a key padding mask, its
    KEY_BOUNDS row (first attended key, one past the last, 1 when every key in between is attended:
    right or left padding); without one, (0, Sk, True)."""
    lo = 0
    hi = k_len
    contiguous = True
    if HAS_KPM:
        lo = tl.load(KEY_BOUNDS + b * 3)
        hi = tl.load(KEY_BOUNDS + b * 3 + 1)
        contiguous = tl.load(KEY_BOUNDS + b * 3 + 2) != 0
    return lo, hi, contiguous


@triton.jit
def bounded_keys_visible(n, lo, hi, offs_m, q_len, k_len, CAUSAL: tl.constexpr, window=0,
                         WINDOW: tl.constexpr = False):
    """(BLOCK_M, BLOCK_N)-broadcastable mask of real keys n in [lo, hi) (and, with CAUSAL, at most
    offs_m + Sk - Sq; with WINDOW, within ``window`` of it): ``real_keys_visible`` for a contiguous run
    of attended keys, with no mask loads."""
    visible_2d = ((n >= lo) & (n < hi))[None, :]
    if CAUSAL:
        visible_2d = visible_2d & (n[None, :] <= offs_m[:, None] + (k_len - q_len))
    if WINDOW:
        visible_2d = visible_2d & in_window(n, offs_m + (k_len - q_len), window)
    return visible_2d


@triton.jit
def prefix_tile_ranges(example_prefix_len, start_m, q_len, k_len, window, BLOCK_N: tl.constexpr,
                       WINDOW: tl.constexpr):
    """(full_end, masked_from) of the prefix tiles for the query block starting at start_m: tiles
    [0, full_end) are seen in full by every query of the block (no masks), tiles [masked_from, P_b)
    are masked: the last partial one, or with WINDOW every tile from the first that the block's first
    query still sees (the prefix sits at positions 0..P_b-1, so it slides out of the window)."""
    full_end = (example_prefix_len // BLOCK_N) * BLOCK_N
    masked_from = full_end
    if WINDOW:
        full_end = 0
        masked_from = tl.maximum(example_prefix_len + (k_len - q_len) + start_m - window + 1, 0)
        masked_from = masked_from // BLOCK_N * BLOCK_N
    return full_end, masked_from


@triton.jit
def window_key_bounds(lo, start_m, q_len, k_len, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      WINDOW: tl.constexpr):
    """(first, full_lo) of the real keys >= lo for the query block starting at start_m: the first key
    any of its queries may see, and the first tile start from which every query of the block has the
    keys in its window (cdiv(lo, BLOCK_N) * BLOCK_N without WINDOW)."""
    first = lo
    full_lo = tl.cdiv(lo, BLOCK_N) * BLOCK_N
    if WINDOW:  # keys every query of the block has in its window start later; the first query's earlier
        full_lo = tl.cdiv(tl.maximum(lo, start_m + BLOCK_M + (k_len - q_len) - window), BLOCK_N) * BLOCK_N
        first = tl.maximum(lo, start_m + (k_len - q_len) - window + 1)
    return first, full_lo


@triton.jit
def in_window(key_pos, query_pos, window):
    """(BLOCK_M, BLOCK_N) sliding-window mask: key at position key_pos (BLOCK_N,) is within the
    window of the query at query_pos (BLOCK_M,) iff query_pos - key_pos < window (transformers'
    sliding window; the prefix keys sit at positions 0..P-1 before the real keys, as in PEFT's cache)."""
    return (query_pos[:, None] - key_pos[None, :]) < window


@triton.jit
def real_keys_visible(
    KEY_PADDING_MASK, b, stride_mb, stride_mn, n, n_valid, offs_m, q_len, k_len,
    HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, window=0, WINDOW: tl.constexpr = False,
):
    """(BLOCK_M, BLOCK_N)-broadcastable mask: real key n is visible to query offs_m
    (in range, not padded in the (B, Sk) key padding mask KEY_PADDING_MASK, with CAUSAL at most
    offs_m + Sk - Sq, with WINDOW within ``window`` of it)."""
    visible = n_valid
    if HAS_KPM:
        attend = tl.load(KEY_PADDING_MASK + b * stride_mb + n.to(tl.int64) * stride_mn, mask=n_valid, other=0)
        visible = visible & (attend != 0)
    visible_2d = visible[None, :]
    if CAUSAL:
        visible_2d = visible_2d & (n[None, :] <= offs_m[:, None] + (k_len - q_len))
    if WINDOW:
        visible_2d = visible_2d & in_window(n, offs_m + (k_len - q_len), window)
    return visible_2d


# triton.jit chose between compiling and interpreting when this module was imported (it reads
# TRITON_INTERPRET then), for these helpers and for the kernels that import them alike. So the
# launch settings that differ for the interpreter follow the kernels themselves, not the
# environment at launch time (launch.device_limits reads this).
KERNELS_INTERPRETED = not isinstance(load_tile, JITFunction)
# The DROPOUT_PTX_KEYS products: inline PTX where compiled (the launchers choose that mode on NVIDIA
# GPUs only); in the interpreter tl.umulhi, so that a test can run the keyed kernels end to end there
# (tests/test_dropout_numbering.py), the launchers never choosing it.
KEYED_PTX: tl.constexpr = tl.constexpr(not KERNELS_INTERPRETED)
