// mtp_rows_matmul: y[M, O] = x[M, I] @ W for a few rows M (decode: 1 token, or a block of draft
// tokens) and a large float32 matrix W streamed once from memory, split over the kernel's own threads (SpinPool).
//
//   layout "nt": W is [O, I] (each output's weights contiguous), y[m, o] = dot(x[m, :], W[o, :])
//   layout "nn": W is [I, O],                                     y[m, o] = sum_i x[m, i] W[i, o]
//
//   packed: W is [O, I] in blocks of 32 along I, kept in the block formats it was dequantized from
//           (GGUF's Q8_0/Q4_0 as "s8": w = d * q, q int8; Q4_1 as "u4": w = d * q + m, q 0..15,
//           two per byte as GGUF packs them), converted in registers: 4-6x fewer bytes to stream.
//
// Exactness contract: y[m, o] is computed by the same sequence of floating-point operations
// whatever M is and whichever thread computes it (8-lane partial sums in i order, a fixed lane
// reduction, then the tail; "nn": one running sum in i order). So a token's logits are bitwise the
// same in a 1-token forward and inside a block of draft tokens (packed formats included).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <thread>
#include <chrono>
#include <condition_variable>
#include <mutex>

#include "xla/ffi/api/ffi.h"
#if defined(__FMA__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

typedef float v8f __attribute__((vector_size(32)));

static inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

static inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }

// Built with -ffp-contract=off: every multiply-add is fused exactly where these say, so the
// compiler's choices (unrolling, vectorizing a tail) never change a result.
static inline v8f fma8(v8f a, v8f b, v8f c) {
#ifdef __FMA__
  return (v8f)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}

static inline float fma1(float a, float b, float c) {
#ifdef __FMA__
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

static inline float hsum8(v8f v) {  // fixed order: (0+4, 1+5, 2+6, 3+7), then pairs, then the last two
  float a = v[0] + v[4], b = v[1] + v[5], c = v[2] + v[6], d = v[3] + v[7];
  return (a + c) + (b + d);
}

// ---- "nt": W [O, I] -------------------------------------------------------------------------------
// Software prefetch of the W rows 8 ahead: the hardware prefetcher alone kept a 4-row block at
// ~9 GB/s on the 2-core AVX2 VM (15 GB/s with this, the same as XLA's one-row matrix-vector code).
constexpr int64_t kPrefetchRows = 8;

template <int MB, int R>
static void nt_tile(const float* x, const float* w, float* y, int64_t I, int64_t O, int64_t m0,
                    int64_t o0) {
  v8f acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = v8f{0, 0, 0, 0, 0, 0, 0, 0};
  const int64_t I8 = I & ~int64_t(7);
  for (int64_t i = 0; i < I8; i += 8) {
    v8f wv[R];
    if ((i & 15) == 0 && o0 + R + kPrefetchRows <= O)  // one cache line of each row kPrefetchRows ahead
      for (int r = 0; r < R; ++r) __builtin_prefetch(w + (o0 + r + kPrefetchRows) * I + i, 0, 0);
    for (int r = 0; r < R; ++r) wv[r] = load8(w + (o0 + r) * I + i);
    for (int m = 0; m < MB; ++m) {
      const v8f xv = load8(x + (m0 + m) * I + i);
      for (int r = 0; r < R; ++r) acc[m][r] = fma8(xv, wv[r], acc[m][r]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) {
      float s = hsum8(acc[m][r]);
      for (int64_t i = I8; i < I; ++i) s = fma1(x[(m0 + m) * I + i], w[(o0 + r) * I + i], s);
      y[(m0 + m) * O + o0 + r] = s;
    }
}

template <int MB>
static void nt_rows(const float* x, const float* w, float* y, int64_t I, int64_t O, int64_t m0,
                    int64_t o_begin, int64_t o_end) {
  constexpr int R = MB >= 4 ? 2 : 4;  // MB * R <= 8 accumulators
  int64_t o = o_begin;
  for (; o + R <= o_end; o += R) nt_tile<MB, R>(x, w, y, I, O, m0, o);
  for (; o < o_end; ++o) nt_tile<MB, 1>(x, w, y, I, O, m0, o);
}

static void nt_range(const float* x, const float* w, float* y, int64_t M, int64_t I, int64_t O,
                     int64_t o_begin, int64_t o_end) {
  // Output rows in slabs of 64, and every block of x rows per slab: the slab's W rows are read from
  // memory once and reused from cache by the next block of x rows.
  for (int64_t s = o_begin; s < o_end; s += 64) {
    const int64_t e = std::min(s + 64, o_end);
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) nt_rows<4>(x, w, y, I, O, m, s, e);
    for (; m + 2 <= M; m += 2) nt_rows<2>(x, w, y, I, O, m, s, e);
    for (; m < M; ++m) nt_rows<1>(x, w, y, I, O, m, s, e);
  }
}

// ---- "nn": W [I, O] -------------------------------------------------------------------------------
template <int MB>
static void nn_tile32(const float* x, const float* w, float* y, int64_t I, int64_t O, int64_t m0,
                      int64_t o0) {
  v8f acc[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int c = 0; c < 4; ++c) acc[m][c] = v8f{0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < I; ++i) {
    const float* wr = w + i * O + o0;
    const v8f w0 = load8(wr), w1 = load8(wr + 8), w2 = load8(wr + 16), w3 = load8(wr + 24);
    for (int m = 0; m < MB; ++m) {
      const float xs = x[(m0 + m) * I + i];
      const v8f xb = v8f{xs, xs, xs, xs, xs, xs, xs, xs};
      acc[m][0] = fma8(xb, w0, acc[m][0]);
      acc[m][1] = fma8(xb, w1, acc[m][1]);
      acc[m][2] = fma8(xb, w2, acc[m][2]);
      acc[m][3] = fma8(xb, w3, acc[m][3]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int c = 0; c < 4; ++c) store8(y + (m0 + m) * O + o0 + 8 * c, acc[m][c]);
}

static void nn_col(const float* x, const float* w, float* y, int64_t M, int64_t I, int64_t O, int64_t o) {
  for (int64_t m = 0; m < M; ++m) {
    float s = 0.0f;
    for (int64_t i = 0; i < I; ++i) s = fma1(x[m * I + i], w[i * O + o], s);
    y[m * O + o] = s;
  }
}

static void nn_range(const float* x, const float* w, float* y, int64_t M, int64_t I, int64_t O,
                     int64_t o_begin, int64_t o_end) {
  int64_t o = o_begin;
  for (; o + 32 <= o_end; o += 32) {
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) nn_tile32<2>(x, w, y, I, O, m, o);
    for (; m < M; ++m) nn_tile32<1>(x, w, y, I, O, m, o);
  }
  for (; o < o_end; ++o) nn_col(x, w, y, M, I, O, o);
}

// ---- packed: W [O, I] in blocks of 32 -------------------------------------------------------------
// Each block of 32 weights is converted to float32 in registers (see pk_tile); converting q to float
// is the costly part of a one-row product.
// Packed rows are short (a 576-wide Q4_1 row is 288 bytes): prefetch a fixed distance in bytes, not
// in rows, or the prefetches arrive too late.
constexpr int64_t kPrefetchBytes = 16384;
// Packed chunks of a multiple of 16 rows: a 576-row matrix splits evenly over the threads.
constexpr int64_t kPackedAlign = 16;

static int64_t ahead_rows(int64_t row_bytes) {
  return std::max<int64_t>(kPrefetchRows, kPrefetchBytes / std::max<int64_t>(1, row_bytes));
}

static inline v8f splat(float s) { return v8f{s, s, s, s, s, s, s, s}; }

// exp of 8 lanes: Cephes' expf (range reduction by ln 2 in two parts, a degree-5 polynomial; within
// ~2 ulp of exp for |x| < 88, clamped beyond). The scalar std::exp it replaces cost ~1 ms of a
// SmolLM2 token (SiLU over 1536 values and softmax over the cache, 31 layers).
static inline v8f exp8(v8f x) {
#ifdef __AVX2__
  x = (v8f)_mm256_min_ps(_mm256_max_ps((__m256)x, _mm256_set1_ps(-87.3365447505f)), _mm256_set1_ps(88.3762626647949f));
  const v8f n = (v8f)_mm256_floor_ps((__m256)fma8(x, splat(1.44269504088896341f), splat(0.5f)));
  x = fma8(n, splat(-0.693359375f), x);
  x = fma8(n, splat(2.12194440e-4f), x);
  v8f y = splat(1.9875691500e-4f);
  y = fma8(y, x, splat(1.3981999507e-3f));
  y = fma8(y, x, splat(8.3334519073e-3f));
  y = fma8(y, x, splat(4.1665795894e-2f));
  y = fma8(y, x, splat(1.6666665459e-1f));
  y = fma8(y, x, splat(5.0000001201e-1f));
  y = fma8(y, x * x, x + splat(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32((__m256)n), _mm256_set1_epi32(127)), 23);
  return y * (v8f)_mm256_castsi256_ps(e);
#else
  v8f y;
  for (int j = 0; j < 8; ++j) y[j] = std::exp(x[j]);
  return y;
#endif
}

// A format gives q4(o, b, q): the 32 values q of row o, block b as float32 (4 x 8 lanes, in order),
// d(o, b), and prefetch(o, b) for the bytes of row o from block b on.
struct PackS8 {
  static constexpr bool kShift = false;
  const int8_t* q;  // [O, I]
  const float* dd;  // [O, I / 32]
  const float* mm;  // unused
  int64_t I, nb, ahead;
  inline void q4(int64_t o, int64_t b, v8f* out) const {
    const int8_t* p = q + o * I + b * 32;
#ifdef __AVX2__
    for (int g = 0; g < 4; ++g)
      out[g] = (v8f)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8 * g))));
#else
    for (int g = 0; g < 4; ++g)
      for (int j = 0; j < 8; ++j) out[g][j] = float(p[8 * g + j]);
#endif
  }
  inline float d(int64_t o, int64_t b) const { return dd[o * nb + b]; }
  inline float m(int64_t, int64_t) const { return 0.0f; }
#ifdef __AVX2__
  inline __m256i bytes32(int64_t o, int64_t b) const {  // the block's 32 q as int8
    return _mm256_loadu_si256((const __m256i*)(q + o * I + b * 32));
  }
#endif
  inline void prefetch(int64_t o, int64_t b) const {
    __builtin_prefetch(q + o * I + b * 32, 0, 0);
    if (b == 0) __builtin_prefetch(dd + o * nb, 0, 0);
  }
};

struct PackU4 {
  static constexpr bool kShift = true;
  const uint8_t* q;  // [O, I / 2]: per block 16 bytes, element j in the low nibble of byte j (j < 16)
                     // and element 16 + j in the high nibble of byte j (GGUF's Q4_1 layout)
  const float* dd;   // [O, I / 32]
  const float* mm;   // [O, I / 32]
  int64_t I, nb, ahead;
  inline void q4(int64_t o, int64_t b, v8f* out) const {
    const uint8_t* p = q + o * (I / 2) + b * 16;
#ifdef __AVX2__
    // bytes to 32-bit lanes first (2 widening loads), then the nibbles apart with and / shift:
    // 1.4x faster than splitting the nibbles in bytes (6 shuffles a block instead of 2)
    const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
    const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8)));
    const __m256i mask = _mm256_set1_epi32(0x0F);
    out[0] = (v8f)_mm256_cvtepi32_ps(_mm256_and_si256(b0, mask));
    out[1] = (v8f)_mm256_cvtepi32_ps(_mm256_and_si256(b1, mask));
    out[2] = (v8f)_mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4));
    out[3] = (v8f)_mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4));
#else
    for (int j = 0; j < 16; ++j) {
      out[j / 8][j % 8] = float(p[j] & 15);
      out[2 + j / 8][j % 8] = float(p[j] >> 4);
    }
#endif
  }
  inline float d(int64_t o, int64_t b) const { return dd[o * nb + b]; }
  inline float m(int64_t o, int64_t b) const { return mm[o * nb + b]; }
#ifdef __AVX2__
  inline __m256i bytes32(int64_t o, int64_t b) const {  // the block's 32 q as bytes, in element order
    const __m128i v = _mm_loadu_si128((const __m128i*)(q + o * (I / 2) + b * 16)), mask = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), mask), _mm_and_si128(v, mask));
  }
#endif
  inline void prefetch(int64_t o, int64_t b) const {
    __builtin_prefetch(q + o * (I / 2) + b * 16, 0, 0);
    if (b == 0) {
      __builtin_prefetch(dd + o * nb, 0, 0);
      __builtin_prefetch(mm + o * nb, 0, 0);
    }
  }
};

// Output rows [o_begin, o_end) in slabs of 64, x rows in blocks of kMax (4 or 3), then 3, 2, 1; one
// weight row per tile: tile(std::integral_constant<int, MB>{}, m0, o) computes y[m0 .. m0 + MB - 1, o].
// One weight row at a time: interleaving 2-4 rows (as "nt" does) ran 1.6-2x slower on rows of 1536+
// inputs (576: the same) on the AVX2 VM, whatever the prefetch distance.
template <int kMax, class Tile>
static void packed_range(Tile tile, int64_t M, int64_t o_begin, int64_t o_end) {
  static_assert(kMax == 3 || kMax == 4, "tiles of 4 or 3 rows");
  for (int64_t s = o_begin; s < o_end; s += 64) {
    const int64_t e = std::min(s + 64, o_end);
    int64_t m = 0;
    for (; m + kMax <= M; m += kMax)
      for (int64_t o = s; o < e; ++o) tile(std::integral_constant<int, kMax>{}, m, o);
    if (M - m == 3) {  // 3 rows (a 3-token block) in one tile: each weight block converted once
      for (int64_t o = s; o < e; ++o) tile(std::integral_constant<int, 3>{}, m, o);
      m += 3;
    }
    for (; m + 2 <= M; m += 2)
      for (int64_t o = s; o < e; ++o) tile(std::integral_constant<int, 2>{}, m, o);
    for (; m < M; ++m)
      for (int64_t o = s; o < e; ++o) tile(std::integral_constant<int, 1>{}, m, o);
  }
}

// y[m0 .. m0 + MB - 1, o] with float x. The block's 32 weights are scaled in registers once,
// w = q * d (s8: exactly the dequantized float32 weight) or fma(q, d, m) (u4), and shared by the MB x
// rows: per row only 4 fused multiply-adds a block, into 4 chains (lanes of groups g = 0..3 of 8),
// reduced as (c0 + c1) + (c2 + c3) and then the fixed lane order. A 2-row block cost 1.2-1.35x one row
// this way (the factorized d * sum(x q) + m * sum(x) of llama.cpp: ~1.5x, as each row re-scaled its sums).
// At most 3 rows a tile: 12 accumulators + the weights fill the 16 AVX2 registers.
template <class P, int MB>
static void pk_tile(const P& p, const float* x, float* y, int64_t I, int64_t O, int64_t m0, int64_t o) {
  static_assert(MB <= 3, "at most 3 rows: 4 accumulators each");
  v8f acc[MB][4];
  for (int mb = 0; mb < MB; ++mb)
    for (int g = 0; g < 4; ++g) acc[mb][g] = splat(0.0f);
  const int64_t nb = I / 32;
  const bool fetch = o + 1 + p.ahead <= O;
  for (int64_t b = 0; b < nb; ++b) {
    if (fetch && (b & 1) == 0) p.prefetch(o + p.ahead, b);
    v8f wv[4];
    p.q4(o, b, wv);
    const v8f dv = splat(p.d(o, b));
    if (P::kShift) {
      const v8f mv = splat(p.m(o, b));
      for (int g = 0; g < 4; ++g) wv[g] = fma8(wv[g], dv, mv);
    } else {
      for (int g = 0; g < 4; ++g) wv[g] = wv[g] * dv;
    }
    for (int g = 0; g < 4; ++g)
      for (int mb = 0; mb < MB; ++mb) acc[mb][g] = fma8(load8(x + (m0 + mb) * I + b * 32 + 8 * g), wv[g], acc[mb][g]);
  }
  for (int mb = 0; mb < MB; ++mb)
    y[(m0 + mb) * O + o] = hsum8((acc[mb][0] + acc[mb][1]) + (acc[mb][2] + acc[mb][3]));
}

// ---- packed x int8 activations (opt-in: q8x) ----------------------------------------------------------
// Each block of 32 of an x row is quantized like llama.cpp's 8-bit activations: xd = amax / 127,
// xq = round(x / xd); the block's dot product is then integer arithmetic (maddubs / madd):
//   sum_i x_i (d q_i + m) ~= d * xd * sum_i xq_i q_i  +  m * sum_i x_i   (the last in float)
// 2x faster than converting q to float, but x carries a rounding error of up to xd / 2 per element:
// results differ from the float product (they are still row-independent: x rows are quantized alone).
static void quantize_rows(const float* x, int64_t n_blocks, int8_t* xq, float* xd) {
  for (int64_t r = 0; r < n_blocks; ++r) {
    const float* xb = x + r * 32;
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
    xd[r] = amax / 127.0f;
    const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
    for (int j = 0; j < 32; ++j) xq[r * 32 + j] = static_cast<int8_t>(std::nearbyint(xb[j] * id));
  }
}

struct XQ {
  const int8_t* q;  // [M, I]
  const float* d;   // [M, I / 32]
  const float* s;   // [M, I / 32, 8]: float lane sums of each block (u4's m term)
};

#ifdef __AVX2__
// y[m0 .. m0 + MB - 1, o] with int8 x blocks
template <class P, int MB>
static void pq_tile(const P& p, const XQ& xq, float* y, int64_t I, int64_t O, int64_t m0, int64_t o) {
  v8f acc[MB], acc_m[MB];
  for (int mb = 0; mb < MB; ++mb) acc[mb] = acc_m[mb] = splat(0.0f);
  const int64_t nb = I / 32;
  const bool fetch = o + 1 + p.ahead <= O;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < nb; ++b) {
    if (fetch && (b & 1) == 0) p.prefetch(o + p.ahead, b);
    const __m256i w = p.bytes32(o, b);
    const __m256i wu = P::kShift ? w : _mm256_sign_epi8(w, w);  // maddubs: unsigned x signed
    const float dw = p.d(o, b);
    for (int mb = 0; mb < MB; ++mb) {
      __m256i xv = _mm256_loadu_si256((const __m256i*)(xq.q + (m0 + mb) * I + b * 32));
      if (!P::kShift) xv = _mm256_sign_epi8(xv, w);
      const v8f f = (v8f)_mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(wu, xv), ones));
      acc[mb] = fma8(f, splat(dw * xq.d[(m0 + mb) * nb + b]), acc[mb]);
      if (P::kShift) acc_m[mb] = fma8(load8(xq.s + ((m0 + mb) * nb + b) * 8), splat(p.m(o, b)), acc_m[mb]);
    }
  }
  for (int mb = 0; mb < MB; ++mb) y[(m0 + mb) * O + o] = hsum8(P::kShift ? acc[mb] + acc_m[mb] : acc[mb]);
}
constexpr bool kHaveQ8x = true;
#else
constexpr bool kHaveQ8x = false;  // without AVX2 the q8x attribute is ignored: float activations
#endif

// ---- threads --------------------------------------------------------------------------------------
// Our own workers, not XLA's intra-op pool: handing a product to a sleeping pool thread cost 20-30 us
// on the 2-core VM (a 576 x 576 product ran slower on 2 threads than on 1), ~120 times per token.
// The workers spin for a while after each job (decode calls come back to back), then sleep.
//
// A job is published as one 64-bit word: generation (24 bits) | chunk count (20) | next chunk (20).
// A thread claims a chunk by compare-and-swap on the word; a claim that succeeds with an index below
// the count belongs to that generation's job, whose function and context cannot change before all
// its chunks are done. Results do not depend on which thread computes a chunk (rows are independent).
class SpinPool {
 public:
  using Fn = void (*)(const void* ctx, int64_t chunk);
  static constexpr int64_t kMaxChunks = (int64_t(1) << 20) - 1;

  explicit SpinPool(int64_t workers) {
    for (int64_t t = 0; t < workers; ++t) std::thread([this] { loop(); }).detach();
  }

  // Runs fn(ctx, c) for c in [0, n) on the calling thread and the workers; false (nothing run) when
  // another job holds the pool: the caller then runs the chunks itself.
  bool run(Fn fn, const void* ctx, int64_t n) {
    if (busy_.exchange(true, std::memory_order_acquire)) return false;
    fn_ = fn;
    ctx_ = ctx;
    done_.store(0, std::memory_order_relaxed);
    gen_ = (gen_ + 1) & 0xFFFFFF;
    const uint64_t g = gen_;
    word_.store((g << 40) | (uint64_t(n) << 20), std::memory_order_seq_cst);
    if (sleeping_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lk(mu_);
      cv_.notify_all();
    }
    drain(g);
    while (done_.load(std::memory_order_acquire) < n) pause();
    busy_.store(false, std::memory_order_release);
    return true;
  }

 private:
  static inline void pause() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#else
    std::this_thread::yield();
#endif
  }
  static uint64_t gen_of(uint64_t w) { return w >> 40; }

  void drain(uint64_t g) {
    for (;;) {
      uint64_t w = word_.load(std::memory_order_acquire);
      if (gen_of(w) != g) return;
      const int64_t n = int64_t((w >> 20) & kMaxChunks), c = int64_t(w & kMaxChunks);
      if (c >= n) return;
      if (!word_.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel)) continue;
      fn_(ctx_, c);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void loop() {
    uint64_t seen = gen_of(word_.load(std::memory_order_acquire));
    for (;;) {
      // spin ~0.5 ms (checking the clock every 256 pauses), then sleep until the next job
      auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(500);
      uint64_t g = seen;
      for (int64_t i = 1; (g = gen_of(word_.load(std::memory_order_acquire))) == seen; ++i) {
        pause();
        if ((i & 255) == 0 && std::chrono::steady_clock::now() > until) {
          std::unique_lock<std::mutex> lk(mu_);
          sleeping_.fetch_add(1, std::memory_order_seq_cst);
          cv_.wait(lk, [&] { return gen_of(word_.load(std::memory_order_seq_cst)) != seen; });
          sleeping_.fetch_sub(1, std::memory_order_seq_cst);
        }
      }
      seen = g;
      drain(g);
    }
  }

  std::atomic<uint64_t> word_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> sleeping_{0};
  std::atomic<bool> busy_{false};
  Fn fn_ = nullptr;
  const void* ctx_ = nullptr;
  uint64_t gen_ = 0;
  std::mutex mu_;
  std::condition_variable cv_;
};

// The cap on the kernel threads (DecodeSettings.kernel_threads; 0: XLA's count), set from Python through
// MtpSetKernelThreads before the first kernel call; the thread count is fixed at that first call.
static std::atomic<int64_t> g_thread_cap{0};
static std::atomic<int64_t> g_threads_in_use{-1};  // -1 until the first kernel call fixes the count

static int64_t kernel_threads(ffi::ThreadPool& pool) {
  static const int64_t threads = [&] {
    const int64_t cap = g_thread_cap.load();
    int64_t t = std::max<int64_t>(1, pool.num_threads());
    t = cap > 0 ? std::min(t, cap) : t;
    g_threads_in_use.store(cap > 0 ? cap : 0);
    return t;
  }();
  return threads;
}

// Sets the cap (0: XLA's count) when no kernel has run yet; returns the cap in effect (what the first
// kernel call fixed, when one has run).
extern "C" int64_t MtpSetKernelThreads(int64_t cap) {
  const int64_t fixed = g_threads_in_use.load();
  if (fixed >= 0) return fixed;
  g_thread_cap.store(cap);
  return cap;
}

static SpinPool* spin_pool(int64_t threads) {
  static SpinPool* pool = threads > 1 ? new SpinPool(threads - 1) : nullptr;  // lives until exit
  return pool;
}

// run(b, e) over output rows [0, O) in chunks of a multiple of `align`, on the kernel threads.
template <class F>
static void parallel_rows(ffi::ThreadPool& pool, int64_t O, int64_t work_size, int64_t align, F run) {
  const int64_t all = kernel_threads(pool);
  int64_t threads = all;
  // Small matrices: one thread (the hand-off costs more than it saves).
  if (work_size < (int64_t(1) << 16)) threads = 1;
  const int64_t n_chunks = std::min<int64_t>(threads * 4, std::max<int64_t>(1, O / align));
  const int64_t per = ((O + n_chunks - 1) / n_chunks + align - 1) / align * align;
  struct Ctx {
    F* run;
    int64_t per, O;
  } ctx{&run, per, O};
  auto chunk = [](const void* p, int64_t c) {
    const Ctx& k = *static_cast<const Ctx*>(p);
    const int64_t b = c * k.per, e = std::min(k.O, b + k.per);
    if (b < e) (*k.run)(b, e);
  };
  SpinPool* sp = threads > 1 && n_chunks > 1 ? spin_pool(all) : nullptr;
  if (sp && sp->run(chunk, &ctx, n_chunks)) return;
  for (int64_t c = 0; c < n_chunks; ++c) chunk(&ctx, c);
}

static ffi::Error RowsMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                             ffi::ResultBuffer<ffi::F32> y, bool w_out_in) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2) return ffi::Error::InvalidArgument("mtp_rows_matmul: x and W must be 2-D");
  const int64_t M = xd[0], I = xd[1];
  const int64_t O = w_out_in ? wd[0] : wd[1];
  if ((w_out_in ? wd[1] : wd[0]) != I)
    return ffi::Error::InvalidArgument("mtp_rows_matmul: x's columns do not match W's input size");
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  parallel_rows(pool, O, O * I, w_out_in ? 64 : 32, [=](int64_t b, int64_t e) {
    if (w_out_in) nt_range(xp, wp, yp, M, I, O, b, e);
    else nn_range(xp, wp, yp, M, I, O, b, e);
  });
  return ffi::Error::Success();
}

// The x side of a packed product: float rows, or (q8x) the rows quantized to int8 blocks.
struct XSide {
  std::unique_ptr<int8_t[]> q;
  std::unique_ptr<float[]> d, s;
  XSide(const float* x, int64_t M, int64_t I, bool q8x, bool sums) {
    const int64_t n = M * (I / 32);
    if (sums) {
      s.reset(new float[n * 8]);
      for (int64_t r = 0; r < n; ++r) {
        const float* xb = x + r * 32;
        store8(s.get() + r * 8, (load8(xb) + load8(xb + 8)) + (load8(xb + 16) + load8(xb + 24)));
      }
    }
    if (q8x) {
      q.reset(new int8_t[M * I]);
      d.reset(new float[n]);
      quantize_rows(x, n, q.get(), d.get());
    }
  }
};

// A packed matrix W [O, I]: "s8" (q int8 [O, I], W = d * q) or "u4" (q [O, I / 2], W = d * q + m).
struct PackedW {
  const void* q;
  bool u4;
  const float* d;  // [O, I / 32]
  const float* m;  // [O, I / 32] (u4), else unused
  int64_t O, I;
};

// Checks one packed operand (q int8 [O, I], or uint8 [O, I / 2] with m [O, I / 32]; d [O, I / 32])
// against the input size I; `m` may be null (s8 only); `name` and `what` go into the message.
static ffi::Error packed_operand(const std::string& name, const char* what, ffi::AnyBuffer q,
                                 ffi::Buffer<ffi::F32> d, const ffi::Buffer<ffi::F32>* m, int64_t I, PackedW* w) {
  const auto qd = q.dimensions(), dd = d.dimensions();
  const std::string where = name + ": " + what;
  if (I % 32 != 0) return ffi::Error::InvalidArgument(where + ": the input size must be a multiple of 32");
  if (dd.size() != 2 || dd[1] != I / 32) return ffi::Error::InvalidArgument(where + ": d must be [O, I / 32]");
  const int64_t O = dd[0];
  const bool u4 = q.element_type() == ffi::DataType::U8;
  if (!u4 && q.element_type() != ffi::DataType::S8)
    return ffi::Error::InvalidArgument(where + ": q must be int8 (s8 blocks) or uint8 (u4 blocks)");
  if (qd.size() != 2 || qd[0] != O || qd[1] != (u4 ? I / 2 : I))
    return ffi::Error::InvalidArgument(where + (u4 ? ": q must be [O, I / 2]" : ": q must be [O, I]"));
  if (u4 && (!m || m->dimensions().size() != 2 || m->dimensions()[0] != O || m->dimensions()[1] != I / 32))
    return ffi::Error::InvalidArgument(where + ": m must be [O, I / 32]");
  *w = PackedW{q.untyped_data(), u4, d.typed_data(), u4 ? m->typed_data() : nullptr, O, I};
  return ffi::Error::Success();
}

// y [M, O] = x [M, I] @ W.T for a packed W, on the kernel threads.
static void packed_product(ffi::ThreadPool& pool, const PackedW& w, const float* xp, int64_t M, float* yp,
                           bool q8x) {
  const int64_t I = w.I, O = w.O;
  q8x = q8x && kHaveQ8x;
  const XSide xside(xp, M, I, q8x, q8x && w.u4);  // the lane sums of x: the int8 path's u4 m term
  if (w.u4) {
    const PackU4 p{static_cast<const uint8_t*>(w.q), w.d, w.m, I, I / 32, ahead_rows(I / 2)};
#ifdef __AVX2__
    if (q8x) {
      const XQ xq{xside.q.get(), xside.d.get(), xside.s.get()};
      parallel_rows(pool, O, O * I / 2, kPackedAlign, [=](int64_t b, int64_t e) {
        packed_range<4>([&](auto mb, int64_t m0, int64_t o) { pq_tile<PackU4, mb>(p, xq, yp, I, O, m0, o); }, M, b, e);
      });
      return;
    }
#endif
    parallel_rows(pool, O, O * I / 2, kPackedAlign, [=](int64_t b, int64_t e) {
      packed_range<3>([&](auto mb, int64_t m0, int64_t o) { pk_tile<PackU4, mb>(p, xp, yp, I, O, m0, o); }, M, b, e);
    });
    return;
  }
  const PackS8 p{static_cast<const int8_t*>(w.q), w.d, nullptr, I, I / 32, ahead_rows(I)};
#ifdef __AVX2__
  if (q8x) {
    const XQ xq{xside.q.get(), xside.d.get(), nullptr};
    parallel_rows(pool, O, O * I, kPackedAlign, [=](int64_t b, int64_t e) {
      packed_range<4>([&](auto mb, int64_t m0, int64_t o) { pq_tile<PackS8, mb>(p, xq, yp, I, O, m0, o); }, M, b, e);
    });
    return;
  }
#endif
  parallel_rows(pool, O, O * I, kPackedAlign, [=](int64_t b, int64_t e) {
    packed_range<3>([&](auto mb, int64_t m0, int64_t o) { pk_tile<PackS8, mb>(p, xp, yp, I, O, m0, o); }, M, b, e);
  });
}

// y = x [M, I] @ W.T for a packed W ("s8": q, d; "u4": q, d, m).
static ffi::Error PackedMatmul(const std::string& name, ffi::ThreadPool& pool, ffi::Buffer<ffi::F32> x,
                               ffi::AnyBuffer q, ffi::Buffer<ffi::F32> d, const ffi::Buffer<ffi::F32>* m,
                               ffi::ResultBuffer<ffi::F32> y, bool q8x) {
  const auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument(name + ": x must be [M, I]");
  PackedW w;
  if (auto err = packed_operand(name, "W", q, d, m, xd[1], &w); err.failure()) return err;
  packed_product(pool, w, x.typed_data(), xd[0], y->typed_data(), q8x);
  return ffi::Error::Success();
}

static ffi::Error RowsMatmulS8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer q,
                               ffi::Buffer<ffi::F32> d, ffi::ResultBuffer<ffi::F32> y, bool q8x) {
  return PackedMatmul("mtp_rows_matmul_s8", pool, x, q, d, nullptr, y, q8x);
}

static ffi::Error RowsMatmulU4(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer q,
                               ffi::Buffer<ffi::F32> d, ffi::Buffer<ffi::F32> m, ffi::ResultBuffer<ffi::F32> y,
                               bool q8x) {
  return PackedMatmul("mtp_rows_matmul_u4", pool, x, q, d, &m, y, q8x);
}

// ---- decode attention (batch 1) ----------------------------------------------------------------------
// out[t, n] = softmax_j(q[t, n] . k[kv(n), j] * scale, j allowed by mask[t, j]) . v[kv(n), j], with
// kv(n) = n / (N / K) (grouped-query attention). Every (t, n) is computed by the same operations in j
// order whatever T is, so a token's attention inside a block of drafts is bitwise the same as alone
// (XLA:CPU's batched dots and softmax sums were not: a few ulps apart for another T or cache length).
// Query heads [n_begin, n_end) of every token; the heads are split over the kernel threads.
static void attend_heads(const float* qp, const float* kp, const float* vp, const uint8_t* mp, float* op,
                         int64_t T, int64_t N, int64_t H, int64_t K, int64_t S, float scale, int64_t n_begin,
                         int64_t n_end) {
  const int64_t G = N / K, HV = H / 8;
  std::unique_ptr<float[]> sc(new float[(S + 7) / 8 * 8]());  // scores; masked slots hold stale values
  std::unique_ptr<v8f[]> acc(new v8f[HV]);
  for (int64_t t = 0; t < T; ++t) {
    const uint8_t* mrow = mp + t * S;
    for (int64_t n = n_begin; n < n_end; ++n) {
      const float* qv = qp + (t * N + n) * H;
      const float* kh = kp + (n / G) * S * H;
      const float* vh = vp + (n / G) * S * H;
      float mx = -INFINITY;
      for (int64_t j = 0; j < S; ++j) {
        if (!mrow[j]) continue;
        v8f a = load8(qv) * load8(kh + j * H);
        for (int64_t c = 1; c < HV; ++c) a = fma8(load8(qv + 8 * c), load8(kh + j * H + 8 * c), a);
        sc[j] = hsum8(a) * scale;
        mx = std::max(mx, sc[j]);
      }
      for (int64_t j = 0; j < S; j += 8) store8(sc.get() + j, exp8(load8(sc.get() + j) - splat(mx)));  // masked: unused
      for (int64_t c = 0; c < HV; ++c) acc[c] = splat(0.0f);
      float sum = 0.0f;
      for (int64_t j = 0; j < S; ++j) {
        if (!mrow[j]) continue;
        const float e = sc[j];
        sum += e;
        const v8f ev = splat(e);
        for (int64_t c = 0; c < HV; ++c) acc[c] = fma8(ev, load8(vh + j * H + 8 * c), acc[c]);
      }
      const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
      float* o = op + (t * N + n) * H;
      for (int64_t c = 0; c < HV; ++c) store8(o + 8 * c, acc[c] * splat(inv));
    }
  }
}

static void attention(ffi::ThreadPool& pool, const float* qp, const float* kp, const float* vp, const uint8_t* mp,
                      float* op, int64_t T, int64_t N, int64_t H, int64_t K, int64_t S, float scale) {
  parallel_rows(pool, N, T * N * S * H * 2, 1, [=](int64_t b, int64_t e) {
    attend_heads(qp, kp, vp, mp, op, T, N, H, K, S, scale, b, e);
  });
}

static ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                                  ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::U8> mask, ffi::ResultBuffer<ffi::F32> out,
                                  float scale) {
  const auto qd = q.dimensions(), kd = k.dimensions(), md = mask.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || md.size() != 2)
    return ffi::Error::InvalidArgument("mtp_decode_attention: q [T, N, H], k/v [K, S, H], mask [T, S]");
  const int64_t T = qd[0], N = qd[1], H = qd[2], K = kd[0], S = kd[1];
  if (kd[2] != H || md[0] != T || md[1] != S || N % K != 0 || H % 8 != 0)
    return ffi::Error::InvalidArgument("mtp_decode_attention: shapes do not match (H must be a multiple of 8)");
  attention(pool, q.typed_data(), k.typed_data(), v.typed_data(), mask.typed_data(), out->typed_data(), T, N, H, K,
            S, scale);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MtpRowsMatmul, RowsMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("w_out_in"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MtpRowsMatmulS8, RowsMatmulS8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("q8x"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MtpRowsMatmulU4, RowsMatmulU4,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("q8x"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MtpDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
