// CPU kernel of `reroute_permute`: remap every entry to a slot, then a stable counting sort.
//
// Entries are split into chunks of whole tokens. Pass 1 remaps each chunk and counts its
// entries per slot; an exclusive scan in (slot, chunk) order turns the counts into each chunk's
// first output position per slot; pass 2 scatters each chunk's entries in flat order from
// there. The result is the unique stable order, whatever the chunking or thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "reroute_entry.h"
#include "reroute_permute.h"

namespace moe_runtime {
namespace {

// Entries per chunk below which splitting costs more than it saves.
constexpr int64_t kChunkEntries = 1 << 14;

// Number of token chunks: one per thread for large inputs, bounded so the per-chunk
// histograms ([chunks, num_slots + 1]) stay small next to the entries themselves.
int64_t num_chunks(int64_t num_tokens, int64_t top_k, int64_t bins) {
  const int64_t entries = num_tokens * top_k;
  int64_t chunks = std::min<int64_t>(at::get_num_threads(), entries / kChunkEntries);
  chunks = std::min(chunks, entries / std::max<int64_t>(bins, 1));
  return std::max<int64_t>(chunks, 1);
}

ReroutePermuteResult reroute_permute_cpu(
    const at::Tensor& top_k_index,
    const at::Tensor& token_owner,
    const at::Tensor& slot_table,
    int64_t num_slots) {
  check_reroute_permute_inputs(top_k_index, token_owner, slot_table, num_slots);
  const at::Tensor experts = top_k_index.contiguous();
  const at::Tensor owners = token_owner.contiguous();
  const at::Tensor table = slot_table.contiguous();
  const int64_t num_tokens = experts.size(0);
  const int64_t top_k = experts.size(1);
  const int64_t num_owners = table.size(0);
  const int64_t num_experts = table.size(1);
  const int64_t num_entries = num_tokens * top_k;

  const int64_t* owner_ptr = owners.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < num_tokens; ++t) {
    TORCH_CHECK(owner_in_range(owner_ptr[t], num_owners), "reroute_permute: token_owner[", t, "] = ",
                owner_ptr[t], " is not a row of the slot table (", num_owners, " rows)");
  }

  const auto long_options = experts.options().dtype(at::kLong);
  at::Tensor slot_ids = at::empty({num_entries}, long_options);
  at::Tensor perm = at::empty({num_entries}, long_options);
  at::Tensor inv_perm = at::empty({num_entries}, long_options);
  at::Tensor offsets = at::empty({num_slots}, experts.options().dtype(at::kInt));

  const int64_t* expert_ptr = experts.const_data_ptr<int64_t>();
  const int32_t* table_ptr = table.const_data_ptr<int32_t>();
  int64_t* slot_ptr = slot_ids.data_ptr<int64_t>();
  int64_t* perm_ptr = perm.data_ptr<int64_t>();
  int64_t* inv_ptr = inv_perm.data_ptr<int64_t>();
  int32_t* offsets_ptr = offsets.data_ptr<int32_t>();

  const int64_t bins = num_slots + 1;  // the last bin holds the sentinels
  const int64_t chunks = num_chunks(num_tokens, top_k, bins);
  // cursor[c * bins + s]: entries of chunk c with slot s, then (after the scan) the next
  // output position for them.
  std::vector<int64_t> cursor(chunks * bins, 0);
  const auto token_begin = [&](int64_t chunk) { return num_tokens * chunk / chunks; };

  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
      int64_t* counts = cursor.data() + c * bins;
      for (int64_t t = token_begin(c); t < token_begin(c + 1); ++t) {
        for (int64_t f = t * top_k; f < (t + 1) * top_k; ++f) {
          const int64_t slot =
              entry_slot(owner_ptr[t], expert_ptr[f], table_ptr, num_owners, num_experts, num_slots);
          slot_ptr[f] = slot;
          ++counts[slot];
        }
      }
    }
  });

  int64_t position = 0;
  for (int64_t s = 0; s < bins; ++s) {
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t count = cursor[c * bins + s];
      cursor[c * bins + s] = position;
      position += count;
    }
    if (s < num_slots) {
      offsets_ptr[s] = static_cast<int32_t>(position);
    }
  }

  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
      int64_t* next = cursor.data() + c * bins;
      for (int64_t f = token_begin(c) * top_k; f < token_begin(c + 1) * top_k; ++f) {
        const int64_t j = next[slot_ptr[f]]++;
        perm_ptr[j] = f;
        inv_ptr[f] = j;
      }
    }
  });
  return {slot_ids, perm, inv_perm, offsets};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_runtime, CPU, m) {
  m.impl("reroute_permute", &reroute_permute_cpu);
}

}  // namespace moe_runtime
