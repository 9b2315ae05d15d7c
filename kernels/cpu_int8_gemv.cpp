// The int8 linear of the int8 recipes for few rows (decode), in one call, on the CPU.
//
// lowbit::int8_gemv_cpu(x, w_q, w_scale, bias?, copies?):
//   q, s = the row's int8 codes and scale: reference.quantize_rows (absmax clamped below by
//          LOWBIT_EPS; codes round-half-even(x * (127 / absmax)), clamped to +-127), or with
//          int8-mixed's outlier copies reference.quantize_rows_copies (absmax over
//          |x[k]| / copies[k]; column k's code v, |v| <= 127 copies[k], spread over its
//          copies; w_q [N, K + E] is reference.outlier_expansion(copies)'s layout: the K
//          columns, then the outlier columns' copies)
//   y[m, n] = float(sum_t q[m, t] * w_q[n, t]) * s[m] * w_scale[n] + bias[n]
// The copies of column k all multiply w_q[n, k] and their codes sum to v, so the integer
// sum is computed as sum_k v[k] * w_q[n, k]: the first K columns of each weight row, plus
// (v - clamp(v, -127, 127)) * w_q[n, K + o] for the o-th outlier column (columns K .. K + n
// repeat the outlier columns once each, in order). The other copies are never read
// (int8-mixed reads w8a8's bytes and one per outlier column), and the integer sum and the
// epilogue's float operations are the references': the result is theirs bit for bit. It replaces, per linear, the row
// quantization, the int8 GEMM and the epilogue: one pass over the int8 weight rows. A row
// holding a NaN or an infinity gives NaN outputs.
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
  std::vector<int8_t> q;       // [M, K] codes clamped to +-127 (each column's first copy)
  std::vector<uint8_t> qabs;   // [M, K] |codes|
  std::vector<int16_t> rest;   // [M, n_outl] v - clamp(v, -127, 127) of the outlier columns
  std::vector<float> scale;    // [M]
  std::vector<uint8_t> bad;    // [M]
};

// the outlier copies: copies per input column, and the columns that have more than one
struct Copies {
  const float* copies = nullptr;  // [K] or null (no copies: E = 0)
  std::vector<int64_t> cols;      // the columns with copies > 1, ascending
  int64_t width = 0;              // K + E
};

Rows quantize(const float* x, int64_t m, int64_t k, const Copies& c) {
  const int64_t n_outl = static_cast<int64_t>(c.cols.size());
  Rows r;
  r.q.resize(m * k);
  r.qabs.resize(m * k);
  r.rest.assign(m * n_outl, 0);
  r.scale.resize(m);
  r.bad.assign(m, 0);
  for (int64_t i = 0; i < m; ++i) {
    const float* xr = x + i * k;
    float amax = 0.f;
    bool finite = true;
    for (int64_t j = 0; j < k; ++j) {
      finite = finite && std::isfinite(xr[j]);
      amax = std::max(amax, c.copies ? std::fabs(xr[j]) / c.copies[j] : std::fabs(xr[j]));
    }
    r.bad[i] = !finite;
    amax = std::max(amax, LOWBIT_EPS);
    const float inv = 127.f / amax;
    for (int64_t j = 0; j < k; ++j) {
      float v = finite ? std::nearbyint(xr[j] * inv) : 0.f;
      v = std::min(127.f, std::max(-127.f, v));  // an outlier column's rest: below
      r.q[i * k + j] = static_cast<int8_t>(v);
      r.qabs[i * k + j] = static_cast<uint8_t>(std::fabs(v));
    }
    for (int64_t o = 0; o < n_outl && finite; ++o) {
      const int64_t j = c.cols[o];
      const float lim = 127.f * c.copies[j];
      const float v = std::min(lim, std::max(-lim, std::nearbyint(xr[j] * inv)));
      r.rest[i * n_outl + o] = static_cast<int16_t>(static_cast<int32_t>(v) - r.q[i * k + j]);
    }
    r.scale[i] = amax / 127.f;
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

// sum_o rest[o] * w[o] in int32 (|rest| <= 127 * 255 fits int16; pair sums of madd_epi16
// stay below 2^31)
inline int32_t dot_rest(const int16_t* rest, const int8_t* w, int64_t n) {
  int64_t o = 0;
  int32_t sum = 0;
#ifdef LOWBIT_GEMV_AVX2
  __m256i acc = _mm256_setzero_si256();
  for (; o + 16 <= n; o += 16) {
    const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + o)));
    const __m256i rv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rest + o));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(rv, wv));
  }
  sum = hsum_i32(acc);
#endif
  for (; o < n; ++o) sum += int32_t(rest[o]) * int32_t(w[o]);
  return sum;
}

struct Weights {
  const int8_t* w_q;           // [N, K + E]
  const float* w_scale;        // [N]
  const float* bias;           // [N] or null
  int64_t n, k, stride, n_outl;  // stride: K + E
};

// y[m0 .. m0 + MT, n]
template <int MT>
void rows_times_weight(const Weights& a, const Rows& r, int64_t m0, int64_t n, float* y) {
  int32_t acc[MT];
  const int8_t* w = a.w_q + n * a.stride;
  dot_rows<MT>(r, w, m0, a.k, acc);
  if (a.n_outl)
    for (int i = 0; i < MT; ++i) acc[i] += dot_rest(r.rest.data() + (m0 + i) * a.n_outl, w + a.k, a.n_outl);
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

const float* float_data(const std::optional<at::Tensor>& t, int64_t numel, const char* what) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->dtype() == at::kFloat && t->is_contiguous() && t->numel() == numel,
              "int8_gemv_cpu: ", what, " must be contiguous float32 with ", numel, " elements");
  return t->data_ptr<float>();
}

at::Tensor int8_gemv_cpu(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_scale,
                         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& copies) {
  const int64_t k = x.size(-1);
  Copies c;
  c.width = k;
  if (copies.has_value()) {
    c.copies = float_data(copies, k, "copies");
    for (int64_t j = 0; j < k; ++j) {
      const float m = c.copies[j];
      TORCH_CHECK(m >= 1.f && m <= 256.f && m == std::floor(m),
                  "int8_gemv_cpu: copies must be whole numbers in [1, 256]");
      if (m > 1.f) c.cols.push_back(j);
      c.width += static_cast<int64_t>(m) - 1;
    }
  }
  TORCH_CHECK(w_q.dtype() == at::kChar && w_q.dim() == 2 && w_q.is_contiguous() && w_q.size(1) == c.width,
              "int8_gemv_cpu: w_q must be contiguous int8 [N, K + E] (E: the copies beyond the first)");
  Weights a{};
  a.w_q = w_q.data_ptr<int8_t>();
  a.n = w_q.size(0);
  a.k = k;
  a.stride = c.width;
  a.n_outl = static_cast<int64_t>(c.cols.size());
  a.w_scale = float_data(w_scale, a.n, "w_scale");
  a.bias = float_data(bias, a.n, "bias");
  const at::Tensor x2 = x.reshape({-1, k}).to(at::kFloat).contiguous();
  const int64_t m = x2.size(0);
  at::Tensor y = at::empty({m, a.n}, x2.options());
  auto sizes = x.sizes().vec();
  sizes.back() = a.n;
  if (m == 0 || a.n == 0) return y.reshape(sizes);
  const Rows r = quantize(x2.data_ptr<float>(), m, k, c);
  float* out = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, k));  // ~64 KB of weights
  at::parallel_for(0, a.n, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < m; m0 += MAX_ROWS)
      for (int64_t n = n0; n < n1; ++n) rows_times_weight(a, r, m0, std::min(MAX_ROWS, m - m0), n, out);
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
