// The fused E-step and sufficient statistics of the regression families on a CPU, as one XLA FFI
// call (see conceptshift/_kernels/__init__.py, which builds this file on first use, and
// ExpertsFamily.estep_stats_t, whose XLA formulation it equals).
//
// Inputs, samples on the minor axis (the E-step's layout):
//   A (P, N) design; Y (H, N) responses; W (N,) weights;
//   Z (K, G, P) gate rows (G may be 0); B (K, M) additive log terms, M = 1 (one per component) or N;
//   C (K, H, P) coefficients; S (K, H) inverse scales;
//   X0 (0,), or (D,) for a linear design: A is then x (D, N) and the design [1, x - X0] (P = D + 1)
//   is formed here, so that XLA need not write it out.
// Per sample n and component k:
//   logp_k = B_k - |Z_k a_n|^2 / 2 - sum_h (e_kh S_kh)^2 / 2,   e_kh = y_hn - C_kh . a_n,
//   ll_n = log sum_k exp(logp_k),   r_k = w_n exp(logp_k - ll_n).
// Outputs (sums over samples):
//   ll () sum_n w_n ll_n; nk (K,) sum r_k; SQ (P (P + 1) / 2, K) sum r_k a_p a_q over p <= q in the
//   order of numpy.triu_indices(P); SPE (P, K, H) sum a_p r_k e_kh; SEE (K, H) sum r_k e_kh^2.
//
// The XLA formulation writes a (P (P + 1) / 2, rows) temporary of column products and contracts it
// with r; here every product goes straight into one vector accumulator per statistic, in cache.
// Rows are processed in tiles of four SIMD vectors (GCC vector extensions, 32 bytes: AVX2 where
// the CPU has it), chunks of rows run on XLA's intra-op thread pool, each chunk sums in the
// working precision and is reduced in double, and chunks are combined in a fixed order, so results
// do not depend on the number of threads.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

template <typename T>
struct Bits;
template <>
struct Bits<float> {
  using I = int32_t;
  static constexpr int kMant = 23;
  static constexpr int kBias = 127;
};
template <>
struct Bits<double> {
  using I = int64_t;
  static constexpr int kMant = 52;
  static constexpr int kBias = 1023;
};

// Lanes of one SIMD register (32 bytes: AVX2; GCC splits them on narrower targets).
typedef float VecF __attribute__((vector_size(32)));
typedef double VecD __attribute__((vector_size(32)));
typedef int32_t VecI32 __attribute__((vector_size(32)));
typedef int64_t VecI64 __attribute__((vector_size(32)));
template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  using V = VecF;
  using VI = VecI32;
};
template <>
struct VecOf<double> {
  using V = VecD;
  using VI = VecI64;
};
template <typename T>
using Vec = typename VecOf<T>::V;
template <typename T>
using IVec = typename VecOf<T>::VI;
template <typename T>
constexpr int kLanes = 32 / sizeof(T);

constexpr double factorial(int j) { return j <= 1 ? 1.0 : j * factorial(j - 1); }

template <typename T>
inline Vec<T> splat(T v) {
  return Vec<T>{} + v;
}

// exp(x) for x <= 0 (the argument is logp - max logp) on a vector. Cody-Waite reduction
// x = n ln2 + r, |r| <= ln2 / 2, and the Taylor polynomial of exp(r) to degree 7 (float) or 13
// (double), each below an ulp of truncation error; n is rounded through the magic number
// 1.5 2^mant, whose low bits then hold it as an integer. Below the smallest normal result it
// returns 0 (XLA returns subnormals there); NaN propagates.
template <typename T>
inline Vec<T> exp_nonpos(Vec<T> x) {
  using V = Vec<T>;
  using VI = IVec<T>;
  using I = typename Bits<T>::I;
  constexpr bool f = std::is_same_v<T, float>;
  const V lo = splat<T>(f ? T(-87.0) : T(-708.0));
  const V xc = x < lo ? lo : x;  // NaN compares false: xc = NaN
  const V magic = splat<T>(T(1.5) * static_cast<T>(I(1) << Bits<T>::kMant));
  const V shifted = xc * T(1.4426950408889634) + magic;
  const V n = shifted - magic;
  const VI ni = (VI)shifted - (VI)magic;
  const T ln2_hi = f ? T(0.693359375) : T(6.93147180369123816490e-01);
  const T ln2_lo = f ? T(-2.12194440e-4) : T(1.90821492927058770002e-10);
  const V r = (xc - n * ln2_hi) - n * ln2_lo;
  // Horner on the Taylor coefficients 1 / j!, j = degree .. 0
  constexpr int degree = f ? 7 : 13;
  V p = splat<T>(static_cast<T>(1.0 / factorial(degree)));
  for (int j = degree - 1; j >= 0; --j) p = p * r + static_cast<T>(1.0 / factorial(j));
  const VI e = (ni + I(Bits<T>::kBias)) << Bits<T>::kMant;
  const V scaled = p * (V)e;
  return x < lo ? V{} : scaled;  // NaN: scaled is NaN
}

// log(x) for x >= 1 or x == 0 (a sum of exponentials whose largest term is 1) on a vector:
// x = 2^e m with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172,
// by its series (to s^11 in float, s^23 in double). 0 gives -inf, +inf gives +inf, NaN propagates.
template <typename T>
inline Vec<T> log_pos(Vec<T> x) {
  using V = Vec<T>;
  using VI = IVec<T>;
  using I = typename Bits<T>::I;
  constexpr bool f = std::is_same_v<T, float>;
  constexpr int mant = Bits<T>::kMant;
  constexpr I exp_mask = (I(1) << (sizeof(T) * 8 - 1 - mant)) - 1;
  const VI bits = (VI)x;
  VI e = ((bits >> mant) & exp_mask) - I(Bits<T>::kBias);
  V m = (V)((bits & ((I(1) << mant) - 1)) | (I(Bits<T>::kBias) << mant));
  const VI big = m > T(1.4142135623730951);
  m = big ? m * T(0.5) : m;
  e = e - big;  // big is -1 where true
  const V s = (m - T(1)) / (m + T(1));
  const V s2 = s * s;
  constexpr int terms = f ? 6 : 12;
  V q = splat<T>(T(1) / T(2 * terms - 1));
  for (int j = terms - 2; j >= 0; --j) q = q * s2 + T(1) / T(2 * j + 1);
  const V magic = splat<T>(T(1.5) * static_cast<T>(I(1) << mant));
  const V ef = (V)((VI)magic + e) - magic;  // e as a float, without a conversion
  V out = T(2) * s * q + ef * T(0.69314718055994530942);
  const T inf = std::numeric_limits<T>::infinity();
  out = x == T(0) ? splat<T>(-inf) : out;
  out = x == inf ? splat<T>(inf) : out;
  return x != x ? x : out;
}

template <typename T>
inline Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

struct Dims {
  int64_t N, P, H, K, G, M, Q;  // Q = P (P + 1) / 2
  int64_t size() const { return 1 + K + Q * K + P * K * H + K * H; }
};

template <typename T>
struct Inputs {
  const T* __restrict A;
  const T* __restrict Y;
  const T* __restrict W;
  const T* __restrict Z;
  const T* __restrict B;
  const T* __restrict C;
  const T* __restrict S;
  const T* __restrict X0;  // (D,) the shift of a linear design, or null (A is the design)
};

constexpr int64_t kChunk = 1024;  // rows per task and per working-precision partial sum

// J rows of M (J, P) times a tile of NV vectors of samples (the tile's design a (P, NV)):
// out[j][v] = sum_p M[j, p] a[p][v]. The J x NV accumulators are independent chains in registers.
template <typename T, int J, int NV>
inline void rows_times_tile(const T* __restrict M, int64_t P, const Vec<T>* __restrict a,
                            Vec<T>* __restrict out) {
  using V = Vec<T>;
  V acc[J][NV];
  for (int j = 0; j < J; ++j)
    for (int v = 0; v < NV; ++v) acc[j][v] = M[j * P] * a[v];
  for (int64_t p = 1; p < P; ++p)
    for (int j = 0; j < J; ++j) {
      const T m = M[j * P + p];
      for (int v = 0; v < NV; ++v) acc[j][v] += m * a[p * NV + v];
    }
  for (int j = 0; j < J; ++j)
    for (int v = 0; v < NV; ++v) out[j * NV + v] = acc[j][v];
}

template <typename T, int NV>
inline void rows_times_tile_all(const T* M, int64_t R, int64_t P, const Vec<T>* a, Vec<T>* out) {
  int64_t j = 0;
  for (; j + 2 <= R; j += 2) rows_times_tile<T, 2, NV>(M + j * P, P, a, out + j * NV);
  if (j < R) rows_times_tile<T, 1, NV>(M + j * P, P, a, out + j * NV);
}

// sum_v x[v] y[v] over the NV vectors of a tile, as two interleaved chains (half the latency of
// one chain of NV dependent multiply-adds).
template <typename T, int NV>
inline Vec<T> dot_tile(const Vec<T>* __restrict x, const Vec<T>* __restrict y) {
  Vec<T> s0 = x[0] * y[0];
  Vec<T> s1 = x[1] * y[1];
  for (int v = 2; v + 1 < NV; v += 2) {
    s0 += x[v] * y[v];
    s1 += x[v + 1] * y[v + 1];
  }
  if constexpr (NV % 2 == 1) s0 += x[NV - 1] * y[NV - 1];
  return s0 + s1;
}

template <typename T>
inline double hsum(Vec<T> v) {
  double s = 0.0;
  for (int l = 0; l < kLanes<T>; ++l) s += static_cast<double>(v[l]);
  return s;
}

// One chunk of rows [i0, i1) -> out (Dims::size() doubles), laid out as ll, nk, SQ, SPE, SEE.
// A tile is NV vectors of samples. Per tile: the gate and expert rows of every component as one
// small product with the design (register-blocked), the log-sum-exp and responsibilities, then
// every statistic added into one vector accumulator per entry: each accumulator takes NV
// multiply-adds per load and store, so the updates are not bound by stores.
template <typename T>
void chunk_stats(const Dims& d, const Inputs<T>& in, int64_t i0, int64_t i1, double* out) {
  using V = Vec<T>;
  using VI = IVec<T>;
  constexpr int NV = 4;
  constexpr int W = kLanes<T>;
  constexpr int L = NV * W;  // samples per tile
  const int64_t N = d.N, P = d.P, H = d.H, K = d.K, G = d.G, Q = d.Q;
  const int64_t S = d.size();
  const bool linear = in.X0 != nullptr;
  const int64_t PA = linear ? P - 1 : P;  // rows of the input A
  const int64_t R = K * G + K * H;        // gate rows, then expert rows
  thread_local std::vector<V> work;
  work.assign(S + (P + H + R + 3 * K + K * H + 1) * NV, V{});
  thread_local std::vector<T> pad, M;
  pad.assign((PA + H + 1 + (d.M == 1 ? 0 : K)) * L, T(0));
  M.resize(R * P);
  std::copy_n(in.Z, K * G * P, M.data());
  std::copy_n(in.C, K * H * P, M.data() + K * G * P);
  V* __restrict acc = work.data();   // (S): one accumulator per output entry
  V* __restrict a = acc + S;         // (P, NV)
  V* __restrict y = a + P * NV;      // (H, NV)
  V* __restrict rows = y + H * NV;   // (R, NV)
  V* __restrict logp = rows + R * NV;  // (K, NV)
  V* __restrict r = logp + K * NV;   // (K, NV)
  V* __restrict ex = r + K * NV;     // (K, NV)
  V* __restrict re = ex + K * NV;    // (K H, NV)
  V* __restrict w = re + K * H * NV;  // (NV)
  V* __restrict acc_ll = acc;
  V* __restrict acc_nk = acc + 1;
  V* __restrict acc_q = acc_nk + K;
  V* __restrict acc_pe = acc_q + Q * K;
  V* __restrict acc_ee = acc_pe + P * K * H;

  for (int64_t t0 = i0; t0 < i1; t0 += L) {
    const int64_t nl = std::min<int64_t>(L, i1 - t0);
    // rows of this tile: read in place, or (last tile) from a zero-padded copy
    const T *pa = in.A + t0, *py = in.Y + t0, *pw = in.W + t0, *pb = in.B + t0;
    int64_t stride = N;
    if (nl < L) {
      std::fill(pad.begin(), pad.end(), T(0));
      for (int64_t p = 0; p < PA; ++p) std::copy_n(in.A + p * N + t0, nl, pad.data() + p * L);
      for (int64_t h = 0; h < H; ++h) std::copy_n(in.Y + h * N + t0, nl, pad.data() + (PA + h) * L);
      std::copy_n(in.W + t0, nl, pad.data() + (PA + H) * L);
      if (d.M != 1)
        for (int64_t k = 0; k < K; ++k)
          std::copy_n(in.B + k * N + t0, nl, pad.data() + (PA + H + 1 + k) * L);
      pa = pad.data();
      py = pad.data() + PA * L;
      pw = pad.data() + (PA + H) * L;
      pb = pad.data() + (PA + H + 1) * L;
      stride = L;
    }
    if (linear) {  // the design [1, x - x0] from x
      for (int v = 0; v < NV; ++v) a[v] = splat<T>(T(1));
      for (int64_t p = 1; p < P; ++p)
        for (int v = 0; v < NV; ++v) a[p * NV + v] = load(pa + (p - 1) * stride + v * W) - in.X0[p - 1];
    } else {
      for (int64_t p = 0; p < P; ++p)
        for (int v = 0; v < NV; ++v) a[p * NV + v] = load(pa + p * stride + v * W);
    }
    for (int64_t h = 0; h < H; ++h)
      for (int v = 0; v < NV; ++v) y[h * NV + v] = load(py + h * stride + v * W);
    for (int v = 0; v < NV; ++v) w[v] = load(pw + v * W);

    // gate rows z = Z_k a and expert means C_kh a, for every component at once
    rows_times_tile_all<T, NV>(M.data(), R, P, a, rows);
    for (int64_t k = 0; k < K; ++k) {
      V lp[NV];
      for (int v = 0; v < NV; ++v)
        lp[v] = d.M == 1 ? splat<T>(in.B[k]) : load(pb + k * stride + v * W);
      for (int64_t g = 0; g < G; ++g)
        for (int v = 0; v < NV; ++v) {
          const V z = rows[(k * G + g) * NV + v];
          lp[v] -= T(0.5) * z * z;
        }
      for (int64_t h = 0; h < H; ++h) {
        const T s = in.S[k * H + h];
        for (int v = 0; v < NV; ++v) {
          // the residual e = y - mu replaces mu in place
          V& ek = rows[(K * G + k * H + h) * NV + v];
          ek = y[h * NV + v] - ek;
          const V u = ek * s;
          lp[v] -= T(0.5) * u * u;
        }
      }
      for (int v = 0; v < NV; ++v) logp[k * NV + v] = lp[v];
    }
    const V* __restrict e = rows + K * G * NV;  // (K H, NV) residuals
    // log-sum-exp and responsibilities from one set of exponentials
    for (int v = 0; v < NV; ++v) {
      V top = logp[v];
      for (int64_t k = 1; k < K; ++k) {
        const V b = logp[k * NV + v];
        top = b > top ? b : top;
      }
      const VI abs_mask = ~((VI)splat<T>(T(-0.0)));
      const V mag = (V)((VI)top & abs_mask);
      top = mag <= std::numeric_limits<T>::max() ? top : V{};
      V tot{};
      for (int64_t k = 0; k < K; ++k) {
        ex[k * NV + v] = exp_nonpos<T>(logp[k * NV + v] - top);
        tot += ex[k * NV + v];
      }
      const V ll = top + log_pos<T>(tot);
      // rows of weight zero (padding lanes among them) contribute nothing, even where ll is
      // not finite
      const V scale = w[v] == T(0) ? V{} : w[v] / tot;
      acc_ll[0] += w[v] == T(0) ? V{} : w[v] * ll;
      for (int64_t k = 0; k < K; ++k) r[k * NV + v] = ex[k * NV + v] * scale;
    }
    for (int64_t k = 0; k < K; ++k) {
      V s = acc_nk[k];
      for (int v = 0; v < NV; ++v) s += r[k * NV + v];
      acc_nk[k] = s;
    }
    // sum_n r_k a_p a_q (p <= q): one column product per pair, shared by all components
    V* __restrict dst = acc_q;
    for (int64_t p = 0; p < P; ++p) {
      for (int64_t q = p; q < P; ++q, dst += K) {
        V pq[NV];
        for (int v = 0; v < NV; ++v) pq[v] = a[p * NV + v] * a[q * NV + v];
        for (int64_t k = 0; k < K; ++k) dst[k] += dot_tile<T, NV>(r + k * NV, pq);
      }
    }
    // residual statistics: sum a_p r_k e_kh and sum r_k e_kh^2
    for (int64_t kh = 0; kh < K * H; ++kh) {
      const int64_t k = kh / H;
      V s = acc_ee[kh];
      for (int v = 0; v < NV; ++v) {
        re[kh * NV + v] = r[k * NV + v] * e[kh * NV + v];
        s += re[kh * NV + v] * e[kh * NV + v];
      }
      acc_ee[kh] = s;
    }
    for (int64_t p = 0; p < P; ++p)
      for (int64_t kh = 0; kh < K * H; ++kh) {
        acc_pe[p * K * H + kh] += dot_tile<T, NV>(a + p * NV, re + kh * NV);
      }
  }
  for (int64_t i = 0; i < S; ++i) out[i] = hsum<T>(acc[i]);
}

template <typename T>
struct Job {
  Dims d;
  Inputs<T> in;
  int64_t n_chunks;
  std::vector<double> partial;  // (n_chunks, size)
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void work() {
    for (;;) {
      const int64_t c = next.fetch_add(1);
      if (c >= n_chunks) return;
      const int64_t i0 = c * kChunk, i1 = std::min(d.N, i0 + kChunk);
      chunk_stats<T>(d, in, i0, i1, partial.data() + c * d.size());
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

template <ffi::DataType DT>
ffi::Error estep_impl(ffi::ThreadPool pool, ffi::Buffer<DT> A, ffi::Buffer<DT> Y, ffi::Buffer<DT> W,
                      ffi::Buffer<DT> Z, ffi::Buffer<DT> B, ffi::Buffer<DT> C, ffi::Buffer<DT> S,
                      ffi::Buffer<DT> X0,
                      ffi::ResultBuffer<DT> ll, ffi::ResultBuffer<DT> nk, ffi::ResultBuffer<DT> sq,
                      ffi::ResultBuffer<DT> spe, ffi::ResultBuffer<DT> see) {
  using T = ffi::NativeType<DT>;
  auto ad = A.dimensions(), yd = Y.dimensions(), zd = Z.dimensions(), bd = B.dimensions();
  if (ad.size() != 2 || yd.size() != 2 || zd.size() != 3 || bd.size() != 2)
    return ffi::Error::InvalidArgument("estep: wrong input ranks");
  Dims d;
  // a non-empty X0 (D,): A is x (D, N) and the design is [1, x - X0], P = D + 1
  const bool linear = X0.element_count() > 0;
  if (linear && X0.element_count() != ad[0])
    return ffi::Error::InvalidArgument("estep: the shift X0 must have one entry per row of x");
  d.P = ad[0] + (linear ? 1 : 0);
  d.N = ad[1];
  d.H = yd[0];
  d.K = zd[0];
  d.G = zd[1];
  d.M = bd[1];
  d.Q = d.P * (d.P + 1) / 2;
  if (yd[1] != d.N || W.element_count() != d.N || zd[2] != d.P || bd[0] != d.K ||
      (d.M != 1 && d.M != d.N) || C.element_count() != d.K * d.H * d.P ||
      S.element_count() != d.K * d.H)
    return ffi::Error::InvalidArgument("estep: inconsistent input shapes");
  if (sq->element_count() != d.Q * d.K || spe->element_count() != d.P * d.K * d.H)
    return ffi::Error::InvalidArgument("estep: inconsistent output shapes");

  auto job = std::make_shared<Job<T>>();
  job->d = d;
  job->in = {A.typed_data(), Y.typed_data(), W.typed_data(), Z.typed_data(),
             B.typed_data(), C.typed_data(), S.typed_data(),
             linear ? X0.typed_data() : nullptr};
  job->n_chunks = std::max<int64_t>(1, (d.N + kChunk - 1) / kChunk);
  job->partial.assign(job->n_chunks * d.size(), 0.0);
  if (d.N == 0) job->n_chunks = 0;
  // the calling thread works too: num_threads - 1 helpers keep one thread per core (measured
  // faster and steadier than num_threads helpers on 2 cores)
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, job->n_chunks - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([job] { job->work(); });
  job->work();
  // chunks claimed by helpers may still be running: wait for all of them (a helper that starts
  // late finds no chunk left and returns; it keeps the job alive through its shared_ptr)
  while (job->done.load(std::memory_order_acquire) < job->n_chunks) std::this_thread::yield();

  std::vector<double> total(d.size(), 0.0);
  for (int64_t c = 0; c < job->n_chunks; ++c)
    for (int64_t s = 0; s < d.size(); ++s) total[s] += job->partial[c * d.size() + s];
  const double* t = total.data();
  ll->typed_data()[0] = static_cast<T>(t[0]);
  t += 1;
  for (int64_t k = 0; k < d.K; ++k) nk->typed_data()[k] = static_cast<T>(t[k]);
  t += d.K;
  for (int64_t i = 0; i < d.Q * d.K; ++i) sq->typed_data()[i] = static_cast<T>(t[i]);
  t += d.Q * d.K;
  for (int64_t i = 0; i < d.P * d.K * d.H; ++i) spe->typed_data()[i] = static_cast<T>(t[i]);
  t += d.P * d.K * d.H;
  for (int64_t i = 0; i < d.K * d.H; ++i) see->typed_data()[i] = static_cast<T>(t[i]);
  return ffi::Error::Success();
}

template <ffi::DataType DT>
constexpr auto binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<DT>>()
      .template Arg<ffi::Buffer<DT>>()
      .template Arg<ffi::Buffer<DT>>()
      .template Arg<ffi::Buffer<DT>>()
      .template Arg<ffi::Buffer<DT>>()
      .template Arg<ffi::Buffer<DT>>()
      .template Arg<ffi::Buffer<DT>>()
      .template Arg<ffi::Buffer<DT>>()
      .template Ret<ffi::Buffer<DT>>()
      .template Ret<ffi::Buffer<DT>>()
      .template Ret<ffi::Buffer<DT>>()
      .template Ret<ffi::Buffer<DT>>()
      .template Ret<ffi::Buffer<DT>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ConceptshiftEstepF32, estep_impl<ffi::F32>, binding<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ConceptshiftEstepF64, estep_impl<ffi::F64>, binding<ffi::F64>());
