// fp32 matmul for decode steps on AVX2 CPUs: y = x @ w.T for a few rows x [M, K] against an
// nn.Linear weight w [N, K] in its own layout (no packed copy).
//
// Why: torch's fp32 matmul (MKL) on an AVX2 EPYC costs about twice as much for 2 rows as for 1
// (measured on a Zen 3: 576 -> 1536, 82 us for 1 row, 173 for 2), so a k-token step cost k times a
// 1-token step and recycling gained nothing. Here one pass over the weight serves up to six rows.
//
// Every output is the same fixed-order sum whatever the rows and channels computed beside it: eight
// lane sums over k (lane j takes k = j, j + 8, ... ascending, one fused multiply-add each), then
// ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)), then the k % 8 tail in order. So a row's
// result never depends on how many rows came with it: a k-token step gives exactly what k
// one-token steps give, and a batched row what a lone one gives.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include <immintrin.h>

namespace dense {  // named: the other kernels' files share this translation unit

#define DENSE_INLINE inline __attribute__((always_inline))
#define DENSE_AVX2 __attribute__((target("avx2,fma")))

constexpr int kLanes = 8;    // floats in one AVX2 vector
constexpr int kMaxRows = 6;  // rows one pass over the weight serves (more pass again, from L2)

// Channels computed together for R rows: enough independent sums to hide the FMA latency when
// rows are few, few enough that the sums stay in registers. Results do not depend on it.
constexpr int channels_for(int rows) { return rows == 1 ? 8 : rows == 2 ? 4 : rows == 3 ? 3 : 2; }

DENSE_AVX2 DENSE_INLINE float lane_sum(__m256 v) {
  alignas(32) float l[kLanes];
  _mm256_store_ps(l, v);
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

// lane_sum of four vectors at once, in the same order (so the same bits): hadd pairs lanes within
// each 128-bit half, twice, then the two halves add.
DENSE_AVX2 DENSE_INLINE __m128 lane_sums4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps(pairs, 1));
}

// y[r * ldy + c] = x[r] . w[c] for R rows and C channels. With two rows or more, the ``ahead``
// weight rows that follow these C (the next block's) are fetched into the cache meanwhile, one
// cache line of each per 16 floats: each weight load then feeds several multiply-adds, and the
// loads alone no longer keep the memory stream ahead (measured on a Zen 3 EPYC with weights from
// memory: 5 rows 30-40% faster, 2 rows 10-15%; one row, bound by the weight stream, unchanged).
template <int R, int C>
DENSE_AVX2 DENSE_INLINE void dot_block(const float* x, int64_t K, const float* w, float* y, int64_t ldy,
                                       int ahead) {
  constexpr int kSums = R * C;
  __m256 acc[kSums];
  for (int i = 0; i < kSums; ++i) acc[i] = _mm256_setzero_ps();
  const int64_t body = K - K % kLanes;
  for (int64_t k = 0; k < body; k += kLanes) {
    if (R >= 2 && k % 16 == 0)
      for (int c = 0; c < ahead; ++c) _mm_prefetch(reinterpret_cast<const char*>(w + (C + c) * K + k), _MM_HINT_T0);
    __m256 xs[R];
    for (int r = 0; r < R; ++r) xs[r] = _mm256_loadu_ps(x + r * K + k);
    for (int c = 0; c < C; ++c) {
      const __m256 wv = _mm256_loadu_ps(w + c * K + k);
      for (int r = 0; r < R; ++r) acc[r * C + c] = _mm256_fmadd_ps(xs[r], wv, acc[r * C + c]);
    }
  }
  alignas(16) float sums[kSums + 3];
  int i = 0;
  for (; i + 4 <= kSums; i += 4) _mm_store_ps(sums + i, lane_sums4(acc[i], acc[i + 1], acc[i + 2], acc[i + 3]));
  for (; i < kSums; ++i) sums[i] = lane_sum(acc[i]);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float sum = sums[r * C + c];
      for (int64_t k = body; k < K; ++k) sum = __builtin_fmaf(x[r * K + k], w[c * K + k], sum);
      y[r * ldy + c] = sum;
    }
}

// Channels [begin, end) for rows [row, row + R), C at a time, the rest one by one; weight rows
// before ``limit`` (the end of this thread's channels) are fetched ahead.
template <int R>
DENSE_AVX2 void rows_channels(const float* x, int64_t K, const float* w, float* y, int64_t N, int64_t row,
                              int64_t begin, int64_t end, int64_t limit) {
  constexpr int C = channels_for(R);
  const float* xr = x + row * K;
  float* yr = y + row * N;
  int64_t n = begin;
  for (; n + C <= end; n += C)
    dot_block<R, C>(xr, K, w + n * K, yr + n, N, static_cast<int>(std::min<int64_t>(C, limit - n - C)));
  for (; n < end; ++n) dot_block<R, 1>(xr, K, w + n * K, yr + n, N, 0);
}

DENSE_AVX2 void rows_channels(int rows, const float* x, int64_t K, const float* w, float* y, int64_t N,
                              int64_t row, int64_t begin, int64_t end, int64_t limit) {
  switch (rows) {
    case 1: return rows_channels<1>(x, K, w, y, N, row, begin, end, limit);
    case 2: return rows_channels<2>(x, K, w, y, N, row, begin, end, limit);
    case 3: return rows_channels<3>(x, K, w, y, N, row, begin, end, limit);
    case 4: return rows_channels<4>(x, K, w, y, N, row, begin, end, limit);
    case 5: return rows_channels<5>(x, K, w, y, N, row, begin, end, limit);
    default: return rows_channels<6>(x, K, w, y, N, row, begin, end, limit);
  }
}

// Channel blocks outermost: a block's weight rows (a few KB) stay in L1 while every row block
// passes over them.
constexpr int64_t kChannelBlock = 32;

DENSE_AVX2 void run_channels(const float* x, int64_t M, int64_t K, const float* w, float* y, int64_t N,
                             int64_t begin, int64_t end) {
  for (int64_t n = begin; n < end; n += kChannelBlock) {
    const int64_t stop = std::min(end, n + kChannelBlock);
    for (int64_t row = 0; row < M; row += kMaxRows)
      rows_channels(static_cast<int>(std::min<int64_t>(kMaxRows, M - row)), x, K, w, y, N, row, n, stop, end);
  }
}

// y [M, N] = x [M, K] @ w [N, K].T over raw rows (float_matmul's arithmetic, which it calls).
void matmul(const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* y) {
  // Two threads paid from ~50k multiply-adds on (a Zen 3 EPYC, 1-5 rows); tiny products stay on one.
  const int64_t grain = std::max<int64_t>(8, (int64_t{1} << 14) / std::max<int64_t>(1, K * M));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) { run_channels(x, M, K, w, y, N, begin, end); });
}

bool supported() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
}

#undef DENSE_INLINE
#undef DENSE_AVX2

}  // namespace dense

bool float_matmul_supported() { return dense::supported(); }

// x [..., K] fp32 against weight [N, K] fp32; [..., N] fp32.
torch::Tensor float_matmul(const torch::Tensor& x, const torch::Tensor& weight) {
  TORCH_CHECK(dense::supported(), "float_matmul needs AVX2 and FMA");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "x must be an fp32 CPU tensor");
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.dim() == 2,
              "weight must be an fp32 CPU matrix [N, K]");
  const int64_t K = x.size(-1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "x has ", K, " columns, the weight ", weight.size(1));
  const auto flat = x.reshape({-1, K}).contiguous();
  const int64_t M = flat.size(0);
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto y = torch::empty({M, N}, flat.options());
  const float* xp = flat.data_ptr<float>();
  const auto w = weight.contiguous();
  const float* wp = w.data_ptr<float>();
  dense::matmul(xp, M, K, wp, N, y.data_ptr<float>());
  return y.view(sizes);
}
