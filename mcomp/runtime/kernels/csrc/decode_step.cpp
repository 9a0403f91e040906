// One decode step of a whole canonical model (mcomp/compiler/model.py) for one token of one
// sequence, in C++: the per-token cost is kernels, not the Python interpreter walking ~800 IR
// nodes (runtime/fastdecode.py lowers a model to this engine and says when it may).
//
// Per layer, with x the residual stream (H floats):
//   h = rmsnorm(x)·w_attn;  q|k|v = linears(h);  [q, k = per-head rmsnorm];  q, k = rope(pos)
//   K[n], V[n] = k, v  (written into the dense cache's own buffers, (1, Hkv, cap, D) fp32)
//   a = softmax(scale · q·Kᵀ[lo..n]) · V[lo..n]   (GQA; lo > 0 on sliding-window layers)
//   o = linear(a);  [o = rmsnorm(o)·w];  x += o
//   h = rmsnorm(x)·w_mlp;  m = down(act(gate(h)) · up(h))  (or down(act(up(h))));  [norm]; x += m
// then logits = head(rmsnorm(x)·w_final) [· softcap].
//
// Linears call the same ATen ops as the Python kernels (runtime/kernels/cpu_int.py) with the same
// prepared layouts and the same bf16 rounding of x, so a quantized linear gives bit-identical
// results here and in the graph; fp32 linears call at::linear. Norms, RoPE, activations and
// attention are this file's loops, in fp32; they differ from torch's only in summation order.
//
// Attention is split over (KV head, chunk of up to CHUNK tokens) tasks, chunks halved at short
// context until each thread has two, so both threads work at short and long context alike;
// each task keeps, for the rep query heads of its KV head, a running max, sum and P·V (the K/V rows are read once for all rep heads), and the chunks are merged by the
// log-sum-exp rule. exp is a vectorizable polynomial (|rel err| < 4e-7), not
// std::exp, which GCC will not vectorize without -ffast-math.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "qdot.h"

namespace {

constexpr int64_t CHUNK = 256;      // tokens per attention task
const float NEG = -std::numeric_limits<float>::infinity();

// exp(x) for float, branch-free so a loop over it vectorizes: x = n·ln2 + r with |r| ≤ ln2/2
// (Cody-Waite: ln2 in two parts, so r is exact to fp32 even at |x| ≈ 88), e^r by its Taylor
// polynomial to degree 7 (truncation < 1e-8), 2^n in the exponent bits. Inputs below -87 give 0.
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, 4);
  bits += static_cast<int32_t>(n) << 23;
  float out;
  std::memcpy(&out, &bits, 4);
  return x <= -87.0f ? 0.0f : out;
}

// K/V rows are stored as the dense cache's dtype (fp32, fp16 or bf16; half the bytes a decode
// step reads at long context) and widened to fp32 as they are read: the same values the graph
// path attends over (it converts the cache with .to(fp32)), so only summation order differs.
//
// Reductions: left to itself, GCC (without -ffast-math) ends a reduction loop in one dependent
// scalar add per element or per partial sum, which was most of a short-context decode attention
// (a 64-wide dot per key and head); with AVX-512 (the extension is built with -march=native on
// the machine that runs it) the partial sums stay in vectors and are added as a tree at the end.
template <typename T>
inline float widen(T x) { return static_cast<float>(x); }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
inline __mmask16 lanes(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const at::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
inline __m512 load16(const at::BFloat16* p, __mmask16 m) {   // bf16 is fp32's top half
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// Σ a[i]·b[i], b fp32 or a stored K row; two accumulators, so a long row is not one FMA chain
template <typename T>
inline float dot(const float* __restrict a, const T* __restrict b, int64_t n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load16(b + i, 0xFFFF), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), load16(b + i + 16, 0xFFFF), s1);
  }
  for (; i < n; i += 16) {
    const __mmask16 m = lanes(n - i);
    s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), load16(b + i, m), s0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

inline float sum(const float* a, int64_t n) {
  __m512 s0 = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) s0 = _mm512_add_ps(load16(a + i, lanes(n - i)), s0);
  return _mm512_reduce_add_ps(s0);
}

// acc[i] += p · v[i] over one stored value row
template <typename T>
inline void axpy_kv(float p, const T* __restrict v, float* __restrict acc, int64_t n) {
  const __m512 pv = _mm512_set1_ps(p);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lanes(n - i);
    _mm512_mask_storeu_ps(acc + i, m, _mm512_fmadd_ps(pv, load16(v + i, m), _mm512_maskz_loadu_ps(m, acc + i)));
  }
}
#else
template <typename T>
inline float dot(const float* __restrict a, const T* __restrict b, int64_t n) {
  float s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * widen(b[i]);
  return s;
}

inline float sum(const float* a, int64_t n) {
  float s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i];
  return s;
}

template <typename T>
inline void axpy_kv(float p, const T* __restrict v, float* __restrict acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += p * widen(v[i]);
}
#endif

// y = x / rms(x) · w over n floats (in place allowed)
inline void rmsnorm(const float* x, const float* w, float* y, int64_t n, float eps) {
  const float ms = dot(x, x, n) / static_cast<float>(n);
  const float r = 1.0f / std::sqrt(ms + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = (x[i] * r) * w[i];
}

enum Act : int64_t { SILU = 0, GELU = 1, GELU_TANH = 2, RELU = 3 };

inline float act(float x, int64_t kind) {
  switch (kind) {
    case SILU: return x / (1.0f + fast_exp(-x));
    case GELU: return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f));
    case GELU_TANH: {
      const float u = 0.79788456080286536f * (x + 0.044715f * x * x * x);
      const float th = 1.0f - 2.0f / (fast_exp(2.0f * u) + 1.0f);   // tanh(u)
      return 0.5f * x * (1.0f + th);
    }
    default: return x > 0 ? x : 0.0f;
  }
}

// y = act(g) (· u when gated) over n floats: one loop per kind, so that each vectorizes
template <int64_t KIND>
inline void act_loop(const float* __restrict g, const float* __restrict u, float* __restrict y, int64_t n) {
  if (u)
    for (int64_t i = 0; i < n; ++i) y[i] = act(g[i], KIND) * u[i];
  else
    for (int64_t i = 0; i < n; ++i) y[i] = act(g[i], KIND);
}

inline void act_rows(const float* g, const float* u, float* y, int64_t n, int64_t kind) {
  switch (kind) {
    case SILU: return act_loop<SILU>(g, u, y, n);
    case GELU: return act_loop<GELU>(g, u, y, n);
    case GELU_TANH: return act_loop<GELU_TANH>(g, u, y, n);
    default: return act_loop<RELU>(g, u, y, n);
  }
}

}  // namespace

// qdot.h's code for the dtype of an integer-dot linear's scales and zero points
inline int64_t sfmt(const at::Tensor& s) {
  switch (s.scalar_type()) {
    case at::kFloat: return qdot::F32;
    case at::kHalf: return qdot::F16;
    case at::kBFloat16: return qdot::BF16;
    default: TORCH_CHECK(false, "integer-dot linear: scales must be fp32, fp16 or bf16, not ", s.scalar_type());
  }
}

// A linear in the layout of one of the Python kernels. kind: 0 fp32 (w (N, K)),
// 1 int4 tinygemm (cpu_int.py: w packed, s = scales-and-zeros (Kp/go, Np, 2) bf16, go = op group),
// 2 int8 per-channel bf16 (cpu_int.py: w (N, Kp) int8, s (N,) bf16, corr = optional zero-point
// correction (N,)), 3 integer dot (int_dot.py / qdot.h: w codes, s (N, G) scales and z (N, G) zero
// points in the artifact's scale dtype, bits, g).
struct Lin {
  int64_t kind = 0, K = 0, Kp = 0, N = 0, Np = 0, go = 0, bits = 0, g = 0, G = 0;
  at::Tensor w, s, z, corr, bias;

  qdot::W qw() const {
    qdot::W q;
    q.bits = bits; q.N = N; q.K = K; q.Kp = Kp; q.g = g; q.G = G;
    q.codes = w.data_ptr<uint8_t>();
    q.sfmt = sfmt(s);
    q.s = s.data_ptr();
    q.z = z.data_ptr();
    q.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
    return q;
  }

  // y[0..N) from one row x[0..K) whose quantization (kind 3) is `a`
  void into(const float* x, const qdot::Act& a, float* y) const {
    if (kind == 3) {
      qdot::gemm(qw(), &a, 1, y);
      return;
    }
    at::Tensor xt = at::from_blob(const_cast<float*>(x), {1, K}, at::kFloat);
    at::Tensor r = (*this)(xt);
    std::memcpy(y, r.data_ptr<float>(), N * sizeof(float));
  }

  // kind 3 over M rows x (M, K) fp32: each row quantized (in parallel), then one gemm; isa −1 is
  // the best this CPU has
  at::Tensor rows(const at::Tensor& x, int64_t isa = -1) const {
    const at::Tensor xc = x.contiguous();
    const int64_t M = xc.size(0);
    const float* xp = xc.data_ptr<float>();
    std::vector<qdot::Act> acts(M);
    at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) acts[m].quantize(xp + m * K, K);
    });
    at::Tensor y = at::empty({M, N}, xc.options());
    qdot::gemm(qw(), acts.data(), M, y.data_ptr<float>(), isa);
    return y;
  }

  at::Tensor operator()(const at::Tensor& x) const {   // x (M, K) fp32 → (M, N) fp32
    if (kind == 0) return bias.defined() ? at::linear(x, w, bias) : at::linear(x, w);
    if (kind == 3) return rows(x);
    at::Tensor xb = x.to(at::kBFloat16);
    if (Kp != K) xb = at::constant_pad_nd(xb, {0, Kp - K});
    at::Tensor y;
    if (kind == 1) {
      y = at::_weight_int4pack_mm_for_cpu(xb.contiguous(), w, go, s);
      if (Np != N) y = y.narrow(1, 0, N);
    } else {
      y = at::_weight_int8pack_mm(xb.contiguous(), w, s);
      if (corr.defined()) y = at::addr(y.to(at::kFloat), xb.sum(-1, false, at::kFloat), corr);
    }
    if (bias.defined()) y = at::add(y, bias);
    return y.to(at::kFloat).contiguous();
  }
};

struct Layer {
  int64_t Hq = 0, Hkv = 0, D = 0, F = 0;
  int64_t window = 0;          // 0: global attention
  int64_t rope = -1;           // index of the rotary table, -1: no RoPE
  double scale = 1.0;
  at::Tensor attn_norm, q_norm, k_norm, post_attn_norm, mlp_norm, post_mlp_norm;  // undefined: absent
  std::vector<Lin> qkv;        // outputs concatenated in order: q | k | v
  Lin o;
  std::vector<Lin> gate_up;    // outputs concatenated: gate | up (gated), up (plain)
  Lin down;
  at::Tensor kbuf, vbuf;       // the dense cache's buffers (1, Hkv, cap, D) fp32, fp16 or bf16
};

namespace {

// softmax(scale·q·Kᵀ)·V over cache rows [lo, hi) for every query head; q (Hq·D), out (Hq·D);
// T is the cache's storage type.
template <typename T>
void attend_t(const Layer& L, const float* q, int64_t lo, int64_t hi, float* out) {
  const int64_t D = L.D, Hkv = L.Hkv, rep = L.Hq / L.Hkv, cap = L.kbuf.size(2);
  const int64_t S = hi - lo;
  // tasks are (KV head, key chunk); at short contexts a chunk per KV head leaves threads idle
  // (SmolLM2: 3 KV heads on 2 threads), so chunks halve until every thread has two tasks
  int64_t chunk = CHUNK;
  while (chunk > 32 && Hkv * ((S + chunk - 1) / chunk) < 2 * at::get_num_threads()) chunk /= 2;
  const int64_t nchunk = (S + chunk - 1) / chunk;
  const T* K = L.kbuf.data_ptr<T>();
  const T* V = L.vbuf.data_ptr<T>();
  const float scale = static_cast<float>(L.scale);
  // per (task, rep head): max, sum, acc[D]
  std::vector<float> part(static_cast<size_t>(Hkv * nchunk * rep * (D + 2)));
  at::parallel_for(0, Hkv * nchunk, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> sc(static_cast<size_t>(rep * CHUNK));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / nchunk, c = t % nchunk;
      const int64_t a = lo + c * chunk, b = std::min(hi, a + chunk), n = b - a;
      const T* Kg = K + (g * cap + a) * D;
      const T* Vg = V + (g * cap + a) * D;
      float* P = part.data() + t * rep * (D + 2);
      for (int64_t r = 0; r < rep; ++r) {
        const float* qh = q + (g * rep + r) * D;
        float* s = sc.data() + r * CHUNK;
        float m = NEG;
        for (int64_t j = 0; j < n; ++j) {
          s[j] = dot(qh, Kg + j * D, D) * scale;
          m = std::max(m, s[j]);
        }
        for (int64_t j = 0; j < n; ++j) s[j] = fast_exp(s[j] - m);   // vectorizes
        const float l = sum(s, n);
        P[r * (D + 2)] = m;
        P[r * (D + 2) + 1] = l;
        std::fill(P + r * (D + 2) + 2, P + (r + 1) * (D + 2), 0.0f);
      }
      for (int64_t j = 0; j < n; ++j) {          // each V row read once for all rep heads
        const T* v = Vg + j * D;
        for (int64_t r = 0; r < rep; ++r) axpy_kv(sc[r * CHUNK + j], v, P + r * (D + 2) + 2, D);
      }
    }
  });
  for (int64_t g = 0; g < Hkv; ++g)
    for (int64_t r = 0; r < rep; ++r) {
      float M = NEG;
      for (int64_t c = 0; c < nchunk; ++c) M = std::max(M, part[((g * nchunk + c) * rep + r) * (D + 2)]);
      float* o = out + (g * rep + r) * D;
      std::fill(o, o + D, 0.0f);
      float l = 0;
      for (int64_t c = 0; c < nchunk; ++c) {
        const float* P = part.data() + ((g * nchunk + c) * rep + r) * (D + 2);
        const float w = std::exp(P[0] - M);
        l += w * P[1];
        for (int64_t d = 0; d < D; ++d) o[d] += w * P[2 + d];
      }
      const float inv = 1.0f / l;
      for (int64_t d = 0; d < D; ++d) o[d] *= inv;
    }
}

// f(T{}) for the storage type T of a layer's dense cache (set_kv admits only these three)
template <typename F>
void by_kv_type(const Layer& L, F&& f) {
  switch (L.kbuf.scalar_type()) {
    case at::kHalf: return f(at::Half{});
    case at::kBFloat16: return f(at::BFloat16{});
    default: return f(float{});
  }
}

void attend(const Layer& L, const float* q, int64_t lo, int64_t hi, float* out) {
  by_kv_type(L, [&](auto t) { attend_t<decltype(t)>(L, q, lo, hi, out); });
}

// write the new token's K/V rows (Hkv × D fp32) at row n of the cache's buffers, rounded to the
// cache's dtype as the graph's cache rounds them (round to nearest even)
template <typename T>
void write_kv_t(const Layer& L, const float* k, const float* v, int64_t n) {
  const int64_t cap = L.kbuf.size(2), D = L.D;
  T* K = L.kbuf.data_ptr<T>();
  T* V = L.vbuf.data_ptr<T>();
  for (int64_t g = 0; g < L.Hkv; ++g)
    for (int64_t d = 0; d < D; ++d) {
      K[(g * cap + n) * D + d] = static_cast<T>(k[g * D + d]);
      V[(g * cap + n) * D + d] = static_cast<T>(v[g * D + d]);
    }
}

void write_kv(const Layer& L, const float* k, const float* v, int64_t n) {
  by_kv_type(L, [&](auto t) { write_kv_t<decltype(t)>(L, k, v, n); });
}

// half-split RoPE (rotate_half) of every head of x (H heads × D) with cos/sin (D/2 each)
void rope(float* x, int64_t H, int64_t D, const float* c, const float* s) {
  const int64_t h2 = D / 2;
  for (int64_t h = 0; h < H; ++h) {
    float* a = x + h * D;
    float* b = a + h2;
    for (int64_t i = 0; i < h2; ++i) {
      const float x1 = a[i], x2 = b[i];
      a[i] = x1 * c[i] - x2 * s[i];
      b[i] = x2 * c[i] + x1 * s[i];
    }
  }
}

// y[0..N) = lin(x) for one input row x (K floats); an integer-dot linear quantizes x into `a`
// unless `quantized` says `a` already holds x (linears reading the same row share it).
void run_one(const Lin& l, const float* x, float* y, qdot::Act& a, bool quantized = false) {
  if (l.kind == 3 && !quantized) a.quantize(x, l.K);
  l.into(x, a, y);
}

// The linears that read one input row, outputs concatenated into y; when all are integer-dot,
// one quantization of x and one parallel region serve them all.
void run_all(const std::vector<Lin>& lins, const float* x, float* y, qdot::Act& a) {
  if (lins.size() > 1 && std::all_of(lins.begin(), lins.end(), [](const Lin& l) { return l.kind == 3; })) {
    a.quantize(x, lins[0].K);
    std::vector<qdot::W> ws;
    std::vector<const qdot::W*> wp;
    std::vector<float*> ys;
    std::vector<int64_t> lds;
    for (const auto& l : lins) ws.push_back(l.qw());
    for (size_t i = 0; i < lins.size(); ++i) {
      wp.push_back(&ws[i]);
      ys.push_back(y);
      lds.push_back(lins[i].N);
      y += lins[i].N;
    }
    qdot::gemm_many(wp.data(), ys.data(), lds.data(), static_cast<int64_t>(ws.size()), &a, 1);
    return;
  }
  bool quantized = false;
  for (const auto& l : lins) {
    run_one(l, x, y, a, quantized);
    quantized = quantized || l.kind == 3;
    y += l.N;
  }
}

int64_t width(const std::vector<Lin>& lins) {
  int64_t n = 0;
  for (const auto& l : lins) n += l.N;
  return n;
}

}  // namespace

struct Engine {
  std::vector<Layer> layers;
  std::vector<at::Tensor> inv_freq;    // one per rotary table (D/2 fp32)
  at::Tensor final_norm;
  Lin head;
  double eps = 1e-5;
  int64_t act_kind = SILU;
  bool gated = true;
  double softcap = 0.0;                // 0: none
  // Optional per-phase wall time (seconds, summed over steps), for `mcomp bench` and tuning:
  // 0 norms/rope/KV write/residuals, 1 q|k|v, 2 attention, 3 o, 4 gate|up + act, 5 down, 6 head
  bool profile = false;
  std::vector<double> prof = std::vector<double>(7, 0.0);

  void add_layer(const Layer& l) { layers.push_back(l); }

  void set_kv(int64_t i, at::Tensor k, at::Tensor v) {
    const auto t = k.scalar_type();
    TORCH_CHECK((t == at::kFloat || t == at::kHalf || t == at::kBFloat16) && v.scalar_type() == t &&
                k.is_contiguous() && v.is_contiguous() && k.dim() == 4 && k.size(0) == 1 && k.sizes() == v.sizes(),
                "decode engine: layer ", i, " KV buffers must be contiguous fp32, fp16 or bf16 (1, Hkv, cap, D)");
    layers.at(i).kbuf = k;
    layers.at(i).vbuf = v;
  }

  // x (1, H) fp32: the embedded token; n: tokens the caches hold (the new one is written at row
  // n, which is also its position). Returns logits (1, V) fp32.
  at::Tensor step(at::Tensor x, int64_t n) {
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(0) == 1,
                "decode engine: x must be (1, hidden) fp32");
    x = x.contiguous().clone();
    const float eps_f = static_cast<float>(eps);
    const int64_t H = x.size(1);
    // cos/sin of position n for every rotary table
    std::vector<std::vector<float>> cs(inv_freq.size()), sn(inv_freq.size());
    for (size_t t = 0; t < inv_freq.size(); ++t) {
      const float* f = inv_freq[t].data_ptr<float>();
      const int64_t h2 = inv_freq[t].numel();
      cs[t].resize(h2);
      sn[t].resize(h2);
      for (int64_t i = 0; i < h2; ++i) {
        const float a = static_cast<float>(n) * f[i];
        cs[t][i] = std::cos(a);
        sn[t][i] = std::sin(a);
      }
    }
    at::Tensor h = at::empty({1, H}, x.options());
    float* xp = x.data_ptr<float>();
    float* hp = h.data_ptr<float>();
    using clk = std::chrono::steady_clock;
    auto t_last = clk::now();
    auto lap = [&](int phase) {             // charge the time since the last lap to `phase`
      if (!profile) return;
      const auto now = clk::now();
      prof[phase] += std::chrono::duration<double>(now - t_last).count();
      t_last = now;
    };
    qdot::Act qa;                        // the quantized input row of the integer-dot linears
    std::vector<float> buf;              // q|k|v, then gate|up: the widest linear group
    std::vector<float> att, proj(H), mid;
    for (const Layer& L : layers) {
      const int64_t D = L.D, qd = L.Hq * D, kd = L.Hkv * D;
      TORCH_CHECK(L.kbuf.defined() && n < L.kbuf.size(2), "decode engine: KV buffer too small");
      rmsnorm(xp, L.attn_norm.data_ptr<float>(), hp, H, eps_f);
      lap(0);
      buf.resize(std::max(width(L.qkv), width(L.gate_up)));
      run_all(L.qkv, hp, buf.data(), qa);                    // q | k | v
      lap(1);
      float* q = buf.data();
      float* k = q + qd;
      const float* v = k + kd;
      if (L.q_norm.defined()) {
        for (int64_t i = 0; i < L.Hq; ++i) rmsnorm(q + i * D, L.q_norm.data_ptr<float>(), q + i * D, D, eps_f);
        for (int64_t i = 0; i < L.Hkv; ++i) rmsnorm(k + i * D, L.k_norm.data_ptr<float>(), k + i * D, D, eps_f);
      }
      if (L.rope >= 0) {
        rope(q, L.Hq, D, cs[L.rope].data(), sn[L.rope].data());
        rope(k, L.Hkv, D, cs[L.rope].data(), sn[L.rope].data());
      }
      write_kv(L, k, v, n);
      const int64_t lo = L.window > 0 ? std::max<int64_t>(0, n - L.window + 1) : 0;
      att.resize(qd);
      lap(0);
      attend(L, q, lo, n + 1, att.data());
      lap(2);
      float* op = proj.data();
      run_one(L.o, att.data(), op, qa);
      lap(3);
      if (L.post_attn_norm.defined()) rmsnorm(op, L.post_attn_norm.data_ptr<float>(), op, H, eps_f);
      for (int64_t i = 0; i < H; ++i) xp[i] += op[i];
      rmsnorm(xp, L.mlp_norm.data_ptr<float>(), hp, H, eps_f);
      lap(0);
      run_all(L.gate_up, hp, buf.data(), qa);
      const float* g = buf.data();
      mid.resize(L.F);
      float* mi = mid.data();
      act_rows(g, gated ? g + L.F : nullptr, mi, L.F, act_kind);
      lap(4);
      float* mp = proj.data();
      run_one(L.down, mi, mp, qa);
      lap(5);
      if (L.post_mlp_norm.defined()) rmsnorm(mp, L.post_mlp_norm.data_ptr<float>(), mp, H, eps_f);
      for (int64_t i = 0; i < H; ++i) xp[i] += mp[i];
    }
    rmsnorm(xp, final_norm.data_ptr<float>(), hp, H, eps_f);
    at::Tensor logits = at::empty({1, head.N}, x.options());
    lap(0);
    run_one(head, hp, logits.data_ptr<float>(), qa);
    lap(6);
    if (softcap > 0) logits = at::tanh(logits / softcap) * softcap;
    return logits;
  }
};

// Pure-loop attention over explicit rows, exposed for the kernel-vs-reference test.
at::Tensor attention_only(at::Tensor q, at::Tensor kbuf, at::Tensor vbuf, int64_t lo, int64_t hi,
                          double scale) {
  Layer L;
  L.Hq = q.size(0) / kbuf.size(3);
  L.Hkv = kbuf.size(1);
  L.D = kbuf.size(3);
  L.scale = scale;
  L.kbuf = kbuf.contiguous();
  L.vbuf = vbuf.contiguous();
  q = q.contiguous();
  at::Tensor out = at::empty_like(q);
  attend(L, q.data_ptr<float>(), lo, hi, out.data_ptr<float>());
  return out;
}

at::Tensor exp_only(at::Tensor x) {
  x = x.contiguous();
  at::Tensor y = at::empty_like(x);
  const float* a = x.data_ptr<float>();
  float* b = y.data_ptr<float>();
  for (int64_t i = 0; i < x.numel(); ++i) b[i] = fast_exp(a[i]);
  return y;
}

// The integer-dot linear as a function, for the graph's kernel (int_dot.py) and its tests; isa
// −1 picks the best this CPU has, 0/1/2 forces one (tests run every path the CPU can).
at::Tensor qlinear(at::Tensor x, at::Tensor codes, at::Tensor s, at::Tensor z,
                   c10::optional<at::Tensor> bias, int64_t bits, int64_t K, int64_t g, int64_t isa) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == K, "qlinear: x (M, K) fp32");
  TORCH_CHECK(isa <= qdot::best_isa(), "qlinear: this CPU cannot run ISA ", isa);
  Lin l;
  l.kind = 3; l.bits = bits; l.K = K; l.Kp = (K + qdot::CH - 1) / qdot::CH * qdot::CH;
  l.N = codes.size(0); l.g = g; l.G = s.size(1);
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() &&
              codes.size(1) == (bits == 4 ? l.Kp / 2 : l.Kp) && (bits == 4 || bits == 8) &&
              g > 0 && g % qdot::CH == 0 && l.G == (K + g - 1) / g && s.size(0) == l.N &&
              z.sizes() == s.sizes() && z.scalar_type() == s.scalar_type(),
              "qlinear: operands are not in qdot.h's layout");
  sfmt(s);
  l.w = codes; l.s = s.contiguous(); l.z = z.contiguous();
  if (bias) l.bias = bias->contiguous();
  return l.rows(x, isa);
}

// (q1, q2, e) of qdot.h's activation rounding, for the bit-exactness test against the torch one
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_act(at::Tensor x) {
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  qdot::Act a;
  a.Kp = (K + qdot::CH - 1) / qdot::CH * qdot::CH;
  at::Tensor q = at::empty({M, a.Kp}, x.options().dtype(at::kChar));
  at::Tensor q2 = at::empty({M, a.Kp}, x.options().dtype(at::kChar));
  at::Tensor e = at::empty({M, a.Kp / qdot::XB}, x.options());
  for (int64_t m = 0; m < M; ++m) {
    a.quantize(x.data_ptr<float>() + m * K, K);
    std::memcpy(q.data_ptr<int8_t>() + m * a.Kp, a.q.data(), a.Kp);
    std::memcpy(q2.data_ptr<int8_t>() + m * a.Kp, a.q2.data(), a.Kp);
    for (int64_t b = 0; b < a.Kp / qdot::XB; ++b) e.data_ptr<float>()[m * (a.Kp / qdot::XB) + b] = a.dv[b * 8];
  }
  return {q, q2, e};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  py::class_<Lin>(m, "Lin")
      .def(py::init<>())
      .def_readwrite("kind", &Lin::kind).def_readwrite("K", &Lin::K).def_readwrite("Kp", &Lin::Kp)
      .def_readwrite("N", &Lin::N).def_readwrite("Np", &Lin::Np).def_readwrite("go", &Lin::go)
      .def_readwrite("bits", &Lin::bits).def_readwrite("g", &Lin::g).def_readwrite("G", &Lin::G)
      .def_readwrite("z", &Lin::z)
      .def_readwrite("w", &Lin::w).def_readwrite("s", &Lin::s).def_readwrite("corr", &Lin::corr)
      .def_readwrite("bias", &Lin::bias)
      .def("__call__", &Lin::operator());
  py::class_<Layer>(m, "Layer")
      .def(py::init<>())
      .def_readwrite("Hq", &Layer::Hq).def_readwrite("Hkv", &Layer::Hkv).def_readwrite("D", &Layer::D)
      .def_readwrite("F", &Layer::F).def_readwrite("window", &Layer::window)
      .def_readwrite("rope", &Layer::rope).def_readwrite("scale", &Layer::scale)
      .def_readwrite("attn_norm", &Layer::attn_norm).def_readwrite("q_norm", &Layer::q_norm)
      .def_readwrite("k_norm", &Layer::k_norm).def_readwrite("post_attn_norm", &Layer::post_attn_norm)
      .def_readwrite("mlp_norm", &Layer::mlp_norm).def_readwrite("post_mlp_norm", &Layer::post_mlp_norm)
      .def_readwrite("qkv", &Layer::qkv).def_readwrite("o", &Layer::o)
      .def_readwrite("gate_up", &Layer::gate_up).def_readwrite("down", &Layer::down);
  py::class_<Engine>(m, "Engine")
      .def(py::init<>())
      .def_readwrite("inv_freq", &Engine::inv_freq).def_readwrite("final_norm", &Engine::final_norm)
      .def_readwrite("head", &Engine::head).def_readwrite("eps", &Engine::eps)
      .def_readwrite("act_kind", &Engine::act_kind).def_readwrite("gated", &Engine::gated)
      .def_readwrite("softcap", &Engine::softcap)
      .def_readwrite("profile", &Engine::profile).def_readwrite("prof", &Engine::prof)
      .def("add_layer", &Engine::add_layer)
      .def("set_kv", &Engine::set_kv)
      .def("step", &Engine::step, py::call_guard<py::gil_scoped_release>());
  m.def("qlinear", &qlinear, "integer-dot linear (qdot.h) of x (M, K) fp32 on prepared operands",
        py::arg("x"), py::arg("codes"), py::arg("s"), py::arg("z"), py::arg("bias"),
        py::arg("bits"), py::arg("K"), py::arg("g"), py::arg("isa") = -1,
        py::call_guard<py::gil_scoped_release>());
  m.def("quantize_act", &quantize_act, "qdot.h's activation rounding of x (M, K): (q1, q2, e = d/128)");
  m.def("isa", &qdot::best_isa, "the integer-dot ISA this CPU runs: 0 portable, 1 AVX2, 2 AVX-512 VNNI");
  m.def("attention", &attention_only, "decode attention over rows [lo, hi) of (1, Hkv, cap, D) buffers");
  m.def("fast_exp", &exp_only, "the kernel's polynomial exp, for its accuracy test");
}
