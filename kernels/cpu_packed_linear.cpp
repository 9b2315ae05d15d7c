// Weight-only linear on the packed codes as stored (packing.py's dense bit stream), for the CPU.
//
// lowbit::packed_linear_cpu: y[m, n] = sum_k x[m, k] * s[n, g] * (q[n, k] - z[n, g]) + bias[n],
// g = k / group, for few rows m (decode). Each row of x is quantized to int8 per block of 32
// channels (d = max|x| / 127, codes round-half-even(x * 127 / max|x|)), as llama.cpp's q8
// activations; a block of 32 weight codes is unpacked in registers to bytes in their natural
// order and multiplied with the row's codes as integers, so the weights are read once, at
// their stored width (8, 4, 3 or 2 bits), with fp16 scales and uint8 zero points per group:
//   y = sum_g s_g * sum_{b in g} d_b * (sum_j q_j xq_j - z_g * sum_j xq_j)
// (integer sums inside the brackets; 8-bit codes are taken as q - 128 and z - 128 so that the
// byte products stay within int16). A row holding a NaN or an infinity gives NaN outputs.
// lowbit::packed_linear_cpu_group: the same for several weights of one input (q/k/v, gate/up)
// in one call and one parallel pass; each output is the single call's bit for bit.
//
// lowbit::dequant_packed_cpu: the dense weight s * (q - z) in fp32 or bf16, for the prefill
// path (dequantize, then the float GEMM).
//
// AVX2 intrinsics where the compiler targets AVX2 (every x86 build inductor makes here),
// otherwise a scalar loop with the same arithmetic; 4-bit codes in groups of a multiple of
// 64 take an AVX-512 VNNI loop where the CPU has it (checked at run time). Built and loaded by
// qcompile.kernels.cpu_packed with inductor's C++ builder and cache; the ops' schemas and fakes
// are defined there.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "cpu_row_quantize.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LOWBIT_PACKED_AVX2 1
#if defined(__GNUC__) && defined(__x86_64__)
// compiled for AVX-512 VNNI whatever the flags; called only where the CPU has it
#define LOWBIT_PACKED_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))
#endif
#endif

namespace {
constexpr int64_t BLOCK = 32;  // channels per activation block = codes per unpacked vector
constexpr int64_t ROWS = 4;    // rows of x multiplied per pass over a weight row

// x quantized per block of 32: codes, scale d per block, sum of d * codes per group
struct QuantRows {
  std::vector<int8_t> q;      // [M, K]
  std::vector<float> d;       // [M, K / 32]
  std::vector<float> gsum;    // [M, K / G]: the dequantized codes' sum per group
  std::vector<uint8_t> bad;   // [M]: the row holds a NaN or an infinity
};

// codes of a block in the order the dot-product unpack leaves the weight codes (identity
// without AVX2): 4 bits: even codes then odd ones (low, then high nibbles); 2 bits: code
// 4t + l at byte 8l + t (the 2-bit field l of byte t)
inline int64_t dot_order(int bits, int64_t j) {
#ifdef LOWBIT_PACKED_AVX2
  if (bits == 4) return j < 16 ? 2 * j : 2 * (j - 16) + 1;
  if (bits == 2) return 4 * (j % 8) + j / 8;
#endif
  (void)bits;
  return j;
}

QuantRows quantize_rows(const float* x, int64_t m, int64_t k, int64_t group, int bits) {
  int64_t order[BLOCK];
  for (int64_t j = 0; j < BLOCK; ++j) order[j] = dot_order(bits, j);
  QuantRows r;
  const int64_t nb = k / BLOCK, bpg = group / BLOCK;
  r.q.resize(m * k);
  r.d.resize(m * nb);
  r.gsum.assign(m * (k / group), 0.f);
  r.bad.assign(m, 0);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + i * k + b * BLOCK;
      float amax = 0.f;
      bool finite = true;  // std::max drops a NaN: test every element
      for (int64_t j = 0; j < BLOCK; ++j) {
        finite = finite && std::isfinite(xb[j]);
        amax = std::max(amax, std::fabs(xb[j]));
      }
      if (!finite) {
        r.bad[i] = 1;
        amax = 0.f;  // codes 0: the row's outputs are set to NaN at the end
      }
      const float inv = amax > 0.f ? lowbit_rows::inv_step(amax) : 0.f;  // reference_linear's
      int8_t* qb = r.q.data() + i * k + b * BLOCK;
      int32_t s = 0;
      for (int64_t j = 0; j < BLOCK; ++j) {
        qb[j] = static_cast<int8_t>(std::nearbyint(xb[order[j]] * inv));
        s += qb[j];
      }
      r.d[i * nb + b] = amax / 127.f;
      r.gsum[i * (k / group) + b / bpg] += (amax / 127.f) * float(s);
    }
  }
  return r;
}

// code j of a block (scalar): the packed stream's bits [j * bits, (j + 1) * bits)
inline int code_at(const uint8_t* block, int bits, int64_t j) {
  const int64_t bit = j * bits;
  const uint32_t two = block[bit >> 3] | (bits == 3 ? (uint32_t(block[(bit >> 3) + 1]) << 8) : 0u);
  return (two >> (bit & 7)) & ((1 << bits) - 1);
}

#ifdef LOWBIT_PACKED_AVX2
// the 32 codes of a block as bytes in their natural order
template <int BITS>
inline __m256i unpack_block(const uint8_t* p, const uint8_t* end) {
  if constexpr (BITS == 8) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  } else if constexpr (BITS == 4) {  // byte j: codes 2j (low nibble), 2j + 1
    const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_or_si256(_mm256_and_si256(w, _mm256_set1_epi16(0x000F)),
                           _mm256_and_si256(_mm256_slli_epi16(w, 4), _mm256_set1_epi16(0x0F00)));
  } else if constexpr (BITS == 2) {  // byte t: codes 4t .. 4t + 3, 2 bits each
    const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    __m256i r = _mm256_and_si256(w, _mm256_set1_epi32(0x3));
    r = _mm256_or_si256(r, _mm256_and_si256(_mm256_slli_epi32(w, 6), _mm256_set1_epi32(0x300)));
    r = _mm256_or_si256(r, _mm256_and_si256(_mm256_slli_epi32(w, 12), _mm256_set1_epi32(0x30000)));
    return _mm256_or_si256(r, _mm256_and_si256(_mm256_slli_epi32(w, 18), _mm256_set1_epi32(0x3000000)));
  } else {  // 3 bits: 12 bytes; lane t takes bits 12t .. 12t + 11 (codes 4t .. 4t + 3)
    __m128i v;
    if (p + 16 <= end) {
      v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    } else {  // the tensor's last block: never read past its end
      alignas(16) uint8_t tmp[16] = {0};
      std::memcpy(tmp, p, 12);
      v = _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
    }
    const __m256i idx = _mm256_setr_epi8(0, 1, -1, -1, 1, 2, -1, -1, 3, 4, -1, -1, 4, 5, -1, -1,
                                         6, 7, -1, -1, 7, 8, -1, -1, 9, 10, -1, -1, 10, 11, -1, -1);
    __m256i w = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(v), idx);
    w = _mm256_srlv_epi32(w, _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4));
    __m256i r = _mm256_and_si256(w, _mm256_set1_epi32(0x7));
    r = _mm256_or_si256(r, _mm256_and_si256(_mm256_slli_epi32(w, 5), _mm256_set1_epi32(0x700)));
    r = _mm256_or_si256(r, _mm256_and_si256(_mm256_slli_epi32(w, 10), _mm256_set1_epi32(0x70000)));
    return _mm256_or_si256(r, _mm256_and_si256(_mm256_slli_epi32(w, 15), _mm256_set1_epi32(0x7000000)));
  }
}

// the 32 codes of a block as bytes in dot_order (fewer instructions than natural order)
template <int BITS>
inline __m256i unpack_dot(const uint8_t* p, const uint8_t* end) {
  if constexpr (BITS == 4) {
    const __m128i w = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(w, 4), w);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
  } else if constexpr (BITS == 2) {
    int64_t w;
    std::memcpy(&w, p, 8);
    const __m256i lanes = _mm256_srlv_epi64(_mm256_set1_epi64x(w), _mm256_setr_epi64x(0, 2, 4, 6));
    return _mm256_and_si256(lanes, _mm256_set1_epi8(0x03));
  } else {
    return unpack_block<BITS>(p, end);
  }
}

// sum_j q_j * xq_j over the block, as 8 int32 partial sums
template <int BITS>
inline __m256i block_dot(__m256i w, const int8_t* xq) {
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
  __m256i p;
  if constexpr (BITS == 8) {  // signed codes q - 128: |w| * (x * sign(w))
    const __m256i ws = _mm256_xor_si256(w, _mm256_set1_epi8(char(0x80)));
    p = _mm256_maddubs_epi16(_mm256_sign_epi8(ws, ws), _mm256_sign_epi8(xv, ws));
  } else {
    p = _mm256_maddubs_epi16(w, xv);
  }
  return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

struct Args {
  const uint8_t* codes;  // [N, row_bytes]
  const uint8_t* end;
  int64_t row_bytes;
  const c10::Half* scales;  // [N, K / G]
  const uint8_t* zeros;     // [N, K / G]
  const float* bias;        // [N] or null
  int64_t n, k, group;
  float* y;                 // [M, N]
};

// y[m0 .. m0 + MT, n]: MT rows of x (a compile-time count, so the row loops unroll) times
// weight row n. Per group: sum_b d_b * dot_b in float lanes, then one multiply by the scale.
template <int BITS, int MT>
void rows_times_weight(const Args& a, const QuantRows& x, int64_t m0, int64_t n) {
  const int64_t ng = a.k / a.group, bpg = a.group / BLOCK, nb = a.k / BLOCK;
  const uint8_t* row = a.codes + n * a.row_bytes;
  const int zshift = BITS == 8 ? 128 : 0;
  float zsum[MT] = {};
#ifdef LOWBIT_PACKED_AVX2
  __m256 acc[MT];
  for (int i = 0; i < MT; ++i) acc[i] = _mm256_setzero_ps();
#else
  float acc[MT] = {};
#endif
  for (int64_t g = 0; g < ng; ++g) {
    const float s = static_cast<float>(a.scales[n * ng + g]);
    const float sz = s * float(int(a.zeros[n * ng + g]) - zshift);
    for (int i = 0; i < MT; ++i) zsum[i] += sz * x.gsum[(m0 + i) * ng + g];
#ifdef LOWBIT_PACKED_AVX2
    __m256 part[MT];
    for (int i = 0; i < MT; ++i) part[i] = _mm256_setzero_ps();
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
      const __m256i w = unpack_dot<BITS>(row + b * BITS * BLOCK / 8, a.end);
      for (int i = 0; i < MT; ++i) {
        const __m256i dot = block_dot<BITS>(w, x.q.data() + (m0 + i) * a.k + b * BLOCK);
        part[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_broadcast_ss(&x.d[(m0 + i) * nb + b]), part[i]);
      }
    }
    const __m256 sv = _mm256_set1_ps(s);
    for (int i = 0; i < MT; ++i) acc[i] = _mm256_fmadd_ps(part[i], sv, acc[i]);
#else
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
      const uint8_t* p = row + b * BITS * BLOCK / 8;
      int8_t w[BLOCK];
      for (int64_t j = 0; j < BLOCK; ++j) w[j] = int8_t(code_at(p, BITS, j) - zshift);
      for (int i = 0; i < MT; ++i) {
        const int8_t* xq = x.q.data() + (m0 + i) * a.k + b * BLOCK;
        int32_t dot = 0;
        for (int64_t j = 0; j < BLOCK; ++j) dot += int32_t(w[j]) * xq[j];
        acc[i] += s * x.d[(m0 + i) * nb + b] * float(dot);
      }
    }
#endif
  }
  for (int i = 0; i < MT; ++i) {
#ifdef LOWBIT_PACKED_AVX2
    float v = hsum(acc[i]) - zsum[i];
#else
    float v = acc[i] - zsum[i];
#endif
    if (x.bad[m0 + i]) v = std::numeric_limits<float>::quiet_NaN();
    a.y[(m0 + i) * a.n + n] = v + (a.bias ? a.bias[n] : 0.f);
  }
}

#ifdef LOWBIT_PACKED_VNNI
// 4 bits, groups of a multiple of 64, AVX-512 VNNI: the 64 codes of two blocks per step
// (their 32 bytes' low nibbles and high nibbles put in dot_order, block by block), one
// vpdpbusd per row of x (codes times the row's int8 codes, four products per int32 lane:
// the same exact block sums as the AVX2 loop), lanes 0-7 scaled by the first block's d,
// 8-15 by the second's. Float sums in another order than the AVX2 loop's.
template <int MT>
LOWBIT_PACKED_VNNI void rows_times_weight4_vnni(const Args& a, const QuantRows& x, int64_t m0, int64_t n) {
  const int64_t ng = a.k / a.group, ppg = a.group / 64, nb = a.k / BLOCK;
  const uint8_t* row = a.codes + n * a.row_bytes;
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const __m512i pair_d = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  float zsum[MT] = {};
  __m512 acc[MT];
  for (int i = 0; i < MT; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    const float s = static_cast<float>(a.scales[n * ng + g]);
    const float sz = s * float(a.zeros[n * ng + g]);
    for (int i = 0; i < MT; ++i) zsum[i] += sz * x.gsum[(m0 + i) * ng + g];
    __m512 part[MT];
    for (int i = 0; i < MT; ++i) part[i] = _mm512_setzero_ps();
    for (int64_t p = g * ppg; p < (g + 1) * ppg; ++p) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + p * 32));
      const __m256i lo = _mm256_and_si256(v, nibble);                       // even codes, both blocks
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);  // odd codes
      const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
      const __m512i w = _mm512_shuffle_i64x2(both, both, 0xD8);  // even 0, odd 0, even 1, odd 1
      for (int i = 0; i < MT; ++i) {
        const __m512i xv = _mm512_loadu_si512(x.q.data() + (m0 + i) * a.k + p * 64);
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xv);
        const __m128 d2 = _mm_castsi128_ps(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(x.d.data() + (m0 + i) * nb + 2 * p)));
        const __m512 dv = _mm512_permutexvar_ps(pair_d, _mm512_castps128_ps512(d2));
        part[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), dv, part[i]);
      }
    }
    const __m512 sv = _mm512_set1_ps(s);
    for (int i = 0; i < MT; ++i) acc[i] = _mm512_fmadd_ps(part[i], sv, acc[i]);
  }
  for (int i = 0; i < MT; ++i) {
    float v = _mm512_reduce_add_ps(acc[i]) - zsum[i];
    if (x.bad[m0 + i]) v = std::numeric_limits<float>::quiet_NaN();
    a.y[(m0 + i) * a.n + n] = v + (a.bias ? a.bias[n] : 0.f);
  }
}
#endif

// whether 4-bit weights in groups of a multiple of 64 take the AVX-512 VNNI loop
// (lowbit_packed_use_vnni turns it off to test the other)
bool vnni_supported() {
#ifdef LOWBIT_PACKED_VNNI
  return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw");
#else
  return false;
#endif
}
bool use_vnni = vnni_supported();

template <int BITS>
void rows_times_weight(const Args& a, const QuantRows& x, int64_t m0, int64_t mt, int64_t n) {
#ifdef LOWBIT_PACKED_VNNI
  if (BITS == 4 && use_vnni && a.group % 64 == 0) {
    switch (mt) {
      case 1: rows_times_weight4_vnni<1>(a, x, m0, n); break;
      case 2: rows_times_weight4_vnni<2>(a, x, m0, n); break;
      case 3: rows_times_weight4_vnni<3>(a, x, m0, n); break;
      default: rows_times_weight4_vnni<4>(a, x, m0, n); break;
    }
    return;
  }
#endif
  switch (mt) {
    case 1: rows_times_weight<BITS, 1>(a, x, m0, n); break;
    case 2: rows_times_weight<BITS, 2>(a, x, m0, n); break;
    case 3: rows_times_weight<BITS, 3>(a, x, m0, n); break;
    default: rows_times_weight<BITS, 4>(a, x, m0, n); break;
  }
}

// every weight of `as` (weight i's rows are [start[i], start[i + 1]) of one parallel pass):
// q/k/v or gate/up in one call, one fork, and layers too small to split alone share both threads
template <int BITS>
void linear(const std::vector<Args>& as, const std::vector<int64_t>& start, const QuantRows& x, int64_t m) {
  // ~64 KB of weights per task at least, so a 2-thread decode step splits every layer
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, as[0].row_bytes));
  at::parallel_for(0, start.back(), grain, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < m; m0 += ROWS) {
      size_t i = std::upper_bound(start.begin(), start.end(), n0) - start.begin() - 1;
      for (int64_t n = n0; n < n1; ++n) {
        while (n >= start[i + 1]) ++i;
        rows_times_weight<BITS>(as[i], x, m0, std::min(ROWS, m - m0), n - start[i]);
      }
    }
  });
}

void check(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros, int64_t bits,
           int64_t group, int64_t k) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "packed_linear_cpu: bits must be 2, 3, 4 or 8");
  TORCH_CHECK(group > 0 && group % BLOCK == 0 && k % group == 0,
              "packed_linear_cpu: the group size must be a multiple of 32 dividing K");
  TORCH_CHECK(packed.dtype() == at::kInt && packed.dim() == 2 && packed.is_contiguous(),
              "packed_linear_cpu: packed codes must be contiguous int32 [N, words]");
  TORCH_CHECK(packed.size(1) * 32 >= k * bits, "packed_linear_cpu: too few words for K");
  TORCH_CHECK(scales.dtype() == at::kHalf && scales.is_contiguous() &&
                  scales.sizes() == at::IntArrayRef({packed.size(0), k / group}),
              "packed_linear_cpu: scales must be contiguous fp16 [N, K / G]");
  TORCH_CHECK(zeros.dtype() == at::kByte && zeros.is_contiguous() && zeros.sizes() == scales.sizes(),
              "packed_linear_cpu: zeros must be contiguous uint8 [N, K / G]");
}

Args args_of(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros, int64_t group,
             int64_t k) {
  Args a{};
  a.codes = reinterpret_cast<const uint8_t*>(packed.data_ptr<int32_t>());
  a.row_bytes = packed.size(1) * 4;
  a.end = a.codes + packed.size(0) * a.row_bytes;
  a.scales = scales.data_ptr<c10::Half>();
  a.zeros = zeros.data_ptr<uint8_t>();
  a.n = packed.size(0);
  a.k = k;
  a.group = group;
  return a;
}

// x times every packed weight (same bits and group size, so one quantization of x serves all)
std::vector<at::Tensor> packed_linear_cpu_group(const at::Tensor& x, at::TensorList packed, at::TensorList scales,
                                                at::TensorList zeros,
                                                const c10::List<std::optional<at::Tensor>>& bias, int64_t bits,
                                                int64_t group) {
  TORCH_CHECK(!packed.empty() && scales.size() == packed.size() && zeros.size() == packed.size() &&
                  bias.size() == packed.size(),
              "packed_linear_cpu: one scales, zeros and bias (or None) per weight");
  const int64_t k = x.size(-1);
  // a float32 contiguous x (decode's usual input) is read in place: no dispatcher calls
  const bool in_place = k > 0 && x.scalar_type() == at::kFloat && x.is_contiguous();
  const at::Tensor x2 = in_place ? x : x.reshape({-1, k}).to(at::kFloat).contiguous();
  const int64_t m = in_place ? x.numel() / k : x2.size(0);
  auto sizes = x.sizes().vec();
  std::vector<at::Tensor> ys, biases;
  std::vector<Args> as;
  std::vector<int64_t> start{0};
  for (size_t i = 0; i < packed.size(); ++i) {
    check(packed[i], scales[i], zeros[i], bits, group, k);
    sizes.back() = packed[i].size(0);
    ys.push_back(at::empty(sizes, x2.options()));  // [..., N], contiguous: [m, N] rows
    Args a = args_of(packed[i], scales[i], zeros[i], group, k);
    if (const std::optional<at::Tensor> b = bias.get(i); b.has_value()) {
      biases.push_back(b->to(at::kFloat).contiguous());
      TORCH_CHECK(biases.back().numel() == a.n, "packed_linear_cpu: bias must have N elements");
      a.bias = biases.back().data_ptr<float>();
    }
    a.y = ys.back().data_ptr<float>();
    as.push_back(a);
    start.push_back(start.back() + a.n);
  }
  if (m > 0 && start.back() > 0) {
    const QuantRows xq = quantize_rows(x2.data_ptr<float>(), m, k, group, int(bits));
    switch (bits) {
      case 8: linear<8>(as, start, xq, m); break;
      case 4: linear<4>(as, start, xq, m); break;
      case 3: linear<3>(as, start, xq, m); break;
      default: linear<2>(as, start, xq, m); break;
    }
  }
  return ys;
}

at::Tensor packed_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                             const at::Tensor& zeros, const std::optional<at::Tensor>& bias, int64_t bits,
                             int64_t group) {
  c10::List<std::optional<at::Tensor>> b;
  b.push_back(bias);
  return packed_linear_cpu_group(x, {packed}, {scales}, {zeros}, b, bits, group)[0];
}

template <int BITS, typename T>
void dequant_rows(const Args& a, T* w) {
  const int64_t ng = a.k / a.group, bpg = a.group / BLOCK;
  at::parallel_for(0, a.n, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t g = 0; g < ng; ++g) {
        const float s = static_cast<float>(a.scales[n * ng + g]);
        const float z = float(a.zeros[n * ng + g]);
        for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
          const uint8_t* p = a.codes + n * a.row_bytes + b * BITS * BLOCK / 8;
          T* out = w + n * a.k + b * BLOCK;
#ifdef LOWBIT_PACKED_AVX2
          alignas(32) uint8_t q[BLOCK];
          _mm256_store_si256(reinterpret_cast<__m256i*>(q), unpack_block<BITS>(p, a.end));
#else
          uint8_t q[BLOCK];
          for (int64_t j = 0; j < BLOCK; ++j) q[j] = uint8_t(code_at(p, BITS, j));
#endif
          for (int64_t j = 0; j < BLOCK; ++j) out[j] = static_cast<T>(s * (float(q[j]) - z));
        }
      }
    }
  });
}

at::Tensor dequant_packed_cpu(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
                              int64_t bits, int64_t group, int64_t k, at::ScalarType dtype) {
  check(packed, scales, zeros, bits, group, k);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dequant_packed_cpu: dtype must be fp32 or bf16");
  at::Tensor w = at::empty({packed.size(0), k}, packed.options().dtype(dtype));
  const Args a = args_of(packed, scales, zeros, group, k);
  auto run = [&](auto* out) {
    using T = std::remove_pointer_t<decltype(out)>;
    switch (bits) {
      case 8: dequant_rows<8, T>(a, out); break;
      case 4: dequant_rows<4, T>(a, out); break;
      case 3: dequant_rows<3, T>(a, out); break;
      default: dequant_rows<2, T>(a, out); break;
    }
  };
  if (dtype == at::kFloat) run(w.data_ptr<float>());
  else run(w.data_ptr<c10::BFloat16>());
  return w;
}
}  // namespace

// Turns the AVX-512 VNNI loop on (where the CPU has it) or off; returns whether it is on.
extern "C" int lowbit_packed_use_vnni(int enable) {
  use_vnni = enable && vnni_supported();
  return use_vnni;
}

extern "C" int lowbit_packed_built_with_avx2() {
#ifdef LOWBIT_PACKED_AVX2
  return 1;
#else
  return 0;
#endif
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("packed_linear_cpu", &packed_linear_cpu);
  m.impl("packed_linear_cpu_group", &packed_linear_cpu_group);
  m.impl("dequant_packed_cpu", &dequant_packed_cpu);
}
