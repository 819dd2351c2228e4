// Probe: M input rows x R weight rows read side by side, over 80 matrices of [1024 x 1024] float32
// (320 MB), one core, best of 6, GB/s; and ggml's f32 loop shape for one row (one weight row at a
// time, four accumulators of 16 lanes over steps of 64).
// g++ -O2 row_streams.cpp && ./a.out [byte offset in a page]
// (the AVX2 table: the same M x R loops with 8-lane vectors)
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <sys/mman.h>
using clk = std::chrono::steady_clock;
constexpr int K = 1024, N = 1024, NM = 80;
template <int M, int R>
__attribute__((target("avx512f,fma"))) static void kern(const float* x, const float* w, float* out) {
  for (int j = 0; j < N; j += R) {
    __m512 a[M][R];
    for (int i = 0; i < M; ++i) for (int r = 0; r < R; ++r) a[i][r] = _mm512_setzero_ps();
    const float* wr = w + (size_t)j * K;
    for (int c = 0; c < K; c += 16) {
      __m512 wv[R];
      for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_ps(wr + r * K + c);
      for (int i = 0; i < M; ++i) { __m512 xv = _mm512_loadu_ps(x + i * K + c);
        for (int r = 0; r < R; ++r) a[i][r] = _mm512_fmadd_ps(wv[r], xv, a[i][r]); }
    }
    for (int i = 0; i < M; ++i) for (int r = 0; r < R; ++r) out[i * N + j + r] = _mm512_reduce_add_ps(a[i][r]);
  }
}
__attribute__((target("avx512f,fma"))) static void ggml1(const float* x, const float* w, float* out) {
  for (int j = 0; j < N; ++j) {
    const float* wr = w + (size_t)j * K;
    __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int c = 0; c < K; c += 64)
      for (int r = 0; r < 4; ++r) a[r] = _mm512_fmadd_ps(_mm512_loadu_ps(wr + c + 16 * r), _mm512_loadu_ps(x + c + 16 * r), a[r]);
    out[j] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
  }
}
int main(int argc, char** argv) {
  size_t off = argc > 1 ? atoi(argv[1]) : 0;
  size_t bytes = (size_t)NM * K * N * 4 + 4096;
  char* base = (char*)mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  madvise(base, bytes, MADV_NOHUGEPAGE);
  float* w = (float*)(base + off);
  for (size_t i = 0; i < (size_t)NM * K * N; ++i) w[i] = (i % 7) * 0.001f;
  std::vector<float> x(4 * K, 0.5f), out(4 * N);
  typedef void (*F)(const float*, const float*, float*);
  F fs[] = {kern<1,1>, kern<1,4>, kern<2,1>, kern<2,4>, kern<3,1>, kern<3,4>, kern<4,1>, kern<4,4>, kern<4,2>, ggml1};
  const char* names[] = {"M1R1", "M1R4", "M2R1", "M2R4", "M3R1", "M3R4", "M4R1", "M4R4", "M4R2", "ggml1"};
  const int NV = 10; double best[NV]; for (auto& b : best) b = 1e9;
  for (int rep = 0; rep < 6; ++rep)
    for (int v = 0; v < NV; ++v) {
      auto t0 = clk::now();
      for (int m = 0; m < NM; ++m) fs[v](x.data(), w + (size_t)m * K * N, out.data());
      double s = std::chrono::duration<double>(clk::now() - t0).count();
      if (s < best[v]) best[v] = s;
    }
  for (int v = 0; v < NV; ++v) printf("%s %.1f  ", names[v], NM * 4.0 * K * N / best[v] / 1e9);
  printf("GB/s\n");
}
