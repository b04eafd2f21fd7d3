// Weight-only int8 matmul for x86 CPUs with AVX-512, built for decode steps: a few activation rows
// against a weight that is read once for all of them.
//
// Each pass over a weight tile serves up to kMaxRows rows, and each output is one fixed-order sum
// over k in fp32 (fused multiply-adds, k ascending, then scaled), whatever the number of rows
// computed with it: a k-token step gives exactly what k one-token steps give.
//
// Packed layout (recyclegpt.core.quant_kernels makes it): tiles of 64 output channels, each one
// contiguous run of 32-bit lanes, 64 lanes (one per channel) for every 4 values of k, so a pass
// over a tile is one sequential read. weight [N/64, K/4, 64] int32, byte j of a lane = q[k + j];
// scales [N/64 * 64] fp32; y = scale * sum_k x[k] * q[k].
// Activations come in fp32 or bf16, are computed in fp32, and go out in their own dtype.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

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

// x [..., K] (fp32 or bf16) against a packed int8 weight; [..., out_features] in x's dtype.
torch::Tensor int8_matmul(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scales,
                          int64_t out_features) {
  using namespace packed;
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be an fp32 or bf16 CPU tensor");
  TORCH_CHECK(avx512_supported(), "this kernel needs AVX-512 (avx512f/bw/vl/dq and fma)");
  const int64_t K = x.size(-1), tiles = weight.size(0);
  TORCH_CHECK(weight.scalar_type() == at::kInt && weight.is_contiguous() && weight.dim() == 3 &&
                  weight.size(1) * 4 == K && weight.size(2) == kTile,
              "int8 weight must be packed tiles [N/64, K/4, 64] of int32 lanes (K a multiple of 4)");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == tiles * kTile,
              "scales must be fp32 [N/64 * 64]");
  TORCH_CHECK(out_features <= tiles * kTile, "out_features exceeds the packed tiles");
  const auto xf = x.reshape({-1, K}).to(at::kFloat).contiguous();
  auto y = torch::empty({xf.size(0), tiles * kTile}, xf.options());
  const Problem pr{xf.data_ptr<float>(), reinterpret_cast<const uint32_t*>(weight.data_ptr<int32_t>()),
                   scales.data_ptr<float>(), y.data_ptr<float>(), xf.size(0), K, tiles};
  // Small weights run on one thread: waking the pool costs more than it saves.
  const int64_t bytes_per_tile = K * kTile;
  at::parallel_for(0, tiles, std::max<int64_t>(1, (int64_t{1} << 16) / bytes_per_tile),
                   [&](int64_t begin, int64_t end) { run_tiles(pr, begin, end); });
  auto out = out_features == tiles * kTile ? y : y.narrow(1, 0, out_features);
  auto sizes = x.sizes().vec();
  sizes.back() = out_features;
  return out.to(x.scalar_type()).reshape(sizes);
}
