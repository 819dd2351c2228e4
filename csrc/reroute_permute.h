// Host-side declarations of the `reroute_permute` op: input checks shared by its CPU and
// CUDA implementations. The op's schema is defined in registration.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <tuple>

namespace moe_runtime {

// (slot_ids [T*K] int64, perm [T*K] int64, inv_perm [T*K] int64, offsets [num_slots] int32).
using ReroutePermuteResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Checks ranks, dtypes, devices and sizes of the op's inputs (no data is read).
inline void check_reroute_permute_inputs(
    const at::Tensor& top_k_index,
    const at::Tensor& token_owner,
    const at::Tensor& slot_table,
    int64_t num_slots) {
  TORCH_CHECK(top_k_index.dim() == 2, "reroute_permute: top_k_index must be [T, K], got ",
              top_k_index.sizes());
  TORCH_CHECK(token_owner.dim() == 1 && token_owner.size(0) == top_k_index.size(0),
              "reroute_permute: token_owner must be [T] with T = ", top_k_index.size(0), ", got ",
              token_owner.sizes());
  TORCH_CHECK(slot_table.dim() == 2, "reroute_permute: slot_table must be [A, E], got ",
              slot_table.sizes());
  TORCH_CHECK(top_k_index.scalar_type() == at::kLong, "reroute_permute: top_k_index must be int64, got ",
              top_k_index.scalar_type());
  TORCH_CHECK(token_owner.scalar_type() == at::kLong, "reroute_permute: token_owner must be int64, got ",
              token_owner.scalar_type());
  TORCH_CHECK(slot_table.scalar_type() == at::kInt, "reroute_permute: slot_table must be int32, got ",
              slot_table.scalar_type());
  TORCH_CHECK(token_owner.device() == top_k_index.device() && slot_table.device() == top_k_index.device(),
              "reroute_permute: all inputs must be on one device, got top_k_index on ", top_k_index.device(),
              ", token_owner on ", token_owner.device(), ", slot_table on ", slot_table.device());
  constexpr int64_t kMaxInt32 = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(num_slots >= 0 && num_slots < kMaxInt32, "reroute_permute: num_slots must be in [0, 2^31 - 1), got ",
              num_slots);
  TORCH_CHECK(top_k_index.numel() <= kMaxInt32, "reroute_permute: T*K = ", top_k_index.numel(),
              " entries do not fit the int32 offsets");
}

}  // namespace moe_runtime
