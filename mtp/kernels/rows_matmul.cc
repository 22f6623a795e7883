// mtp_rows_matmul: y[M, O] = x[M, I] @ W for a few rows M (decode: 1 token, or a block of draft
// tokens) and a large float32 matrix W streamed once from memory, split over XLA's intra-op threads.
//
//   layout "nt": W is [O, I] (each output's weights contiguous), y[m, o] = dot(x[m, :], W[o, :])
//   layout "nn": W is [I, O],                                     y[m, o] = sum_i x[m, i] W[i, o]
//
// Exactness contract: y[m, o] is computed by the same sequence of floating-point operations
// whatever M is and whichever thread computes it (8-lane partial sums in i order, a fixed lane
// reduction, then the tail; "nn": one running sum in i order). So a token's logits are bitwise the
// same in a 1-token forward and inside a block of draft tokens.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"
#ifdef __FMA__
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

// ---- threads --------------------------------------------------------------------------------------
struct Work {
  std::atomic<int64_t> next{0};  // next chunk to claim
  std::atomic<int64_t> done{0};  // chunks finished
};

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
  const int64_t align = w_out_in ? 64 : 32;
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // Small matrices: one thread (the hand-off costs more than it saves).
  if (O * I < (int64_t(1) << 16)) threads = 1;
  const int64_t n_chunks = std::min<int64_t>(threads * 4, std::max<int64_t>(1, O / align));
  const int64_t per = ((O + n_chunks - 1) / n_chunks + align - 1) / align * align;
  auto run = [=](int64_t c) {
    const int64_t b = c * per, e = std::min(O, b + per);
    if (b >= e) return;
    if (w_out_in) nt_range(xp, wp, yp, M, I, O, b, e);
    else nn_range(xp, wp, yp, M, I, O, b, e);
  };
  if (threads == 1 || n_chunks == 1) {
    for (int64_t c = 0; c < n_chunks; ++c) run(c);
    return ffi::Error::Success();
  }
  auto work = std::make_shared<Work>();
  auto drain = [work, run, n_chunks]() {
    for (int64_t c; (c = work->next.fetch_add(1)) < n_chunks;) {
      run(c);
      work->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < threads; ++t) pool.Schedule(decltype(drain)(drain));  // late helpers find no work
  drain();
  while (work->done.load(std::memory_order_acquire) < n_chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MtpRowsMatmul, RowsMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("w_out_in"));

