// The asynchronous expert loader (see loader.h) and its registration as the TorchScript custom
// class torch.classes.moe_runtime.ExpertLoader. Linux (POSIX pread); O_DIRECT where defined.
#include "loader.h"

#include <fcntl.h>
#include <pthread.h>
#include <sys/types.h>
#include <unistd.h>

#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <sstream>
#include <utility>

namespace moe_runtime {
namespace {

// Largest single pread (Linux transfers at most 0x7ffff000 bytes per call).
constexpr int64_t kMaxChunk = int64_t{1} << 30;

// Closes a file descriptor when it goes out of scope.
struct FileCloser {
  int fd;
  ~FileCloser() {
    if (fd >= 0) {
      ::close(fd);
    }
  }
};

// Reads up to `len` bytes at `pos`, retrying interrupted and partial reads. Stops at the end
// of the file (and, with O_DIRECT, after a partial block, which only happens there). Returns
// the number of bytes read, or -errno.
int64_t read_full(int fd, char* buffer, int64_t len, int64_t pos, bool direct) {
  int64_t total = 0;
  while (total < len) {
    const int64_t want = std::min(len - total, kMaxChunk);
    const ssize_t got = ::pread(fd, buffer + total, static_cast<size_t>(want), static_cast<off_t>(pos + total));
    if (got < 0) {
      if (errno == EINTR) {
        continue;
      }
      return -static_cast<int64_t>(errno);
    }
    if (got == 0) {
      break;
    }
    total += got;
    if (direct && got % ExpertLoader::kDirectAlign != 0) {
      break;
    }
  }
  return total;
}

std::string describe(const std::string& path, int64_t offset, int64_t nbytes) {
  std::ostringstream out;
  out << path << " at offset " << offset << " (" << nbytes << " bytes)";
  return out.str();
}

std::string errno_message(int64_t error, const std::string& what) {
  return what + ": " + std::strerror(static_cast<int>(error));
}

std::string short_read_message(const std::string& what, int64_t end_of_file) {
  std::ostringstream out;
  out << what << ": short read, the file ends at byte " << end_of_file;
  return out.str();
}

double seconds_between(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

}  // namespace

ExpertLoader::ExpertLoader(int64_t num_threads, bool direct_io, int64_t staging_bytes, int64_t fail_every)
    : direct_io_(direct_io),
      staging_per_thread_(
          std::max(kDirectAlign, (staging_bytes / std::max<int64_t>(num_threads, 1)) / kDirectAlign * kDirectAlign)),
      fail_every_(fail_every) {
  TORCH_CHECK_VALUE(num_threads >= 1, "ExpertLoader: num_threads must be >= 1, got ", num_threads);
  TORCH_CHECK_VALUE(
      staging_bytes >= kDirectAlign * num_threads || !direct_io,
      "ExpertLoader: staging_bytes must hold one ", kDirectAlign, "-byte block per thread with direct_io, got ",
      staging_bytes, " for ", num_threads, " threads");
  TORCH_CHECK_VALUE(fail_every >= 0, "ExpertLoader: fail_every must be >= 0, got ", fail_every);
  threads_.reserve(static_cast<size_t>(num_threads));
  try {
    for (int64_t i = 0; i < num_threads; ++i) {
      threads_.emplace_back([this] { worker_loop(); });
#ifdef __linux__
      pthread_setname_np(threads_.back().native_handle(), "expert-loader");  // top -H, /proc/*/task/*/comm
#endif
    }
  } catch (...) {
    close();  // no destructor runs for a half-built object: join the threads already started
    throw;
  }
}

ExpertLoader::~ExpertLoader() {
  close();
}

int64_t ExpertLoader::submit(
    std::string path,
    std::vector<int64_t> offsets,
    std::vector<int64_t> sizes,
    at::Tensor dest,
    int64_t priority,
    int64_t widen) {
  TORCH_CHECK_VALUE(offsets.size() == sizes.size(), "ExpertLoader.submit: ", offsets.size(), " offsets but ",
                    sizes.size(), " sizes");
  TORCH_CHECK_VALUE(dest.device().is_cpu(), "ExpertLoader.submit: dest must be a CPU tensor, got ", dest.device());
  TORCH_CHECK_VALUE(dest.is_contiguous(), "ExpertLoader.submit: dest must be contiguous");
  int64_t total = 0;
  for (size_t i = 0; i < offsets.size(); ++i) {
    TORCH_CHECK_VALUE(offsets[i] >= 0 && sizes[i] >= 0, "ExpertLoader.submit: range ", i, " = (", offsets[i], ", ",
                      sizes[i], ") has a negative offset or size");
    total += sizes[i];
  }
  const int64_t capacity = static_cast<int64_t>(dest.nbytes());
  TORCH_CHECK_VALUE(total <= capacity, "ExpertLoader.submit: the ranges hold ", total, " bytes but dest only ",
                    capacity);
  TORCH_CHECK_VALUE(widen >= kWidenNone && widen <= kWidenFloat16, "ExpertLoader.submit: unknown widen ", widen);
  if (widen != kWidenNone) {
    TORCH_CHECK_VALUE(dest.scalar_type() == at::kFloat, "ExpertLoader.submit: widening needs a float32 dest");
    TORCH_CHECK_VALUE(total == 2 * dest.numel(), "ExpertLoader.submit: widening ", dest.numel(),
                      " values needs ranges of ", 2 * dest.numel(), " bytes, got ", total);
  }

  std::lock_guard<std::mutex> lock(mutex_);
  TORCH_CHECK(!closing_, "ExpertLoader.submit: the loader is closed");
  const void* address = capacity > 0 ? dest.data_ptr() : nullptr;
  if (address != nullptr) {
    const auto found = pending_by_dest_.find(address);
    if (found != pending_by_dest_.end()) {
      const RequestPtr& other = requests_.at(found->second);
      if (other->path == path && other->offsets == offsets && other->sizes == sizes && other->widen == widen) {
        ++deduplicated_;
        if (other->state == kQueued && priority < other->priority) {
          queue_.erase(std::make_tuple(other->priority, other->seq, other->id));
          other->priority = priority;
          ++promoted_;
          enqueue(other);
        }
        return other->id;
      }
    }
  }
  auto request = std::make_shared<Request>();
  request->id = next_ticket_++;
  request->path = std::move(path);
  request->offsets = std::move(offsets);
  request->sizes = std::move(sizes);
  request->dest = std::move(dest);
  request->priority = priority;
  request->widen = widen;
  request->submitted = Clock::now();
  requests_.emplace(request->id, request);
  if (address != nullptr) {
    pending_by_dest_[address] = request->id;
  }
  ++submitted_;
  enqueue(request);
  return request->id;
}

void ExpertLoader::enqueue(const RequestPtr& request) {
  request->seq = next_seq_++;
  queue_.emplace(request->priority, request->seq, request->id);
  work_cv_.notify_one();
}

ExpertLoader::RequestPtr ExpertLoader::find(int64_t ticket, const char* method) {
  TORCH_CHECK_VALUE(ticket >= 1 && ticket < next_ticket_, "ExpertLoader.", method, ": unknown ticket ", ticket);
  const auto found = requests_.find(ticket);
  return found == requests_.end() ? nullptr : found->second;
}

bool ExpertLoader::promote(int64_t ticket, int64_t priority) {
  std::lock_guard<std::mutex> lock(mutex_);
  const RequestPtr request = find(ticket, "promote");
  if (!request || request->state != kQueued) {
    return false;
  }
  if (priority < request->priority) {
    queue_.erase(std::make_tuple(request->priority, request->seq, request->id));
    request->priority = priority;
    ++promoted_;
    enqueue(request);
  }
  return true;
}

bool ExpertLoader::cancel(int64_t ticket) {
  std::lock_guard<std::mutex> lock(mutex_);
  const RequestPtr request = find(ticket, "cancel");
  if (!request || request->state != kQueued) {
    return false;
  }
  queue_.erase(std::make_tuple(request->priority, request->seq, request->id));
  request->message = "ticket " + std::to_string(ticket) + " (" + request->path + ") was cancelled";
  finish(request, kCancelled);
  request->reported = true;  // the caller learns it from the return value
  retain(ticket);
  return true;
}

void ExpertLoader::finish(const RequestPtr& request, State state) {
  request->state = state;
  if (request->dest.defined() && request->dest.nbytes() > 0) {
    const auto found = pending_by_dest_.find(request->dest.data_ptr());
    if (found != pending_by_dest_.end() && found->second == request->id) {
      pending_by_dest_.erase(found);
    }
  }
  request->dest = at::Tensor();
  if (state == kCancelled) {
    ++cancelled_;
  } else if (state == kFailed) {
    ++failed_;
  } else {
    retain(request->id);
  }
  done_cv_.notify_all();
}

void ExpertLoader::retain(int64_t ticket) {
  retained_.push_back(ticket);
  while (retained_.size() > kRetainedOutcomes) {
    requests_.erase(retained_.front());
    retained_.pop_front();
  }
}

std::tuple<int64_t, int64_t, std::string> ExpertLoader::wait(int64_t ticket, double timeout_s) {
  std::unique_lock<std::mutex> lock(mutex_);
  const RequestPtr request = find(ticket, "wait");
  if (!request) {
    return {kDone, 0, ""};
  }
  const auto finished = [&] { return request->state >= kDone; };
  if (timeout_s < 0) {
    done_cv_.wait(lock, finished);
  } else {
    const auto limit = std::chrono::duration<double>(std::min(timeout_s, 1e6));
    done_cv_.wait_for(lock, std::chrono::duration_cast<Clock::duration>(limit), finished);
  }
  if (request->state >= kDone && request->state != kDone && !request->reported) {
    request->reported = true;
    retain(ticket);
  }
  return {request->state, request->error, request->message};
}

int64_t ExpertLoader::state(int64_t ticket) {
  std::lock_guard<std::mutex> lock(mutex_);
  const RequestPtr request = find(ticket, "state");
  return request ? request->state : kDone;
}

int64_t ExpertLoader::start_index(int64_t ticket) {
  std::lock_guard<std::mutex> lock(mutex_);
  const RequestPtr request = find(ticket, "start_index");
  return request ? request->start_index : -1;
}

void ExpertLoader::pause() {
  std::lock_guard<std::mutex> lock(mutex_);
  paused_ = true;
}

void ExpertLoader::resume() {
  std::lock_guard<std::mutex> lock(mutex_);
  paused_ = false;
  work_cv_.notify_all();
}

c10::Dict<std::string, double> ExpertLoader::stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  c10::Dict<std::string, double> out;
  out.insert("submitted", static_cast<double>(submitted_));
  out.insert("reads", static_cast<double>(reads_));
  out.insert("bytes_read", static_cast<double>(bytes_read_));
  out.insert("staged_bytes", static_cast<double>(staged_bytes_));
  out.insert("failed", static_cast<double>(failed_));
  out.insert("cancelled", static_cast<double>(cancelled_));
  out.insert("promoted", static_cast<double>(promoted_));
  out.insert("deduplicated", static_cast<double>(deduplicated_));
  out.insert("direct_fallbacks", static_cast<double>(direct_fallbacks_));
  out.insert("widened", static_cast<double>(widened_));
  out.insert("queued", static_cast<double>(queue_.size()));
  out.insert("running", static_cast<double>(running_));
  out.insert("queue_wait_s", queue_wait_s_);
  out.insert("read_time_s", read_time_s_);
  return out;
}

void ExpertLoader::close() {
  std::lock_guard<std::mutex> closing(close_mutex_);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    closing_ = true;
    for (const auto& entry : queue_) {
      const RequestPtr& request = requests_.at(std::get<2>(entry));
      request->message = "ticket " + std::to_string(request->id) + " (" + request->path +
          ") was cancelled: the loader closed";
      finish(request, kCancelled);
    }
    queue_.clear();
    work_cv_.notify_all();
  }
  for (auto& thread : threads_) {
    if (thread.joinable()) {
      thread.join();
    }
  }
  threads_.clear();
}

void ExpertLoader::worker_loop() {
  Staging staging;
  std::unique_lock<std::mutex> lock(mutex_);
  while (true) {
    work_cv_.wait(lock, [&] { return closing_ || (!paused_ && !queue_.empty()); });
    if (closing_) {
      return;
    }
    const auto first = queue_.begin();
    const RequestPtr request = requests_.at(std::get<2>(*first));
    queue_.erase(first);
    request->state = kRunning;
    request->start_index = started_++;
    const bool inject = fail_every_ > 0 && ++executed_ % fail_every_ == 0;
    ++running_;
    const Clock::time_point start = Clock::now();
    queue_wait_s_ += seconds_between(request->submitted, start);
    lock.unlock();

    Outcome outcome;
    if (inject) {
      outcome.error = EIO;
      outcome.message = errno_message(EIO, "injected read failure (fail_every=" + std::to_string(fail_every_) +
                                                ") reading " + request->path);
    } else {
      try {
        outcome = execute(*request, staging);
      } catch (const std::exception& error) {  // fail the ticket, never the thread
        outcome = Outcome();
        outcome.error = EIO;
        outcome.message = "reading " + request->path + ": " + error.what();
      }
    }

    lock.lock();
    --running_;
    read_time_s_ += seconds_between(start, Clock::now());
    bytes_read_ += outcome.bytes;
    staged_bytes_ += outcome.staged;
    direct_fallbacks_ += outcome.fallback ? 1 : 0;
    widened_ += outcome.widened ? 1 : 0;
    request->error = outcome.error;
    request->message = std::move(outcome.message);
    if (outcome.error == 0) {
      ++reads_;
    }
    finish(request, outcome.error == 0 ? kDone : kFailed);
  }
}

namespace {

// Widens n 16-bit floats held in the last 2n bytes of the 4n-byte buffer `dst` into float32 values
// filling it. Front to back in chunks copied out first: a chunk's stores reach only source values
// already copied (value j's bytes start at 2n + 2j, past every store of values below j), and the
// memcpy (a char access) keeps the compiler from moving a load past a store that overlaps it.
void widen_in_place(float* dst, int64_t n, int64_t kind) {
  constexpr int64_t kChunk = 2048;
  const char* src = reinterpret_cast<const char*>(dst) + 2 * n;
  uint16_t chunk[kChunk];
  for (int64_t i = 0; i < n; i += kChunk) {
    const int64_t count = std::min(kChunk, n - i);
    std::memcpy(chunk, src + 2 * i, static_cast<size_t>(2 * count));
    for (int64_t k = 0; k < count; ++k) {
      float value;
      if (kind == ExpertLoader::kWidenBFloat16) {
        const uint32_t bits = static_cast<uint32_t>(chunk[k]) << 16;
        std::memcpy(&value, &bits, sizeof(value));
      } else {
        value = c10::detail::fp16_ieee_to_fp32_value(chunk[k]);
      }
      dst[i + k] = value;
    }
  }
}

}  // namespace

ExpertLoader::Outcome ExpertLoader::execute(const Request& request, Staging& staging) {
  Outcome outcome;
  const auto fail = [&](int64_t error, std::string message) {
    outcome.error = error;
    outcome.message = std::move(message);
    return outcome;
  };
  bool direct = false;
  int fd = -1;
#ifdef O_DIRECT
  if (direct_io_) {
    fd = ::open(request.path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
    direct = fd >= 0;
    if (fd < 0 && errno == EINVAL) {
      outcome.fallback = true;  // the file system does not do O_DIRECT
    } else if (fd < 0) {
      return fail(errno, errno_message(errno, "opening " + request.path));
    }
  }
#endif
  if (fd < 0) {
    fd = ::open(request.path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      return fail(errno, errno_message(errno, "opening " + request.path));
    }
  }
  FileCloser closer{fd};

  char* base = static_cast<char*>(request.dest.data_ptr());
  char* out = base;
  if (request.widen != kWidenNone) {
    out = base + request.dest.nbytes() / 2;  // the 16-bit values go to the last half, widened after
  }
  for (size_t i = 0; i < request.offsets.size(); ++i) {
    const int64_t offset = request.offsets[i];
    const int64_t nbytes = request.sizes[i];
    int64_t done = 0;
    if (!direct || (offset % kDirectAlign == 0 && reinterpret_cast<uintptr_t>(out) % kDirectAlign == 0)) {
      // Buffered, or O_DIRECT with aligned offset and address: whole blocks straight into dest.
      const int64_t len = direct ? nbytes / kDirectAlign * kDirectAlign : nbytes;
      const int64_t got = read_full(fd, out, len, offset, direct);
      if (got < 0) {
        return fail(-got, errno_message(-got, "reading " + describe(request.path, offset, nbytes)));
      }
      if (got < len) {
        return fail(EIO, short_read_message("reading " + describe(request.path, offset, nbytes), offset + got));
      }
      done = len;
    }
    while (done < nbytes) {
      // O_DIRECT remainder: aligned blocks into the staging buffer, the wanted bytes copied out.
      if (!staging.data) {
        void* memory = std::aligned_alloc(static_cast<size_t>(kDirectAlign), static_cast<size_t>(staging_per_thread_));
        if (memory == nullptr) {
          return fail(ENOMEM, errno_message(ENOMEM, "allocating the staging buffer"));
        }
        staging.data = std::unique_ptr<char, void (*)(void*)>(static_cast<char*>(memory), std::free);
        staging.size = staging_per_thread_;
      }
      const int64_t pos = offset + done;
      const int64_t block = pos / kDirectAlign * kDirectAlign;
      const int64_t skip = pos - block;
      const int64_t want = std::min(nbytes - done, staging.size - skip);
      const int64_t len = (skip + want + kDirectAlign - 1) / kDirectAlign * kDirectAlign;
      const int64_t got = read_full(fd, staging.data.get(), len, block, true);
      if (got < 0) {
        return fail(-got, errno_message(-got, "reading " + describe(request.path, offset, nbytes)));
      }
      if (got < skip + want) {
        return fail(EIO, short_read_message("reading " + describe(request.path, offset, nbytes), block + got));
      }
      std::memcpy(out + done, staging.data.get() + skip, static_cast<size_t>(want));
      outcome.staged += want;
      done += want;
    }
    out += nbytes;
    outcome.bytes += nbytes;
  }
  if (request.widen != kWidenNone) {
    widen_in_place(reinterpret_cast<float*>(base), request.dest.numel(), request.widen);
    outcome.widened = true;
  }
  return outcome;
}

}  // namespace moe_runtime

TORCH_LIBRARY_FRAGMENT(moe_runtime, m) {
  using moe_runtime::ExpertLoader;
  m.class_<ExpertLoader>("ExpertLoader")
      .def(torch::init<int64_t, bool, int64_t, int64_t>())
      .def("submit", &ExpertLoader::submit)
      .def("promote", &ExpertLoader::promote)
      .def("cancel", &ExpertLoader::cancel)
      .def("wait", &ExpertLoader::wait)
      .def("state", &ExpertLoader::state)
      .def("start_index", &ExpertLoader::start_index)
      .def("pause", &ExpertLoader::pause)
      .def("resume", &ExpertLoader::resume)
      .def("stats", &ExpertLoader::stats)
      .def("close", &ExpertLoader::close);
}
