// `map_file_pieces`: byte ranges of one file, back to back in one tensor, without copying them.
//
// A fused expert parameter ([E, 2I, H]) is, byte for byte, the checkpoint's per-expert tensors one
// after the other (gate 0, up 0, gate 1, up 1, ...). Where the file's pages line up with the
// tensor's, the tensor's memory can be the file's own pages: each range is mapped copy-on-write
// (MAP_PRIVATE) at its place in one reserved address range, so the load reads nothing, the pages
// are the page cache's (no fresh memory to fault in and zero), and a write changes only the
// process's copy. A range lines up when its file offset and its place in the tensor are equal
// modulo the page size (the tensor starts at the first range's offset within a page). A page the
// mapped ranges do not cover whole (where two ranges meet inside a page, the first and the last) is
// anonymous memory filled with pread. Ranges that do not line up are refused: callers read them.
// The mapped pages get their page-table entries at once (MADV_POPULATE_READ, where the kernel has it).
//
// The tensor (uint8, [total bytes]) frees the whole range when its storage goes.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__linux__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>
#define MOE_RUNTIME_HAS_MMAP 1
#endif

namespace moe_runtime {
namespace {

#ifdef MOE_RUNTIME_HAS_MMAP

constexpr size_t kPopulateThreads = 4;

struct Region {
  void* base;
  size_t length;
};

void release(void* ctx) {
  auto* region = static_cast<Region*>(ctx);
  munmap(region->base, region->length);
  delete region;
}

// pread exactly `n` bytes at `offset` into `dest`, or throw.
void read_exactly(int fd, char* dest, int64_t n, int64_t offset, const std::string& path) {
  while (n > 0) {
    const ssize_t got = pread(fd, dest, static_cast<size_t>(n), offset);
    if (got < 0 && errno == EINTR) {
      continue;
    }
    TORCH_CHECK(got > 0, "map_file_pieces: reading ", path, " at ", offset, " failed: ",
                got < 0 ? std::strerror(errno) : "end of file");
    dest += got;
    n -= got;
    offset += got;
  }
}

// Fill the page tables of the mapped ranges (MADV_POPULATE_READ: read faults, so the pages stay the
// page cache's; MAP_POPULATE on a private writable mapping would copy every page). The kernel's
// work per page (finding it in the page cache, writing its entry) is CPU time, so a large mapping is
// cut into 32 MB pieces at 32 MB multiples of the address, which a few threads take in turn.
// Kernels without the advice refuse it: the pages fault in at first use.
void populate(const std::vector<std::pair<char*, size_t>>& ranges) {
#ifdef MADV_POPULATE_READ
  const uintptr_t step = uintptr_t{32} << 20;
  std::vector<std::pair<char*, size_t>> pieces;
  size_t total = 0;
  for (const auto& range : ranges) {
    const uintptr_t end = reinterpret_cast<uintptr_t>(range.first) + range.second;
    for (uintptr_t at = reinterpret_cast<uintptr_t>(range.first); at < end;) {
      const uintptr_t stop = std::min(end, (at / step + 1) * step);
      pieces.emplace_back(reinterpret_cast<char*>(at), static_cast<size_t>(stop - at));
      at = stop;
    }
    total += range.second;
  }
  const size_t cores = std::max(1u, std::thread::hardware_concurrency());
  const size_t threads = std::min<size_t>({kPopulateThreads, cores, total / (2 * step) + 1});
  std::atomic<size_t> next{0};
  auto run = [&pieces, &next] {
    for (size_t i = next++; i < pieces.size(); i = next++) {
      madvise(pieces[i].first, pieces[i].second, MADV_POPULATE_READ);
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(threads);  // so that only starting a thread can fail below
  try {
    for (size_t t = 1; t < threads; ++t) pool.emplace_back(run);
  } catch (const std::system_error&) {
    // no more threads to be had (a process limit): the ones started and this one do the rest
  }
  run();
  for (auto& thread : pool) thread.join();
#else
  (void)ranges;
#endif
}

struct Fd {
  int fd;
  ~Fd() {
    if (fd >= 0) close(fd);
  }
};

at::Tensor map_file_pieces_cpu(const std::string& path, at::IntArrayRef offsets, at::IntArrayRef sizes) {
  TORCH_CHECK(offsets.size() == sizes.size() && !offsets.empty(), "map_file_pieces: one size per offset");
  const int64_t page = sysconf(_SC_PAGESIZE);
  Fd file{open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  TORCH_CHECK(file.fd >= 0, "map_file_pieces: cannot open ", path, ": ", std::strerror(errno));
  const int64_t file_size = lseek(file.fd, 0, SEEK_END);
  int64_t total = 0;
  const int64_t lead = offsets[0] % page;  // the tensor starts this far into its first page
  for (size_t i = 0; i < offsets.size(); ++i) {
    TORCH_CHECK(offsets[i] >= 0 && sizes[i] > 0 && offsets[i] + sizes[i] <= file_size, "map_file_pieces: range ",
                i, " lies outside ", path);
    TORCH_CHECK(offsets[i] % page == (lead + total) % page, "map_file_pieces: range ", i,
                " does not line up with the pages of the tensor");
    total += sizes[i];
  }
  const size_t length = static_cast<size_t>((lead + total + page - 1) / page * page);
  // The reservation sits where each mapped byte's address equals its file offset modulo 2 MB, as
  // the kernel places a whole-file mapping: a 2 MB folio of the page cache is then mapped by one
  // page-table entry (fewer TLB misses while the weights stream, and the populate takes half the
  // time, measured in docs/benchmarks.md). The ranges of one tensor sit at file distances that
  // are multiples of their sizes, so for whole 2 MB tensors every range lines up at once.
  const size_t huge = size_t{2} << 20;
  void* reserved = mmap(nullptr, length + huge, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(reserved != MAP_FAILED, "map_file_pieces: cannot reserve ", length, " bytes: ", std::strerror(errno));
  const uintptr_t want = static_cast<uintptr_t>(offsets[0] - lead) % huge;
  const uintptr_t from = reinterpret_cast<uintptr_t>(reserved);
  const uintptr_t placed = from + (want + huge - from % huge) % huge;
  if (placed > from) munmap(reserved, placed - from);
  munmap(reinterpret_cast<void*>(placed + length), from + huge - placed);  // the rest past the end
  void* base = reinterpret_cast<void*>(placed);
  auto* region = new Region{base, length};
  char* start = static_cast<char*>(base);
  char* data = start + lead;
  try {
    // pages not covered whole by one range: anonymous, filled from every range that overlaps them
    std::vector<char> partial(static_cast<size_t>(length / page), 0);
    std::vector<std::pair<char*, size_t>> mapped;
    int64_t at = 0;
    for (size_t i = 0; i < offsets.size(); ++i) {
      const int64_t begin = lead + at, end = begin + sizes[i];  // bytes from `start`
      const int64_t first_whole = (begin + page - 1) / page, end_whole = end / page;
      if (first_whole < end_whole) {
        void* got = mmap(start + first_whole * page, static_cast<size_t>((end_whole - first_whole) * page),
                         PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, file.fd,
                         offsets[i] + (first_whole * page - begin));
        TORCH_CHECK(got != MAP_FAILED, "map_file_pieces: cannot map ", path, ": ", std::strerror(errno));
        mapped.emplace_back(static_cast<char*>(got), static_cast<size_t>((end_whole - first_whole) * page));
      }
      if (begin % page != 0 || first_whole >= end_whole) partial[begin / page] = 1;
      if (end % page != 0) partial[(end - 1) / page] = 1;
      at += sizes[i];
    }
    for (size_t p = 0; p < partial.size(); ++p) {
      if (!partial[p]) continue;
      void* got = mmap(start + p * page, static_cast<size_t>(page), PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
      TORCH_CHECK(got != MAP_FAILED, "map_file_pieces: cannot map a page: ", std::strerror(errno));
    }
    at = 0;
    for (size_t i = 0; i < offsets.size(); ++i) {
      const int64_t begin = lead + at, end = begin + sizes[i];
      for (int64_t p = begin / page; p * page < end; ++p) {
        if (!partial[static_cast<size_t>(p)]) continue;
        const int64_t lo = std::max(begin, p * page), hi = std::min(end, (p + 1) * page);
        read_exactly(file.fd, start + lo, hi - lo, offsets[i] + (lo - begin), path);
      }
      at += sizes[i];
    }
    // page-table entries for the pages now (as llama.cpp's MAP_POPULATE), not one fault per page
    // at first use
    populate(mapped);
  } catch (...) {
    release(region);
    throw;
  }
  return at::from_blob(
      data, {total}, [region](void*) { release(region); }, at::TensorOptions().dtype(at::kByte));
}

#else

at::Tensor map_file_pieces_cpu(const std::string&, at::IntArrayRef, at::IntArrayRef) {
  TORCH_CHECK(false, "map_file_pieces: not available on this platform");
}

#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_runtime, m) {
  // the ranges (offsets[i], sizes[i]) of the file at `path`, back to back: uint8 [sum(sizes)] (no
  // tensor argument: a kernel for every dispatch key)
  m.def("map_file_pieces(str path, int[] offsets, int[] sizes) -> Tensor", &map_file_pieces_cpu);
}

}  // namespace moe_runtime
