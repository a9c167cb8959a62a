// Causal self-attention for short contexts on CPU (float32, AVX2 + FMA): forward and backward.
//
// Built on first use by barkgpt/cpu_attention.py (torch.utils.cpp_extension). For T up to a few
// hundred tokens and head sizes 16 or 32 it beats PyTorch's CPU flash attention, whose blocks
// are sized for long sequences: the whole (T, T) score matrix of a head fits in L1/L2 here, so
// each (batch, kv head) is done in one pass, the G query heads that share a key/value head
// (grouped-query attention) reusing each key and value load, and the attention weights are kept
// for the backward instead of recomputed.
//
// Forward (Vaswani et al. 2017): P = softmax(scale * Q K^T + causal mask), O = P V.
// Backward (as FlashAttention's, Dao et al. 2022, Algorithm 4): dV = P^T dO, dP = dO V^T,
// dS = P * (dP - rowsum(dO * O)), dQ = scale * dS K, dK = scale * dS^T Q.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <vector>

namespace {

constexpr int R = 4;  // query rows processed together (they share each key/value load)

// e^x for 8 floats (Cephes expf: x = n ln2 + r, a degree-6 polynomial for e^r, 2^n through the
// exponent bits); inputs below -87.3 give 0. Relative error ~2e-7.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// out[r][0..np) = sum_d a[r][d] * bt[d][0..np) for R rows; bt is (D, Tp), np a multiple of 8.
template <int D>
inline void rows_times_t(const float* const a[R], const float* bt, int64_t Tp, int64_t np, float* const out[R]) {
  for (int64_t u = 0; u < np; u += 8) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int d = 0; d < D; ++d) {
      __m256 b = _mm256_loadu_ps(bt + d * Tp + u);
      for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(a[r][d]), b, acc[r]);
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(out[r] + u, acc[r]);
  }
}

// out[0..D) = sum_{u<n} w[u] * m[u][0..D)  (m is (n, D) row-major)
template <int D>
inline void weighted_rows(const float* w, const float* m, int64_t ms, int64_t n, float* out, float scale) {
  constexpr int ND = D / 8;
  __m256 acc[ND], acc2[ND];
  for (int j = 0; j < ND; ++j) acc[j] = acc2[j] = _mm256_setzero_ps();
  int64_t u = 0;
  for (; u + 1 < n; u += 2) {
    __m256 w0 = _mm256_set1_ps(w[u]), w1 = _mm256_set1_ps(w[u + 1]);
    for (int j = 0; j < ND; ++j) {
      acc[j] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(m + u * ms + 8 * j), acc[j]);
      acc2[j] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(m + (u + 1) * ms + 8 * j), acc2[j]);
    }
  }
  if (u < n) {
    __m256 w0 = _mm256_set1_ps(w[u]);
    for (int j = 0; j < ND; ++j) acc[j] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(m + u * ms + 8 * j), acc[j]);
  }
  __m256 s = _mm256_set1_ps(scale);
  for (int j = 0; j < ND; ++j) _mm256_storeu_ps(out + 8 * j, _mm256_mul_ps(_mm256_add_ps(acc[j], acc2[j]), s));
}

// Transpose a (T, D) block with row stride ss into (D, Tp), zero-padding columns T..Tp.
inline void transpose_pad(const float* src, int64_t ss, int64_t T, int64_t D, int64_t Tp, float* dst) {
  for (int64_t d = 0; d < D; ++d) {
    for (int64_t u = 0; u < T; ++u) dst[d * Tp + u] = src[u * ss + d];
    for (int64_t u = T; u < Tp; ++u) dst[d * Tp + u] = 0.f;
  }
}

// Strides of a (B, T, heads, D) tensor whose last dim is contiguous.
struct Layout { int64_t sb, st, sh; };

// Query rows of one (batch, kv head) in the order (t, g): row i is head hk*G + i%G at position i/G.
struct Rows {
  const float* base; Layout l; int64_t H, T, G, b, hk;
  const float* operator()(int64_t i) const { return base + b * l.sb + (i / G) * l.st + (hk * G + i % G) * l.sh; }
  int64_t index(int64_t i) const { return (b * H + hk * G + i % G) * T + i / G; }  // row of P, (B, H, T)
  int64_t out_row(int64_t i) const { return (b * T + i / G) * H + hk * G + i % G; }  // row of a contiguous (B, T, H, D)
};

template <int D>
void forward_impl(const float* Q, Layout lq, const float* K, Layout lk, const float* V, Layout lv, float* O, float* P, int64_t B,
                  int64_t H, int64_t Hkv, int64_t T, float scale) {
  const int64_t G = H / Hkv, Tp = (T + 7) / 8 * 8, NR = G * T;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kt(D * Tp), s(R * Tp);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hkv, hk = bh % Hkv;
      const float* kb = K + b * lk.sb + hk * lk.sh; const float* vb = V + b * lv.sb + hk * lv.sh;
      transpose_pad(kb, lk.st, T, D, Tp, kt.data());
      Rows q{Q, lq, H, T, G, b, hk};
      for (int64_t i0 = 0; i0 < NR; i0 += R) {
        const float* a[R]; float* out[R];
        for (int r = 0; r < R; ++r) { a[r] = q(std::min(i0 + r, NR - 1)); out[r] = s.data() + r * Tp; }
        const int64_t nmax = std::min(NR - 1, i0 + R - 1) / G + 1, np = (nmax + 7) / 8 * 8;
        rows_times_t<D>(a, kt.data(), Tp, np, out);
        for (int r = 0; r < R && i0 + r < NR; ++r) {
          const int64_t i = i0 + r, n = i / G + 1;
          float* sr = out[r];
          const int64_t nv = (n + 7) / 8 * 8;  // whole vectors: keys n..nv are masked to -inf (exp gives 0)
          for (int64_t u = n; u < nv; ++u) sr[u] = -INFINITY;
          __m256 mx = _mm256_set1_ps(-INFINITY);
          for (int64_t u = 0; u < nv; u += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(sr + u));
          __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
          m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
          m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
          const __m256 ms = _mm256_set1_ps(_mm_cvtss_f32(m4)), sc = _mm256_set1_ps(scale);
          __m256 acc = _mm256_setzero_ps();
          for (int64_t u = 0; u < nv; u += 8) {  // p = exp(scale * (s - max))
            __m256 e = exp8(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(sr + u), ms), sc));
            _mm256_storeu_ps(sr + u, e); acc = _mm256_add_ps(acc, e);
          }
          const __m256 inv = _mm256_set1_ps(1.f / hsum(acc));
          float* pr = P + q.index(i) * T;
          int64_t u = 0;
          for (; u + 8 <= nv && u + 8 <= T; u += 8) _mm256_storeu_ps(pr + u, _mm256_mul_ps(_mm256_loadu_ps(sr + u), inv));
          for (; u < T; ++u) pr[u] = u < n ? sr[u] * _mm256_cvtss_f32(inv) : 0.f;
          weighted_rows<D>(pr, vb, lv.st, n, O + q.out_row(i) * D, 1.f);  // o = p v
        }
      }
    }
  });
}

template <int D>
void backward_impl(const float* dO, Layout lg, const float* Q, Layout lq, const float* K, Layout lk, const float* V, Layout lv,
                   const float* O, const float* P, float* dQ, float* dK, float* dV, int64_t B, int64_t H, int64_t Hkv,
                   int64_t T, float scale) {
  constexpr int ND = D / 8;
  const int64_t G = H / Hkv, Tp = (T + 7) / 8 * 8, NR = G * T;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> vt(D * Tp), ds(R * Tp);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hkv, hk = bh % Hkv;
      const float* kb = K + b * lk.sb + hk * lk.sh; const float* vb = V + b * lv.sb + hk * lv.sh;
      const int64_t skv = Hkv * D;  // row stride of the contiguous (B, T, Hkv, D) grads
      float* dkb = dK + (b * T * Hkv + hk) * D; float* dvb = dV + (b * T * Hkv + hk) * D;
      for (int64_t u = 0; u < T; ++u) for (int d = 0; d < D; ++d) dkb[u * skv + d] = dvb[u * skv + d] = 0.f;
      transpose_pad(vb, lv.st, T, D, Tp, vt.data());
      Rows go{dO, lg, H, T, G, b, hk}, q{Q, lq, H, T, G, b, hk};
      for (int64_t i0 = 0; i0 < NR; i0 += R) {
        const int rows = static_cast<int>(std::min<int64_t>(R, NR - i0));
        const float* a[R]; float* out[R];
        for (int r = 0; r < R; ++r) { a[r] = go(std::min(i0 + r, NR - 1)); out[r] = ds.data() + r * Tp; }
        const int64_t nmax = (i0 + rows - 1) / G + 1, np = (nmax + 7) / 8 * 8;
        rows_times_t<D>(a, vt.data(), Tp, np, out);  // dp = dO v^T
        const float* prow[R]; const float* qrow[R]; const float* grow[R]; int64_t nr[R];
        for (int r = 0; r < rows; ++r) {
          const int64_t i = i0 + r, n = i / G + 1, row = q.index(i);
          const float* pr = P + row * T; const float* gr = go(i); const float* orow = O + q.out_row(i) * D;
          float di = 0.f;
          for (int d = 0; d < D; ++d) di += gr[d] * orow[d];
          float* dsr = out[r];
          for (int64_t u = 0; u < n; ++u) dsr[u] = pr[u] * (dsr[u] - di);
          for (int64_t u = n; u < np; ++u) dsr[u] = 0.f;
          weighted_rows<D>(dsr, kb, lk.st, n, dQ + q.out_row(i) * D, scale);  // dq = scale * ds k
          prow[r] = pr; qrow[r] = q(i); grow[r] = gr; nr[r] = n;
        }
        // dk[u] += scale * sum_r ds_r[u] q_r ; dv[u] += sum_r p_r[u] dO_r
        __m256 qv[R][ND], gv[R][ND];
        for (int r = 0; r < rows; ++r)
          for (int j = 0; j < ND; ++j) {
            qv[r][j] = _mm256_mul_ps(_mm256_loadu_ps(qrow[r] + 8 * j), _mm256_set1_ps(scale));
            gv[r][j] = _mm256_loadu_ps(grow[r] + 8 * j);
          }
        for (int64_t u = 0; u < nmax; ++u) {
          for (int j = 0; j < ND; ++j) {
            __m256 k_acc = _mm256_loadu_ps(dkb + u * skv + 8 * j), v_acc = _mm256_loadu_ps(dvb + u * skv + 8 * j);
            for (int r = 0; r < rows; ++r) {
              if (u >= nr[r]) continue;
              k_acc = _mm256_fmadd_ps(_mm256_set1_ps(out[r][u]), qv[r][j], k_acc);
              v_acc = _mm256_fmadd_ps(_mm256_set1_ps(prow[r][u]), gv[r][j], v_acc);
            }
            _mm256_storeu_ps(dkb + u * skv + 8 * j, k_acc);
            _mm256_storeu_ps(dvb + u * skv + 8 * j, v_acc);
          }
        }
      }
    }
  });
}


// One decode step of attention (a query of one token per row) over a KV cache, without writing it.
// Row b attends its first n = pos[b] cached slots and then its J new keys/values (J = 1 for one
// step; J > 1 when a compiled call decodes several tokens and the earlier ones are not yet in the
// cache), which the caller writes into the cache afterwards: nothing the size of the cache is
// copied, and only the filled slots are read. Softmax attention (Vaswani et al. 2017) in two
// passes over the row: scores and their max, then exp and the weighted sum of values.
template <int D>
void decode_impl(const float* Q, Layout lq, const float* Kc, Layout lkc, const float* Vc, Layout lvc, const float* Kn,
                 Layout lkn, const float* Vn, Layout lvn, const int64_t* pos, float* O, int64_t B, int64_t H, int64_t Hkv,
                 int64_t L, int64_t J, float scale) {
  constexpr int ND = D / 8;
  const int64_t G = H / Hkv;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s((L + J + 7) / 8 * 8);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hkv, hk = bh % Hkv, n = pos[b];
      const float* kb = Kc + b * lkc.sb + hk * lkc.sh;  // (L, D) rows at stride lkc.st
      const float* vb = Vc + b * lvc.sb + hk * lvc.sh;
      const float* kn = Kn + b * lkn.sb + hk * lkn.sh;
      const float* vn = Vn + b * lvn.sb + hk * lvn.sh;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hk * G + g;
        const float* qh = Q + b * lq.sb + h * lq.sh;
        __m256 qv[ND];
        for (int j = 0; j < ND; ++j) qv[j] = _mm256_mul_ps(_mm256_loadu_ps(qh + 8 * j), _mm256_set1_ps(scale));
        float m = -INFINITY;
        for (int64_t u = 0; u < n + J; ++u) {  // slots n.. are the new tokens
          const float* kr = u < n ? kb + u * lkc.st : kn + (u - n) * lkn.st;
          __m256 acc = _mm256_mul_ps(qv[0], _mm256_loadu_ps(kr));
          for (int j = 1; j < ND; ++j) acc = _mm256_fmadd_ps(qv[j], _mm256_loadu_ps(kr + 8 * j), acc);
          s[u] = hsum(acc);
          m = std::max(m, s[u]);
        }
        const int64_t np = (n + J + 7) / 8 * 8;
        for (int64_t u = n + J; u < np; ++u) s[u] = -INFINITY;
        __m256 tot = _mm256_setzero_ps(), mv = _mm256_set1_ps(m);
        for (int64_t u = 0; u < np; u += 8) {
          __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s.data() + u), mv));
          _mm256_storeu_ps(s.data() + u, e);
          tot = _mm256_add_ps(tot, e);
        }
        float* out = O + (b * H + h) * D;
        weighted_rows<D>(s.data(), vb, lvc.st, n, out, 1.f);  // sum over the cached slots
        const float inv = 1.f / hsum(tot);
        for (int j = 0; j < ND; ++j) {
          __m256 o = _mm256_loadu_ps(out + 8 * j);
          for (int64_t u = 0; u < J; ++u)
            o = _mm256_fmadd_ps(_mm256_set1_ps(s[n + u]), _mm256_loadu_ps(vn + u * lvn.st + 8 * j), o);
          _mm256_storeu_ps(out + 8 * j, _mm256_mul_ps(o, _mm256_set1_ps(inv)));
        }
      }
    }
  });
}

#define DISPATCH_D(D_, ...)                                              \
  switch (D_) {                                                          \
    case 16: { constexpr int D = 16; __VA_ARGS__; break; }               \
    case 32: { constexpr int D = 32; __VA_ARGS__; break; }               \
    case 64: { constexpr int D = 64; __VA_ARGS__; break; }               \
    default: TORCH_CHECK(false, "barkgpt: head size ", D_, " is not 16, 32 or 64"); \
  }

Layout layout_of(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.stride(3) == 1,
              "barkgpt::causal_attention: float32 (B, T, heads, D) tensors with a contiguous last dim");
  return {x.stride(0), x.stride(1), x.stride(2)};
}

// The kernels index k and v with q's B, T and D: refuse mismatched shapes instead of reading out of bounds.
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(k.sizes() == v.sizes(), "barkgpt::causal_attention: k and v must have the same shape, got ",
              k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "barkgpt::causal_attention: k/v ", k.sizes(), " must match q ", q.sizes(), " in B, T and D");
  TORCH_CHECK(k.size(2) >= 1 && q.size(2) % k.size(2) == 0,
              "barkgpt::causal_attention: q's ", q.size(2), " heads must be a multiple of k/v's ", k.size(2));
}

// q (B, T, H, D), k/v (B, T, Hkv, D), any strides with a contiguous last dim.
// Returns out (B, T, H, D) contiguous and p (B, H, T, T): the attention weights, 0 above the diagonal.
std::tuple<at::Tensor, at::Tensor> causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  const Layout lq = layout_of(q), lk = layout_of(k), lv = layout_of(v);
  check_qkv(q, k, v);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Hkv = k.size(2);
  auto out = at::empty({B, T, H, q.size(3)}, q.options());
  auto p = at::empty({B, H, T, T}, q.options());
  DISPATCH_D(q.size(3), forward_impl<D>(q.data_ptr<float>(), lq, k.data_ptr<float>(), lk, v.data_ptr<float>(), lv,
                                        out.data_ptr<float>(), p.data_ptr<float>(), B, H, Hkv, T, static_cast<float>(scale)));
  return {out, p};
}

// Gradients (dq, dk, dv) of causal_attention, contiguous (B, T, heads, D), from dout (B, T, H, D).
std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& p, double scale) {
  const Layout lg = layout_of(dout), lq = layout_of(q), lk = layout_of(k), lv = layout_of(v);
  TORCH_CHECK(out.is_contiguous() && p.is_contiguous(), "barkgpt::causal_attention_backward: out and p must be contiguous");
  check_qkv(q, k, v);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Hkv = k.size(2), D_ = q.size(3);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "barkgpt::causal_attention_backward: dout and out must have q's shape ", q.sizes());
  TORCH_CHECK(p.dim() == 4 && p.size(0) == B && p.size(1) == H && p.size(2) == T && p.size(3) == T,
              "barkgpt::causal_attention_backward: p must be (B, H, T, T), got ", p.sizes());
  auto dq = at::empty({B, T, H, D_}, q.options()), dk = at::empty({B, T, Hkv, D_}, q.options()), dv = at::empty({B, T, Hkv, D_}, q.options());
  DISPATCH_D(D_, backward_impl<D>(dout.data_ptr<float>(), lg, q.data_ptr<float>(), lq, k.data_ptr<float>(), lk, v.data_ptr<float>(), lv,
                                  out.data_ptr<float>(), p.data_ptr<float>(), dq.data_ptr<float>(), dk.data_ptr<float>(),
                                  dv.data_ptr<float>(), B, H, Hkv, T, static_cast<float>(scale)));
  return {dq, dk, dv};
}

// q (B, 1, H, D); k_cache/v_cache (B, Hkv, L, D); k_new/v_new (B, J, Hkv, D), any strides with a
// contiguous last dim; pos (B,) int64 contiguous, each in [0, L]: row b's filled slots.
// Returns (B, 1, H, D) contiguous: the attention output of each row's one new query.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k_new,
                            const at::Tensor& v_new, const at::Tensor& pos, double scale) {
  const Layout lq = layout_of(q), lkn = layout_of(k_new), lvn = layout_of(v_new);
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == at::kFloat &&
                  v_cache.scalar_type() == at::kFloat && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "barkgpt::decode_attention: k_cache and v_cache must be float32 (B, Hkv, L, D) with a contiguous last dim");
  const int64_t B = q.size(0), H = q.size(2), D_ = q.size(3), Hkv = k_cache.size(1), L = k_cache.size(2);
  TORCH_CHECK(q.size(1) == 1, "barkgpt::decode_attention: one query token per row, got ", q.size(1));
  TORCH_CHECK(k_cache.size(0) == B && k_cache.size(3) == D_ && Hkv >= 1 && H % Hkv == 0,
              "barkgpt::decode_attention: cache ", k_cache.sizes(), " does not match q ", q.sizes());
  TORCH_CHECK(k_new.sizes() == v_new.sizes() && k_new.size(0) == B && k_new.size(1) >= 1 && k_new.size(2) == Hkv &&
                  k_new.size(3) == D_,
              "barkgpt::decode_attention: k_new/v_new must be (B, J, Hkv, D) with J >= 1, got ", k_new.sizes());
  TORCH_CHECK(pos.dim() == 1 && pos.size(0) == B && pos.scalar_type() == at::kLong && pos.is_contiguous(),
              "barkgpt::decode_attention: pos must be a contiguous (B,) int64 tensor");
  const int64_t* p = pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(p[b] >= 0 && p[b] <= L, "barkgpt::decode_attention: pos ", p[b], " outside the cache's ", L, " slots");
  auto out = at::empty({B, 1, H, D_}, q.options());
  const Layout lkc{k_cache.stride(0), k_cache.stride(2), k_cache.stride(1)}, lvc{v_cache.stride(0), v_cache.stride(2), v_cache.stride(1)};
  DISPATCH_D(D_, decode_impl<D>(q.data_ptr<float>(), lq, k_cache.data_ptr<float>(), lkc, v_cache.data_ptr<float>(), lvc,
                                k_new.data_ptr<float>(), lkn, v_new.data_ptr<float>(), lvn, p, out.data_ptr<float>(), B, H, Hkv,
                                L, k_new.size(1), static_cast<float>(scale)));
  return out;
}

}  // namespace

TORCH_LIBRARY(barkgpt, m) {
  m.def("causal_attention(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  m.def("causal_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor p, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor k_new, Tensor v_new, Tensor pos, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(barkgpt, CPU, m) {
  m.impl("causal_attention", &causal_attention);
  m.impl("causal_attention_backward", &causal_attention_backward);
  m.impl("decode_attention", &decode_attention);
}
