// The int8 linear of the int8 recipes for few rows (decode), in one call, on the CPU.
//
// lowbit::int8_gemv_cpu(x, w_q, w_scale, bias?, copies?) (and int8_gemv_cpu_group: the same
// for several weights of one input, each output bit for bit the single call's):
//   q, s = the row's int8 codes and scale: reference.quantize_rows (absmax clamped below by
//          LOWBIT_EPS; codes round-half-even(x * (127 / absmax)), clamped to +-127), or with
//          int8-mixed's outlier copies reference.quantize_rows_copies (absmax over
//          |x[k]| / copies[k]; column k's code v, |v| <= 127 copies[k], spread over its
//          copies; w_q [N, K + E] is reference.outlier_expansion(copies)'s layout: the K
//          columns, then the outlier columns' copies)
//   y[m, n] = float(sum_t q[m, t] * w_q[n, t]) * s[m] * w_scale[n] + bias[n]
// The copies of column k all multiply w_q[n, k] and their codes sum to v, so the integer
// sum is computed as sum_k v[k] * w_q[n, k] from the first K + n_outl columns of each
// weight row (n_outl: the outlier columns; K + o is outlier o's first copy): the int8 dot
// product with clamp(v, -127, 127) over K, plus the int16 dot product of the outliers'
// rests v - clamp(v) with their first copies (see Rows). The other copies are never read:
// int8-mixed reads w8a8's bytes plus one byte per outlier column and weight row. The integer
// sum and the epilogue's float operations are the references': the result is theirs bit
// for bit. It replaces, per linear, the row quantization, the int8 GEMM and the epilogue:
// one pass over the int8 weight rows. A row holding a NaN or an infinity gives NaN outputs.
//
// AVX-512 VNNI where the CPU has it (checked at run time: vpdpbusd multiplies q + 128 as
// unsigned bytes by w and accumulates in int32; 128 * sum(w), from vpdpbusd with ones, is
// subtracted), else AVX2 where the compiler targets it (|q| times sign(w, q) as unsigned x
// signed bytes: |q|, |w| <= 127 keep the pair sums within int16), else scalar loops. All
// three give the same exact int32 sums.
// Built and loaded by qcompile.kernels.cpu_int8_gemv with inductor's C++ builder.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_row_quantize.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LOWBIT_GEMV_AVX2 1
#if defined(__GNUC__) && defined(__x86_64__)
// compiled for AVX-512 VNNI whatever the flags; called only where the CPU has it
#define LOWBIT_GEMV_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))
#endif
#endif

namespace {
constexpr int64_t MAX_ROWS = 4;  // rows dotted per pass over a weight row (more: again, from L1)
constexpr int64_t PREFETCH = 4096;  // bytes ahead in the weight stream

// The outlier copies: copies per input column, and the columns that have more than one.
// Column K + o of a weight row is the first copy of column cols[o] (outlier_expansion).
struct Copies {
  const float* copies = nullptr;  // [K] or null (no copies: E = 0)
  std::vector<int64_t> cols;      // the columns with copies > 1, ascending
  int64_t width = 0;              // K + E
};

// int8 codes the weight rows are dotted with: `rows` rows of `width` columns, with |q| and
// q + 128 (the AVX2 and VNNI loops' operands). `tail_q` / `tail_abs` [rows, 32]: the last 32
// columns of each row with those before the last width % 32 zeroed, so the AVX2 loop ends
// with one 32-byte step that overlaps the one before it instead of a scalar loop
struct Codes {
  int64_t rows = 0, width = 0;
  std::vector<int8_t> q, tail_q;
  std::vector<uint8_t> qabs, qoff, tail_abs;
  void resize(int64_t r, int64_t w) { rows = r, width = w, q.assign(r * w, 0); }
  bool has_tail() const { return width > 32 && width % 32; }
  void finish() {
    qabs.resize(q.size());
    qoff.resize(q.size());
    for (size_t t = 0; t < q.size(); ++t) {
      qabs[t] = static_cast<uint8_t>(std::abs(int(q[t])));
      qoff[t] = static_cast<uint8_t>(int(q[t]) + 128);
    }
    if (!has_tail()) return;
    tail_q.assign(rows * 32, 0);
    tail_abs.assign(rows * 32, 0);
    const int64_t keep = width % 32;
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t t = 32 - keep; t < 32; ++t) {
        tail_q[i * 32 + t] = q[i * width + width - 32 + t];
        tail_abs[i * 32 + t] = qabs[i * width + width - 32 + t];
      }
  }
};

#ifdef LOWBIT_GEMV_AVX2
inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

#endif

// The M rows' codes v (|v| <= 127 copies <= 127 * 256) split in two: `low` [M, K] holds
// clamp(v, -127, 127); `rest` [M, P] the outlier columns' v - clamp(v) as int16 (|rest| <=
// 127 * 255), dotted with their first copies, columns K .. K + n_outl of the weight row.
// The rests sit at the end of their P = n_outl rounded up to 16 columns, zeros before, so
// the AVX2 loop reads the 16-byte steps ending at column K + n_outl (needs K + n_outl >= P;
// else the scalar loop). The sum is exact: sum_k v[k] w[k].
struct Rows {
  int64_t m = 0, k = 0, n_outl = 0, padded = 0;
  Codes low;
  std::vector<int16_t> rest;   // [M, padded]
  std::vector<float> scale;    // [M]
  std::vector<uint8_t> bad;    // [M]
};

Rows quantize(const float* x, int64_t m, int64_t k, const Copies& c) {
  Rows r;
  r.m = m;
  r.k = k;
  r.n_outl = static_cast<int64_t>(c.cols.size());
  r.padded = (r.n_outl + 15) / 16 * 16;
  r.low.resize(m, k);
  r.rest.assign(m * r.padded, 0);
  r.scale.resize(m);
  r.bad.assign(m, 0);
  for (int64_t i = 0; i < m; ++i) {
    const float* xr = x + i * k;
    int8_t* q = r.low.q.data() + i * k;
    int16_t* rest = r.rest.data() + i * r.padded + (r.padded - r.n_outl);
    bool finite = true;
    const float amax = std::max(lowbit_rows::absmax(xr, c.copies, k, finite), LOWBIT_EPS);
    r.bad[i] = !finite;
    const float inv = lowbit_rows::inv_step(amax);
    if (finite) lowbit_rows::codes(xr, inv, k, q);  // else zeros (the outputs are NaN)
    for (int64_t o = 0; o < r.n_outl && finite; ++o) {
      const int64_t j = c.cols[o];
      const float lim = 127.f * c.copies[j];
      const float v = std::min(lim, std::max(-lim, std::nearbyint(xr[j] * inv)));
      rest[o] = static_cast<int16_t>(static_cast<int32_t>(v) - q[j]);
    }
    r.scale[i] = amax / 127.f;
  }
  r.low.finish();
  return r;
}

// sum_o rest[i, o] * w[K + o] for weight row w: int16 x int16 products, exact in int32
int32_t rest_dot(const Rows& r, int64_t i, const int8_t* w) {
  int32_t sum = 0;
  const int64_t lead = r.padded - r.n_outl;  // the zeros before the rests
#ifdef LOWBIT_GEMV_AVX2
  if (r.k >= lead) {
    const int8_t* wp = w + r.k - lead;  // the P bytes ending at column K + n_outl
    const int16_t* rp = r.rest.data() + i * r.padded;
    __m256i acc = _mm256_setzero_si256();
    for (int64_t t = 0; t < r.padded; t += 16) {
      const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wp + t)));
      const __m256i rv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rp + t));
      acc = _mm256_add_epi32(acc, _mm256_madd_epi16(rv, wv));
    }
    return hsum_i32(acc);
  }
#endif
  for (int64_t o = 0; o < r.n_outl; ++o) sum += int32_t(r.rest[i * r.padded + lead + o]) * int32_t(w[r.k + o]);
  return sum;
}


// where the prefetch runs: PREFETCH bytes ahead in the stream of the rows' first k columns
// (rows are `stride` apart; the rest of each row is neither read nor prefetched)
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

// out[i] = sum_j q[m0 + i, j] * w[j] over the codes' width, for MT rows, exact in int32.
// The weight rows' first `stream` columns are prefetched PREFETCH bytes ahead (one stream
// per core does not keep the memory busy: 8 -> 9.5 GB/s per core on a 2-core Xeon; 4 weight
// rows per pass measured no faster)
template <int MT>
void dot_rows(const Codes& r, const int8_t* w, int64_t m0, int64_t stream, int64_t stride, int32_t* out) {
  const int64_t k = r.width;
  int64_t j = 0;
#ifdef LOWBIT_GEMV_AVX2
  __m256i acc[MT];
  for (int i = 0; i < MT; ++i) acc[i] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  Prefetch ahead(w, stream, stride);
  for (; j + 32 <= k; j += 32) {
    _mm_prefetch(ahead.next(stream, stride), _MM_HINT_T0);
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j));
    for (int i = 0; i < MT; ++i) {
      const int64_t off = (m0 + i) * k + j;
      const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.q.data() + off));
      const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.qabs.data() + off));
      const __m256i p = _mm256_maddubs_epi16(av, _mm256_sign_epi8(wv, qv));
      acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(p, ones));
    }
  }
  if (r.has_tail()) {  // the last 32 bytes, the codes before the last k % 32 zeroed
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k - 32));
    for (int i = 0; i < MT; ++i) {
      const int64_t off = (m0 + i) * 32;
      const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.tail_q.data() + off));
      const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.tail_abs.data() + off));
      const __m256i p = _mm256_maddubs_epi16(av, _mm256_sign_epi8(wv, qv));
      acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(p, ones));
    }
    j = k;
  }
  for (int i = 0; i < MT; ++i) out[i] = hsum_i32(acc[i]);
#else
  for (int i = 0; i < MT; ++i) out[i] = 0;
#endif
  for (; j < k; ++j)
    for (int i = 0; i < MT; ++i) out[i] += int32_t(r.q[(m0 + i) * k + j]) * int32_t(w[j]);
}

#ifdef LOWBIT_GEMV_VNNI
// dot_rows with AVX-512 VNNI: 64 weight bytes per step, one vpdpbusd per row
// ((q + 128) * w summed in int32) and one for the weights' sum (ones * w)
template <int MT>
LOWBIT_GEMV_VNNI void dot_rows_vnni(const Codes& r, const int8_t* w, int64_t m0, int64_t stream,
                                    int64_t stride, int32_t* out) {
  const int64_t k = r.width;
  __m512i acc[MT];
  for (int i = 0; i < MT; ++i) acc[i] = _mm512_setzero_si512();
  __m512i wsum = _mm512_setzero_si512();
  const __m512i ones = _mm512_set1_epi8(1);
  Prefetch ahead(w, stream, stride);
  int64_t j = 0;
  for (; j + 64 <= k; j += 64) {
    _mm_prefetch(ahead.next(stream, stride), _MM_HINT_T0);
    _mm_prefetch(ahead.next(stream, stride), _MM_HINT_T0);
    const __m512i wv = _mm512_loadu_si512(w + j);
    wsum = _mm512_dpbusd_epi32(wsum, ones, wv);
    for (int i = 0; i < MT; ++i)
      acc[i] = _mm512_dpbusd_epi32(acc[i], _mm512_loadu_si512(r.qoff.data() + (m0 + i) * k + j), wv);
  }
  if (j < k) {  // the last k % 64 bytes, masked (both operands zero beyond: no product)
    const __mmask64 mask = ~0ULL >> (64 - (k - j));
    const __m512i wv = _mm512_maskz_loadu_epi8(mask, w + j);
    wsum = _mm512_dpbusd_epi32(wsum, ones, wv);
    for (int i = 0; i < MT; ++i)
      acc[i] = _mm512_dpbusd_epi32(acc[i], _mm512_maskz_loadu_epi8(mask, r.qoff.data() + (m0 + i) * k + j), wv);
    j = k;
  }
  const int32_t offset = 128 * _mm512_reduce_add_epi32(wsum);
  for (int i = 0; i < MT; ++i) out[i] = _mm512_reduce_add_epi32(acc[i]) - offset;
  for (; j < k; ++j)
    for (int i = 0; i < MT; ++i) out[i] += int32_t(r.q[(m0 + i) * k + j]) * int32_t(w[j]);
}
#endif

// whether dot_rows runs the AVX-512 VNNI loop (lowbit_int8_gemv_use_vnni turns it off to test the other)
bool vnni_supported() {
#ifdef LOWBIT_GEMV_VNNI
  return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw");
#else
  return false;
#endif
}
bool use_vnni = vnni_supported();

struct Weights {
  const int8_t* w_q;           // [N, K + E]
  const float* w_scale;        // [N]
  const float* bias;           // [N] or null
  int64_t n, k, stride;         // stride: K + E
};

// dots[0 .. codes.rows]: every row of `codes` dotted with w (MAX_ROWS rows per pass); the
// prefetch runs along the first `stream` (>= 1) columns of the weight rows
void dot_all(const Codes& codes, const int8_t* w, int64_t stream, int64_t stride, int32_t* dots) {
  for (int64_t v0 = 0; v0 < codes.rows; v0 += MAX_ROWS) {
    const int64_t mt = std::min(MAX_ROWS, codes.rows - v0);
#ifdef LOWBIT_GEMV_VNNI
    if (use_vnni) {
      switch (mt) {
        case 1: dot_rows_vnni<1>(codes, w, v0, stream, stride, dots + v0); break;
        case 2: dot_rows_vnni<2>(codes, w, v0, stream, stride, dots + v0); break;
        case 3: dot_rows_vnni<3>(codes, w, v0, stream, stride, dots + v0); break;
        default: dot_rows_vnni<4>(codes, w, v0, stream, stride, dots + v0); break;
      }
      continue;
    }
#endif
    switch (mt) {
      case 1: dot_rows<1>(codes, w, v0, stream, stride, dots + v0); break;
      case 2: dot_rows<2>(codes, w, v0, stream, stride, dots + v0); break;
      case 3: dot_rows<3>(codes, w, v0, stream, stride, dots + v0); break;
      default: dot_rows<4>(codes, w, v0, stream, stride, dots + v0); break;
    }
  }
}

// y[:, n]: every row's dot with weight row n (its outliers' rests added), then the epilogue
void rows_times_weight(const Weights& a, const Rows& r, int64_t n, int32_t* dots, float* y) {
  const int8_t* w = a.w_q + n * a.stride;
  dot_all(r.low, w, a.k + r.n_outl, a.stride, dots);
  for (int64_t i = 0; i < r.m; ++i) {
    // the reference's int32 sum: exact, wrapping as _int_mm would should it ever overflow
    uint32_t acc = static_cast<uint32_t>(dots[i]);
    if (r.n_outl) acc += static_cast<uint32_t>(rest_dot(r, i, w));
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

// c.cols and c.width from c.copies [k]; false where a count is not a whole number in
// [1, 256]. Every call reads the site's constant copies, so this is one vector pass (a
// check per element cost int8-mixed about 1.2 us more per call, ~0.25 ms per SmolLM2 token)
bool read_copies(Copies& c, int64_t k) {
  int64_t j = 0, extra = 0;
  bool ok = true;
#ifdef LOWBIT_GEMV_AVX2
  const __m256 one = _mm256_set1_ps(1.f), most = _mm256_set1_ps(256.f);
  __m256 bad = _mm256_setzero_ps();
  __m256i sum = _mm256_setzero_si256();
  for (; j + 8 <= k; j += 8) {
    const __m256 m = _mm256_loadu_ps(c.copies + j);
    const __m256 whole = _mm256_round_ps(m, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    bad = _mm256_or_ps(bad, _mm256_or_ps(_mm256_cmp_ps(m, whole, _CMP_NEQ_UQ),  // NaN too
                                         _mm256_or_ps(_mm256_cmp_ps(m, one, _CMP_LT_OQ),
                                                      _mm256_cmp_ps(m, most, _CMP_GT_OQ))));
    sum = _mm256_add_epi32(sum, _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(m, one), most)));
    for (int more = _mm256_movemask_ps(_mm256_cmp_ps(m, one, _CMP_GT_OQ)); more; more &= more - 1)
      c.cols.push_back(j + __builtin_ctz(more));
  }
  ok = _mm256_movemask_ps(bad) == 0;
  extra = static_cast<int64_t>(hsum_i32(sum)) - j;
#endif
  for (; j < k; ++j) {
    const float m = c.copies[j];
    if (!(m >= 1.f && m <= 256.f && m == std::floor(m))) return false;
    if (m > 1.f) c.cols.push_back(j);
    extra += static_cast<int64_t>(m) - 1;
  }
  c.width = k + extra;
  return ok;
}

// x's rows as the kernel reads them (a float32 contiguous x, decode's usual input, in
// place: no dispatcher calls) and the copies they are quantized with
struct Input {
  at::Tensor x2;  // x, or its float32 contiguous [m, k] copy
  const float* data = nullptr;
  int64_t m = 0, k = 0;
  Copies c;
  std::vector<int64_t> sizes;  // x's sizes (the outputs': the last one N)
};

Input read_input(const at::Tensor& x, const std::optional<at::Tensor>& copies) {
  Input in;
  in.k = x.size(-1);
  in.c.width = in.k;
  if (copies.has_value()) {
    in.c.copies = float_data(copies, in.k, "copies");
    TORCH_CHECK(read_copies(in.c, in.k), "int8_gemv_cpu: copies must be whole numbers in [1, 256]");
  }
  const bool in_place = in.k > 0 && x.scalar_type() == at::kFloat && x.is_contiguous();
  in.x2 = in_place ? x : x.reshape({-1, in.k}).to(at::kFloat).contiguous();
  in.m = in_place ? x.numel() / in.k : in.x2.size(0);
  in.data = in.x2.data_ptr<float>();
  in.sizes = x.sizes().vec();
  return in;
}

Weights weights_of(const at::Tensor& w_q, const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                   const Input& in) {
  TORCH_CHECK(w_q.dtype() == at::kChar && w_q.dim() == 2 && w_q.is_contiguous() && w_q.size(1) == in.c.width,
              "int8_gemv_cpu: w_q must be contiguous int8 [N, K + E] (E: the copies beyond the first)");
  Weights a{};
  a.w_q = w_q.data_ptr<int8_t>();
  a.n = w_q.size(0);
  a.k = in.k;
  a.stride = in.c.width;
  a.w_scale = float_data(w_scale, a.n, "w_scale");
  a.bias = float_data(bias, a.n, "bias");
  return a;
}

// x times every weight of `ws`: the rows quantized once, then one parallel pass over the
// weights' rows one after another (q/k/v or gate/up in one call: one fork, and layers too
// small to split alone share both threads)
std::vector<at::Tensor> gemv(const Input& in, const std::vector<Weights>& ws) {
  std::vector<at::Tensor> ys;
  std::vector<float*> outs;
  std::vector<int64_t> start{0};  // weight i's rows are [start[i], start[i + 1]) of the pass
  auto sizes = in.sizes;
  for (const Weights& a : ws) {
    sizes.back() = a.n;
    ys.push_back(at::empty(sizes, in.x2.options()));  // [..., N], contiguous: [m, N] rows
    outs.push_back(ys.back().data_ptr<float>());
    start.push_back(start.back() + a.n);
  }
  if (in.m == 0 || start.back() == 0) return ys;
  const Rows r = quantize(in.data, in.m, in.k, in.c);
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, in.k));  // ~64 KB of weights
  at::parallel_for(0, start.back(), grain, [&](int64_t n0, int64_t n1) {
    std::vector<int32_t> dots(r.m);
    size_t i = std::upper_bound(start.begin(), start.end(), n0) - start.begin() - 1;
    for (int64_t n = n0; n < n1; ++n) {
      while (n >= start[i + 1]) ++i;
      rows_times_weight(ws[i], r, n - start[i], dots.data(), outs[i]);
    }
  });
  return ys;
}

at::Tensor int8_gemv_cpu(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_scale,
                         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& copies) {
  const Input in = read_input(x, copies);
  return gemv(in, {weights_of(w_q, w_scale, bias, in)})[0];
}

// the linears of one input (same copies): each output is int8_gemv_cpu's bit for bit
std::vector<at::Tensor> int8_gemv_cpu_group(const at::Tensor& x, at::TensorList w_q, at::TensorList w_scale,
                                            const c10::List<std::optional<at::Tensor>>& bias,
                                            const std::optional<at::Tensor>& copies) {
  TORCH_CHECK(w_scale.size() == w_q.size() && bias.size() == w_q.size(),
              "int8_gemv_cpu_group: one w_scale and one bias (or None) per weight");
  const Input in = read_input(x, copies);
  std::vector<Weights> ws;
  for (size_t i = 0; i < w_q.size(); ++i) ws.push_back(weights_of(w_q[i], w_scale[i], bias.get(i), in));
  return gemv(in, ws);
}
}  // namespace

extern "C" int lowbit_int8_gemv_built_with_avx2() {
#ifdef LOWBIT_GEMV_AVX2
  return 1;
#else
  return 0;
#endif
}

// Turns the AVX-512 VNNI loop on (where the CPU has it) or off; returns whether it is on.
extern "C" int lowbit_int8_gemv_use_vnni(int enable) {
  use_vnni = enable && vnni_supported();
  return use_vnni;
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("int8_gemv_cpu", &int8_gemv_cpu);
  m.impl("int8_gemv_cpu_group", &int8_gemv_cpu_group);
}
