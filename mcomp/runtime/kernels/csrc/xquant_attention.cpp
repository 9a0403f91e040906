// One decode step of attention over an xquant latent cache (mcomp/runtime/kv/xquant.py), reading
// the packed latent directly: no K or V of the whole context is materialized.
//
// The cache holds, per token, a latent row of r channels in append order
// [sink (fp) | quantized blocks of G tokens | residual (fp)]. Channels [k_off, k_off + kn) make the
// keys, [v_off, v_off + vn) the values:
//     K_h[t] = rope_t(k_norm(B_k,h · L[t, k] + b_k,h))     V_h[t] = B_v,h · L[t, v] + b_v,h
// The work is cut into tiles (one quantized block of G tokens, or a run of ≤ 32 fp rows); a
// task owns a contiguous run of tiles of one batch row and, per tile:
//   1. dequantizes the tile's latent once (per-channel codes: channel-major in the block, fp16
//      scale/min per channel, optional per-token RMS; per-token codes: token-major, fp16
//      scale/min per (token, group)) into an L1-sized buffer, shared by all KV heads,
//   2. rematerializes the tile's keys for all heads, K = L_k · B_kᵀ + b_k (a register-blocked
//      8-token × 32-channel micro-kernel with AVX-512; a plain loop otherwise), then k_norm and
//      RoPE per head from the shared half-width cos/sin table,
//   3. scores every query head (GQA: rep heads per KV head), and keeps an online softmax,
//   4. accumulates P·L_v in the latent (Hq × vn per task): V is never formed.
// Tasks are merged with the online-softmax rule, then each query head's P·L_v is projected once
// by B_v of its KV group and b_v is added (the softmax rows sum to 1).
//
// Projected mode (no B_k given: eigen, ThinK, runtime/kv/eigen.py ProjectedKVCache): the
// latent already holds each KV head's key coordinates, L[t, k_off + h·dk + j], and the caller
// hands queries mapped into that basis (width dk), so step 2 is skipped (no k_norm, no RoPE: the
// coordinates are of post-RoPE keys) and scores read the dequantized tile directly. The values are
// per head too: query head of KV head h accumulates only L[t, v_off + h·vh .. + vh) and its output
// is B_v,h (D × vh) of that, H× less work than mixing every head's coordinates.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

using c10::Half;

namespace {

constexpr int TILE = 32;
const float NEG = -std::numeric_limits<float>::infinity();

template <int BITS>
inline void unpack_planar(const uint8_t* __restrict p, float* __restrict out, int64_t n) {
  // inverse of kv/kivi.py pack_planar: byte i holds elements i, i + W, i + 2W, ... (W = n / PER)
  constexpr int PER = 8 / BITS;
  constexpr int MASK = (1 << BITS) - 1;
  const int64_t W = n / PER;
  for (int j = 0; j < PER; ++j) {
    float* __restrict o = out + j * W;
    for (int64_t i = 0; i < W; ++i) o[i] = (float)((p[i] >> (j * BITS)) & MASK);
  }
}

inline void unpack(const uint8_t* p, float* out, int64_t n, int bits) {
  switch (bits) {
    case 2: unpack_planar<2>(p, out, n); break;
    case 4: unpack_planar<4>(p, out, n); break;
    default: for (int64_t i = 0; i < n; ++i) out[i] = (float)p[i];
  }
}

// K[t, :] = bias + sum_c L[t, c] * BT[c, :] for t < n, with L of row stride ldl and BT (kn × kv).
template <int NT>
inline void gemm_rows(const float* __restrict L, int64_t ldl, const float* __restrict BT,
                      int64_t kn, int64_t kv, const float* __restrict bias, float* __restrict K) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j + 32 <= kv; j += 32) {
    __m512 a0[NT], a1[NT];
    const __m512 b0i = _mm512_loadu_ps(bias + j), b1i = _mm512_loadu_ps(bias + j + 16);
    for (int t = 0; t < NT; ++t) { a0[t] = b0i; a1[t] = b1i; }
    for (int64_t c = 0; c < kn; ++c) {
      const __m512 b0 = _mm512_loadu_ps(BT + c * kv + j), b1 = _mm512_loadu_ps(BT + c * kv + j + 16);
      for (int t = 0; t < NT; ++t) {
        const __m512 x = _mm512_set1_ps(L[t * ldl + c]);
        a0[t] = _mm512_fmadd_ps(x, b0, a0[t]);
        a1[t] = _mm512_fmadd_ps(x, b1, a1[t]);
      }
    }
    for (int t = 0; t < NT; ++t) {
      _mm512_storeu_ps(K + t * kv + j, a0[t]);
      _mm512_storeu_ps(K + t * kv + j + 16, a1[t]);
    }
  }
#endif
  for (int t = 0; t < NT; ++t) {       // the channels the vector loop did not cover
    float* __restrict k = K + t * kv;
    for (int64_t jj = j; jj < kv; ++jj) k[jj] = bias[jj];
    for (int64_t c = 0; c < kn; ++c) {
      const float x = L[t * ldl + c];
      const float* __restrict b = BT + c * kv;
      for (int64_t jj = j; jj < kv; ++jj) k[jj] += x * b[jj];
    }
  }
}

void gemm_tile(const float* L, int64_t ldl, int64_t n, const float* BT, int64_t kn, int64_t kv,
               const float* bias, float* K) {
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) gemm_rows<8>(L + t * ldl, ldl, BT, kn, kv, bias, K + t * kv);
  for (; t + 4 <= n; t += 4) gemm_rows<4>(L + t * ldl, ldl, BT, kn, kv, bias, K + t * kv);
  for (; t < n; ++t) gemm_rows<1>(L + t * ldl, ldl, BT, kn, kv, bias, K + t * kv);
}

struct Args {
  // query (B, Hq, D); fp rows (B, ns|nr, r)
  const float *q, *sink, *res;
  // quantized store: codes (B, nb, G*rk*bits/8), scales (B, nb, 2, rk), nscales (B, nb, G),
  // tcodes (B, nb, G*rv*bits/8), tscales (B, nb, 2, G, rv/gv)
  const uint8_t *codes, *tcodes;
  const Half *scales, *nscales, *tscales;
  // factors: BkT (kn, kv) and bk (kv), or null (projected mode); Bv (kv, vh), bv (kv);
  // k_norm weight (D) or null; rope halves (B, S, D/2) or null; mask (B, S) or null
  const float *BkT, *bk, *Bv, *bv, *knw, *cos, *sin;
  const bool* mask;
  // D: output head dim; dk: query/key width per head (D when K is rematerialized); vh: V latent
  // channels a query head mixes (all vn shared channels, or its own KV head's vh when per_head_v)
  int64_t B, Hq, H, D, dk, r, ns, nb, nr, G, rk, rv, gv, bits, k_off, kn, v_off, vh, S;
  bool tok_scale, per_head_v;
  float scale, eps;
  int64_t nsplit;
};

// The tiles of one batch row: sink rows, quantized blocks, residual rows, in append order.
struct Tiles {
  int64_t n_sink, n_res;
  Tiles(const Args& a) : n_sink((a.ns + TILE - 1) / TILE), n_res((a.nr + TILE - 1) / TILE) {}
  int64_t count(const Args& a) const { return n_sink + a.nb + n_res; }
};

// Latent rows of tile `i` (b fixed): returns the row pointer (stride a.r), its first held
// index and row count; quantized blocks are dequantized into buf.
const float* tile_rows(const Args& a, const Tiles& tl, int64_t b, int64_t i, float* buf,
                       float* codes_f, int64_t* s0, int64_t* n) {
  const int64_t r = a.r;
  if (i < tl.n_sink) {
    *s0 = i * TILE;
    *n = std::min<int64_t>(TILE, a.ns - *s0);
    return a.sink + (b * a.ns + *s0) * r;
  }
  i -= tl.n_sink;
  if (i >= a.nb) {
    i -= a.nb;
    const int64_t o = i * TILE;
    *s0 = a.ns + a.nb * a.G + o;
    *n = std::min<int64_t>(TILE, a.nr - o);
    return a.res + (b * a.nr + o) * r;
  }
  const int64_t G = a.G, rk = a.rk, rv = a.rv, blk = b * a.nb + i;
  *s0 = a.ns + i * G;
  *n = G;
  // per-channel part: codes channel-major (rk × G)
  unpack(a.codes + blk * (G * rk * a.bits / 8), codes_f, G * rk, a.bits);
  const Half* sc = a.scales + blk * 2 * rk;
  for (int64_t c = 0; c < rk; ++c) {
    const float s = (float)sc[c], m = (float)sc[rk + c];
    const float* __restrict qc = codes_f + c * G;
    for (int64_t t = 0; t < G; ++t) buf[t * r + c] = qc[t] * s + m;
  }
  if (a.tok_scale) {
    const Half* nsc = a.nscales + blk * G;
    for (int64_t t = 0; t < G; ++t) {
      const float f = (float)nsc[t];
      for (int64_t c = 0; c < rk; ++c) buf[t * r + c] *= f;
    }
  }
  if (rv) {   // per-token part: token-major (G × rv), scale/min per (token, group of gv)
    unpack(a.tcodes + blk * (G * rv * a.bits / 8), codes_f, G * rv, a.bits);
    const int64_t ng = rv / a.gv;
    const Half* ts = a.tscales + blk * 2 * G * ng;
    for (int64_t t = 0; t < G; ++t)
      for (int64_t g = 0; g < ng; ++g) {
        const float s = (float)ts[t * ng + g], m = (float)ts[G * ng + t * ng + g];
        const float* __restrict qv = codes_f + t * rv + g * a.gv;
        float* __restrict o = buf + t * r + rk + g * a.gv;
        for (int64_t c = 0; c < a.gv; ++c) o[c] = qv[c] * s + m;
      }
  }
  return buf;
}

// a·b over n floats in 16 independent partial sums: without -ffast-math the compiler keeps a
// float reduction in source order (one serial FMA chain, ~4 cycles a channel); as lanes it becomes
// one vector FMA per 16 channels. The score of every (token, query head) is such a dot, so at 8k
// tokens this loop is most of a decode step.
inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc[16] = {0.f};
  int64_t d = 0;
  for (; d + 16 <= n; d += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[d + j] * b[d + j];
  float s = 0.f;
  for (; d < n; ++d) s += a[d] * b[d];
  for (int j = 0; j < 16; ++j) s += acc[j];
  return s;
}

// A rematerialized key of one head in place: k_norm, then RoPE at held row `row` (b·S + s).
inline void finish_key(const Args& a, float* __restrict k, int64_t row) {
  const int64_t D = a.D, half = D / 2;
  if (a.knw) {
    const float ss = dot(k, k, D);
    const float inv = 1.f / std::sqrt(ss / (float)D + a.eps);
    for (int64_t d = 0; d < D; ++d) k[d] = k[d] * inv * a.knw[d];
  }
  if (a.cos) {              // rotate_half layout: pairs (d, d + D/2) share one angle
    const float* __restrict c = a.cos + row * half;
    const float* __restrict s = a.sin + row * half;
    for (int64_t d = 0; d < half; ++d) {
      const float x1 = k[d], x2 = k[d + half];
      k[d] = x1 * c[d] - x2 * s[d];
      k[d + half] = x2 * c[d] + x1 * s[d];
    }
  }
}

// One task: tiles [t_lo, t_hi) of batch row b → per query head running max m, sum l and the
// unnormalized P·L_v (vh floats).
void run_task(const Args& a, int64_t b, int64_t t_lo, int64_t t_hi, float* pm, float* pl,
              float* pacc) {
  const int64_t Hq = a.Hq, H = a.H, D = a.D, dk = a.dk, rep = Hq / H, vh = a.vh;
  const bool remat = a.BkT != nullptr;
  // rematerialized keys: row t, head h at K[t·kst + h·D]; projected: the tile's own latent rows
  const int64_t kst = remat ? H * D : a.r;
  const Tiles tl(a);
  const int64_t TR = std::max<int64_t>(TILE, a.G);   // rows of the largest tile (a block of G)
  std::vector<float> buf(TR * a.r), codes_f(TR * std::max(a.rk, a.rv)), z(Hq * TR);
  std::vector<float> K(remat ? TR * kst : 0);
  for (int64_t h = 0; h < Hq; ++h) { pm[h] = NEG; pl[h] = 0.f; }
  std::fill(pacc, pacc + Hq * vh, 0.f);
  const float* q = a.q + b * Hq * dk;
  for (int64_t i = t_lo; i < t_hi; ++i) {
    int64_t s0, n;
    const float* L = tile_rows(a, tl, b, i, buf.data(), codes_f.data(), &s0, &n);
    const bool* mk = a.mask ? a.mask + b * a.S + s0 : nullptr;
    if (mk) {
      bool any = false;
      for (int64_t t = 0; t < n; ++t) any |= mk[t];
      if (!any) continue;          // a sliding window that does not reach this tile
    }
    if (remat) gemm_tile(L + a.k_off, a.r, n, a.BkT, a.kn, kst, a.bk, K.data());
    const float* Kt = remat ? K.data() : L + a.k_off;
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t h = 0; h < H; ++h) {
        if (remat) finish_key(a, K.data() + t * kst + h * D, b * a.S + s0 + t);
        const float* __restrict k = Kt + t * kst + h * (remat ? D : dk);
        for (int64_t j = 0; j < rep; ++j) {
          z[(h * rep + j) * TR + t] =
              (mk && !mk[t]) ? NEG : dot(q + (h * rep + j) * dk, k, dk) * a.scale;
        }
      }
    }
    for (int64_t hq = 0; hq < Hq; ++hq) {
      float* zr = z.data() + hq * TR;
      float mx = pm[hq];
      for (int64_t t = 0; t < n; ++t) mx = std::max(mx, zr[t]);
      if (mx == NEG) continue;
      const float corr = pm[hq] == NEG ? 0.f : std::exp(pm[hq] - mx);
      float* __restrict acc = pacc + hq * vh;
      if (corr != 1.f)
        for (int64_t c = 0; c < vh; ++c) acc[c] *= corr;
      float l = pl[hq] * corr;
      const int64_t v0 = a.v_off + (a.per_head_v ? (hq / rep) * vh : 0);
      for (int64_t t = 0; t < n; ++t) {
        if (zr[t] == NEG) continue;
        const float p = std::exp(zr[t] - mx);
        l += p;
        const float* __restrict lv = L + t * a.r + v0;
        for (int64_t c = 0; c < vh; ++c) acc[c] += p * lv[c];
      }
      pm[hq] = mx;
      pl[hq] = l;
    }
  }
}

}  // namespace

// Returns the output (B, Hq, D) fp32 and each query head's log-sum-exp of its scaled logits (B, Hq)
// (−inf where every column is masked), so a caller can merge this softmax with one over columns
// held elsewhere (cskv's exact window). Empty tensors stand for absent parts (no sink, no k_norm, no RoPE,
// no mask, no per-token channels; no BkT/bk: projected mode, q (B, Hq, dk) already in the basis).
std::vector<torch::Tensor> xquant_decode(torch::Tensor q, torch::Tensor sink, torch::Tensor res,
                            torch::Tensor codes, torch::Tensor scales, torch::Tensor nscales,
                            torch::Tensor tcodes, torch::Tensor tscales, torch::Tensor BkT,
                            torch::Tensor bk, torch::Tensor Bv, torch::Tensor bv,
                            torch::Tensor knw, torch::Tensor cos, torch::Tensor sin,
                            torch::Tensor mask, int64_t nb, int64_t G, int64_t rk, int64_t rv,
                            int64_t gv, int64_t bits, bool tok_scale, int64_t k_off,
                            int64_t v_off, int64_t H, double scale, double eps, int64_t nsplit,
                            bool per_head_v) {
  for (const auto* t : {&q, &sink, &res, &BkT, &bk, &Bv, &bv, &knw, &cos, &sin})
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous(), "fp32 contiguous");
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "bits must be 2, 4 or 8");
  Args a{};
  a.B = q.size(0); a.Hq = q.size(1); a.dk = q.size(2); a.H = H;
  TORCH_CHECK(Bv.dim() == 2 && Bv.size(0) % H == 0, "Bv must be (H·D, vh)");
  a.D = Bv.size(0) / H;
  const bool remat = BkT.numel() > 0;
  TORCH_CHECK(!remat || a.dk == a.D, "rematerialized keys: q must be head_dim wide");
  TORCH_CHECK(remat || (knw.numel() == 0 && cos.numel() == 0), "projected mode: no k_norm/RoPE");
  a.r = sink.size(2);
  TORCH_CHECK(res.size(2) == a.r, "sink and residual rows differ in width");
  a.ns = sink.size(1); a.nr = res.size(1); a.nb = nb; a.G = G; a.rk = rk; a.rv = rv; a.gv = gv;
  a.bits = bits; a.tok_scale = tok_scale; a.k_off = k_off; a.kn = remat ? BkT.size(0) : 0;
  a.v_off = v_off; a.vh = Bv.size(1); a.per_head_v = per_head_v;
  a.S = a.ns + nb * G + a.nr;
  TORCH_CHECK(!remat || (BkT.dim() == 2 && BkT.size(1) == H * a.D && bk.numel() == H * a.D),
              "factor shapes");
  TORCH_CHECK(k_off + (remat ? a.kn : H * a.dk) <= a.r &&
              v_off + (per_head_v ? H : 1) * a.vh <= a.r, "latent columns out of range");
  TORCH_CHECK(a.Hq % H == 0 && (!remat || a.D % 2 == 0), "head shapes");
  a.q = q.data_ptr<float>(); a.sink = sink.data_ptr<float>(); a.res = res.data_ptr<float>();
  if (nb) {
    a.codes = codes.data_ptr<uint8_t>();
    a.scales = reinterpret_cast<const Half*>(scales.data_ptr<at::Half>());
    if (tok_scale) a.nscales = reinterpret_cast<const Half*>(nscales.data_ptr<at::Half>());
    if (rv) {
      a.tcodes = tcodes.data_ptr<uint8_t>();
      a.tscales = reinterpret_cast<const Half*>(tscales.data_ptr<at::Half>());
    }
  }
  a.BkT = remat ? BkT.data_ptr<float>() : nullptr;
  a.bk = remat ? bk.data_ptr<float>() : nullptr;
  a.Bv = Bv.data_ptr<float>(); a.bv = bv.data_ptr<float>();
  a.knw = knw.numel() ? knw.data_ptr<float>() : nullptr;
  a.cos = cos.numel() ? cos.data_ptr<float>() : nullptr;
  a.sin = sin.numel() ? sin.data_ptr<float>() : nullptr;
  if (a.cos) TORCH_CHECK(cos.size(1) >= a.S && cos.size(2) == a.D / 2, "rope table shape");
  a.mask = mask.numel() ? mask.data_ptr<bool>() : nullptr;
  a.scale = (float)scale; a.eps = (float)eps;
  const Tiles tl(a);
  const int64_t ntiles = tl.count(a);
  a.nsplit = std::max<int64_t>(1, std::min(nsplit, ntiles));
  const int64_t Hq = a.Hq, vn = a.vh, D = a.D, rep = Hq / H, tasks = a.B * a.nsplit;
  std::vector<float> pm(tasks * Hq), pl(tasks * Hq), pacc(tasks * Hq * vn);
  at::parallel_for(0, tasks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t b = i / a.nsplit, sp = i % a.nsplit;
      run_task(a, b, ntiles * sp / a.nsplit, ntiles * (sp + 1) / a.nsplit, pm.data() + i * Hq,
               pl.data() + i * Hq, pacc.data() + i * Hq * vn);
    }
  });
  auto out = torch::empty({a.B, Hq, D}, torch::kFloat32);
  float* o = out.data_ptr<float>();
  auto lse = torch::empty({a.B, Hq}, torch::kFloat32);
  float* lo = lse.data_ptr<float>();
  std::vector<float> lat(vn);
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t hq = 0; hq < Hq; ++hq) {
      float m = NEG;
      for (int64_t sp = 0; sp < a.nsplit; ++sp) m = std::max(m, pm[(b * a.nsplit + sp) * Hq + hq]);
      float l = 0.f;
      std::fill(lat.begin(), lat.end(), 0.f);
      for (int64_t sp = 0; sp < a.nsplit; ++sp) {
        const int64_t i = (b * a.nsplit + sp) * Hq + hq;
        if (pm[i] == NEG) continue;
        const float w = std::exp(pm[i] - m);
        l += w * pl[i];
        const float* pa = pacc.data() + i * vn;
        for (int64_t c = 0; c < vn; ++c) lat[c] += w * pa[c];
      }
      const float inv = l > 0.f ? 1.f / l : 0.f;
      lo[b * Hq + hq] = l > 0.f ? m + std::log(l) : NEG;
      const int64_t h = hq / rep;
      float* oh = o + (b * Hq + hq) * D;
      for (int64_t d = 0; d < D; ++d) {
        const float* __restrict bvrow = a.Bv + (h * D + d) * vn;
        float s = 0.f;
        for (int64_t c = 0; c < vn; ++c) s += lat[c] * bvrow[c];
        oh[d] = s * inv + a.bv[h * D + d];
      }
    }
  return {out, lse};
}

bool xquant_simd() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("xquant_decode", &xquant_decode, "xquant latent decode attention (one query token)");
  m.def("xquant_simd", &xquant_simd, "whether the AVX-512 key micro-kernel is compiled in");
}
