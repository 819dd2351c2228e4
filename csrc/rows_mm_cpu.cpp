// Streaming few-rows products (see rows_mm_cpu.h): AVX-512, AVX2 + FMA or plain C++, chosen once.
//
// Layout [n, k] (not transposed): output feature j is a dot product of weight row j with each input
// row. For one input row the weight rows are read one after the other (a single stream); for more,
// four weight rows (with AVX2 and three or four input rows: two) are read together, each input
// row keeps one vector accumulator per weight row, and the lanes are summed at the end, then the
// k % width tail. Past four input rows, tile by tile of output features (rows_mm_f32).
// Layout [k, n] (transposed): a block of output features is a run of each weight row; every input
// row keeps the block's accumulators in registers while the weight rows stream past (one fused
// multiply-add per lane and weight row, in order: a lane's result is the scalar fma chain).
#include "rows_mm_cpu.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

namespace moe_runtime {
namespace {

enum class Isa { kPlain, kAvx2, kAvx512 };

// MOE_RUNTIME_CPU_ISA=avx2 or =plain caps the instruction set (read once), so the narrower kernels can
// be tested and timed on a wider machine; anything else (or unset) takes the widest the CPU has.
Isa detect_isa() {
  const char* cap = std::getenv("MOE_RUNTIME_CPU_ISA");
  const bool plain = cap != nullptr && std::strcmp(cap, "plain") == 0;
  const bool avx2 = cap != nullptr && std::strcmp(cap, "avx2") == 0;
  if (plain) {
    return Isa::kPlain;
  }
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (!avx2 && __builtin_cpu_supports("avx512f")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return Isa::kAvx2;
  }
#endif
  return Isa::kPlain;
}

Isa isa() {
  static const Isa level = detect_isa();
  return level;
}

// ---- plain C++ -------------------------------------------------------------------------------

// A dot product in Lanes independent partial sums (lane l takes the indices = l mod Lanes), then
// halved pairwise: the compiler vectorizes it for whatever the target has (NEON, SSE; AVX2 or AVX-512
// inlined into a function of that target), where one running sum is bound by the latency of each
// add (about 10x slower).
template <int Lanes>
__attribute__((always_inline)) inline float dot_lanes(const float* a, const float* b, int64_t k) {
  float acc[Lanes] = {};
  int64_t c = 0;
  for (; c + Lanes <= k; c += Lanes) {
    for (int l = 0; l < Lanes; ++l) {
      acc[l] += a[c + l] * b[c + l];
    }
  }
  for (int l = 0; c + l < k; ++l) {
    acc[l] += a[c + l] * b[c + l];
  }
  for (int width = Lanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) {
      acc[l] += acc[l + width];
    }
  }
  return acc[0];
}

// y += alpha * x: independent elements, vectorized for the target it is inlined into.
__attribute__((always_inline)) inline void axpy_loop(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    y[i] += alpha * x[i];
  }
}

void dot_plain(const float* x, int64_t ldx, int64_t m, const float* w, int64_t k, int64_t j0, int64_t j1,
               float* out, int64_t ldo) {
  for (int64_t j = j0; j < j1; ++j) {  // each weight row once, for every input row while it is cached
    const float* wr = w + j * k;
    for (int64_t i = 0; i < m; ++i) {
      out[i * ldo + j] = dot_lanes<16>(wr, x + i * ldx, k);
    }
  }
}

// Also the tail of the AVX kernels' column blocks: one fused multiply-add per step, as theirs. The
// output features are the inner loop (independent sums, vectorizable where fma is an instruction).
void axpy_plain(const float* x, int64_t ldx, int64_t m, const float* w, int64_t k, int64_t n, int64_t j0,
                int64_t j1, float* out, int64_t ldo) {
  for (int64_t i = 0; i < m; ++i) {
    float* o = out + i * ldo;
    std::fill(o + j0, o + j1, 0.f);
    for (int64_t c = 0; c < k; ++c) {
      const float xc = x[i * ldx + c];
      const float* wc = w + c * n;
      for (int64_t j = j0; j < j1; ++j) {
        o[j] = std::fma(xc, wc[j], o[j]);
      }
    }
  }
}

#if defined(__x86_64__) || defined(__i386__)

// Products of two or more input rows read four (or two) weight rows at a time and prefetch them two
// groups ahead (see dot_avx512): 1.1-1.4x on 16 experts x 3-8 rows here (docs/benchmarks.md). One
// input row reads the weight rows one after the other, a single stream, without prefetching.

// ---- AVX-512 -----------------------------------------------------------------------------------

// M input rows x R weight rows, dot products over k. With `ahead`, the R weight rows at `ahead` are
// prefetched line by line alongside: each weight row is its own page-sized stream, which the hardware
// prefetcher learns anew at every row, and with several input rows to multiply the core issues too few
// loads to cover the memory's latency by itself.
template <int M, int R>
__attribute__((target("avx512f,fma"))) void dot_avx512(const float* x, int64_t ldx, const float* w, int64_t k,
                                                       int64_t j, float* out, int64_t ldo, const float* ahead) {
  __m512 acc[M][R];
  for (int i = 0; i < M; ++i) {
    for (int r = 0; r < R; ++r) {
      acc[i][r] = _mm512_setzero_ps();
    }
  }
  const float* wr = w + j * k;
  int64_t c = 0;
  for (; c + 16 <= k; c += 16) {
    __m512 wv[R];
    for (int r = 0; r < R; ++r) {
      if (ahead != nullptr) {
        _mm_prefetch(reinterpret_cast<const char*>(ahead + r * k + c), _MM_HINT_T0);
      }
      wv[r] = _mm512_loadu_ps(wr + r * k + c);
    }
    for (int i = 0; i < M; ++i) {
      const __m512 xv = _mm512_loadu_ps(x + i * ldx + c);
      for (int r = 0; r < R; ++r) {
        acc[i][r] = _mm512_fmadd_ps(wv[r], xv, acc[i][r]);
      }
    }
  }
  for (int i = 0; i < M; ++i) {
    for (int r = 0; r < R; ++r) {
      float s = _mm512_reduce_add_ps(acc[i][r]);
      for (int64_t t = c; t < k; ++t) {
        s = std::fma(wr[r * k + t], x[i * ldx + t], s);
      }
      out[i * ldo + j + r] = s;
    }
  }
}

// Weight rows [j0, j1); rows below `ahead_end` may be prefetched two groups of four ahead.
template <int M>
__attribute__((target("avx512f,fma"))) void dot_rows_avx512(const float* x, int64_t ldx, const float* w,
                                                            int64_t k, int64_t j0, int64_t j1, float* out,
                                                            int64_t ldo, int64_t ahead_end) {
  int64_t j = j0;
  // One input row (decode): weight row after weight row, so the matrix is one sequential stream.
  // Four rows at once made four streams a page apart, which one core read 25-30% slower here
  // (docs/benchmarks.md); each output is the same chain of operations either way.
  if (M > 1) {
    for (; j + 4 <= j1; j += 4) {
      dot_avx512<M, 4>(x, ldx, w, k, j, out, ldo, j + 12 <= ahead_end ? w + (j + 8) * k : nullptr);
    }
  }
  for (; j < j1; ++j) {
    dot_avx512<M, 1>(x, ldx, w, k, j, out, ldo, nullptr);
  }
}

// M input rows x a block of V vectors (16 output features each) of a [k, n] weight.
template <int M, int V>
__attribute__((target("avx512f,fma"))) void axpy_avx512(const float* x, int64_t ldx, const float* w, int64_t k,
                                                        int64_t n, int64_t j, float* out, int64_t ldo) {
  __m512 acc[M][V];
  for (int i = 0; i < M; ++i) {
    for (int v = 0; v < V; ++v) {
      acc[i][v] = _mm512_setzero_ps();
    }
  }
  for (int64_t c = 0; c < k; ++c) {
    const float* wr = w + c * n + j;
    __m512 wv[V];
    for (int v = 0; v < V; ++v) {
      wv[v] = _mm512_loadu_ps(wr + 16 * v);
    }
    for (int i = 0; i < M; ++i) {
      const __m512 xv = _mm512_set1_ps(x[i * ldx + c]);
      for (int v = 0; v < V; ++v) {
        acc[i][v] = _mm512_fmadd_ps(xv, wv[v], acc[i][v]);
      }
    }
  }
  for (int i = 0; i < M; ++i) {
    for (int v = 0; v < V; ++v) {
      _mm512_storeu_ps(out + i * ldo + j + 16 * v, acc[i][v]);
    }
  }
}

template <int M>
__attribute__((target("avx512f,fma"))) void axpy_rows_avx512(const float* x, int64_t ldx, const float* w,
                                                             int64_t k, int64_t n, int64_t j0, int64_t j1,
                                                             float* out, int64_t ldo) {
  int64_t j = j0;
  for (; j + 64 <= j1; j += 64) {
    axpy_avx512<M, 4>(x, ldx, w, k, n, j, out, ldo);
  }
  for (; j + 16 <= j1; j += 16) {
    axpy_avx512<M, 1>(x, ldx, w, k, n, j, out, ldo);
  }
  if (j < j1) {
    axpy_plain(x, ldx, M, w, k, n, j, j1, out, ldo);
  }
}

// ---- AVX2 --------------------------------------------------------------------------------------

__attribute__((target("avx2,fma"))) inline float sum_lanes_avx2(__m256 v) {
  const __m128 low = _mm256_castps256_ps128(v);
  const __m128 high = _mm256_extractf128_ps(v, 1);
  __m128 s = _mm_add_ps(low, high);
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int M, int R>
__attribute__((target("avx2,fma"))) void dot_avx2(const float* x, int64_t ldx, const float* w, int64_t k,
                                                  int64_t j, float* out, int64_t ldo, const float* ahead) {
  __m256 acc[M][R];
  for (int i = 0; i < M; ++i) {
    for (int r = 0; r < R; ++r) {
      acc[i][r] = _mm256_setzero_ps();
    }
  }
  const float* wr = w + j * k;
  int64_t c = 0;
  for (; c + 8 <= k; c += 8) {
    __m256 wv[R];
    for (int r = 0; r < R; ++r) {
      if (ahead != nullptr && (c & 15) == 0) {  // one prefetch per 64-byte line
        _mm_prefetch(reinterpret_cast<const char*>(ahead + r * k + c), _MM_HINT_T0);
      }
      wv[r] = _mm256_loadu_ps(wr + r * k + c);
    }
    for (int i = 0; i < M; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * ldx + c);
      for (int r = 0; r < R; ++r) {
        acc[i][r] = _mm256_fmadd_ps(wv[r], xv, acc[i][r]);
      }
    }
  }
  for (int i = 0; i < M; ++i) {
    for (int r = 0; r < R; ++r) {
      float s = sum_lanes_avx2(acc[i][r]);
      for (int64_t t = c; t < k; ++t) {
        s = std::fma(wr[r * k + t], x[i * ldx + t], s);
      }
      out[i * ldo + j + r] = s;
    }
  }
}

template <int M>
__attribute__((target("avx2,fma"))) void dot_rows_avx2(const float* x, int64_t ldx, const float* w, int64_t k,
                                                       int64_t j0, int64_t j1, float* out, int64_t ldo,
                                                       int64_t ahead_end) {
  // two input rows: four weight rows at a time (more streams in flight; the registers allow it)
  constexpr int R = M <= 2 ? 4 : 2;
  int64_t j = j0;
  if (M > 1) {  // one input row: weight row after weight row (see dot_rows_avx512)
    for (; j + R <= j1; j += R) {
      dot_avx2<M, R>(x, ldx, w, k, j, out, ldo, j + 3 * R <= ahead_end ? w + (j + 2 * R) * k : nullptr);
    }
  }
  for (; j < j1; ++j) {
    dot_avx2<M, 1>(x, ldx, w, k, j, out, ldo, nullptr);
  }
}

template <int M, int V>
__attribute__((target("avx2,fma"))) void axpy_avx2(const float* x, int64_t ldx, const float* w, int64_t k,
                                                   int64_t n, int64_t j, float* out, int64_t ldo) {
  __m256 acc[M][V];
  for (int i = 0; i < M; ++i) {
    for (int v = 0; v < V; ++v) {
      acc[i][v] = _mm256_setzero_ps();
    }
  }
  for (int64_t c = 0; c < k; ++c) {
    const float* wr = w + c * n + j;
    __m256 wv[V];
    for (int v = 0; v < V; ++v) {
      wv[v] = _mm256_loadu_ps(wr + 8 * v);
    }
    for (int i = 0; i < M; ++i) {
      const __m256 xv = _mm256_set1_ps(x[i * ldx + c]);
      for (int v = 0; v < V; ++v) {
        acc[i][v] = _mm256_fmadd_ps(xv, wv[v], acc[i][v]);
      }
    }
  }
  for (int i = 0; i < M; ++i) {
    for (int v = 0; v < V; ++v) {
      _mm256_storeu_ps(out + i * ldo + j + 8 * v, acc[i][v]);
    }
  }
}

template <int M>
__attribute__((target("avx2,fma"))) void axpy_rows_avx2(const float* x, int64_t ldx, const float* w, int64_t k,
                                                        int64_t n, int64_t j0, int64_t j1, float* out,
                                                        int64_t ldo) {
  int64_t j = j0;
  for (; j + 24 <= j1; j += 24) {
    axpy_avx2<M, 3>(x, ldx, w, k, n, j, out, ldo);
  }
  for (; j + 8 <= j1; j += 8) {
    axpy_avx2<M, 1>(x, ldx, w, k, n, j, out, ldo);
  }
  if (j < j1) {
    axpy_plain(x, ldx, M, w, k, n, j, j1, out, ldo);
  }
}

#endif  // x86

// Up to four input rows at a time through the kernels of one instruction set.
template <int M>
void rows_mm_chunk(Isa level, const float* x, int64_t ldx, const float* w, bool transposed, int64_t k, int64_t n,
                   int64_t j0, int64_t j1, float* out, int64_t ldo, int64_t ahead_end) {
#if defined(__x86_64__) || defined(__i386__)
  if (level == Isa::kAvx512) {
    transposed ? axpy_rows_avx512<M>(x, ldx, w, k, n, j0, j1, out, ldo)
               : dot_rows_avx512<M>(x, ldx, w, k, j0, j1, out, ldo, ahead_end);
    return;
  }
  if (level == Isa::kAvx2) {
    transposed ? axpy_rows_avx2<M>(x, ldx, w, k, n, j0, j1, out, ldo)
               : dot_rows_avx2<M>(x, ldx, w, k, j0, j1, out, ldo, ahead_end);
    return;
  }
#endif
  transposed ? axpy_plain(x, ldx, M, w, k, n, j0, j1, out, ldo) : dot_plain(x, ldx, M, w, k, j0, j1, out, ldo);
}

// Input rows [0, m), four at a time, times output features [j0, j1); the first four may prefetch
// weight rows up to `ahead_end` (the others find the tile cached).
void rows_mm_rows(Isa level, const float* x, int64_t ldx, int64_t m, const float* w, bool transposed, int64_t k,
                  int64_t n, int64_t j0, int64_t j1, float* out, int64_t ldo, int64_t ahead_end) {
  for (int64_t i = 0; i < m; i += 4) {
    const float* xi = x + i * ldx;
    float* oi = out + i * ldo;
    const int64_t ahead = i == 0 ? ahead_end : 0;
    switch (std::min<int64_t>(4, m - i)) {
      case 1:
        rows_mm_chunk<1>(level, xi, ldx, w, transposed, k, n, j0, j1, oi, ldo, ahead);
        break;
      case 2:
        rows_mm_chunk<2>(level, xi, ldx, w, transposed, k, n, j0, j1, oi, ldo, ahead);
        break;
      case 3:
        rows_mm_chunk<3>(level, xi, ldx, w, transposed, k, n, j0, j1, oi, ldo, ahead);
        break;
      default:
        rows_mm_chunk<4>(level, xi, ldx, w, transposed, k, n, j0, j1, oi, ldo, ahead);
        break;
    }
  }
}

// Output features per tile when more than four rows share a weight: the tile's weights stay in the
// first cache levels (about 32 KB of weight rows, or a 64-feature column block of a [k, n] weight)
// while every group of four rows passes over them, so memory is read once whatever the row count.
int64_t tile_features(bool transposed, int64_t k) {
  if (transposed) {
    return 64;
  }
  return std::max<int64_t>(4, ((int64_t{32} << 10) / (4 * std::max<int64_t>(k, 1))) / 4 * 4);
}

#if defined(__x86_64__) || defined(__i386__)

// the attention's dot products and weighted sums, compiled for each instruction set
__attribute__((target("avx512f,fma"))) float dot_avx512_n(const float* a, const float* b, int64_t n) {
  return dot_lanes<16>(a, b, n);
}

__attribute__((target("avx512f,fma"))) void axpy_avx512_n(float alpha, const float* x, float* y, int64_t n) {
  axpy_loop(alpha, x, y, n);
}

__attribute__((target("avx2,fma"))) float dot_avx2_n(const float* a, const float* b, int64_t n) {
  return dot_lanes<8>(a, b, n);
}

__attribute__((target("avx2,fma"))) void axpy_avx2_n(float alpha, const float* x, float* y, int64_t n) {
  axpy_loop(alpha, x, y, n);
}

#endif  // x86

}  // namespace

float dot_f32(const float* a, const float* b, int64_t n) {
#if defined(__x86_64__) || defined(__i386__)
  switch (isa()) {
    case Isa::kAvx512:
      return dot_avx512_n(a, b, n);
    case Isa::kAvx2:
      return dot_avx2_n(a, b, n);
    default:
      break;
  }
#endif
  return dot_lanes<16>(a, b, n);
}

void axpy_f32(float alpha, const float* x, float* y, int64_t n) {
#if defined(__x86_64__) || defined(__i386__)
  switch (isa()) {
    case Isa::kAvx512:
      axpy_avx512_n(alpha, x, y, n);
      return;
    case Isa::kAvx2:
      axpy_avx2_n(alpha, x, y, n);
      return;
    default:
      break;
  }
#endif
  axpy_loop(alpha, x, y, n);
}

int64_t rows_mm_max() {
  return isa() == Isa::kAvx512 ? 128 : 16;
}

int64_t prompt_rows_max() {
  switch (isa()) {
    case Isa::kAvx512:
      return 192;
    case Isa::kAvx2:
      return 128;
    default:
      return 8;
  }
}

int64_t rows_mm_block(bool transposed) {
  return transposed ? 192 : 64;
}

void rows_mm_f32(const float* x, int64_t ldx, int64_t m, const float* w, bool transposed, int64_t k,
                 int64_t n, int64_t j0, int64_t j1, float* out, int64_t ldo) {
  const Isa level = isa();
  if (m <= 4) {
    rows_mm_rows(level, x, ldx, m, w, transposed, k, n, j0, j1, out, ldo, n);
    return;
  }
  const int64_t tile = tile_features(transposed, k);
  for (int64_t j = j0; j < j1; j += tile) {
    rows_mm_rows(level, x, ldx, m, w, transposed, k, n, j, std::min(j1, j + tile), out, ldo, n);
  }
}

}  // namespace moe_runtime
