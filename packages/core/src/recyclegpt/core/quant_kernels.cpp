// Weight-only int8 and int4 matmuls for x86 CPUs with AVX-512, built for decode steps: a few
// activation rows against weights that are read once for all of them. (An AVX2 variant of the
// same code was measured slower than torch's own kernels for one row, so AVX2 CPUs run torch's.)
//
// torch's own int8/int4 CPU kernels compute rows in blocks of four and re-read the weight for each
// block, so a 5-token draft verification costs ~2.5x a 1-token step. Here every pass over a
// weight panel serves up to kMaxRows rows, and each output is one fixed-order sum over k in fp32
// (fused multiply-adds, k ascending; int4 per group of 32, then scaled), whatever the number of
// rows computed with it: a k-token step gives exactly what k one-token steps give.
//
// Packed layouts (recyclegpt.core.quant_kernels makes them): tiles of 64 output channels, each
// one contiguous run of 32-bit lanes, 64 lanes (one per channel) for every 4 (int8) or 8 (int4)
// values of k, so a pass over a tile is one sequential read.
//   int8: weight [N/64, K/4, 64] int32, byte j of a lane = q[k + j]; scales [N/64 * 64] fp32.
//         y = scale * sum_k x[k] * q[k]
//   int4: weight [N/64, K/8, 64] int32, bits 4j..4j+3 of a lane = q[k + j] (0..15);
//         scale_min [N/64, K/32, 2, 64] fp32.  y = sum_g scale_g * sum_k x[k] * q[k] + min_g * sum_k x[k]
// Activations come in fp32 or bf16, are computed in fp32, and go out in their own dtype.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace packed {  // named: the step kernels' file shares this translation unit

constexpr int kPanel = 16;    // output channels a panel: one AVX-512 vector
constexpr int kTile = 64;     // output channels a tile: four panels, interleaved in one stream
constexpr int kGroup = 32;    // int4 weights sharing a scale and a minimum
constexpr int kMaxRows = 8;   // rows a pass over the weight serves
constexpr int kPrefetch = 4;  // lane indices (256 bytes each) to prefetch ahead

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i32 __attribute__((vector_size(64)));
typedef uint32_t v16u32 __attribute__((vector_size(64)));

#define INLINE inline __attribute__((always_inline))
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"), optimize("fp-contract=fast")))

// Integer vectors as wide as V. Weights travel packed in 32-bit lanes (four int8 or eight int4
// values a lane) and are unpacked with shifts: GCC turns these vector-extension shifts into single
// instructions, where a byte-to-float conversion of a vector becomes a loop of scalar conversions.
template <typename V>
struct Ints;
template <>
struct Ints<v16f> {
  using Signed = v16i32;
  using Unsigned = v16u32;
};

template <typename V>
constexpr int lanes() {
  return sizeof(V) / sizeof(float);
}

template <typename T>
INLINE T load(const void* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

template <typename V>
INLINE void store(float* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// Byte j (0..3) of every lane, sign-extended, as floats.
template <typename V, int J>
INLINE V int8_of(typename Ints<V>::Unsigned lanes_) {
  using S = typename Ints<V>::Signed;
  return __builtin_convertvector(reinterpret_cast<S>(lanes_ << (24 - 8 * J)) >> 24, V);
}

// Nibble j (0..7) of every lane as floats, looked up in a 16-entry table: one vpermps, which
// reads only the low 4 bits of each index, so no masking.
template <typename V, int J>
INLINE V int4_of(typename Ints<V>::Unsigned lanes_, V table) {
  return __builtin_shuffle(table, reinterpret_cast<typename Ints<V>::Signed>(lanes_ >> (4 * J)));
}

template <typename V>
INLINE V nibble_table() {
  V table;
  for (int i = 0; i < lanes<V>(); ++i) table[i] = static_cast<float>(i);
  return table;
}

// acc[r][p][s] += x[r][k + j] * w[p][s] over rows and panels, for each j of a packed lane.
template <typename V, int R, int P, int J, bool Int4>
INLINE void accumulate(V (&acc)[R][P][kPanel / lanes<V>()],
                       const typename Ints<V>::Unsigned (&packed)[P][kPanel / lanes<V>()], const float* x,
                       int64_t K, int64_t k) {
  constexpr int S = kPanel / lanes<V>();
  V w[P][S];
  for (int p = 0; p < P; ++p)
    for (int s = 0; s < S; ++s) {
      if constexpr (Int4) {
        w[p][s] = int4_of<V, J>(packed[p][s], nibble_table<V>());
      } else {
        w[p][s] = int8_of<V, J>(packed[p][s]);
      }
    }
  for (int r = 0; r < R; ++r) {
    const float xv = x[r * K + k + J];
    for (int p = 0; p < P; ++p)
      for (int s = 0; s < S; ++s) acc[r][p][s] += xv * w[p][s];
  }
  if constexpr (J + 1 < (Int4 ? 8 : 4)) accumulate<V, R, P, J + 1, Int4>(acc, packed, x, K, k);
}

// The packed lanes of panels [p, p + P) of a tile at lane index `index` (64 lanes an index).
template <typename V, int P>
INLINE void load_lanes(typename Ints<V>::Unsigned (&packed)[P][kPanel / lanes<V>()], const uint32_t* w,
                       int64_t index) {
  constexpr int L = lanes<V>(), S = kPanel / L;
  __builtin_prefetch(w + (index + kPrefetch) * kTile);
  for (int p = 0; p < P; ++p)
    for (int s = 0; s < S; ++s)
      packed[p][s] = load<typename Ints<V>::Unsigned>(w + index * kTile + p * kPanel + s * L);
}

// R rows x P panels of int8 weights: `w` the first panel's lanes in a tile ([K/4, 64] lanes of
// four bytes, k ascending), `scales` its first channel's.
template <typename V, int R, int P>
INLINE void int8_tile(const uint32_t* w, const float* scales, const float* x, int64_t K, float* y, int64_t ldy) {
  constexpr int L = lanes<V>(), S = kPanel / L;
  V acc[R][P][S];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p)
      for (int s = 0; s < S; ++s) acc[r][p][s] = V{};
  for (int64_t k = 0; k < K; k += 4) {
    typename Ints<V>::Unsigned packed[P][S];
    load_lanes<V, P>(packed, w, k / 4);
    accumulate<V, R, P, 0, false>(acc, packed, x, K, k);
  }
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p)
      for (int s = 0; s < S; ++s)
        store(y + r * ldy + p * kPanel + s * L, acc[r][p][s] * load<V>(scales + p * kPanel + s * L));
}

// R rows x P panels of int4 weights: `w` the first panel's lanes in a tile ([K/8, 64] lanes of
// eight nibbles, k ascending), `scale_min` its first channel's ([K/32, 2, 64]); xsum [R, K/32]
// holds each row's sum over each group.
template <typename V, int R, int P>
INLINE void int4_tile(const uint32_t* w, const float* scale_min, const float* x, const float* xsum, int64_t K,
                      float* y, int64_t ldy) {
  constexpr int L = lanes<V>(), S = kPanel / L;
  const int64_t groups = K / kGroup;
  V acc[R][P][S];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p)
      for (int s = 0; s < S; ++s) acc[r][p][s] = V{};
  for (int64_t g = 0; g < groups; ++g) {
    V part[R][P][S];
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < P; ++p)
        for (int s = 0; s < S; ++s) part[r][p][s] = V{};
    for (int64_t k = g * kGroup; k < (g + 1) * kGroup; k += 8) {
      typename Ints<V>::Unsigned packed[P][S];
      load_lanes<V, P>(packed, w, k / 8);
      accumulate<V, R, P, 0, true>(part, packed, x, K, k);
    }
    for (int p = 0; p < P; ++p)
      for (int s = 0; s < S; ++s) {
        const float* sm = scale_min + g * 2 * kTile + p * kPanel + s * L;
        const V scale = load<V>(sm), minimum = load<V>(sm + kTile);
        for (int r = 0; r < R; ++r) {
          acc[r][p][s] += part[r][p][s] * scale;
          acc[r][p][s] += xsum[r * groups + g] * minimum;
        }
      }
  }
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p)
      for (int s = 0; s < S; ++s) store(y + r * ldy + p * kPanel + s * L, acc[r][p][s]);
}

// Panels of a tile processed together for R rows (4, 2 or 1): enough independent sums to hide
// the FMA latency when rows are few, few enough that the sums stay in registers. Results do not
// depend on it.
constexpr int panels_for(int rows) {
  return rows <= 2 ? 4 : rows <= 4 ? 2 : 1;
}

struct Problem {
  const float* x;     // [M, K] fp32
  const float* xsum;  // int4: [M, K/32]
  const uint32_t* w;
  const float* scales;  // int8: [tiles * 64]; int4: scale_min [tiles, K/32, 2, 64]
  float* y;             // [M, tiles * 64]
  int64_t M, K, tiles;
};

// Rows [row, row + R) of tile t, P panels at a time. (No lambdas on this path: a lambda is a
// function of its own, compiled without its caller's target attributes.)
template <typename V, int R, bool Int4>
INLINE void run_tile(const Problem& pr, int64_t row, int64_t t) {
  constexpr int P = panels_for(R);
  const int64_t ldy = pr.tiles * kTile, K = pr.K, groups = K / kGroup;
  const float* x = pr.x + row * K;
  for (int p = 0; p < kTile / kPanel; p += P) {
    float* y = pr.y + row * ldy + t * kTile + p * kPanel;
    if constexpr (Int4) {
      const uint32_t* w = pr.w + t * (K / 8) * kTile + p * kPanel;
      const float* sm = pr.scales + t * groups * 2 * kTile + p * kPanel;
      int4_tile<V, R, P>(w, sm, x, pr.xsum + row * groups, K, y, ldy);
    } else {
      const uint32_t* w = pr.w + t * (K / 4) * kTile + p * kPanel;
      int8_tile<V, R, P>(w, pr.scales + t * kTile + p * kPanel, x, K, y, ldy);
    }
  }
}

// Tiles [begin, end), every row: rows in passes of up to kMaxRows over each tile.
template <typename V, bool Int4>
INLINE void run_tiles(const Problem& pr, int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) {
    for (int64_t row = 0; row < pr.M;) {
      const int64_t rows = std::min<int64_t>(pr.M - row, kMaxRows);
      switch (rows) {
        case 1: run_tile<V, 1, Int4>(pr, row, t); break;
        case 2: run_tile<V, 2, Int4>(pr, row, t); break;
        case 3: run_tile<V, 3, Int4>(pr, row, t); break;
        case 4: run_tile<V, 4, Int4>(pr, row, t); break;
        case 5: run_tile<V, 5, Int4>(pr, row, t); break;
        case 6: run_tile<V, 6, Int4>(pr, row, t); break;
        case 7: run_tile<V, 7, Int4>(pr, row, t); break;
        default: run_tile<V, 8, Int4>(pr, row, t); break;
      }
      row += rows;
    }
  }
}

AVX512_TARGET void int8_avx512(const Problem& pr, int64_t b, int64_t e) { run_tiles<v16f, false>(pr, b, e); }
AVX512_TARGET void int4_avx512(const Problem& pr, int64_t b, int64_t e) { run_tiles<v16f, true>(pr, b, e); }

bool avx512_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
}

// x [..., K] (fp32 or bf16) against a packed weight of `tiles` tiles; [..., out_features].
torch::Tensor packed_matmul(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scales,
                            int64_t out_features, bool int4) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be an fp32 or bf16 CPU tensor");
  TORCH_CHECK(avx512_supported(), "these kernels need AVX-512 (avx512f/bw/vl/dq and fma)");
  TORCH_CHECK(weight.is_contiguous() && scales.is_contiguous() && scales.scalar_type() == at::kFloat,
              "weight and scales must be contiguous, scales fp32");
  TORCH_CHECK(weight.scalar_type() == at::kInt && weight.dim() == 3 && weight.size(2) == kTile,
              "weight must be packed tiles [N/64, K/4 or K/8, 64] of int32 lanes");
  const int64_t K = x.size(-1), tiles = weight.size(0), groups = K / kGroup;
  TORCH_CHECK(out_features <= tiles * kTile, "out_features exceeds the packed tiles");
  if (int4) {
    TORCH_CHECK(K % kGroup == 0 && weight.size(1) * 8 == K && scales.numel() == tiles * groups * 2 * kTile,
                "int4 weight must be [N/64, K/8, 64] with scale_min [N/64, K/32, 2, 64] (K a multiple of 32)");
  } else {
    TORCH_CHECK(K % 4 == 0 && weight.size(1) * 4 == K && scales.numel() == tiles * kTile,
                "int8 weight must be [N/64, K/4, 64] with scales [N/64 * 64] (K a multiple of 4)");
  }
  const auto xf = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = xf.size(0);
  torch::Tensor xsum;
  if (int4) {  // each row's sum over each group, k ascending
    xsum = torch::empty({M, groups}, xf.options());
    const float* xp = xf.data_ptr<float>();
    float* sp = xsum.data_ptr<float>();
    for (int64_t i = 0; i < M * groups; ++i) {
      float total = 0.f;
      for (int j = 0; j < kGroup; ++j) total += xp[i * kGroup + j];
      sp[i] = total;
    }
  }
  auto y = torch::empty({M, tiles * kTile}, xf.options());
  const Problem pr{xf.data_ptr<float>(), int4 ? xsum.data_ptr<float>() : nullptr,
                   reinterpret_cast<const uint32_t*>(weight.data_ptr<int32_t>()), scales.data_ptr<float>(),
                   y.data_ptr<float>(), M, K, tiles};
  auto body = [&](int64_t b, int64_t e) { int4 ? int4_avx512(pr, b, e) : int8_avx512(pr, b, e); };
  // Small weights run on one thread: waking the pool costs more than it saves.
  const int64_t bytes_per_tile = weight.size(1) * kTile * 4;
  at::parallel_for(0, tiles, std::max<int64_t>(1, (int64_t{1} << 16) / bytes_per_tile), body);
  auto out = out_features == tiles * kTile ? y : y.narrow(1, 0, out_features);
  auto sizes = x.sizes().vec();
  sizes.back() = out_features;
  return out.to(x.scalar_type()).reshape(sizes);
}

}  // namespace packed

torch::Tensor int8_matmul(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scales,
                          int64_t out_features) {
  return packed::packed_matmul(x, weight, scales, out_features, false);
}

torch::Tensor int4_matmul(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scale_min,
                          int64_t out_features) {
  return packed::packed_matmul(x, weight, scale_min, out_features, true);
}
