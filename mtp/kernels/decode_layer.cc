// Fused decode layer (batch 1, a decode step or a block of T draft tokens, packed weights): a
// transformer layer in two calls instead of ~20 small XLA operations and 5 kernel calls.
//
//   mtp_layer_qkv:  x [T, D] -> RMSNorm -> x @ Wqkv -> RoPE(q), RoPE(k), v
//                   outputs q [T, N, H], k [K, T, H], v [K, T, H] (k/v in the cache's layout)
//   (XLA writes k and v into the layer's cache in place: a dynamic update slice)
//   mtp_layer_rest: x, q, the cache -> attention -> x + attn @ Wo -> RMSNorm -> @ Wgu
//                   -> silu(gate) * up -> @ Wdown -> + residual: the layer's output [T, D]
//
// Every operation is per token (norms, RoPE, SiLU) or per (token, head) (attention), and the
// products are the packed ones of rows_matmul.cc: a token's output is bitwise the same alone or
// inside a draft block, the property that keeps speculative output equal to plain greedy. RoPE's cos
// and sin come from XLA ([T, H / 2], computed once per forward), the same values the unfused layer
// uses; the norms and SiLU are computed here, within a few ulps of XLA's.
//
// Included by mtp_kernels.cc after rows_matmul.cc (PackedW, packed_product, attention, parallel_rows).

// out[t] = x[t] * (1 / sqrt(mean(x[t]^2) + eps)) * scale (XLA's rms_norm: x * rsqrt(...), then * scale)
static void rms_norm_rows(const float* x, const float* scale, float* out, int64_t T, int64_t D, float eps) {
  const int64_t D8 = D & ~int64_t(7);
  for (int64_t t = 0; t < T; ++t) {
    const float* xr = x + t * D;
    v8f acc = splat(0.0f);
    for (int64_t i = 0; i < D8; i += 8) acc = fma8(load8(xr + i), load8(xr + i), acc);
    float ss = hsum8(acc);
    for (int64_t i = D8; i < D; ++i) ss = fma1(xr[i], xr[i], ss);
    const float r = 1.0f / std::sqrt(ss / float(D) + eps);
    for (int64_t i = 0; i < D; ++i) out[t * D + i] = (xr[i] * r) * scale[i];
  }
}

// dst [H] = the rotation of src [H] by the angles of one position: halves (x1, x2) ->
// (x1 cos - x2 sin, x2 cos + x1 sin), as mtp.model.transformer.rope
static inline void rope_row(const float* src, const float* cos_h, const float* sin_h, float* dst, int64_t H) {
  const int64_t H2 = H / 2;
  for (int64_t i = 0; i < H2; ++i) {
    const float x1 = src[i], x2 = src[H2 + i];
    dst[i] = x1 * cos_h[i] - x2 * sin_h[i];
    dst[H2 + i] = x2 * cos_h[i] + x1 * sin_h[i];
  }
}

static bool same_dims(ffi::Span<const int64_t> a, ffi::Span<const int64_t> b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

struct Scratch {  // per-call temporaries
  std::unique_ptr<float[]> a, b;
  Scratch(int64_t na, int64_t nb) : a(new float[std::max<int64_t>(1, na)]), b(new float[std::max<int64_t>(1, nb)]) {}
};

static ffi::Error LayerQkv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> norm,
                           ffi::AnyBuffer wq, ffi::Buffer<ffi::F32> wd, ffi::Buffer<ffi::F32> wm,
                           ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin, ffi::ResultBuffer<ffi::F32> q_out,
                           ffi::ResultBuffer<ffi::F32> k_out, ffi::ResultBuffer<ffi::F32> v_out, float eps, bool q8x) {
  static const std::string name = "mtp_layer_qkv";
  const auto xd = x.dimensions(), qd = q_out->dimensions(), kd = k_out->dimensions(), cd = cos.dimensions();
  if (xd.size() != 2 || qd.size() != 3 || kd.size() != 3 || cd.size() != 2)
    return ffi::Error::InvalidArgument(name + ": x [T, D], q [T, N, H], k/v [K, T, H], cos/sin [T, H / 2]");
  const int64_t T = xd[0], D = xd[1], N = qd[1], H = qd[2], K = kd[0];
  if (norm.element_count() != size_t(D) || qd[0] != T || kd[1] != T || kd[2] != H || H % 2 != 0 || cd[0] != T ||
      cd[1] != H / 2 || !same_dims(sin.dimensions(), cd) || !same_dims(v_out->dimensions(), kd))
    return ffi::Error::InvalidArgument(name + ": the shapes of x, the norm, q, k, v, cos and sin do not agree");
  PackedW w;
  if (auto err = packed_operand(name, "wqkv", wq, wd, &wm, D, &w); err.failure()) return err;
  const int64_t C = (N + 2 * K) * H;
  if (w.O != C) return ffi::Error::InvalidArgument(name + ": wqkv must have (N + 2K) * H outputs");
  Scratch s(T * D, T * C);
  rms_norm_rows(x.typed_data(), norm.typed_data(), s.a.get(), T, D, eps);
  packed_product(pool, w, s.a.get(), T, s.b.get(), q8x);
  const float* cp = cos.typed_data();
  const float* sp = sin.typed_data();
  float* qo = q_out->typed_data();
  float* ko = k_out->typed_data();
  float* vo = v_out->typed_data();
  for (int64_t t = 0; t < T; ++t) {
    const float* row = s.b.get() + t * C;
    const float* ct = cp + t * (H / 2);
    const float* st = sp + t * (H / 2);
    for (int64_t n = 0; n < N; ++n) rope_row(row + n * H, ct, st, qo + (t * N + n) * H, H);
    for (int64_t k = 0; k < K; ++k) {
      rope_row(row + (N + k) * H, ct, st, ko + (k * T + t) * H, H);
      std::memcpy(vo + (k * T + t) * H, row + (N + K + k) * H, sizeof(float) * H);
    }
  }
  return ffi::Error::Success();
}

static ffi::Error LayerRest(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> q,
                            ffi::Buffer<ffi::F32> kc, ffi::Buffer<ffi::F32> vc, ffi::Buffer<ffi::U8> mask,
                            ffi::AnyBuffer wo_q, ffi::Buffer<ffi::F32> wo_d, ffi::Buffer<ffi::F32> wo_m,
                            ffi::Buffer<ffi::F32> norm, ffi::AnyBuffer gu_q, ffi::Buffer<ffi::F32> gu_d,
                            ffi::Buffer<ffi::F32> gu_m, ffi::AnyBuffer dn_q, ffi::Buffer<ffi::F32> dn_d,
                            ffi::Buffer<ffi::F32> dn_m, ffi::ResultBuffer<ffi::F32> out, float eps, float scale,
                            bool q8x) {
  static const std::string name = "mtp_layer_rest";
  const auto xd = x.dimensions(), qd = q.dimensions(), kd = kc.dimensions(), md = mask.dimensions();
  if (xd.size() != 2 || qd.size() != 3 || kd.size() != 3 || md.size() != 2)
    return ffi::Error::InvalidArgument(name + ": x [T, D], q [T, N, H], k/v cache [K, S, H], mask [T, S]");
  const int64_t T = xd[0], D = xd[1], N = qd[1], H = qd[2], K = kd[0], S = kd[1];
  if (qd[0] != T || kd[2] != H || !same_dims(vc.dimensions(), kd) || md[0] != T || md[1] != S || N % K != 0 || H % 8 != 0 ||
      norm.element_count() != size_t(D) || !same_dims(out->dimensions(), xd))
    return ffi::Error::InvalidArgument(name + ": the shapes of x, q, the cache, the mask and the norm do not agree"
                                       " (H must be a multiple of 8)");
  PackedW wo, wgu, wdn;
  if (auto err = packed_operand(name, "wo", wo_q, wo_d, &wo_m, N * H, &wo); err.failure()) return err;
  if (auto err = packed_operand(name, "wgu", gu_q, gu_d, &gu_m, D, &wgu); err.failure()) return err;
  const int64_t F = wgu.O / 2;
  if (auto err = packed_operand(name, "wdown", dn_q, dn_d, &dn_m, F, &wdn); err.failure()) return err;
  if (wo.O != D || wdn.O != D || wgu.O != 2 * F)
    return ffi::Error::InvalidArgument(name + ": wo and wdown must have D outputs, wgu 2F (gate, then up)");
  const float* xp = x.typed_data();
  float* yp = out->typed_data();
  Scratch s(T * std::max({N * H, D, F}), T * 2 * F);  // a: attention, normed h, silu(gate) * up
  float* att = s.a.get();  // [T, N * H]
  attention(pool, q.typed_data(), kc.typed_data(), vc.typed_data(), mask.typed_data(), att, T, N, H, K, S, scale);
  packed_product(pool, wo, att, T, s.b.get(), q8x);
  for (int64_t i = 0; i < T * D; ++i) yp[i] = xp[i] + s.b[i];  // h = x + attn @ Wo (kept in out)
  rms_norm_rows(yp, norm.typed_data(), s.a.get(), T, D, eps);
  packed_product(pool, wgu, s.a.get(), T, s.b.get(), q8x);  // [T, 2F]: gate, then up
  for (int64_t t = 0; t < T; ++t) {                        // silu(gate) * up: gate / (1 + exp(-gate)) * up
    const float* g = s.b.get() + t * 2 * F;
    float* a = s.a.get() + t * F;
    int64_t i = 0;
    for (; i + 8 <= F; i += 8) {
      const v8f gv = load8(g + i);
      store8(a + i, (gv / (splat(1.0f) + exp8(splat(0.0f) - gv))) * load8(g + F + i));
    }
    for (; i < F; ++i) a[i] = (g[i] / (1.0f + std::exp(-g[i]))) * g[F + i];
  }
  packed_product(pool, wdn, s.a.get(), T, s.b.get(), q8x);
  for (int64_t i = 0; i < T * D; ++i) yp[i] = yp[i] + s.b[i];
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MtpLayerQkv, LayerQkv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // attn norm
                                  .Arg<ffi::AnyBuffer>()         // wqkv: q, d, m
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cos
                                  .Arg<ffi::Buffer<ffi::F32>>()  // sin
                                  .Ret<ffi::Buffer<ffi::F32>>()  // q
                                  .Ret<ffi::Buffer<ffi::F32>>()  // k
                                  .Ret<ffi::Buffer<ffi::F32>>()  // v
                                  .Attr<float>("eps")
                                  .Attr<bool>("q8x"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MtpLayerRest, LayerRest,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k cache
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v cache
                                  .Arg<ffi::Buffer<ffi::U8>>()   // mask
                                  .Arg<ffi::AnyBuffer>()         // wo: q, d, m
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mlp norm
                                  .Arg<ffi::AnyBuffer>()         // wgu: q, d, m
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()         // wdown: q, d, m
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()  // the layer's output
                                  .Attr<float>("eps")
                                  .Attr<float>("scale")
                                  .Attr<bool>("q8x"));
