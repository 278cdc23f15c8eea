// A persistent pool of worker threads for the CPU backend.
//
// Why not OpenMP: the PyTorch wheels bundle their own libgomp; a second OpenMP runtime in
// the process would keep a second set of spinning threads and oversubscribe the cores.
// The pool hands out task indices dynamically (an atomic counter), which balances causal
// work whose cost varies by query block.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace memattn::cpu {

class ThreadPool {
 public:
  using TaskFn = void (*)(void* context, std::int64_t task, int worker);

  static ThreadPool& instance();
  ~ThreadPool();

  // Runs fn(context, t, worker) for t in [0, num_tasks) on up to num_threads threads (the
  // caller is worker 0) and returns when all are done. worker < num_threads, so callers can
  // index per-worker scratch. Exceptions must not escape fn.
  void run(std::int64_t num_tasks, int num_threads, TaskFn fn, void* context);

 private:
  void ensure_workers(int count);
  void worker_loop(int worker);
  void drain(int worker);

  std::mutex mutex_;      // guards the job fields below
  std::mutex run_mutex_;  // one job at a time (callers from several Python threads)
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  std::uint64_t generation_ = 0;
  bool stopping_ = false;
  // The current job.
  TaskFn fn_ = nullptr;
  void* context_ = nullptr;
  std::int64_t num_tasks_ = 0;
  int active_workers_ = 0;  // helpers taking part in this job (excluding the caller)
  int pending_ = 0;         // helpers not yet finished with this job
  std::int64_t next_task_ = 0;
};

// parallel_for(n, threads, [&](int64_t task, int worker) {...})
template <class Fn>
void parallel_for(std::int64_t num_tasks, int num_threads, Fn&& fn) {
  auto trampoline = [](void* ctx, std::int64_t task, int worker) {
    (*static_cast<Fn*>(ctx))(task, worker);
  };
  ThreadPool::instance().run(num_tasks, num_threads, trampoline, &fn);
}

}  // namespace memattn::cpu
