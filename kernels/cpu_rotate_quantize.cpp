// Fused online block transform + per-token low-bit quantization for the CPU target.
//
// q[m, :], scale[m] = quantize_rows_bits(x[m, :] @ diag(B1..., T1)[:, perm] @ diag(B2..., T2))
// one tile of TILE token rows at a time: the transformed rows stay in two per-thread
// buffers (TILE rows of K floats each), so the activations are read from memory once and only
// the int8 codes and the scales are written. Each stage is optional (nb = r = 0; perm null).
// Within a tile the loops run block by block, so a block's matrix is read from L2 once per
// tile, not once per 16 rows; on the AMX path the permutation gathers straight into the
// second stage's bf16 operand.
//
// Two ways to multiply a block (chosen per call by `amx`):
//   * fp32: at::vec FMAs (any ISA inductor builds for), register tiles of rows x block;
//   * AMX (amx != 0; built only where the compiler targets AMX-BF16): the rows rounded to
//     bf16, the block's matrix given as bf16 pairs, fp32 accumulation in tiles.
// Remainder blocks (T1, T2) always take the fp32 path. bf16 activations skip the widening
// to fp32 where the first stage is AMX without a remainder block (it rounds to bf16 anyway).
// The quantization is the reference's: absmax clamped below by eps, codes
// round-half-even(y * (qmax / absmax)) clamped to [-qmax, qmax], scale absmax / qmax (eps is
// LOWBIT_EPS, which the loader defines from qcompile.kernels.reference.EPS); a NaN in a row
// makes its absmax, hence its scale, NaN, as the reference's.
//
// The rows are x's, or (lowbit::swiglu_rotate_quantize_rows_bits_cpu) silu(gate) * up formed
// per tile from the int32 accumulators of the gate and up linears, so that product is never
// stored.
//
// The CPU implementation of the ops lowbit::rotate_quantize_rows_bits_cpu and
// lowbit::swiglu_rotate_quantize_rows_bits_cpu (their schemas and fakes are defined in
// Python); built and loaded by qcompile.kernels.cpu_lowbit with inductor's C++ builder and
// cache. A C++ op, so a decode step's call costs no Python.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define LOWBIT_AMX 1
#endif

namespace {
using Vec = at::vec::Vectorized<float>;
constexpr int V = Vec::size();
constexpr int TILE = 32;  // token rows per tile (measured: 16 and 64 are no faster)
constexpr int AMX_ROWS = 16;  // rows of one AMX tile

// rows rounded up to whole AMX tiles
inline int amx_padded(int rows) { return (rows + AMX_ROWS - 1) / AMX_ROWS * AMX_ROWS; }

// zero the bf16 rows after the first `rows` up to a whole AMX tile (AMX multiplies 16 rows)
inline void zero_padding_rows(uint16_t* xb, int rows, long k) {
  std::memset(xb + rows * k, 0, sizeof(uint16_t) * (amx_padded(rows) - rows) * k);
}

// y[r, 0:BS] = x[r, 0:BS] @ m[BS, BS] for RT rows (row strides ldx, ldy)
template <int BS, int RT>
inline void fp32_rows(const float* __restrict x, long ldx, const float* __restrict m,
                      float* __restrict y, long ldy) {
  constexpr int NV = BS / V;
  Vec acc[RT][NV];
#pragma GCC unroll 16
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[r][v] = Vec(0.f);
  for (int i = 0; i < BS; ++i) {
    Vec mv[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) mv[v] = Vec::loadu(m + (long)i * BS + v * V);
#pragma GCC unroll 16
    for (int r = 0; r < RT; ++r) {
      const Vec xv(x[r * ldx + i]);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(xv, mv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[r][v].store(y + r * ldy + v * V);
}

template <int BS>
inline void fp32_block(const float* x, long ldx, const float* m, float* y, long ldy, int rows) {
  constexpr int NV = BS / V;
  constexpr int RT = NV >= 16 ? 1 : (16 / NV > 8 ? 8 : 16 / NV);  // ~16 accumulators
  int r = 0;
  for (; r + RT <= rows; r += RT) fp32_rows<BS, RT>(x + r * ldx, ldx, m, y + r * ldy, ldy);
  for (; r < rows; ++r) fp32_rows<BS, 1>(x + r * ldx, ldx, m, y + r * ldy, ldy);
}

// any block size (remainder blocks, sizes that are not a multiple of the vector width)
inline void scalar_block(const float* x, long ldx, const float* m, float* y, long ldy, int rows,
                         int bs) {
  for (int r = 0; r < rows; ++r) {
    float* yr = y + r * ldy;
    for (int j = 0; j < bs; ++j) yr[j] = 0.f;
    for (int i = 0; i < bs; ++i) {
      const float xv = x[r * ldx + i];
      const float* mi = m + (long)i * bs;
      for (int j = 0; j < bs; ++j) yr[j] += xv * mi[j];
    }
  }
}

inline void any_block(const float* x, long ldx, const float* m, float* y, long ldy, int rows,
                      int bs) {
  if (bs % V == 0) {
    switch (bs / V) {
      case 1: return fp32_block<V>(x, ldx, m, y, ldy, rows);
      case 2: return fp32_block<2 * V>(x, ldx, m, y, ldy, rows);
      case 4: return fp32_block<4 * V>(x, ldx, m, y, ldy, rows);
      case 8: return fp32_block<8 * V>(x, ldx, m, y, ldy, rows);
      case 16: return fp32_block<16 * V>(x, ldx, m, y, ldy, rows);
      default: break;
    }
  }
  scalar_block(x, ldx, m, y, ldy, rows, bs);
}

#ifdef LOWBIT_AMX
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tiles 0, 1: 16 rows x 16 outputs (fp32); 2, 3: 16 rows x 32 inputs (bf16); 4-7: 32 inputs
// x 16 outputs of the matrix as bf16 pairs
inline void amx_configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// y[16, bs] = xb[16, bs] @ m for one block (bs a multiple of 32): xb bf16 rows (leading
// dimension ldx), m2 the matrix as bf16 pairs m2[i / 2][j] = (m[i][j], m[i + 1][j]).
// 32 outputs at a time with every operand tile of the step loaded up front (tiles are not
// renamed: reusing one within a step would serialise its load behind the product reading it)
inline void amx_block(const uint16_t* xb, long ldx, const uint32_t* m2, int bs, float* y,
                      long ldy) {
  const long ldb = (long)bs * 4;
  for (int n0 = 0; n0 < bs; n0 += 32) {
    _tile_zero(0);
    _tile_zero(1);
    for (int k0 = 0; k0 < bs; k0 += 64) {
      const uint32_t* b = m2 + (long)(k0 / 2) * bs + n0;
      _tile_loadd(2, xb + k0, ldx * 2);
      _tile_loadd(4, b, ldb);
      _tile_loadd(5, b + 16, ldb);
      if (k0 + 32 < bs) {
        _tile_loadd(3, xb + k0 + 32, ldx * 2);
        _tile_loadd(6, b + 16 * bs, ldb);
        _tile_loadd(7, b + 16 * bs + 16, ldb);
      }
      _tile_dpbf16ps(0, 2, 4);
      _tile_dpbf16ps(1, 2, 5);
      if (k0 + 32 < bs) {
        _tile_dpbf16ps(0, 3, 6);
        _tile_dpbf16ps(1, 3, 7);
      }
    }
    _tile_stored(0, y + n0, ldy * 4);
    _tile_stored(1, y + n0 + 16, ldy * 4);
  }
}

// round rows x k floats to bf16; rows up to a whole AMX tile are zero
inline void to_bf16_tile(const float* x, uint16_t* xb, int rows, long k) {
  const long n = rows * k;
  long c = 0;
  for (; c + 16 <= n; c += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xb + c),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + c)));
  if (c < n) {
    const __mmask16 mask = (__mmask16)((1u << (n - c)) - 1);
    _mm256_mask_storeu_epi16(xb + c, mask,
                             (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, x + c)));
  }
  zero_padding_rows(xb, rows, k);
}

// out[r, c] = bf16(in[r, perm[c]]) (rows up to a whole AMX tile zero): the permutation and the
// rounding of the next AMX stage's operand in one pass
inline void gather_to_bf16_tile(const float* in, const int32_t* perm, uint16_t* xb, int rows,
                                long k) {
  for (int r = 0; r < rows; ++r) {
    const float* src = in + r * k;
    uint16_t* dst = xb + r * k;
    for (long c = 0; c < k; c += 16) {
      const __mmask16 mask = k - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (k - c)) - 1);
      const __m512i idx = _mm512_maskz_loadu_epi32(mask, perm + c);
      const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, idx, src, 4);
      _mm256_mask_storeu_epi16(dst + c, mask, (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
  zero_padding_rows(xb, rows, k);
}

// y[:, blocks] = xb @ diag(blocks...) for a tile whose bf16 rows are in xb (padded to whole
// AMX tiles); block by block, so its matrix stays in L1 across the tile's rows
inline void amx_blocks(const uint16_t* xb, float* y, int rows, long k, const void* blocks, int nb,
                       int bs) {
  const uint32_t* m2 = static_cast<const uint32_t*>(blocks);
  for (int b = 0; b < nb; ++b)
    for (int r0 = 0; r0 < rows; r0 += AMX_ROWS)
      amx_block(xb + r0 * k + (long)b * bs, k, m2 + (long)b * bs * bs / 2, bs,
                y + r0 * k + (long)b * bs, k);
}
#endif

// y = x @ diag(blocks..., tail) on a tile of rows; blocks as bf16 pairs when amx
inline void stage(const float* x, float* y, uint16_t* xb, int rows, long k, const void* blocks,
                  int nb, int bs, const float* tail, int r, int amx) {
#ifdef LOWBIT_AMX
  if (amx && nb) {
    to_bf16_tile(x, xb, rows, k);
    amx_blocks(xb, y, rows, k, blocks, nb, bs);
    if (r) any_block(x + (long)nb * bs, k, tail, y + (long)nb * bs, k, rows, r);
    return;
  }
#endif
  const float* m = static_cast<const float*>(blocks);
  for (int b = 0; b < nb; ++b)
    any_block(x + (long)b * bs, k, m + (long)b * bs * bs, y + (long)b * bs, k, rows, bs);
  if (r) any_block(x + (long)nb * bs, k, tail, y + (long)nb * bs, k, rows, r);
}

// out[r, c] = in[r, perm[c]]
inline void gather_columns(const float* in, const int32_t* perm, float* out, int rows, long k) {
  for (int r = 0; r < rows; ++r) {
    const float* src = in + r * k;
    float* dst = out + r * k;
    long c = 0;
#ifdef __AVX512F__
    for (; c + 16 <= k; c += 16)
      _mm512_storeu_ps(dst + c, _mm512_i32gather_ps(_mm512_loadu_si512(perm + c), src, 4));
#endif
    for (; c < k; ++c) dst[c] = src[perm[c]];
  }
}

// max |y[0:k]|; a NaN wins (as in the reference's amax), so the row's scale is NaN and the
// NaN reaches the linear's output instead of finite codes
inline float absmax_row(const float* y, long k) {
#if defined(CPU_CAPABILITY_AVX512)
  // the integer max of the sign-cleared bit patterns: for non-negative floats the integer
  // order is the float order, with NaNs above +inf; four chains (one is latency-bound)
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
  __m512i m0 = _mm512_setzero_si512(), m1 = m0, m2 = m0, m3 = m0;
  long c = 0;
  for (; c + 64 <= k; c += 64) {
    m0 = _mm512_max_epu32(m0, _mm512_and_si512(_mm512_loadu_si512(y + c), magnitude));
    m1 = _mm512_max_epu32(m1, _mm512_and_si512(_mm512_loadu_si512(y + c + 16), magnitude));
    m2 = _mm512_max_epu32(m2, _mm512_and_si512(_mm512_loadu_si512(y + c + 32), magnitude));
    m3 = _mm512_max_epu32(m3, _mm512_and_si512(_mm512_loadu_si512(y + c + 48), magnitude));
  }
  for (; c + 16 <= k; c += 16)
    m0 = _mm512_max_epu32(m0, _mm512_and_si512(_mm512_loadu_si512(y + c), magnitude));
  if (c < k) {
    const __mmask16 tail = (__mmask16)((1u << (k - c)) - 1);
    m0 = _mm512_max_epu32(m0, _mm512_and_si512(_mm512_maskz_loadu_epi32(tail, y + c), magnitude));
  }
  const uint32_t bits = _mm512_reduce_max_epu32(
      _mm512_max_epu32(_mm512_max_epu32(m0, m1), _mm512_max_epu32(m2, m3)));
  float amax;
  std::memcpy(&amax, &bits, sizeof amax);
  return amax;
#else
  Vec m0(0.f), m1(0.f), m2(0.f), m3(0.f);  // maximum() keeps NaNs
  long c = 0;
  for (; c + 4 * V <= k; c += 4 * V) {
    m0 = at::vec::maximum(m0, Vec::loadu(y + c).abs());
    m1 = at::vec::maximum(m1, Vec::loadu(y + c + V).abs());
    m2 = at::vec::maximum(m2, Vec::loadu(y + c + 2 * V).abs());
    m3 = at::vec::maximum(m3, Vec::loadu(y + c + 3 * V).abs());
  }
  for (; c + V <= k; c += V) m0 = at::vec::maximum(m0, Vec::loadu(y + c).abs());
  const Vec vmax = at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3));
  alignas(64) float lanes[V];
  vmax.store(lanes);
  float amax = 0.f;  // std::max(a, NaN) would drop a NaN
  for (int j = 0; j < V; ++j) amax = std::isnan(lanes[j]) ? lanes[j] : std::max(amax, lanes[j]);
  for (; c < k; ++c) amax = std::isnan(y[c]) ? y[c] : std::max(amax, std::fabs(y[c]));
  return amax;
#endif
}

inline void quantize_row(const float* y, long k, int qmax, float eps, int8_t* q, float* scale) {
  const float amax = std::max(absmax_row(y, k), eps);  // a NaN stays (NaN < eps is false)
  const float inv = (float)qmax / amax;
  long c = 0;
#if defined(CPU_CAPABILITY_AVX512)
  // |y| <= amax, so |y * inv| rounds to at most qmax: the conversion (round-half-even, set
  // per instruction) and the saturating narrowing to 16 bytes need no clamp; the same codes
  const __m512 vinv = _mm512_set1_ps(inv);
  for (; c + 16 <= k; c += 16)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + c),
                     _mm512_cvtsepi32_epi8(_mm512_cvt_roundps_epi32(
                         _mm512_mul_ps(_mm512_loadu_ps(y + c), vinv),
                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
#else
  const Vec vinv(inv), lo((float)-qmax), hi((float)qmax);
  for (; c + V <= k; c += V)
    at::vec::convert<int8_t>(at::vec::clamp((Vec::loadu(y + c) * vinv).round(), lo, hi))
        .store(q + c, V);
#endif
  for (; c < k; ++c)
    q[c] = (int8_t)std::min(std::max(std::nearbyint(y[c] * inv), (float)-qmax), (float)qmax);
  *scale = amax / (float)qmax;
}

// SwiGLU prologue: input row m is silu(g[m] * s[m] * gs) * (u[m] * s[m] * us), from the
// int32 accumulators g, u of the gate and up linears (s: the rows' activation scales, gs / us:
// the weight scales per channel), the reference's products in its order
struct Swiglu {
  const int32_t* gate = nullptr;
  const int32_t* up = nullptr;
  const float* act_scale = nullptr;
  const float* gate_scale = nullptr;
  const float* up_scale = nullptr;
};

struct Args {
  const float* x = nullptr;      // fp32 rows, or
  const uint16_t* xb = nullptr;  // bf16 rows (AMX first stage without a tail only), or
  Swiglu sw;                     // the rows computed from the gate / up accumulators
  long m = 0, k = 0;
  const void* blocks1 = nullptr;
  int nb1 = 0, bs1 = 0;
  const float* tail1 = nullptr;
  int r1 = 0;
  const int32_t* perm = nullptr;
  const void* blocks2 = nullptr;
  int nb2 = 0, bs2 = 0;
  const float* tail2 = nullptr;
  int r2 = 0, amx = 0, qmax = 0;
  float eps = LOWBIT_EPS;
  int8_t* q = nullptr;
  float* scale = nullptr;
};

inline Vec swiglu_vec(const Swiglu& p, long row, long c, const Vec& s) {
  using IVec = at::vec::Vectorized<int32_t>;
  const Vec g =
      at::vec::convert<float>(IVec::loadu(p.gate + row + c)) * s * Vec::loadu(p.gate_scale + c);
  const Vec u =
      at::vec::convert<float>(IVec::loadu(p.up + row + c)) * s * Vec::loadu(p.up_scale + c);
  return g / (Vec(1.f) + g.neg().exp()) * u;
}

inline float swiglu_one(const Swiglu& p, long row, long c, float s) {
  const float g = (float)p.gate[row + c] * s * p.gate_scale[c];
  const float u = (float)p.up[row + c] * s * p.up_scale[c];
  return g / (1.f + std::exp(-g)) * u;
}

// rows [row0, row0 + rows) of the SwiGLU prologue as fp32
inline void swiglu_rows(const Swiglu& p, long row0, int rows, long k, float* out) {
  for (int r = 0; r < rows; ++r) {
    const long row = (row0 + r) * k;
    const float s = p.act_scale[row0 + r];
    long c = 0;
    for (; c + V <= k; c += V) swiglu_vec(p, row, c, Vec(s)).store(out + r * k + c);
    for (; c < k; ++c) out[r * k + c] = swiglu_one(p, row, c, s);
  }
}

#ifdef LOWBIT_AMX
// the same rows rounded to bf16 (rows up to a whole AMX tile zero): the first AMX stage's operand
inline void swiglu_to_bf16_tile(const Swiglu& p, long row0, int rows, long k, uint16_t* xb) {
  for (int r = 0; r < rows; ++r) {
    const long row = (row0 + r) * k;
    const float s = p.act_scale[row0 + r];
    long c = 0;
    for (; c + 16 <= k; c += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xb + r * k + c),
                          (__m256i)_mm512_cvtneps_pbh(__m512(swiglu_vec(p, row, c, Vec(s)))));
    for (; c < k; ++c) xb[r * k + c] = c10::BFloat16(swiglu_one(p, row, c, s)).x;  // RNE too
  }
  zero_padding_rows(xb, rows, k);
}
#endif

// one thread's share: tiles [t0, t1) with its own buffers
void run_tiles(const Args& a, long t0, long t1) {
  const long k = a.k;
  // rows of the largest tile here (a decode step: one AMX tile), uninitialised
  const long n = amx_padded((int)std::min<long>(TILE, a.m - t0 * TILE)) * k;
  const auto buf_a = std::unique_ptr<float[]>(new float[n]);
  const auto buf_b = std::unique_ptr<float[]>(new float[n]);
  const auto buf_h = std::unique_ptr<uint16_t[]>(new uint16_t[n]);
#ifdef LOWBIT_AMX
  if (a.amx) amx_configure();
#endif
  for (long t = t0; t < t1; ++t) {
    const long row0 = t * TILE;
    const int rows = (int)std::min<long>(TILE, a.m - row0);
    const float* cur = a.x ? a.x + row0 * k : nullptr;
    float* out = buf_a.get();
    float* spare = buf_b.get();
    bool first_done = false;
#ifdef LOWBIT_AMX
    if (a.amx && a.nb1 && !a.r1 && (a.xb || a.sw.gate)) {  // the first operand made as bf16
      if (a.xb) {  // bf16 rows: copied into the L1-resident operand buffer (tiles load from it)
        std::memcpy(buf_h.get(), a.xb + row0 * k, sizeof(uint16_t) * rows * k);
        zero_padding_rows(buf_h.get(), rows, k);
      } else {
        swiglu_to_bf16_tile(a.sw, row0, rows, k, buf_h.get());
      }
      amx_blocks(buf_h.get(), out, rows, k, a.blocks1, a.nb1, a.bs1);
      cur = out;
      std::swap(out, spare);
      first_done = true;
    }
#endif
    if (!first_done && a.sw.gate) {
      swiglu_rows(a.sw, row0, rows, k, spare);
      cur = spare;
    }
    if (!first_done && (a.nb1 || a.r1)) {
      stage(cur, out, buf_h.get(), rows, k, a.blocks1, a.nb1, a.bs1, a.tail1, a.r1, a.amx);
      cur = out;
      std::swap(out, spare);
    }
#ifdef LOWBIT_AMX
    if (a.perm && a.amx && a.nb2 && !a.r2) {  // gather straight into R2's bf16 operand
      gather_to_bf16_tile(cur, a.perm, buf_h.get(), rows, k);
      amx_blocks(buf_h.get(), out, rows, k, a.blocks2, a.nb2, a.bs2);
      cur = out;
    } else
#endif
    {
      if (a.perm) {
        gather_columns(cur, a.perm, out, rows, k);
        cur = out;
        std::swap(out, spare);
      }
      if (a.nb2 || a.r2) {
        stage(cur, out, buf_h.get(), rows, k, a.blocks2, a.nb2, a.bs2, a.tail2, a.r2, a.amx);
        cur = out;
      }
    }
    for (int r = 0; r < rows; ++r)
      quantize_row(cur + r * k, k, a.qmax, a.eps, a.q + (row0 + r) * k, a.scale + row0 + r);
  }
#ifdef LOWBIT_AMX
  if (a.amx) _tile_release();
#endif
}

const void* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr() : nullptr;
}

// (number of full blocks, block size) of a block operand: [nb, b, b] fp32, or [nb, b / 2, b, 2]
// bf16 pairs when amx; checked
std::pair<int, int> block_sizes(const std::optional<at::Tensor>& blocks, bool amx,
                                const char* name) {
  if (!blocks.has_value()) return {0, 0};
  const at::Tensor& b = *blocks;
  const auto want = amx ? at::kBFloat16 : at::kFloat;
  TORCH_CHECK(b.scalar_type() == want && b.is_contiguous() && b.dim() == (amx ? 4 : 3),
              "lowbit: ", name, " must be contiguous ",
              amx ? "bf16 pairs [nb, b/2, b, 2]" : "fp32 [nb, b, b]",
              " (prepare them with qcompile.kernels.cpu_lowbit.prepare), got ", b.scalar_type(),
              " ", b.sizes());
  const int bs = (int)b.size(2);
  TORCH_CHECK(amx ? (b.size(1) * 2 == bs && b.size(3) == 2 && bs % 32 == 0) : b.size(1) == bs,
              "lowbit: ", name, " has shape ", b.sizes(), ", not square blocks",
              amx ? " of a multiple of 32" : "");
  return {(int)b.size(0), bs};
}

int tail_size(const std::optional<at::Tensor>& tail, const char* name) {
  if (!tail.has_value()) return 0;
  const at::Tensor& t = *tail;
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 2 &&
                  t.size(0) == t.size(1),
              "lowbit: ", name, " must be a contiguous square fp32 matrix, got ", t.scalar_type(),
              " ", t.sizes());
  return (int)t.size(0);
}

// the transform's fields of Args for rows of K channels, checked
Args transform_args(int64_t k, const std::optional<at::Tensor>& blocks,
                    const std::optional<at::Tensor>& tail, const std::optional<at::Tensor>& perm,
                    const std::optional<at::Tensor>& blocks2,
                    const std::optional<at::Tensor>& tail2, int64_t bits, bool amx) {
  TORCH_CHECK(bits >= 2 && bits <= 8, "lowbit: bit width must be an int in [2, 8], got ", bits);
#ifndef LOWBIT_AMX
  TORCH_CHECK(!amx, "lowbit: amx=True but this kernel was built without AMX-BF16");
#endif
  Args a;
  a.k = k;
  std::tie(a.nb1, a.bs1) = block_sizes(blocks, amx, "blocks");
  std::tie(a.nb2, a.bs2) = block_sizes(blocks2, amx, "blocks2");
  a.r1 = tail_size(tail, "tail");
  a.r2 = tail_size(tail2, "tail2");
  for (const auto& [nb, bs, r] : {std::tuple{a.nb1, a.bs1, a.r1}, std::tuple{a.nb2, a.bs2, a.r2}})
    TORCH_CHECK(!(nb || r) || (int64_t)nb * bs + r == k, "lowbit: blocks of ", nb, " x ", bs,
                " + ", r, " channels do not cover K = ", k);
  if (perm.has_value())
    TORCH_CHECK(perm->scalar_type() == at::kInt && perm->is_contiguous() && perm->numel() == k,
                "lowbit: perm must be contiguous int32 with K = ", k, " entries, got ",
                perm->scalar_type(), " ", perm->sizes());
  a.blocks1 = data_or_null(blocks);
  a.tail1 = static_cast<const float*>(data_or_null(tail));
  a.perm = static_cast<const int32_t*>(data_or_null(perm));
  a.blocks2 = data_or_null(blocks2);
  a.tail2 = static_cast<const float*>(data_or_null(tail2));
  a.amx = (int)amx;
  a.qmax = (1 << (bits - 1)) - 1;
  return a;
}

// q [*lead, K] and scale [*lead, 1] for a's rows, computed
std::tuple<at::Tensor, at::Tensor> launch(Args& a, at::IntArrayRef lead,
                                          const at::TensorOptions& options) {
  std::vector<int64_t> sizes(lead.begin(), lead.end());
  sizes.push_back(a.k);
  at::Tensor q = at::empty(sizes, options.dtype(at::kChar));
  sizes.back() = 1;
  at::Tensor scale = at::empty(sizes, options.dtype(at::kFloat));
  a.q = q.data_ptr<int8_t>();
  a.scale = scale.data_ptr<float>();
  const int64_t tiles = (a.m + TILE - 1) / TILE;
  // one tile per task: decode (one tile) runs inline, without a parallel region
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) { run_tiles(a, t0, t1); });
  return {q, scale};
}

std::tuple<at::Tensor, at::Tensor> rotate_quantize_rows_bits_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& blocks,
    const std::optional<at::Tensor>& tail, const std::optional<at::Tensor>& perm,
    const std::optional<at::Tensor>& blocks2, const std::optional<at::Tensor>& tail2,
    int64_t bits, bool amx) {
  TORCH_CHECK(x.dim() >= 1 && x.is_floating_point(), "lowbit: x must be a float tensor [..., K]");
  const int64_t k = x.size(-1);
  Args a = transform_args(k, blocks, tail, perm, blocks2, tail2, bits, amx);
  // bf16 rows go to the AMX first stage as they are (the rounding it would apply anyway)
  const bool bf16_in = amx && a.nb1 && !a.r1 && x.scalar_type() == at::kBFloat16;
  const at::Tensor xf = x.reshape({-1, k}).to(bf16_in ? at::kBFloat16 : at::kFloat).contiguous();
  a.m = xf.size(0);
  if (bf16_in)
    a.xb = static_cast<const uint16_t*>(xf.data_ptr());
  else
    a.x = xf.data_ptr<float>();
  return launch(a, x.sizes().slice(0, x.dim() - 1), x.options());
}

std::tuple<at::Tensor, at::Tensor> swiglu_rotate_quantize_rows_bits_cpu(
    const at::Tensor& gate, const at::Tensor& up, const at::Tensor& act_scale,
    const at::Tensor& gate_scale, const at::Tensor& up_scale,
    const std::optional<at::Tensor>& blocks, const std::optional<at::Tensor>& tail,
    const std::optional<at::Tensor>& perm, const std::optional<at::Tensor>& blocks2,
    const std::optional<at::Tensor>& tail2, int64_t bits, bool amx) {
  TORCH_CHECK(gate.scalar_type() == at::kInt && up.scalar_type() == at::kInt && gate.dim() == 2 &&
                  gate.sizes() == up.sizes() && gate.is_contiguous() && up.is_contiguous(),
              "lowbit: gate and up must be contiguous int32 accumulators of one shape [M, K], got ",
              gate.scalar_type(), " ", gate.sizes(), " and ", up.scalar_type(), " ", up.sizes());
  const int64_t m = gate.size(0), k = gate.size(1);
  for (const auto& [t, n, name] : {std::tuple{&act_scale, m, "act_scale"},
                                   std::tuple{&gate_scale, k, "gate_scale"},
                                   std::tuple{&up_scale, k, "up_scale"}})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == n,
                "lowbit: ", name, " must be contiguous float32 with ", n, " entries, got ",
                t->scalar_type(), " ", t->sizes());
  Args a = transform_args(k, blocks, tail, perm, blocks2, tail2, bits, amx);
  a.m = m;
  a.sw = {gate.data_ptr<int32_t>(), up.data_ptr<int32_t>(), act_scale.data_ptr<float>(),
          gate_scale.data_ptr<float>(), up_scale.data_ptr<float>()};
  return launch(a, gate.sizes().slice(0, 1), gate_scale.options());
}
}  // namespace

extern "C" int lowbit_built_with_amx() {
#ifdef LOWBIT_AMX
  return 1;
#else
  return 0;
#endif
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("rotate_quantize_rows_bits_cpu", &rotate_quantize_rows_bits_cpu);
  m.impl("swiglu_rotate_quantize_rows_bits_cpu", &swiglu_rotate_quantize_rows_bits_cpu);
}
