// Probe: one weight row at a time (ours1, and ggml1: ggml's f32 loop shape, four accumulators of
// 16 lanes over steps of 64) against four or two or eight rows side by side, 1 x [1024 x 1024]
// products over 80 matrices (320 MB), one core. g++ -O2 row_streams_ggml.cpp && ./a.out [offset]
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <sys/mman.h>
using clk = std::chrono::steady_clock;
constexpr int K = 1024, N = 1024, NM = 80;  // 80 matrices of 4 MB = 320 MB
__attribute__((target("avx512f,fma"))) static void ours4(const float* x, const float* w, float* out, bool pf) {
  for (int j = 0; j < N; j += 4) {
    __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    const float* wr = w + (size_t)j * K;
    for (int c = 0; c < K; c += 16) {
      __m512 xv = _mm512_loadu_ps(x + c);
      for (int r = 0; r < 4; ++r) {
        if (pf) _mm_prefetch((const char*)(wr + (8 + r) * K + c), _MM_HINT_T0);
        a[r] = _mm512_fmadd_ps(_mm512_loadu_ps(wr + r * K + c), xv, a[r]);
      }
    }
    for (int r = 0; r < 4; ++r) out[j + r] = _mm512_reduce_add_ps(a[r]);
  }
}
__attribute__((target("avx512f,fma"))) static void ggml1(const float* x, const float* w, float* out, bool pf) {
  for (int j = 0; j < N; ++j) {
    const float* wr = w + (size_t)j * K;
    __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int c = 0; c < K; c += 64) {
      for (int r = 0; r < 4; ++r) {
        if (pf) _mm_prefetch((const char*)(wr + 2 * K + c + 16 * r), _MM_HINT_T0);
        a[r] = _mm512_fmadd_ps(_mm512_loadu_ps(wr + c + 16 * r), _mm512_loadu_ps(x + c + 16 * r), a[r]);
      }
    }
    out[j] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
  }
}
template <int R>
__attribute__((target("avx512f,fma"))) static void oursR(const float* x, const float* w, float* out, bool pf) {
  for (int j = 0; j < N; j += R) {
    __m512 a[R];
    for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_ps();
    const float* wr = w + (size_t)j * K;
    for (int c = 0; c < K; c += 16) {
      __m512 xv = _mm512_loadu_ps(x + c);
      for (int r = 0; r < R; ++r) a[r] = _mm512_fmadd_ps(_mm512_loadu_ps(wr + r * K + c), xv, a[r]);
    }
    for (int r = 0; r < R; ++r) out[j + r] = _mm512_reduce_add_ps(a[r]);
  }
}
int main(int argc, char** argv) {
  size_t off = argc > 1 ? atoi(argv[1]) : 0;
  size_t bytes = (size_t)NM * K * N * 4 + 4096;
  char* base = (char*)mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  madvise(base, bytes, MADV_NOHUGEPAGE);
  float* w = (float*)(base + off);
  for (size_t i = 0; i < (size_t)NM * K * N; ++i) w[i] = (i % 7) * 0.001f;
  std::vector<float> x(K, 0.5f), out(N);
  const char* names[5] = {"ours4", "ours1", "ggml1", "ours2", "ours8"};
  double best[5] = {1e9, 1e9, 1e9, 1e9, 1e9};
  for (int rep = 0; rep < 8; ++rep)
    for (int v = 0; v < 5; ++v) {
      auto t0 = clk::now();
      for (int m = 0; m < NM; ++m) {
        const float* wm = w + (size_t)m * K * N;
        if (v == 0) ours4(x.data(), wm, out.data(), false); else if (v == 1) oursR<1>(x.data(), wm, out.data(), false); else if (v == 2) ggml1(x.data(), wm, out.data(), false); else if (v == 3) oursR<2>(x.data(), wm, out.data(), false); else oursR<8>(x.data(), wm, out.data(), false);
      }
      double s = std::chrono::duration<double>(clk::now() - t0).count();
      if (s < best[v]) best[v] = s;
    }
  for (int v = 0; v < 5; ++v) printf("%-10s %.2f ms  %.1f GB/s\n", names[v], best[v] * 1e3, NM * 4.0 * K * N / best[v] / 1e9);
}
