// CPU kernel of `segmented_mm`: rows grouped by slot times each slot's weight, over weights held
// in several tensors (segments), one dispatch for the whole layer.
//
//   x [N, in] sorted by slot, offsets [S] cumulative row ends (offsets[S-1] == N)
//   weights: segments [n_i, out, in] (or [n_i, in, out] when transposed), sum n_i == S
//   out[lo:hi] = x[lo:hi] @ W_s^T for every slot s with rows; empty slots cost nothing.
//
// torch._grouped_mm on CPU issues one matrix multiply per group of one weight tensor, used or not;
// a mixed serving batch touches a small share of the adapter slots, so most of those calls are
// empty. Here the used groups of all segments are collected first and run in parallel (each
// product is small, so one thread per product beats threading inside each).
//
// Each product is a few rows times one expert matrix, so per-call overhead matters as much as the
// arithmetic: where the BLAS that libtorch carries exports the 64-bit-integer Fortran GEMM
// (MKL's `sgemm_64`/`dgemm_64`, looked up at run time, never linked), float32/float64 products call
// it on raw pointers; otherwise (other BLAS, other dtypes, MOE_RUNTIME_SEGMENTED_MM_ATEN=1) each
// product is an `at::mm_out` on views. Both give the same products; tests cover both.
//
// float32 slots with at most rows_mm_max() rows (128 with AVX-512: every slot of a decode step,
// nearly every slot of a prompt of a few hundred tokens) go through the kernels of rows_mm_cpu.h
// instead: a product that reads a whole expert for a few rows is bound by the weight's bytes, and
// those kernels read them faster than the GEMM (and, tile by tile, outrun it up to that many rows);
// they are cut by output features, so every thread shares even a single product.
// MOE_RUNTIME_STREAM_MM=0 turns them off (the GEMM takes every slot; read at every call, so a
// benchmark can compare both in one process).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <dlfcn.h>
#include <torch/library.h>

#include "rows_mm_cpu.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace moe_runtime {
namespace {

template <typename T>
using Gemm64 = void (*)(const char*, const char*, const int64_t*, const int64_t*, const int64_t*,
                        const T*, const T*, const int64_t*, const T*, const int64_t*, const T*, T*,
                        const int64_t*);

bool aten_forced() {
  const char* env = std::getenv("MOE_RUNTIME_SEGMENTED_MM_ATEN");
  return env != nullptr && std::strcmp(env, "") != 0 && std::strcmp(env, "0") != 0;
}

bool stream_disabled() {
  const char* env = std::getenv("MOE_RUNTIME_STREAM_MM");
  return env != nullptr && std::strcmp(env, "0") == 0;
}

template <typename T>
Gemm64<T> find_gemm64(const char* const* names) {
  for (const char* const* name = names; *name != nullptr; ++name) {
    if (void* fn = dlsym(RTLD_DEFAULT, *name)) {
      return reinterpret_cast<Gemm64<T>>(fn);
    }
  }
  return nullptr;
}

// The BLAS GEMM for T, or nullptr: looked up once per process.
template <typename T>
Gemm64<T> blas_gemm();

template <>
Gemm64<float> blas_gemm<float>() {
  static const char* const names[] = {"sgemm_64", "SGEMM_64", nullptr};
  static const Gemm64<float> fn = aten_forced() ? nullptr : find_gemm64<float>(names);
  return fn;
}

template <>
Gemm64<double> blas_gemm<double>() {
  static const char* const names[] = {"dgemm_64", "DGEMM_64", nullptr};
  static const Gemm64<double> fn = aten_forced() ? nullptr : find_gemm64<double>(names);
  return fn;
}

// Row-major out[rows, n] = x[rows, k] @ op(w), w [n, k] (or [k, n] when transposed), as the
// column-major product out^T = op'(w) x^T.
template <typename T>
void blas_rows_mm(Gemm64<T> gemm, const T* x, int64_t ldx, const T* w, bool transposed, T* out,
                  int64_t rows, int64_t n, int64_t k) {
  const char transa = transposed ? 'N' : 'T';
  const char transb = 'N';
  const int64_t lda = transposed ? n : k;
  const T one = 1, zero = 0;
  gemm(&transa, &transb, &n, &rows, &k, &one, w, &lda, x, &ldx, &zero, out, &n);
}

// The rows of one used slot: weights[segment][index] times x[lo : lo + rows].
struct Group {
  int64_t segment;
  int64_t index;
  int64_t lo;
  int64_t rows;
};

// Every group through the BLAS GEMM; false (nothing done) when there is none for T.
template <typename T>
bool run_blas(const at::Tensor& x, at::TensorList weights, const std::vector<Group>& groups, bool transposed,
              at::Tensor& out) {
  const Gemm64<T> gemm = blas_gemm<T>();
  if (gemm == nullptr) {
    return false;
  }
  const T* x_ptr = x.const_data_ptr<T>();
  T* out_ptr = out.mutable_data_ptr<T>();
  const int64_t k = x.size(1), n = out.size(1);
  const int64_t grain = parallel_grain(n * k * static_cast<int64_t>(sizeof(T)));
  at::parallel_for(0, static_cast<int64_t>(groups.size()), grain, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const Group& group = groups[g];
      const at::Tensor& w = weights[group.segment];
      const T* w_ptr = w.const_data_ptr<T>() + group.index * w.stride(0);
      blas_rows_mm<T>(gemm, x_ptr + group.lo * k, k, w_ptr, transposed, out_ptr + group.lo * n, group.rows, n, k);
    }
  });
  return true;
}

// The float32 groups of at most rows_mm_max() rows through the streaming kernels, in pieces of
// output features shared by all threads; returns the groups left for the GEMM.
std::vector<Group> run_streamed(const at::Tensor& x, at::TensorList weights, const std::vector<Group>& groups,
                                bool transposed, at::Tensor& out) {
  if (stream_disabled()) {
    return groups;
  }
  struct Piece {
    int64_t group;
    int64_t j0;
    int64_t j1;
  };
  const int64_t k = x.size(1), n = out.size(1), block = rows_mm_block(transposed), rows_max = rows_mm_max();
  std::vector<Group> rest;
  std::vector<Group> small;
  std::vector<Piece> pieces;
  for (const Group& group : groups) {
    if (group.rows > rows_max) {
      rest.push_back(group);
      continue;
    }
    for (int64_t j = 0; j < n; j += block) {
      pieces.push_back({static_cast<int64_t>(small.size()), j, std::min(n, j + block)});
    }
    small.push_back(group);
  }
  const float* x_ptr = x.const_data_ptr<float>();
  float* out_ptr = out.mutable_data_ptr<float>();
  const int64_t grain = parallel_grain(block * k * 4);
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const Group& group = small[pieces[p].group];
      const at::Tensor& w = weights[group.segment];
      const float* w_ptr = w.const_data_ptr<float>() + group.index * w.stride(0);
      rows_mm_f32(x_ptr + group.lo * k, k, group.rows, w_ptr, transposed, k, n, pieces[p].j0, pieces[p].j1,
                  out_ptr + group.lo * n, n);
    }
  });
  return rest;
}

at::Tensor segmented_mm_cpu(const at::Tensor& x, at::TensorList weights, const at::Tensor& offsets,
                            bool transposed) {
  TORCH_CHECK(x.dim() == 2, "segmented_mm: x must be [N, in], got ", x.dim(), " dims");
  TORCH_CHECK(offsets.dim() == 1, "segmented_mm: offsets must be 1-D");
  TORCH_CHECK(offsets.scalar_type() == at::kInt || offsets.scalar_type() == at::kLong,
              "segmented_mm: offsets must be int32 or int64");
  TORCH_CHECK(!weights.empty(), "segmented_mm: no weight segments");
  const int64_t in = x.size(1);
  const int64_t out_features = weights[0].size(transposed ? 2 : 1);
  int64_t slots = 0;
  for (const auto& w : weights) {
    TORCH_CHECK(w.dim() == 3, "segmented_mm: every weight segment must be 3-D");
    TORCH_CHECK(w.scalar_type() == x.scalar_type(), "segmented_mm: weight dtype ", w.scalar_type(),
                " differs from x dtype ", x.scalar_type());
    TORCH_CHECK(w.device() == x.device(), "segmented_mm: weights and x must be on one device");
    TORCH_CHECK(w.size(transposed ? 1 : 2) == in && w.size(transposed ? 2 : 1) == out_features,
                "segmented_mm: weight segment shape ", w.sizes(), " does not fit x [N, ", in,
                "] and out features ", out_features, " (transposed=", transposed, ")");
    slots += w.size(0);
  }
  TORCH_CHECK(offsets.numel() == slots, "segmented_mm: ", offsets.numel(), " offsets for ", slots,
              " slots");
  const at::Tensor ends = offsets.to(at::kLong).contiguous();
  const int64_t* end_ptr = ends.const_data_ptr<int64_t>();
  TORCH_CHECK(slots == 0 || end_ptr[slots - 1] == x.size(0), "segmented_mm: offsets end at ",
              slots ? end_ptr[slots - 1] : 0, " but x has ", x.size(0), " rows");

  std::vector<Group> groups;
  int64_t slot = 0, start = 0;
  for (int64_t segment = 0; segment < static_cast<int64_t>(weights.size()); ++segment) {
    for (int64_t i = 0; i < weights[segment].size(0); ++i, ++slot) {
      const int64_t end = end_ptr[slot];
      TORCH_CHECK(end >= start && end <= x.size(0), "segmented_mm: offsets must be non-decreasing "
                  "and within [0, N]; offsets[", slot, "] = ", end);
      if (end > start) {
        groups.push_back({segment, i, start, end - start});
      }
      start = end;
    }
  }
  at::Tensor out = at::empty({x.size(0), out_features}, x.options());
  const at::Tensor xc = x.contiguous();
  const bool blas_layout = std::all_of(weights.begin(), weights.end(), [](const at::Tensor& w) {
    return w.stride(2) == 1 && w.stride(1) == w.size(2);  // each slot a contiguous row-major matrix
  });
  if (blas_layout && x.scalar_type() == at::kFloat && !groups.empty()) {
    groups = run_streamed(xc, weights, groups, transposed, out);
  }
  const int64_t num_groups = static_cast<int64_t>(groups.size());
  const bool done =
      num_groups > 0 && blas_layout &&
      (x.scalar_type() == at::kFloat    ? run_blas<float>(xc, weights, groups, transposed, out)
       : x.scalar_type() == at::kDouble ? run_blas<double>(xc, weights, groups, transposed, out)
                                        : false);
  if (done) {
    return out;
  }
  // ATen ops on OpenMP workers: they start with default thread-local state (grad mode on, ...), so
  // the caller's is carried into each of them.
  const at::ThreadLocalState caller_state;
  const int64_t grain = parallel_grain(out_features * xc.size(1) * static_cast<int64_t>(xc.element_size()));
  at::parallel_for(0, num_groups, grain, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t g = begin; g < end; ++g) {
      const Group& group = groups[g];
      at::Tensor dst = out.narrow(0, group.lo, group.rows);
      const at::Tensor weight = weights[group.segment].select(0, group.index);
      const at::Tensor rhs = transposed ? weight : weight.t();
      at::mm_out(dst, xc.narrow(0, group.lo, group.rows), rhs);
    }
  });
  return out;
}

// `slot_rows_mm`: out[r] = x[r / K] @ W_{slots[r]}^T for entries in any order, K = slots.size(0) /
// x.size(0) (a decode step's few routed entries in token order, f = t * K + k: no sort, no permutation,
// no copy of the tokens' rows); a slot outside [0, S) gives a zero row. float32 slots whose matrices
// are contiguous, through the streaming kernels, cut by output features.
at::Tensor slot_rows_mm_cpu(const at::Tensor& x, at::TensorList weights, const at::Tensor& slots, bool transposed) {
  TORCH_CHECK(x.dim() == 2, "slot_rows_mm: x must be [N, in], got ", x.dim(), " dims");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "slot_rows_mm: x must be float32, got ", x.scalar_type());
  TORCH_CHECK(slots.dim() == 1 && slots.scalar_type() == at::kLong, "slot_rows_mm: slots must be int64 [N]");
  TORCH_CHECK(x.size(0) > 0 ? slots.size(0) % x.size(0) == 0 : slots.size(0) == 0, "slot_rows_mm: ",
              slots.size(0), " slots is not a multiple of x's ", x.size(0), " rows");
  const int64_t per_row = x.size(0) > 0 ? slots.size(0) / x.size(0) : 1;
  TORCH_CHECK(!weights.empty(), "slot_rows_mm: no weight segments");
  const int64_t in = x.size(1);
  const int64_t n = weights[0].size(transposed ? 2 : 1);
  std::vector<int64_t> starts;
  int64_t num_slots = 0;
  for (const auto& w : weights) {
    TORCH_CHECK(w.dim() == 3 && w.scalar_type() == at::kFloat && w.device() == x.device(),
                "slot_rows_mm: every weight segment must be a float32 3-D tensor on x's device");
    TORCH_CHECK(w.size(transposed ? 1 : 2) == in && w.size(transposed ? 2 : 1) == n,
                "slot_rows_mm: weight segment shape ", w.sizes(), " does not fit x [N, ", in, "] and out features ",
                n, " (transposed=", transposed, ")");
    TORCH_CHECK(w.stride(2) == 1 && w.stride(1) == w.size(2), "slot_rows_mm: each slot must be a contiguous matrix");
    starts.push_back(num_slots);
    num_slots += w.size(0);
  }
  const at::Tensor xc = x.contiguous();
  const at::Tensor sc = slots.contiguous();
  const int64_t* slot_ptr = sc.const_data_ptr<int64_t>();
  at::Tensor out = at::zeros({slots.size(0), n}, x.options());
  struct Piece {
    const float* w;
    int64_t row;
    int64_t j0;
    int64_t j1;
  };
  std::vector<Piece> pieces;
  const int64_t block = rows_mm_block(transposed);
  for (int64_t r = 0; r < slots.size(0); ++r) {
    const int64_t slot = slot_ptr[r];
    if (slot < 0 || slot >= num_slots) {
      continue;  // a dropped entry: its row stays zero
    }
    const int64_t segment = std::upper_bound(starts.begin(), starts.end(), slot) - starts.begin() - 1;
    const at::Tensor& w = weights[segment];
    const float* w_ptr = w.const_data_ptr<float>() + (slot - starts[segment]) * w.stride(0);
    for (int64_t j = 0; j < n; j += block) {
      pieces.push_back({w_ptr, r, j, std::min(n, j + block)});
    }
  }
  const float* x_ptr = xc.const_data_ptr<float>();
  float* out_ptr = out.mutable_data_ptr<float>();
  const int64_t grain = parallel_grain(block * in * 4);
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const Piece& piece = pieces[p];
      rows_mm_f32(x_ptr + piece.row / per_row * in, in, 1, piece.w, transposed, in, n, piece.j0, piece.j1,
                  out_ptr + piece.row * n, n);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_runtime, m) {
  m.def("segmented_mm(Tensor x, Tensor[] weights, Tensor offsets, bool transposed) -> Tensor");
  m.def("slot_rows_mm(Tensor x, Tensor[] weights, Tensor slots, bool transposed) -> Tensor");
}

TORCH_LIBRARY_IMPL(moe_runtime, CPU, m) {
  m.impl("segmented_mm", &segmented_mm_cpu);
  m.impl("slot_rows_mm", &slot_rows_mm_cpu);
}

}  // namespace moe_runtime
