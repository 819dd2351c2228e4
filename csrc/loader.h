// Asynchronous expert loader: a small pool of threads doing positional reads of byte ranges of
// files into CPU tensors, in priority order.
//
//   submit(path, ranges, dest, priority) -> ticket
//     -> queue ordered by (priority, arrival); lower priority first (0 on-demand, 1 prefetch)
//     -> worker: open (O_DIRECT optional) -> pread every range back to back into dest
//        (O_DIRECT: straight into dest where offset and address are aligned, otherwise through
//        an aligned per-thread staging buffer, copied out)
//     -> widen (optional): the ranges hold 16-bit floats (bf16 or fp16) read into the last half of
//        a float32 dest, converted in place, front to back, by the worker
//     -> outcome kept under the ticket: done, failed (errno + message) or cancelled
//   wait(ticket, timeout) -> (state, errno, message)
//
// The loader allocates nothing but the staging buffers (at most `staging_bytes` in total, only
// with O_DIRECT, reused across reads); destinations are the caller's tensors, referenced until
// their read finishes. Exposed to Python as torch.classes.moe_runtime.ExpertLoader; the Python
// face, with a pure-Python reference of the same semantics, is moe_runtime/ops/loader.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/Dict.h>
#include <torch/custom_class.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace moe_runtime {

class ExpertLoader : public torch::CustomClassHolder {
 public:
  // State of a ticket, as returned by `state` and `wait`.
  enum State : int64_t { kQueued = 0, kRunning = 1, kDone = 2, kFailed = 3, kCancelled = 4 };

  // Outcomes of finished tickets are kept until this many newer ones finished; failures and
  // cancellations are kept until `wait` (or `cancel`) has reported them. A ticket whose outcome
  // has been forgotten counts as done.
  static constexpr size_t kRetainedOutcomes = 4096;
  // Alignment of file offsets, lengths and buffers for O_DIRECT reads.
  static constexpr int64_t kDirectAlign = 4096;
  // What the worker does with the bytes read: keep them, or widen 16-bit floats into float32.
  enum Widen : int64_t { kWidenNone = 0, kWidenBFloat16 = 1, kWidenFloat16 = 2 };

  // num_threads >= 1 workers; direct_io opens files with O_DIRECT (falling back to buffered reads
  // where the file system refuses it); staging_bytes bounds the staging buffers of all threads;
  // fail_every > 0 makes every fail_every-th executed ticket fail with EIO (tests).
  ExpertLoader(int64_t num_threads, bool direct_io, int64_t staging_bytes, int64_t fail_every);
  ~ExpertLoader() override;

  // Queues reads of the ranges (offsets[i], sizes[i]) of `path`, back to back into `dest` (a
  // contiguous CPU tensor of at least sum(sizes) bytes). A submit matching a queued or running
  // ticket (same dest address, path, ranges and widening) returns that ticket, moving it up if
  // `priority` is lower. With `widen` (a Widen), dest is float32 and the ranges hold exactly its
  // values as bf16 / fp16: they are read into its last half and widened in place.
  int64_t submit(
      std::string path,
      std::vector<int64_t> offsets,
      std::vector<int64_t> sizes,
      at::Tensor dest,
      int64_t priority,
      int64_t widen);
  // Lowers a queued ticket's priority to `priority` (it then queues behind the tickets already
  // at that priority). Returns whether the ticket was still queued.
  bool promote(int64_t ticket, int64_t priority);
  // Removes a queued ticket. Returns whether it was still queued (a running or finished ticket
  // is left alone).
  bool cancel(int64_t ticket);
  // Blocks up to timeout_s seconds (< 0: no limit) until the ticket finished, without the GIL
  // when called from Python. Returns (state, errno, message); a queued or running state means
  // the time ran out.
  std::tuple<int64_t, int64_t, std::string> wait(int64_t ticket, double timeout_s);
  // Current state of a ticket; never blocks.
  int64_t state(int64_t ticket);
  // Position at which the ticket was taken off the queue (0 for the first), -1 if not (yet).
  int64_t start_index(int64_t ticket);
  // While paused, workers take nothing off the queue (running reads finish).
  void pause();
  void resume();
  // Counters: submitted, reads, bytes_read, staged_bytes, failed, cancelled, promoted,
  // deduplicated, direct_fallbacks, widened, queued, running; seconds: queue_wait_s, read_time_s.
  c10::Dict<std::string, double> stats();
  // Cancels queued tickets, lets running reads finish and joins the threads. Idempotent.
  void close();

 private:
  using Clock = std::chrono::steady_clock;

  struct Request {
    int64_t id = 0;
    std::string path;
    std::vector<int64_t> offsets;
    std::vector<int64_t> sizes;
    at::Tensor dest;  // released once finished
    int64_t priority = 0;
    int64_t widen = kWidenNone;
    int64_t seq = 0;  // arrival order within a priority
    State state = kQueued;
    int64_t error = 0;
    std::string message;
    bool reported = false;
    int64_t start_index = -1;
    Clock::time_point submitted;
  };
  using RequestPtr = std::shared_ptr<Request>;

  struct Outcome {
    int64_t error = 0;
    std::string message;
    int64_t bytes = 0;
    int64_t staged = 0;
    bool fallback = false;
    bool widened = false;
  };

  // Aligned scratch memory of one worker, allocated on first use.
  struct Staging {
    std::unique_ptr<char, void (*)(void*)> data{nullptr, nullptr};
    int64_t size = 0;
  };

  void worker_loop();
  Outcome execute(const Request& request, Staging& staging);
  // The following need `mutex_` held.
  RequestPtr find(int64_t ticket, const char* method);
  void enqueue(const RequestPtr& request);
  void finish(const RequestPtr& request, State state);
  void retain(int64_t ticket);

  const bool direct_io_;
  const int64_t staging_per_thread_;
  const int64_t fail_every_;

  std::mutex mutex_;
  std::condition_variable work_cv_;  // workers: queue changed, resumed or closing
  std::condition_variable done_cv_;  // waiters: some ticket finished
  std::unordered_map<int64_t, RequestPtr> requests_;
  std::set<std::tuple<int64_t, int64_t, int64_t>> queue_;  // (priority, seq, ticket)
  std::unordered_map<const void*, int64_t> pending_by_dest_;
  std::deque<int64_t> retained_;  // finished tickets whose outcome may be forgotten, oldest first
  int64_t next_ticket_ = 1;
  int64_t next_seq_ = 0;
  int64_t started_ = 0;
  int64_t executed_ = 0;
  int64_t running_ = 0;
  bool paused_ = false;
  bool closing_ = false;

  // Counters (under mutex_).
  int64_t submitted_ = 0, reads_ = 0, bytes_read_ = 0, staged_bytes_ = 0, failed_ = 0;
  int64_t cancelled_ = 0, promoted_ = 0, deduplicated_ = 0, direct_fallbacks_ = 0, widened_ = 0;
  double queue_wait_s_ = 0.0, read_time_s_ = 0.0;

  std::mutex close_mutex_;  // serializes close (and the join) between callers
  std::vector<std::thread> threads_;
};

}  // namespace moe_runtime
