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
#include <limits>
#include <type_traits>
#include <vector>

namespace {

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

constexpr int kLanes = 8;  // partial sums: a fixed summation order that the compiler can vectorise

// sum of a[i] * b[i] in fp32, in a fixed order (also a row's sum of squares: dot(x, x, n)).
template <typename A, typename B>
inline float dot(const A* a, const B* b, int64_t n) {
  float acc[kLanes] = {0.f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += f32(a[i + l]) * f32(b[i + l]);
  for (; i < n; ++i) acc[0] += f32(a[i]) * f32(b[i]);
  float total = 0.f;
  for (int l = 0; l < kLanes; ++l) total += acc[l];
  return total;
}

// fp32: x * rsqrt(mean(x^2) + eps) * w. bf16: w * bf16(x * rsqrt(mean(x^2) + eps)), rounded.
template <typename T>
void rms_norm_row(const T* x, const T* w, T* out, int64_t d, float eps) {
  const float inv = 1.f / std::sqrt(dot(x, x, d) / static_cast<float>(d) + eps);
  for (int64_t i = 0; i < d; ++i) {
    if constexpr (std::is_same_v<T, float>) {
      out[i] = x[i] * inv * w[i];
    } else {
      out[i] = static_cast<T>(f32(w[i]) * rnd<T>(f32(x[i]) * inv));
    }
  }
}

void check_rows(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), name, " must be a contiguous CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, name, " must be fp32 or bf16");
}

}  // namespace

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.is_contiguous(), "weight must match x");
  const int64_t d = x.size(-1), rows = x.numel() / d;
  auto out = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
    const auto* xp = x.data_ptr<scalar_t>();
    const auto* wp = weight.data_ptr<scalar_t>();
    auto* op = out.data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; ++r) rms_norm_row(xp + r * d, wp, op + r * d, d, static_cast<float>(eps));
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
    const auto* xp = x.data_ptr<scalar_t>();
    const auto* dp = delta.data_ptr<scalar_t>();
    const auto* wp = weight.data_ptr<scalar_t>();
    auto* sp = sum.data_ptr<scalar_t>();
    auto* op = out.data_ptr<scalar_t>();
    for (int64_t i = 0; i < rows * d; ++i) sp[i] = static_cast<scalar_t>(f32(xp[i]) + f32(dp[i]));
    for (int64_t r = 0; r < rows; ++r) rms_norm_row(sp + r * d, wp, op + r * d, d, static_cast<float>(eps));
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
    const auto* gp = gate_up.data_ptr<scalar_t>();
    auto* op = out.data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* g = gp + r * 2 * width;
      const scalar_t* u = g + width;
      for (int64_t i = 0; i < width; ++i) {
        const float gv = f32(g[i]);
        op[r * width + i] = static_cast<scalar_t>(rnd<scalar_t>(gv / (1.f + std::exp(-gv))) * f32(u[i]));
      }
    }
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
  const int64_t total = start + steps, half = hd / 2;
  if (has_mask) {
    TORCH_CHECK(mask.scalar_type() == dtype && mask.is_contiguous() && mask.size(-1) == total &&
                    mask.size(-2) == steps && (mask.size(0) == 1 || mask.size(0) == batch),
                "mask must be additive [B or 1, 1, T, start + T] in qkv's dtype");
  }
  const int64_t rope_batch_stride = cos.size(0) == 1 ? 0 : steps * hd;
  const int64_t mask_batch_stride = has_mask ? (mask.size(0) == 1 ? 0 : steps * total) : 0;
  const int64_t row_width = (heads + 2 * kv_heads) * hd, group = heads / kv_heads;
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  auto out = torch::empty({batch, steps, heads * hd}, qkv.options());
  // Rotated queries in fp32 (their values rounded to qkv's dtype, as eager keeps them).
  std::vector<float> queries(batch * steps * heads * hd);

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "rope_attend", [&] {
    using T = scalar_t;
    const T* src = qkv.data_ptr<T>();
    const T* cp = cos.data_ptr<T>();
    const T* sp = sin.data_ptr<T>();
    T* kp = keys.data_ptr<T>();
    T* vp = values.data_ptr<T>();
    // x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1), each product rounded as eager rounds.
    auto rotate = [&](const T* x, const T* c, const T* s, auto&& store) {
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = f32(x[i]), x2 = f32(x[i + half]);
        store(i, rnd<T>(rnd<T>(x1 * f32(c[i])) + rnd<T>(-x2 * f32(s[i]))));
        store(i + half, rnd<T>(rnd<T>(x2 * f32(c[i + half])) + rnd<T>(x1 * f32(s[i + half]))));
      }
    };
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t t = 0; t < steps; ++t) {
        const T* row = src + (b * steps + t) * row_width;
        const T* c = cp + b * rope_batch_stride + t * hd;
        const T* s = sp + b * rope_batch_stride + t * hd;
        for (int64_t h = 0; h < heads; ++h) {
          float* q = queries.data() + ((b * steps + t) * heads + h) * hd;
          rotate(row + h * hd, c, s, [&](int64_t i, float v) { q[i] = v; });
        }
        for (int64_t h = 0; h < kv_heads; ++h) {
          T* k = kp + ((b * kv_heads + h) * max_len + start + t) * hd;
          rotate(row + (heads + h) * hd, c, s, [&](int64_t i, float v) { k[i] = static_cast<T>(v); });
          const T* v = row + (heads + kv_heads + h) * hd;
          std::copy(v, v + hd, vp + ((b * kv_heads + h) * max_len + start + t) * hd);
        }
      }
    }
    const T* mp = has_mask ? mask.data_ptr<T>() : nullptr;
    T* op = out.data_ptr<T>();
    const int64_t jobs = batch * steps * heads;
    // Big enough chunks that a one-token step does not pay for waking the thread pool.
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 17) / std::max<int64_t>(1, total * hd));
    at::parallel_for(0, jobs, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(total), acc(hd);
      for (int64_t job = begin; job < end; ++job) {
        const int64_t h = job % heads, t = (job / heads) % steps, b = job / (heads * steps);
        const float* q = queries.data() + job * hd;
        const int64_t kvh = h / group;
        const T* k = kp + (b * kv_heads + kvh) * max_len * hd;
        const T* v = vp + (b * kv_heads + kvh) * max_len * hd;
        const T* m = has_mask ? mp + b * mask_batch_stride + t * total : nullptr;
        const int64_t visible = has_mask ? total : start + t + 1;  // the mask hides the future itself
        float best = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < visible; ++j) {
          float score = dot(q, k + j * hd, hd) * scale;
          if (m != nullptr) score += f32(m[j]);
          scores[j] = score;
          best = std::max(best, score);
        }
        float norm = 0.f;
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = 0; j < visible; ++j) {
          const float p = scores[j] == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(scores[j] - best);
          norm += p;
          const T* vj = v + j * hd;
          for (int64_t i = 0; i < hd; ++i) acc[i] += p * f32(vj[i]);
        }
        T* o = op + (b * steps + t) * heads * hd + h * hd;
        for (int64_t i = 0; i < hd; ++i) o[i] = static_cast<T>(acc[i] / norm);
      }
    });
  });
  return out;
}
