// Integer-dot linears for packed int4 / int8 weights: y = x̂ · Wᵀ (+ bias) with
//   W = (codes − z) · s per (row, group), the layer's stored semantics, and x̂ x rounded per
//   block of 32 to two int8 digits: t = x / d_b (d_b = max|x_b| / 127), q1 = round(t),
//   q2 = round(128 (t − q1)) ∈ [−64, 64], x̂ = d_b (128 q1 + q2) / 128.
// One int8 digit (llama.cpp's Q8_0 rounding) flips greedy tokens of a 4-bit 135M model within a
// few steps; the second digit makes x̂ a 15-bit fixed-point value per block (finer than bf16's
// 8-bit mantissa) for one more integer dot and shift per chunk (measured: ~13% fewer decode
// tok/s on SmolLM2 int4 at 128 context than one digit).
// Everything after the rounding is exact integer products and fp32 scaling, so the pure-torch
// reference (kernels/int_dot.py) is x̂ @ dequantize(W)ᵀ and the kernel differs from it only in
// fp32 summation order.
//
// Per row n and group g (g a multiple of the 64-wide chunk, so no chunk straddles a group):
//   y_n = Σ_g s_ng · Σ_{b∈g} e_b · I_nb  −  Σ_g (z·s)_ng · X_g,   e_b = d_b / 128,
//   I_nb = Σ_{k∈b} code_nk · (128 q1_k + q2_k) = 128·dot(code, q1) + dot(code, q2) (exact int32),
//   X_g = Σ_{b∈g} e_b Σ_{k∈b} (128 q1_k + q2_k)   (per activation, shared by all rows)
// Codes stay unsigned (u8 × s8 is what VNNI's vpdpbusd and AVX2's vpmaddubsw multiply), so the
// zero point never enters the inner loop.
//
// Layouts (built by int_dot.py):
//   int4: (N, Kp/2) bytes; chunk c of a row is 32 bytes whose low nibbles are codes 64c..64c+31
//         and high nibbles 64c+32..64c+63: one AND and one shift give two 32-code blocks.
//   int8: (N, Kp) bytes, the codes themselves.
//   s, z: (N, G) scales and zero points, fp32, fp16 or bf16 as the artifact stores them (W.sfmt).
// Kp = K rounded up to 64; padded activations are 0, so padded codes contribute nothing.
//
// Decode (one activation row) is latency- and issue-bound per weight row more than by bandwidth
// (a SmolLM2 row is 9 chunks), so the AVX-512 int4 path loads two chunks per 64-byte load (the
// activations are kept in that pair order too, see Act), works on four weight rows at once, and
// prefetches the code stream ahead; every variant does the same arithmetic per row, in the same
// order, so results do not depend on which one ran (or on the batch).
//
// ISA: chosen at run time from the CPU's features (AVX-512 VNNI, AVX2+FMA, or portable C++),
// each in its own target-attributed function, so the choice does not hang on the build flags
// and a caller can force any path the CPU has (the tests run all of them against the reference).
#pragma once
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <c10/util/Half.h>
#include <cstdint>
#include <cstring>
#include <vector>

namespace qdot {

constexpr int64_t XB = 32;       // activations per int8 block (one scale)
constexpr int64_t CH = 64;       // codes per chunk: two activation blocks
constexpr int64_t PF = 1024;     // software prefetch distance of the code stream, bytes

enum Isa : int64_t { PORTABLE = 0, AVX2 = 1, AVX512VNNI = 2 };

inline int64_t best_isa() {
  static const int64_t isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
      return static_cast<int64_t>(AVX512VNNI);
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return static_cast<int64_t>(AVX2);
    return static_cast<int64_t>(PORTABLE);
  }();
  return isa;
}

// One activation row, quantized: q, q2 (Kp int8 each: the two digits), dv (Kp/64 chunks × 16
// floats: lanes 0-7 hold the first block's e = d/128, lanes 8-15 the second's, the layout a
// 16-lane int32 dot product comes out in), xs (Kp/32: e_b · Σ_{k∈b} (128 q1_k + q2_k)).
// pq, pq2, pdv: the same digits and scales in chunk-pair order, for the AVX-512 int4 loop that
// unpacks two chunks per 64-byte load (rows_avx512): for chunks 2p, 2p+1 the low nibbles are
// blocks 4p, 4p+2 and the high nibbles blocks 4p+1, 4p+3, so those are stored in that order.
struct Act {
  int64_t K = 0, Kp = 0;
  std::vector<int8_t> q, q2, pq, pq2;
  std::vector<float> dv, xs, pdv;

  void quantize(const float* x, int64_t K_) {
    K = K_;
    Kp = (K + CH - 1) / CH * CH;
    q.assign(Kp, 0);
    q2.assign(Kp, 0);
    dv.resize(Kp / CH * 16);
    xs.resize(Kp / XB);
    const int64_t nfull = best_isa() == AVX512VNNI ? K / XB : 0;
    for (int64_t b = 0; b < nfull; ++b) block_avx512(x, b);
    for (int64_t b = nfull; b < Kp / XB; ++b) {
      const int64_t lo = b * XB, hi = std::min(K, lo + XB);
      float amax = 0.0f;
      for (int64_t k = lo; k < hi; ++k) amax = std::max(amax, std::fabs(x[k]));
      const float d = amax / 127.0f;
      const float id = d > 0.0f ? 1.0f / d : 0.0f;
      int32_t sum = 0;
      for (int64_t k = lo; k < hi; ++k) {
        const float t = x[k] * id;
        const float r = std::min(127.0f, std::max(-127.0f, std::nearbyint(t)));
        const float r2 = std::nearbyint((t - r) * 128.0f);    // t − r is exact (Sterbenz)
        q[k] = static_cast<int8_t>(r);
        q2[k] = static_cast<int8_t>(r2);
        sum += 128 * static_cast<int32_t>(r) + static_cast<int32_t>(r2);
      }
      const float e = d * (1.0f / 128);                       // exact: a power of two
      std::fill(dv.begin() + b * 8, dv.begin() + b * 8 + 8, e);
      xs[b] = e * static_cast<float>(sum);
    }
    pair_order();
  }

  // the scalar loop's rounding of one full block b, 16 lanes at a time: the same fp32
  // operations (x·(1/d), round-half-even, clamp, (t − r)·128), so bit-identical to it (the
  // scalar loop was 1-2% of a SmolLM2 decode step's perf samples)
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))
  void block_avx512(const float* x, int64_t b) {
    const __m512 a0 = _mm512_loadu_ps(x + b * XB), a1 = _mm512_loadu_ps(x + b * XB + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a0), _mm512_abs_ps(a1)));
    const float d = amax / 127.0f;
    const __m512 id = _mm512_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
    const __m512 lim = _mm512_set1_ps(127.0f), nlim = _mm512_set1_ps(-127.0f), k128 = _mm512_set1_ps(128.0f);
    __m512i sum = _mm512_setzero_si512();
    for (int h = 0; h < 2; ++h) {
      const __m512 t = _mm512_mul_ps(h ? a1 : a0, id);
      const __m512 r = _mm512_min_ps(lim, _mm512_max_ps(nlim, _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
      const __m512 r2 = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(t, r), k128), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512i ri = _mm512_cvtps_epi32(r), r2i = _mm512_cvtps_epi32(r2);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q.data() + b * XB + h * 16), _mm512_cvtepi32_epi8(ri));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q2.data() + b * XB + h * 16), _mm512_cvtepi32_epi8(r2i));
      sum = _mm512_add_epi32(sum, _mm512_add_epi32(_mm512_slli_epi32(ri, 7), r2i));
    }
    const float e = d * (1.0f / 128);
    std::fill(dv.begin() + b * 8, dv.begin() + b * 8 + 8, e);
    xs[b] = e * static_cast<float>(_mm512_reduce_add_epi32(sum));
  }

  void pair_order() {
    const int64_t npair = Kp / CH / 2;
    pq.resize(npair * 2 * CH);
    pq2.resize(npair * 2 * CH);
    pdv.resize(npair * 32);
    for (int64_t p = 0; p < npair; ++p)
      for (int64_t i = 0; i < 4; ++i) {
        const int64_t b = 4 * p + (i == 1 ? 2 : i == 2 ? 1 : i);   // blocks 4p, 4p+2, 4p+1, 4p+3
        std::copy_n(q.begin() + b * XB, XB, pq.begin() + (4 * p + i) * XB);
        std::copy_n(q2.begin() + b * XB, XB, pq2.begin() + (4 * p + i) * XB);
        std::fill_n(pdv.begin() + (4 * p + i) * 8, 8, dv[b * 8]);
      }
  }
};

// The dtype of a prepared weight's scales and zero points: the artifact's own (fp16 by default),
// kept as stored rather than widened to fp32 when prepared, so a g128 int4 decode step reads 4
// bytes of them per group instead of 8 (1/16 of the int4 bytes it streams, measured 3.3 MB of
// SmolLM2's 88 MB per token). gemm_many widens one tile's worth at a time (exactly: fp16 and
// bf16 are subsets of fp32).
enum SFmt : int64_t { F32 = 0, F16 = 1, BF16 = 2 };

// A prepared weight (pointers into tensors the caller keeps alive).
struct W {
  int64_t bits = 4, N = 0, K = 0, Kp = 0, g = 0, G = 0;   // g: group width (multiple of CH)
  int64_t sfmt = F32;           // dtype of s and z
  const uint8_t* codes = nullptr;
  const void* s = nullptr;      // (N, G) scales
  const void* z = nullptr;      // (N, G) zero points (codes units)
  const float* bias = nullptr;  // (N) or null
};

// dst[0..n) = fp32 of n values of format f at src + `at` elements
inline void widen_portable(int64_t f, const void* src, int64_t at, float* dst, int64_t n) {
  const uint16_t* p = static_cast<const uint16_t*>(src) + at;
  for (int64_t i = 0; i < n; ++i) {
    if (f == F32) {
      dst[i] = static_cast<const float*>(src)[at + i];
    } else if (f == F16) {
      dst[i] = c10::detail::fp16_ieee_to_fp32_value(p[i]);
    } else {
      const uint32_t u = static_cast<uint32_t>(p[i]) << 16;
      std::memcpy(dst + i, &u, 4);
    }
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))
inline void widen_avx512(int64_t f, const void* src, int64_t at, float* dst, int64_t n) {
  const uint16_t* p = static_cast<const uint16_t*>(src) + at;
  int64_t i = 0;
  for (; f != F32 && i + 16 <= n; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i));
    _mm512_storeu_ps(dst + i, f == F16 ? _mm512_cvtph_ps(h)
                                       : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
  }
  widen_portable(f, src, at + i, dst + i, n - i);
}

__attribute__((target("avx2,fma,f16c")))
inline void widen_avx2(int64_t f, const void* src, int64_t at, float* dst, int64_t n) {
  const uint16_t* p = static_cast<const uint16_t*>(src) + at;
  int64_t i = 0;
  for (; f == F16 && i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i))));
  widen_portable(f, src, at + i, dst + i, n - i);
}

inline void widen(int64_t isa, int64_t f, const void* src, int64_t at, float* dst, int64_t n) {
  if (isa == AVX512VNNI) widen_avx512(f, src, at, dst, n);
  else if (isa == AVX2) widen_avx2(f, src, at, dst, n);
  else widen_portable(f, src, at, dst, n);
}

// Chunk `ch` of a row's codes as 64 unsigned bytes (int4: low nibbles are the first 32 codes).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))
inline __m512i codes_avx512(int64_t bits, const uint8_t* c, int64_t ch) {
  if (bits != 4) return _mm512_loadu_si512(c + ch * 64);
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + ch * 32));
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, m4)),
                            _mm256_and_si256(_mm256_srli_epi16(v, 4), m4), 1);
}

// Σ_g s_g Σ_{b∈g} e_b I_b of one weight row (codes c: nch chunks, cpg chunks per group) for R
// activation rows at once: each chunk of codes is loaded and unpacked once for all R (prefill
// tiles use R = 4, a decode step R = 1; the per-row arithmetic, hence the result, is the same
// for every R, so a token's logits do not depend on its batch).
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))
inline void rows_avx512(int64_t bits, const uint8_t* c, const Act* a, const float* s,
                        int64_t nch, int64_t cpg, float* out) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  // q1, q2 digits of chunk `ch` at x1, x2 times 64 unsigned codes w: 128·dot(w,q1) + dot(w,q2)
  auto idot = [](__m512i w, const int8_t* x1, const int8_t* x2) {
    const __m512i p1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(x1));
    return _mm512_dpbusd_epi32(_mm512_slli_epi32(p1, 7), w, _mm512_loadu_si512(x2));
  };
  int64_t ch0 = 0;                                   // chunks before ch0 are done
  if (bits == 4) {
    // two chunks per 64-byte load: one AND gives both chunks' low nibbles, a shift and an AND
    // their high nibbles (activations in pair order, see Act): 7 vector ops per chunk, not 10
    // (measured +13% on a 576×1536 GEMV from L2). A pair that straddles a group boundary (odd
    // chunks per group) gets the two groups' scales in the two halves of its scale vector.
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    for (; ch0 + 1 < nch; ch0 += 2) {
      const __m512i v = _mm512_loadu_si512(c + ch0 * 32);
      const __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
      const int64_t g0 = ch0 / cpg, g1 = (ch0 + 1) / cpg;
      const __m512 sv = g0 == g1 ? _mm512_set1_ps(s[g0])
                                 : _mm512_insertf32x8(_mm512_set1_ps(s[g0]), _mm256_set1_ps(s[g1]), 1);
      for (int r = 0; r < R; ++r) {
        const int8_t* p1 = a[r].pq.data() + ch0 * 64;
        const int8_t* p2 = a[r].pq2.data() + ch0 * 64;
        const float* pd = a[r].pdv.data() + ch0 * 16;
        const __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(idot(hi, p1 + 64, p2 + 64)), _mm512_loadu_ps(pd + 16),
                                         _mm512_mul_ps(_mm512_cvtepi32_ps(idot(lo, p1, p2)), _mm512_loadu_ps(pd)));
        acc[r] = _mm512_fmadd_ps(t, sv, acc[r]);
      }
    }
  }
  for (int64_t c0 = ch0; c0 < nch;) {                // int8, or int4's odd last chunk
    const int64_t grp = c0 / cpg, c1 = std::min(nch, (grp + 1) * cpg);
    __m512 t[R];
    for (int r = 0; r < R; ++r) t[r] = _mm512_setzero_ps();
    for (int64_t ch = c0; ch < c1; ++ch) {
      const __m512i w = codes_avx512(bits, c, ch);
      for (int r = 0; r < R; ++r)
        t[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(idot(w, a[r].q.data() + ch * 64, a[r].q2.data() + ch * 64)),
                               _mm512_loadu_ps(a[r].dv.data() + ch * 16), t[r]);
    }
    const __m512 sg = _mm512_set1_ps(s[grp]);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(t[r], sg, acc[r]);
    c0 = c1;
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

__attribute__((target("avx2,fma")))
inline float hsum256(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// AVX2 has no u8×s8→s32 dot: vpmaddubsw gives saturating s16 pair sums, exact for int4 codes
// (|2·15·127| < 2^15) but not for int8 codes (2·255·127); each digit gets its own dot and the
// two are combined in int32 (128·dot1 + dot2). For int8 the codes are recentred to
// w = code − 128 and multiplied by the sign trick |w| × (q·sign w) (|2·128·127| < 2^15); the
// caller adds 128·s·X_g back (zero coefficient (128 − z)·s instead of −z·s).
__attribute__((target("avx2,fma")))
inline float row_avx2(int64_t bits, const uint8_t* c, const Act& a, const float* s,
                      int64_t nch, int64_t cpg) {
  const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const int8_t* xq = a.q.data();
  const int8_t* xq2 = a.q2.data();
  const float* dv = a.dv.data();
  __m256 acc = _mm256_setzero_ps();
  for (int64_t c0 = 0, grp = 0; c0 < nch; c0 += cpg, ++grp) {
    const int64_t c1 = std::min(nch, c0 + cpg);
    __m256 t = _mm256_setzero_ps();
    for (int64_t ch = c0; ch < c1; ++ch) {
      for (int64_t half = 0; half < 2; ++half) {
        const int64_t o = ch * 64 + half * 32;
        const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + o));
        const __m256i x2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq2 + o));
        __m256i d1, d2;
        if (bits == 4) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + ch * 32));
          const __m256i w = _mm256_and_si256(half ? _mm256_srli_epi16(v, 4) : v, m4);
          d1 = _mm256_maddubs_epi16(w, x1);
          d2 = _mm256_maddubs_epi16(w, x2);
        } else {
          const __m256i w = _mm256_xor_si256(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + o)), flip);
          const __m256i aw = _mm256_abs_epi8(w);
          d1 = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(x1, w));
          d2 = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(x2, w));
        }
        const __m256i p = _mm256_add_epi32(_mm256_slli_epi32(_mm256_madd_epi16(d1, ones), 7),
                                           _mm256_madd_epi16(d2, ones));
        t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_loadu_ps(dv + o / 4), t);
      }
    }
    acc = _mm256_fmadd_ps(t, _mm256_set1_ps(s[grp]), acc);
  }
  return hsum256(acc);
}

inline float row_portable(int64_t bits, const uint8_t* c, const Act& a, const float* s,
                          int64_t nch, int64_t cpg) {
  float acc = 0.0f;
  for (int64_t c0 = 0, grp = 0; c0 < nch; c0 += cpg, ++grp) {
    float t = 0.0f;
    for (int64_t ch = c0; ch < std::min(nch, c0 + cpg); ++ch)
      for (int64_t half = 0; half < 2; ++half) {
        const int8_t* x1 = a.q.data() + ch * 64 + half * 32;
        const int8_t* x2 = a.q2.data() + ch * 64 + half * 32;
        int32_t I = 0;
        for (int64_t j = 0; j < 32; ++j) {
          const int32_t code = bits == 4 ? (c[ch * 32 + j] >> (4 * half)) & 0x0F
                                         : c[ch * 64 + half * 32 + j];
          I += code * (128 * x1[j] + x2[j]);
        }
        t += static_cast<float>(I) * a.dv[ch * 16 + half * 8];
      }
    acc += t * s[grp];
  }
  return acc;
}

// rows_avx512<1> of W consecutive int4 weight rows (row stride rb bytes) for one activation row,
// interleaved: the activation loads are shared and the W dependency chains overlap, which a
// single row's short chain (9 chunks at K = 576) leaves latency-bound (measured: +25% on a
// 3072×576 GEMV from L2, single thread). Each row's arithmetic is rows_avx512<1>'s, in the same
// order, so the results are bit-identical to it.
template <int W>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))
inline void wrows4_avx512(const uint8_t* c, int64_t rb, const Act& a, const float* s, int64_t G,
                          int64_t nch, int64_t cpg, float* out) {
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  __m512 acc[W];
  for (int r = 0; r < W; ++r) acc[r] = _mm512_setzero_ps();
  auto idot = [](__m512i w, __m512i x1, __m512i x2) {
    return _mm512_dpbusd_epi32(_mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x1), 7), w, x2);
  };
  int64_t ch = 0;
  for (; ch + 1 < nch; ch += 2) {
    const int8_t* p1 = a.pq.data() + ch * 64;
    const int8_t* p2 = a.pq2.data() + ch * 64;
    const __m512i x1 = _mm512_loadu_si512(p1), x2 = _mm512_loadu_si512(p2);
    const __m512i x3 = _mm512_loadu_si512(p1 + 64), x4 = _mm512_loadu_si512(p2 + 64);
    const __m512 d0 = _mm512_loadu_ps(a.pdv.data() + ch * 16), d1 = _mm512_loadu_ps(a.pdv.data() + ch * 16 + 16);
    const int64_t g0 = ch / cpg, g1 = (ch + 1) / cpg;
    for (int r = 0; r < W; ++r) {
      const __m512i v = _mm512_loadu_si512(c + r * rb + ch * 32);
      const __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
      const float* sr = s + r * G;
      const __m512 sv = g0 == g1 ? _mm512_set1_ps(sr[g0])
                                 : _mm512_insertf32x8(_mm512_set1_ps(sr[g0]), _mm256_set1_ps(sr[g1]), 1);
      const __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(idot(hi, x3, x4)), d1,
                                       _mm512_mul_ps(_mm512_cvtepi32_ps(idot(lo, x1, x2)), d0));
      acc[r] = _mm512_fmadd_ps(t, sv, acc[r]);
    }
  }
  if (ch < nch) {                         // an odd last chunk, as rows_avx512 does it
    const __m512i x1 = _mm512_loadu_si512(a.q.data() + ch * 64), x2 = _mm512_loadu_si512(a.q2.data() + ch * 64);
    const __m512 d = _mm512_loadu_ps(a.dv.data() + ch * 16);
    for (int r = 0; r < W; ++r) {
      const __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(idot(codes_avx512(4, c + r * rb, ch), x1, x2)), d,
                                       _mm512_setzero_ps());
      acc[r] = _mm512_fmadd_ps(t, _mm512_set1_ps(s[r * G + ch / cpg]), acc[r]);
    }
  }
  for (int r = 0; r < W; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

// One output: a weight, where its rows go (y + m·ld + n for activation row m), and its X_g.
struct Job {
  const W* w;
  float* y;
  int64_t ld;
  std::vector<float> X;     // (M, G)
};

// y_i (M, N_i) for several weights that read the same M quantized activation rows, in one
// parallel region (the q|k|v and gate|up linears of a layer: fewer fork/joins per token).
// Threads take tiles of 16 output rows; a tile loops over all M activations, so at prefill its
// codes stay in L1 while every token passes over them (4 tokens per unpacked chunk on AVX-512).
inline void gemm_many(const W* const* ws, float* const* ys, const int64_t* lds, int64_t nw,
                      const Act* acts, int64_t M, int64_t isa = -1) {
  if (isa < 0) isa = best_isa();
  constexpr int64_t TILE = 16;
  std::vector<Job> jobs(nw);
  std::vector<int64_t> first(nw + 1, 0);    // first tile of each job
  for (int64_t i = 0; i < nw; ++i) {
    const W& w = *ws[i];
    jobs[i] = Job{ws[i], ys[i], lds[i], std::vector<float>(M * w.G, 0.0f)};
    for (int64_t m = 0; m < M; ++m)
      for (int64_t b = 0; b < w.Kp / XB; ++b)
        jobs[i].X[m * w.G + std::min(w.G - 1, b * XB / w.g)] += acts[m].xs[b];
    first[i + 1] = first[i] + (w.N + TILE - 1) / TILE;
  }
  int64_t Gmax = 0;
  for (int64_t i = 0; i < nw; ++i) Gmax = std::max(Gmax, ws[i]->G);
  at::parallel_for(0, first[nw], 1, [&](int64_t t0, int64_t t1) {
    // one tile's s and z·s in fp32; per thread, kept across calls (a step makes ~150 of them)
    thread_local std::vector<float> sbuf, zsbuf;
    if (static_cast<int64_t>(sbuf.size()) < TILE * Gmax) {
      sbuf.resize(TILE * Gmax);
      zsbuf.resize(TILE * Gmax);
    }
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1;
      const Job& job = jobs[i];
      const W& w = *job.w;
      const int64_t nch = w.Kp / CH, cpg = w.g / CH, rb = w.bits == 4 ? w.Kp / 2 : w.Kp;
      // AVX2 recentres int8 codes by 128 (see row_avx2): the zero coefficient gains 128·s
      const float off = (isa == AVX2 && w.bits == 8) ? 128.0f : 0.0f;
      const int64_t n0 = (t - first[i]) * TILE, n1 = std::min(w.N, n0 + TILE);
      // the tile's scales and z·s in fp32 (z·s is the fp32 product int_dot.py's reference forms)
      const int64_t nsz = (n1 - n0) * w.G;
      widen(isa, w.sfmt, w.s, n0 * w.G, sbuf.data(), nsz);
      widen(isa, w.sfmt, w.z, n0 * w.G, zsbuf.data(), nsz);
      for (int64_t j = 0; j < nsz; ++j) zsbuf[j] *= sbuf[j];
      for (int64_t m = 0; m < M;) {
        const int64_t r = (isa == AVX512VNNI && M - m >= 4) ? 4 : 1;
        const bool four = r == 1 && isa == AVX512VNNI && w.bits == 4;   // 4 weight rows at once
        for (int64_t n = n0, nr = 1; n < n1; n += nr) {
          nr = four && n1 - n >= 4 ? 4 : 1;                  // weight rows this iteration
          const uint8_t* c = w.codes + n * rb;
          // a GEMV streams its codes from DRAM once per token and computes little per byte:
          // fetching PF bytes ahead keeps more misses in flight than the hardware prefetcher
          // does (measured ~10% on a 3072×576 int4 GEMV from DRAM, 2 threads)
          // (measured against a window PF beyond the rows this iteration reads, as a long
          // down_proj row group would suggest: not better, 5% worse on a 576×1536 GEMV)
          if (m == 0)
            for (int64_t o = 0; o < nr * rb; o += 64) _mm_prefetch(reinterpret_cast<const char*>(c + PF + o), _MM_HINT_T0);
          const float* s = sbuf.data() + (n - n0) * w.G;
          float v[4];
          if (nr == 4) wrows4_avx512<4>(c, rb, acts[m], s, w.G, nch, cpg, v);
          else if (r == 4) rows_avx512<4>(w.bits, c, acts + m, s, nch, cpg, v);
          else if (isa == AVX512VNNI) rows_avx512<1>(w.bits, c, acts + m, s, nch, cpg, v);
          else if (isa == AVX2) v[0] = row_avx2(w.bits, c, acts[m], s, nch, cpg);
          else v[0] = row_portable(w.bits, c, acts[m], s, nch, cpg);
          // v[k]: activation row m + k when r > 1, weight row n + k when nr > 1
          for (int64_t k = 0; k < std::max(r, nr); ++k) {
            const int64_t mi = m + (r > 1 ? k : 0), ni = n + (nr > 1 ? k : 0);
            const float* X = job.X.data() + mi * w.G;
            const float* sn = sbuf.data() + (ni - n0) * w.G;
            const float* zn = zsbuf.data() + (ni - n0) * w.G;
            float u = v[k];
            for (int64_t g = 0; g < w.G; ++g) u += (off * sn[g] - zn[g]) * X[g];
            job.y[mi * job.ld + ni] = w.bias ? u + w.bias[ni] : u;
          }
        }
        m += r;
      }
    }
  });
}

inline void gemm(const W& w, const Act* acts, int64_t M, float* y, int64_t isa = -1) {
  const W* ws[1] = {&w};
  float* ys[1] = {y};
  const int64_t lds[1] = {w.N};
  gemm_many(ws, ys, lds, 1, acts, M, isa);
}

}  // namespace qdot
