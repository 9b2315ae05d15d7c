// Per-row int8 quantization shared by lowbit's C++ kernels (prepended to their sources by
// cpp_build.load): the row's absmax, plain or over |x[k]| / copies[k], and its codes
// clamp(round_half_even(x * inv), -127, 127). The float operations are reference.py's, in
// its order, so the results are its bit for bit. AVX2 where the compiler targets it
// (vroundps rounds to nearest even, as std::nearbyint), else scalar loops.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__AVX2__)
#include <immintrin.h>
#define LOWBIT_ROWS_AVX2 1
#endif

namespace lowbit_rows {

// the reference's 127 / absmax: torch evaluates `127 / t` as reciprocal(t) * 127, which
// differs from a division in the last bit for some t
inline float inv_step(float amax) { return (1.f / amax) * 127.f; }

// max_k |x[k]| (/ copies[k] where copies is not null); `finite` false when some x[k] is a
// NaN or an infinity
inline float absmax(const float* x, const float* copies, int64_t k, bool& finite) {
  int64_t j = 0;
  float amax = 0.f;
  bool bad = false;
#ifdef LOWBIT_ROWS_AVX2
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  __m256 vmax = _mm256_setzero_ps(), vbad = _mm256_setzero_ps();
  for (; j + 8 <= k; j += 8) {
    const __m256 a = _mm256_and_ps(_mm256_loadu_ps(x + j), abs_mask);
    vbad = _mm256_or_ps(vbad, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));  // NaN or inf
    vmax = _mm256_max_ps(vmax, copies ? _mm256_div_ps(a, _mm256_loadu_ps(copies + j)) : a);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  for (float v : lanes) amax = std::max(amax, v);
  bad = _mm256_movemask_ps(vbad) != 0;
#endif
  for (; j < k; ++j) {
    bad = bad || !std::isfinite(x[j]);
    amax = std::max(amax, copies ? std::fabs(x[j]) / copies[j] : std::fabs(x[j]));
  }
  finite = !bad;
  return amax;
}

// q[k] = clamp(round_half_even(x[k] * inv), -127, 127)
inline void codes(const float* x, float inv, int64_t k, int8_t* q) {
  int64_t j = 0;
#ifdef LOWBIT_ROWS_AVX2
  const __m256 vinv = _mm256_set1_ps(inv), hi = _mm256_set1_ps(127.f), lo = _mm256_set1_ps(-127.f);
  for (; j + 8 <= k; j += 8) {
    __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + j), vinv),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_min_ps(hi, _mm256_max_ps(lo, v));
    const __m256i i32 = _mm256_cvtps_epi32(v);
    const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + j), _mm_packs_epi16(i16, i16));
  }
#endif
  for (; j < k; ++j) q[j] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(x[j] * inv))));
}

}  // namespace lowbit_rows
