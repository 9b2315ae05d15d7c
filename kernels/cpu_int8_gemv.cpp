// The int8 linear of the int8 recipes for few rows (decode), in one call, on the CPU.
//
// lowbit::int8_gemv_cpu(x, inlier_mask?, w_q, w_scale, bias?, outlier_idx?, w_outlier?):
//   q, s = the row's int8 codes and scale (reference.quantize_rows: absmax over the inlier
//          columns, clamped below by LOWBIT_EPS; codes round-half-even(x * (127 / absmax)),
//          clamped to +-127; outlier columns quantize to 0)
//   y[m, n] = float(sum_k q[m, k] * w_q[n, k]) * s[m] * w_scale[n] + bias[n]
//             + sum_j x[m, outlier_idx[j]] * w_outlier[n, j]
// The integer sum and the epilogue's float operations are reference.int8_linear's, in its
// order; only the full-precision outlier partial (LLM.int8()'s) is summed in another order
// than a BLAS GEMM. It replaces, per linear, the row quantization, the gather of the outlier
// columns, their float GEMM, the int8 GEMM and the epilogue: one pass over the int8 weight
// rows. A row holding a NaN or an infinity gives NaN outputs.
//
// AVX2 where the compiler targets it (|q| times sign(w, q) as unsigned x signed bytes:
// |q|, |w| <= 127 keep the pair sums within int16), else scalar loops with the same sums.
// Built and loaded by qcompile.kernels.cpu_int8_gemv with inductor's C++ builder.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LOWBIT_GEMV_AVX2 1
#endif

namespace {
constexpr int64_t MAX_ROWS = 4;  // rows of x per pass over a weight row
constexpr int64_t PREFETCH = 4096;  // bytes ahead in the weight stream

struct Rows {
  std::vector<int8_t> q;       // [M, K] codes
  std::vector<uint8_t> qabs;   // [M, K] |codes|
  std::vector<float> scale;    // [M]
  std::vector<float> xo;       // [M, n_out] the outlier columns
  std::vector<uint8_t> bad;    // [M]
};

Rows quantize(const float* x, int64_t m, int64_t k, const bool* mask, const int64_t* idx, int64_t n_out) {
  Rows r;
  r.q.resize(m * k);
  r.qabs.resize(m * k);
  r.scale.resize(m);
  r.xo.resize(m * n_out);
  r.bad.assign(m, 0);
  for (int64_t i = 0; i < m; ++i) {
    const float* xr = x + i * k;
    float amax = 0.f;
    bool finite = true;
    for (int64_t j = 0; j < k; ++j) {
      finite = finite && std::isfinite(xr[j]);
      if (!mask || mask[j]) amax = std::max(amax, std::fabs(xr[j]));
    }
    r.bad[i] = !finite;
    amax = std::max(amax, LOWBIT_EPS);
    const float inv = 127.f / amax;
    for (int64_t j = 0; j < k; ++j) {
      float v = (!mask || mask[j]) && finite ? std::nearbyint(xr[j] * inv) : 0.f;
      v = std::min(127.f, std::max(-127.f, v));
      r.q[i * k + j] = static_cast<int8_t>(v);
      r.qabs[i * k + j] = static_cast<uint8_t>(std::fabs(v));
    }
    r.scale[i] = amax / 127.f;
    for (int64_t j = 0; j < n_out; ++j) r.xo[i * n_out + j] = xr[idx[j]];
  }
  return r;
}

#ifdef LOWBIT_GEMV_AVX2
inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

#endif

// out[i] = sum_k q[m0 + i, k] * w[k] for MT rows of q, exact in int32. The weight row is
// prefetched PREFETCH bytes ahead (one stream per core does not keep the memory busy:
// 8 -> 9.5 GB/s per core on a 2-core Xeon; 4 weight rows per pass measured no faster)
template <int MT>
void dot_rows(const Rows& r, const int8_t* w, int64_t m0, int64_t k, int32_t* out) {
  int64_t j = 0;
#ifdef LOWBIT_GEMV_AVX2
  __m256i acc[MT];
  for (int i = 0; i < MT; ++i) acc[i] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  for (; j + 32 <= k; j += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(w + j + PREFETCH), _MM_HINT_T0);
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j));
    for (int i = 0; i < MT; ++i) {
      const int64_t off = (m0 + i) * k + j;
      const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.q.data() + off));
      const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.qabs.data() + off));
      const __m256i p = _mm256_maddubs_epi16(av, _mm256_sign_epi8(wv, qv));
      acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(p, ones));
    }
  }
  for (int i = 0; i < MT; ++i) out[i] = hsum_i32(acc[i]);
#else
  for (int i = 0; i < MT; ++i) out[i] = 0;
#endif
  for (; j < k; ++j)
    for (int i = 0; i < MT; ++i) out[i] += int32_t(r.q[(m0 + i) * k + j]) * int32_t(w[j]);
}

float dot_f32(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}

#ifdef LOWBIT_GEMV_AVX2
// the dot products of x (n floats) with 8 consecutive rows of w ([8, n], row stride n), as
// one vector: 8 accumulators reduced together (no horizontal sum per row)
inline __m256 dot_8_rows(const float* x, const float* w, int64_t n) {
  __m256 acc[8];
  for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 xv = _mm256_loadu_ps(x + j);
    for (int r = 0; r < 8; ++r) acc[r] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + r * n + j), acc[r]);
  }
  if (j < n) {  // the last n % 8 columns: masked loads read nothing past them
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n - j)), lane);
    const __m256 xv = _mm256_maskload_ps(x + j, live);
    for (int r = 0; r < 8; ++r) acc[r] = _mm256_fmadd_ps(xv, _mm256_maskload_ps(w + r * n + j, live), acc[r]);
  }
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}
#endif

struct Weights {
  const int8_t* w_q;      // [N, K]
  const float* w_scale;   // [N]
  const float* bias;      // [N] or null
  const float* w_out;     // [N, n_out] or null
  int64_t n, k, n_out;
};

// y[m0 .. m0 + MT, n] without the outlier partial
template <int MT>
void rows_times_weight(const Weights& a, const Rows& r, int64_t m0, int64_t n, float* y) {
  int32_t acc[MT];
  dot_rows<MT>(r, a.w_q + n * a.k, m0, a.k, acc);
  for (int i = 0; i < MT; ++i) {
    const int64_t row = m0 + i;
    float v = static_cast<float>(acc[i]) * r.scale[row] * a.w_scale[n];
    if (a.bias) v = v + a.bias[n];
    if (r.bad[row]) v = std::numeric_limits<float>::quiet_NaN();
    y[row * a.n + n] = v;
  }
}

void rows_times_weight(const Weights& a, const Rows& r, int64_t m0, int64_t mt, int64_t n, float* y) {
  switch (mt) {
    case 1: rows_times_weight<1>(a, r, m0, n, y); break;
    case 2: rows_times_weight<2>(a, r, m0, n, y); break;
    case 3: rows_times_weight<3>(a, r, m0, n, y); break;
    default: rows_times_weight<4>(a, r, m0, n, y); break;
  }
}

// y[m, n] += sum_j xo[m, j] * w_out[n, j] for n in [n0, n1): the outlier partial, added last
void add_outlier_partials(const Weights& a, const Rows& r, int64_t m, int64_t n0, int64_t n1, float* y) {
  for (int64_t i = 0; i < m; ++i) {
    const float* xo = r.xo.data() + i * a.n_out;
    float* yr = y + i * a.n;
    int64_t n = n0;
#ifdef LOWBIT_GEMV_AVX2
    for (; n + 8 <= n1; n += 8)
      _mm256_storeu_ps(yr + n, _mm256_add_ps(_mm256_loadu_ps(yr + n), dot_8_rows(xo, a.w_out + n * a.n_out, a.n_out)));
#endif
    for (; n < n1; ++n) yr[n] = yr[n] + dot_f32(xo, a.w_out + n * a.n_out, a.n_out);
  }
}

const float* float_data(const std::optional<at::Tensor>& t, int64_t numel, const char* what) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->dtype() == at::kFloat && t->is_contiguous() && t->numel() == numel,
              "int8_gemv_cpu: ", what, " must be contiguous float32 with ", numel, " elements");
  return t->data_ptr<float>();
}

at::Tensor int8_gemv_cpu(const at::Tensor& x, const std::optional<at::Tensor>& inlier_mask, const at::Tensor& w_q,
                         const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& outlier_idx, const std::optional<at::Tensor>& w_outlier) {
  const int64_t k = x.size(-1);
  TORCH_CHECK(w_q.dtype() == at::kChar && w_q.dim() == 2 && w_q.is_contiguous() && w_q.size(1) == k,
              "int8_gemv_cpu: w_q must be contiguous int8 [N, K] with K = x.size(-1)");
  Weights a{};
  a.w_q = w_q.data_ptr<int8_t>();
  a.n = w_q.size(0);
  a.k = k;
  a.w_scale = float_data(w_scale, a.n, "w_scale");
  a.bias = float_data(bias, a.n, "bias");
  const bool* mask = nullptr;
  if (inlier_mask.has_value()) {
    TORCH_CHECK(inlier_mask->dtype() == at::kBool && inlier_mask->is_contiguous() && inlier_mask->numel() == k,
                "int8_gemv_cpu: inlier_mask must be a contiguous bool [K]");
    mask = inlier_mask->data_ptr<bool>();
  }
  const int64_t* idx = nullptr;
  TORCH_CHECK(outlier_idx.has_value() == w_outlier.has_value(),
              "int8_gemv_cpu: outlier_idx and w_outlier come together");
  if (outlier_idx.has_value()) {
    TORCH_CHECK(outlier_idx->dtype() == at::kLong && outlier_idx->dim() == 1 && outlier_idx->is_contiguous(),
                "int8_gemv_cpu: outlier_idx must be a contiguous int64 [n_out]");
    a.n_out = outlier_idx->numel();
    idx = outlier_idx->data_ptr<int64_t>();
    for (int64_t j = 0; j < a.n_out; ++j)
      TORCH_CHECK(idx[j] >= 0 && idx[j] < k, "int8_gemv_cpu: outlier index out of range");
    a.w_out = float_data(w_outlier, a.n * a.n_out, "w_outlier");
  }
  const at::Tensor x2 = x.reshape({-1, k}).to(at::kFloat).contiguous();
  const int64_t m = x2.size(0);
  at::Tensor y = at::empty({m, a.n}, x2.options());
  auto sizes = x.sizes().vec();
  sizes.back() = a.n;
  if (m == 0 || a.n == 0) return y.reshape(sizes);
  const Rows r = quantize(x2.data_ptr<float>(), m, k, mask, idx, a.n_out);
  float* out = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, k));  // ~64 KB of weights
  at::parallel_for(0, a.n, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < m; m0 += MAX_ROWS)
      for (int64_t n = n0; n < n1; ++n) rows_times_weight(a, r, m0, std::min(MAX_ROWS, m - m0), n, out);
    if (a.n_out) add_outlier_partials(a, r, m, n0, n1, out);
  });
  return y.reshape(sizes);
}
}  // namespace

extern "C" int lowbit_int8_gemv_built_with_avx2() {
#ifdef LOWBIT_GEMV_AVX2
  return 1;
#else
  return 0;
#endif
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) { m.impl("int8_gemv_cpu", &int8_gemv_cpu); }
