// Int8 matmuls for x86 CPUs (AVX-512; the int8-activation ones also AVX2), built for decode steps: a
// few activation rows against a weight that is read once for all of them. Each row's result never
// depends on the rows computed with it, so a k-token step gives exactly what k one-token steps give.
//
// Packed layout (recyclegpt.core.quant_kernels makes it): tiles of 64 output channels, each one
// contiguous run of 32-bit lanes, 64 lanes (one per channel) for every 4 values of k, so a pass
// over a tile is one sequential read. weight [N/64, K/4, 64] int32, byte j of a lane = q[k + j];
// scales [N/64 * 64] fp32.
//
// int8_matmul (weight-only): y = scale * sum_k x[k] * q[k], one fused multiply-add sum in fp32 over
// k ascending. Activations come in fp32 or bf16, are computed in fp32, and go out in their dtype.
//
// int8_dynamic_matmul (int8 weights and activations, AVX-512 VNNI): activations are quantized on the
// fly in blocks of 32 along k (d = max|x| / 127, x ~= d * a, a in -127..127, as llama.cpp's Q8_0),
// each block's sum of a * q is exact in int32 (vpdpbusd: four byte products a lane per
// instruction), and y = scale * sum over blocks (ascending) of d * block sum, in fp32. Bytes of its
// weight lanes hold q + 128 (vpdpbusd multiplies unsigned by signed bytes); every block sum starts at
// -128 * sum(a) to take that back.
//
// int4_dynamic_matmul (int4 weights in Q4_1 groups of 32, int8 activations, AVX-512 VNNI): the same
// activation blocks against the weight's groups (its own layout, below).
//
// Both int8-activation kernels have an AVX2 twin (vpmaddubsw for vpdpbusd) that computes the same
// exact block sums from the same packed weights and scales them in the same order, so on one machine
// its results equal the VNNI kernel's bit for bit; `vnni` picks which runs.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>

#include <immintrin.h>

namespace packed {  // named: the step kernels' file shares this translation unit

constexpr int kPanel = 16;     // output channels a panel: one AVX-512 vector
constexpr int kTile = 64;      // output channels a tile: four panels, interleaved in one stream
constexpr int kMaxRows = 8;    // rows a pass over the weight serves
constexpr int kPrefetch = 4;   // lane indices (256 bytes each) to prefetch ahead

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i32 __attribute__((vector_size(64)));
typedef uint32_t v16u32 __attribute__((vector_size(64)));

#define INLINE inline __attribute__((always_inline))
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"), optimize("fp-contract=fast")))

template <typename T>
INLINE T load(const void* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

// Byte j (0..3) of every lane, sign-extended, as floats: two shifts and a conversion. (GCC turns
// these vector-extension shifts into single instructions, where a byte-to-float conversion of a
// vector becomes a loop of scalar conversions.)
template <int J>
INLINE v16f int8_of(v16u32 lanes) {
  return __builtin_convertvector(reinterpret_cast<v16i32>(lanes << (24 - 8 * J)) >> 24, v16f);
}

// acc[r][p] += x[r][k + j] * w[p] over rows and panels, for each byte j of the packed lanes.
template <int R, int P, int J = 0>
INLINE void accumulate(v16f (&acc)[R][P], const v16u32 (&lanes)[P], const float* x, int64_t K, int64_t k) {
  v16f w[P];
  for (int p = 0; p < P; ++p) w[p] = int8_of<J>(lanes[p]);
  for (int r = 0; r < R; ++r) {
    const float xv = x[r * K + k + J];
    for (int p = 0; p < P; ++p) acc[r][p] += xv * w[p];
  }
  if constexpr (J < 3) accumulate<R, P, J + 1>(acc, lanes, x, K, k);
}

// R rows x P panels: `w` the first panel's lanes in a tile ([K/4, 64] lanes), `scales` its first
// channel's, y [R, ldy] from the first panel's channel on.
template <int R, int P>
INLINE void tile_rows(const uint32_t* w, const float* scales, const float* x, int64_t K, float* y, int64_t ldy) {
  v16f acc[R][P];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) acc[r][p] = v16f{};
  for (int64_t k = 0; k < K; k += 4) {
    const uint32_t* at = w + (k / 4) * kTile;
    __builtin_prefetch(at + kPrefetch * kTile);
    v16u32 lanes[P];
    for (int p = 0; p < P; ++p) lanes[p] = load<v16u32>(at + p * kPanel);
    accumulate<R, P>(acc, lanes, x, K, k);
  }
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) {
      const v16f out = acc[r][p] * load<v16f>(scales + p * kPanel);
      std::memcpy(y + r * ldy + p * kPanel, &out, sizeof(out));
    }
}

// Panels of a tile computed together for R rows (4, 2 or 1): enough independent sums to hide the
// FMA latency when rows are few, few enough that the sums stay in registers. Results do not
// depend on it.
constexpr int panels_for(int rows) {
  return rows <= 2 ? 4 : rows <= 4 ? 2 : 1;
}

struct Problem {
  const float* x;  // [M, K] fp32
  const uint32_t* w;
  const float* scales;
  float* y;  // [M, tiles * 64]
  int64_t M, K, tiles;
};

// Rows [row, row + R) of tile t. (No lambdas on this path: a lambda is a function of its own,
// compiled without its caller's target attributes.)
template <int R>
INLINE void run_tile(const Problem& pr, int64_t row, int64_t t) {
  constexpr int P = panels_for(R);
  const int64_t ldy = pr.tiles * kTile;
  for (int p = 0; p < kTile / kPanel; p += P) {
    const uint32_t* w = pr.w + t * (pr.K / 4) * kTile + p * kPanel;
    tile_rows<R, P>(w, pr.scales + t * kTile + p * kPanel, pr.x + row * pr.K, pr.K,
                    pr.y + row * ldy + t * kTile + p * kPanel, ldy);
  }
}

// Tiles [begin, end), every row: rows in passes of up to kMaxRows over each tile.
AVX512_TARGET void run_tiles(const Problem& pr, int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) {
    for (int64_t row = 0; row < pr.M;) {
      const int64_t rows = std::min<int64_t>(pr.M - row, kMaxRows);
      switch (rows) {
        case 1: run_tile<1>(pr, row, t); break;
        case 2: run_tile<2>(pr, row, t); break;
        case 3: run_tile<3>(pr, row, t); break;
        case 4: run_tile<4>(pr, row, t); break;
        case 5: run_tile<5>(pr, row, t); break;
        case 6: run_tile<6>(pr, row, t); break;
        case 7: run_tile<7>(pr, row, t); break;
        default: run_tile<8>(pr, row, t); break;
      }
      row += rows;
    }
  }
}

// --- int8 weights, int8 activations (AVX-512 VNNI) ---

#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")))
constexpr int kBlock = 32;                // activation values one scale covers
constexpr int kBlockLanes = kBlock / 4;   // lane rows of a tile per block
constexpr int kMaxDynamicRows = 3;        // rows a pass of the int4 tile serves: sums and operands in 32 registers
constexpr int kMaxWideRows = 6;           // the same, with outputs kept in L1 (int8 weights)

// Eight activations at i as fp32 (bf16 widens exactly: its bits are fp32's top half).
__attribute__((target("avx2"))) INLINE __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
__attribute__((target("avx2"))) INLINE __m256 load8(const at::BFloat16* x) {
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

// Activations [M, K] (fp32 or bf16) -> int8 a [M, K], scales d and -128 * sum(a) [M, K/32], block
// by block: a = round(x * 127 / max|x|) (half to even: the conversion's default rounding, as
// nearbyint), clamped to +-127. Eight lanes at a time (AVX2: every CPU these kernels run on); the
// scalar loop it replaced cost ~5 ns a value, ~0.5 ms a SmolLM2 token.
template <typename T>
__attribute__((target("avx2"))) void quantize_blocks(const T* x, int64_t begin, int64_t end, int8_t* a, float* d,
                                                     int32_t* offset) {
  const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i top = _mm256_set1_epi32(127), bottom = _mm256_set1_epi32(-127);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b = begin; b < end; ++b) {
    __m256 v[4];
    for (int i = 0; i < 4; ++i) v[i] = load8(x + b * kBlock + 8 * i);
    __m256 peak = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], sign), _mm256_and_ps(v[1], sign)),
                                _mm256_max_ps(_mm256_and_ps(v[2], sign), _mm256_and_ps(v[3], sign)));
    __m128 half = _mm_max_ps(_mm256_castps256_ps128(peak), _mm256_extractf128_ps(peak, 1));
    half = _mm_max_ps(half, _mm_movehl_ps(half, half));
    half = _mm_max_ss(half, _mm_shuffle_ps(half, half, 1));
    const float amax = _mm_cvtss_f32(half);
    const __m256 inverse = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    __m256i q[4];
    __m256i sum = _mm256_setzero_si256();
    for (int i = 0; i < 4; ++i) {
      q[i] = _mm256_max_epi32(_mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[i], inverse)), top), bottom);
      sum = _mm256_add_epi32(sum, q[i]);
    }
    // int32 -> int8 (values fit, so saturation never bites); the packs interleave 128-bit lanes.
    const __m256i bytes = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])), order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a + b * kBlock), bytes);
    __m128i total = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    total = _mm_add_epi32(total, _mm_shuffle_epi32(total, 0x4E));
    total = _mm_add_epi32(total, _mm_shuffle_epi32(total, 0xB1));
    d[b] = amax / 127.0f;
    offset[b] = -128 * _mm_cvtsi128_si32(total);
  }
}

template <typename T>
void quantize_activations(const T* x, int64_t blocks, int8_t* a, float* d, int32_t* offset) {
  at::parallel_for(0, blocks, 4096, [&](int64_t begin, int64_t end) { quantize_blocks(x, begin, end, a, d, offset); });
}

struct DynamicProblem {
  const int8_t* a;        // [M, K]
  const float* d;         // [M, K/32]
  const int32_t* offset;  // [M, K/32]
  const uint32_t* w;      // [tiles, K/4, 64] lanes of q + 128
  const float* scales;
  float* y;  // [M, tiles * 64]
  int64_t M, K, tiles;
};

// R rows x P panels of one tile: w the first panel's lanes, scales its first channel's; a, d and
// offset at the first row; y [R, ldy] from the first panel's channel on. Up to 3 rows keep their
// outputs in registers; more rows keep them in L1 (`spilled`, updated once a block): their R * P
// block sums, the P lanes and a broadcast still fit in 32 registers (6 rows: 29), so a 4- to 6-token
// step reads each tile once. (A second pass over a tile comes from cache, but on a decode step, where
// the first pass waits on memory and hides the products of its rows, it adds all of its own: one
// pass for 4-6 rows measured ~0.5-0.9 ms less than two a SmolLM2 step.) A row's arithmetic is the
// same either way.
template <int R, int P>
VNNI_TARGET INLINE void dynamic_tile_rows(const uint32_t* w, const float* scales, const DynamicProblem& pr,
                                          int64_t row, float* y, int64_t ldy) {
  constexpr bool kSpilled = R > 3;
  const int64_t K = pr.K, blocks = K / kBlock;
  __m512 out[kSpilled ? 1 : R][P];
  alignas(64) float spilled[kSpilled ? R : 1][P][kPanel];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) {
      if constexpr (kSpilled) {
        _mm512_store_ps(spilled[r][p], _mm512_setzero_ps());
      } else {
        out[r][p] = _mm512_setzero_ps();
      }
    }
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i sum[R][P];
    for (int r = 0; r < R; ++r) {
      const __m512i start = _mm512_set1_epi32(pr.offset[(row + r) * blocks + b]);
      for (int p = 0; p < P; ++p) sum[r][p] = start;
    }
    const uint32_t* at = w + b * kBlockLanes * kTile;
    // Unrolled by hand's worth of pragmas: GCC leaves the loop over g rolled for 4+ rows and then
    // keeps the sums on the stack, storing every one after each product.
#pragma GCC unroll 8
    for (int g = 0; g < kBlockLanes; ++g) {
      __m512i lanes[P];
#pragma GCC unroll 4
      for (int p = 0; p < P; ++p) lanes[p] = _mm512_loadu_si512(at + g * kTile + p * kPanel);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        int32_t four;  // a[k .. k+3] of row r, broadcast to every lane
        std::memcpy(&four, pr.a + (row + r) * K + b * kBlock + g * 4, sizeof(four));
        const __m512i x = _mm512_set1_epi32(four);
#pragma GCC unroll 4
        for (int p = 0; p < P; ++p) sum[r][p] = _mm512_dpbusd_epi32(sum[r][p], lanes[p], x);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 d = _mm512_set1_ps(pr.d[(row + r) * blocks + b]);
      for (int p = 0; p < P; ++p) {
        if constexpr (kSpilled) {
          const __m512 acc = _mm512_load_ps(spilled[r][p]);
          _mm512_store_ps(spilled[r][p], _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[r][p]), d, acc));
        } else {
          out[r][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[r][p]), d, out[r][p]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) {
      __m512 total;
      if constexpr (kSpilled) {
        total = _mm512_load_ps(spilled[r][p]);
      } else {
        total = out[r][p];
      }
      _mm512_storeu_ps(y + r * ldy + p * kPanel, _mm512_mul_ps(total, _mm512_loadu_ps(scales + p * kPanel)));
    }
}

// Rows [row, row + R) of tile t, all four panels at once.
struct Int8Tile {
  static constexpr int kMaxRows = kMaxWideRows;
  template <int R>
  VNNI_TARGET static void run(const DynamicProblem& pr, int64_t row, int64_t t) {
    const int64_t ldy = pr.tiles * kTile;
    dynamic_tile_rows<R, kTile / kPanel>(pr.w + t * (pr.K / 4) * kTile, pr.scales + t * kTile, pr, row,
                                         pr.y + row * ldy + t * kTile, ldy);
  }
};

// Rows [row, row + rows) of tile t in one Tile::run<R> (rows <= R).
template <typename Tile, typename Problem, int R = Tile::kMaxRows>
INLINE void run_rows(const Problem& pr, int64_t row, int64_t rows, int64_t t) {
  if constexpr (R > 1) {
    if (rows < R) return run_rows<Tile, Problem, R - 1>(pr, row, rows, t);
  }
  Tile::template run<R>(pr, row, t);
}

// Tiles [begin, end), every row, in passes of up to Tile::kMaxRows rows: Tile::run<R>(problem, first
// row, tile) computes R rows of one tile. (No target of its own: each Tile::run has its ISA's.)
template <typename Tile, typename Problem>
INLINE void run_row_passes(const Problem& pr, int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) {
    for (int64_t row = 0; row < pr.M; row += Tile::kMaxRows) {
      run_rows<Tile>(pr, row, std::min<int64_t>(pr.M - row, Tile::kMaxRows), t);
    }
  }
}

VNNI_TARGET void dynamic_run_tiles(const DynamicProblem& pr, int64_t begin, int64_t end) {
  run_row_passes<Int8Tile>(pr, begin, end);
}

// --- int4 weights in groups of 32 (Q4_1: w = q * s + m, q in 0..15), int8 activations ---
//
// Layout: tiles of 32 output channels (two panels), [N/32, K/8, 32] int32 lanes, lane byte j = q[k + j]
// in its low nibble and q[k + 4 + j] in its high one; scales and minimums [N/32, K/32, 32] fp16. A
// group of the weight is a block of the activations, so y = sum over blocks of
// d * (s * sum(a * q) + m * sum(a)), sum(a * q) exact in int32 (q unsigned: no offset).

constexpr int kInt4Tile = 32;

struct Int4Problem {
  const int8_t* a;
  const float* d;
  const int32_t* offset;  // -128 * sum(a) per block
  const uint32_t* w;      // [tiles, K/8, 32]
  const uint16_t* scales;  // [tiles, K/32, 32] fp16
  const uint16_t* mins;
  float* y;  // [M, tiles * 32]
  int64_t M, K, tiles;
};

struct Int4Tile {
  static constexpr int kMaxRows = kMaxDynamicRows;
  template <int R>
  VNNI_TARGET static void run(const Int4Problem& pr, int64_t row, int64_t t) {
    constexpr int P = kInt4Tile / kPanel;
    const int64_t K = pr.K, blocks = K / kBlock, ldy = pr.tiles * kInt4Tile;
    const uint32_t* w = pr.w + t * (K / 8) * kInt4Tile;
    const uint16_t* scales = pr.scales + t * blocks * kInt4Tile;
    const uint16_t* mins = pr.mins + t * blocks * kInt4Tile;
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    __m512 out[R][P];
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < P; ++p) out[r][p] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      __m512i sum[R][P], sum_high[R][P];  // two chains a panel: half the wait on each product's latency
      for (int r = 0; r < R; ++r)
        for (int p = 0; p < P; ++p) sum[r][p] = sum_high[r][p] = _mm512_setzero_si512();
      for (int o = 0; o < kBlock / 8; ++o) {
        const uint32_t* at = w + (b * (kBlock / 8) + o) * kInt4Tile;
        __m512i low[P], high[P];
        for (int p = 0; p < P; ++p) {
          const __m512i lanes = _mm512_loadu_si512(at + p * kPanel);
          low[p] = _mm512_and_si512(lanes, nibble);
          high[p] = _mm512_and_si512(_mm512_srli_epi32(lanes, 4), nibble);
        }
        for (int r = 0; r < R; ++r) {
          int32_t first, second;  // a[k .. k+3] and a[k+4 .. k+7] of row r
          const int8_t* a = pr.a + (row + r) * K + b * kBlock + o * 8;
          std::memcpy(&first, a, sizeof(first));
          std::memcpy(&second, a + 4, sizeof(second));
          const __m512i x0 = _mm512_set1_epi32(first), x1 = _mm512_set1_epi32(second);
          for (int p = 0; p < P; ++p) {
            sum[r][p] = _mm512_dpbusd_epi32(sum[r][p], low[p], x0);
            sum_high[r][p] = _mm512_dpbusd_epi32(sum_high[r][p], high[p], x1);
          }
        }
      }
      __m512 s[P], m[P];
      for (int p = 0; p < P; ++p) {
        const int64_t at = b * kInt4Tile + p * kPanel;
        s[p] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + at)));
        m[p] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mins + at)));
      }
      for (int r = 0; r < R; ++r) {
        const int64_t at = (row + r) * blocks + b;
        const __m512 d = _mm512_set1_ps(pr.d[at]);
        const __m512 asum = _mm512_set1_ps(static_cast<float>(pr.offset[at] / -128));
        for (int p = 0; p < P; ++p) {
          const __m512i total = _mm512_add_epi32(sum[r][p], sum_high[r][p]);
          const __m512 block = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), s[p], _mm512_mul_ps(m[p], asum));
          out[r][p] = _mm512_fmadd_ps(block, d, out[r][p]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < P; ++p)
        _mm512_storeu_ps(pr.y + (row + r) * ldy + t * kInt4Tile + p * kPanel, out[r][p]);
  }
};

VNNI_TARGET void int4_run_tiles(const Int4Problem& pr, int64_t begin, int64_t end) {
  run_row_passes<Int4Tile>(pr, begin, end);
}

// --- The same two kernels on AVX2 (no VNNI): vpmaddubsw multiplies unsigned by signed bytes and
// adds neighbouring products to int16, vpmaddwd adds int16 pairs to int32. ---

#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
constexpr int kAvx2Panel = 8;  // output channels a 256-bit vector holds

// Two panels of 8 channels for R (1 or 2) rows: sums, outputs and operands fit in 16 registers.
// (Passes of up to 4 rows over one panel measured no faster: a row costs its products either way.)
struct Avx2Int8Tile {
  static constexpr int kMaxRows = 2;
  // q = byte ^ 0x80; |q| * (a with q's sign) = q * a, and a pair of those stays within int16
  // (|q| <= 128, |a| <= 127), so each block sum is the exact sum of q * a (no -128 * sum(a) offset).
  template <int R>
  AVX2_TARGET static void run(const DynamicProblem& pr, int64_t row, int64_t t) {
    constexpr int P = 2;
    const int64_t K = pr.K, blocks = K / kBlock, ldy = pr.tiles * kTile;
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80)), ones = _mm256_set1_epi16(1);
    for (int first = 0; first < kTile; first += P * kAvx2Panel) {
      const uint32_t* w = pr.w + t * (K / 4) * kTile + first;
      __m256 out[R][P];
      for (int r = 0; r < R; ++r)
        for (int p = 0; p < P; ++p) out[r][p] = _mm256_setzero_ps();
      for (int64_t b = 0; b < blocks; ++b) {
        __m256i sum[R][P];
        for (int r = 0; r < R; ++r)
          for (int p = 0; p < P; ++p) sum[r][p] = _mm256_setzero_si256();
        for (int g = 0; g < kBlockLanes; ++g) {
          __m256i q[P], magnitude[P];
          for (int p = 0; p < P; ++p) {
            const auto* at = reinterpret_cast<const __m256i*>(w + (b * kBlockLanes + g) * kTile + p * kAvx2Panel);
            q[p] = _mm256_xor_si256(_mm256_loadu_si256(at), flip);
            magnitude[p] = _mm256_abs_epi8(q[p]);
          }
          for (int r = 0; r < R; ++r) {
            int32_t four;  // a[k .. k+3] of row r, broadcast to every lane
            std::memcpy(&four, pr.a + (row + r) * K + b * kBlock + g * 4, sizeof(four));
            const __m256i x = _mm256_set1_epi32(four);
            for (int p = 0; p < P; ++p) {
              const __m256i pairs = _mm256_maddubs_epi16(magnitude[p], _mm256_sign_epi8(x, q[p]));
              sum[r][p] = _mm256_add_epi32(sum[r][p], _mm256_madd_epi16(pairs, ones));
            }
          }
        }
        for (int r = 0; r < R; ++r) {
          const __m256 d = _mm256_set1_ps(pr.d[(row + r) * blocks + b]);
          for (int p = 0; p < P; ++p) out[r][p] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r][p]), d, out[r][p]);
        }
      }
      for (int r = 0; r < R; ++r)
        for (int p = 0; p < P; ++p) {
          const __m256 scale = _mm256_loadu_ps(pr.scales + t * kTile + first + p * kAvx2Panel);
          float* y = pr.y + (row + r) * ldy + t * kTile + first + p * kAvx2Panel;
          _mm256_storeu_ps(y, _mm256_mul_ps(out[r][p], scale));
        }
    }
  }
};

// q in 0..15: a product pair is at most 2 * 15 * 127, so a block's 4 x 2 pairs add up in int16.
struct Avx2Int4Tile {
  static constexpr int kMaxRows = 2;
  template <int R>
  AVX2_TARGET static void run(const Int4Problem& pr, int64_t row, int64_t t) {
    constexpr int P = 2;
    const int64_t K = pr.K, blocks = K / kBlock, ldy = pr.tiles * kInt4Tile;
    const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    for (int first = 0; first < kInt4Tile; first += P * kAvx2Panel) {
      const uint32_t* w = pr.w + t * (K / 8) * kInt4Tile + first;
      const uint16_t* scales = pr.scales + t * blocks * kInt4Tile + first;
      const uint16_t* mins = pr.mins + t * blocks * kInt4Tile + first;
      __m256 out[R][P];
      for (int r = 0; r < R; ++r)
        for (int p = 0; p < P; ++p) out[r][p] = _mm256_setzero_ps();
      for (int64_t b = 0; b < blocks; ++b) {
        __m256i pairs[R][P];
        for (int r = 0; r < R; ++r)
          for (int p = 0; p < P; ++p) pairs[r][p] = _mm256_setzero_si256();
        for (int o = 0; o < kBlock / 8; ++o) {
          __m256i low[P], high[P];
          for (int p = 0; p < P; ++p) {
            const auto* at = reinterpret_cast<const __m256i*>(w + (b * (kBlock / 8) + o) * kInt4Tile + p * kAvx2Panel);
            const __m256i lanes = _mm256_loadu_si256(at);
            low[p] = _mm256_and_si256(lanes, nibble);
            high[p] = _mm256_and_si256(_mm256_srli_epi32(lanes, 4), nibble);
          }
          for (int r = 0; r < R; ++r) {
            int32_t first_four, second_four;  // a[k .. k+3] and a[k+4 .. k+7] of row r
            const int8_t* a = pr.a + (row + r) * K + b * kBlock + o * 8;
            std::memcpy(&first_four, a, sizeof(first_four));
            std::memcpy(&second_four, a + 4, sizeof(second_four));
            const __m256i x0 = _mm256_set1_epi32(first_four), x1 = _mm256_set1_epi32(second_four);
            for (int p = 0; p < P; ++p) {
              const __m256i both =
                  _mm256_add_epi16(_mm256_maddubs_epi16(low[p], x0), _mm256_maddubs_epi16(high[p], x1));
              pairs[r][p] = _mm256_add_epi16(pairs[r][p], both);
            }
          }
        }
        __m256 s[P], m[P];
        for (int p = 0; p < P; ++p) {
          const int64_t at = b * kInt4Tile + p * kAvx2Panel;
          s[p] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + at)));
          m[p] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mins + at)));
        }
        for (int r = 0; r < R; ++r) {
          const int64_t at = (row + r) * blocks + b;
          const __m256 d = _mm256_set1_ps(pr.d[at]);
          const __m256 asum = _mm256_set1_ps(static_cast<float>(pr.offset[at] / -128));
          for (int p = 0; p < P; ++p) {
            const __m256i total = _mm256_madd_epi16(pairs[r][p], ones);
            const __m256 block = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), s[p], _mm256_mul_ps(m[p], asum));
            out[r][p] = _mm256_fmadd_ps(block, d, out[r][p]);
          }
        }
      }
      for (int r = 0; r < R; ++r)
        for (int p = 0; p < P; ++p)
          _mm256_storeu_ps(pr.y + (row + r) * ldy + t * kInt4Tile + first + p * kAvx2Panel, out[r][p]);
    }
  }
};

AVX2_TARGET void avx2_dynamic_run_tiles(const DynamicProblem& pr, int64_t begin, int64_t end) {
  run_row_passes<Avx2Int8Tile>(pr, begin, end);
}

AVX2_TARGET void avx2_int4_run_tiles(const Int4Problem& pr, int64_t begin, int64_t end) {
  run_row_passes<Avx2Int4Tile>(pr, begin, end);
}

#undef AVX2_TARGET

bool avx2_supported() {
  static const bool supported = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return supported;
}

bool vnni_supported() {
  static const bool supported = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni");
  }();
  return supported;
}

#undef VNNI_TARGET

bool avx512_supported() {
  static const bool supported = [] {  // asked once, not at every call on the decode path
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
  }();
  return supported;
}

#undef INLINE
#undef AVX512_TARGET

}  // namespace packed

// Does this CPU run the int8-activation kernels with VNNI (AVX-512 with VNNI)?
bool int8_dynamic_supported() { return packed::avx512_supported() && packed::vnni_supported(); }

// Does this CPU run their AVX2 twins (AVX2, FMA and F16C)?
bool int8_dynamic_avx2_supported() { return packed::avx2_supported(); }

namespace {

// The int8-activation matmuls over raw rows: x [M, K] (T = float or bf16) quantized into a, d and
// offset (room for M * K, and M * K / 32 each), then y [M, padded] (fp32; padded: the tiles' width)
// against a packed weight (int8: kind 1, operands weight and scales; int4: kind 2, weight, scales
// and minimums), on the threads int8_dynamic_matmul and int4_dynamic_matmul use (they call these).
template <typename T>
void dynamic_matmul(int kind, const T* x, int64_t M, int64_t K, const torch::Tensor* operands, bool vnni, int8_t* a,
                    float* d, int32_t* offset, float* y) {
  using namespace packed;
  quantize_activations(x, M * (K / kBlock), a, d, offset);
  const int64_t tiles = operands[0].size(0);
  if (kind == 1) {
    const DynamicProblem pr{a, d, offset, reinterpret_cast<const uint32_t*>(operands[0].data_ptr<int32_t>()),
                            operands[1].data_ptr<float>(), y, M, K, tiles};
    at::parallel_for(0, tiles, std::max<int64_t>(1, (int64_t{1} << 18) / (K * kTile)), [&](int64_t begin, int64_t end) {
      vnni ? dynamic_run_tiles(pr, begin, end) : avx2_dynamic_run_tiles(pr, begin, end);
    });
    return;
  }
  const Int4Problem pr{a,
                       d,
                       offset,
                       reinterpret_cast<const uint32_t*>(operands[0].data_ptr<int32_t>()),
                       reinterpret_cast<const uint16_t*>(operands[1].data_ptr<at::Half>()),
                       reinterpret_cast<const uint16_t*>(operands[2].data_ptr<at::Half>()),
                       y,
                       M,
                       K,
                       tiles};
  at::parallel_for(0, tiles, std::max<int64_t>(1, (int64_t{1} << 15) / (K * kInt4Tile / 2)),
                   [&](int64_t begin, int64_t end) {
                     vnni ? int4_run_tiles(pr, begin, end) : avx2_int4_run_tiles(pr, begin, end);
                   });
}

// The columns of y a packed weight of kind 1 (int8) or 2 (int4) computes.
int64_t dynamic_width(int kind, const torch::Tensor& weight) {
  return weight.size(0) * (kind == 1 ? packed::kTile : packed::kInt4Tile);
}

// Does this CPU run the int8-activation kernel asked for (`vnni`: the AVX-512 VNNI one, else its AVX2 twin)?
void check_dynamic_kernel(bool vnni) {
  if (vnni) {
    TORCH_CHECK(int8_dynamic_supported(), "vnni=True needs AVX-512 with VNNI (avx512f/bw/vl/dq, avx512vnni)");
  } else {
    TORCH_CHECK(int8_dynamic_avx2_supported(), "vnni=False needs AVX2, FMA and F16C");
  }
}

// x [..., K] checked for the int8-activation kernels, contiguous.
torch::Tensor checked_activations(const torch::Tensor& x, bool vnni) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be an fp32 or bf16 CPU tensor");
  check_dynamic_kernel(vnni);
  TORCH_CHECK(x.size(-1) % packed::kBlock == 0, "int8 activations need in_features a multiple of 32, got ",
              x.size(-1));
  // Read in place (bf16 too: converting it first cost an aten call a matmul, ~1 ms a SmolLM2 step).
  return x.contiguous();
}

// Room for x [M, K] quantized: the int8 values, then each block's scale and offset.
struct QuantizedRows {
  std::vector<int32_t> buffer;
  int8_t* a;
  float* d;
  int32_t* offset;
  QuantizedRows(int64_t M, int64_t K) : buffer(M * K / 4 + 2 * M * (K / packed::kBlock)) {
    a = reinterpret_cast<int8_t*>(buffer.data());
    d = reinterpret_cast<float*>(buffer.data() + M * K / 4);
    offset = buffer.data() + M * K / 4 + M * (K / packed::kBlock);
  }
};

// Is `weight` int8 tiles [N/64, K/4, 64] with fp32 scales [N/64 * 64] for out_features <= N?
void check_int8_tiles(const torch::Tensor& weight, const torch::Tensor& scales, int64_t K, int64_t out_features) {
  using packed::kTile;
  const int64_t tiles = weight.size(0);
  TORCH_CHECK(weight.scalar_type() == at::kInt && weight.is_contiguous() && weight.dim() == 3 &&
                  weight.size(1) * 4 == K && weight.size(2) == kTile,
              "int8 weight must be packed tiles [N/64, K/4, 64] of int32 lanes (K a multiple of 4)");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == tiles * kTile,
              "scales must be fp32 [N/64 * 64]");
  TORCH_CHECK(out_features <= tiles * kTile, "out_features exceeds the packed tiles");
}

// Is `weight` int4 tiles [N/32, K/8, 32] with fp16 scales and minimums [N/32, K/32, 32] for
// out_features <= N?
void check_int4_tiles(const torch::Tensor& weight, const torch::Tensor& scales, const torch::Tensor& mins, int64_t K,
                      int64_t out_features) {
  using packed::kBlock;
  using packed::kInt4Tile;
  const int64_t tiles = weight.size(0);
  TORCH_CHECK(weight.scalar_type() == at::kInt && weight.is_contiguous() && weight.dim() == 3 &&
                  weight.size(1) * 8 == K && weight.size(2) == kInt4Tile,
              "int4 weight must be packed tiles [N/32, K/8, 32] of int32 lanes");
  for (const auto* t : {&scales, &mins})
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->is_contiguous() && t->numel() == tiles * (K / kBlock) * kInt4Tile,
                "int4 scales and minimums must be fp16 [N/32, K/32, 32]");
  TORCH_CHECK(out_features <= tiles * kInt4Tile, "out_features exceeds the packed tiles");
}

// fp32 y [M, padded] -> bf16 out [M, n], rounded to nearest even as torch rounds, eight lanes at a
// time: one pass, not two aten calls (narrow and to: ~4 us each, 120 a SmolLM2 step). Lanes is the
// step kernels' (step_kernels.cpp, earlier in this translation unit).
__attribute__((target("avx2"))) void round_rows_to_bf16(const float* y, int64_t M, int64_t padded, int64_t n,
                                                         at::BFloat16* out) {
  for (int64_t m = 0; m < M; ++m) {
    const float* row = y + m * padded;
    at::BFloat16* o = out + m * n;
    int64_t i = 0;
    for (; i + Lanes<v8f>::kWidth <= n; i += Lanes<v8f>::kWidth) Lanes<v8f>::store(o + i, Lanes<v8f>::load(row + i));
    for (; i < n; ++i) o[i] = static_cast<at::BFloat16>(row[i]);
  }
}

// y [M, padded] (fp32) -> [..., out_features] in x's dtype.
torch::Tensor shaped_like(const torch::Tensor& y, const torch::Tensor& x, int64_t out_features) {
  auto sizes = x.sizes().vec();
  sizes.back() = out_features;
  if (x.scalar_type() == at::kBFloat16 && packed::avx2_supported()) {
    auto out = torch::empty(sizes, x.options());
    round_rows_to_bf16(y.data_ptr<float>(), y.size(0), y.size(1), out_features, out.data_ptr<at::BFloat16>());
    return out;
  }
  auto out = out_features == y.size(1) ? y : y.narrow(1, 0, out_features);
  return out.to(x.scalar_type()).reshape(sizes);
}

// A packed weight of kind 1 (int8) or 2 (int4) over x [..., K]: [..., out_features] in x's dtype.
// `xc`: x as checked_activations gives it back.
torch::Tensor dynamic_matmul_rows(int kind, const torch::Tensor& x, const torch::Tensor& xc, const torch::Tensor* operands,
                                  int64_t out_features, bool vnni) {
  const int64_t K = xc.size(-1), M = xc.numel() / K;
  QuantizedRows rows(M, K);
  auto y = torch::empty({M, dynamic_width(kind, operands[0])}, xc.options().dtype(at::kFloat));
  float_or_bf16(xc.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    dynamic_matmul(kind, xc.data_ptr<T>(), M, K, operands, vnni, rows.a, rows.d, rows.offset, y.data_ptr<float>());
  });
  return shaped_like(y, x, out_features);
}

}  // namespace

// x [..., K] (fp32 or bf16) against a packed int8 weight; [..., out_features] in x's dtype.
torch::Tensor int8_matmul(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scales,
                          int64_t out_features) {
  using namespace packed;
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be an fp32 or bf16 CPU tensor");
  TORCH_CHECK(avx512_supported(), "this kernel needs AVX-512 (avx512f/bw/vl/dq and fma)");
  const int64_t K = x.size(-1), tiles = weight.size(0);
  check_int8_tiles(weight, scales, K, out_features);
  const auto xf = x.reshape({-1, K}).to(at::kFloat).contiguous();
  auto y = torch::empty({xf.size(0), tiles * kTile}, xf.options());
  const Problem pr{xf.data_ptr<float>(), reinterpret_cast<const uint32_t*>(weight.data_ptr<int32_t>()),
                   scales.data_ptr<float>(), y.data_ptr<float>(), xf.size(0), K, tiles};
  // Small weights run on one thread: waking the pool costs more than it saves.
  const int64_t bytes_per_tile = K * kTile;
  at::parallel_for(0, tiles, std::max<int64_t>(1, (int64_t{1} << 16) / bytes_per_tile),
                   [&](int64_t begin, int64_t end) { run_tiles(pr, begin, end); });
  return shaped_like(y, x, out_features);
}


// x [..., K] (fp32 or bf16, K a multiple of 32) against a packed weight of q + 128 bytes, activations
// quantized to int8 in blocks of 32 on the fly; [..., out_features] in x's dtype. `vnni`: the AVX-512
// VNNI kernel, else its AVX2 twin (the same results).
torch::Tensor int8_dynamic_matmul(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scales,
                                  int64_t out_features, bool vnni) {
  const auto xc = checked_activations(x, vnni);  // x first
  check_int8_tiles(weight, scales, x.size(-1), out_features);
  const torch::Tensor operands[] = {weight, scales};
  return dynamic_matmul_rows(1, x, xc, operands, out_features, vnni);
}

// x [..., K] (fp32 or bf16) against packed int4 groups of 32 (Q4_1), activations quantized to int8
// in blocks of 32 on the fly; [..., out_features] in x's dtype. `vnni` as for int8_dynamic_matmul.
torch::Tensor int4_dynamic_matmul(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scales,
                                  const torch::Tensor& mins, int64_t out_features, bool vnni) {
  const auto xc = checked_activations(x, vnni);  // x first
  check_int4_tiles(weight, scales, mins, x.size(-1), out_features);
  const torch::Tensor operands[] = {weight, scales, mins};
  return dynamic_matmul_rows(2, x, xc, operands, out_features, vnni);
}
