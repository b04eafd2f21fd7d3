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

// Are `operands` and `ints` one linear's, as `linear` reads them? (`what` names it in the error.)
void check_linear(const std::vector<torch::Tensor>& operands, const std::vector<int64_t>& ints, const char* what) {
  TORCH_CHECK(static_cast<int64_t>(ints.size()) == kLinearInts && ints[0] >= 0 && ints[0] <= 2 &&
                  static_cast<int64_t>(operands.size()) == kOperands[ints[0]],
              what, " must be one linear's operands and ints");
}

// model.py's attention_mask_for over a padded cache, [B, 1, T, start + T] in `dtype`: 0 where query i
// (column start + i) sees column j (j <= start + i, and the column valid or the query's own), else -inf.
torch::Tensor padded_causal_mask(const torch::Tensor& key_valid, int64_t batch, int64_t start, int64_t steps,
                                 at::ScalarType dtype) {
  const int64_t total = start + steps;
  TORCH_CHECK(key_valid.dim() == 2 && key_valid.size(0) == batch && key_valid.size(1) >= total &&
                  key_valid.scalar_type() == at::kBool,
              "key_valid must be [B, >= start + T] bool");
  const auto valid = key_valid.narrow(1, 0, total).contiguous();
  const bool* vp = valid.data_ptr<bool>();
  auto mask = torch::empty({batch, 1, steps, total}, valid.options().dtype(at::kFloat));
  float* mp = mask.data_ptr<float>();
  const float hidden = -std::numeric_limits<float>::infinity();
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = 0; i < steps; ++i)
      for (int64_t j = 0; j < total; ++j)
        mp[(b * steps + i) * total + j] = j <= start + i && (vp[b * total + j] || j == start + i) ? 0.0f : hidden;
  return dtype == at::kFloat ? mask : mask.to(dtype);
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

// A stack's whole decode step in one call (causal, over a padded cache and at per-row positions too):
// its input states, decode_layers_step and its final norm, each exactly as the Python around them
// computes it (so the same bits), without the ~10 small aten and Python calls around the layers
// (measured on a Zen 3 EPYC: ~60 us of a ~200 us module step of the demo model). The input is
// embed[ids] ([B, T] int64 ids, T <= 16), or, for the recyclable module, input_linear(cat(prev,
// embed[ids])) with prev [B, T, p] its h[t-1] states and the linear's operands and three ints as for a
// layer's. Rotary rows: each row's `positions` [B, T] (int64) of the tables [max_len, hd], or with none
// (an empty tensor) start .. start + T - 1 for every row. `key_valid` [B, >= start + T] (bool; empty:
// no padding) marks the cache columns each row may attend to (model.py's attention_mask_for: causal, a
// column marked invalid hidden, except a query's own).
torch::Tensor decode_stack_step(
    const torch::Tensor& ids,
    const torch::Tensor& embed,
    const torch::Tensor& prev,
    const std::vector<torch::Tensor>& input_linear,
    const std::vector<int64_t>& input_ints,
    const std::vector<torch::Tensor>& tensors,
    const std::vector<int64_t>& ints,
    const std::vector<double>& eps,
    const torch::Tensor& cos_table,
    const torch::Tensor& sin_table,
    const torch::Tensor& keys,
    const torch::Tensor& values,
    int64_t start,
    int64_t heads,
    int64_t kv_heads,
    const torch::Tensor& norm_weight,
    double norm_eps,
    const torch::Tensor& positions,
    const torch::Tensor& key_valid) {
  TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == at::kLong, "ids must be [B, T] int64");
  TORCH_CHECK(embed.dim() == 2, "embed must be a table [V, d]");
  const int64_t batch = ids.size(0), steps = ids.size(1), d = embed.size(1);
  TORCH_CHECK(start >= 0 && start + steps <= cos_table.size(0), "the rotary tables end before these positions");
  torch::Tensor x = embed.index_select(0, ids.reshape({-1})).view({batch, steps, d});
  if (prev.numel() > 0) {
    TORCH_CHECK(prev.dim() == 3 && prev.size(0) == batch && prev.size(1) == steps, "prev must be [B, T, p]");
    layers::check_linear(input_linear, input_ints, "the input linear");
    x = layers::linear(input_linear.data(), input_ints.data(), torch::cat({prev, x}, -1));
  }
  const bool positioned = positions.numel() > 0;
  if (positioned)
    TORCH_CHECK(positions.dim() == 2 && positions.size(0) == batch && positions.size(1) == steps &&
                    positions.scalar_type() == at::kLong,
                "positions must be [B, T] int64");
  const auto flat_positions = positioned ? positions.reshape({-1}) : positions;
  const auto rows = [&](const torch::Tensor& table) {
    auto span = positioned ? table.index_select(0, flat_positions).view({batch, 1, steps, table.size(1)})
                           : table.narrow(0, start, steps).unsqueeze(0).unsqueeze(0);
    return span.scalar_type() == x.scalar_type() ? span : span.to(x.scalar_type());
  };
  const torch::Tensor mask = key_valid.numel() > 0 ? layers::padded_causal_mask(key_valid, batch, start, steps,
                                                                                 x.scalar_type())
                                                   : torch::Tensor();
  const auto out = decode_layers_step(x, tensors, ints, eps, rows(cos_table), rows(sin_table), keys, values, start,
                                      mask, heads, kv_heads);
  return rms_norm(out, norm_weight, norm_eps);
}

// A head's logits [..., N] = linear(x) (operands and ints as a layer's linear) and their greedy
// tokens [...]: the first index of the largest logit (a NaN, the first NaN), as torch's
// max(-1).indices picks. One call for what costs a head call and an aten max from Python.
std::vector<torch::Tensor> head_argmax(
    const torch::Tensor& x, const std::vector<torch::Tensor>& head, const std::vector<int64_t>& head_ints) {
  layers::check_linear(head, head_ints, "the head");
  const auto logits = layers::linear(head.data(), head_ints.data(), x).contiguous();
  const int64_t n = logits.size(-1), rows = logits.numel() / std::max<int64_t>(n, 1);
  TORCH_CHECK(n > 0, "the head has no outputs");
  auto sizes = logits.sizes().vec();
  sizes.pop_back();
  auto tokens = torch::empty(sizes, logits.options().dtype(at::kLong));
  int64_t* tp = tokens.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, logits.scalar_type(), "head_argmax", [&] {
    const scalar_t* lp = logits.data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* row = lp + r * n;
      int64_t best = 0;
      float top = static_cast<float>(row[0]);
      if (!std::isnan(top)) {
        for (int64_t i = 1; i < n; ++i) {
          const float v = static_cast<float>(row[i]);
          if (std::isnan(v)) {
            best = i;
            break;
          }
          if (v > top) {
            top = v;
            best = i;
          }
        }
      }
      tp[r] = best;
    }
  });
  return {logits, tokens};
}
