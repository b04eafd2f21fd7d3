// A whole fp32 decoder layer step in one call: the step kernels (step_kernels.cpp) and the fp32
// matmul (float_kernels.cpp) in the order recyclegpt.core.step_kernels.KernelDecoderLayer calls
// them one by one, so the result has the same bits. Why: on a small model a layer's eight kernel
// calls from Python cost more than their arithmetic (a few microseconds of Python and argument
// conversion each, measured on a Zen 3 EPYC: ~90 us a layer of the 7.5M demo model, whose
// products take ~5 us). Appended after the other two files, whose functions it calls.

// x [B, T, d] fp32 (T <= 16); the layer's norm weights and bias-free linear weights ([N, K], fp32);
// cos, sin, keys, values, start, mask, heads, kv_heads as for rope_attend. Returns the layer's
// output [B, T, d]; writes the new keys and values into the cache as rope_attend does.
torch::Tensor fp32_layer_step(
    const torch::Tensor& x,
    const torch::Tensor& input_norm,
    double input_eps,
    const torch::Tensor& qkv_weight,
    const torch::Tensor& o_weight,
    const torch::Tensor& post_norm,
    double post_eps,
    const torch::Tensor& gate_up_weight,
    const torch::Tensor& down_weight,
    const torch::Tensor& cos,
    const torch::Tensor& sin,
    torch::Tensor keys,
    torch::Tensor values,
    int64_t start,
    const torch::Tensor& mask,
    int64_t heads,
    int64_t kv_heads) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 3, "x must be fp32 [B, T, d]");
  const auto input = x.contiguous();
  const auto qkv = float_matmul(rms_norm(input, input_norm, input_eps), qkv_weight);
  const auto attended = rope_attend(qkv, cos, sin, std::move(keys), std::move(values), start, mask, heads, kv_heads);
  auto sum_and_normed = add_rms_norm(input, float_matmul(attended, o_weight), post_norm, post_eps);
  const auto down = float_matmul(silu_mul(float_matmul(sum_and_normed[1], gate_up_weight)), down_weight);
  return sum_and_normed[0].add_(down);  // the residual add, as eager's x + down (one rounding)
}

// Every layer of a stack in one call, in order: layer i reads weights[6 i .. 6 i + 5] (input norm,
// qkv, o, post-attention norm, gate/up, down), eps[2 i] and eps[2 i + 1], and its cache keys[i],
// values[i] ([layers, B, KV, max_len, hd], contiguous). The same bits as a call a layer.
torch::Tensor fp32_layers_step(
    const torch::Tensor& x,
    const std::vector<torch::Tensor>& weights,
    const std::vector<double>& eps,
    const torch::Tensor& cos,
    const torch::Tensor& sin,
    const torch::Tensor& keys,
    const torch::Tensor& values,
    int64_t start,
    const torch::Tensor& mask,
    int64_t heads,
    int64_t kv_heads) {
  const int64_t layers = keys.size(0);
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 6 * layers && static_cast<int64_t>(eps.size()) == 2 * layers,
              "six weights and two eps a layer, one layer per cache entry");
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous() && values.size(0) == layers,
              "keys and values must be a stack's contiguous cache");
  torch::Tensor out = x;
  for (int64_t i = 0; i < layers; ++i) {
    const torch::Tensor* w = weights.data() + 6 * i;
    out = fp32_layer_step(out, w[0], eps[2 * i], w[1], w[2], w[3], eps[2 * i + 1], w[4], w[5], cos, sin,
                          keys.select(0, i), values.select(0, i), start, mask, heads, kv_heads);
  }
  return out;
}
