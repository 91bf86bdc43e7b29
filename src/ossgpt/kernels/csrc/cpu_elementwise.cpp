// The element-wise steps around a step's products, one native call each: RMSNorm, the rotary embedding and its
// tables, the attention's visibility mask, the KV cache's writes and the router's top-k softmax.
//
// Each is a handful of torch ops in ossgpt.model (norms.py, rope.py, attention.py, cache.py, moe.py). Decoding runs them
// once per layer on a few rows, where every op costs a few microseconds of dispatch and allocation whatever its
// size: more than the arithmetic. Here each is one loop over the rows, on torch's intra-op threads when there are
// enough. Each call also decides whether it applies (None or False where not: the caller then takes its torch ops),
// since those checks, written in Python, would cost about as much as the call itself.
// The arithmetic is float32 in and out, computed as the model writes it (the same operations in the same order, the
// sum of squares excepted: vector lanes, then lanes summed), so the results agree with the model's to float32
// rounding; the cache's writes copy values as they are.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Rows per task so that a task holds about this many values: fewer would not pay a thread's start.
int64_t grain(int64_t row_size) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_size)); }

}  // namespace

// Whether autograd wants gradients of any of `tensors`: the native calls compute none, so then they decline.
bool gradients_wanted(std::initializer_list<torch::Tensor> tensors) {
  if (!c10::GradMode::is_enabled()) return false;
  return std::any_of(tensors.begin(), tensors.end(), [](const torch::Tensor& t) { return t.requires_grad(); });
}

// x [..., D] float32 (contiguous), weight [D] float32 -> weight * (x / sqrt(mean(x^2) + eps)), x's shape; None
// unless both are float32 on the CPU, x contiguous, and no gradient wanted.
c10::optional<torch::Tensor> rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  if (!x.is_cpu() || x.scalar_type() != torch::kFloat32 || weight.scalar_type() != torch::kFloat32 ||
      !x.is_contiguous() || x.dim() < 1 || gradients_wanted({x, weight}))
    return c10::nullopt;
  const int64_t D = x.size(-1);
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == D, "weight must be a contiguous vector of ", D, " values");
  auto y = torch::empty(x.sizes(), x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, D ? x.numel() / D : 0, grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xp + r * D;
      float* out = yp + r * D;
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t d = 0; d < D; ++d) squares += row[d] * row[d];
      const float inv = 1.f / std::sqrt(squares / static_cast<float>(D) + feps);
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) out[d] = wp[d] * (row[d] * inv);
    }
  });
  return y;
}

// x [B, H, T, D] float32 (innermost dimension contiguous, any other strides: the heads of a projection's output),
// cos, sin [T, D / 2] or [B, T, D / 2] float32 (contiguous) -> [B, H, T, D] contiguous, each head's two halves
// rotated: (x1 cos - x2 sin, x2 cos + x1 sin). None unless all three are float32 on the CPU, x's rows and cos and
// sin contiguous, cos per row for x's B rows if per row, and no gradient wanted.
c10::optional<torch::Tensor> rotary(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  if (!x.is_cpu() || x.dim() != 4 || x.stride(3) != 1 || (cos.dim() != 2 && cos.dim() != 3) ||
      x.scalar_type() != torch::kFloat32 || cos.scalar_type() != torch::kFloat32 ||
      sin.scalar_type() != torch::kFloat32 || !cos.is_contiguous() || !sin.is_contiguous() ||
      (cos.dim() == 3 && cos.size(0) != x.size(0)) || gradients_wanted({x, cos, sin}))
    return c10::nullopt;
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3), half = D / 2;
  TORCH_CHECK(D % 2 == 0 && cos.sizes() == sin.sizes() && cos.size(-2) == T && cos.size(-1) == half,
              "cos and sin must be [T, D / 2] or [B, T, D / 2], D even");
  const bool per_row = cos.dim() == 3;
  auto y = torch::empty({B, H, T, D}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, B * H * T, grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {  // r = (b * H + h) * T + t, the output's row
      const int64_t t = r % T, h = (r / T) % H, b = r / (T * H);
      const float* x1 = xp + b * x.stride(0) + h * x.stride(1) + t * x.stride(2);
      const float* x2 = x1 + half;
      const int64_t angle = ((per_row ? b * T : 0) + t) * half;
      const float* c = cp + angle;
      const float* s = sp + angle;
      float* out = yp + r * D;
#pragma omp simd
      for (int64_t d = 0; d < half; ++d) {
        out[d] = x1[d] * c[d] - x2[d] * s[d];
        out[half + d] = x2[d] * c[d] + x1[d] * s[d];
      }
    }
  });
  return y;
}

// query_positions [B, T], key_positions [B, S] (int64, any strides: an expanded arange, a view of a cache's
// columns; -1 = an empty slot or padding), window (none: every earlier key) -> bool [B, 1, T, S]: key s is visible
// from query t when 0 <= k <= q and, with a window, k > q - window. None unless both are int64 on the CPU, [B, T]
// and [B, S].
c10::optional<torch::Tensor> visible_keys(const torch::Tensor& query_positions, const torch::Tensor& key_positions,
                                          c10::optional<int64_t> window) {
  if (!query_positions.is_cpu() || query_positions.scalar_type() != torch::kInt64 ||
      key_positions.scalar_type() != torch::kInt64 || query_positions.dim() != 2 || key_positions.dim() != 2 ||
      query_positions.size(0) != key_positions.size(0))
    return c10::nullopt;
  const int64_t B = query_positions.size(0), T = query_positions.size(1), S = key_positions.size(1);
  auto visible = torch::empty({B, 1, T, S}, query_positions.options().dtype(torch::kBool));
  const int64_t* qp = query_positions.data_ptr<int64_t>();
  const int64_t* kp = key_positions.data_ptr<int64_t>();
  const int64_t q_row = query_positions.stride(0), q_column = query_positions.stride(1);
  const int64_t k_row = key_positions.stride(0), k_column = key_positions.stride(1);
  bool* vp = visible.data_ptr<bool>();
  const bool windowed = window.has_value();
  const int64_t w = window.value_or(0);
  at::parallel_for(0, B * T, grain(S), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {  // r = b * T + t
      const int64_t b = r / T, q = qp[b * q_row + (r % T) * q_column];
      const int64_t* keys = kp + b * k_row;
      bool* out = vp + r * S;
      for (int64_t s = 0; s < S; ++s) {
        const int64_t k = keys[s * k_column];
        out[s] = k <= q && k >= 0 && (!windowed || k > q - w);
      }
    }
  });
  return visible;
}

// A step's keys and values into a KV cache (ossgpt.model.cache.LayerKVCache.write): k, v [B, K, T, D] into keys,
// values [B, K, C, D] and positions [B, T] into key_positions [B, C], token t of row b at column start + t, or
// row_starts[b] + t when row_starts [B] is given, modulo C for a ring buffer. Any strides with contiguous rows (the
// cache may be a view of some rows and columns of a larger one). False, with nothing written, unless the cache and
// the step share a dtype on the CPU, positions are int64, and no gradient is wanted.
bool write_kv(const torch::Tensor& keys, const torch::Tensor& values, const torch::Tensor& key_positions,
              const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& positions, int64_t start,
              const c10::optional<torch::Tensor>& row_starts, bool ring) {
  if (!keys.is_cpu() || keys.scalar_type() != k.scalar_type() || values.scalar_type() != v.scalar_type() ||
      keys.scalar_type() != values.scalar_type() || key_positions.scalar_type() != torch::kInt64 ||
      positions.scalar_type() != torch::kInt64 || keys.stride(-1) != 1 || values.stride(-1) != 1 ||
      k.stride(-1) != 1 || v.stride(-1) != 1 || gradients_wanted({keys, values, k, v}))
    return false;
  TORCH_CHECK(keys.dim() == 4 && keys.sizes() == values.sizes() && k.dim() == 4 && k.sizes() == v.sizes() &&
                  k.size(0) == keys.size(0) && k.size(1) == keys.size(1) && k.size(3) == keys.size(3),
              "k, v must be [B, K, T, D] and the cache [B, K, C, D]");
  const int64_t B = k.size(0), K = k.size(1), T = k.size(2), D = k.size(3), C = keys.size(2);
  TORCH_CHECK(key_positions.dim() == 2 && key_positions.size(0) == B && key_positions.size(1) == C &&
                  positions.dim() == 2 && positions.size(0) == B && positions.size(1) == T,
              "positions must be [B, T] and the cache's [B, C]");
  std::vector<int64_t> first(B, start);
  if (row_starts.has_value()) {
    const torch::Tensor starts = row_starts->to(torch::kInt64).contiguous();
    TORCH_CHECK(starts.numel() == B, "row starts must be [B]");
    std::copy(starts.data_ptr<int64_t>(), starts.data_ptr<int64_t>() + B, first.begin());
  }
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(first[b] >= 0 && (ring || first[b] + T <= C), "KV cache full: ", first[b] + T,
                " tokens exceed its capacity of ", C);
  const int64_t size = keys.element_size();  // bytes per value
  auto* key_data = static_cast<char*>(keys.data_ptr());
  auto* value_data = static_cast<char*>(values.data_ptr());
  const auto* k_data = static_cast<const char*>(k.data_ptr());
  const auto* v_data = static_cast<const char*>(v.data_ptr());
  int64_t* slot_positions = key_positions.data_ptr<int64_t>();
  const int64_t* step_positions = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t c = ring ? (first[b] + t) % C : first[b] + t;
      slot_positions[b * key_positions.stride(0) + c * key_positions.stride(1)] =
          step_positions[b * positions.stride(0) + t * positions.stride(1)];
      for (int64_t h = 0; h < K; ++h) {
        std::memcpy(key_data + size * (b * keys.stride(0) + h * keys.stride(1) + c * keys.stride(2)),
                    k_data + size * (b * k.stride(0) + h * k.stride(1) + t * k.stride(2)), size * D);
        std::memcpy(value_data + size * (b * values.stride(0) + h * values.stride(1) + c * values.stride(2)),
                    v_data + size * (b * v.stride(0) + h * v.stride(1) + t * v.stride(2)), size * D);
      }
    }
  return true;
}

// The rotary embedding's tables (ossgpt.model.rope.RotaryEmbedding): positions [...] int64, inv_freq [D / 2] float32,
// scaling -> cos, sin [..., D / 2] float32, cos(position * inv_freq) * scaling (and sin), the angle rounded to float32
// as the model rounds it. None unless positions are int64 and inv_freq float32 on the CPU.
c10::optional<std::tuple<torch::Tensor, torch::Tensor>> rotary_table(const torch::Tensor& positions,
                                                                     const torch::Tensor& inv_freq, double scaling) {
  if (!positions.is_cpu() || positions.scalar_type() != torch::kInt64 || inv_freq.scalar_type() != torch::kFloat32 ||
      !inv_freq.is_cpu() || inv_freq.dim() != 1)
    return c10::nullopt;
  const torch::Tensor p = positions.contiguous(), f = inv_freq.contiguous();
  const int64_t N = p.numel(), half = f.numel();
  std::vector<int64_t> shape(p.sizes().begin(), p.sizes().end());
  shape.push_back(half);
  auto cos = torch::empty(shape, f.options()), sin = torch::empty(shape, f.options());
  const int64_t* pp = p.data_ptr<int64_t>();
  const float* fp = f.data_ptr<float>();
  float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  const float s = static_cast<float>(scaling);
  at::parallel_for(0, N, grain(4 * half), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t d = 0; d < half; ++d) {
        const float angle = static_cast<float>(pp[n]) * fp[d];
        cp[n * half + d] = std::cos(angle) * s;
        sp[n * half + d] = std::sin(angle) * s;
      }
  });
  return std::make_tuple(cos, sin);
}

// A router's choice (ossgpt.model.moe.Router): logits [N, E] float32 -> the k largest of each row, softmaxed, and
// their experts: weights [N, k] float32 and indices [N, k] int64, largest first (of equal logits, the lower expert
// first). None unless the logits are float32 on the CPU and no gradient is wanted.
c10::optional<std::tuple<torch::Tensor, torch::Tensor>> top_k_softmax(const torch::Tensor& logits_in, int64_t k) {
  if (!logits_in.is_cpu() || logits_in.scalar_type() != torch::kFloat32 || logits_in.dim() != 2 ||
      gradients_wanted({logits_in}))
    return c10::nullopt;
  const torch::Tensor logits = logits_in.contiguous();
  const int64_t N = logits.size(0), E = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "k (", k, ") must be between 1 and the number of experts (", E, ")");
  auto weights = torch::empty({N, k}, logits.options());
  auto indices = torch::empty({N, k}, logits.options().dtype(torch::kInt64));
  const float* lp = logits.data_ptr<float>();
  float* wp = weights.data_ptr<float>();
  int64_t* ip = indices.data_ptr<int64_t>();
  at::parallel_for(0, N, grain(E * k), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> order(E);
    for (int64_t n = begin; n < end; ++n) {
      const float* row = lp + n * E;
      for (int64_t e = 0; e < E; ++e) order[e] = e;
      std::partial_sort(order.begin(), order.begin() + k, order.end(),
                        [row](int64_t a, int64_t b) { return row[a] > row[b] || (row[a] == row[b] && a < b); });
      float sum = 0.f;
      for (int64_t j = 0; j < k; ++j) {
        ip[n * k + j] = order[j];
        wp[n * k + j] = std::exp(row[order[j]] - row[order[0]]);
        sum += wp[n * k + j];
      }
      for (int64_t j = 0; j < k; ++j) wp[n * k + j] /= sum;
    }
  });
  return std::make_tuple(weights, indices);
}
