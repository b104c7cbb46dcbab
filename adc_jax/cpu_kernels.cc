// Matrix products, softmax attention and LayerNorm for XLA's CPU backend, as XLA FFI custom
// calls. See adc_jax/cpu_kernels.py, which compiles this file, hands it OpenBLAS's sgemm and
// registers the handlers:
//
//   AdcCpuMatmul             c[i] = op(a[i]) · op(b[i]) over the batch axes, op by trans_a/b
//   AdcCpuAttention(Grad)    softmax attention per (batch, head) item, q, k, v [..., n|N, d]
//   AdcCpuAttentionQkv(Grad) the same from one fused qkv [B, N, 3·H·d], out [B, N, H·d]
//   AdcCpuAttentionSelect(Grad) the same from q [B, n, H·d] and kv [B, N, 2·H·d]
//   AdcCpuLayerNorm(Grad)    LayerNorm over the last axis, one pass over the rows each way
//
// All float32, row-major. The large products (Matmul) are OpenBLAS sgemm calls; attention's small
// per-head products run on this file's register tiles (SmallGemm), which are faster there.
// Threads: the work is cut into parts (row blocks or contraction chunks of one product, runs of
// items of a batch, chunks of rows) that the calling thread and tasks on XLA's intra-op thread
// pool claim one at a time; each part runs single-threaded. The caller claims parts until none is
// left and then waits only for parts another thread is running, so it never waits on a task that
// has not started (the pool may be busy with other instructions of the program). OpenBLAS's own
// threads stay out of it (openblas_set_num_threads_local(1) around the parts): they spin after
// each call and would compete with XLA's threads for the same cores.
//
// No part boundary depends on the number of threads in a way that changes the arithmetic (row
// blocks and items are independent; contraction chunks and LayerNorm's row chunks are fixed by
// the length and their partial sums added in order), so the numbers do not depend on the number
// of threads.

#include <algorithm>
#include <cmath>
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

using F32 = ffi::Buffer<ffi::F32>;
using F32Out = ffi::ResultBuffer<ffi::F32>;
template <typename T, const char* name>
using Attr = ffi::Attr<T, name>;  // the handlers' attributes, by name (see the end of the file)
constexpr char kTransA[] = "trans_a", kTransB[] = "trans_b", kHeads[] = "heads",
               kScale[] = "scale", kEps[] = "eps";

int64_t Threads(ffi::ThreadPool& pool) { return std::max<int64_t>(pool.num_threads(), 1); }

// Runs run_part(0 .. parts-1), each part once, on the calling thread and on up to threads - 1
// tasks of XLA's pool (see the top of this file).
class ParallelParts {
 public:
  template <typename F>
  static void Run(ffi::ThreadPool& pool, int64_t parts, F run_part) {
    auto job = std::make_shared<Job<F>>(parts, std::move(run_part));
    for (int64_t i = 1; i < std::min(Threads(pool), parts); ++i)
      pool.Schedule([job] { job->Claim(); });
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

ffi::Error Matmul(ffi::ThreadPool pool, F32 a, F32 b, F32Out c, Attr<bool, kTransA> trans_a_attr,
                  Attr<bool, kTransB> trans_b_attr) {
  const bool trans_a = *trans_a_attr, trans_b = *trans_b_attr;
  if (sgemm == nullptr || set_threads_local == nullptr)
    return ffi::Error::Internal("adc_jax cpu_kernels: OpenBLAS was not handed over");
  const auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  const size_t rank = ad.size();
  const int64_t items = rank >= 2 ? Items(ad, bd, cd) : -1;
  if (items < 0) return ffi::Error::InvalidArgument("adc_jax cpu_kernels: operands' batch axes");
  const int64_t m = trans_a ? ad[rank - 1] : ad[rank - 2];
  const int64_t k = trans_a ? ad[rank - 2] : ad[rank - 1];
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

// Attention's per-head products ([197, 64]·[64, 197] and the like in DeiT) are too small for
// OpenBLAS, whose packing and blocking are sized for large matrices: 80–100 GFLOP/s on one core of
// this project's CPU. They run on register tiles instead, 110–150 GFLOP/s: kTileRows rows by
// kTileVecs vectors of c accumulate over the whole contraction, b's rows loaded straight from
// memory (b [k, n] of one head is tens of KB, in cache). Written with GCC/Clang vector extensions,
// so it compiles for any CPU; sized for AVX-512 (24 accumulators of the 32 registers) or else for
// 16 registers. The sums run over the contraction in order, one fused multiply-add per term.
#if defined(__AVX512F__)
constexpr int kLaneCount = 16;
constexpr int kTileVecs = 4;
#else
constexpr int kLaneCount = 8;
constexpr int kTileVecs = 2;
#endif
constexpr int kTileRows = 6;
constexpr int64_t kTileCols = kTileVecs * kLaneCount;
typedef float Lanes __attribute__((vector_size(kLaneCount * sizeof(float))));

inline Lanes LoadLanes(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// c [Rows, Vecs·kLaneCount] = alpha · op(a) [Rows, k] · b [k, Vecs·kLaneCount].
template <int Rows, int Vecs, bool TransA>
inline void Tile(int64_t k, float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
                 float* c, int64_t ldc) {
  Lanes acc[Rows][Vecs] = {};
  for (int64_t p = 0; p < k; ++p) {
    Lanes b_row[Vecs];
    for (int v = 0; v < Vecs; ++v) b_row[v] = LoadLanes(b + p * ldb + v * kLaneCount);
    for (int r = 0; r < Rows; ++r) {
      const float a_rp = TransA ? a[p * lda + r] : a[r * lda + p];
      for (int v = 0; v < Vecs; ++v) acc[r][v] += a_rp * b_row[v];
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int v = 0; v < Vecs; ++v) {
      const Lanes out = alpha * acc[r][v];
      std::memcpy(c + r * ldc + v * kLaneCount, &out, sizeof out);
    }
}

// All m rows of c for one panel of Vecs·kLaneCount columns.
template <int Vecs, bool TransA>
void Panel(int64_t m, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
           int64_t ldb, float* c, int64_t ldc) {
  static_assert(kTileRows == 6, "the switch below takes the last 1..5 rows");
  const int64_t a_step = TransA ? 1 : lda;
  int64_t i = 0;
  for (; i + kTileRows <= m; i += kTileRows)
    Tile<kTileRows, Vecs, TransA>(k, alpha, a + i * a_step, lda, b, ldb, c + i * ldc, ldc);
  const float* a_last = a + i * a_step;
  float* c_last = c + i * ldc;
  switch (m - i) {
    case 5: return Tile<5, Vecs, TransA>(k, alpha, a_last, lda, b, ldb, c_last, ldc);
    case 4: return Tile<4, Vecs, TransA>(k, alpha, a_last, lda, b, ldb, c_last, ldc);
    case 3: return Tile<3, Vecs, TransA>(k, alpha, a_last, lda, b, ldb, c_last, ldc);
    case 2: return Tile<2, Vecs, TransA>(k, alpha, a_last, lda, b, ldb, c_last, ldc);
    case 1: return Tile<1, Vecs, TransA>(k, alpha, a_last, lda, b, ldb, c_last, ldc);
  }
}

// Panel with vecs (1 .. kTileVecs) chosen at run time.
template <bool TransA>
void PanelOf(int64_t vecs, int64_t m, int64_t k, float alpha, const float* a, int64_t lda,
             const float* b, int64_t ldb, float* c, int64_t ldc) {
  static_assert(kTileVecs <= 4, "the switch below takes 1..4 vectors");
  switch (vecs) {
    case 1: return Panel<1, TransA>(m, k, alpha, a, lda, b, ldb, c, ldc);
    case 2: return Panel<2, TransA>(m, k, alpha, a, lda, b, ldb, c, ldc);
    case 3: return Panel<3, TransA>(m, k, alpha, a, lda, b, ldb, c, ldc);
    case 4: return Panel<4, TransA>(m, k, alpha, a, lda, b, ldb, c, ldc);
  }
}

// Scratch floats SmallGemm needs for a product with contraction k and m rows.
int64_t SmallGemmScratch(int64_t m, int64_t k) { return (m + k) * kTileCols; }

// Row-major c [m, n] = alpha · op(a) [m, k] · b [k, n] (op(a) = aᵀ, a [k, m], if TransA), like
// Gemm(TransA, false, ...). Columns past the last whole vector go through scratch, zero-padded.
template <bool TransA>
void SmallGemm(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
               const float* b, int64_t ldb, float* c, int64_t ldc, float* scratch) {
  int64_t j = 0;
  for (; j + kTileCols <= n; j += kTileCols)
    Panel<kTileVecs, TransA>(m, k, alpha, a, lda, b + j, ldb, c + j, ldc);
  const int64_t tail = n - j, vecs = (tail + kLaneCount - 1) / kLaneCount;
  if (tail == 0) return;
  if (tail == vecs * kLaneCount) {
    PanelOf<TransA>(vecs, m, k, alpha, a, lda, b + j, ldb, c + j, ldc);
    return;
  }
  const int64_t width = vecs * kLaneCount;
  float* b_tail = scratch;
  float* c_tail = scratch + k * width;
  for (int64_t p = 0; p < k; ++p) {
    std::copy_n(b + p * ldb + j, tail, b_tail + p * width);
    std::fill(b_tail + p * width + tail, b_tail + (p + 1) * width, 0.0f);
  }
  PanelOf<TransA>(vecs, m, k, alpha, a, lda, b_tail, width, c_tail, width);
  for (int64_t r = 0; r < m; ++r) std::copy_n(c_tail + r * width, tail, c + r * ldc + j);
}

// Where item i = (batch element i / heads, head i % heads) of attention keeps its rows: q and out
// [n, d], k and v [N, d], each with its own row stride, each head d columns wide. The gradients
// of q, k, v have their layout. Three layouts (the functions below build them):
//   separate  q [..., n, d], k, v [..., N, d], out like q (heads among the batch axes: heads = 1)
//   fused     qkv [B, N, 3·D] (columns: q heads, k heads, v heads), out [B, N, D]; D = H·d
//   select    q [B, n, D], kv [B, N, 2·D] (columns: k heads, v heads), out [B, n, D]
struct Layout {
  int64_t items, n, big_n, d;
  float scale;                          // logits = scale · q·kᵀ
  int64_t heads;                        // items per batch element
  int64_t ld_q, ld_kv, ld_out;          // row strides
  int64_t q_batch, kv_batch, out_batch;  // from one batch element to the next
  int64_t k_offset, v_offset;           // where k's and v's heads start in their rows

  int64_t Q(int64_t i) const { return (i / heads) * q_batch + (i % heads) * d; }
  int64_t K(int64_t i) const { return (i / heads) * kv_batch + k_offset + (i % heads) * d; }
  int64_t V(int64_t i) const { return (i / heads) * kv_batch + v_offset + (i % heads) * d; }
  int64_t Out(int64_t i) const { return (i / heads) * out_batch + (i % heads) * d; }
  int64_t Scratch() const {  // floats one item's forward or backward pass needs
    return n * d + n * big_n + big_n * d +
           SmallGemmScratch(std::max(n, big_n), std::max({n, big_n, d}));
  }
};

// One item of attention's forward pass (see vit.attention), pointers at the item's first row:
// logits = scale · q·kᵀ -> exp [n, N] (softmax numerators exp(logit - row max)), inv_sum [n]
// (their rows' inverse sums), out [n, d] = softmax · v.
void AttentionForward(const Layout& l, const float* q, const float* k, const float* v,
                      float* exp, float* inv_sum, float* out, float* scratch) {
  const int64_t n = l.n, big_n = l.big_n, d = l.d;
  float* k_t = scratch;  // [d, N]: q·kᵀ as a plain product, kᵀ's rows contiguous
  float* gemm_scratch = k_t + big_n * d;
  Transpose(big_n, d, k, l.ld_kv, k_t);
  SmallGemm<false>(n, big_n, d, l.scale, q, l.ld_q, k_t, big_n, exp, big_n, gemm_scratch);
  for (int64_t r = 0; r < n; ++r) {
    float* row = exp + r * big_n;
    const float top = Reduce(row, big_n, row[0], [](float a, float b) { return a > b ? a : b; });
    for (int64_t j = 0; j < big_n; ++j) row[j] = ExpNonPositive(row[j] - top);
    inv_sum[r] = 1.0f / Reduce(row, big_n, 0.0f, [](float a, float b) { return a + b; });
  }
  SmallGemm<false>(n, d, big_n, 1.0f, exp, big_n, v, l.ld_kv, out, l.ld_out, gemm_scratch);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = 0; j < d; ++j) out[r * l.ld_out + j] *= inv_sum[r];
}

// Its backward pass: dq, dk, dv (laid out as q, k, v) from d_out (laid out as out).
void AttentionBackward(const Layout& l, const float* q, const float* k, const float* v,
                       const float* out, const float* d_out, const float* exp,
                       const float* inv_sum, float* dq, float* dk, float* dv, float* scratch) {
  const int64_t n = l.n, big_n = l.big_n, d = l.d, ld_out = l.ld_out;
  float* d_scaled = scratch;             // [n, d]
  float* d_logits = d_scaled + n * d;    // [n, N]
  float* v_t = d_logits + n * big_n;     // [d, N]
  float* gemm_scratch = v_t + big_n * d;
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = 0; j < d; ++j) d_scaled[r * d + j] = d_out[r * ld_out + j] * inv_sum[r];
  SmallGemm<true>(big_n, d, n, 1.0f, exp, big_n, d_scaled, d, dv, l.ld_kv, gemm_scratch);
  Transpose(big_n, d, v, l.ld_kv, v_t);
  SmallGemm<false>(n, big_n, d, 1.0f, d_scaled, d, v_t, big_n, d_logits, big_n, gemm_scratch);
  for (int64_t r = 0; r < n; ++r) {
    float row = 0.0f;  // Σ_k P·dP = dout · out
    for (int64_t j = 0; j < d; ++j) row += d_out[r * ld_out + j] * out[r * ld_out + j];
    const float shift = row * inv_sum[r];
    for (int64_t j = 0; j < big_n; ++j)
      d_logits[r * big_n + j] = exp[r * big_n + j] * (d_logits[r * big_n + j] - shift);
  }
  SmallGemm<false>(n, d, big_n, l.scale, d_logits, big_n, k, l.ld_kv, dq, l.ld_q, gemm_scratch);
  SmallGemm<true>(big_n, d, n, l.scale, d_logits, big_n, q, l.ld_q, dk, l.ld_kv, gemm_scratch);
}

// Asks for x [rows, cols] (row stride ld) to be brought into cache. The loops below call it for
// the next item before computing this one: in the fused layout an item's rows are a column slice
// of qkv, a few cache lines every 3·D floats, which the hardware prefetchers do not follow. (At
// DeiT-Tiny's sizes attention is half again as slow on data from memory as on data in cache;
// this recovers a few percent of the forward pass, the rest is the [n, N] matrices' traffic.)
void Prefetch(const float* x, int64_t rows, int64_t cols, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; c += 16) __builtin_prefetch(x + r * ld + c);
    __builtin_prefetch(x + r * ld + cols - 1);
  }
}

void PrefetchInputs(const Layout& l, int64_t i, const float* q, const float* k, const float* v) {
  Prefetch(q + l.Q(i), l.n, l.d, l.ld_q);
  Prefetch(k + l.K(i), l.big_n, l.d, l.ld_kv);
  Prefetch(v + l.V(i), l.big_n, l.d, l.ld_kv);
}

void Forward(ffi::ThreadPool& pool, const Layout& l, const float* q, const float* k, const float* v,
             float* out, float* exp, float* inv_sum) {
  const int64_t parts = std::min(4 * Threads(pool), l.items);
  ParallelParts::Run(pool, parts, [=, &l](int64_t p) {
    std::vector<float> scratch(l.Scratch());
    const int64_t end = l.items * (p + 1) / parts;
    for (int64_t i = l.items * p / parts; i < end; ++i) {
      if (i + 1 < end) PrefetchInputs(l, i + 1, q, k, v);
      AttentionForward(l, q + l.Q(i), k + l.K(i), v + l.V(i), exp + i * l.n * l.big_n,
                       inv_sum + i * l.n, out + l.Out(i), scratch.data());
    }
  });
}

void Backward(ffi::ThreadPool& pool, const Layout& l, const float* q, const float* k,
              const float* v, const float* out, const float* exp, const float* inv_sum,
              const float* d_out, float* dq, float* dk, float* dv) {
  const int64_t parts = std::min(4 * Threads(pool), l.items);
  ParallelParts::Run(pool, parts, [=, &l](int64_t p) {
    std::vector<float> scratch(l.Scratch());
    const int64_t end = l.items * (p + 1) / parts;
    for (int64_t i = l.items * p / parts; i < end; ++i) {
      if (i + 1 < end) {
        PrefetchInputs(l, i + 1, q, k, v);
        Prefetch(out + l.Out(i + 1), l.n, l.d, l.ld_out);
        Prefetch(d_out + l.Out(i + 1), l.n, l.d, l.ld_out);
      }
      AttentionBackward(l, q + l.Q(i), k + l.K(i), v + l.V(i), out + l.Out(i), d_out + l.Out(i),
                        exp + i * l.n * l.big_n, inv_sum + i * l.n, dq + l.Q(i), dk + l.K(i),
                        dv + l.V(i), scratch.data());
    }
  });
}

// Separate q [..., n, d] (already scaled), k, v [..., N, d], heads among the batch axes.
std::optional<Layout> HeadsLayout(F32& q, F32& k, F32& v) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  const size_t rank = qd.size();
  const int64_t items = rank >= 2 ? Items(qd, kd, v.dimensions()) : -1;
  if (items < 0 || !Same(kd, v.dimensions()) || qd[rank - 1] != kd[rank - 1]) return std::nullopt;
  const int64_t n = qd[rank - 2], big_n = kd[rank - 2], d = qd[rank - 1];
  return Layout{items, n, big_n, d, 1.0f, 1, d, d, d, n * d, big_n * d, n * d, 0, 0};
}

// One fused qkv [B, N, 3·D] (columns: q heads, k heads, v heads), out [B, N, D].
std::optional<Layout> QkvLayout(F32& qkv, int64_t heads, float scale) {
  const auto dims = qkv.dimensions();
  if (dims.size() != 3 || heads < 1 || dims[2] % (3 * heads) != 0) return std::nullopt;
  const int64_t width = dims[2] / 3, big_n = dims[1];
  return Layout{dims[0] * heads, big_n,     big_n,         width / heads, scale,
                heads,           3 * width, 3 * width,     width,         big_n * 3 * width,
                big_n * 3 * width, big_n * width, width,   2 * width};
}

// Queries q [B, n, D] (already scaled) of some rows, keys and values kv [B, N, 2·D] (columns: k
// heads, v heads) of all, out [B, n, D]: the last client block under ADC (vit.Attention's select).
std::optional<Layout> SelectLayout(F32& q, F32& kv, int64_t heads) {
  const auto qd = q.dimensions(), kvd = kv.dimensions();
  if (qd.size() != 3 || kvd.size() != 3 || heads < 1 || qd[0] != kvd[0] ||
      kvd[2] != 2 * qd[2] || qd[2] % heads != 0)
    return std::nullopt;
  const int64_t width = qd[2], n = qd[1], big_n = kvd[1];
  return Layout{qd[0] * heads, n, big_n, width / heads, 1.0f, heads, width, 2 * width, width,
                n * width, big_n * 2 * width, n * width, 0, width};
}

const char kShapes[] =
    "adc_jax attention: q [..., n, d], k, v [..., N, d]; qkv [B, N, 3·H·d]; or q [B, n, H·d], "
    "kv [B, N, 2·H·d]";

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
                        Attr<int64_t, kHeads> heads, Attr<float, kScale> scale) {
  const auto layout = QkvLayout(qkv, *heads, *scale);
  if (!layout) return ffi::Error::InvalidArgument(kShapes);
  const float* p = qkv.typed_data();
  Forward(pool, *layout, p, p, p, out->typed_data(), exp->typed_data(), inv_sum->typed_data());
  return ffi::Error::Success();
}

ffi::Error AttentionQkvGrad(ffi::ThreadPool pool, F32 qkv, F32 out, F32 exp, F32 inv_sum,
                            F32 d_out, F32Out d_qkv, Attr<int64_t, kHeads> heads,
                            Attr<float, kScale> scale) {
  const auto layout = QkvLayout(qkv, *heads, *scale);
  if (!layout) return ffi::Error::InvalidArgument(kShapes);
  const float* p = qkv.typed_data();
  float* g = d_qkv->typed_data();
  Backward(pool, *layout, p, p, p, out.typed_data(), exp.typed_data(), inv_sum.typed_data(),
           d_out.typed_data(), g, g, g);
  return ffi::Error::Success();
}

ffi::Error AttentionSelect(ffi::ThreadPool pool, F32 q, F32 kv, F32Out out, F32Out exp,
                           F32Out inv_sum, Attr<int64_t, kHeads> heads) {
  const auto layout = SelectLayout(q, kv, *heads);
  if (!layout) return ffi::Error::InvalidArgument(kShapes);
  const float* p = kv.typed_data();
  Forward(pool, *layout, q.typed_data(), p, p, out->typed_data(), exp->typed_data(),
          inv_sum->typed_data());
  return ffi::Error::Success();
}

ffi::Error AttentionSelectGrad(ffi::ThreadPool pool, F32 q, F32 kv, F32 out, F32 exp, F32 inv_sum,
                               F32 d_out, F32Out dq, F32Out d_kv, Attr<int64_t, kHeads> heads) {
  const auto layout = SelectLayout(q, kv, *heads);
  if (!layout) return ffi::Error::InvalidArgument(kShapes);
  const float* p = kv.typed_data();
  float* g = d_kv->typed_data();
  Backward(pool, *layout, q.typed_data(), p, p, out.typed_data(), exp.typed_data(),
           inv_sum.typed_data(), d_out.typed_data(), dq->typed_data(), g, g);
  return ffi::Error::Success();
}

// LayerNorm over the last axis of x [R, D], per row: mean, rstd = 1/√(mean((x - mean)²) + eps),
// y = (x - mean)·rstd·scale + bias (vit.layer_norm's formula: the variance of the centred row).
// XLA on a CPU spends several full-size passes on it (centred row, broadcast inverse deviation,
// normalised row, output; more in the backward pass); here one pass reads x and writes y. Rows
// are cut into fixed chunks claimed by the pool's threads; the backward pass adds the chunks'
// partial dscale and dbias in chunk order, so no number depends on the number of threads.
constexpr int64_t kNormChunk = 64;  // rows per part

int64_t Count(const F32& x) { return static_cast<int64_t>(x.element_count()); }

int64_t NormChunks(int64_t rows) { return (rows + kNormChunk - 1) / kNormChunk; }

ffi::Error LayerNormForward(ffi::ThreadPool pool, F32 x, F32 scale, F32 bias, F32Out y,
                            F32Out mean, F32Out rstd, Attr<float, kEps> eps_attr) {
  const float eps = *eps_attr;
  const auto dims = x.dimensions();
  const int64_t d = dims.size() ? dims[dims.size() - 1] : -1;
  if (d < 0 || Count(scale) != d || Count(bias) != d)
    return ffi::Error::InvalidArgument("adc_jax layer_norm: x [..., D], scale and bias [D]");
  const int64_t rows = d ? Count(x) / d : 0;
  const float *x_data = x.typed_data(), *s = scale.typed_data(), *b = bias.typed_data();
  float *y_data = y->typed_data(), *mean_data = mean->typed_data(), *rstd_data = rstd->typed_data();
  ParallelParts::Run(pool, NormChunks(rows), [=](int64_t part) {
    const auto plus = [](float u, float v) { return u + v; };
    for (int64_t r = part * kNormChunk; r < std::min(rows, (part + 1) * kNormChunk); ++r) {
      const float* xr = x_data + r * d;
      float* yr = y_data + r * d;
      const float mu = Reduce(xr, d, 0.0f, plus) / d;
      for (int64_t j = 0; j < d; ++j) yr[j] = (xr[j] - mu) * (xr[j] - mu);  // scratch: squares
      const float inv = 1.0f / std::sqrt(Reduce(yr, d, 0.0f, plus) / d + eps);
      for (int64_t j = 0; j < d; ++j) yr[j] = (xr[j] - mu) * inv * s[j] + b[j];
      mean_data[r] = mu;
      rstd_data[r] = inv;
    }
  });
  return ffi::Error::Success();
}

// One row of LayerNormBackward's first pass: the normalised row n, g = dy·scale, g·n, and the
// row's terms of dscale and dbias added to the part's sums.
void NormRowGrad(int64_t d, const float* __restrict x, const float* __restrict dy,
                 const float* __restrict scale, float mean, float rstd, float* __restrict n,
                 float* __restrict g, float* __restrict gn, float* __restrict sum_dy_n,
                 float* __restrict sum_dy) {
  for (int64_t j = 0; j < d; ++j) {
    n[j] = (x[j] - mean) * rstd;
    g[j] = dy[j] * scale[j];
    gn[j] = g[j] * n[j];
    sum_dy_n[j] += dy[j] * n[j];
    sum_dy[j] += dy[j];
  }
}

// Its backward pass, from x and the row statistics: with n = (x - mean)·rstd and g = dy·scale,
// dx = rstd·(g - mean(g) - n·mean(g·n)), dscale = Σ_rows dy·n, dbias = Σ_rows dy.
ffi::Error LayerNormBackward(ffi::ThreadPool pool, F32 x, F32 mean, F32 rstd, F32 scale, F32 dy,
                             F32Out dx, F32Out dscale, F32Out dbias) {
  const auto dims = x.dimensions();
  const int64_t d = dims.size() ? dims[dims.size() - 1] : -1;
  if (d < 0 || Count(scale) != d || !Same(dims, dy.dimensions()) ||
      Count(mean) * d != Count(x) || Count(rstd) != Count(mean))
    return ffi::Error::InvalidArgument("adc_jax layer_norm: x, dy [..., D], statistics [...]");
  const int64_t rows = d ? Count(x) / d : 0, chunks = NormChunks(rows);
  const float *x_data = x.typed_data(), *mean_data = mean.typed_data();
  const float *rstd_data = rstd.typed_data(), *s = scale.typed_data(), *dy_data = dy.typed_data();
  float* dx_data = dx->typed_data();
  std::vector<float> partial(chunks * 2 * d);  // per chunk: Σ dy·n, then Σ dy
  float* partial_data = partial.data();
  ParallelParts::Run(pool, chunks, [=](int64_t part) {
    float* sum_dy_n = partial_data + part * 2 * d;
    float* sum_dy = sum_dy_n + d;
    std::vector<float> scratch(3 * d);
    float *n = scratch.data(), *g = n + d, *gn = g + d;
    const auto plus = [](float u, float v) { return u + v; };
    for (int64_t r = part * kNormChunk; r < std::min(rows, (part + 1) * kNormChunk); ++r) {
      const float inv = rstd_data[r];
      NormRowGrad(d, x_data + r * d, dy_data + r * d, s, mean_data[r], inv, n, g, gn, sum_dy_n,
                  sum_dy);
      const float mean_g = Reduce(g, d, 0.0f, plus) / d;
      const float mean_gn = Reduce(gn, d, 0.0f, plus) / d;
      float* dxr = dx_data + r * d;
      for (int64_t j = 0; j < d; ++j) dxr[j] = inv * (g[j] - mean_g - n[j] * mean_gn);
    }
  });
  float *dscale_data = dscale->typed_data(), *dbias_data = dbias->typed_data();
  std::fill_n(dscale_data, d, 0.0f);
  std::fill_n(dbias_data, d, 0.0f);
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t j = 0; j < d; ++j) {
      dscale_data[j] += partial[c * 2 * d + j];
      dbias_data[j] += partial[c * 2 * d + d + j];
    }
  return ffi::Error::Success();
}

}  // namespace

// Each handler's binding (its buffers, results, attributes and the thread pool) is inferred from
// its signature; the pool needs the declaration below.
template <>
struct xla::ffi::CtxBinding<xla::ffi::ThreadPool> {
  using Ctx = xla::ffi::ThreadPool;
};

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdcCpuMatmul, Matmul);
XLA_FFI_DEFINE_HANDLER_SYMBOL(AdcCpuAttention, Attention);
XLA_FFI_DEFINE_HANDLER_SYMBOL(AdcCpuAttentionGrad, AttentionGrad);
XLA_FFI_DEFINE_HANDLER_SYMBOL(AdcCpuAttentionQkv, AttentionQkv);
XLA_FFI_DEFINE_HANDLER_SYMBOL(AdcCpuAttentionQkvGrad, AttentionQkvGrad);
XLA_FFI_DEFINE_HANDLER_SYMBOL(AdcCpuAttentionSelect, AttentionSelect);
XLA_FFI_DEFINE_HANDLER_SYMBOL(AdcCpuAttentionSelectGrad, AttentionSelectGrad);
XLA_FFI_DEFINE_HANDLER_SYMBOL(AdcCpuLayerNorm, LayerNormForward);
XLA_FFI_DEFINE_HANDLER_SYMBOL(AdcCpuLayerNormGrad, LayerNormBackward);
