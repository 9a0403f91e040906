"""Fast decode attention over a KIVI cache (one query token), reading packed K/V directly.

C++ through `torch.utils.cpp_extension.load_inline` (JIT, cached in torch's extension dir;
-O3 -march=native, at::parallel_for over batch × KV head × sequence split). Algorithm per
(batch row, KV head, split of the quantized blocks):

1. logits. fp sink / residual tokens: q·k. Quantized key block (per-channel s, m over G tokens):
   q·(s⊙k_q + m) = (q⊙s)·k_q + q·m, so per block we form qs = scale·q⊙s (D floats) and
   qm = scale·q·m once per query head; a block's keys are stored channel-major, so the block is
   unpacked once (one long vector loop, shared by the rep = Hq/Hkv query heads of the group,
   GQA) and its G logits are qm + Σ_d qs_d · codes[d, :]: axpys over the G tokens — vector
   work, no per-token horizontal sums. Masked columns (padding, sliding
   window) get −inf; blocks entirely masked are skipped.
2. softmax over [sink | quantized | residual] logits of the split (one softmax: the splits are
   merged exactly afterwards with the online-softmax rule m = max m_i, l = Σ l_i e^{m_i−m}).
3. values (per-token s, m per group of gv channels): Σ_t p_t (s_tg v_q + m_tg) accumulated as
   acc[d] += (p_t s_tg) v_q[d] and c_g += p_t m_tg (added once at the end), over a block
   unpacked once for the rep heads.
No dense cache is materialized. With AVX-512 (the build uses -march=native) and G, D, gv
multiples of 16, the block loops are intrinsics: 16 packed bytes are zero-extended to 16 lanes,
each bit plane is shifted/masked/converted in registers and feeds FMAs for up to 4 query heads
at once (two accumulator sets to hide FMA latency), so codes never go through memory as floats;
the row max, the exponentials (a vector port of exp_neg) and the per-group value-min terms
(accumulated as vectors, reduced once per split) are vectorized too — the scalar versions of
those cost as much as the blocks themselves at 16k tokens. Otherwise (or for other shapes) one
block's G×D codes at a time are unpacked into an L1-sized float buffer (8 KB at G=32, D=64)
and the generic loops run. Both paths are tested against the reference; `kivi_simd()` reports
which one the build has. Per-token keys (k_axis="token", an ablation) run the reference.
A key rotation (KVSpec.k_rotation) needs nothing here: KIVICache.attend rotates q and the keys
before they reach the cache, so q and the packed keys are already in the same (rotated) basis.

If the extension cannot be built (no ninja, no compiler, or disabled by the env var
MCOMP_NO_KIVI_KERNEL=1), `available()` is False and the cache uses the reference path; asking
for the kernel explicitly (`load()`) raises KernelUnavailable with the reason.
"""
from __future__ import annotations

import torch

from .jit import CFLAGS, LDFLAGS, JitExtension

_NAME = "mcomp_kivi_attention_v9"

_SRC = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <cmath>
#include <vector>
#include <limits>
#include <algorithm>
#include <cstring>
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

using c10::Half;

template <int BITS>
static inline void unpack_row(const uint8_t* __restrict p, float* __restrict out, int D) {
  constexpr int PER = 8 / BITS;
  constexpr int MASK = (1 << BITS) - 1;
  const int W = D / PER;
  for (int j = 0; j < PER; ++j) {
    float* __restrict o = out + j * W;
    for (int i = 0; i < W; ++i) o[i] = (float)((p[i] >> (j * BITS)) & MASK);
  }
}
template <>
inline void unpack_row<8>(const uint8_t* __restrict p, float* __restrict out, int D) {
  for (int i = 0; i < D; ++i) out[i] = (float)p[i];
}

// fp16 → fp32 for a run of scales/mins (F16C when compiled for it)
static inline void h2f(const Half* __restrict src, float* __restrict dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(src + i))));
#endif
  for (; i < n; ++i) dst[i] = (float)src[i];
}

// exp(x) for x <= 0 (softmax after max subtraction); 0 below -87 (and for -inf, masked keys).
// Cody-Waite split x = k ln2 + f, degree-6 polynomial for 2^f: relative error ~2e-7, and a
// branch-free body the compiler vectorizes (std::exp is a scalar call).
static inline float exp_neg(float x) {
  const bool zero = !(x >= -87.f);
  x = zero ? -87.f : x;
  const float t = x * 1.4426950408889634f;
  const float fi = std::floor(t);
  const float f = t - fi;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const float sc = __builtin_bit_cast(float, ((int32_t)fi + 127) << 23);
  return zero ? 0.f : p * sc;
}

static inline float dotf(const float* __restrict a, const float* __restrict b, int D) {
  float s = 0.f;
#pragma omp simd reduction(+:s)
  for (int i = 0; i < D; ++i) s += a[i] * b[i];
  return s;
}

// Logits of one key block: L[i] = qm + sum_d qs[d] * kb[d*G + i] (codes channel-major).
// Fast path (G % 16 == 0): 16-token register accumulators, 4 independent partial sums over d so
// the FMA chains do not serialize through memory.
static inline void block_logits(const float* __restrict kb, const float* __restrict qs, float qm,
                                int64_t D, int64_t G, float* __restrict L) {
  if (G % 16 == 0) {
    for (int64_t i0 = 0; i0 < G; i0 += 16) {
      float a0[16], a1[16], a2[16], a3[16];
      for (int ii = 0; ii < 16; ++ii) { a0[ii] = qm; a1[ii] = 0.f; a2[ii] = 0.f; a3[ii] = 0.f; }
      int64_t d = 0;
      for (; d + 4 <= D; d += 4) {
        const float w0 = qs[d], w1 = qs[d + 1], w2 = qs[d + 2], w3 = qs[d + 3];
        const float* __restrict x = kb + d * G + i0;
        for (int ii = 0; ii < 16; ++ii) {
          a0[ii] += w0 * x[ii]; a1[ii] += w1 * x[G + ii];
          a2[ii] += w2 * x[2 * G + ii]; a3[ii] += w3 * x[3 * G + ii];
        }
      }
      for (; d < D; ++d) for (int ii = 0; ii < 16; ++ii) a0[ii] += qs[d] * kb[d * G + i0 + ii];
      for (int ii = 0; ii < 16; ++ii) L[i0 + ii] = (a0[ii] + a1[ii]) + (a2[ii] + a3[ii]);
    }
    return;
  }
  for (int64_t i = 0; i < G; ++i) L[i] = qm;
  for (int64_t d = 0; d < D; ++d) {
    const float w = qs[d];
    for (int64_t i = 0; i < G; ++i) L[i] += w * kb[d * G + i];
  }
}

// Weighted sum of one value block: o[d] += sum_i ps[(d/gv)*G + i] * vb[i*D + d] (token-major
// codes, weights group-major).
// Fast path (gv % 16 == 0): 16-channel register accumulators, 4 partial sums over tokens.
static inline void block_values(const float* __restrict vb, const float* __restrict ps, int64_t G,
                                int64_t D, int64_t gv, float* __restrict o) {
  if (gv % 16 == 0) {
    for (int64_t c0 = 0; c0 < D; c0 += 16) {
      const int64_t g = c0 / gv;
      float a0[16], a1[16], a2[16], a3[16];
      for (int ii = 0; ii < 16; ++ii) { a0[ii] = 0.f; a1[ii] = 0.f; a2[ii] = 0.f; a3[ii] = 0.f; }
      int64_t i = 0;
      for (; i + 4 <= G; i += 4) {
        const float w0 = ps[g * G + i], w1 = ps[g * G + i + 1];
        const float w2 = ps[g * G + i + 2], w3 = ps[g * G + i + 3];
        const float* __restrict x = vb + i * D + c0;
        for (int ii = 0; ii < 16; ++ii) {
          a0[ii] += w0 * x[ii]; a1[ii] += w1 * x[D + ii];
          a2[ii] += w2 * x[2 * D + ii]; a3[ii] += w3 * x[3 * D + ii];
        }
      }
      for (; i < G; ++i) for (int ii = 0; ii < 16; ++ii) a0[ii] += ps[g * G + i] * vb[i * D + c0 + ii];
      for (int ii = 0; ii < 16; ++ii) o[c0 + ii] += (a0[ii] + a1[ii]) + (a2[ii] + a3[ii]);
    }
    return;
  }
  for (int64_t i = 0; i < G; ++i)
    for (int64_t d = 0; d < D; ++d) o[d] += ps[(d / gv) * G + i] * vb[i * D + d];
}

#if defined(__AVX512F__)
// ---- AVX-512 block kernels: codes go straight from packed bytes to registers (zero-extend 16
// bytes, shift/mask one plane, convert) and feed FMAs for up to 4 query heads of the GQA group
// at once, with two accumulator sets so consecutive FMAs do not wait on each other. Nothing is
// written to memory but the block's G logits / the D outputs. Planar packing (kv/kivi.py) is
// what makes this work: byte row i of a block holds codes i, i+W, i+2W, ... so one 16-byte load
// gives 16 consecutive codes of each of the 8/BITS planes.
template <int BITS>
static inline __m512 plane_f(__m512i x, int j) {
  if constexpr (BITS == 8) {
    (void)j;
    return _mm512_cvtepi32_ps(x);
  } else {
    const __m512i y = _mm512_srlv_epi32(x, _mm512_set1_epi32(BITS * j));
    return _mm512_cvtepi32_ps(_mm512_and_si512(y, _mm512_set1_epi32((1 << BITS) - 1)));
  }
}

static inline __m512i load16(const uint8_t* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
}

// Logits of one key block for R query heads: L[r][t] = qm[r] + sum_d qs[r][d] * code[d*G + t].
// Channel d < D/PER of plane j is channel d + j*D/PER; its G codes start at byte d*G.
template <int BITS, int R>
static void k_block_simd(const uint8_t* __restrict codes, const float* __restrict qs,
                         const float* __restrict qm, int64_t D, int64_t G, float* __restrict L,
                         int64_t ldl) {
  constexpr int PER = 8 / BITS;
  const int64_t DP = D / PER;
  for (int64_t t0 = 0; t0 < G; t0 += 16) {
    __m512 a0[R], a1[R];
    for (int r = 0; r < R; ++r) { a0[r] = _mm512_set1_ps(qm[r]); a1[r] = _mm512_setzero_ps(); }
    if constexpr (PER == 1) {           // 8-bit: alternate accumulators over channels instead
      int64_t d = 0;
      for (; d + 2 <= DP; d += 2) {
        const __m512 f0 = plane_f<BITS>(load16(codes + d * G + t0), 0);
        const __m512 f1 = plane_f<BITS>(load16(codes + (d + 1) * G + t0), 0);
        for (int r = 0; r < R; ++r) {
          a0[r] = _mm512_fmadd_ps(_mm512_set1_ps(qs[r * D + d]), f0, a0[r]);
          a1[r] = _mm512_fmadd_ps(_mm512_set1_ps(qs[r * D + d + 1]), f1, a1[r]);
        }
      }
      for (; d < DP; ++d) {
        const __m512 f0 = plane_f<BITS>(load16(codes + d * G + t0), 0);
        for (int r = 0; r < R; ++r) a0[r] = _mm512_fmadd_ps(_mm512_set1_ps(qs[r * D + d]), f0, a0[r]);
      }
    } else {
      for (int64_t d = 0; d < DP; ++d) {
        const __m512i x = load16(codes + d * G + t0);
#pragma GCC unroll 4
        for (int j = 0; j < PER; ++j) {
          const __m512 f = plane_f<BITS>(x, j);
          const float* w = qs + d + j * DP;
          for (int r = 0; r < R; ++r) {
            if (j & 1) a1[r] = _mm512_fmadd_ps(_mm512_set1_ps(w[r * D]), f, a1[r]);
            else       a0[r] = _mm512_fmadd_ps(_mm512_set1_ps(w[r * D]), f, a0[r]);
          }
        }
      }
    }
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(L + r * ldl + t0, _mm512_add_ps(a0[r], a1[r]));
  }
}

// Weighted values of one block for R query heads: o[r][d] += sum_t w[r][g(d)][t] * code[t*D + d]
// (w = p_t * s_tg, laid out (R, NG, G)). Token t < G/PER of plane j is token t + j*G/PER; its D
// codes start at byte t*D.
template <int BITS, int R>
static void v_block_simd(const uint8_t* __restrict codes, const float* __restrict w, int64_t G,
                         int64_t D, int64_t gv, float* __restrict o) {
  constexpr int PER = 8 / BITS;
  const int64_t TP = G / PER, NG = D / gv;
  for (int64_t d0 = 0; d0 < D; d0 += 16) {
    const float* wg = w + (d0 / gv) * G;            // + r*NG*G + token
    __m512 a0[R], a1[R];
    for (int r = 0; r < R; ++r) { a0[r] = _mm512_setzero_ps(); a1[r] = _mm512_setzero_ps(); }
    if constexpr (PER == 1) {
      int64_t t = 0;
      for (; t + 2 <= TP; t += 2) {
        const __m512 f0 = plane_f<BITS>(load16(codes + t * D + d0), 0);
        const __m512 f1 = plane_f<BITS>(load16(codes + (t + 1) * D + d0), 0);
        for (int r = 0; r < R; ++r) {
          a0[r] = _mm512_fmadd_ps(_mm512_set1_ps(wg[r * NG * G + t]), f0, a0[r]);
          a1[r] = _mm512_fmadd_ps(_mm512_set1_ps(wg[r * NG * G + t + 1]), f1, a1[r]);
        }
      }
      for (; t < TP; ++t) {
        const __m512 f0 = plane_f<BITS>(load16(codes + t * D + d0), 0);
        for (int r = 0; r < R; ++r) a0[r] = _mm512_fmadd_ps(_mm512_set1_ps(wg[r * NG * G + t]), f0, a0[r]);
      }
    } else {
      for (int64_t t = 0; t < TP; ++t) {
        const __m512i x = load16(codes + t * D + d0);
#pragma GCC unroll 4
        for (int j = 0; j < PER; ++j) {
          const __m512 f = plane_f<BITS>(x, j);
          const float* wt = wg + t + j * TP;
          for (int r = 0; r < R; ++r) {
            if (j & 1) a1[r] = _mm512_fmadd_ps(_mm512_set1_ps(wt[r * NG * G]), f, a1[r]);
            else       a0[r] = _mm512_fmadd_ps(_mm512_set1_ps(wt[r * NG * G]), f, a0[r]);
          }
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      float* orow = o + r * D + d0;
      _mm512_storeu_ps(orow, _mm512_add_ps(_mm512_loadu_ps(orow), _mm512_add_ps(a0[r], a1[r])));
    }
  }
}

// The GQA group's rep query heads in chunks of up to 4 (register budget: 2·R accumulators).
template <int BITS>
static void k_block_fast(const uint8_t* codes, const float* qs, const float* qm, int64_t D,
                         int64_t G, float* L, int64_t ldl, int64_t rep) {
  for (int64_t r0 = 0; r0 < rep; r0 += 4) {
    const float* s = qs + r0 * D; const float* m = qm + r0; float* l = L + r0 * ldl;
    switch (std::min<int64_t>(4, rep - r0)) {
      case 1: k_block_simd<BITS, 1>(codes, s, m, D, G, l, ldl); break;
      case 2: k_block_simd<BITS, 2>(codes, s, m, D, G, l, ldl); break;
      case 3: k_block_simd<BITS, 3>(codes, s, m, D, G, l, ldl); break;
      default: k_block_simd<BITS, 4>(codes, s, m, D, G, l, ldl); break;
    }
  }
}

template <int BITS>
static void v_block_fast(const uint8_t* codes, const float* w, int64_t G, int64_t D, int64_t gv,
                         float* o, int64_t rep) {
  const int64_t NG = D / gv;
  for (int64_t r0 = 0; r0 < rep; r0 += 4) {
    const float* wr = w + r0 * NG * G; float* orow = o + r0 * D;
    switch (std::min<int64_t>(4, rep - r0)) {
      case 1: v_block_simd<BITS, 1>(codes, wr, G, D, gv, orow); break;
      case 2: v_block_simd<BITS, 2>(codes, wr, G, D, gv, orow); break;
      case 3: v_block_simd<BITS, 3>(codes, wr, G, D, gv, orow); break;
      default: v_block_simd<BITS, 4>(codes, wr, G, D, gv, orow); break;
    }
  }
}
#define KIVI_SIMD 1
#else
#define KIVI_SIMD 0
#endif

// ---- softmax pieces: the scalar exp_neg does not vectorize (GCC keeps floor/bit_cast scalar),
// and at 16k context the exponentials alone cost as much as the key blocks.
#if KIVI_SIMD
static inline __m512 exp_neg16(__m512 x) {   // exp_neg, 16 lanes (same polynomial)
  const __mmask16 zero = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_NGE_UQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  const __m512 fi = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, fi);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fi), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps(~zero, p, _mm512_castsi512_ps(e));
}
#endif

static inline float row_max(const float* __restrict L, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
#if KIVI_SIMD
  __m512 v = _mm512_set1_ps(m);
  for (; i + 16 <= n; i += 16) v = _mm512_max_ps(v, _mm512_loadu_ps(L + i));
  m = _mm512_reduce_max_ps(v);
#endif
  for (; i < n; ++i) m = std::max(m, L[i]);
  return m;
}

// L[i] ← exp(L[i] − m) (0 for −inf); returns the sum.
static inline float exp_row(float* __restrict L, int64_t n, float m) {
  float s = 0.f;
  int64_t i = 0;
#if KIVI_SIMD
  const __m512 mm = _mm512_set1_ps(m);
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m512 e = exp_neg16(_mm512_sub_ps(_mm512_loadu_ps(L + i), mm));
    _mm512_storeu_ps(L + i, e);
    acc = _mm512_add_ps(acc, e);
  }
  s = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) { const float e = exp_neg(L[i] - m); L[i] = e; s += e; }
  return s;
}

// sum_i a[i]*b[i] (b == nullptr: sum_i a[i]); a tree reduction, not a serial chain of adds
static inline float dot_sum(const float* __restrict a, const float* __restrict b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#if KIVI_SIMD
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16)
    acc = b ? _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc)
            : _mm512_add_ps(_mm512_loadu_ps(a + i), acc);
  s = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) s += b ? a[i] * b[i] : a[i];
  return s;
}

struct Args {
  const float* q; int64_t B, Hq, H, D, rep;
  const float* sink_k; const float* sink_v; int64_t Ns;          // (B,H,Ns,D) contiguous
  const uint8_t* kq; const Half* ks; const Half* km;             // (B,H,capb,G*D*kb/8), (B,H,capb,D)
  const uint8_t* vq; const Half* vs; const Half* vm;             // (B,H,capb,G*D*vb/8), (B,H,capb,NGv,G)
  int64_t capb, nq, G, gv;
  const float* res_k; const float* res_v; int64_t Nr;            // (B,H,Nr,D)
  const bool* mask; int64_t S;                                    // (B,S) or null
  float scale; int64_t nsplit;
};

template <int KB, int VB>
static void run_split(const Args& a, int64_t b, int64_t h, int64_t sp,
                      float* pm, float* pl, float* pacc) {
  const int64_t D = a.D, rep = a.rep, G = a.G, gv = a.gv, NG = D / gv;
  const int64_t nblk = a.nq / G;
  const int64_t blk0 = nblk * sp / a.nsplit, blk1 = nblk * (sp + 1) / a.nsplit;
  const bool first = sp == 0, last = sp == a.nsplit - 1;
  const int64_t ns = first ? a.Ns : 0, nr = last ? a.Nr : 0;
  const int64_t nqt = (blk1 - blk0) * G;
  const int64_t n = ns + nqt + nr;
  const int64_t bh = b * a.H + h;
  const float* q = a.q + (b * a.Hq + h * rep) * D;               // rep rows of D
  const bool* mrow = a.mask ? a.mask + b * a.S : nullptr;
  const int64_t col_r0 = a.Ns + a.nq;
  const float NEG = -std::numeric_limits<float>::infinity();

  std::vector<float> logit(rep * n), qs(rep * D), qm(rep), sf(D), mf(D);
#if KIVI_SIMD
  // fast paths: whole 16-lane vectors of tokens (keys) / channels (values), planes of whole rows
  const bool simd_k = G % 16 == 0 && D % (8 / KB) == 0;
  const bool simd_v = D % 16 == 0 && gv % 16 == 0 && G % (8 / VB) == 0;
#endif
  // ---- logits
  auto fp_logits = [&](const float* K, int64_t cnt, int64_t col0, int64_t off) {
    for (int64_t t = 0; t < cnt; ++t) {
      const bool ok = !mrow || mrow[col0 + t];
      for (int64_t r = 0; r < rep; ++r)
        logit[r * n + off + t] = ok ? a.scale * dotf(q + r * D, K + t * D, D) : NEG;
    }
  };
  if (ns) fp_logits(a.sink_k + bh * a.Ns * D, ns, 0, 0);
  std::vector<float> blkbuf(G * D);
  const int64_t Wk = G * D * KB / 8, Wv = G * D * VB / 8;   // bytes per block row
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    const int64_t off0 = ns + (blk - blk0) * G, t0 = blk * G;
    bool any = !mrow;
    if (mrow) for (int64_t i = 0; i < G && !any; ++i) any = mrow[a.Ns + t0 + i];
    if (!any) {  // whole block outside the window / padding: skip its work
      for (int64_t r = 0; r < rep; ++r) for (int64_t i = 0; i < G; ++i) logit[r * n + off0 + i] = NEG;
      continue;
    }
    h2f(a.ks + (bh * a.capb + blk) * D, sf.data(), D);
    h2f(a.km + (bh * a.capb + blk) * D, mf.data(), D);
    for (int64_t r = 0; r < rep; ++r) {   // the per-channel scale/min folded into the query
      const float* qr = q + r * D;
      float* __restrict qsr = qs.data() + r * D;
      for (int64_t d = 0; d < D; ++d) qsr[d] = a.scale * qr[d] * sf[d];
      qm[r] = a.scale * dot_sum(qr, mf.data(), D);
    }
    const uint8_t* kcodes = a.kq + (bh * a.capb + blk) * Wk;   // channel-major: code[d * G + i]
#if KIVI_SIMD
    if (simd_k) {
      k_block_fast<KB>(kcodes, qs.data(), qm.data(), D, G, logit.data() + off0, n, rep);
    } else
#endif
    {
      unpack_row<KB>(kcodes, blkbuf.data(), (int)(G * D));
      for (int64_t r = 0; r < rep; ++r)
        block_logits(blkbuf.data(), qs.data() + r * D, qm[r], D, G, logit.data() + r * n + off0);
    }
    if (mrow)
      for (int64_t i = 0; i < G; ++i)
        if (!mrow[a.Ns + t0 + i]) for (int64_t r = 0; r < rep; ++r) logit[r * n + off0 + i] = NEG;
  }
  if (nr) fp_logits(a.res_k + bh * a.Nr * D, nr, col_r0, ns + nqt);
  // ---- softmax (unnormalized; the merge normalizes)
  std::vector<float> mx(rep), sum(rep, 0.f);
  for (int64_t r = 0; r < rep; ++r) {
    float* L = logit.data() + r * n;
    const float m_ = row_max(L, n);
    mx[r] = m_;
    if (m_ == NEG) { std::fill(L, L + n, 0.f); sum[r] = 0.f; }
    else sum[r] = exp_row(L, n, m_);
  }
  // ---- values
  std::vector<float> acc(rep * D, 0.f);
  auto fp_values = [&](const float* V, int64_t cnt, int64_t off) {
    for (int64_t t = 0; t < cnt; ++t)
      for (int64_t r = 0; r < rep; ++r) {
        const float p = logit[r * n + off + t];
        if (p == 0.f) continue;
        float* __restrict o = acc.data() + r * D; const float* v = V + t * D;
        for (int64_t d = 0; d < D; ++d) o[d] += p * v[d];
      }
  };
  if (ns) fp_values(a.sink_v + bh * a.Ns * D, ns, 0);
  // vsT, vmT: one block's value scales / mins, group-major (g*G + i) as the cache stores them;
  // cvec accumulates p_t·m_tg per (head, group, token slot) across blocks, summed once at the end
  std::vector<float> vsT(G * NG), vmT(G * NG), psb(rep * NG * G), cvec(rep * NG * G, 0.f);
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    const int64_t t0 = blk * G, off0 = ns + (blk - blk0) * G;
    bool anyb = false;
    for (int64_t r = 0; r < rep && !anyb; ++r)
      for (int64_t i = 0; i < G; ++i) if (logit[r * n + off0 + i] != 0.f) { anyb = true; break; }
    if (!anyb) continue;
    h2f(a.vs + (bh * a.capb + blk) * NG * G, vsT.data(), G * NG);
    h2f(a.vm + (bh * a.capb + blk) * NG * G, vmT.data(), G * NG);
    for (int64_t r = 0; r < rep; ++r) {
      const float* P = logit.data() + r * n + off0;
      for (int64_t g = 0; g < NG; ++g) {   // sum_t p_t (s_tg v_q + m_tg): m part once per group
        const float* __restrict st = vsT.data() + g * G;
        const float* __restrict mt = vmT.data() + g * G;
        float* __restrict pg = psb.data() + (r * NG + g) * G;
        float* __restrict cg = cvec.data() + (r * NG + g) * G;
        for (int64_t i = 0; i < G; ++i) { pg[i] = P[i] * st[i]; cg[i] += P[i] * mt[i]; }
      }
    }
    const uint8_t* vcodes = a.vq + (bh * a.capb + blk) * Wv;   // token-major: code[i * D + d]
#if KIVI_SIMD
    if (simd_v) {
      v_block_fast<VB>(vcodes, psb.data(), G, D, gv, acc.data(), rep);
    } else
#endif
    {
      unpack_row<VB>(vcodes, blkbuf.data(), (int)(G * D));
      for (int64_t r = 0; r < rep; ++r)
        block_values(blkbuf.data(), psb.data() + r * NG * G, G, D, gv, acc.data() + r * D);
    }
  }
  for (int64_t r = 0; r < rep; ++r)
    for (int64_t g = 0; g < NG; ++g) {
      const float c = dot_sum(cvec.data() + (r * NG + g) * G, nullptr, G);
      for (int64_t d = g * gv; d < (g + 1) * gv; ++d) acc[r * D + d] += c;
    }
  if (nr) fp_values(a.res_v + bh * a.Nr * D, nr, ns + nqt);
  for (int64_t r = 0; r < rep; ++r) {
    pm[r] = mx[r]; pl[r] = sum[r];
    for (int64_t d = 0; d < D; ++d) pacc[r * D + d] = acc[r * D + d];
  }
}

template <int KB, int VB>
static void run_all(const Args& a, float* out) {
  const int64_t tasks = a.B * a.H * a.nsplit, rep = a.rep, D = a.D;
  std::vector<float> pm(tasks * rep), pl(tasks * rep), pacc(tasks * rep * D);
  at::parallel_for(0, tasks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t sp = i % a.nsplit, bh = i / a.nsplit;
      run_split<KB, VB>(a, bh / a.H, bh % a.H, sp, pm.data() + i * rep, pl.data() + i * rep,
                        pacc.data() + i * rep * D);
    }
  });
  const float NEG = -std::numeric_limits<float>::infinity();
  for (int64_t bh = 0; bh < a.B * a.H; ++bh)
    for (int64_t r = 0; r < rep; ++r) {
      float m = NEG;
      for (int64_t sp = 0; sp < a.nsplit; ++sp) m = std::max(m, pm[(bh * a.nsplit + sp) * rep + r]);
      float l = 0.f;
      float* o = out + (bh * rep + r) * D;   // (B, Hq, D): q head = h*rep + r
      for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
      for (int64_t sp = 0; sp < a.nsplit; ++sp) {
        const int64_t i = (bh * a.nsplit + sp) * rep + r;
        if (pm[i] == NEG) continue;
        const float w = std::exp(pm[i] - m);
        l += w * pl[i];
        const float* pa = pacc.data() + i * D;
        for (int64_t d = 0; d < D; ++d) o[d] += w * pa[d];
      }
      const float inv = l > 0.f ? 1.f / l : 0.f;
      for (int64_t d = 0; d < D; ++d) o[d] *= inv;
    }
}

std::string kivi_simd() { return KIVI_SIMD ? "avx512" : "generic"; }

torch::Tensor kivi_decode(torch::Tensor q, torch::Tensor sink_k, torch::Tensor sink_v,
                          torch::Tensor kq, torch::Tensor ks, torch::Tensor km,
                          torch::Tensor vq, torch::Tensor vs, torch::Tensor vm,
                          int64_t nq, int64_t G, int64_t gv,
                          torch::Tensor res_k, torch::Tensor res_v, torch::Tensor mask,
                          double scale, int64_t kbits, int64_t vbits, int64_t nsplit) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat && q.is_contiguous(), "q: (B,Hq,D) f32");
  Args a;
  a.B = q.size(0); a.Hq = q.size(1); a.D = q.size(2);
  a.H = kq.size(1); a.rep = a.Hq / a.H;
  a.q = q.data_ptr<float>();
  a.Ns = sink_k.size(2); a.sink_k = sink_k.data_ptr<float>(); a.sink_v = sink_v.data_ptr<float>();
  a.kq = kq.data_ptr<uint8_t>(); a.vq = vq.data_ptr<uint8_t>();
  a.ks = (const Half*)ks.data_ptr<at::Half>(); a.km = (const Half*)km.data_ptr<at::Half>();
  a.vs = (const Half*)vs.data_ptr<at::Half>(); a.vm = (const Half*)vm.data_ptr<at::Half>();
  a.capb = kq.size(2); a.nq = nq; a.G = G; a.gv = gv;
  a.Nr = res_k.size(2); a.res_k = res_k.data_ptr<float>(); a.res_v = res_v.data_ptr<float>();
  a.S = a.Ns + nq + a.Nr;
  a.mask = mask.numel() ? mask.data_ptr<bool>() : nullptr;
  if (a.mask) TORCH_CHECK(mask.size(1) == a.S, "mask width != cache length");
  a.scale = (float)scale; a.nsplit = std::max<int64_t>(1, nsplit);
  auto out = torch::empty({a.B, a.Hq, a.D}, q.options());
  float* o = out.data_ptr<float>();
#define KIVI_CASE(K, V) if (kbits == K && vbits == V) { run_all<K, V>(a, o); return out; }
  KIVI_CASE(2, 2) KIVI_CASE(2, 4) KIVI_CASE(2, 8) KIVI_CASE(4, 2) KIVI_CASE(4, 4) KIVI_CASE(4, 8)
  KIVI_CASE(8, 2) KIVI_CASE(8, 4) KIVI_CASE(8, 8)
#undef KIVI_CASE
  TORCH_CHECK(false, "unsupported bit widths");
  return out;
}
"""

KERNEL = JitExtension("KIVI attention kernel", "MCOMP_NO_KIVI_KERNEL", lambda ext: ext.load_inline(
    name=_NAME, cpp_sources=[_SRC], functions=["kivi_decode", "kivi_simd"], extra_cflags=CFLAGS,
    extra_ldflags=LDFLAGS, verbose=False))
load, available = KERNEL.load, KERNEL.available


def use_kernel(cache) -> bool:
    """Whether this cache's decode step runs the fast kernel."""
    from .. import kernels
    if kernels._FORCE_REFERENCE or not cache.k_channel:
        return False
    return available()


def _nsplit(B: int, H: int, nblk: int) -> int:
    """Sequence splits so that every thread has work even with few KV heads (flash-decoding):
    about 4 tasks per thread, rounded up to a multiple of the thread count when the cache is
    long enough (3 KV heads on 2 threads: 12 tasks, not 9, so no thread idles for a third of
    the step), and never splits shorter than 4 blocks."""
    threads = torch.get_num_threads()
    most = max(1, nblk // 4)
    n = max(1, min(-(-4 * threads // (B * H)), most))
    for m in range(n, min(2 * n, most) + 1):
        if (B * H * m) % threads == 0:
            return m
    return n


def decode(cache, q: torch.Tensor, scale: float, mask) -> torch.Tensor:
    """q (B, Hq, 1, D) over the cache's stored state → (B, Hq, 1, D)."""
    mod = load()
    B, Hq, _, D = q.shape
    H = cache.H
    f32 = torch.float32
    empty = torch.empty(B, H, 0, D, dtype=f32)

    def fp(t):
        return empty if t is None else t.to(f32).contiguous()

    if cache.kq is None:  # nothing quantized yet: pass 1-sized dummies
        kq = torch.zeros(B, H, 1, cache.G * D * cache.kv.k_bits // 8, dtype=torch.uint8)
        vq = torch.zeros(B, H, 1, cache.G * D * cache.kv.v_bits // 8, dtype=torch.uint8)
        ks = km = torch.zeros(B, H, 1, D, dtype=torch.float16)
        vs = vm = torch.zeros(B, H, 1, D // cache.gv, cache.G, dtype=torch.float16)
    else:
        kq, ks, km, vq, vs, vm = cache.kq, cache.ks, cache.km, cache.vq, cache.vs, cache.vm
    if mask is not None and bool(mask.all()):
        mask = None   # the usual decode step (no padding, no window reaching back): no checks
    m = torch.empty(0, dtype=torch.bool) if mask is None else \
        mask.reshape(mask.shape[0], -1).expand(B, -1).contiguous()          # (B, S)
    out = mod.kivi_decode(q.reshape(B, Hq, D).float().contiguous(), fp(cache.sink_k),
                          fp(cache.sink_v), kq, ks, km, vq, vs, vm, cache.n_q, cache.G,
                          cache.gv, fp(cache.res_k), fp(cache.res_v), m, float(scale),
                          cache.kv.k_bits, cache.kv.v_bits,
                          _nsplit(B, H, cache.n_q // cache.G))
    return out.view(B, Hq, 1, D).to(q.dtype)
