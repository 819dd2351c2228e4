// CPU kernel of `rows_linear`: y = x @ weight^T (+ bias) for a few rows, streaming the weight once.
//
//   x [..., in] float32, weight [out, in] (rows contiguous), bias [out] or None -> [..., out]
//
// The linear layers of a decode step (attention projections, the LM head) multiply one row per
// sequence by a whole matrix: the product is bound by reading the weight. The rows go through the
// streaming kernels of rows_mm_cpu.h, cut by output features across threads, so a second thread
// reads half of every matrix. Any row count works (past four rows, tile by tile of output features,
// each tile read from memory once); callers use it for up to rows_mm_max() rows and a GEMM beyond.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "rows_mm_cpu.h"

namespace moe_runtime {
namespace {

at::Tensor rows_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1, "rows_linear: x must have a feature dimension");
  TORCH_CHECK(weight.dim() == 2, "rows_linear: weight must be [out, in], got ", weight.dim(), " dims");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "rows_linear: x and weight must be float32, got ", x.scalar_type(), " and ", weight.scalar_type());
  const int64_t in = weight.size(1), out_features = weight.size(0);
  TORCH_CHECK(x.size(-1) == in, "rows_linear: x has ", x.size(-1), " features but weight takes ", in);
  TORCH_CHECK(weight.stride(1) == 1 && weight.stride(0) == in, "rows_linear: weight rows must be contiguous");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features && bias->scalar_type() == at::kFloat,
                "rows_linear: bias must be float32 [", out_features, "]");
  }
  const at::Tensor xc = x.reshape({-1, in}).contiguous();
  const int64_t rows = xc.size(0);
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = out_features;
  at::Tensor out = at::empty({rows, out_features}, x.options());
  if (rows > 0 && out_features > 0) {
    const float* x_ptr = xc.const_data_ptr<float>();
    const float* w_ptr = weight.const_data_ptr<float>();
    float* out_ptr = out.mutable_data_ptr<float>();
    const int64_t block = rows_mm_block(false);
    const int64_t pieces = (out_features + block - 1) / block;
    at::parallel_for(0, pieces, parallel_grain(block * in * 4), [&](int64_t begin, int64_t end) {
      const int64_t j0 = begin * block, j1 = std::min(out_features, end * block);
      rows_mm_f32(x_ptr, in, rows, w_ptr, false, in, out_features, j0, j1, out_ptr, out_features);
    });
    if (bias.has_value()) {
      out.add_(*bias);
    }
  }
  return out.view(sizes);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_runtime, m) {
  m.def("rows_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // rows up to which callers should prefer rows_linear to a GEMM, for this CPU (see rows_mm_cpu.h)
  m.def("rows_mm_max() -> int", []() -> int64_t { return rows_mm_max(); });
}

TORCH_LIBRARY_IMPL(moe_runtime, CPU, m) {
  m.impl("rows_linear", &rows_linear_cpu);
}

}  // namespace moe_runtime
