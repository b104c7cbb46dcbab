// Matrix products for XLA's CPU backend through OpenBLAS, as an XLA FFI custom call.
//
// See adc_jax/cpu_matmul.py, which compiles this file, hands it OpenBLAS's sgemm and registers
// the handler. One handler: c[i] = op(a[i]) · op(b[i]) for every i of the leading (batch) axes,
// row-major float32, op(x) = x or xᵀ by the attributes trans_a / trans_b. A product with no
// batch axes has one item.
//
// Threads: the work is cut into parts (row blocks of c for a single product, runs of items for a
// batch) that the calling thread and tasks on XLA's intra-op thread pool claim one at a time;
// each part is one single-threaded sgemm. The caller claims parts until none is left and then
// waits only for parts another thread is running, so it never waits on a task that has not
// started (the pool may be busy with other instructions of the program). OpenBLAS's own threads
// stay out of it (openblas_set_num_threads_local(1) around the parts): they spin after each call
// and would compete with XLA's threads for the same cores.
//
// Cutting c into row blocks never splits the contraction, so the numbers do not depend on the
// number of threads.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
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

extern "C" void adc_cpu_matmul_set_blas(void* sgemm_fn, void* set_threads_local_fn) {
  sgemm = reinterpret_cast<Sgemm>(sgemm_fn);
  set_threads_local = reinterpret_cast<SetThreadsLocal>(set_threads_local_fn);
}

namespace {

struct Product {
  const float* a;
  const float* b;
  float* c;
  bool trans_a, trans_b;
  int64_t items, m, n, k;  // c[i] is [m, n]; the contraction has length k
  int64_t parts;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  // c[item][row0 : row0 + rows] = op(a[item])[row0 : row0 + rows] · op(b[item]).
  void Gemm(int64_t item, int64_t row0, int64_t rows) const {
    // Row-major x [r, s] is column-major xᵀ, so c = op(a)·op(b) is computed as
    // cᵀ = op(b)ᵀ·op(a)ᵀ: BLAS's "a" is our b, its "b" is our a.
    const int64_t lda = trans_a ? m : k, ldb = trans_b ? k : n;
    const float* a_item = a + item * m * k + (trans_a ? row0 : row0 * lda);
    const float* b_item = b + item * k * n;
    float* c_rows = c + item * m * n + row0 * n;
    const float one = 1.0f, zero = 0.0f;
    sgemm(trans_b ? "T" : "N", trans_a ? "T" : "N", &n, &rows, &k, &one, b_item, &ldb, a_item,
          &lda, &zero, c_rows, &n);
  }

  void RunPart(int64_t part) const {
    if (items == 1) {  // row blocks of the one product
      const int64_t row0 = m * part / parts, row1 = m * (part + 1) / parts;
      Gemm(0, row0, row1 - row0);
    } else {  // runs of whole items
      for (int64_t i = items * part / parts; i < items * (part + 1) / parts; ++i) Gemm(i, 0, m);
    }
  }

  void ClaimParts() {
    const int previous = set_threads_local(1);
    for (int64_t part; (part = next.fetch_add(1)) < parts;) {
      RunPart(part);
      done.fetch_add(1, std::memory_order_release);
    }
    set_threads_local(previous);
  }
};

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                  ffi::ResultBuffer<ffi::F32> c, bool trans_a, bool trans_b) {
  if (sgemm == nullptr || set_threads_local == nullptr)
    return ffi::Error::Internal("adc_jax cpu_matmul: OpenBLAS was not handed over");
  const auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  const size_t rank = ad.size();
  if (rank < 2 || bd.size() != rank || cd.size() != rank)
    return ffi::Error::InvalidArgument("adc_jax cpu_matmul: operands of equal rank >= 2");
  auto product = std::make_shared<Product>();
  product->items = 1;
  for (size_t i = 0; i + 2 < rank; ++i) {
    if (bd[i] != ad[i] || cd[i] != ad[i])
      return ffi::Error::InvalidArgument("adc_jax cpu_matmul: batch axes differ");
    product->items *= ad[i];
  }
  const int64_t a0 = ad[rank - 2], a1 = ad[rank - 1], b0 = bd[rank - 2], b1 = bd[rank - 1];
  product->m = trans_a ? a1 : a0;
  product->k = trans_a ? a0 : a1;
  product->n = trans_b ? b0 : b1;
  if ((trans_b ? b1 : b0) != product->k || cd[rank - 2] != product->m ||
      cd[rank - 1] != product->n)
    return ffi::Error::InvalidArgument("adc_jax cpu_matmul: shapes do not multiply");
  product->a = a.typed_data();
  product->b = b.typed_data();
  product->c = c->typed_data();
  product->trans_a = trans_a;
  product->trans_b = trans_b;
  if (product->items == 0 || product->m == 0 || product->n == 0) return ffi::Error::Success();
  if (product->k == 0) {
    std::fill_n(product->c, product->items * product->m * product->n, 0.0f);
    return ffi::Error::Success();
  }

  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  // A batch is cut finer than one part per thread: its items can finish unevenly.
  product->parts = product->items == 1 ? std::min(threads, product->m)
                                       : std::min(4 * threads, product->items);
  for (int64_t i = 1; i < std::min(threads, product->parts); ++i)
    pool.Schedule([product] { product->ClaimParts(); });
  product->ClaimParts();
  while (product->done.load(std::memory_order_acquire) < product->parts)
    std::this_thread::yield();
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
