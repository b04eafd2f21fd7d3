// Decoder layers of a decode step in one call: the step kernels (step_kernels.cpp) and the matmuls
// (float_kernels.cpp, quant_kernels.cpp) in the order recyclegpt.core.step_kernels.KernelDecoderLayer
// calls them one by one, so the result has the same bits. Why: on a small model a layer's eight
// kernel calls from Python cost more than their arithmetic (measured on a Zen 3 EPYC: ~20 us of
// Python a layer of the 7.5M demo model, whose products take ~30 us). Appended after the other
// files, whose functions it calls.

namespace layers {

// How many tensors a linear of each kind reads: 0 = fp32 weight [N, K] (float_matmul); 1 = w8a8
// packed weight and scales (int8_dynamic_matmul); 2 = w4a8 packed weight, scales and minimums
// (int4_dynamic_matmul).
constexpr int64_t kOperands[] = {1, 2, 3};
constexpr int64_t kLinearInts = 3;  // kind, out_features, vnni

torch::Tensor linear(const torch::Tensor* operands, const int64_t* ints, const torch::Tensor& x) {
  switch (ints[0]) {
    case 0: return float_matmul(x, operands[0]);
    case 1: return int8_dynamic_matmul(x, operands[0], operands[1], ints[1], ints[2] != 0).contiguous();
    case 2: return int4_dynamic_matmul(x, operands[0], operands[1], operands[2], ints[1], ints[2] != 0).contiguous();
    default: TORCH_CHECK(false, "unknown linear kind ", ints[0]);
  }
}

}  // namespace layers

// Layers 0 .. L-1 of a stack over x [B, T, d] (T <= 16), fp32 or bf16 (bf16: quantized linears only).
// Layer i reads, in order: its input norm's and its post-attention norm's weights, then the operands
// of its qkv, o, gate/up and down linears from `tensors`; three ints a linear (kind, out_features,
// vnni) from `ints`; its two norms' eps from `eps`; its cache keys[i], values[i] ([L, B, KV, max_len,
// hd], each layer's contiguous). cos, sin, start, mask, heads, kv_heads as for rope_attend. Writes the new keys and
// values into the cache; returns the last layer's output.
torch::Tensor decode_layers_step(
    const torch::Tensor& x,
    const std::vector<torch::Tensor>& tensors,
    const std::vector<int64_t>& ints,
    const std::vector<double>& eps,
    const torch::Tensor& cos,
    const torch::Tensor& sin,
    const torch::Tensor& keys,
    const torch::Tensor& values,
    int64_t start,
    const torch::Tensor& mask,
    int64_t heads,
    int64_t kv_heads) {
  const int64_t count = keys.size(0);
  TORCH_CHECK(x.dim() == 3, "x must be [B, T, d]");
  TORCH_CHECK(values.size(0) == count, "keys and values must be caches of as many layers");  // rope_attend checks each
  TORCH_CHECK(static_cast<int64_t>(ints.size()) == 4 * layers::kLinearInts * count &&
                  static_cast<int64_t>(eps.size()) == 2 * count,
              "four linears and two norms a layer, one layer per cache entry");
  torch::Tensor out = x.contiguous();
  const torch::Tensor* t = tensors.data();
  const torch::Tensor* const end = t + tensors.size();
  const int64_t* n = ints.data();
  for (int64_t i = 0; i < count; ++i) {
    const torch::Tensor* lin[4];
    const torch::Tensor* cursor = t + 2;
    for (int j = 0; j < 4; ++j) {
      const int64_t kind = n[j * layers::kLinearInts];
      TORCH_CHECK(kind >= 0 && kind <= 2, "unknown linear kind ", kind);
      lin[j] = cursor;
      cursor += layers::kOperands[kind];
    }
    TORCH_CHECK(cursor <= end, "fewer tensors than the layers' linears read");
    const auto qkv = layers::linear(lin[0], n, rms_norm(out, t[0], eps[2 * i]));
    const auto attended =
        rope_attend(qkv, cos, sin, keys.select(0, i), values.select(0, i), start, mask, heads, kv_heads);
    auto sum_and_normed =
        add_rms_norm(out, layers::linear(lin[1], n + layers::kLinearInts, attended), t[1], eps[2 * i + 1]);
    const auto gated = silu_mul(layers::linear(lin[2], n + 2 * layers::kLinearInts, sum_and_normed[1]));
    out = sum_and_normed[0].add_(layers::linear(lin[3], n + 3 * layers::kLinearInts, gated));  // eager's x + down
    t = cursor;
    n += 4 * layers::kLinearInts;
  }
  TORCH_CHECK(t == end, "more tensors than the layers' linears read");
  return out;
}
