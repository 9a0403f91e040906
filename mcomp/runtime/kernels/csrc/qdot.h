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
// Kp = K rounded up to 64; padded activations are 0, so padded codes contribute nothing.
//
// ISA: chosen at run time from the CPU's features (AVX-512 VNNI, AVX2+FMA, or portable C++),
// each in its own target-attributed function, so the choice does not hang on the build flags
// and a caller can force any path the CPU has (the tests run all of them against the reference).
#pragma once
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace qdot {

constexpr int64_t XB = 32;       // activations per int8 block (one scale)
constexpr int64_t CH = 64;       // codes per chunk: two activation blocks

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
struct Act {
  int64_t K = 0, Kp = 0;
  std::vector<int8_t> q, q2;
  std::vector<float> dv, xs;

  void quantize(const float* x, int64_t K_) {
    K = K_;
    Kp = (K + CH - 1) / CH * CH;
    q.assign(Kp, 0);
    q2.assign(Kp, 0);
    dv.resize(Kp / CH * 16);
    xs.resize(Kp / XB);
    for (int64_t b = 0; b < Kp / XB; ++b) {
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
  }
};

// A prepared weight (pointers into tensors the caller keeps alive).
struct W {
  int64_t bits = 4, N = 0, K = 0, Kp = 0, g = 0, G = 0;   // g: group width (multiple of CH)
  const uint8_t* codes = nullptr;
  const float* s = nullptr;     // (N, G)
  const float* zs = nullptr;    // (N, G): z · s
  const float* bias = nullptr;  // (N) or null
};

// Chunk `ch` of a row's codes as 64 unsigned bytes (int4: low nibbles are the first 32 codes).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))
inline __m512i codes_avx512(int64_t bits, const uint8_t* c, int64_t ch) {
  if (bits != 4) return _mm512_loadu_si512(c + ch * 64);
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + ch * 32));
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, m4)),
                            _mm256_and_si256(_mm256_srli_epi16(v, 4), m4), 1);
}

// Σ_g s_g Σ_{b∈g} e_b I_b for one row: nch chunks, cpg chunks per group.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))
inline float row_avx512(int64_t bits, const uint8_t* c, const Act& a, const float* s,
                        int64_t nch, int64_t cpg) {
  const int8_t* xq = a.q.data();
  const int8_t* xq2 = a.q2.data();
  const float* dv = a.dv.data();
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c0 = 0, grp = 0; c0 < nch; c0 += cpg, ++grp) {
    const int64_t c1 = std::min(nch, c0 + cpg);
    __m512 t = _mm512_setzero_ps();
    for (int64_t ch = c0; ch < c1; ++ch) {
      const __m512i w = codes_avx512(bits, c, ch);
      const __m512i p1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(xq + ch * 64));
      const __m512i p = _mm512_dpbusd_epi32(_mm512_slli_epi32(p1, 7), w, _mm512_loadu_si512(xq2 + ch * 64));
      t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_loadu_ps(dv + ch * 16), t);
    }
    acc = _mm512_fmadd_ps(t, _mm512_set1_ps(s[grp]), acc);
  }
  return _mm512_reduce_add_ps(acc);
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

// The same sum for R activation rows at once: each chunk of codes is loaded and unpacked once
// and multiplied with R rows (prefill), instead of once per row.
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))
inline void rows_avx512(int64_t bits, const uint8_t* c, const Act* a, const float* s,
                        int64_t nch, int64_t cpg, float* out) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t c0 = 0, grp = 0; c0 < nch; c0 += cpg, ++grp) {
    const int64_t c1 = std::min(nch, c0 + cpg);
    __m512 t[R];
    for (int r = 0; r < R; ++r) t[r] = _mm512_setzero_ps();
    for (int64_t ch = c0; ch < c1; ++ch) {
      const __m512i w = codes_avx512(bits, c, ch);
      for (int r = 0; r < R; ++r) {
        const __m512i p1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w,
                                               _mm512_loadu_si512(a[r].q.data() + ch * 64));
        const __m512i p = _mm512_dpbusd_epi32(_mm512_slli_epi32(p1, 7), w,
                                              _mm512_loadu_si512(a[r].q2.data() + ch * 64));
        t[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_loadu_ps(a[r].dv.data() + ch * 16), t[r]);
      }
    }
    const __m512 sg = _mm512_set1_ps(s[grp]);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(t[r], sg, acc[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
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
  at::parallel_for(0, first[nw], 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1;
      const Job& job = jobs[i];
      const W& w = *job.w;
      const int64_t nch = w.Kp / CH, cpg = w.g / CH, rb = w.bits == 4 ? w.Kp / 2 : w.Kp;
      // AVX2 recentres int8 codes by 128 (see row_avx2): the zero coefficient gains 128·s
      const float off = (isa == AVX2 && w.bits == 8) ? 128.0f : 0.0f;
      const int64_t n0 = (t - first[i]) * TILE, n1 = std::min(w.N, n0 + TILE);
      for (int64_t m = 0; m < M;) {
        const int64_t r = (isa == AVX512VNNI && M - m >= 4) ? 4 : 1;
        for (int64_t n = n0; n < n1; ++n) {
          const uint8_t* c = w.codes + n * rb;
          const float* s = w.s + n * w.G;
          const float* zs = w.zs + n * w.G;
          float v[4];
          if (r == 4) rows_avx512<4>(w.bits, c, acts + m, s, nch, cpg, v);
          else if (isa == AVX512VNNI) v[0] = row_avx512(w.bits, c, acts[m], s, nch, cpg);
          else if (isa == AVX2) v[0] = row_avx2(w.bits, c, acts[m], s, nch, cpg);
          else v[0] = row_portable(w.bits, c, acts[m], s, nch, cpg);
          for (int64_t k = 0; k < r; ++k) {
            const float* X = job.X.data() + (m + k) * w.G;
            float u = v[k];
            for (int64_t g = 0; g < w.G; ++g) u += (off * s[g] - zs[g]) * X[g];
            job.y[(m + k) * job.ld + n] = w.bias ? u + w.bias[n] : u;
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
