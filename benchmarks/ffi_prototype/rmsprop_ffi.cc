// Prototype: plain RMSProp (optax defaults) over N float32 leaves in ONE XLA FFI call.
//
// Two targets, both variadic (ffi::RemainingArgs / ffi::RemainingRets):
//   rmsprop_updates: args (g_0..g_{N-1}, nu_0..nu_{N-1}) -> rets (u_0..u_{N-1}, nu'_0..nu'_{N-1})
//                    nu'_i aliases nu_i (input_output_aliases), u_i are fresh buffers.
//   rmsprop_fused:   args (p_0..p_{N-1}, g_0..g_{N-1}, nu_0..nu_{N-1}) -> rets (p'_0.., nu'_0..)
//                    p'_i aliases p_i, nu'_i aliases nu_i: one pass, params updated in place.
//
// Per element, in rmsprop_jax's (and optax's) operation order and with the FMAs
// XLA:CPU itself forms (it DOES contract a * b + c inside a fusion; checked on
// jax 0.10.2), so the results are bit-identical to XLA:CPU's. Compiled with
// -ffp-contract=off so that g++ adds no FMA of its own:
//   nu' = fma(omd, g * g, decay * nu)
//   u   = (-lr) * (rsqrt(max(nu' + eps, FLT_MIN)) * g)   with XLA:CPU's rsqrt (below)
//   p'  = fma(-lr, rsqrt(...) * g, p)                      (fused target)
// Scalars are static attributes (float32), i.e. a constant learning rate only.
#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

#include <immintrin.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Hyper {
  float lr, decay, omd, eps;
};

// XLA:CPU's float32 rsqrt (xla/codegen/intrinsic/rsqrt.cc, jax 0.10.2 on an AVX
// machine): the 12-bit hardware estimate (rsqrtps / rsqrtss) refined by two
// Newton-Raphson steps whose multiply-adds are fused (FMA), and the raw estimate
// where x < FLT_MIN or x == inf. Checked bit for bit against jax.lax.rsqrt on
// 1M random inputs (1/sqrt(x) differs from it in ~36 % of the elements).
static inline __m256 XlaRsqrt8(__m256 x) {
  const __m256 y0 = _mm256_rsqrt_ps(x);
  __m256 y = y0;
  for (int s = 0; s < 2; ++s) {
    const __m256 r2 = _mm256_mul_ps(x, y);
    const __m256 half_r = _mm256_mul_ps(y, _mm256_set1_ps(-0.5f));
    const __m256 h = _mm256_fmadd_ps(r2, y, _mm256_set1_ps(-1.0f));
    y = _mm256_fmadd_ps(half_r, h, y);
  }
  const __m256 raw = _mm256_or_ps(_mm256_cmp_ps(x, _mm256_set1_ps(FLT_MIN), _CMP_LT_OQ),
                                  _mm256_cmp_ps(x, _mm256_set1_ps(INFINITY), _CMP_EQ_OQ));
  return _mm256_blendv_ps(y, y0, raw);
}

static inline float XlaRsqrt1(float xf) {
  const __m128 x = _mm_set_ss(xf);
  const __m128 y0 = _mm_rsqrt_ss(x);
  __m128 y = y0;
  for (int s = 0; s < 2; ++s) {
    const __m128 r2 = _mm_mul_ss(x, y);
    const __m128 half_r = _mm_mul_ss(y, _mm_set_ss(-0.5f));
    const __m128 h = _mm_fmadd_ss(r2, y, _mm_set_ss(-1.0f));
    y = _mm_fmadd_ss(half_r, h, y);
  }
  return (xf < FLT_MIN || xf == INFINITY) ? _mm_cvtss_f32(y0) : _mm_cvtss_f32(y);
}

// One contiguous range of one leaf, in place safe (each output element is
// written after the same index of every input has been read). Everything but
// the rsqrt follows the fusion XLA:CPU compiles rmsprop_jax's step into.
inline void RmsRange(const Hyper& h, const float* g, const float* nu, float* nu_out,
                     const float* p, float* out, int64_t lo, int64_t hi) {
  const float neg_lr = -h.lr;
  int64_t i = lo;
  const __m256 vomd = _mm256_set1_ps(h.omd), vdecay = _mm256_set1_ps(h.decay),
               veps = _mm256_set1_ps(h.eps), vtiny = _mm256_set1_ps(FLT_MIN),
               vneg_lr = _mm256_set1_ps(neg_lr);
  for (; i + 8 <= hi; i += 8) {
    const __m256 gi = _mm256_loadu_ps(g + i);
    // XLA:CPU contracts omd * (g * g) + decay * nu into fma(omd, g * g, decay * nu)
    const __m256 n = _mm256_fmadd_ps(vomd, _mm256_mul_ps(gi, gi),
                                     _mm256_mul_ps(vdecay, _mm256_loadu_ps(nu + i)));
    // jnp.maximum(var + eps, tiny); operand order makes a NaN sum propagate like XLA's max
    const __m256 d = _mm256_max_ps(vtiny, _mm256_add_ps(n, veps));
    const __m256 rg = _mm256_mul_ps(XlaRsqrt8(d), gi);
    _mm256_storeu_ps(nu_out + i, n);
    // fused step: XLA:CPU contracts p + (-lr) * rg into fma(-lr, rg, p)
    _mm256_storeu_ps(out + i, p ? _mm256_fmadd_ps(vneg_lr, rg, _mm256_loadu_ps(p + i))
                                : _mm256_mul_ps(vneg_lr, rg));
  }
  for (; i < hi; ++i) {
    const float gi = g[i];
    const float n = std::fma(h.omd, gi * gi, h.decay * nu[i]);
    float d = n + h.eps;
    d = (d > FLT_MIN || d != d) ? d : FLT_MIN;
    const float rg = XlaRsqrt1(d) * gi;
    nu_out[i] = n;
    out[i] = p ? std::fma(neg_lr, rg, p[i]) : neg_lr * rg;
  }
}

struct Leaf {
  const float* g;
  const float* nu;
  float* nu_out;
  const float* p;  // null for the updates-only target
  float* out;      // u or p'
  int64_t size;
};

// Work split: leaves are cut into chunks of total/T elements; chunk k runs on
// worker k. Small totals run on the calling thread only.
ffi::Error Run(const Hyper& h, std::vector<Leaf>& leaves, ffi::ThreadPool& pool,
               int64_t parallel_min) {
  int64_t total = 0;
  for (auto& l : leaves) total += l.size;
  int64_t threads = pool.num_threads();
  int64_t T = (total >= parallel_min && threads > 0) ? std::min<int64_t>(threads + 1, 8) : 1;
  if (T <= 1) {
    for (auto& l : leaves) RmsRange(h, l.g, l.nu, l.nu_out, l.p, l.out, 0, l.size);
    return ffi::Error::Success();
  }
  // global element range [k*total/T, (k+1)*total/T) for worker k
  auto work = [&h, &leaves, total, T](int64_t k) {
    int64_t lo = k * total / T, hi = (k + 1) * total / T, base = 0;
    for (auto& l : leaves) {
      int64_t a = std::max(lo, base), b = std::min(hi, base + l.size);
      if (a < b) RmsRange(h, l.g, l.nu, l.nu_out, l.p, l.out, a - base, b - base);
      base += l.size;
      if (base >= hi) break;
    }
  };
  std::atomic<int64_t> done{0};
  for (int64_t k = 1; k < T; ++k) {
    pool.Schedule([&work, &done, k] {
      work(k);
      done.fetch_add(1, std::memory_order_release);
    });
  }
  work(0);
  while (done.load(std::memory_order_acquire) < T - 1) std::this_thread::yield();
  return ffi::Error::Success();
}

ffi::Error Check(size_t got, size_t want, const char* what) {
  if (got != want)
    return ffi::Error::InvalidArgument(std::string("rmsprop_ffi: wrong number of ") + what);
  return ffi::Error::Success();
}

ffi::Error UpdatesImpl(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::RemainingRets rets,
                       float lr, float decay, float omd, float eps, int64_t parallel_min) {
  const size_t n = args.size() / 2;
  if (auto e = Check(args.size(), 2 * n, "args"); e.failure()) return e;
  if (auto e = Check(rets.size(), 2 * n, "rets"); e.failure()) return e;
  std::vector<Leaf> leaves(n);
  for (size_t i = 0; i < n; ++i) {
    auto g = args.get<ffi::Buffer<ffi::F32>>(i);
    auto nu = args.get<ffi::Buffer<ffi::F32>>(n + i);
    auto u = rets.get<ffi::Buffer<ffi::F32>>(i);
    auto nu2 = rets.get<ffi::Buffer<ffi::F32>>(n + i);
    if (!g || !nu || !u || !nu2) return ffi::Error::InvalidArgument("rmsprop_ffi: non-f32 buffer");
    int64_t sz = g->element_count();
    if (nu->element_count() != sz || (*u)->element_count() != sz || (*nu2)->element_count() != sz)
      return ffi::Error::InvalidArgument("rmsprop_ffi: leaf size mismatch");
    leaves[i] = {g->typed_data(), nu->typed_data(), (*nu2)->typed_data(), nullptr,
                 (*u)->typed_data(), sz};
  }
  return Run({lr, decay, omd, eps}, leaves, pool, parallel_min);
}

ffi::Error FusedImpl(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::RemainingRets rets,
                     float lr, float decay, float omd, float eps, int64_t parallel_min) {
  const size_t n = args.size() / 3;
  if (auto e = Check(args.size(), 3 * n, "args"); e.failure()) return e;
  if (auto e = Check(rets.size(), 2 * n, "rets"); e.failure()) return e;
  std::vector<Leaf> leaves(n);
  for (size_t i = 0; i < n; ++i) {
    auto p = args.get<ffi::Buffer<ffi::F32>>(i);
    auto g = args.get<ffi::Buffer<ffi::F32>>(n + i);
    auto nu = args.get<ffi::Buffer<ffi::F32>>(2 * n + i);
    auto p2 = rets.get<ffi::Buffer<ffi::F32>>(i);
    auto nu2 = rets.get<ffi::Buffer<ffi::F32>>(n + i);
    if (!p || !g || !nu || !p2 || !nu2) return ffi::Error::InvalidArgument("rmsprop_ffi: non-f32 buffer");
    int64_t sz = g->element_count();
    if (p->element_count() != sz || nu->element_count() != sz || (*p2)->element_count() != sz ||
        (*nu2)->element_count() != sz)
      return ffi::Error::InvalidArgument("rmsprop_ffi: leaf size mismatch");
    leaves[i] = {g->typed_data(), nu->typed_data(), (*nu2)->typed_data(), p->typed_data(),
                 (*p2)->typed_data(), sz};
  }
  return Run({lr, decay, omd, eps}, leaves, pool, parallel_min);
}

}  // namespace

#define RMS_BIND                               \
  ffi::Ffi::Bind()                             \
      .Ctx<ffi::ThreadPool>()                  \
      .RemainingArgs()                         \
      .RemainingRets()                         \
      .Attr<float>("lr")                       \
      .Attr<float>("decay")                    \
      .Attr<float>("one_minus_decay")          \
      .Attr<float>("eps")                      \
      .Attr<int64_t>("parallel_min")

XLA_FFI_DEFINE_HANDLER_SYMBOL(RmspropUpdates, UpdatesImpl, RMS_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(RmspropFused, FusedImpl, RMS_BIND);
