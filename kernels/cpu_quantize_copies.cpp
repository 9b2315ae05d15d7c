// int8-mixed's activation quantization for many rows (prefill), in one call, on the CPU.
//
// lowbit::quantize_rows_copies_cpu(x, copies, src, piece) -> (q, scale):
//   reference.quantize_rows_copies: per row, absmax = max_k |x[k]| / copies[k] (clamped below
//   by LOWBIT_EPS), inv = 127 / absmax, v[k] = round_half_even(x[k] * inv);
//   q[:, :K] = clamp(v, -127, 127); column K + t holds piece[K + t] of column j = src[K + t]:
//   sign(v[j]) * clamp(|v[j]| - 127 piece, 0, 127) with v[j] clamped to +-127 copies[j];
//   scale = absmax / 127.
// The same float operations in the same order as the reference, so the same codes and scales
// bit for bit. One op for every site, whatever its K + E: inductor would compile one
// quantization kernel per site (each site's copies give it its own width). A row holding a
// NaN or an infinity gets zero codes and a NaN scale (its outputs become NaN).
//
// The row's absmax and first K codes: cpu_row_quantize.h; the pieces: AVX2 where the
// compiler targets it (the header's LOWBIT_ROWS_AVX2), else scalar loops with the same
// operations. Built and loaded by
// qcompile.kernels.cpu_quantize_copies with inductor's C++ builder.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_row_quantize.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace {

// the E extra columns: their source column, their clamp limit and the codes below their piece
struct Extra {
  std::vector<int64_t> col;
  std::vector<float> lim, below;  // 127 copies[col], 127 piece
};

// q[t] = sign(v) * clamp(|v| - below[t], 0, 127) with v = clamp(round_half_even(xe[t] * inv),
// -lim[t], lim[t]): the pieces of the extra columns, whose x values xe gathered
void extra_codes(const float* xe, float inv, const Extra& e, int64_t n, int8_t* q) {
  int64_t t = 0;
#ifdef LOWBIT_ROWS_AVX2
  const __m256 vinv = _mm256_set1_ps(inv), top = _mm256_set1_ps(127.f), zero = _mm256_setzero_ps();
  const __m256 sign_mask = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int32_t>(0x80000000u)));
  for (; t + 8 <= n; t += 8) {
    const __m256 lim = _mm256_loadu_ps(e.lim.data() + t);
    __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xe + t), vinv),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_min_ps(lim, _mm256_max_ps(_mm256_sub_ps(zero, lim), v));
    const __m256 mag = _mm256_andnot_ps(sign_mask, v);
    __m256 rest = _mm256_min_ps(top, _mm256_max_ps(zero, _mm256_sub_ps(mag, _mm256_loadu_ps(e.below.data() + t))));
    rest = _mm256_or_ps(rest, _mm256_and_ps(v, sign_mask));  // v's sign (rest >= 0)
    const __m256i i32 = _mm256_cvtps_epi32(rest);
    const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + t), _mm_packs_epi16(i16, i16));
  }
#endif
  for (; t < n; ++t) {
    const float v = std::min(e.lim[t], std::max(-e.lim[t], std::nearbyint(xe[t] * inv)));
    const float rest = std::min(127.f, std::max(0.f, std::fabs(v) - e.below[t]));
    q[t] = static_cast<int8_t>(v > 0.f ? rest : (v < 0.f ? -rest : 0.f));
  }
}

// one row; `xe` is scratch for the extra columns' x values
void quantize_row(const float* x, const float* copies, const Extra& e, int64_t k, float* xe, int8_t* q,
                  float* scale) {
  const int64_t n_extra = static_cast<int64_t>(e.col.size());
  bool finite = true;
  const float amax = std::max(lowbit_rows::absmax(x, copies, k, finite), LOWBIT_EPS);
  if (!finite) {
    std::fill(q, q + k + n_extra, int8_t(0));
    *scale = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  const float inv = lowbit_rows::inv_step(amax);
  lowbit_rows::codes(x, inv, k, q);
  for (int64_t t = 0; t < n_extra; ++t) xe[t] = x[e.col[t]];
  extra_codes(xe, inv, e, n_extra, q + k);
  *scale = amax / 127.f;
}

std::tuple<at::Tensor, at::Tensor> quantize_rows_copies_cpu(const at::Tensor& x, const at::Tensor& copies,
                                                            const at::Tensor& src, const at::Tensor& piece) {
  const int64_t k = x.dim() ? x.size(-1) : 0;
  TORCH_CHECK(k >= 1, "quantize_rows_copies_cpu: x must have a last dimension of at least 1");
  TORCH_CHECK(copies.dtype() == at::kFloat && copies.is_contiguous() && copies.numel() == k,
              "quantize_rows_copies_cpu: copies must be contiguous float32 with K = ", k, " elements");
  TORCH_CHECK(src.dtype() == at::kLong && src.dim() == 1 && piece.dtype() == at::kFloat &&
                  piece.dim() == 1 && src.numel() == piece.numel() && src.numel() >= k,
              "quantize_rows_copies_cpu: src (int64) and piece (float32) must be 1-d with the same "
              "K + E elements (reference.outlier_expansion(copies))");
  const int64_t width = src.numel();
  const float* c = copies.data_ptr<float>();
  const at::Tensor src_c = src.contiguous(), piece_c = piece.contiguous();
  Extra e;
  for (int64_t t = k; t < width; ++t) {
    const int64_t j = src_c.data_ptr<int64_t>()[t];
    TORCH_CHECK(j >= 0 && j < k, "quantize_rows_copies_cpu: src holds column ", j, " outside [0, ", k, ")");
    e.col.push_back(j);
    e.lim.push_back(127.f * c[j]);
    e.below.push_back(127.f * piece_c.data_ptr<float>()[t]);
  }
  const at::Tensor x2 = x.reshape({-1, k}).to(at::kFloat).contiguous();
  const int64_t m = x2.size(0);
  at::Tensor q = at::empty({m, width}, x2.options().dtype(at::kChar));
  at::Tensor scale = at::empty({m, 1}, x2.options());
  const float* xp = x2.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, width));
  at::parallel_for(0, m, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> xe(e.col.size());
    for (int64_t r = r0; r < r1; ++r) quantize_row(xp + r * k, c, e, k, xe.data(), qp + r * width, sp + r);
  });
  auto q_sizes = x.sizes().vec(), s_sizes = x.sizes().vec();
  q_sizes.back() = width;
  s_sizes.back() = 1;
  return {q.reshape(q_sizes), scale.reshape(s_sizes)};
}
}  // namespace

extern "C" int lowbit_quantize_copies_built_with_avx2() {
#ifdef LOWBIT_ROWS_AVX2
  return 1;
#else
  return 0;
#endif
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) { m.impl("quantize_rows_copies_cpu", &quantize_rows_copies_cpu); }
