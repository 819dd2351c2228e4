// Few rows times one weight matrix, streaming the weight once: the memory-bound products of decode.
//
// With one to a few rows per expert (a decode step, a short prompt), a product reads a whole expert
// matrix to do a few multiply-adds per weight, so its speed is the speed of reading the weight. A
// general GEMM (MKL's sgemm on these machines) reaches about 70% of what one core streams here; these
// kernels stream each weight row (or column block) once for up to four input rows at a time (more
// rows: tile by tile, see rows_mm_max), with AVX-512 or AVX2 chosen at run time (plain C++
// otherwise). A product can be split by output features across threads, so two threads share the
// bytes of one expert.
//
// Every output element is computed by the same sequence of operations whatever the number of rows,
// the split or the thread count, so results do not depend on how the work is cut.
#pragma once

#include <algorithm>
#include <cstdint>

namespace moe_runtime {

// Largest rows per product the kernels should take, for the instruction set in use. Past four rows a
// product is cut into tiles of output features whose weights stay in the first cache levels while
// every group of four rows passes over them, so memory is still read once. Measured against the
// GEMM libtorch carries (MKL's sgemm) on 1024-4096 features (`moe-runtime bench kernels`,
// docs/benchmarks.md): the AVX-512 kernels beat it 1.1-3x up to 128 rows; the AVX2 ones up to 16
// (past it, and on some shapes already at 24, it catches up). The plain C++ kernels keep to
// decode-sized products (16).
int64_t rows_mm_max();

// Prompt tokens up to which a whole prompt through decode_step (every product on these kernels, no
// Python between the ops) beats the model's forward (its products on the GEMM past rows_mm_max):
// measured on a 1024-wide, 16-expert Mixtral (docs/benchmarks.md), the crossover was near 256 tokens
// with AVX-512, 150-190 with AVX2 and under 16 with the plain kernels.
int64_t prompt_rows_max();

// sum_i a[i] * b[i] and y[i] += alpha * x[i], vectorized for the instruction set in use (the
// attention of decode_step: one query against each cached key, then the weighted values). Each
// result is the same chain of operations for the same n.
float dot_f32(const float* a, const float* b, int64_t n);
void axpy_f32(float alpha, const float* x, float* y, int64_t n);

// Output features per unit of work when a product is split across threads.
int64_t rows_mm_block(bool transposed);

// Bytes of weight a thread should get at least before a product is split across threads: below it
// the fork and join of a parallel region (and, on a busy machine, waiting for a descheduled worker)
// cost more than the reads they share.
constexpr int64_t kParallelMinBytes = int64_t{1} << 18;

// The at::parallel_for grain for `units` units of `bytes_per_unit` weight bytes each.
inline int64_t parallel_grain(int64_t bytes_per_unit) {
  return bytes_per_unit <= 0 ? 1 : std::max<int64_t>(1, (kParallelMinBytes + bytes_per_unit - 1) / bytes_per_unit);
}

// out[i, j] = sum_c x[i, c] * W(j, c) for rows i < m and output features j in [j0, j1), where
// W(j, c) = w[j * k + c] (w is [n, k] row-major) or, when transposed, w[c * n + j] (w is [k, n]).
// x rows have stride ldx, out rows stride ldo; every pointer is float32.
void rows_mm_f32(const float* x, int64_t ldx, int64_t m, const float* w, bool transposed, int64_t k,
                 int64_t n, int64_t j0, int64_t j1, float* out, int64_t ldo);

}  // namespace moe_runtime
