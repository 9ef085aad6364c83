// Work items spread over a persistent pool of std::threads, shared by the CPU kernels (prefix attention,
// few-row linear). The pool lives in cpu_threads.cpp, compiled once with the baseline flags: inline code
// here is compiled into every ISA build, and the linker could keep an AVX-512 copy of it for all.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>

namespace fastmem {
namespace cpu_threads {

// One call's items: f(item) for item in [0, n), handed out in increasing order to whoever asks next.
struct Job {
  void (*call)(const void* f, int64_t item);
  const void* f;
  int64_t n;
  std::atomic<int64_t> next{0};
  std::exception_ptr error;  // the first exception an item threw (the remaining items are then skipped)
  std::mutex error_mutex;
};

// Runs job's items on the calling thread and up to `helpers` pool threads; returns when all are done.
void run(Job& job, int helpers);

// Runs f(item) for item in [0, n) on up to `threads` threads (the caller's thread included).
// Items are handed out dynamically; results must not depend on which thread runs an item.
// The first exception an item throws is rethrown here.
template <class F>
inline void parallel_for(int64_t n, int threads, const F& f) {
  if (n <= 0) return;
  Job job;
  job.call = [](const void* fn, int64_t item) { (*static_cast<const F*>(fn))(item); };
  job.f = &f;
  job.n = n;
  run(job, (int)(std::min<int64_t>(threads, n) - 1));
  if (job.error) std::rethrow_exception(job.error);
}

}  // namespace cpu_threads
}  // namespace fastmem
