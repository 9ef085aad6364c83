// The persistent worker pool behind cpu_threads::parallel_for (cpu_threads.h).
//
// A decode step calls a kernel about 240 times (every layer's linears and attention), each for tens of
// microseconds of work: starting and joining a std::thread per call cost 60 us on Zen 4, as much as the
// work. The pool's threads start once and sleep on a condition variable between calls.
// - One call at a time uses the pool; a call made while another runs (two Python threads with the GIL
//   released) runs its items on its own thread instead of waiting.
// - After fork() the child gets a fresh pool (the parent's threads do not exist there).
// - The pool is never destroyed: joinable threads in a static destructor would abort the process at exit.
#include "cpu_threads.h"

#include <condition_variable>
#include <thread>
#include <vector>

#include <unistd.h>

namespace fastmem {
namespace cpu_threads {
namespace {

void work(Job& job) {
  try {
    for (int64_t i = job.next.fetch_add(1); i < job.n; i = job.next.fetch_add(1)) job.call(job.f, i);
  } catch (...) {
    std::lock_guard<std::mutex> lock(job.error_mutex);
    if (!job.error) job.error = std::current_exception();
    job.next.store(job.n);
  }
}

class Pool {
 public:
  // This process's pool (a new one after fork(); a forked child leaves the parent's copy untouched).
  static Pool& instance() {
    static std::mutex mutex;
    static Pool* pool = nullptr;
    std::lock_guard<std::mutex> lock(mutex);
    if (pool == nullptr || pool->pid_ != getpid()) pool = new Pool();
    return *pool;
  }

  void run(Job& job, int helpers) {
    std::unique_lock<std::mutex> busy(run_mutex_, std::try_to_lock);
    if (!busy.owns_lock()) {
      work(job);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while ((int)threads_.size() < helpers) threads_.emplace_back([this] { serve(); });
      job_ = &job;
      wanted_ = helpers;
      entered_ = 0;
      ++generation_;
    }
    work_ready_.notify_all();
    work(job);
    std::unique_lock<std::mutex> lock(mutex_);
    job_ = nullptr;  // a helper that wakes from now on stays out
    all_left_.wait(lock, [this] { return inside_ == 0; });
  }

 private:
  Pool() : pid_(getpid()) {}

  void serve() {
    uint64_t seen = 0;
    for (;;) {
      Job* job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        work_ready_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (job_ == nullptr || entered_ >= wanted_) continue;
        job = job_;
        ++entered_;
        ++inside_;
      }
      work(*job);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--inside_ == 0) all_left_.notify_one();
    }
  }

  const pid_t pid_;
  std::mutex run_mutex_;  // held by the one call using the pool
  std::mutex mutex_;      // guards everything below
  std::condition_variable work_ready_, all_left_;
  std::vector<std::thread> threads_;
  uint64_t generation_ = 0;
  Job* job_ = nullptr;
  int wanted_ = 0, entered_ = 0, inside_ = 0;
};

}  // namespace

void run(Job& job, int helpers) {
  if (helpers <= 0)
    work(job);
  else
    Pool::instance().run(job, helpers);
}

}  // namespace cpu_threads
}  // namespace fastmem
