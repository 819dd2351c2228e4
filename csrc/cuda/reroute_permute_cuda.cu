// CUDA kernel of `reroute_permute`, on the current CUDA stream.
//
// 1. remap: one thread per entry resolves its slot (shared logic in reroute_entry.h) and
//    counts it in a [num_slots + 1] histogram;
// 2. a stable sort of the slot ids gives perm (entries of one slot keep their flat order);
// 3. invert: inv_perm[perm[j]] = j;
// 4. offsets = inclusive prefix sum of the histogram without its sentinel bin.
// An out-of-range token owner trips a device-side assert (checking it on the host would
// need a device synchronization).
//
// Only c10/cuda headers are included (not ATen/cuda/CUDAContext.h), so the build needs nvcc and
// the CUDA runtime headers but not the cuBLAS/cuSPARSE/cuSOLVER development headers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../reroute_entry.h"
#include "../reroute_permute.h"

namespace moe_runtime {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks));
}

__global__ void remap_kernel(
    const int64_t* __restrict__ top_k_index,
    const int64_t* __restrict__ token_owner,
    const int32_t* __restrict__ slot_table,
    int64_t num_entries,
    int64_t top_k,
    int64_t num_owners,
    int64_t num_experts,
    int64_t num_slots,
    int64_t* __restrict__ slot_ids,
    int32_t* __restrict__ counts) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t f = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; f < num_entries; f += stride) {
    const int64_t owner = token_owner[f / top_k];
    CUDA_KERNEL_ASSERT_MSG(owner_in_range(owner, num_owners), "reroute_permute: token_owner out of range");
    const int64_t slot = entry_slot(owner, top_k_index[f], slot_table, num_owners, num_experts, num_slots);
    slot_ids[f] = slot;
    atomicAdd(counts + slot, 1);
  }
}

__global__ void invert_kernel(const int64_t* __restrict__ perm, int64_t num_entries, int64_t* __restrict__ inv_perm) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < num_entries; j += stride) {
    inv_perm[perm[j]] = j;
  }
}

ReroutePermuteResult reroute_permute_cuda(
    const at::Tensor& top_k_index,
    const at::Tensor& token_owner,
    const at::Tensor& slot_table,
    int64_t num_slots) {
  check_reroute_permute_inputs(top_k_index, token_owner, slot_table, num_slots);
  const c10::cuda::CUDAGuard device_guard(top_k_index.device());
  const at::Tensor experts = top_k_index.contiguous();
  const at::Tensor owners = token_owner.contiguous();
  const at::Tensor table = slot_table.contiguous();
  const int64_t num_entries = experts.numel();
  const auto int_options = experts.options().dtype(at::kInt);

  at::Tensor slot_ids = at::empty({num_entries}, experts.options());
  at::Tensor counts = at::zeros({num_slots + 1}, int_options);
  if (num_entries > 0) {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    remap_kernel<<<blocks_for(num_entries), kThreads, 0, stream>>>(
        experts.const_data_ptr<int64_t>(), owners.const_data_ptr<int64_t>(), table.const_data_ptr<int32_t>(),
        num_entries, experts.size(1), table.size(0), table.size(1), num_slots, slot_ids.data_ptr<int64_t>(),
        counts.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  at::Tensor perm = std::get<1>(at::sort(slot_ids, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  at::Tensor inv_perm = at::empty_like(perm);
  if (num_entries > 0) {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    invert_kernel<<<blocks_for(num_entries), kThreads, 0, stream>>>(
        perm.const_data_ptr<int64_t>(), num_entries, inv_perm.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor offsets = at::cumsum(counts.narrow(0, 0, num_slots), 0, at::kInt);
  return {slot_ids, perm, inv_perm, offsets};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_runtime, CUDA, m) {
  m.impl("reroute_permute", &reroute_permute_cuda);
}

}  // namespace moe_runtime
