// Decoder layers of a decode step in one call: the step kernels (step_kernels.cpp) and the matmuls
// (float_kernels.cpp, quant_kernels.cpp) in the order recyclegpt.core.step_kernels.KernelDecoderLayer
// calls them one by one, so the result has the same bits. Why: on a small model a layer's eight
// kernel calls from Python cost more than their arithmetic (measured on a Zen 3 EPYC: ~20 us of
// Python a layer of the 7.5M demo model, whose products take ~30 us). The layers run the kernels
// over raw rows in scratch memory the thread keeps between steps, not over tensors: a tensor a
// kernel call cost ~10 us a layer of libtorch and malloc (the demo model's w8a8 step, 10 layers,
// spent more than half its ~175 us there; measured on a Zen 4 EPYC). Appended after the other
// files, whose functions it calls.

#include <memory>

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


// Scratch memory for a step's intermediate rows, kept by each thread from step to step: pieces of
// 64-byte aligned blocks, taken in order and given back together (rewind), so that after the first
// steps a step allocates nothing. A step that outgrew the first block (a wider batch) spreads over
// several; the next step's reset trades them for one block as large as that step's pieces were in
// all, so a thread keeps about what its widest step needs, not a block for every shape it saw.
class Scratch {
 public:
  struct Mark {
    size_t block, used, taken;
  };
  Mark mark() const { return {block_, used_, taken_}; }
  void rewind(Mark m) { block_ = m.block, used_ = m.used, taken_ = m.taken; }

  // A step's first call: nothing taken is in use (a failed step's pieces neither).
  void reset() {
    if (blocks_.size() > 1) {
      blocks_.clear();
      blocks_.emplace_back(std::max(most_, kMinBlock));
    }
    rewind({0, 0, 0});
  }

  template <typename U>
  U* take(int64_t count) {
    const size_t bytes = (static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(U) + 63) & ~size_t{63};
    for (;; ++block_, used_ = 0) {
      if (block_ == blocks_.size()) blocks_.emplace_back(std::max(bytes, kMinBlock));
      Block& b = blocks_[block_];
      if (used_ + bytes <= b.size) {
        U* p = reinterpret_cast<U*>(b.data + used_);
        used_ += bytes;
        taken_ += bytes;
        most_ = std::max(most_, taken_);
        return p;
      }
    }
  }

 private:
  static constexpr size_t kMinBlock = size_t{1} << 20;
  struct Block {
    explicit Block(size_t n) : memory(new char[n + 64]), size(n) {
      data = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(memory.get()) + 63) & ~uintptr_t{63});
    }
    std::unique_ptr<char[]> memory;
    char* data;
    size_t size;
  };
  std::vector<Block> blocks_;
  size_t block_ = 0, used_ = 0;
  size_t taken_ = 0;  // bytes of the pieces in use
  size_t most_ = 0;   // the most ever in use at once: what one block must hold
};

Scratch& scratch() {
  thread_local Scratch pieces;
  return pieces;
}

// The checks the tensor functions make of a linear's operands, for inputs of width K in `dtype`.
void check_step_linear(const torch::Tensor* operands, const int64_t* ints, int64_t K, at::ScalarType dtype) {
  const auto& w = operands[0];
  TORCH_CHECK(ints[0] >= 0 && ints[0] <= 2, "unknown linear kind ", ints[0]);
  for (int64_t j = 0; j < kOperands[ints[0]]; ++j)
    TORCH_CHECK(operands[j].device().is_cpu(), "a linear's operands must be CPU tensors");
  switch (ints[0]) {
    case 0:
      TORCH_CHECK(dtype == at::kFloat && dense::supported(), "an fp32-matmul linear needs fp32 steps on AVX2");
      TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 2 && w.size(1) == K && w.is_contiguous(),
                  "an fp32 linear's weight must be a contiguous fp32 matrix [N, ", K, "]");
      return;
    case 1:
    case 2:
      check_dynamic_kernel(ints[2] != 0);
      TORCH_CHECK(K % packed::kBlock == 0, "int8 activations need in_features a multiple of 32, got ", K);
      if (ints[0] == 1) {
        check_int8_tiles(w, operands[1], K, ints[1]);
      } else {
        check_int4_tiles(w, operands[1], operands[2], K, ints[1]);
      }
      return;
    default: TORCH_CHECK(false, "unknown linear kind ", ints[0]);
  }
}

// A linear's output width (an fp32 linear's ints carry none).
int64_t out_width(const torch::Tensor* operands, const int64_t* ints) {
  return ints[0] == 0 ? operands[0].size(0) : ints[1];
}

// `linear` over raw rows: y [M, out_width] in T from x [M, K], in scratch memory (the same bits).
template <typename T>
const T* step_linear(const torch::Tensor* operands, const int64_t* ints, const T* x, int64_t M, int64_t K,
                     Scratch& pieces) {
  const int64_t n = out_width(operands, ints);
  if (ints[0] == 0) {
    if constexpr (std::is_same_v<T, float>) {
      float* y = pieces.take<float>(M * n);
      dense::matmul(x, M, K, operands[0].data_ptr<float>(), n, y);
      return y;
    }
    TORCH_CHECK(false, "an fp32-matmul linear in a bf16 step");
  }
  const int64_t width = dynamic_width(static_cast<int>(ints[0]), operands[0]), blocks = M * (K / packed::kBlock);
  int8_t* a = pieces.take<int8_t>(M * K);
  float* d = pieces.take<float>(blocks);
  int32_t* offset = pieces.take<int32_t>(blocks);
  float* y = pieces.take<float>(M * width);
  dynamic_matmul(static_cast<int>(ints[0]), x, M, K, operands, ints[2] != 0, a, d, offset, y);
  if constexpr (std::is_same_v<T, float>) {
    if (width == n) return y;
    float* out = pieces.take<float>(M * n);
    for (int64_t m = 0; m < M; ++m) std::memcpy(out + m * n, y + m * width, n * sizeof(float));
    return out;
  } else {
    T* out = pieces.take<T>(M * n);
    if (packed::avx2_supported()) {
      round_rows_to_bf16(y, M, width, n, out);
    } else {
      for (int64_t m = 0; m < M; ++m)
        for (int64_t i = 0; i < n; ++i) out[m * n + i] = static_cast<T>(y[m * width + i]);
    }
    return out;
  }
}

// What a step's layers read besides their weights: rotary rows (per batch row that far apart, 0:
// shared), the cache, the additive mask rows (null: causal).
template <typename T>
struct StepInputs {
  const T *cos, *sin;
  int64_t rope_batch_stride;
  const torch::Tensor &keys, &values;  // [L, B, KV, max_len, hd], each layer's contiguous
  int64_t start;
  const T* mask;
  int64_t mask_batch_stride;
  int64_t heads, kv_heads;
};

// The layers of decode_layers_step over x [B, T, d] (contiguous, T elements), in place.
template <typename T>
void run_layers(T* x, int64_t batch, int64_t steps, int64_t d, const std::vector<torch::Tensor>& tensors,
                const std::vector<int64_t>& ints, const std::vector<double>& eps, const StepInputs<T>& in) {
  const torch::Tensor& keys = in.keys;
  const torch::Tensor& values = in.values;
  const int64_t count = keys.size(0), M = batch * steps;
  TORCH_CHECK(keys.dim() == 5 && values.sizes() == keys.sizes() && keys.strides() == values.strides() &&
                  keys.scalar_type() == c10::CppTypeToScalarType<T>::value && values.scalar_type() == keys.scalar_type(),
              "keys and values must be caches [L, B, KV, max_len, hd] of as many layers, in the step's dtype");
  TORCH_CHECK(keys.device().is_cpu() && values.device().is_cpu(), "the cache must be on the CPU");
  if (count == 0) return;
  TORCH_CHECK(keys.select(0, 0).is_contiguous() && values.select(0, 0).is_contiguous(),
              "each layer's keys and values must be contiguous");
  const int64_t max_len = keys.size(3), hd = keys.size(4), heads = in.heads, kv_heads = in.kv_heads;
  TORCH_CHECK(keys.size(1) == batch && keys.size(2) == kv_heads && kv_heads > 0 && heads % kv_heads == 0,
              "the cache does not match the batch and the heads");
  TORCH_CHECK(in.start >= 0 && in.start + steps <= max_len, "the cache has no room for these tokens");
  TORCH_CHECK(static_cast<int64_t>(ints.size()) == 4 * kLinearInts * count && static_cast<int64_t>(eps.size()) == 2 * count,
              "four linears and two norms a layer, one layer per cache entry");
  const at::ScalarType dtype = keys.scalar_type();
  T* key_base = keys.data_ptr<T>();
  T* value_base = values.data_ptr<T>();
  Scratch& pieces = scratch();
  const auto layer_start = pieces.mark();
  const torch::Tensor* t = tensors.data();
  const torch::Tensor* const end = t + tensors.size();
  const int64_t* n = ints.data();
  for (int64_t i = 0; i < count; ++i) {
    pieces.rewind(layer_start);
    const torch::Tensor* lin[4];
    const torch::Tensor* cursor = t + 2;
    for (int j = 0; j < 4; ++j) {
      const int64_t kind = n[j * kLinearInts];
      TORCH_CHECK(kind >= 0 && kind <= 2, "unknown linear kind ", kind);
      lin[j] = cursor;
      cursor += kOperands[kind];
    }
    TORCH_CHECK(cursor <= end, "fewer tensors than the layers' linears read");
    for (int j = 0; j < 2; ++j)
      TORCH_CHECK(t[j].scalar_type() == dtype && t[j].is_contiguous() && t[j].numel() == d && t[j].device().is_cpu(),
                  "a norm's weight must be a CPU tensor [d] in the step's dtype");
    const int64_t qkv_width = (heads + 2 * kv_heads) * hd, attended_width = heads * hd;
    TORCH_CHECK(out_width(lin[0], n) == qkv_width, "qkv width does not match the heads");
    TORCH_CHECK(out_width(lin[1], n + kLinearInts) == d && out_width(lin[3], n + 3 * kLinearInts) == d,
                "the o and down projections must give d columns");
    const int64_t gate_up_width = out_width(lin[2], n + 2 * kLinearInts), width = gate_up_width / 2;
    check_step_linear(lin[0], n, d, dtype);
    check_step_linear(lin[1], n + kLinearInts, attended_width, dtype);
    check_step_linear(lin[2], n + 2 * kLinearInts, d, dtype);
    check_step_linear(lin[3], n + 3 * kLinearInts, width, dtype);

    T* normed = pieces.take<T>(M * d);
    step::rms_norm(x, t[0].data_ptr<T>(), normed, M, d, static_cast<float>(eps[2 * i]));
    const T* qkv = step_linear(lin[0], n, normed, M, d, pieces);
    T* attended = pieces.take<T>(M * attended_width);
    float* queries = pieces.take<float>(M * attended_width);
    const int64_t layer_offset = i * keys.stride(0);
    step::rope_attend(step::Attend<T>{qkv, in.cos, in.sin, in.rope_batch_stride, key_base + layer_offset,
                                      value_base + layer_offset, in.mask, in.mask_batch_stride, attended, queries,
                                      batch, steps, heads, kv_heads, hd, max_len, in.start});
    const T* o = step_linear(lin[1], n + kLinearInts, attended, M, attended_width, pieces);
    T* sum = pieces.take<T>(M * d);
    T* normed2 = pieces.take<T>(M * d);
    step::add_rms_norm(x, o, t[1].data_ptr<T>(), sum, normed2, M, d, static_cast<float>(eps[2 * i + 1]));
    const T* gate_up = step_linear(lin[2], n + 2 * kLinearInts, normed2, M, d, pieces);
    T* gated = pieces.take<T>(M * width);
    step::silu_mul(gate_up, gated, M, width);
    const T* down = step_linear(lin[3], n + 3 * kLinearInts, gated, M, width, pieces);
    for (int64_t j = 0; j < M * d; ++j)  // eager's x + down, rounded to T as torch's add rounds
      x[j] = static_cast<T>(static_cast<float>(sum[j]) + static_cast<float>(down[j]));
    t = cursor;
    n += 4 * kLinearInts;
  }
  pieces.rewind(layer_start);
  TORCH_CHECK(t == end, "more tensors than the layers' linears read");
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
  TORCH_CHECK(x.dim() == 3 && x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be an fp32 or bf16 CPU tensor [B, T, d]");
  const auto dtype = x.scalar_type();
  const int64_t batch = x.size(0), steps = x.size(1), total = start + steps;
  const int64_t hd = keys.dim() == 5 ? keys.size(4) : 0;
  TORCH_CHECK(cos.scalar_type() == dtype && sin.scalar_type() == dtype && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.dim() == 4 && cos.size(-1) == hd && cos.size(-2) == steps &&
                  (cos.size(0) == 1 || cos.size(0) == batch) && sin.sizes() == cos.sizes(),
              "cos and sin must be [B or 1, 1, T, head_dim] in x's dtype");
  const bool has_mask = mask.defined() && mask.numel() > 0;
  if (has_mask) {
    TORCH_CHECK(mask.dim() == 4 && mask.scalar_type() == dtype && mask.is_contiguous() && mask.size(-1) == total &&
                    mask.size(-2) == steps && (mask.size(0) == 1 || mask.size(0) == batch),
                "mask must be additive [B or 1, 1, T, start + T] in x's dtype");
  }
  auto out = x.clone(at::MemoryFormat::Contiguous);
  layers::scratch().reset();
  float_or_bf16(dtype, [&](auto tag) {
    using T = decltype(tag);
    const layers::StepInputs<T> in{cos.data_ptr<T>(), sin.data_ptr<T>(), cos.size(0) == 1 ? 0 : steps * hd, keys,
                                   values, start, has_mask ? mask.data_ptr<T>() : nullptr,
                                   has_mask ? (mask.size(0) == 1 ? 0 : steps * total) : 0, heads, kv_heads};
    layers::run_layers(out.data_ptr<T>(), batch, steps, x.size(2), tensors, ints, eps, in);
  });
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
  TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == at::kLong && ids.device().is_cpu(), "ids must be [B, T] int64");
  TORCH_CHECK(embed.dim() == 2 && embed.is_contiguous() && embed.device().is_cpu() &&
                  (embed.scalar_type() == at::kFloat || embed.scalar_type() == at::kBFloat16),
              "embed must be a contiguous fp32 or bf16 table [V, d]");
  const auto dtype = embed.scalar_type();
  const int64_t batch = ids.size(0), steps = ids.size(1), d = embed.size(1), M = batch * steps;
  const int64_t hd = cos_table.size(1);
  TORCH_CHECK(start >= 0 && start + steps <= cos_table.size(0), "the rotary tables end before these positions");
  TORCH_CHECK(cos_table.dim() == 2 && sin_table.sizes() == cos_table.sizes() && cos_table.is_contiguous() &&
                  sin_table.is_contiguous() && sin_table.scalar_type() == cos_table.scalar_type(),
              "cos and sin must be contiguous tables [max_len, head_dim]");
  TORCH_CHECK(norm_weight.scalar_type() == dtype && norm_weight.is_contiguous() && norm_weight.numel() == d &&
                  norm_weight.device().is_cpu(),
              "the final norm's weight must be a CPU tensor [d] in the embedding's dtype");
  TORCH_CHECK(cos_table.device().is_cpu() && keys.dim() == 5 && keys.size(4) == hd,
              "the rotary tables must be CPU tables as wide as the cache's head_dim");
  const bool positioned = positions.numel() > 0;
  if (positioned)
    TORCH_CHECK(positions.dim() == 2 && positions.size(0) == batch && positions.size(1) == steps &&
                    positions.scalar_type() == at::kLong,
                "positions must be [B, T] int64");
  const auto flat_ids = ids.contiguous();
  const int64_t vocab = embed.size(0);
  const int64_t* id = flat_ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < M; ++i) TORCH_CHECK(id[i] >= 0 && id[i] < vocab, "token id ", id[i], " is outside the table");
  const auto flat_positions = positioned ? positions.contiguous() : positions;
  if (positioned) {
    const int64_t* pp = flat_positions.data_ptr<int64_t>();
    for (int64_t i = 0; i < M; ++i)
      TORCH_CHECK(pp[i] >= 0 && pp[i] < cos_table.size(0), "position ", pp[i], " is outside the rotary tables");
  }
  const torch::Tensor mask =
      key_valid.numel() > 0 ? layers::padded_causal_mask(key_valid, batch, start, steps, dtype) : torch::Tensor();
  auto out = torch::empty({batch, steps, d}, embed.options());
  float_or_bf16(dtype, [&](auto tag) {
    using T = decltype(tag);
    layers::Scratch& pieces = layers::scratch();
    pieces.reset();
    const T* table = embed.data_ptr<T>();
    T* xp = pieces.take<T>(M * d);  // the residual stream, through every layer
    if (prev.numel() == 0) {
      for (int64_t i = 0; i < M; ++i) std::memcpy(xp + i * d, table + id[i] * d, d * sizeof(T));
    } else {
      // The module: input_linear(cat(prev, embed[ids])).
      TORCH_CHECK(prev.dim() == 3 && prev.size(0) == batch && prev.size(1) == steps && prev.scalar_type() == dtype,
                  "prev must be [B, T, p] in the embedding's dtype");
      layers::check_linear(input_linear, input_ints, "the input linear");
      const auto flat_prev = prev.contiguous();
      const int64_t p = prev.size(2), width = p + d;
      layers::check_step_linear(input_linear.data(), input_ints.data(), width, dtype);
      TORCH_CHECK(layers::out_width(input_linear.data(), input_ints.data()) == d, "the input linear must give d columns");
      T* joined = pieces.take<T>(M * width);
      const T* pv = flat_prev.data_ptr<T>();
      for (int64_t i = 0; i < M; ++i) {
        std::memcpy(joined + i * width, pv + i * p, p * sizeof(T));
        std::memcpy(joined + i * width + p, table + id[i] * d, d * sizeof(T));
      }
      const T* projected = layers::step_linear(input_linear.data(), input_ints.data(), joined, M, width, pieces);
      std::memcpy(xp, projected, M * d * sizeof(T));
    }
    // Rotary rows in T: each row's own positions, or start .. start + T - 1 shared by every row.
    const int64_t rope_rows = positioned ? M : steps;
    T* cos = pieces.take<T>(rope_rows * hd);
    T* sin = pieces.take<T>(rope_rows * hd);
    float_or_bf16(cos_table.scalar_type(), [&](auto table_tag) {
      using Table = decltype(table_tag);
      const Table* cp = cos_table.data_ptr<Table>();
      const Table* sp = sin_table.data_ptr<Table>();
      const int64_t* pp = positioned ? flat_positions.data_ptr<int64_t>() : nullptr;
      for (int64_t r = 0; r < rope_rows; ++r) {
        const int64_t row = positioned ? pp[r] : start + r;
        for (int64_t j = 0; j < hd; ++j) {
          cos[r * hd + j] = static_cast<T>(static_cast<float>(cp[row * hd + j]));
          sin[r * hd + j] = static_cast<T>(static_cast<float>(sp[row * hd + j]));
        }
      }
    });
    const int64_t total = start + steps;
    const layers::StepInputs<T> in{cos, sin, positioned ? steps * hd : 0, keys, values, start,
                                   mask.defined() ? mask.data_ptr<T>() : nullptr, mask.defined() ? steps * total : 0,
                                   heads, kv_heads};
    layers::run_layers(xp, batch, steps, d, tensors, ints, eps, in);
    step::rms_norm(static_cast<const T*>(xp), norm_weight.data_ptr<T>(), out.data_ptr<T>(), M, d,
                   static_cast<float>(norm_eps));
  });
  return out;
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
