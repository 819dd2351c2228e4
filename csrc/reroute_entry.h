// Index logic of one routed entry of `reroute_permute`, shared by the CPU and CUDA kernels.
//
// Plain C++ with no torch or CUDA includes: under nvcc the functions are `__host__ __device__`,
// under a host compiler they are ordinary inline functions.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MOE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MOE_HOST_DEVICE inline
#endif

namespace moe_runtime {

// True when `owner` names a row of a slot table with `num_owners` rows.
MOE_HOST_DEVICE bool owner_in_range(int64_t owner, int64_t num_owners) {
  return owner >= 0 && owner < num_owners;
}

// Slot of the entry (owner, expert) in the row-major slot table [num_owners, num_experts].
//
// Returns `num_slots` (the sentinel, i.e. the entry is dropped) when the owner or expert id is
// out of range or the table holds a value outside [0, num_slots) (conventionally -1).
MOE_HOST_DEVICE int64_t entry_slot(
    int64_t owner,
    int64_t expert,
    const int32_t* slot_table,
    int64_t num_owners,
    int64_t num_experts,
    int64_t num_slots) {
  if (!owner_in_range(owner, num_owners) || expert < 0 || expert >= num_experts) {
    return num_slots;
  }
  const int64_t slot = slot_table[owner * num_experts + expert];
  return (slot >= 0 && slot < num_slots) ? slot : num_slots;
}

}  // namespace moe_runtime
