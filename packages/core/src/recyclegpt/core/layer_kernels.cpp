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
