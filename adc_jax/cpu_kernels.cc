// Matrix products and softmax attention for XLA's CPU backend through OpenBLAS, as XLA FFI
// custom calls. See adc_jax/cpu_kernels.py, which compiles this file, hands it OpenBLAS's sgemm
// and registers the handlers:
//
//   AdcCpuMatmul             c[i] = op(a[i]) · op(b[i]) over the batch axes, op by trans_a/b
//   AdcCpuAttention(Grad)    softmax attention per (batch, head) item, q, k, v [..., n|N, d]
//   AdcCpuAttentionQkv(Grad) the same from one fused qkv [B, N, 3·H·d], out [B, N, H·d]
//
// All float32, row-major. Threads: the work is cut into parts (row blocks or contraction chunks
// of one product, runs of items of a batch) that the calling thread and tasks on XLA's intra-op
// thread pool claim one at a time; each part runs single-threaded sgemm calls. The caller claims
// parts until none is left and then waits only for parts another thread is running, so it never
// waits on a task that has not started (the pool may be busy with other instructions of the
// program). OpenBLAS's own threads stay out of it (openblas_set_num_threads_local(1) around the
// parts): they spin after each call and would compete with XLA's threads for the same cores.
//
// No part boundary depends on the number of threads in a way that changes the arithmetic (row
// blocks and items are independent; contraction chunks are fixed by the length and added in
// order), so the numbers do not depend on the number of threads.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>
#include <memory>
#include <optional>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// Fortran BLAS sgemm with 64-bit integers (numpy's OpenBLAS is built with them).
using Sgemm = void (*)(const char* trans_a, const char* trans_b, const int64_t* m,
                       const int64_t* n, const int64_t* k, const float* alpha, const float* a,
                       const int64_t* lda, const float* b, const int64_t* ldb, const float* beta,
                       float* c, const int64_t* ldc);
using SetThreadsLocal = int (*)(int num_threads);

static Sgemm sgemm = nullptr;
static SetThreadsLocal set_threads_local = nullptr;

extern "C" void adc_cpu_kernels_set_blas(void* sgemm_fn, void* set_threads_local_fn) {
  sgemm = reinterpret_cast<Sgemm>(sgemm_fn);
  set_threads_local = reinterpret_cast<SetThreadsLocal>(set_threads_local_fn);
}

namespace {

// Runs run_part(0 .. parts-1), each part once, on the calling thread and on up to threads - 1
// tasks of XLA's pool (see the top of this file).
class ParallelParts {
 public:
  template <typename F>
  static void Run(ffi::ThreadPool& pool, int64_t parts, F run_part) {
    auto job = std::make_shared<Job<F>>(parts, std::move(run_part));
    const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
    for (int64_t i = 1; i < std::min(threads, parts); ++i) pool.Schedule([job] { job->Claim(); });
    job->Claim();
    while (job->done.load(std::memory_order_acquire) < parts) std::this_thread::yield();
  }

 private:
  template <typename F>
  struct Job {
    Job(int64_t parts, F run_part) : parts(parts), run_part(std::move(run_part)) {}
    const int64_t parts;
    F run_part;  // only called while the caller waits: a task that starts late finds no part
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};

    void Claim() {
      const int previous = set_threads_local(1);
      for (int64_t part; (part = next.fetch_add(1)) < parts;) {
        run_part(part);
        done.fetch_add(1, std::memory_order_release);
      }
      set_threads_local(previous);
    }
  };
};

template <typename A, typename B>
bool Same(const A& a, const B& b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

// Rows per part of a contraction over rows (see Matmul).
constexpr int64_t kContractionChunk = 4096;

int64_t Threads(ffi::ThreadPool& pool) { return std::max<int64_t>(pool.num_threads(), 1); }

// Row-major c [m, n] = alpha · op(a) · op(b); lda/ldb/ldc are row strides.
void Gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
          const float* b, int64_t ldb, float* c, int64_t ldc, float alpha = 1.0f) {
  // Row-major x is column-major xᵀ, so c = op(a)·op(b) is computed as cᵀ = op(b)ᵀ·op(a)ᵀ:
  // BLAS's "a" is our b, its "b" is our a.
  const float zero = 0.0f;
  sgemm(trans_b ? "T" : "N", trans_a ? "T" : "N", &n, &m, &k, &alpha, b, &ldb, a, &lda, &zero, c,
        &ldc);
}

// The batch axes of rank-r buffers (all but the last two) as one count; -1 if they differ.
template <typename... Dims>
int64_t Items(const Dims&... dims) {
  const auto& first = std::get<0>(std::tie(dims...));
  int64_t items = 1;
  for (size_t i = 0; i + 2 < first.size(); ++i) {
    if (((dims.size() != first.size() || dims[i] != first[i]) || ...)) return -1;
    items *= first[i];
  }
  return items;
}

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                  ffi::ResultBuffer<ffi::F32> c, bool trans_a, bool trans_b) {
  if (sgemm == nullptr || set_threads_local == nullptr)
    return ffi::Error::Internal("adc_jax cpu_kernels: OpenBLAS was not handed over");
  const auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  const size_t rank = ad.size();
  const int64_t items = rank >= 2 ? Items(ad, bd, cd) : -1;
  if (items < 0) return ffi::Error::InvalidArgument("adc_jax cpu_kernels: operands' batch axes");
  const int64_t m = trans_a ? ad[rank - 1] : ad[rank - 2], k = trans_a ? ad[rank - 2] : ad[rank - 1];
  const int64_t n = trans_b ? bd[rank - 2] : bd[rank - 1];
  if ((trans_b ? bd[rank - 1] : bd[rank - 2]) != k || cd[rank - 2] != m || cd[rank - 1] != n)
    return ffi::Error::InvalidArgument("adc_jax cpu_kernels: shapes do not multiply");
  const float* a_data = a.typed_data();
  const float* b_data = b.typed_data();
  float* c_data = c->typed_data();
  if (items == 0 || m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::fill_n(c_data, items * m * n, 0.0f);
    return ffi::Error::Success();
  }
  const int64_t lda = ad[rank - 1], ldb = bd[rank - 1], threads = Threads(pool);
  // c[item][row0 : row0 + rows] = op(a[item])[row0 : row0 + rows] · op(b[item]).
  auto rows = [=](int64_t item, int64_t row0, int64_t count) {
    const float* a_rows = a_data + item * m * k + (trans_a ? row0 : row0 * lda);
    Gemm(trans_a, trans_b, count, n, k, a_rows, lda, b_data + item * k * n, ldb,
         c_data + item * m * n + row0 * n, n);
  };
  if (items == 1 && trans_a && k > kContractionChunk) {
    // op(a) = aᵀ: a contraction over the rows of both operands (a weight gradient xᵀ·g). Cut the
    // rows into chunks: each part then reads a slice of both operands once (row blocks of c
    // would each read all of b). The chunks depend on k only, and the partial products are
    // added in chunk order, so the numbers do not depend on the number of threads.
    const int64_t chunks = (k + kContractionChunk - 1) / kContractionChunk;
    std::vector<float> partial((chunks - 1) * m * n);
    ParallelParts::Run(pool, chunks, [&](int64_t p) {
      const int64_t k0 = k * p / chunks, count = k * (p + 1) / chunks - k0;
      Gemm(true, trans_b, m, n, count, a_data + k0 * lda, lda,
           b_data + (trans_b ? k0 : k0 * ldb), ldb,
           p == 0 ? c_data : partial.data() + (p - 1) * m * n, n);
    });
    for (int64_t p = 1; p < chunks; ++p)
      for (int64_t i = 0; i < m * n; ++i) c_data[i] += partial[(p - 1) * m * n + i];
  } else if (items == 1) {  // row blocks of the one product
    const int64_t parts = std::min(threads, m);
    ParallelParts::Run(pool, parts, [=](int64_t p) {
      const int64_t row0 = m * p / parts;
      rows(0, row0, m * (p + 1) / parts - row0);
    });
  } else {  // runs of whole items; finer than one per thread, as items can finish unevenly
    const int64_t parts = std::min(4 * threads, items);
    ParallelParts::Run(pool, parts, [=](int64_t p) {
      for (int64_t i = items * p / parts; i < items * (p + 1) / parts; ++i) rows(i, 0, m);
    });
  }
  return ffi::Error::Success();
}

// x [rows, cols] (row stride ldx) -> x_t [cols, rows], row-major.
void Transpose(int64_t rows, int64_t cols, const float* x, int64_t ldx, float* x_t) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) x_t[c * rows + r] = x[r * ldx + c];
}

// op over x[0 .. size-1] (and init), in kLanes interleaved partial results, which compilers
// vectorise without licence to reorder floating-point operations.
template <typename Op>
inline float Reduce(const float* x, int64_t size, float init, Op op) {
  constexpr int kLanes = 16;
  float lanes[kLanes];
  std::fill_n(lanes, kLanes, init);
  int64_t j = 0;
  for (; j + kLanes <= size; j += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] = op(lanes[l], x[j + l]);
  for (; j < size; ++j) lanes[0] = op(lanes[0], x[j]);
  float out = lanes[0];
  for (int l = 1; l < kLanes; ++l) out = op(out, lanes[l]);
  return out;
}

// exp(x) for x <= 0 (a logit minus its row's maximum), in a form compilers vectorise: Cephes'
// expf (2^n · a degree-6 polynomial on [-ln2/2, ln2/2]), relative error ~1e-7. Below -87 it
// returns exp(-87) ≈ 1.6e-38 instead of a smaller or zero value.
inline float ExpNonPositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float magic = 12582912.0f;  // 1.5 · 2^23: adding it rounds to an integer
  const float n = (x * 1.44269504088896341f + magic) - magic;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// One (batch, head) item of attention's forward pass; see vit.attention. q [n, d], k, v [N, d]
// (row stride ld_in), logits = scale · q·kᵀ -> exp [n, N] (softmax numerators exp(logit - row
// max)), inv_sum [n] (their rows' inverse sums), out [n, d] (row stride ld_out) = softmax · v.
// Scratch k_t [d, N].
void AttentionForward(int64_t n, int64_t big_n, int64_t d, float scale, const float* q,
                      const float* k, const float* v, int64_t ld_in, float* exp, float* inv_sum,
                      float* out, int64_t ld_out, float* k_t) {
  Transpose(big_n, d, k, ld_in, k_t);  // q·kᵀ as a plain product: OpenBLAS's is faster
  Gemm(false, false, n, big_n, d, q, ld_in, k_t, big_n, exp, big_n, scale);
  for (int64_t r = 0; r < n; ++r) {
    float* row = exp + r * big_n;
    const float top = Reduce(row, big_n, row[0], [](float a, float b) { return a > b ? a : b; });
    for (int64_t j = 0; j < big_n; ++j) row[j] = ExpNonPositive(row[j] - top);
    inv_sum[r] = 1.0f / Reduce(row, big_n, 0.0f, [](float a, float b) { return a + b; });
  }
  Gemm(false, false, n, d, big_n, exp, big_n, v, ld_in, out, ld_out);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = 0; j < d; ++j) out[r * ld_out + j] *= inv_sum[r];
}

// Its backward pass: dq, dk, dv with the row stride of q, k, v; d_out that of out. Scratch
// d_scaled [n, d], d_logits [n, N], v_t [d, N].
void AttentionBackward(int64_t n, int64_t big_n, int64_t d, float scale, const float* q,
                       const float* k, const float* v, int64_t ld_in, const float* out,
                       const float* d_out, int64_t ld_out, const float* exp,
                       const float* inv_sum, float* dq, float* dk, float* dv, float* d_scaled,
                       float* d_logits, float* v_t) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = 0; j < d; ++j) d_scaled[r * d + j] = d_out[r * ld_out + j] * inv_sum[r];
  Gemm(true, false, big_n, d, n, exp, big_n, d_scaled, d, dv, ld_in);
  Transpose(big_n, d, v, ld_in, v_t);
  Gemm(false, false, n, big_n, d, d_scaled, d, v_t, big_n, d_logits, big_n);
  for (int64_t r = 0; r < n; ++r) {
    float row = 0.0f;  // Σ_k P·dP = dout · out
    for (int64_t j = 0; j < d; ++j) row += d_out[r * ld_out + j] * out[r * ld_out + j];
    const float shift = row * inv_sum[r];
    for (int64_t j = 0; j < big_n; ++j)
      d_logits[r * big_n + j] = exp[r * big_n + j] * (d_logits[r * big_n + j] - shift);
  }
  Gemm(false, false, n, d, big_n, d_logits, big_n, k, ld_in, dq, ld_in, scale);
  Gemm(true, false, big_n, d, n, d_logits, big_n, q, ld_in, dk, ld_in, scale);
}

using F32 = ffi::Buffer<ffi::F32>;
using F32Out = ffi::ResultBuffer<ffi::F32>;

// Where item i = (batch b, head h) keeps its rows. Separate buffers (heads == 0): q, out [n, d],
// k, v [N, d], one item after another. Fused (heads == H): qkv [B, N, 3·D] and out [B, N, D],
// D = H·d, head h in columns h·d .. h·d + d - 1 of q's, k's, v's (and out's) D columns. The
// gradients of q, k, v have their layout.
struct Layout {
  int64_t items, n, big_n, d;
  int64_t ld_in, ld_out;  // row strides of q, k, v and of out
  float scale;            // logits = scale · q·kᵀ
  int64_t heads = 0, width = 0;

  int64_t Q(int64_t i) const {
    return heads ? (i / heads) * big_n * 3 * width + (i % heads) * d : i * n * d;
  }
  int64_t K(int64_t i) const { return heads ? Q(i) + width : i * big_n * d; }
  int64_t V(int64_t i) const { return heads ? Q(i) + 2 * width : i * big_n * d; }
  int64_t Out(int64_t i) const {
    return heads ? (i / heads) * n * width + (i % heads) * d : i * n * d;
  }
};

void Forward(ffi::ThreadPool& pool, const Layout& l, const float* q, const float* k, const float* v,
             float* out, float* exp, float* inv_sum) {
  const int64_t parts = std::min(4 * Threads(pool), l.items);
  ParallelParts::Run(pool, parts, [=](int64_t p) {
    std::vector<float> k_t(l.big_n * l.d);
    for (int64_t i = l.items * p / parts; i < l.items * (p + 1) / parts; ++i)
      AttentionForward(l.n, l.big_n, l.d, l.scale, q + l.Q(i), k + l.K(i), v + l.V(i), l.ld_in,
                       exp + i * l.n * l.big_n, inv_sum + i * l.n, out + l.Out(i), l.ld_out,
                       k_t.data());
  });
}

void Backward(ffi::ThreadPool& pool, const Layout& l, const float* q, const float* k,
              const float* v, const float* out, const float* exp, const float* inv_sum,
              const float* d_out, float* dq, float* dk, float* dv) {
  const int64_t parts = std::min(4 * Threads(pool), l.items);
  ParallelParts::Run(pool, parts, [=](int64_t p) {
    std::vector<float> d_scaled(l.n * l.d), d_logits(l.n * l.big_n), v_t(l.big_n * l.d);
    for (int64_t i = l.items * p / parts; i < l.items * (p + 1) / parts; ++i)
      AttentionBackward(l.n, l.big_n, l.d, l.scale, q + l.Q(i), k + l.K(i), v + l.V(i), l.ld_in,
                        out + l.Out(i), d_out + l.Out(i), l.ld_out, exp + i * l.n * l.big_n,
                        inv_sum + i * l.n, dq + l.Q(i), dk + l.K(i), dv + l.V(i),
                        d_scaled.data(), d_logits.data(), v_t.data());
  });
}

// Separate q [..., n, d] (already scaled), k, v [..., N, d], heads among the batch axes.
std::optional<Layout> HeadsLayout(F32& q, F32& k, F32& v) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  const size_t rank = qd.size();
  const int64_t items = rank >= 2 ? Items(qd, kd, v.dimensions()) : -1;
  if (items < 0 || !Same(kd, v.dimensions()) || qd[rank - 1] != kd[rank - 1]) return std::nullopt;
  const int64_t n = qd[rank - 2], big_n = kd[rank - 2], d = qd[rank - 1];
  return Layout{items, n, big_n, d, d, d, 1.0f};
}

// One fused qkv [B, N, 3·D] (columns: q heads, k heads, v heads), out [B, N, D].
std::optional<Layout> QkvLayout(F32& qkv, int64_t heads, float scale) {
  const auto dims = qkv.dimensions();
  if (dims.size() != 3 || heads < 1 || dims[2] % (3 * heads) != 0) return std::nullopt;
  const int64_t width = dims[2] / 3, big_n = dims[1];
  return Layout{dims[0] * heads, big_n, big_n, width / heads, 3 * width, width, scale, heads,
                width};
}

const char kShapes[] = "adc_jax attention: q [..., n, d], k, v [..., N, d] or qkv [B, N, 3·H·d]";

ffi::Error Attention(ffi::ThreadPool pool, F32 q, F32 k, F32 v, F32Out out, F32Out exp,
                     F32Out inv_sum) {
  const auto layout = HeadsLayout(q, k, v);
  if (!layout) return ffi::Error::InvalidArgument(kShapes);
  Forward(pool, *layout, q.typed_data(), k.typed_data(), v.typed_data(), out->typed_data(),
          exp->typed_data(), inv_sum->typed_data());
  return ffi::Error::Success();
}

ffi::Error AttentionGrad(ffi::ThreadPool pool, F32 q, F32 k, F32 v, F32 out, F32 exp, F32 inv_sum,
                         F32 d_out, F32Out dq, F32Out dk, F32Out dv) {
  const auto layout = HeadsLayout(q, k, v);
  if (!layout) return ffi::Error::InvalidArgument(kShapes);
  Backward(pool, *layout, q.typed_data(), k.typed_data(), v.typed_data(), out.typed_data(),
           exp.typed_data(), inv_sum.typed_data(), d_out.typed_data(), dq->typed_data(),
           dk->typed_data(), dv->typed_data());
  return ffi::Error::Success();
}

ffi::Error AttentionQkv(ffi::ThreadPool pool, F32 qkv, F32Out out, F32Out exp, F32Out inv_sum,
                        int64_t heads, float scale) {
  const auto layout = QkvLayout(qkv, heads, scale);
  if (!layout) return ffi::Error::InvalidArgument(kShapes);
  const float* p = qkv.typed_data();
  Forward(pool, *layout, p, p, p, out->typed_data(), exp->typed_data(), inv_sum->typed_data());
  return ffi::Error::Success();
}

ffi::Error AttentionQkvGrad(ffi::ThreadPool pool, F32 qkv, F32 out, F32 exp, F32 inv_sum,
                            F32 d_out, F32Out d_qkv, int64_t heads, float scale) {
  const auto layout = QkvLayout(qkv, heads, scale);
  if (!layout) return ffi::Error::InvalidArgument(kShapes);
  const float* p = qkv.typed_data();
  float* g = d_qkv->typed_data();
  Backward(pool, *layout, p, p, p, out.typed_data(), exp.typed_data(), inv_sum.typed_data(),
           d_out.typed_data(), g, g, g);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdcCpuMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdcCpuAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdcCpuAttentionGrad, AttentionGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdcCpuAttentionQkv, AttentionQkv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Attr<int64_t>("heads")
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdcCpuAttentionQkvGrad, AttentionQkvGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Ret<F32>()
                                  .Attr<int64_t>("heads")
                                  .Attr<float>("scale"));
