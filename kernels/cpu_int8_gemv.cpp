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
// sum is computed as sum_k v[k] * w_q[n, k] from the first K columns of each weight row:
// the int8 dot product with clamp(v, -127, 127), plus, when some code exceeds +-127, dot
// products with the base-127 digits of v - clamp(v) (see Rows). The copies are never
// read: int8-mixed reads w8a8's bytes. The integer
// sum and the epilogue's float operations are the references': the result is theirs bit
// for bit. It replaces, per linear, the row quantization, the int8 GEMM and the epilogue:
// one pass over the int8 weight rows. A row holding a NaN or an infinity gives NaN outputs.
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
constexpr int64_t MAX_ROWS = 4;  // rows dotted per pass over a weight row (more: again, from L1)
constexpr int64_t PREFETCH = 4096;  // bytes ahead in the weight stream

// The int8 rows the weight rows are dotted with: the M rows' codes clamped to +-127, then,
// where some outlier column's code v exceeds that, `digits` more blocks of M rows holding
// v - clamp(v) in base 127 (block p: digit p - 1, of weight 127^(p - 1); |digit| <= 126). They are
// dense over K and zero outside the outlier columns: dotting them with the weight row
// already in L1 costs no memory traffic, and the sum stays exact.
struct Rows {
  int64_t m = 0, digits = 0;   // rows: (1 + digits) * m
  std::vector<int8_t> q;       // [rows, K]
  std::vector<uint8_t> qabs;   // [rows, K] |q|
  std::vector<float> scale;    // [M]
  std::vector<uint8_t> bad;    // [M]
  int64_t rows() const { return (1 + digits) * m; }
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
  r.m = m;
  r.q.resize(m * k);
  r.scale.resize(m);
  r.bad.assign(m, 0);
  std::vector<int32_t> rest(m * n_outl, 0);  // [M, n_outl]: v - clamp(v, -127, 127)
  int32_t rest_max = 0;
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
      r.q[i * k + j] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, v)));
    }
    for (int64_t o = 0; o < n_outl && finite; ++o) {
      const int64_t j = c.cols[o];
      const float lim = 127.f * c.copies[j];
      const float v = std::min(lim, std::max(-lim, std::nearbyint(xr[j] * inv)));
      const int32_t d = static_cast<int32_t>(v) - r.q[i * k + j];
      rest[i * n_outl + o] = d;
      rest_max = std::max(rest_max, std::abs(d));
    }
    r.scale[i] = amax / 127.f;
  }
  for (int32_t left = rest_max; left > 0; left /= 127) ++r.digits;
  r.q.resize(r.rows() * k, 0);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t o = 0; o < n_outl; ++o)
      for (int32_t d = rest[i * n_outl + o], p = 1; d != 0; d /= 127, ++p)
        r.q[(p * m + i) * k + c.cols[o]] = static_cast<int8_t>(d % 127);
  r.qabs.resize(r.q.size());
  for (size_t t = 0; t < r.q.size(); ++t) r.qabs[t] = static_cast<uint8_t>(std::abs(int(r.q[t])));
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

// where the prefetch runs: PREFETCH bytes ahead in the stream of the rows' first K columns
// (rows are `stride` apart; their copies, beyond K, are never read nor prefetched)
struct Prefetch {
  const int8_t* row;
  int64_t col;
  Prefetch(const int8_t* w, int64_t k, int64_t stride)  // k >= 1
      : row(w + (PREFETCH / k) * stride), col(PREFETCH % k) {}
  const char* next(int64_t k, int64_t stride) {
    const char* at = reinterpret_cast<const char*>(row + col);
    col += 32;
    if (col >= k) col -= k, row += stride;
    return at;
  }
};

// out[i] = sum_k q[m0 + i, k] * w[k] for MT rows of q, exact in int32. The weight row is
// prefetched PREFETCH bytes ahead (one stream per core does not keep the memory busy:
// 8 -> 9.5 GB/s per core on a 2-core Xeon; 4 weight rows per pass measured no faster)
template <int MT>
void dot_rows(const Rows& r, const int8_t* w, int64_t m0, int64_t k, int64_t stride, int32_t* out) {
  int64_t j = 0;
#ifdef LOWBIT_GEMV_AVX2
  __m256i acc[MT];
  for (int i = 0; i < MT; ++i) acc[i] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  Prefetch ahead(w, std::max<int64_t>(k, 1), stride);
  for (; j + 32 <= k; j += 32) {
    _mm_prefetch(ahead.next(k, stride), _MM_HINT_T0);
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

struct Weights {
  const int8_t* w_q;           // [N, K + E]
  const float* w_scale;        // [N]
  const float* bias;           // [N] or null
  int64_t n, k, stride;         // stride: K + E
};

// dots[v0 .. v0 + mt] for row n of the weight
void dot_rows(const Weights& a, const Rows& r, int64_t v0, int64_t mt, const int8_t* w, int32_t* dots) {
  switch (mt) {
    case 1: dot_rows<1>(r, w, v0, a.k, a.stride, dots + v0); break;
    case 2: dot_rows<2>(r, w, v0, a.k, a.stride, dots + v0); break;
    case 3: dot_rows<3>(r, w, v0, a.k, a.stride, dots + v0); break;
    default: dot_rows<4>(r, w, v0, a.k, a.stride, dots + v0); break;
  }
}

// y[:, n]: every row's dot with weight row n, its rest digits added, then the epilogue
void rows_times_weight(const Weights& a, const Rows& r, int64_t n, int32_t* dots, float* y) {
  const int8_t* w = a.w_q + n * a.stride;
  for (int64_t v0 = 0; v0 < r.rows(); v0 += MAX_ROWS) dot_rows(a, r, v0, std::min(MAX_ROWS, r.rows() - v0), w, dots);
  for (int64_t i = 0; i < r.m; ++i) {
    // the reference's int32 sum: exact, wrapping as _int_mm would should it ever overflow
    uint32_t acc = static_cast<uint32_t>(dots[i]);
    for (int64_t p = 1, weight = 1; p <= r.digits; ++p, weight *= 127)
      acc += static_cast<uint32_t>(weight) * static_cast<uint32_t>(dots[p * r.m + i]);
    float v = static_cast<float>(static_cast<int32_t>(acc)) * r.scale[i] * a.w_scale[n];
    if (a.bias) v = v + a.bias[n];
    if (r.bad[i]) v = std::numeric_limits<float>::quiet_NaN();
    y[i * a.n + n] = v;
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
    std::vector<int32_t> dots(r.rows());
    for (int64_t n = n0; n < n1; ++n) rows_times_weight(a, r, n, dots.data(), out);
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
