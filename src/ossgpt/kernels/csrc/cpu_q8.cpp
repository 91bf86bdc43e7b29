// Native CPU products for decoding: MXFP4 or int8 weights times activations quantized to int8 on the fly.
//
// The method (the one llama.cpp uses for its q8_0 dot products): each row of x is cut into blocks of 32 values
// and each block is stored as 32 int8 codes q and one float step d = max|x| / 127 (x ~= q * d). A weight row is
// also a sequence of 32-blocks, each 32 small integers w and one float scale s. Then
//
//     y[t, o] = sum over blocks b of  (d[t, b] * s[o, b]) * (sum of 32 integer products q * w)
//
// The inner sums are exact in int32; one float multiply-add per block. The weights are read in their packed
// form and never widened to float in memory, so a product reads ~4.25 (MXFP4) or 8 (int8) bits per weight.
//
//   MXFP4: a block is 16 bytes of FP4 E2M1 codes (low nibble first) and a biased power-of-two exponent. Every
//          FP4 value times 2 is an integer (0, 1, 2, 3, 4, 6, 8, 12 and negatives), so a 16-entry table turns
//          codes into int8 and s = 2^(e - 127) / 2.
//   int8:  a row of int8 values with one float scale per row (ossgpt.kernels.int8.quantize_int8); s = 1 per
//          block and the row scale multiplies the sum at the end. Or a bfloat16 scale per block of 32 (s).
//
// Instruction sets are picked when ossgpt.kernels.native compiles this file for the machine it runs on:
// AVX-512 VNNI or AVX-VNNI (vpdpbusd: 32 byte products summed into int32 in one instruction), else AVX2
// (vpmaddubsw + vpmaddwd), else plain C++. Products are split over output rows on torch's intra-op threads. The byte
// instructions multiply unsigned bytes by signed ones: the weights come as unsigned codes w + c where they can
// (`tile`, `tile2`, `tile_lanes`), and the activations' sums times c are taken off once per block. The linear
// products of int8 rows with row scales and of MXFP4 rows hold a weight row per int32 lane instead (`RowLanes`).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define OSSGPT_AVX512 1  // two blocks per instruction
#endif


namespace {

constexpr int64_t QK = 32;  // values per block

// FP4 E2M1 code -> 2 * value (bit 3 is the sign).
constexpr int8_t kFP4Doubled[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
// The same plus 12, as unsigned bytes (0 .. 24): the vector paths' weight codes (see tile).
constexpr uint8_t kFP4DoubledPlus12[16] = {12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0};

float half_power_of_two(uint8_t exponent) { return std::ldexp(0.5f, int(exponent) - 127); }

float bfloat16_to_float(uint16_t bits) {  // a bfloat16 is a float32's high half
  const uint32_t wide = uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof value);
  return value;
}

// ------------------------------------------------------------------------------ activations -> q8 blocks
// The order each block's 32 codes are stored in, to match the order the weights' values come out in:
//   kNatural:  as in x (int8 weights)
//   kBlock:    each block's even-indexed values, then its odd ones: the order in which an MXFP4 block's codes
//              come out of its bytes (all low nibbles, then all high ones), so the weights need no shuffle
//   kPair:     per pair of blocks b, b+1: b's even values, b+1's even, b's odd, b+1's odd (the 512-bit MXFP4
//              decoding, which unpacks two blocks' low nibbles and then their high nibbles in one step)
enum Layout { kNatural, kBlock, kPair };

int64_t position(int64_t j, int64_t b, Layout layout) {  // where value j of block b goes within its block (pair)
  if (layout == kNatural) return j;
  if (layout == kBlock) return (j % 2) * (QK / 2) + j / 2;
  return (j % 2) * QK + (b % 2) * (QK / 2) + j / 2;
}

// Rows of activations as the products read them: row t of K values x is stored as codes q [K] int8 (in a layout) and
// steps d [K / 32] float, with q * d ~= x per block (d = max|block| / 127), and each block's sum of its codes, sums
// [K / 32] (for weights stored as unsigned codes w + c: sum (w + c) q = sum w q + c sum q; see `tile_lanes`).
struct Q8Rows {
  int8_t* q;      // [n, K]
  float* d;       // [n, K / 32]
  int32_t* sums;  // [n, K / 32]
  int64_t K;

  Q8Rows from(int64_t first) const {  // rows first, first + 1, ... (a view)
    return {q + first * K, d + first * (K / QK), sums + first * (K / QK), K};
  }

  // Row t <- x [K], its blocks' codes in `layout`.
  void quantize(int64_t t, const float* x, Layout layout) const {
    int8_t* qt = q + t * K;
    for (int64_t b = 0; b < K / QK; ++b) {
      const float* xb = x + b * QK;
      float amax = 0.f;
      for (int64_t j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(xb[j]));
      d[t * (K / QK) + b] = amax / 127.f;
      const float inverse = amax > 0.f ? 127.f / amax : 0.f;
      int8_t* block = qt + (layout == kPair ? (b - b % 2) * QK : b * QK);
      int32_t sum = 0;
      for (int64_t j = 0; j < QK; ++j) {
        const int8_t code = static_cast<int8_t>(std::nearbyint(std::clamp(xb[j] * inverse, -127.f, 127.f)));
        block[position(j, b, layout)] = code;
        sum += code;
      }
      sums[t * (K / QK) + b] = sum;
    }
  }

  void copy(int64_t t, const Q8Rows& other, int64_t u) const {  // row t <- row u of `other` (same K and layout)
    std::memcpy(q + t * K, other.q + u * K, K);
    std::memcpy(d + t * (K / QK), other.d + u * (K / QK), K / QK * sizeof(float));
    std::memcpy(sums + t * (K / QK), other.sums + u * (K / QK), K / QK * sizeof(int32_t));
  }
};

// The buffers of n rows of K values (torch tensors, freed with this object).
struct Q8Buffers {
  torch::Tensor q, d, sums;
  Q8Buffers(int64_t n, int64_t K, const torch::TensorOptions& options)
      : q(torch::empty({n, K}, options.dtype(torch::kInt8))),
        d(torch::empty({n, K / QK}, options.dtype(torch::kFloat32))),
        sums(torch::empty({n, K / QK}, options.dtype(torch::kInt32))) {}
  Q8Rows rows() { return {q.data_ptr<int8_t>(), d.data_ptr<float>(), sums.data_ptr<int32_t>(), q.size(1)}; }
};

// Whether rows of G blocks take the 512-bit path, two blocks at a time.
constexpr bool wide(int64_t G) {
#if defined(OSSGPT_AVX512)
  return G % 2 == 0;
#else
  return (void)G, false;
#endif
}

// ------------------------------------------------------------------------------------ weight formats
// block(o, b): the b-th block of weight row o as 32 int8 values (in the order the activations were quantized in);
// block_scale(o, b): its float scale; row_scale(o): the factor applied to the row's finished sum;
// prefetch(o, b): ask for the bytes a few rows further on. Rows are read once, straight from memory, and with
// the hardware prefetcher alone the cores wait on it; the distances (~8 KB for MXFP4, ~16 KB for int8: some
// rows ahead) are the ones that measured best (`python bench/gpt_oss_20b.py --kernels`; BENCHMARKS.md).
// A prefetch never faults, so reading ahead past a matrix's end is harmless.
struct MXFP4Weights {
  const uint8_t* blocks;  // [O, G, 16]
  const uint8_t* scales;  // [O, G]
  int64_t G;
  // The vector paths' codes are the values plus kOffset (kOffset2 for block2), unsigned: see `tile`.
  static constexpr uint8_t kOffset = 12, kOffset2 = 12;
  static constexpr bool kWideTilesOfFour = false;  // see row_range
  static constexpr bool kBlockScales = true, kRowLanes = false;  // kRowLanes: see RowLanes
  const float* scale_of = scale_table();  // exponent byte -> 2^(e - 127) / 2

  MXFP4Weights(const uint8_t* blocks_, const uint8_t* scales_, int64_t G_) : blocks(blocks_), scales(scales_), G(G_) {}
  static const float* scale_table() {
    static const auto table = [] {
      std::array<float, 256> t{};
      for (int e = 0; e < 256; ++e) t[e] = half_power_of_two(static_cast<uint8_t>(e));
      return t;
    }();
    return table.data();
  }
  Layout layout() const { return wide(G) ? kPair : kBlock; }
  float block_scale(int64_t o, int64_t b) const { return scale_of[scales[o * G + b]]; }
  int64_t row_bytes() const { return G * (QK / 2); }
  float row_scale(int64_t) const { return 1.f; }
  void block_scalar(int64_t o, int64_t b, int8_t* w) const {
    const uint8_t* bytes = blocks + (o * G + b) * (QK / 2);
    for (int64_t j = 0; j < QK / 2; ++j) {
      w[j] = kFP4Doubled[bytes[j] & 0x0F];
      w[j + QK / 2] = kFP4Doubled[bytes[j] >> 4];
    }
  }
#if defined(__AVX2__)
  // Block b of row o as 32 values plus kOffset, unsigned bytes: the low nibbles' values, then the high ones'. The 16
  // bytes go into both halves of the register, the upper half shifted to its high nibbles, then one table lookup.
  __m256i block(int64_t o, int64_t b) const {
    const __m256i table =
        _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kFP4DoubledPlus12)));
    const __m256i bytes = _mm256_broadcastsi128_si256(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(blocks + (o * G + b) * (QK / 2))));
    const __m256i nibbles = _mm256_blend_epi32(bytes, _mm256_srli_epi16(bytes, 4), 0xF0);
    return _mm256_shuffle_epi8(table, _mm256_and_si256(nibbles, _mm256_set1_epi8(0x0F)));
  }
  void prefetch(int64_t o, int64_t b, int64_t ahead = 8192) const {
    _mm_prefetch(reinterpret_cast<const char*>(blocks + (o * G + b) * (QK / 2)) + ahead, _MM_HINT_T0);
  }
#endif
#if defined(OSSGPT_AVX512)
  // Blocks b and b + 1 as 64 values plus kOffset2, unsigned bytes, in the kPair layout: the 32 bytes in both halves
  // of the register, the upper half shifted to its high nibbles, then one table lookup.
  static constexpr __mmask16 kSecondBlock = 0xF0F0;  // int32 sums of block b+1's values (kPair layout)
  __m512i block2(int64_t o, int64_t b) const {
    const __m512i table =
        _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kFP4DoubledPlus12)));
    const __m512i bytes = _mm512_broadcast_i64x4(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blocks + (o * G + b) * (QK / 2))));
    const __m512i codes = _mm512_and_si512(_mm512_mask_srli_epi16(bytes, 0xFFFF0000, bytes, 4), _mm512_set1_epi8(0x0F));
    return _mm512_shuffle_epi8(table, codes);
  }
  // Each int32 lane's block's scale, blocks b and b + 1 (lanes of kSecondBlock).
  __m512 block_scales2(int64_t o, int64_t b) const {
    return _mm512_mask_blend_ps(kSecondBlock, _mm512_set1_ps(block_scale(o, b)), _mm512_set1_ps(block_scale(o, b + 1)));
  }
#endif
};

// One float per weight row, stored as float32 or as bfloat16 (quantize_int8's dtype, read as it is: no conversion
// per call).
struct RowScales {
  const float* float32 = nullptr;
  const uint16_t* bfloat16 = nullptr;
  float operator[](int64_t o) const { return float32 ? float32[o] : bfloat16_to_float(bfloat16[o]); }
  RowScales from(int64_t first) const {  // rows first, first + 1, ...
    return {float32 ? float32 + first : nullptr, bfloat16 ? bfloat16 + first : nullptr};
  }
};

RowScales row_scales(const torch::Tensor& scales, int64_t count, const char* what) {
  TORCH_CHECK((scales.scalar_type() == torch::kFloat32 || scales.scalar_type() == torch::kBFloat16) &&
                  scales.is_contiguous() && scales.numel() == count,
              what, " must be contiguous float32 or bfloat16, ", count, " values");
  if (scales.scalar_type() == torch::kFloat32) return {scales.data_ptr<float>(), nullptr};
  return {nullptr, reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>())};
}

struct Int8Weights {
  const int8_t* weight;  // [O, K]
  RowScales scales;      // [O]
  int64_t K;
  // block: the signed values (kOffset 0: vpmaddubsw could saturate on w + 128); block2: w + 128 (see `tile2`).
  static constexpr uint8_t kOffset = 0, kOffset2 = 128;
  static constexpr bool kWideTilesOfFour = true;  // see row_range
  static constexpr bool kBlockScales = false, kRowLanes = false;  // block_scale is 1; kRowLanes: see RowLanes
  Layout layout() const { return kNatural; }

  float block_scale(int64_t, int64_t) const { return 1.f; }
  float row_scale(int64_t o) const { return scales[o]; }
  int64_t row_bytes() const { return K; }
  void block_scalar(int64_t o, int64_t b, int8_t* w) const { std::memcpy(w, weight + o * K + b * QK, QK); }
#if defined(__AVX2__)
  __m256i block(int64_t o, int64_t b) const {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(weight + o * K + b * QK));
  }
  void prefetch(int64_t o, int64_t b, int64_t ahead = 16384) const {
    _mm_prefetch(reinterpret_cast<const char*>(weight + o * K + b * QK) + ahead, _MM_HINT_T0);
  }
#endif
#if defined(OSSGPT_AVX512)
  static constexpr __mmask16 kSecondBlock = 0xFF00;
  // Blocks b and b + 1 plus kOffset2, as unsigned bytes: w + 128 is w with its sign bit flipped.
  __m512i block2(int64_t o, int64_t b) const {
    return _mm512_xor_si512(_mm512_loadu_si512(weight + o * K + b * QK), _mm512_set1_epi8(char(0x80)));
  }
  __m512 block_scales2(int64_t, int64_t) const { return _mm512_set1_ps(1.f); }
#endif
};

// int8 rows with a bfloat16 scale per block of 32 (llama.cpp's Q8_0, with bf16 scales): a block's largest value sets
// its own step, ~1.8x finer than one step per row for Gaussian rows, for 2 bytes more per 32.
struct Int8BlockWeights : Int8Weights {
  static constexpr bool kBlockScales = true;
  const uint16_t* block_scales;  // [O, K / 32], bfloat16 bits
  float block_scale(int64_t o, int64_t b) const { return bfloat16_to_float(block_scales[o * (K / QK) + b]); }
  float row_scale(int64_t) const { return 1.f; }
#if defined(OSSGPT_AVX512)
  // Blocks b and b + 1's scales in one 4-byte load, both bfloat16s in every int32 lane: b's is the low half (shifted
  // up to a float32's place), b + 1's the high half (already there).
  __m512 block_scales2(int64_t o, int64_t b) const {
    int32_t pair;
    std::memcpy(&pair, block_scales + o * (K / QK) + b, sizeof pair);
    const __m512i both = _mm512_set1_epi32(pair);
    return _mm512_castsi512_ps(_mm512_mask_blend_epi32(kSecondBlock, _mm512_slli_epi32(both, 16),
                                                       _mm512_and_si512(both, _mm512_set1_epi32(int32_t(0xFFFF0000)))));
  }
#endif
};

// W's rows, one per int32 lane: 16 per register with AVX-512, 8 with AVX2 (row_lanes; int8 with row scales, or
// MXFP4): what the linear products use (`int8_linear`: the LM head; `mxfp4_linear`: a long prompt's experts). From
// two activation rows on it is the faster; for one row, the tiles are, in cache. The fused experts (decoding: an
// expert gets one token or a few) keep W and its tiles. Either way a row's result is the same bit for bit whatever
// the other rows are.
template <class W>
struct RowLanes : W {
  explicit RowLanes(const W& w) : W(w) {}
  static constexpr bool kRowLanes = true;
};

// ----------------------------------------------------------------------------- the block dot products
#if defined(__AVX2__)
// Sum of 32 products of signed bytes w and q, as 8 int32 partial sums. The byte instructions multiply an
// unsigned operand by a signed one: |w| times q carrying w's sign is the same product. (|w| <= 127 and
// |q| <= 127, so vpmaddubsw's pairwise int16 sums cannot saturate.)
inline __m256i dot_block(__m256i w_abs, __m256i w, __m256i q) {
  const __m256i q_signed = _mm256_sign_epi8(q, w);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), w_abs, q_signed);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w_abs, q_signed);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w_abs, q_signed), _mm256_set1_epi16(1));
#endif
}

// acc plus the sums of 32 products of unsigned bytes u and signed bytes q, as 8 int32 partial sums. (Without VNNI,
// vpmaddubsw's pairwise int16 sums saturate beyond 32,767: u must stay below 129, as the MXFP4 codes plus 12 do.)
inline __m256i dot_unsigned(__m256i acc, __m256i u, __m256i q) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, q);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, q);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, q), _mm256_set1_epi16(1)));
#endif
}

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One tile of the output: weight rows o, o + stride, .., o + (R - 1) * stride times activation rows t0 .. t0 + T - 1,
// into sums[r * T + i].
// Each weight block is decoded once for the T activation rows, each activation block loaded once for the R weight
// rows, and the R * T accumulators are independent chains (one chain would wait on each multiply-add's latency).
// Weights whose codes come unsigned (W::kOffset > 0, u = w + kOffset) need no sign fix per weight row:
//     sum u q = sum w q + kOffset sum q,
// so each activation block's lanes start from -kOffset * (their sum of q), once per activation row for the R weight
// rows. Either way the integer sums are the signed ones exactly.
template <int R, int T, class W>
inline void tile(const W& w, int64_t o, int64_t stride, const Q8Rows& x, int64_t t0, int64_t G, float* sums) {
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < T; ++i) acc[r][i] = _mm256_setzero_ps();
  const int64_t K = G * QK;
  const __m256i offset = _mm256_set1_epi8(char(W::kOffset));
  for (int64_t b = 0; b < G; ++b) {
    __m256i wb[R], w_abs[R];
    float s[R];
    for (int r = 0; r < R; ++r) {
      w.prefetch(o + r * stride, b);
      wb[r] = w.block(o + r * stride, b);
      if constexpr (W::kOffset == 0) w_abs[r] = _mm256_sign_epi8(wb[r], wb[r]);
      s[r] = w.block_scale(o + r * stride, b);
    }
    for (int i = 0; i < T; ++i) {
      const int64_t t = t0 + i;
      const __m256i qb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + t * K + b * QK));
      const float dt = x.d[t * G + b];
      __m256i start = _mm256_setzero_si256();
      if constexpr (W::kOffset > 0) start = _mm256_sub_epi32(start, dot_unsigned(start, offset, qb));
      for (int r = 0; r < R; ++r) {
        const __m256i dot = W::kOffset > 0 ? dot_unsigned(start, wb[r], qb) : dot_block(w_abs[r], wb[r], qb);
        acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(s[r] * dt), acc[r][i]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < T; ++i) sums[r * T + i] = horizontal_sum(acc[r][i]);
}
#if defined(OSSGPT_AVX512)
// The same tile, two blocks at a time in 512-bit registers (G must be even). The weights come as unsigned bytes
// u = w + W::kOffset2 (block2), which vpdpbusd multiplies by the signed activations as they are:
//     sum u q = sum w q + kOffset2 sum q,
// so each activation pair's lanes start from -kOffset2 * (their sum of q), once per activation row for the tile's R
// weight rows. The integer sums are the signed ones exactly; no sign fix per weight row.
template <int R, int T, class W>
inline void tile2(const W& w, int64_t o, int64_t stride, const Q8Rows& x, int64_t t0, int64_t G, float* sums) {
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < T; ++i) acc[r][i] = _mm512_setzero_ps();
  const int64_t K = G * QK;
  const __m512i offset = _mm512_set1_epi8(char(W::kOffset2));
  for (int64_t b = 0; b < G; b += 2) {
    // Scales as a vector holding each lane's block's scale (W::kSecondBlock: the int32 lanes of block b + 1): one
    // per weight row and one per activation row, then their product.
    __m512i wu[R];
    __m512 w_scale[R];
    for (int r = 0; r < R; ++r) {
      w.prefetch(o + r * stride, b);
      wu[r] = w.block2(o + r * stride, b);
      w_scale[r] = w.block_scales2(o + r * stride, b);
    }
    for (int i = 0; i < T; ++i) {
      const int64_t t = t0 + i;
      const __m512i qb = _mm512_loadu_si512(x.q + t * K + b * QK);
      const __m512 x_scale =
          _mm512_mask_blend_ps(W::kSecondBlock, _mm512_set1_ps(x.d[t * G + b]), _mm512_set1_ps(x.d[t * G + b + 1]));
      const __m512i start =
          _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), offset, qb));
      for (int r = 0; r < R; ++r) {
        const __m512i dot = _mm512_dpbusd_epi32(start, wu[r], qb);
        acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(w_scale[r], x_scale), acc[r][i]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < T; ++i) sums[r * T + i] = _mm512_reduce_add_ps(acc[r][i]);
}
#endif
#else
template <int R, int T, class W>
inline void tile(const W& w, int64_t o, int64_t stride, const Q8Rows& x, int64_t t0, int64_t G, float* sums) {
  int8_t wb[QK];
  const int64_t K = G * QK;
  for (int j = 0; j < R * T; ++j) sums[j] = 0.f;
  for (int r = 0; r < R; ++r) {
    for (int64_t b = 0; b < G; ++b) {
      w.block_scalar(o + r * stride, b, wb);
      const float s = w.block_scale(o + r * stride, b);
      for (int i = 0; i < T; ++i) {
        const int8_t* qb = x.q + (t0 + i) * K + b * QK;
        int32_t dot = 0;
        for (int64_t j = 0; j < QK; ++j) dot += int32_t(wb[j]) * int32_t(qb[j]);
        sums[r * T + i] += float(dot) * (s * x.d[(t0 + i) * G + b]);
      }
    }
  }
}
#endif

#if !defined(OSSGPT_AVX512)
template <int R, int T, class W>
inline void tile2(const W& w, int64_t o, int64_t stride, const Q8Rows& x, int64_t t0, int64_t G, float* sums) {
  tile<R, T>(w, o, stride, x, t0, G, sums);  // no 512-bit registers: never called (`wide` is false)
}
#endif

// Weight rows o, o + stride, .., o + (R - 1) * stride times all n activation rows: tiles of 4 activation rows, then
// one at a time.
template <int R, class W>
inline void rows(const W& w, int64_t o, int64_t stride, const Q8Rows& x, int64_t n, int64_t G, int64_t O,
                 const float* bias, float* y) {
  float sums[R * 4];
  int64_t t = 0;
  auto store = [&](int T) {  // one rounding (fma), whatever the compiler would contract: tiles of any shape agree
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < T; ++i)
        y[(t + i) * O + o + r * stride] =
            std::fma(sums[r * T + i], w.row_scale(o + r * stride), bias ? bias[o + r * stride] : 0.f);
  };
  for (; t + 4 <= n; t += 4) {
    wide(G) ? tile2<R, 4>(w, o, stride, x, t, G, sums) : tile<R, 4>(w, o, stride, x, t, G, sums);
    store(4);
  }
  for (; t < n; ++t) {
    wide(G) ? tile2<R, 1>(w, o, stride, x, t, G, sums) : tile<R, 1>(w, o, stride, x, t, G, sums);
    store(1);
  }
}

// How far ahead the paths with a weight row per lane prefetch each row: into the rows of a group after this one (the
// fixed distance of `prefetch` would fall inside this group when rows are long), and at least 16 KB.
inline int64_t group_ahead(int64_t row_bytes) { return std::max<int64_t>(16 * row_bytes, 16384); }

#if defined(OSSGPT_AVX512)
// ------------------------------------------------------------------------------- 16 weight rows at a time
// The tiles above give each (weight row, activation row) pair a vector of 16 partial sums, converted to float and
// scaled every two blocks and added up across lanes at the end: a conversion per 64 products, on the same port as
// vpdpbusd. Here a 512-bit register holds 16 weight rows instead, one int32 lane each, so the lane ends a block
// holding the block's whole integer sum: one conversion and one multiply-add per block of 32, for 16 rows at once.
//
// Two ways to get there, chosen by the number of activation rows; both give every row's block sums exactly, so a
// row's result is the same bit for bit whatever the rows it is computed with:
//   tile_lanes (2 activation rows or more): the 16 rows' next 64 codes (block2) are transposed (16 x 16 int32):
//     register j then holds codes 4j .. 4j + 3 of every row, and vpdpbusd multiplies it by those 4 activation
//     codes broadcast.
//   single_lanes (one activation row): each row's 64 codes times the activations, as in tile2, then the 16 vectors of
//     partial sums are added across lanes and transposed in one tree (46 instructions where tile_lanes pays 64 for the
//     transpose alone).
// The codes are unsigned, w + kOffset2, so each block's sum is offset by kOffset2 times the activations' sum of
// codes (Q8Rows::sums): it starts from minus that, starts [n, G] (row_lanes).

constexpr int kLanes = 16;  // weight rows per register (row_lanes)
template <class W>
constexpr int32_t kLaneOffset = W::kOffset2;  // what the lanes' weight codes are offset by (block2)

// v[r] lane j -> v[j] lane r, for 16 x 16 int32.
inline void transpose16(__m512i v[16]) {
  __m512i t[16];
  for (int k = 0; k < 16; k += 2) {  // pairs of rows interleaved: per 128-bit lane, (r, r + 1) x 2 columns
    t[k] = _mm512_unpacklo_epi32(v[k], v[k + 1]);
    t[k + 1] = _mm512_unpackhi_epi32(v[k], v[k + 1]);
  }
  for (int k = 0; k < 16; k += 4) {  // then 4 rows x 1 column per 128-bit lane
    v[k] = _mm512_unpacklo_epi64(t[k], t[k + 2]);
    v[k + 1] = _mm512_unpackhi_epi64(t[k], t[k + 2]);
    v[k + 2] = _mm512_unpacklo_epi64(t[k + 1], t[k + 3]);
    v[k + 3] = _mm512_unpackhi_epi64(t[k + 1], t[k + 3]);
  }
  for (int h = 0; h < 16; h += 8) {  // then the 128-bit lanes: two steps of 4 x 4
    for (int m = 0; m < 4; ++m) {
      t[h + m] = _mm512_shuffle_i32x4(v[h + m], v[h + 4 + m], 0x88);
      t[h + 4 + m] = _mm512_shuffle_i32x4(v[h + m], v[h + 4 + m], 0xDD);
    }
  }
  for (int m = 0; m < 8; ++m) {
    v[m] = _mm512_shuffle_i32x4(t[m], t[m + 8], 0x88);
    v[m + 8] = _mm512_shuffle_i32x4(t[m], t[m + 8], 0xDD);
  }
}

// 4 bytes from memory in every int32 lane. (A load that broadcasts: a value first copied to a general register would
// cost a shuffle per broadcast, on the port the column products also need.)
inline __m512i broadcast4(const int8_t* p) { return _mm512_broadcastd_epi32(_mm_loadu_si32(p)); }

// Which of a block pair's 16 int32 columns (4 codes each) hold the k-th 4 codes of block b + h: in kNatural order
// block b is columns 0-7; in kPair order (MXFP4) it is 0-3 (its even values) and 8-11 (its odd ones).
inline int column(Layout layout, int h, int k) { return layout == kPair ? (k / 4) * 8 + h * 4 + k % 4 : h * 8 + k; }

// Weight rows o .. o + count - 1 (count <= 16; the other lanes are zero rows) times activation rows 0 .. n - 1, into
// acc [n, 16] (row t's lane r: weight row o + r, without its row scale). Each block pair's 16 x 64 codes are
// transposed once for all n rows; the rows' sums wait in acc (in L1) between pairs. scales [G, 16]: the rows' block
// scales, lane by lane (if W has block scales); starts [n, G]: each block's starting sum (above).
template <class W>
inline void tile_lanes(const W& w, int64_t o, int64_t count, const float* scales, const Q8Rows& x, int64_t n,
                       const int32_t* starts, float* acc) {
  const int64_t K = x.K, G = K / QK, ahead = group_ahead(w.row_bytes());
  const Layout layout = w.layout();
  std::fill(acc, acc + n * 16, 0.f);
  for (int64_t b = 0; b < G; b += 2) {
    __m512i v[16];
    for (int r = 0; r < 16; ++r) {
      w.prefetch(o + r, b, ahead);  // (never faults, past the matrix too)
      v[r] = r < count ? w.block2(o + r, b) : _mm512_set1_epi8(char(W::kOffset2));  // (a zero row's codes)
    }
    transpose16(v);
    for (int64_t t = 0; t < n; ++t) {
      __m512 sum_t = _mm512_loadu_ps(acc + t * 16);
      const int8_t* codes = x.q + t * K + b * QK;  // the pair's 64 activation codes
      for (int h = 0; h < 2; ++h) {  // blocks b and b + 1
        __m512i sum = _mm512_set1_epi32(starts[t * G + b + h]);
        for (int k = 0; k < 8; ++k) {
          const int j = column(layout, h, k);
          sum = _mm512_dpbusd_epi32(sum, v[j], broadcast4(codes + 4 * j));
        }
        const __m512 d = _mm512_set1_ps(x.d[t * G + b + h]);
        const __m512 scale = W::kBlockScales ? _mm512_mul_ps(_mm512_loadu_ps(scales + (b + h) * 16), d) : d;
        sum_t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, sum_t);
      }
      _mm512_storeu_ps(acc + t * 16, sum_t);
    }
  }
}

// The same for one activation row t, into out [16].
template <class W>
inline void single_lanes(const W& w, int64_t o, int64_t count, const float* scales, const Q8Rows& x, int64_t t,
                         const int32_t* starts, float* out) {
  const int64_t K = x.K, G = K / QK, ahead = group_ahead(w.row_bytes());
  // The 128-bit lanes (4 columns each) of block b and of block b + 1, as shuffle_i32x4 selects them from two vectors
  // (see `column`): kNatural 0, 1 and 2, 3; kPair 0, 2 and 1, 3.
  const bool pair = w.layout() == kPair;
  __m512 acc = _mm512_setzero_ps();
  for (int64_t b = 0; b < G; b += 2) {
    const __m512i q = _mm512_loadu_si512(x.q + t * K + b * QK);
    __m512i v[16];  // v[r]: row r's 16 partial sums
    for (int r = 0; r < 16; ++r) {
      w.prefetch(o + r, b, ahead);  // (never faults, past the matrix too)
      v[r] = r < count ? _mm512_dpbusd_epi32(_mm512_setzero_si512(), w.block2(o + r, b), q) : _mm512_setzero_si512();
    }
    // Columns added in pairs, then fours (per 128-bit lane, one row each), then the 128-bit lanes of a block.
    __m512i u[8];
    for (int k = 0; k < 8; ++k)
      u[k] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_epi32(v[2 * k], v[2 * k + 1]));
    for (int k = 0; k < 4; ++k)  // 128-bit lane L: rows 4k .. 4k + 3, each summed over columns 4L .. 4L + 3
      u[k] = _mm512_add_epi32(_mm512_unpacklo_epi64(u[2 * k], u[2 * k + 1]), _mm512_unpackhi_epi64(u[2 * k], u[2 * k + 1]));
    for (int k = 0; k < 2; ++k)  // [rows 8k.., block b; rows 8k.., block b + 1; rows 8k + 4.., b; .., b + 1]
      u[k] = pair ? _mm512_add_epi32(_mm512_shuffle_i32x4(u[2 * k], u[2 * k + 1], 0x44),
                                     _mm512_shuffle_i32x4(u[2 * k], u[2 * k + 1], 0xEE))
                  : _mm512_add_epi32(_mm512_shuffle_i32x4(u[2 * k], u[2 * k + 1], 0x88),
                                     _mm512_shuffle_i32x4(u[2 * k], u[2 * k + 1], 0xDD));
    const __m512i sums[2] = {_mm512_shuffle_i32x4(u[0], u[1], 0x88), _mm512_shuffle_i32x4(u[0], u[1], 0xDD)};
    for (int h = 0; h < 2; ++h) {
      const __m512i sum = _mm512_add_epi32(sums[h], _mm512_set1_epi32(starts[t * G + b + h]));
      const __m512 d = _mm512_set1_ps(x.d[t * G + b + h]);
      const __m512 scale = W::kBlockScales ? _mm512_mul_ps(_mm512_loadu_ps(scales + (b + h) * 16), d) : d;
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc);
    }
  }
  _mm512_storeu_ps(out, acc);
}

#elif defined(__AVX2__)
// ------------------------------------------------------------------------------- 8 weight rows at a time
// The 256-bit twin of the 16-row path above, for machines without AVX-512: a register holds 8 weight rows, one
// int32 lane each, and a block (32 codes, 8 int32 columns) is transposed once for all the activation rows
// (tile_lanes), or, for one activation row, the 8 rows' partial sums are added across lanes in one tree
// (single_lanes). Each block's sum is exact either way. MXFP4's codes are unsigned (w + kOffset); int8 codes keep
// their sign (kOffset 0: w + 128 would saturate vpmaddubsw), and each column product fixes signs as `dot_block` does.

constexpr int kLanes = 8;  // weight rows per register (row_lanes)
template <class W>
constexpr int32_t kLaneOffset = W::kOffset;  // what the lanes' weight codes are offset by (block)

// v[r] lane j -> v[j] lane r, for 8 x 8 int32.
inline void transpose8(__m256i v[8]) {
  __m256i t[8];
  for (int k = 0; k < 8; k += 2) {  // per 128-bit half, rows (r, r + 1) x 2 columns
    t[k] = _mm256_unpacklo_epi32(v[k], v[k + 1]);
    t[k + 1] = _mm256_unpackhi_epi32(v[k], v[k + 1]);
  }
  for (int k = 0; k < 8; k += 4) {  // then rows k .. k + 3 of one column per half: columns (m, m + 4)
    v[k] = _mm256_unpacklo_epi64(t[k], t[k + 2]);
    v[k + 1] = _mm256_unpackhi_epi64(t[k], t[k + 2]);
    v[k + 2] = _mm256_unpacklo_epi64(t[k + 1], t[k + 3]);
    v[k + 3] = _mm256_unpackhi_epi64(t[k + 1], t[k + 3]);
  }
  for (int m = 0; m < 4; ++m) {  // then the halves: rows 0-3 and 4-7 of column m, of column m + 4
    t[m] = _mm256_permute2x128_si256(v[m], v[m + 4], 0x20);
    t[m + 4] = _mm256_permute2x128_si256(v[m], v[m + 4], 0x31);
  }
  for (int k = 0; k < 8; ++k) v[k] = t[k];
}

// 4 bytes from memory in every int32 lane (see the 512-bit broadcast4).
inline __m256i broadcast4(const int8_t* p) { return _mm256_broadcastd_epi32(_mm_loadu_si32(p)); }

// acc plus a transposed block's 8 columns (v[j]: codes 4j .. 4j + 3 of each of the 8 rows; |v[j]| in v_abs[j], for
// signed codes) times the block's 32 activation codes q, 4 at a time broadcast, as int32 sums per row.
template <class W>
inline __m256i add_columns(__m256i acc, const __m256i v[8], const __m256i v_abs[8], const int8_t* q) {
#if !defined(__AVXVNNI__) && !(defined(__AVX512VNNI__) && defined(__AVX512VL__))
  if constexpr (W::kOffset > 0) {
    // Without VNNI, unsigned codes (at most 2 kOffset) keep vpmaddubsw's pairwise sums small enough for 4 columns' to
    // add up in int16 before one vpmaddwd widens them: a quarter of the widenings and int32 adds.
    static_assert(4 * 2 * (2 * W::kOffset) * 127 < 32768, "4 columns' pairwise sums must fit int16");
    for (int j = 0; j < 8; j += 4) {
      __m256i pairs = _mm256_maddubs_epi16(v[j], broadcast4(q + 4 * j));
      for (int k = 1; k < 4; ++k)
        pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(v[j + k], broadcast4(q + 4 * (j + k))));
      acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
    }
    return acc;
  }
#endif
  for (int j = 0; j < 8; ++j) {
    if constexpr (W::kOffset > 0) {
      acc = dot_unsigned(acc, v[j], broadcast4(q + 4 * j));
    } else {
      acc = _mm256_add_epi32(acc, dot_block(v_abs[j], v[j], broadcast4(q + 4 * j)));
    }
  }
  return acc;
}

// Weight rows o .. o + count - 1 (count <= 8; the other lanes are zero rows) times activation rows 0 .. n - 1, into
// acc [n, 8] (row t's lane r: weight row o + r, without its row scale). scales [G, 8]: the rows' block scales, lane
// by lane (if W has block scales); starts [n, G]: each block's starting sum, minus kOffset times the activations' sum
// of codes (0 for signed codes).
template <class W>
inline void tile_lanes(const W& w, int64_t o, int64_t count, const float* scales, const Q8Rows& x, int64_t n,
                       const int32_t* starts, float* acc) {
  const int64_t K = x.K, G = K / QK, ahead = group_ahead(w.row_bytes());
  std::fill(acc, acc + n * 8, 0.f);
  for (int64_t b = 0; b < G; ++b) {
    __m256i v[8], v_abs[8];
    for (int r = 0; r < 8; ++r) {
      w.prefetch(o + r, b, ahead);  // (never faults, past the matrix too)
      v[r] = r < count ? w.block(o + r, b) : _mm256_set1_epi8(char(W::kOffset));  // (a zero row's codes)
    }
    transpose8(v);
    if constexpr (W::kOffset == 0)
      for (int j = 0; j < 8; ++j) v_abs[j] = _mm256_sign_epi8(v[j], v[j]);
    const __m256 block_scale = W::kBlockScales ? _mm256_loadu_ps(scales + b * 8) : _mm256_set1_ps(1.f);
    for (int64_t t = 0; t < n; ++t) {
      const __m256i sum = add_columns<W>(_mm256_set1_epi32(starts[t * G + b]), v, v_abs, x.q + t * K + b * QK);
      const __m256 d = _mm256_set1_ps(x.d[t * G + b]);
      const __m256 scale = W::kBlockScales ? _mm256_mul_ps(block_scale, d) : d;
      _mm256_storeu_ps(acc + t * 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, _mm256_loadu_ps(acc + t * 8)));
    }
  }
}

// The same for one activation row t, into out [8].
template <class W>
inline void single_lanes(const W& w, int64_t o, int64_t count, const float* scales, const Q8Rows& x, int64_t t,
                         const int32_t* starts, float* out) {
  const int64_t K = x.K, G = K / QK, ahead = group_ahead(w.row_bytes());
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < G; ++b) {
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + t * K + b * QK));
    __m256i v[8];  // v[r]: row r's 8 partial sums
    for (int r = 0; r < 8; ++r) {
      w.prefetch(o + r, b, ahead);
      if (r >= count) {
        v[r] = _mm256_setzero_si256();
      } else if constexpr (W::kOffset > 0) {
        v[r] = dot_unsigned(_mm256_setzero_si256(), w.block(o + r, b), q);
      } else {
        const __m256i wb = w.block(o + r, b);
        v[r] = dot_block(_mm256_sign_epi8(wb, wb), wb, q);
      }
    }
    // Lanes added in pairs, then fours (per 128-bit half, one row each), then the halves.
    const __m256i h0 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    const __m256i h1 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    const __m256i sums = _mm256_add_epi32(_mm256_permute2x128_si256(h0, h1, 0x20),
                                          _mm256_permute2x128_si256(h0, h1, 0x31));
    const __m256i sum = _mm256_add_epi32(sums, _mm256_set1_epi32(starts[t * G + b]));
    const __m256 d = _mm256_set1_ps(x.d[t * G + b]);
    const __m256 scale = W::kBlockScales ? _mm256_mul_ps(_mm256_loadu_ps(scales + b * 8), d) : d;
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, acc);
  }
  _mm256_storeu_ps(out, acc);
}
#endif

#if defined(__AVX2__)
// Output columns begin .. end - 1 of y [n, O], kLanes weight rows at a time: tile_lanes, or single_lanes for one
// activation row.
template <class W>
inline void row_lanes(const W& w, const Q8Rows& x, int64_t n, int64_t O, const float* bias, float* y, int64_t begin,
                      int64_t end) {
  const int64_t G = x.K / QK;
  // The group's block scales, a lane per row, built once for all its activation rows (built per block inside the
  // tiles, each vector load would wait on the scalar stores just before it). acc: see tile_lanes.
  std::vector<float> scales(W::kBlockScales ? G * kLanes : 0), acc(n * kLanes);
  // Each block's starting sum, minus the codes' offset times the activations' sum of codes (see tile_lanes), once for
  // all the groups: loaded per block as it is, where computed in place it would cost a broadcast from a general
  // register, on the port the column products need.
  std::vector<int32_t> starts(n * G);
  for (int64_t i = 0; i < n * G; ++i) starts[i] = -kLaneOffset<W> * x.sums[i];
  for (int64_t o = begin; o < end; o += kLanes) {
    const int64_t count = std::min<int64_t>(kLanes, end - o);
    if constexpr (W::kBlockScales)
      for (int r = 0; r < kLanes; ++r)
        for (int64_t b = 0; b < G; ++b) scales[b * kLanes + r] = r < count ? w.block_scale(o + r, b) : 0.f;
    if (n == 1) {
      single_lanes(w, o, count, scales.data(), x, 0, starts.data(), acc.data());
    } else {
      tile_lanes(w, o, count, scales.data(), x, n, starts.data(), acc.data());
    }
    for (int64_t t = 0; t < n; ++t)  // as `rows`: one rounding for the row scale and bias
      for (int r = 0; r < count; ++r)
        y[t * O + o + r] = std::fma(acc[t * kLanes + r], w.row_scale(o + r), bias ? bias[o + r] : 0.f);
  }
}
#endif

// Output columns begin .. end - 1 of y [n, O] (one thread's share). RowLanes (int8 with row scales or MXFP4, in the
// linear products): a weight row per lane (row_lanes; AVX-512's on the 512-bit path). Else tiles of 4 or 2 weight
// rows. Four where a tile's accumulators leave room: decoding (one to three activation rows: 4 accumulators, more
// independent chains), or int8 weights with block scales on the 512-bit path (4 x 4 of AVX-512's 32 registers: each
// activation block is loaded once for 4 weight rows). Else two: 2 x 4 accumulators fit AVX2's 16 registers, and
// MXFP4's 512-bit unpacking needs registers of its own.
template <class W>
void row_range(const W& w, const Q8Rows& x, int64_t n, int64_t G, int64_t O, const float* bias, float* y,
               int64_t begin, int64_t end) {
#if defined(OSSGPT_AVX512)
  if constexpr (W::kRowLanes) {
    if (wide(G)) return row_lanes(w, x, n, O, bias, y, begin, end);
  }
#elif defined(__AVX2__)
  if constexpr (W::kRowLanes) return row_lanes(w, x, n, O, bias, y, begin, end);
#endif
  // Tiles of R rows over rows o .. end - 1, a tile's rows taken from the R equal parts of them: memory feeds a core
  // faster from several places at once than from one sequential stream (BENCHMARKS.md), and a row's result does not
  // depend on the rows beside it. Fewer than R rows are left.
  int64_t o = begin;
  auto tiles = [&](auto R) {
    const int64_t part = (end - o) / R;
    for (int64_t i = 0; i < part; ++i) rows<R>(w, o + i, part, x, n, G, O, bias, y);
    o += R * part;
  };
  if (n < 4 || (wide(G) && W::kWideTilesOfFour)) tiles(std::integral_constant<int, 4>{});
  tiles(std::integral_constant<int, 2>{});
  if (o < end) rows<1>(w, o, 1, x, n, G, O, bias, y);
}

// y [n, O] = x [n, K] (quantized) times the weights' rows, plus bias [O] (or none).
template <class W>
void q8_matmul(const W& w, const Q8Rows& x, int64_t n, int64_t O, const float* bias, float* y) {
  const int64_t G = x.K / QK;
  // Enough rows per task that thread start-up is paid back (a row costs ~G * n block products): a decoded token's
  // 512 x 512 product already gains from a second thread (`python bench/int8_rows.py --vocab 512 --hidden 512`).
  const int64_t grain = std::max<int64_t>(4, 4096 / std::max<int64_t>(1, G * n));
  at::parallel_for(0, O, grain, [&](int64_t begin, int64_t end) { row_range(w, x, n, G, O, bias, y, begin, end); });
}

// ---------------------------------------------------------------------------------------- entry points
// The entry points take activations, biases and mixing weights in whatever float dtype and layout the model has
// them (converted here, where it costs less than a conversion call from Python) and return activations in x's dtype.

// t as a contiguous float32 tensor (t itself when it is one).
torch::Tensor as_float(const torch::Tensor& t) { return t.to(torch::kFloat32).contiguous(); }

// x: a CPU matrix [n, K], or with `leading`, any number of leading dimensions [..., K].
void check_activations(const torch::Tensor& x, int64_t K, bool leading = false) {
  TORCH_CHECK(x.device().is_cpu() && (leading ? x.dim() >= 1 : x.dim() == 2),
              leading ? "x must be a CPU tensor [..., K]" : "x must be a CPU matrix [n, K]");
  TORCH_CHECK(x.size(-1) == K, "x has ", x.size(-1), " columns, the weight ", K);
  TORCH_CHECK(K % QK == 0, "K (", K, ") must be a multiple of 32");
}

// A bias of O values as contiguous float32 (or none).
c10::optional<torch::Tensor> float_bias(const c10::optional<torch::Tensor>& bias, int64_t O) {
  if (!bias.has_value()) return c10::nullopt;
  TORCH_CHECK(bias->numel() == O, "bias must be a vector of ", O, " values");
  return as_float(*bias);
}

// y [..., O] = x [..., K] times the weights' rows, plus bias [O] (or none), in x's dtype.
template <class W>
torch::Tensor run(const W& w, const torch::Tensor& x_in, int64_t O, const c10::optional<torch::Tensor>& bias_in) {
  const torch::Tensor x = as_float(x_in);
  const c10::optional<torch::Tensor> bias = float_bias(bias_in, O);
  const int64_t K = x.size(-1), n = x.numel() / K;
  Q8Buffers buffers(n, K, x.options());
  const Q8Rows rows = buffers.rows();
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) rows.quantize(t, xp + t * K, w.layout());
  });
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = O;
  auto y = torch::empty(shape, x.options());
  q8_matmul(w, rows, n, O, bias ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>());
  return y.to(x_in.scalar_type());
}

// x [..., K] times MXFP4 weight rows (blocks [O, K/32, 16], scales [O, K/32], uint8) + bias -> [..., O].
torch::Tensor mxfp4_linear(const torch::Tensor& x, const torch::Tensor& blocks, const torch::Tensor& scales,
                           const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(blocks.scalar_type() == torch::kUInt8 && scales.scalar_type() == torch::kUInt8 && blocks.dim() == 3 &&
                  blocks.size(2) == QK / 2 && scales.dim() == 2 && blocks.size(0) == scales.size(0) &&
                  blocks.size(1) == scales.size(1) && blocks.is_contiguous() && scales.is_contiguous(),
              "blocks [O, G, 16] and scales [O, G] must be contiguous uint8 tensors");
  const int64_t O = blocks.size(0), G = blocks.size(1);
  check_activations(x, G * QK, true);
  const RowLanes<MXFP4Weights> w(MXFP4Weights(blocks.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(), G));
  return run(w, x, O, bias);
}

// Tokens through their experts, each projection of all the experts in one parallel loop:
//   x [N, H], experts [N, k] (integers: each token's experts), mix [N, k] (their mixing weights);
//   gate_up(e), down(e): expert e's weight rows (gate and up interleaved: [2I, H], then [H, I]), biases
//   gate_up_bias [E, 2I] and down_bias [E, H] -> y [N, H] in x's dtype, y[t] = sum over s of mix[t, s] *
//   down(clamped_swiglu(gate_up(x[t]))) of expert experts[t, s].
// The (token, expert) pairs are sorted by expert, so each expert's rows are read once for all its tokens; each
// token is quantized once for its k gate_up products; the threads start twice per layer, not 4 times per expert.
template <class GateUp, class Down>
torch::Tensor fused_experts(const torch::Tensor& x_in, const torch::Tensor& experts_in, const torch::Tensor& mix_in,
                            GateUp gate_up, Down down, int64_t E, int64_t I, const torch::Tensor& gate_up_bias_in,
                            const torch::Tensor& down_bias_in, double alpha, double limit) {
  const torch::Tensor x = as_float(x_in), experts = experts_in.to(torch::kInt64).contiguous(), mix = as_float(mix_in);
  TORCH_CHECK(experts.dim() == 2 && mix.sizes() == experts.sizes() && experts.size(0) == x.size(0),
              "experts and mix must be [N, k], N the rows of x");
  const int64_t N = x.size(0), k = experts.size(1), H = x.size(1), I2 = 2 * I, P = N * k;
  const int64_t G_in = H / QK, G_mid = I / QK;
  TORCH_CHECK(I % QK == 0, "the experts' width (", I, ") must be a multiple of 32");
  const torch::Tensor gate_up_bias = as_float(gate_up_bias_in), down_bias = as_float(down_bias_in);
  TORCH_CHECK(gate_up_bias.numel() == E * I2 && down_bias.numel() == E * H, "expert biases must be [E, 2I] and [E, H]");
  const int64_t* ids = experts.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p) TORCH_CHECK(ids[p] >= 0 && ids[p] < E, "expert index out of range");

  // Counting sort of the pairs p = t * k + s by expert: sorted[i] = the i-th pair, expert e's at begin[e]...
  std::vector<int64_t> begin(E + 1, 0), sorted(P), slot_of(P);
  for (int64_t p = 0; p < P; ++p) ++begin[ids[p] + 1];
  for (int64_t e = 0; e < E; ++e) begin[e + 1] += begin[e];
  std::vector<int64_t> next(begin.begin(), begin.end() - 1);
  for (int64_t p = 0; p < P; ++p) {
    slot_of[p] = next[ids[p]]++;
    sorted[slot_of[p]] = p;
  }
  std::vector<int64_t> used;  // the experts that received tokens
  for (int64_t e = 0; e < E; ++e)
    if (begin[e + 1] > begin[e]) used.push_back(e);

  auto opts = x.options();
  Q8Buffers x_buffers(N, H, opts), pair_buffers(P, H, opts), mid_buffers(P, I, opts);
  const Q8Rows qx = x_buffers.rows(), qp = pair_buffers.rows(), qh = mid_buffers.rows();  // qx: each token once
  auto h = torch::empty({P, I2}, opts);  // gate_up outputs, then (first I columns) the activations
  auto out = torch::empty({P, H}, opts);
  const float* xp = x.data_ptr<float>();
  float *hp = h.data_ptr<float>(), *op = out.data_ptr<float>();

  const Layout in_layout = gate_up(0).layout(), mid_layout = down(0).layout();
  at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) qx.quantize(t, xp + t * H, in_layout);
  });
  for (int64_t i = 0; i < P; ++i) qp.copy(i, qx, sorted[i] / k);
  // One projection of every used expert: output rows [0, used * O) split over the threads; expert e multiplies
  // its pairs' inputs (rows begin[e] .. begin[e + 1] - 1 of q) into the same rows of y.
  auto project = [&](int64_t O, int64_t G, auto weights_of, const Q8Rows& q, const float* bias, float* y) {
    const int64_t per_row = std::max<int64_t>(1, G * P / static_cast<int64_t>(used.size()));
    at::parallel_for(0, static_cast<int64_t>(used.size()) * O, std::max<int64_t>(4, 16384 / per_row),
                     [&](int64_t lo, int64_t hi) {
      for (int64_t j = lo / O; j * O < hi; ++j) {
        const int64_t e = used[j], first = begin[e], n = begin[e + 1] - first;
        row_range(weights_of(e), q.from(first), n, G, O, bias + e * O, y + first * O,
                  std::max(lo, j * O) - j * O, std::min(hi, (j + 1) * O) - j * O);
      }
    });
  };
  project(I2, G_in, gate_up, qp, gate_up_bias.data_ptr<float>(), hp);
  const float a = static_cast<float>(alpha), l = static_cast<float>(limit);
  at::parallel_for(0, P, 8, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {  // clamped SwiGLU (ossgpt.model.moe.clamped_swiglu), then quantized
      float* hi = hp + i * I2;
      for (int64_t c = 0; c < I; ++c) {
        const float gate = std::min(hi[2 * c], l), up = std::clamp(hi[2 * c + 1], -l, l);
        hi[c] = (up + 1.f) * (gate / (1.f + std::exp(-a * gate)));  // in place: column c is read before written
      }
      qh.quantize(i, hi, mid_layout);
    }
  });
  project(H, G_mid, down, qh, down_bias.data_ptr<float>(), op);
  auto y = torch::zeros({N, H}, opts);
  float* yp = y.data_ptr<float>();
  const float* w = mix.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      for (int64_t s = 0; s < k; ++s) {  // in slot order, whatever the experts' order
        const float* row = op + slot_of[t * k + s] * H;
        for (int64_t c = 0; c < H; ++c) yp[t * H + c] += w[t * k + s] * row[c];
      }
  });
  return y.to(x_in.scalar_type());
}

// MXFP4 experts: gate_up blocks [E, 2I, H/32, 16], scales [E, 2I, H/32]; down blocks [E, H, I/32, 16], scales
// [E, H, I/32] (uint8); see fused_experts.
torch::Tensor mxfp4_experts(const torch::Tensor& x, const torch::Tensor& experts, const torch::Tensor& mix,
                            const torch::Tensor& gate_up_blocks, const torch::Tensor& gate_up_scales,
                            const torch::Tensor& gate_up_bias, const torch::Tensor& down_blocks,
                            const torch::Tensor& down_scales, const torch::Tensor& down_bias, double alpha,
                            double limit) {
  for (const auto* t : {&gate_up_blocks, &gate_up_scales, &down_blocks, &down_scales})
    TORCH_CHECK(t->scalar_type() == torch::kUInt8 && t->is_contiguous(), "packed experts must be contiguous uint8");
  TORCH_CHECK(gate_up_blocks.dim() == 4 && down_blocks.dim() == 4 && gate_up_blocks.size(3) == QK / 2 &&
                  down_blocks.size(3) == QK / 2, "packed experts must be [E, O, G, 16]");
  const int64_t E = gate_up_blocks.size(0), H = down_blocks.size(1), I = down_blocks.size(2) * QK;
  const int64_t G_in = gate_up_blocks.size(2), G_mid = down_blocks.size(2);
  TORCH_CHECK(G_in * QK == H && gate_up_blocks.size(1) == 2 * I && down_blocks.size(0) == E &&
                  gate_up_scales.numel() == E * 2 * I * G_in && down_scales.numel() == E * H * G_mid,
              "expert shapes do not match");
  check_activations(x, H);
  const uint8_t *gub = gate_up_blocks.data_ptr<uint8_t>(), *gus = gate_up_scales.data_ptr<uint8_t>();
  const uint8_t *db = down_blocks.data_ptr<uint8_t>(), *ds = down_scales.data_ptr<uint8_t>();
  auto gate_up = [=](int64_t e) {
    return MXFP4Weights(gub + e * 2 * I * G_in * (QK / 2), gus + e * 2 * I * G_in, G_in);
  };
  auto down = [=](int64_t e) { return MXFP4Weights(db + e * H * G_mid * (QK / 2), ds + e * H * G_mid, G_mid); };
  return fused_experts(x, experts, mix, gate_up, down, E, I, gate_up_bias, down_bias, alpha, limit);
}

// int8 experts: gate_up [E, 2I, H] and down [E, H, I] int8 with row scales [E, 2I] and [E, H] (float32 or bfloat16);
// see fused_experts.
torch::Tensor int8_experts(const torch::Tensor& x, const torch::Tensor& experts, const torch::Tensor& mix,
                           const torch::Tensor& gate_up, const torch::Tensor& gate_up_scales,
                           const torch::Tensor& gate_up_bias, const torch::Tensor& down,
                           const torch::Tensor& down_scales, const torch::Tensor& down_bias, double alpha,
                           double limit) {
  TORCH_CHECK(gate_up.scalar_type() == torch::kInt8 && down.scalar_type() == torch::kInt8 && gate_up.dim() == 3 &&
                  down.dim() == 3 && gate_up.is_contiguous() && down.is_contiguous(),
              "int8 experts must be contiguous int8 [E, 2I, H] and [E, H, I]");
  const int64_t E = gate_up.size(0), H = gate_up.size(2), I = down.size(2);
  TORCH_CHECK(gate_up.size(1) == 2 * I && down.size(0) == E && down.size(1) == H, "expert shapes do not match");
  const RowScales gs = row_scales(gate_up_scales, E * 2 * I, "gate_up's scales [E, 2I]");
  const RowScales ds = row_scales(down_scales, E * H, "down's scales [E, H]");
  check_activations(x, H);
  const int8_t *gw = gate_up.data_ptr<int8_t>(), *dw = down.data_ptr<int8_t>();
  auto gate_up_of = [=](int64_t e) { return Int8Weights{gw + e * 2 * I * H, gs.from(e * 2 * I), H}; };
  auto down_of = [=](int64_t e) { return Int8Weights{dw + e * H * I, ds.from(e * H), I}; };
  return fused_experts(x, experts, mix, gate_up_of, down_of, E, I, gate_up_bias, down_bias, alpha, limit);
}

// x [..., K] times int8 weight rows [O, K] + bias -> [..., O], with row scales [O] (float32 or bfloat16) or
// bfloat16 scales per block of 32 [O, K / 32].
torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scales,
                          const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(weight.scalar_type() == torch::kInt8 && weight.dim() == 2 && weight.is_contiguous(),
              "weight must be a contiguous int8 matrix [O, K]");
  const int64_t O = weight.size(0), K = weight.size(1);
  check_activations(x, K, true);
  TORCH_CHECK(scales.is_contiguous(), "scales must be contiguous");
  if (scales.dim() == 2) {
    TORCH_CHECK(scales.scalar_type() == torch::kBFloat16 && scales.size(0) == O && scales.size(1) == K / QK,
                "block scales must be bfloat16 [O, K / 32]");
    Int8BlockWeights w;
    w.weight = weight.data_ptr<int8_t>(), w.K = K;
    w.block_scales = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>());
    return run(w, x, O, bias);
  }
  const RowLanes<Int8Weights> w(Int8Weights{weight.data_ptr<int8_t>(), row_scales(scales, O, "row scales [O]"), K});
  return run(w, x, O, bias);
}

// MXFP4 rows -> their values, float32 or bfloat16, for products that want the dense weight (training through the
// packed experts: ossgpt.lora.packed). blocks [R, G, 16], scales [R, G] -> out [R, G * 32], written in place.
// Exact: a value is an FP4 value (2 significant bits) times a power of two, which float32 holds and bfloat16 too (the
// same exponent range): its float32's high half is its bfloat16. Scale 255 gives inf or NaN, as float32 arithmetic does.
constexpr float kFP4Values[16] = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f, -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};

template <typename T>  // T: float, or uint16_t for bfloat16's bits
void dequantize_blocks(const uint8_t* blocks, const uint8_t* scales, T* out, int64_t begin, int64_t end) {
  const float* halves = MXFP4Weights::scale_table();  // 2^(e - 127) / 2
#if defined(OSSGPT_AVX512)
  const __m512 table = _mm512_loadu_ps(kFP4Values);
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);  // low, high, ...
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
  const __m512i nibble = _mm512_set1_epi32(0x0F);
  for (int64_t g = begin; g < end; ++g) {
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blocks + g * 16)));
    const __m512 scale = _mm512_set1_ps(2.f * halves[scales[g]]);
    const __m512 low = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(bytes, nibble), table), scale);
    const __m512 high = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table), scale);
    T* o = out + g * QK;
    for (const __m512i& order : {first, second}) {  // values 0-15, then 16-31 of the block
      const __m512 v = _mm512_permutex2var_ps(low, order, high);
      if constexpr (std::is_same_v<T, float>) {
        _mm512_storeu_ps(o, v);
      } else {  // the high halves
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o),
                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
      }
      o += 16;
    }
  }
#else
  for (int64_t g = begin; g < end; ++g) {
    const float scale = 2.f * halves[scales[g]];
    for (int j = 0; j < QK; ++j) {
      const uint8_t byte = blocks[g * 16 + j / 2];
      const float v = kFP4Values[j % 2 ? byte >> 4 : byte & 0x0F] * scale;  // low nibble first
      if constexpr (std::is_same_v<T, float>) {
        out[g * QK + j] = v;
      } else {
        uint32_t bits;
        std::memcpy(&bits, &v, sizeof bits);
        out[g * QK + j] = uint16_t(bits >> 16);
      }
    }
  }
#endif
}

void mxfp4_dequantize(const torch::Tensor& blocks, const torch::Tensor& scales, torch::Tensor& out) {
  TORCH_CHECK(blocks.scalar_type() == torch::kUInt8 && scales.scalar_type() == torch::kUInt8 &&
                  blocks.is_contiguous() && scales.is_contiguous() && blocks.dim() >= 2 &&
                  blocks.size(-1) == QK / 2 && blocks.numel() == scales.numel() * (QK / 2),
              "blocks [..., G, 16] and scales [..., G] must be contiguous uint8 tensors");
  TORCH_CHECK(out.is_contiguous() && out.numel() == scales.numel() * QK &&
                  (out.scalar_type() == torch::kFloat32 || out.scalar_type() == torch::kBFloat16),
              "out must be a contiguous float32 or bfloat16 tensor of 32 values per block");
  const uint8_t* b = blocks.data_ptr<uint8_t>();
  const uint8_t* s = scales.data_ptr<uint8_t>();
  const bool wide = out.scalar_type() == torch::kFloat32;
  float* f = wide ? out.data_ptr<float>() : nullptr;
  uint16_t* h = wide ? nullptr : reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, scales.numel(), 2048, [&](int64_t begin, int64_t end) {
    wide ? dequantize_blocks(b, s, f, begin, end) : dequantize_blocks(b, s, h, begin, end);
  });
}

std::string instruction_set() {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return "avx512-vnni";
#elif defined(__AVXVNNI__)
  return "avx-vnni";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "generic";
#endif
}

}  // namespace

// csrc/cpu_attention.cpp and csrc/cpu_elementwise.cpp, compiled into the same module.
c10::optional<torch::Tensor> decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                              const torch::Tensor& sinks, const torch::Tensor& visible, double scale);
c10::optional<torch::Tensor> rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);
c10::optional<torch::Tensor> rotary(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin);
c10::optional<torch::Tensor> visible_keys(const torch::Tensor& query_positions, const torch::Tensor& key_positions,
                                          c10::optional<int64_t> window);
bool write_kv(const torch::Tensor& keys, const torch::Tensor& values, const torch::Tensor& key_positions,
              const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& positions, int64_t start,
              const c10::optional<torch::Tensor>& row_starts, bool ring);
c10::optional<std::tuple<torch::Tensor, torch::Tensor>> rotary_table(const torch::Tensor& positions,
                                                                     const torch::Tensor& inv_freq, double scaling);
c10::optional<std::tuple<torch::Tensor, torch::Tensor>> top_k_softmax(const torch::Tensor& logits, int64_t k);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mxfp4_linear", &mxfp4_linear, "x [..., K] @ MXFP4 rows [O, K/32, 16] + [O, K/32] -> [..., O]");
  m.def("mxfp4_experts", &mxfp4_experts, "tokens through their k MXFP4 experts (gate_up, SwiGLU, down), mixed");
  m.def("int8_experts", &int8_experts, "tokens through their k int8 experts (gate_up, SwiGLU, down), mixed");
  m.def("int8_linear", &int8_linear, "x [..., K] @ int8 rows [O, K] (f32/bf16 row or bf16 block scales) -> [..., O]");
  m.def("decode_attention", &decode_attention, "attention with sinks for a few queries over a KV cache, or None");
  m.def("rms_norm", &rms_norm, "x [..., D] f32, weight [D] -> RMSNorm of x's rows, or None");
  m.def("rotary", &rotary, "x [B, H, T, D] f32, cos/sin [T or B, T, D/2] -> x's heads rotated, contiguous, or None");
  m.def("visible_keys", &visible_keys, "positions [B, T], key positions [B, S], window -> bool [B, 1, T, S], or None");
  m.def("rotary_table", &rotary_table, "positions [...], inv_freq [D/2], scaling -> cos, sin [..., D/2] f32, or None");
  m.def("top_k_softmax", &top_k_softmax, "logits [N, E] f32, k -> softmaxed top-k weights, indices [N, k], or None");
  m.def("write_kv", &write_kv, "a step's keys, values [B, K, T, D] and positions [B, T] into a KV cache, or False");
  m.def("mxfp4_dequantize", &mxfp4_dequantize, "MXFP4 blocks [..., G, 16], scales [..., G] -> out [..., G * 32] (f32/bf16)");
  m.def("instruction_set", &instruction_set, "the instruction set this build uses");
}
