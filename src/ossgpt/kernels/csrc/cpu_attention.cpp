// Attention with sinks for a decoding step: one query per row over the keys and values in the KV cache.
//
// The native twin of ossgpt.model.attention.eager_attention for a few queries (a decoding step has one per row),
// where torch's CPU flash kernel and the ops around it (the additive mask, the sink's rescaling) cost far more in
// per-call overhead than in arithmetic. For each row b, query t and head h (key/value head h / (H / K)):
//
//     score_s = scale * q . k_s             over the visible keys s only
//     m       = max(sink_h, max_s score_s)
//     l       = e^(sink_h - m) + sum_s e^(score_s - m)          the sink joins the softmax's denominator ...
//     out     = sum_s e^(score_s - m) v_s / l                   ... but has no value: it only soaks up weight
//
// in float32. Each (b, t, h) is computed with the same operations in the same order whatever the batch (a key/value
// head's queries share their passes over the keys, not their sums), so a row's output does not depend on the rows
// decoded beside it. Rows with no visible key (left padding) get zeros, as the reference does.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Eight floats, for sums the compiler keeps in registers: one AVX2 register, half an AVX-512 one, two SSE ones.
typedef float Vec __attribute__((vector_size(32)));
typedef int32_t Lanes __attribute__((vector_size(32)));  // lane indices for GCC's shuffle

// Lanes of (x, y), 0-7 from x and 8-15 from y, in the order given. (GCC before 12 lacks clang's builtin.)
#if defined(__clang__)
#define SHUFFLE(x, y, ...) __builtin_shufflevector(x, y, __VA_ARGS__)
#else
#define SHUFFLE(x, y, ...) __builtin_shuffle(x, y, Lanes{__VA_ARGS__})
#endif

Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);  // an unaligned vector load
  return v;
}

void store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }

// max(start, x[0], ..., x[n-1]), eight lanes at a time (a float max loop does not vectorize by itself: max is not
// associative once NaNs are considered).
float max_of(const float* x, int64_t n, float start) {
  Vec most = Vec{} + start;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const Vec v = load(x + j);
    most = v > most ? v : most;
  }
  float m = start;
  for (int l = 0; l < 8; ++l) m = std::max(m, most[l]);
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// Eight vectors -> the vector of their lane sums, [sum of a's lanes, of b's, ..., of h's], in three rounds of
// pairwise shuffles and adds (a transpose folded into the sums) instead of eight horizontal reductions.
Vec lane_sums(Vec a, Vec b, Vec c, Vec d, Vec e, Vec f, Vec g, Vec h) {
  auto fold1 = [](Vec x, Vec y) {  // lanes: x's and y's alternately, each the sum of two of its lanes
    return SHUFFLE(x, y, 0, 8, 2, 10, 4, 12, 6, 14) + SHUFFLE(x, y, 1, 9, 3, 11, 5, 13, 7, 15);
  };
  auto fold2 = [](Vec x, Vec y) {  // of two fold1s: lanes for four vectors, twice, each a sum of four lanes
    return SHUFFLE(x, y, 0, 1, 8, 9, 4, 5, 12, 13) + SHUFFLE(x, y, 2, 3, 10, 11, 6, 7, 14, 15);
  };
  const Vec x = fold2(fold1(a, b), fold1(c, d)), y = fold2(fold1(e, f), fold1(g, h));
  return SHUFFLE(x, y, 0, 1, 2, 3, 8, 9, 10, 11) + SHUFFLE(x, y, 4, 5, 6, 7, 12, 13, 14, 15);
}

// e^x for x <= 0 (a score minus its row's maximum) in plain arithmetic, so that `omp simd` loops vectorize it (the
// library's expf is a call per value). x = n ln2 + r with n = round(x / ln2) and |r| <= ln2 / 2; e^r by its Taylor
// series to r^7 (truncation error < 6e-9 relative); 2^n written straight into the float's exponent bits.
// Arguments below -87 (where e^x nears float32's smallest normal number) are taken as -87: e^-87 ~ 1.6e-38 is
// nothing next to the maximum's weight of 1.
inline float exp_nonpositive(float x) {
  constexpr float kShifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer, kept in the low bits
  x = x < -87.0f ? -87.0f : x;
  const float t = x * 1.44269504088896341f + kShifter;
  const float n = t - kShifter;                                            // round(x / ln2), in [-126, 0]
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;  // ln2 in two parts: r nearly exact
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &t, sizeof bits);             // the float t holds 0x4B400000 + n
  bits = (bits - 0x4B400000 + 127) << 23;          // 2^n: biased exponent n + 127, in [1, 127]
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// The attention of one key/value head's G queries (a decoding step's heads h = kv * G .. kv * G + G - 1, which see
// the same keys), in three passes:
//   scores    of every query with every visible key (slots slot[0..n) of the cache, rows key_stride apart);
//   softmax   of each query's scores, its sink in the denominator only, in place: the weights;
//   values    each query's weighted sum of the values (rows value_stride apart), then times 1 / (its total weight).
// The scores and values passes go kKeysPerPass keys at a time for all G queries, so that those keys' rows, read from
// memory once, serve the G queries from L1: one query after another over all the keys would read a long context's
// keys and values G times from memory or L3. Each query's arithmetic is the same as alone, in the same order.
constexpr int64_t kKeysPerPass = 64;  // 16 KB of keys (and of values) at gpt-oss's head size: in L1

// The scores of keys j0 .. j1 - 1 with one query, scale * q . k, into scores[j0 .. j1 - 1]. j0 is a multiple of 8.
// kD: the head size when known at compile time (gpt-oss's 64), so that the sums stay in registers; 0: D at run time.
template <int64_t kD>
void score_keys(const float* query, const float* keys, int64_t key_stride, const int64_t* slot, int64_t j0,
                int64_t j1, int64_t D_, float scale, float* scores) {
  static_assert(kD % 16 == 0, "a head size known at compile time is a whole number of vector pairs");
  constexpr int64_t kChunks = kD / 8;
  const int64_t D = kD > 0 ? kD : D_;
  // Known D: eight keys at a time, each a vector of partial sums, reduced together (lane_sums). Else four keys at a
  // time. Either way independent sums, where one dot product after another would wait on each sum's additions.
  int64_t j = j0;
  if constexpr (kD > 0) {
    Vec q[kChunks];
    for (int64_t c = 0; c < kChunks; ++c) q[c] = load(query + 8 * c);
    auto partial = [&](int64_t i) {  // the key in slot[i] times q, as 8 partial sums (two chains of products)
      const float* key = keys + slot[i] * key_stride;
      Vec a = q[0] * load(key), b = q[1] * load(key + 8);
      for (int64_t c = 2; c < kChunks; c += 2) {
        a += q[c] * load(key + 8 * c);
        b += q[c + 1] * load(key + 8 * c + 8);
      }
      return a + b;
    };
    for (; j + 8 <= j1; j += 8) {
      store(scores + j, scale * lane_sums(partial(j), partial(j + 1), partial(j + 2), partial(j + 3),
                                          partial(j + 4), partial(j + 5), partial(j + 6), partial(j + 7)));
    }
    for (; j < j1; ++j) {
      const Vec p = partial(j);
      float sum = 0.f;
      for (int l = 0; l < 8; ++l) sum += p[l];
      scores[j] = scale * sum;
    }
  } else {
    for (; j + 4 <= j1; j += 4) {
      const float* k0 = keys + slot[j] * key_stride;
      const float* k1 = keys + slot[j + 1] * key_stride;
      const float* k2 = keys + slot[j + 2] * key_stride;
      const float* k3 = keys + slot[j + 3] * key_stride;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t d = 0; d < D; ++d) {
        s0 += query[d] * k0[d];
        s1 += query[d] * k1[d];
        s2 += query[d] * k2[d];
        s3 += query[d] * k3[d];
      }
      scores[j] = scale * s0, scores[j + 1] = scale * s1, scores[j + 2] = scale * s2, scores[j + 3] = scale * s3;
    }
    for (; j < j1; ++j) {
      const float* k0 = keys + slot[j] * key_stride;
      float s0 = 0.f;
#pragma omp simd reduction(+ : s0)
      for (int64_t d = 0; d < D; ++d) s0 += query[d] * k0[d];
      scores[j] = scale * s0;
    }
  }
}

// n scores -> their softmax numerators e^(score - m) in place, m the largest of them and the sink; returns 1 / the
// denominator, which counts the sink's e^(sink - m) too.
float softmax_weights(float* scores, int64_t n, float sink) {
  const float m = max_of(scores, n, sink);
  float total = exp_nonpositive(sink - m);
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < n; ++j) {
    scores[j] = exp_nonpositive(scores[j] - m);
    total += scores[j];
  }
  return 1.f / total;
}

// sum [D] += the values of keys j0 .. j1 - 1, each times its weight, in key order.
template <int64_t kD>
void add_values(const float* weights, const float* values, int64_t value_stride, const int64_t* slot, int64_t j0,
                int64_t j1, int64_t D_, float* sum) {
  constexpr int64_t kChunks = kD / 8;
  const int64_t D = kD > 0 ? kD : D_;
  if constexpr (kD > 0) {  // D / 8 independent sums held in registers
    Vec acc[kChunks];
    for (int64_t c = 0; c < kChunks; ++c) acc[c] = load(sum + 8 * c);
    for (int64_t j = j0; j < j1; ++j) {
      const float* value = values + slot[j] * value_stride;
      const float p = weights[j];
      for (int64_t c = 0; c < kChunks; ++c) acc[c] += p * load(value + 8 * c);
    }
    for (int64_t c = 0; c < kChunks; ++c) store(sum + 8 * c, acc[c]);
  } else {
    for (int64_t j = j0; j < j1; ++j) {
      const float* value = values + slot[j] * value_stride;
      const float p = weights[j];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) sum[d] += p * value[d];
    }
  }
}

// The G queries (rows query_stride apart) of one key/value head through the attention -> out (rows out_stride
// apart). sinks [G]; scratch holds G * n + G floats.
template <int64_t kD>
void attend(const float* query, int64_t query_stride, int64_t G, const float* keys, int64_t key_stride,
            const float* values, int64_t value_stride, const int64_t* slot, int64_t n, int64_t D, float scale,
            const float* sinks, float* scratch, float* out, int64_t out_stride) {
  float* inv = scratch + G * n;
  for (int64_t j0 = 0; j0 < n; j0 += kKeysPerPass)
    for (int64_t g = 0; g < G; ++g)
      score_keys<kD>(query + g * query_stride, keys, key_stride, slot, j0, std::min(j0 + kKeysPerPass, n), D, scale,
                     scratch + g * n);
  for (int64_t g = 0; g < G; ++g) {
    inv[g] = softmax_weights(scratch + g * n, n, sinks[g]);
    std::fill(out + g * out_stride, out + g * out_stride + D, 0.f);
  }
  for (int64_t j0 = 0; j0 < n; j0 += kKeysPerPass)
    for (int64_t g = 0; g < G; ++g)
      add_values<kD>(scratch + g * n, values, value_stride, slot, j0, std::min(j0 + kKeysPerPass, n), D,
                     out + g * out_stride);
  for (int64_t g = 0; g < G; ++g)
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) out[g * out_stride + d] *= inv[g];
}

}  // namespace

bool gradients_wanted(std::initializer_list<torch::Tensor> tensors);  // csrc/cpu_elementwise.cpp

// q [B, H, T, D], k/v [B, K, S, D] (float32, innermost dimension contiguous; any other strides, e.g. a view of
// some rows and columns of a cache), sinks [H], visible [B or 1, 1, T, S] bool, scale -> out [B, H, T, D] float32.
// None unless q, k and v are float32 on the CPU with contiguous rows, and no gradient wanted.
c10::optional<torch::Tensor> decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                              const torch::Tensor& sinks_in, const torch::Tensor& visible_in,
                                              double scale) {
  if (!q.is_cpu() || q.scalar_type() != torch::kFloat32 || k.scalar_type() != torch::kFloat32 ||
      v.scalar_type() != torch::kFloat32 || q.stride(-1) != 1 || k.stride(-1) != 1 || v.stride(-1) != 1 ||
      gradients_wanted({q, k, v, sinks_in}))
    return c10::nullopt;
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
                  q.size(3) == k.size(3) && k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "q must be [B, H, T, D] and k, v [B, K, S, D] with K dividing H");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), K = k.size(1), S = k.size(2);
  const auto sinks = sinks_in.to(torch::kFloat32).contiguous();
  const auto visible = visible_in.contiguous();
  TORCH_CHECK(sinks.numel() == H, "sinks must be a vector [H]");
  TORCH_CHECK(visible.scalar_type() == torch::kBool && visible.dim() == 4 &&
                  (visible.size(0) == B || visible.size(0) == 1) && visible.size(1) == 1 && visible.size(2) == T &&
                  visible.size(3) == S,
              "visible must be a bool tensor [B or 1, 1, T, S]");
  auto out = torch::empty({B, H, T, D}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* sp = sinks.data_ptr<float>();
  const bool* mp = visible.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const int64_t G = H / K, mask_rows = visible.size(0);
  const float fscale = static_cast<float>(scale);
  const auto group = D == 64 ? attend<64> : attend<0>;
  // A unit of work is one (b, t) and one key/value head: its G query heads see the same keys. ~4 G S D flops:
  // enough units go to a thread that its share is worth starting.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, G * S * D));
  at::parallel_for(0, B * T * K, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(G * S + G);  // the G queries' scores of the visible keys, then their weights
    std::vector<int64_t> slot(S);           // ... and the cache slots those keys are in
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t kv = unit % K, t = (unit / K) % T, b = unit / (K * T);
      const bool* seen = mp + ((mask_rows == 1 ? 0 : b) * T + t) * S;
      int64_t n = 0;
      for (int64_t s = 0; s < S; ++s) {
        if (seen[s]) slot[n++] = s;
      }
      float* o = op + ((b * H + kv * G) * T + t) * D;  // head kv * G's output; the next heads' T * D apart
      if (n == 0) {  // all the weight is on the sinks, which have no value
        for (int64_t g = 0; g < G; ++g) std::fill(o + g * T * D, o + g * T * D + D, 0.f);
        continue;
      }
      group(qp + b * q.stride(0) + kv * G * q.stride(1) + t * q.stride(2), q.stride(1), G,
            kp + b * k.stride(0) + kv * k.stride(1), k.stride(2), vp + b * v.stride(0) + kv * v.stride(1),
            v.stride(2), slot.data(), n, D, fscale, sp + kv * G, scratch.data(), o, T * D);
    }
  });
  return out;
}
