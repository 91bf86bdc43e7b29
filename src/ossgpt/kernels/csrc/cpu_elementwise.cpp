// The element-wise steps around a step's products, one native call each: RMSNorm, the rotary embedding and the
// attention's visibility mask.
//
// Each is a handful of torch ops in ossgpt.model (norms.py, rope.py, attention.py). Decoding runs them once per
// layer on a few rows, where every op costs a few microseconds of dispatch and allocation whatever its size: more
// than the arithmetic. Here each is one loop over the rows, on torch's intra-op threads when there are enough.
// Float32 in and out, computed as the model writes them (the same operations in the same order, the sum of squares
// excepted: vector lanes, then lanes summed), so the results agree with the model's to float32 rounding.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

// Rows per task so that a task holds about this many values: fewer would not pay a thread's start.
int64_t grain(int64_t row_size) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_size)); }

}  // namespace

// x [..., D] float32 (contiguous), weight [D] float32 -> weight * (x / sqrt(mean(x^2) + eps)), x's shape.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.dim() >= 1,
              "x must be a contiguous float32 tensor [..., D]");
  const int64_t D = x.size(-1);
  TORCH_CHECK(weight.scalar_type() == torch::kFloat32 && weight.is_contiguous() && weight.numel() == D,
              "weight must be a contiguous float32 vector of ", D, " values");
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
// rotated: (x1 cos - x2 sin, x2 cos + x1 sin).
torch::Tensor rotary(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 4 && x.stride(3) == 1 && x.size(3) % 2 == 0,
              "x must be float32 [B, H, T, D] with contiguous rows and D even");
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3), half = D / 2;
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.scalar_type() == torch::kFloat32 &&
                  sin.scalar_type() == torch::kFloat32 && cos.is_contiguous() && sin.is_contiguous(),
              "cos and sin must be contiguous float32 tensors of one shape");
  const bool per_row = cos.dim() == 3;
  TORCH_CHECK((cos.dim() == 2 || (per_row && cos.size(0) == B)) && cos.size(-2) == T && cos.size(-1) == half,
              "cos and sin must be [T, D / 2] or [B, T, D / 2]");
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
// from query t when 0 <= k <= q and, with a window, k > q - window.
torch::Tensor visible_keys(const torch::Tensor& query_positions, const torch::Tensor& key_positions,
                           c10::optional<int64_t> window) {
  TORCH_CHECK(query_positions.scalar_type() == torch::kInt64 && key_positions.scalar_type() == torch::kInt64 &&
                  query_positions.dim() == 2 && key_positions.dim() == 2 &&
                  query_positions.size(0) == key_positions.size(0),
              "positions must be int64 tensors [B, T] and [B, S]");
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
