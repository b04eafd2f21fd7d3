// Fused CPU kernels for a decoder layer's small operators during decoding (a few tokens a step).
//
// A decode step of a small model on a CPU is per-operator overhead: eager PyTorch spends ~150 us a
// SmolLM2 layer on ~160 small operators around its four matmuls. These kernels do the same
// arithmetic in four calls a layer (built by recyclegpt.core.step_kernels). Every row (token) is
// computed on its own, in a fixed order, so a row's result never depends on how many rows come
// with it: a k-token verification step gives what k one-token steps give. In bf16 each kernel
// rounds where the eager layer rounds (transformers' LlamaRMSNorm: normalise in fp32, round, scale).
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

#define INLINE inline __attribute__((always_inline))
// The AVX2 instantiations of the kernels below (picked at run time where the CPU has AVX2). They
// do the same operations in the same order as the one-lane code, without fused multiply-adds
// (-ffp-contract=off), so both give the same bits.
#define AVX2_TARGET __attribute__((target("avx2"), flatten))

template <typename T>
inline float f32(T v) {
  return static_cast<float>(v);
}

// Round to T (bf16: nearest even, as torch rounds).
template <typename T>
inline float rnd(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return static_cast<float>(static_cast<T>(v));
  }
}

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

// The elementwise arithmetic on one float (V = float) or eight (V = v8f): loads and stores of fp32
// or bf16, bf16 rounding, and the few operations that are not plain arithmetic. Both give the same
// bits for the same inputs.
template <typename V>
struct Lanes;

template <>
struct Lanes<float> {
  static constexpr int kWidth = 1;
  template <typename T>
  static INLINE float load(const T* p) {
    return f32(*p);
  }
  template <typename T>
  static INLINE void store(T* p, float v) {
    *p = static_cast<T>(v);
  }
  template <typename T>
  static INLINE float round(float v) {
    return rnd<T>(v);
  }
  static INLINE float clamp(float x, float low, float high) {
    x = x < low ? low : x;
    return x > high ? high : x;
  }
  static INLINE float zero_below(float x, float bound, float y) { return x < bound ? 0.f : y; }
  static INLINE float floor(float x) {  // |x| < 2^31
    const float t = static_cast<float>(static_cast<int32_t>(x));
    return t > x ? t - 1.f : t;
  }
  static INLINE float pow2(float n) {  // 2^n for integral n in -126..127
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float v;
    std::memcpy(&v, &bits, sizeof(v));
    return v;
  }
};

template <>
struct Lanes<v8f> {
  static constexpr int kWidth = 8;
  static INLINE v8f splat(float v) { return v8f{} + v; }
  static INLINE v8f select(v8i mask, v8f a, v8f b) { return (v8f)((mask & (v8i)a) | (~mask & (v8i)b)); }
  // bf16 bits of v rounded to nearest even, as c10::BFloat16 rounds (NaN: 0x7FC0).
  static INLINE v8u bf16_bits(v8f v) {
    const v8u bits = (v8u)v;
    const v8u rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    const v8i nan = v != v;
    return (v8u)((nan & 0x7FC0) | (~nan & (v8i)rounded));
  }
  template <typename T>
  static INLINE v8f load(const T* p) {
    if constexpr (std::is_same_v<T, float>) {
      v8f v;
      std::memcpy(&v, p, sizeof(v));
      return v;
    } else {
      v8h h;
      std::memcpy(&h, p, sizeof(h));
      return (v8f)(__builtin_convertvector(h, v8u) << 16);
    }
  }
  template <typename T>
  static INLINE void store(T* p, v8f v) {
    if constexpr (std::is_same_v<T, float>) {
      std::memcpy(p, &v, sizeof(v));
    } else {
      const v8h h = __builtin_convertvector(bf16_bits(v), v8h);
      std::memcpy(p, &h, sizeof(h));
    }
  }
  template <typename T>
  static INLINE v8f round(v8f v) {
    if constexpr (std::is_same_v<T, float>) {
      return v;
    } else {
      return (v8f)(bf16_bits(v) << 16);
    }
  }
  static INLINE v8f clamp(v8f x, float low, float high) {
    x = select(x < splat(low), splat(low), x);
    return select(x > splat(high), splat(high), x);
  }
  static INLINE v8f zero_below(v8f x, float bound, v8f y) { return select(x < splat(bound), v8f{}, y); }
  static INLINE v8f floor(v8f x) {
    const v8f t = __builtin_convertvector(__builtin_convertvector(x, v8i), v8f);
    return select(t > x, t - 1.f, t);
  }
  static INLINE v8f pow2(v8f n) { return (v8f)((__builtin_convertvector(n, v8i) + 127) << 23); }
};

// e^x (Cephes' expf: 2^n times a polynomial of the remainder; SiLU through it is as close to exact as
// through std::exp, ~2 ulp), 0
// below -87.3 (e^-inf = 0). Vectorised: std::exp one value at a time dominated SiLU and softmax.
template <typename V>
INLINE V exp_lanes(V x) {
  using L = Lanes<V>;
  constexpr float kLow = -87.33654f, kHigh = 88.f;
  const V clamped = L::clamp(x, kLow, kHigh);
  const V n = L::floor(clamped * 1.44269504088896341f + 0.5f);
  V r = clamped - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  return L::zero_below(x, kLow, p * L::pow2(n));
}

constexpr int kLanes = 8;  // partial sums: a fixed summation order, eight lanes of one AVX2 vector

// The end of dot: lane partial sums `acc` over a[0, i) * b[0, i) plus the rest, in one total.
template <typename A, typename B>
INLINE float finish_dot(float (&acc)[kLanes], const A* a, const B* b, int64_t i, int64_t n) {
  for (; i < n; ++i) acc[0] += f32(a[i]) * f32(b[i]);
  float total = 0.f;
  for (int l = 0; l < kLanes; ++l) total += acc[l];
  return total;
}

// sum of a[i] * b[i] in fp32, in a fixed order: eight lane sums (lane l takes every i = l mod 8
// below the last multiple of 8), the rest added to lane 0, then the lanes in order. (Also a row's
// sum of squares: dot(x, x, n).)
template <typename V, typename A, typename B>
INLINE float dot(const A* a, const B* b, int64_t n) {
  float acc[kLanes] = {0.f};
  int64_t i = 0;
  if constexpr (std::is_same_v<V, v8f>) {
    static_assert(Lanes<V>::kWidth == kLanes);
    v8f sums{};
    for (; i + kLanes <= n; i += kLanes) sums += Lanes<V>::load(a + i) * Lanes<V>::load(b + i);
    std::memcpy(acc, &sums, sizeof(sums));
  } else {
    for (; i + kLanes <= n; i += kLanes)
      for (int l = 0; l < kLanes; ++l) acc[l] += f32(a[i + l]) * f32(b[i + l]);
  }
  return finish_dot(acc, a, b, i, n);
}

// dot(a, b + u * stride, n) for u = 0..3, each summed as dot sums it (the same bits): four
// independent chains, where one dot's chain of dependent adds leaves the CPU waiting.
template <typename A, typename B>
INLINE void dot4(const A* a, const B* b, int64_t stride, int64_t n, float* out) {
  using L = Lanes<v8f>;
  v8f sums[4];
  for (auto& s : sums) s = v8f{};  // (an aggregate `= {}` compiled to a slow rep stos here)
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const v8f x = L::load(a + i);
    for (int u = 0; u < 4; ++u) sums[u] += x * L::load(b + u * stride + i);
  }
  for (int u = 0; u < 4; ++u) {
    float acc[kLanes];
    std::memcpy(acc, &sums[u], sizeof(acc));
    out[u] = finish_dot(acc, a, b + u * stride, i, n);
  }
}

// fp32: x * rsqrt(mean(x^2) + eps) * w. bf16: w * bf16(x * rsqrt(mean(x^2) + eps)), rounded.
template <typename V, typename T>
INLINE void scale_lanes(const T* x, const T* w, T* out, float inv, int64_t i) {
  using L = Lanes<V>;
  if constexpr (std::is_same_v<T, float>) {
    L::store(out + i, L::load(x + i) * inv * L::load(w + i));
  } else {
    L::store(out + i, L::load(w + i) * L::template round<T>(L::load(x + i) * inv));
  }
}

template <typename V, typename T>
INLINE void rms_norm_row(const T* x, const T* w, T* out, int64_t d, float eps) {
  const float inv = 1.f / std::sqrt(dot<V>(x, x, d) / static_cast<float>(d) + eps);
  int64_t i = 0;
  for (; i + Lanes<V>::kWidth <= d; i += Lanes<V>::kWidth) scale_lanes<V>(x, w, out, inv, i);
  for (; i < d; ++i) scale_lanes<float>(x, w, out, inv, i);
}

template <typename V, typename T>
INLINE void add_lanes(const T* x, const T* delta, T* sum, int64_t i) {
  Lanes<V>::store(sum + i, Lanes<V>::load(x + i) + Lanes<V>::load(delta + i));
}

template <typename V, typename T>
INLINE void add_rms_norm_rows(const T* x, const T* delta, const T* w, T* sum, T* out, int64_t rows, int64_t d,
                              float eps) {
  int64_t i = 0;
  for (; i + Lanes<V>::kWidth <= rows * d; i += Lanes<V>::kWidth) add_lanes<V>(x, delta, sum, i);
  for (; i < rows * d; ++i) add_lanes<float>(x, delta, sum, i);
  for (int64_t r = 0; r < rows; ++r) rms_norm_row<V>(sum + r * d, w, out + r * d, d, eps);
}

template <typename V, typename T>
INLINE void silu_mul_lanes(const T* gate, const T* up, T* out, int64_t i) {
  using L = Lanes<V>;
  const V g = L::load(gate + i);
  L::store(out + i, L::template round<T>(g / (exp_lanes(-g) + 1.f)) * L::load(up + i));
}

template <typename V, typename T>
INLINE void silu_mul_rows(const T* gate_up, T* out, int64_t rows, int64_t width) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* gate = gate_up + r * 2 * width;
    T* o = out + r * width;
    int64_t i = 0;
    for (; i + Lanes<V>::kWidth <= width; i += Lanes<V>::kWidth) silu_mul_lanes<V>(gate, gate + width, o, i);
    for (; i < width; ++i) silu_mul_lanes<float>(gate, gate + width, o, i);
  }
}

// scores[j] -> e^(scores[j] * scale + mask[j] - max) in place; returns their sum (ascending).
template <typename V, typename T>
INLINE float softmax_scores(float* scores, const T* mask, int64_t visible, float scale) {
  using L = Lanes<V>;
  constexpr int W = L::kWidth;
  float best = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j < visible; ++j) {
    float score = scores[j] * scale;
    if (mask != nullptr) score += f32(mask[j]);
    scores[j] = score;
    best = std::max(best, score);
  }
  j = 0;
  for (; j + W <= visible; j += W) L::store(scores + j, exp_lanes(L::load(scores + j) - best));
  for (; j < visible; ++j) scores[j] = exp_lanes(scores[j] - best);
  float norm = 0.f;
  for (j = 0; j < visible; ++j) norm += scores[j];
  return norm;
}

// One query against `visible` cached keys and values of its head: softmax(q . k * scale + mask) v.
// `scores` holds `visible` floats, `acc` hd.
template <typename V, typename T>
INLINE void attend_row(const float* q, const T* k, const T* v, const T* mask, int64_t visible, int64_t hd,
                       float scale, float* scores, float* acc, T* out) {
  using L = Lanes<V>;
  constexpr int W = L::kWidth;
  int64_t j = 0;
  if constexpr (W > 1) {
    for (; j + 4 <= visible; j += 4) dot4(q, k + j * hd, hd, hd, scores + j);
  }
  for (; j < visible; ++j) scores[j] = dot<V>(q, k + j * hd, hd);
  const float norm = softmax_scores<V>(scores, mask, visible, scale);
  // acc[i] = sum over j (ascending) of p[j] * v[j][i]. The vector code keeps 32 columns in four
  // registers over every j (four independent chains), the rest goes through acc row by row.
  int64_t first = 0;
  if constexpr (W > 1) {
    for (; first + 4 * W <= hd; first += 4 * W) {
      V sums[4];
      for (auto& s : sums) s = V{};  // (not `= {}`: see dot4)
      for (j = 0; j < visible; ++j) {
        const float p = scores[j];
        const T* vj = v + j * hd + first;
        for (int u = 0; u < 4; ++u) sums[u] += p * L::load(vj + u * W);
      }
      for (int u = 0; u < 4; ++u) L::store(acc + first + u * W, sums[u]);
    }
  }
  std::fill(acc + first, acc + hd, 0.f);
  for (j = 0; j < visible; ++j) {
    const float p = scores[j];
    const T* vj = v + j * hd;
    for (int64_t i = first; i < hd; ++i) acc[i] += p * f32(vj[i]);
  }
  int64_t i = 0;
  for (; i + W <= hd; i += W) L::store(out + i, L::load(acc + i) / norm);
  for (; i < hd; ++i) out[i] = static_cast<T>(acc[i] / norm);
}

// Scores of the G query heads q (consecutive) against keys j .. j+U-1, each as dot<v8f> sums it.
// (U and G are compile-time so the G * U lane sums stay in registers.)
template <int G, int U, typename T>
INLINE void group_scores(const float* q, const T* k, int64_t j, int64_t visible, int64_t hd, float* scores) {
  using L = Lanes<v8f>;
  const int64_t whole = hd / kLanes * kLanes;
  v8f sums[G][U];
  for (int g = 0; g < G; ++g)
    for (int u = 0; u < U; ++u) sums[g][u] = v8f{};
  for (int64_t i = 0; i < whole; i += kLanes) {
    v8f key[U];
    for (int u = 0; u < U; ++u) key[u] = L::load(k + (j + u) * hd + i);
    for (int g = 0; g < G; ++g) {
      const v8f x = L::load(q + g * hd + i);
      for (int u = 0; u < U; ++u) sums[g][u] += x * key[u];
    }
  }
  for (int g = 0; g < G; ++g)
    for (int u = 0; u < U; ++u) {
      float acc[kLanes];
      std::memcpy(acc, &sums[g][u], sizeof(acc));
      scores[g * visible + j + u] = finish_dot(acc, q + g * hd, k + (j + u) * hd, whole, hd);
    }
}

// Columns first .. first + 8C - 1 of the G heads' outputs: the probability-weighted sum of the
// values over every key (ascending), divided by the head's norm, as attend_row<v8f> computes them.
template <int G, int C, typename T>
INLINE void group_values(const float* scores, const T* v, int64_t visible, int64_t hd, int64_t first,
                         const float* norm, T* out) {
  using L = Lanes<v8f>;
  v8f sums[G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) sums[g][c] = v8f{};
  for (int64_t j = 0; j < visible; ++j) {
    v8f value[C];
    for (int c = 0; c < C; ++c) value[c] = L::load(v + j * hd + first + c * kLanes);
    for (int g = 0; g < G; ++g) {
      const float p = scores[g * visible + j];
      for (int c = 0; c < C; ++c) sums[g][c] += p * value[c];
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) L::store(out + g * hd + first + c * kLanes, sums[g][c] / norm[g]);
}

// The G query heads that share one kv head (grouped-query attention) for one row, each head's
// arithmetic exactly as attend_row<v8f> does it (per key, the same lane sums; per column, the same
// ascending sum over keys), with every load of a key or value (bf16: widened to fp32) shared by
// the G heads. q: the G heads' queries, consecutive; scores: G * visible floats; out: their outputs.
template <int G, typename T>
INLINE void attend_group(const float* q, const T* k, const T* v, const T* mask, int64_t visible, int64_t hd,
                         float scale, float* scores, T* out) {
  int64_t j = 0;
  for (; j + 2 <= visible; j += 2) group_scores<G, 2>(q, k, j, visible, hd, scores);
  if (j < visible) group_scores<G, 1>(q, k, j, visible, hd, scores);
  float norm[G];
  for (int g = 0; g < G; ++g) norm[g] = softmax_scores<v8f>(scores + g * visible, mask, visible, scale);
  int64_t first = 0;
  for (; first + 2 * kLanes <= hd; first += 2 * kLanes) group_values<G, 2>(scores, v, visible, hd, first, norm, out);
  if (first + kLanes <= hd) {
    group_values<G, 1>(scores, v, visible, hd, first, norm, out);
    first += kLanes;
  }
  for (int g = 0; g < G; ++g) {  // columns past the last whole vector, one at a time
    for (int64_t i = first; i < hd; ++i) {
      float sum = 0.f;
      for (j = 0; j < visible; ++j) sum += scores[g * visible + j] * f32(v[j * hd + i]);
      out[g * hd + i] = static_cast<T>(sum / norm[g]);
    }
  }
}

// x * cos + rotate_half(x) * sin at columns i (and i + half), rotate_half(x) = (-x2, x1), each
// product rounded as eager rounds, into `out` (fp32 queries or the cache's T).
template <typename V, typename T, typename Out>
INLINE void rotate_lanes(const T* x, const T* c, const T* s, Out* out, int64_t half, int64_t i) {
  using L = Lanes<V>;
  const V x1 = L::load(x + i), x2 = L::load(x + i + half);
  const V first = L::template round<T>(x1 * L::load(c + i));
  const V second = L::template round<T>(x2 * L::load(c + i + half));
  L::store(out + i, L::template round<T>(first + L::template round<T>(-x2 * L::load(s + i))));
  L::store(out + i + half, L::template round<T>(second + L::template round<T>(x1 * L::load(s + i + half))));
}

template <typename V, typename T, typename Out>
INLINE void rotate(const T* x, const T* c, const T* s, Out* out, int64_t hd) {
  const int64_t half = hd / 2;
  int64_t i = 0;
  for (; i + Lanes<V>::kWidth <= half; i += Lanes<V>::kWidth) rotate_lanes<V>(x, c, s, out, half, i);
  for (; i < half; ++i) rotate_lanes<float>(x, c, s, out, half, i);
}

// rope_attend's first part: rotated queries (fp32) and keys, and the values, into the cache.
template <typename T>
struct Rotation {
  const T *qkv, *cos, *sin;
  T *keys, *values;
  float* queries;
  int64_t batch, steps, heads, kv_heads, hd, row_width, max_len, start, rope_batch_stride;
};

template <typename V, typename T>
INLINE void rotate_rows(const Rotation<T>& r) {
  const int64_t hd = r.hd;
  for (int64_t b = 0; b < r.batch; ++b) {
    for (int64_t t = 0; t < r.steps; ++t) {
      const T* row = r.qkv + (b * r.steps + t) * r.row_width;
      const T* c = r.cos + b * r.rope_batch_stride + t * hd;
      const T* s = r.sin + b * r.rope_batch_stride + t * hd;
      for (int64_t h = 0; h < r.heads; ++h)
        rotate<V>(row + h * hd, c, s, r.queries + ((b * r.steps + t) * r.heads + h) * hd, hd);
      for (int64_t h = 0; h < r.kv_heads; ++h) {
        const int64_t at = ((b * r.kv_heads + h) * r.max_len + r.start + t) * hd;
        rotate<V>(row + (r.heads + h) * hd, c, s, r.keys + at, hd);
        const T* v = row + (r.heads + r.kv_heads + h) * hd;
        std::copy(v, v + hd, r.values + at);
      }
    }
  }
}

template <typename T>
AVX2_TARGET void rotate_rows_avx2(const Rotation<T>& r) {
  rotate_rows<v8f>(r);
}

template <typename T>
AVX2_TARGET void rms_norm_rows_avx2(const T* x, const T* w, T* out, int64_t rows, int64_t d, float eps) {
  for (int64_t r = 0; r < rows; ++r) rms_norm_row<v8f>(x + r * d, w, out + r * d, d, eps);
}

template <typename T>
AVX2_TARGET void add_rms_norm_rows_avx2(const T* x, const T* delta, const T* w, T* sum, T* out, int64_t rows,
                                        int64_t d, float eps) {
  add_rms_norm_rows<v8f>(x, delta, w, sum, out, rows, d, eps);
}

template <typename T>
AVX2_TARGET void silu_mul_rows_avx2(const T* gate_up, T* out, int64_t rows, int64_t width) {
  silu_mul_rows<v8f>(gate_up, out, rows, width);
}

template <int G, typename T>
AVX2_TARGET void attend_group_avx2(const float* q, const T* k, const T* v, const T* mask, int64_t visible,
                                   int64_t hd, float scale, float* scores, T* out) {
  attend_group<G>(q, k, v, mask, visible, hd, scale, scores, out);
}

template <typename T>
AVX2_TARGET void attend_row_avx2(const float* q, const T* k, const T* v, const T* mask, int64_t visible,
                                 int64_t hd, float scale, float* scores, float* acc, T* out) {
  attend_row<v8f>(q, k, v, mask, visible, hd, scale, scores, acc, out);
}

bool avx2_wanted = true;  // set_step_kernels_avx2: tests run the one-lane code on an AVX2 CPU too

// Do the AVX2 instantiations run: does this CPU have AVX2 (asked once) and are they wanted?
bool avx2() {
  static const bool supported = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return supported && avx2_wanted;
}

void check_rows(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), name, " must be a contiguous CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, name, " must be fp32 or bf16");
}

}  // namespace

#undef INLINE  // quant_kernels.cpp, in the same translation unit, defines its own
#undef AVX2_TARGET

// f(T{}) for T = float or at::BFloat16, as `dtype` (one of them) says: the step's dtypes, without the
// double instantiations of AT_DISPATCH_FLOATING_TYPES_AND that raw-row code has no use for.
template <typename F>
void float_or_bf16(at::ScalarType dtype, F&& f) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "expected fp32 or bf16, got ", dtype);
  if (dtype == at::kFloat) {
    f(float{});
  } else {
    f(at::BFloat16{});
  }
}

// The kernels over raw rows, for the tensor functions below and for whole layers in one call
// (layer_kernels.cpp), which run them over buffers of their own: no tensor a kernel call.
namespace step {

template <typename T>
void rms_norm(const T* x, const T* w, T* out, int64_t rows, int64_t d, float eps) {
  if (avx2()) {
    rms_norm_rows_avx2(x, w, out, rows, d, eps);
  } else {
    for (int64_t r = 0; r < rows; ++r) rms_norm_row<float>(x + r * d, w, out + r * d, d, eps);
  }
}

template <typename T>
void add_rms_norm(const T* x, const T* delta, const T* w, T* sum, T* out, int64_t rows, int64_t d, float eps) {
  if (avx2()) {
    add_rms_norm_rows_avx2(x, delta, w, sum, out, rows, d, eps);
  } else {
    add_rms_norm_rows<float>(x, delta, w, sum, out, rows, d, eps);
  }
}

template <typename T>
void silu_mul(const T* gate_up, T* out, int64_t rows, int64_t width) {
  if (avx2()) {
    silu_mul_rows_avx2(gate_up, out, rows, width);
  } else {
    silu_mul_rows<float>(gate_up, out, rows, width);
  }
}

// rope_attend over raw rows: qkv [B, T, (H + 2 KV) * hd]; cos, sin rows [T, hd] a batch row, that
// far apart (0: shared); keys, values one layer's [B, KV, max_len, hd]; mask additive [T, start + T]
// a batch row, that far apart, or null (causal); out [B, T, H * hd]; queries room for B * T * H * hd.
template <typename T>
struct Attend {
  const T *qkv, *cos, *sin;
  int64_t rope_batch_stride;
  T *keys, *values;
  const T* mask;
  int64_t mask_batch_stride;
  T* out;
  float* queries;
  int64_t batch, steps, heads, kv_heads, hd, max_len, start;
};

template <typename T>
void rope_attend(const Attend<T>& a) {
  const int64_t batch = a.batch, steps = a.steps, heads = a.heads, kv_heads = a.kv_heads, hd = a.hd;
  const int64_t max_len = a.max_len, start = a.start, total = start + steps;
  const int64_t row_width = (heads + 2 * kv_heads) * hd, group = heads / kv_heads;
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  // Rotated queries in fp32 (their values rounded to qkv's dtype, as eager keeps them).
  const Rotation<T> rotation{a.qkv, a.cos, a.sin, a.keys, a.values, a.queries, batch, steps, heads, kv_heads, hd,
                             row_width, max_len, start, a.rope_batch_stride};
  if (avx2()) {
    rotate_rows_avx2(rotation);
  } else {
    rotate_rows<float>(rotation);
  }
  const T* mp = a.mask;
  const T* kp = a.keys;
  const T* vp = a.values;
  const float* queries = a.queries;
  T* op = a.out;
  // Big enough chunks that a short one-token step does not pay for waking the thread pool. (From
  // 2^15 cached values a chunk: SmolLM2's three kv groups split over two threads from ~57 cached
  // tokens on, not ~227 as with 2^17; its w8a8 step, 64 cached, 3.13 -> 2.79 ms, medians of
  // alternating runs on a Zen 4 EPYC, 2 threads.)
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, total * hd));
  const bool use_avx2 = avx2();
  if (use_avx2 && group <= 4) {  // a job: one row's heads that share a kv head
    const int64_t groups = batch * steps * kv_heads;
    at::parallel_for(0, groups, std::max<int64_t>(1, grain / group), [&](int64_t begin, int64_t end) {
      std::vector<float> scores(group * total);
      for (int64_t job = begin; job < end; ++job) {
        const int64_t kvh = job % kv_heads, t = (job / kv_heads) % steps, b = job / (kv_heads * steps);
        const int64_t first_head = (b * steps + t) * heads + kvh * group;
        const float* q = queries + first_head * hd;
        const T* k = kp + (b * kv_heads + kvh) * max_len * hd;
        const T* v = vp + (b * kv_heads + kvh) * max_len * hd;
        const T* m = mp ? mp + b * a.mask_batch_stride + t * total : nullptr;
        const int64_t visible = mp ? total : start + t + 1;
        T* o = op + first_head * hd;
        switch (group) {
          case 1: attend_group_avx2<1>(q, k, v, m, visible, hd, scale, scores.data(), o); break;
          case 2: attend_group_avx2<2>(q, k, v, m, visible, hd, scale, scores.data(), o); break;
          case 3: attend_group_avx2<3>(q, k, v, m, visible, hd, scale, scores.data(), o); break;
          default: attend_group_avx2<4>(q, k, v, m, visible, hd, scale, scores.data(), o); break;
        }
      }
    });
    return;
  }
  const int64_t jobs = batch * steps * heads;
  at::parallel_for(0, jobs, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(total), acc(hd);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t h = job % heads, t = (job / heads) % steps, b = job / (heads * steps);
      const float* q = queries + job * hd;
      const int64_t kvh = h / group;
      const T* k = kp + (b * kv_heads + kvh) * max_len * hd;
      const T* v = vp + (b * kv_heads + kvh) * max_len * hd;
      const T* m = mp ? mp + b * a.mask_batch_stride + t * total : nullptr;
      const int64_t visible = mp ? total : start + t + 1;  // the mask hides the future itself
      T* o = op + (b * steps + t) * heads * hd + h * hd;
      if (use_avx2) {
        attend_row_avx2(q, k, v, m, visible, hd, scale, scores.data(), acc.data(), o);
      } else {
        attend_row<float>(q, k, v, m, visible, hd, scale, scores.data(), acc.data(), o);
      }
    }
  });
}

}  // namespace step

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.is_contiguous(), "weight must match x");
  const int64_t d = x.size(-1), rows = x.numel() / d;
  auto out = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
    step::rms_norm(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, d,
                   static_cast<float>(eps));
  });
  return out;
}

// (x + delta, rms_norm(x + delta)): the residual add and the next norm in one pass.
std::vector<torch::Tensor> add_rms_norm(
    const torch::Tensor& x, const torch::Tensor& delta, const torch::Tensor& weight, double eps) {
  check_rows(x, "x");
  check_rows(delta, "delta");
  TORCH_CHECK(delta.sizes() == x.sizes() && delta.scalar_type() == x.scalar_type(), "delta must match x");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.is_contiguous(), "weight must match x");
  const int64_t d = x.size(-1), rows = x.numel() / d;
  auto sum = torch::empty_like(x);
  auto out = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "add_rms_norm", [&] {
    step::add_rms_norm(x.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                       sum.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, d, static_cast<float>(eps));
  });
  return {sum, out};
}

// silu(gate) * up over [..., 2 * width] (gate first), rounded where eager rounds.
torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  const int64_t width = gate_up.size(-1) / 2, rows = gate_up.numel() / (2 * width);
  auto sizes = gate_up.sizes().vec();
  sizes.back() = width;
  auto out = torch::empty(sizes, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gate_up.scalar_type(), "silu_mul", [&] {
    step::silu_mul(gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, width);
  });
  return out;
}

// Rotary embedding of queries and keys, the new keys and values written into the cache at
// [start, start + T), and attention of the T queries over the cache.
//   qkv [B, T, (H + 2 KV) * hd] (a fused projection's output); cos, sin [B or 1, 1, T, hd];
//   keys, values [B, KV, max_len, hd] (one layer's cache); mask: additive [B or 1, 1, T, start + T]
//   or empty (causal). Returns [B, T, H * hd].
torch::Tensor rope_attend(
    const torch::Tensor& qkv,
    const torch::Tensor& cos,
    const torch::Tensor& sin,
    torch::Tensor keys,
    torch::Tensor values,
    int64_t start,
    const torch::Tensor& mask,
    int64_t heads,
    int64_t kv_heads) {
  check_rows(qkv, "qkv");
  const auto dtype = qkv.scalar_type();
  const int64_t batch = qkv.size(0), steps = qkv.size(1), max_len = keys.size(2), hd = keys.size(3);
  TORCH_CHECK(qkv.size(2) == (heads + 2 * kv_heads) * hd, "qkv width does not match the heads");
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous() && keys.scalar_type() == dtype &&
                  values.scalar_type() == dtype && keys.size(0) == batch && keys.size(1) == kv_heads,
              "keys and values must be one layer's contiguous cache in qkv's dtype");
  TORCH_CHECK(start >= 0 && start + steps <= max_len, "the cache has no room for these tokens");
  TORCH_CHECK(cos.scalar_type() == dtype && sin.scalar_type() == dtype && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.size(-1) == hd && cos.size(-2) == steps &&
                  (cos.size(0) == 1 || cos.size(0) == batch) && sin.sizes() == cos.sizes(),
              "cos and sin must be [B or 1, 1, T, head_dim] in qkv's dtype");
  const bool has_mask = mask.defined() && mask.numel() > 0;
  const int64_t total = start + steps;
  if (has_mask) {
    TORCH_CHECK(mask.dim() == 4 && mask.scalar_type() == dtype && mask.is_contiguous() && mask.size(-1) == total &&
                    mask.size(-2) == steps && (mask.size(0) == 1 || mask.size(0) == batch),
                "mask must be additive [B or 1, 1, T, start + T] in qkv's dtype");
  }
  auto out = torch::empty({batch, steps, heads * hd}, qkv.options());
  std::vector<float> queries(batch * steps * heads * hd);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "rope_attend", [&] {
    using T = scalar_t;
    step::rope_attend(step::Attend<T>{qkv.data_ptr<T>(), cos.data_ptr<T>(), sin.data_ptr<T>(),
                                      cos.size(0) == 1 ? 0 : steps * hd, keys.data_ptr<T>(), values.data_ptr<T>(),
                                      has_mask ? mask.data_ptr<T>() : nullptr,
                                      has_mask ? (mask.size(0) == 1 ? 0 : steps * total) : 0, out.data_ptr<T>(),
                                      queries.data(), batch, steps, heads, kv_heads, hd, max_len, start});
  });
  return out;
}

// Run the step kernels' AVX2 code where the CPU has AVX2 (the default), or the one-lane code that
// gives the same bits; returns whether the AVX2 code runs now.
bool set_step_kernels_avx2(bool wanted) {
  avx2_wanted = wanted;
  return avx2();
}
