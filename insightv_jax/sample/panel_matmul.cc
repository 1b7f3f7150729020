// y (M x P*48) = x (M x D) @ w, fp32, for M <= 8 rows: the weight-bound matmul
// of a CPU decode step. See panel_matmul.py for why and how it is used.
//
// w comes packed in column panels, (P, D, 48): panel p holds columns
// 48p .. 48p+47 of the (D, F) weight, row after row, so one panel is one
// contiguous run of memory. A panel's 8 x 48 outputs stay in 24 AVX-512
// registers while its D rows stream through; the panels are shared out
// among the calling thread and XLA's intra-op thread pool.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

extern "C" int insightv_panel_matmul_supported() {
#if defined(__AVX512F__)
  return 1;
#else
  return 0;
#endif
}

#if defined(__AVX512F__)

namespace {

constexpr int kPanel = 48;      // columns per panel: 3 vectors of 16 floats
constexpr int kVectors = 3;
constexpr int kPrefetchRows = 32;  // rows ahead in the panel (measured: 32 > 16 > 8)
constexpr int kMaxRows = 8;

// Columns of panels [first, last) for M rows.
template <int M>
void Panels(const float* x, const float* w, float* y, int64_t d_size, int64_t f_size,
            int64_t first, int64_t last) {
  for (int64_t p = first; p < last; ++p) {
    const float* panel = w + p * d_size * kPanel;
    __m512 acc[M][kVectors];
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < kVectors; ++j) acc[m][j] = _mm512_setzero_ps();
    for (int64_t d = 0; d < d_size; ++d) {
      const float* row = panel + d * kPanel;
      const char* ahead = reinterpret_cast<const char*>(row + kPrefetchRows * kPanel);
      _mm_prefetch(ahead, _MM_HINT_T0);
      _mm_prefetch(ahead + 64, _MM_HINT_T0);
      _mm_prefetch(ahead + 128, _MM_HINT_T0);
      __m512 wv[kVectors];
      for (int j = 0; j < kVectors; ++j) wv[j] = _mm512_loadu_ps(row + 16 * j);
      for (int m = 0; m < M; ++m) {
        const __m512 xv = _mm512_set1_ps(x[m * d_size + d]);
        for (int j = 0; j < kVectors; ++j) acc[m][j] = _mm512_fmadd_ps(xv, wv[j], acc[m][j]);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < kVectors; ++j)
        _mm512_storeu_ps(y + m * f_size + p * kPanel + 16 * j, acc[m][j]);
  }
}

using PanelFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t);
constexpr PanelFn kByRows[kMaxRows + 1] = {nullptr,   Panels<1>, Panels<2>, Panels<3>, Panels<4>,
                                           Panels<5>, Panels<6>, Panels<7>, Panels<8>};

// Chunks of panels handed out by an atomic counter. Helpers that start after
// every chunk is taken do nothing, so the caller never waits on a task the
// pool has not started (no deadlock when the pool is busy).
struct Job {
  PanelFn fn;
  const float* x;
  const float* w;
  float* y;
  int64_t d_size, f_size, panels, chunk, chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Work() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      fn(x, w, y, d_size, f_size, c * chunk, std::min(panels, (c + 1) * chunk));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

using Rows = ffi::Buffer<ffi::F32, 2>;  // aliases: the handler macro splits on commas
using Panels3 = ffi::Buffer<ffi::F32, 3>;
using RowsOut = ffi::ResultBuffer<ffi::F32, 2>;

ffi::Error PanelMatmul(ffi::ThreadPool pool, Rows x, Panels3 w, RowsOut y) {
  const int64_t rows = x.dimensions()[0], d_size = x.dimensions()[1];
  const int64_t panels = w.dimensions()[0];
  if (rows < 1 || rows > kMaxRows || w.dimensions()[1] != d_size || w.dimensions()[2] != kPanel)
    return ffi::Error::InvalidArgument("panel_matmul: x (M<=8, D) and w (P, D, 48) expected");
  auto job = std::make_shared<Job>();
  job->fn = kByRows[rows];
  job->x = x.typed_data();
  job->w = w.typed_data();
  job->y = y->typed_data();
  job->d_size = d_size;
  job->f_size = panels * kPanel;
  job->panels = panels;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  job->chunks = std::min(panels, 4 * threads);
  job->chunk = (panels + job->chunks - 1) / job->chunks;
  job->chunks = (panels + job->chunk - 1) / job->chunk;
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([job] { job->Work(); });
  job->Work();
  while (job->done.load(std::memory_order_acquire) < job->chunks) _mm_pause();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(insightv_panel_matmul, PanelMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Rows>()
                                  .Arg<Panels3>()
                                  .Ret<Rows>());

#endif  // __AVX512F__
