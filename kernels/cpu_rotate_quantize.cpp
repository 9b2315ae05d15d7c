// Fused online block transform + per-token low-bit quantization for the CPU target.
//
// q[m, :], scale[m] = quantize_rows_bits(x[m, :] @ diag(B1..., T1)[:, perm] @ diag(B2..., T2))
// one tile of TILE token rows at a time: the transformed rows stay in two per-thread
// buffers (a few tens of KB), so the activations are read from memory once and only the
// int8 codes and the scales are written. Each stage is optional (nb = r = 0; perm null).
//
// Two ways to multiply a block (chosen per call by `amx`):
//   * fp32: at::vec FMAs (any ISA inductor builds for), register tiles of rows x block;
//   * AMX (amx != 0; built only where the compiler targets AMX-BF16): the rows rounded to
//     bf16, the block's matrix given as bf16 pairs, fp32 accumulation in tiles.
// Remainder blocks (T1, T2) always take the fp32 path. The quantization is the
// reference's: absmax clamped below by eps, codes round-half-even(y * (qmax / absmax))
// clamped to [-qmax, qmax], scale absmax / qmax.
// Built and loaded by qcompile.kernels.cpu_lowbit (inductor's C++ builder and cache).
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <omp.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define LOWBIT_AMX 1
#endif

namespace {
using Vec = at::vec::Vectorized<float>;
constexpr int V = Vec::size();
constexpr int TILE = 16;  // token rows per tile (one AMX tile of rows)

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

// tiles 0-3: 16 rows x 16 outputs (fp32); 4: 16 rows x 32 inputs (bf16); 5-7: 32 inputs x
// 16 outputs of the matrix as bf16 pairs
inline void amx_configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// C += tile 4 @ (the slab at b, loaded into tile B); tile numbers must be literals
#define LOWBIT_AMX_DP(C, B, b, ldb) \
  do {                              \
    _tile_loadd(B, b, ldb);         \
    _tile_dpbf16ps(C, 4, B);        \
  } while (0)

// y[16, bs] = xb[16, bs] @ m for one block (bs a multiple of 32): xb bf16 rows (leading
// dimension ldx), m2 the matrix as bf16 pairs m2[i / 2][j] = (m[i][j], m[i + 1][j])
inline void amx_block(const uint16_t* xb, long ldx, const uint32_t* m2, int bs, float* y,
                      long ldy) {
  const long ldb = (long)bs * 4;
  for (int n0 = 0; n0 < bs; n0 += 64) {
    const int nt = std::min(4, (bs - n0) / 16);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int k0 = 0; k0 < bs; k0 += 32) {
      _tile_loadd(4, xb + k0, ldx * 2);
      const uint32_t* b = m2 + (long)(k0 / 2) * bs + n0;
      LOWBIT_AMX_DP(0, 5, b, ldb);
      if (nt > 1) LOWBIT_AMX_DP(1, 6, b + 16, ldb);
      if (nt > 2) LOWBIT_AMX_DP(2, 7, b + 32, ldb);
      if (nt > 3) LOWBIT_AMX_DP(3, 5, b + 48, ldb);
    }
    _tile_stored(0, y + n0, ldy * 4);
    if (nt > 1) _tile_stored(1, y + n0 + 16, ldy * 4);
    if (nt > 2) _tile_stored(2, y + n0 + 32, ldy * 4);
    if (nt > 3) _tile_stored(3, y + n0 + 48, ldy * 4);
  }
}

// round rows x k floats to bf16; rows up to TILE are zero (AMX always multiplies 16 rows)
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
  std::memset(xb + n, 0, sizeof(uint16_t) * (TILE - rows) * k);
}
#endif

// y = x @ diag(blocks..., tail) on a tile of rows; blocks as bf16 pairs when amx
inline void stage(const float* x, float* y, uint16_t* xb, int rows, long k, const void* blocks,
                  int nb, int bs, const float* tail, int r, int amx) {
#ifdef LOWBIT_AMX
  if (amx && nb) {
    to_bf16_tile(x, xb, rows, k);
    const uint32_t* m2 = static_cast<const uint32_t*>(blocks);
    for (int b = 0; b < nb; ++b)
      amx_block(xb + (long)b * bs, k, m2 + (long)b * bs * bs / 2, bs, y + (long)b * bs, k);
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

inline void quantize_row(const float* y, long k, int qmax, float eps, int8_t* q, float* scale) {
  long c = 0;
  Vec vmax(0.f);
  for (; c + V <= k; c += V) vmax = at::vec::maximum(vmax, Vec::loadu(y + c).abs());
  alignas(64) float lanes[V];
  vmax.store(lanes);
  float amax = 0.f;
  for (int j = 0; j < V; ++j) amax = std::max(amax, lanes[j]);
  for (; c < k; ++c) amax = std::max(amax, std::fabs(y[c]));
  amax = std::max(amax, eps);
  const float inv = (float)qmax / amax;
  const Vec vinv(inv), lo((float)-qmax), hi((float)qmax);
  for (c = 0; c + V <= k; c += V) {
    const Vec v = at::vec::clamp((Vec::loadu(y + c) * vinv).round(), lo, hi);
    at::vec::convert<int8_t>(v).store(q + c, V);
  }
  for (; c < k; ++c)
    q[c] = (int8_t)std::min(std::max(std::nearbyint(y[c] * inv), (float)-qmax), (float)qmax);
  *scale = amax / (float)qmax;
}
}  // namespace

extern "C" int lowbit_built_with_amx() {
#ifdef LOWBIT_AMX
  return 1;
#else
  return 0;
#endif
}

extern "C" void lowbit_rotate_quantize_rows(const float* x, long m, long k, const void* blocks1,
                                            int nb1, int bs1, const float* tail1, int r1,
                                            const int32_t* perm, const void* blocks2, int nb2,
                                            int bs2, const float* tail2, int r2, int amx,
                                            int qmax, float eps, int8_t* q, float* scale,
                                            int threads) {
#ifndef LOWBIT_AMX
  amx = 0;
#endif
  const long tiles = (m + TILE - 1) / TILE;
#pragma omp parallel num_threads(threads) if (tiles > 1)
  {
    float* buf_a = new float[TILE * k];
    float* buf_b = new float[TILE * k];
    uint16_t* buf_h = new uint16_t[TILE * k];
#ifdef LOWBIT_AMX
    if (amx) amx_configure();
#endif
#pragma omp for schedule(static)
    for (long t = 0; t < tiles; ++t) {
      const long row0 = t * TILE;
      const int rows = (int)std::min<long>(TILE, m - row0);
      const float* cur = x + row0 * k;
      float* out = buf_a;
      float* spare = buf_b;
      if (nb1 || r1) {
        stage(cur, out, buf_h, rows, k, blocks1, nb1, bs1, tail1, r1, amx);
        cur = out;
        std::swap(out, spare);
      }
      if (perm) {
        gather_columns(cur, perm, out, rows, k);
        cur = out;
        std::swap(out, spare);
      }
      if (nb2 || r2) {
        stage(cur, out, buf_h, rows, k, blocks2, nb2, bs2, tail2, r2, amx);
        cur = out;
        std::swap(out, spare);
      }
      for (int r = 0; r < rows; ++r)
        quantize_row(cur + r * k, k, qmax, eps, q + (row0 + r) * k, scale + row0 + r);
    }
#ifdef LOWBIT_AMX
    if (amx) _tile_release();
#endif
    delete[] buf_a;
    delete[] buf_b;
    delete[] buf_h;
  }
}
