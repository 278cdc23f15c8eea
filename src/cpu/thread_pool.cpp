#include "cpu/thread_pool.h"

#include <algorithm>

namespace memattn::cpu {

ThreadPool& ThreadPool::instance() {
  static ThreadPool pool;
  return pool;
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
    ++generation_;
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::ensure_workers(int count) {
  while (static_cast<int>(workers_.size()) < count) {
    const int worker = static_cast<int>(workers_.size()) + 1;  // 0 is the caller
    workers_.emplace_back([this, worker] { worker_loop(worker); });
  }
}

void ThreadPool::drain(int worker) {
  for (;;) {
    std::int64_t task;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (next_task_ >= num_tasks_) return;
      task = next_task_++;
    }
    fn_(context_, task, worker);
  }
}

void ThreadPool::worker_loop(int worker) {
  std::uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stopping_ || generation_ != seen; });
      if (stopping_) return;
      seen = generation_;
      if (worker > active_workers_) continue;  // not needed for this job
    }
    drain(worker);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (--pending_ == 0) done_.notify_one();
    }
  }
}

void ThreadPool::run(std::int64_t num_tasks, int num_threads, TaskFn fn, void* context) {
  if (num_tasks <= 0) return;
  const int helpers =
      static_cast<int>(std::min<std::int64_t>(std::max(num_threads, 1) - 1, num_tasks - 1));
  if (helpers == 0) {
    for (std::int64_t t = 0; t < num_tasks; ++t) fn(context, t, 0);
    return;
  }
  std::lock_guard<std::mutex> serial(run_mutex_);  // one job at a time
  {
    std::lock_guard<std::mutex> lock(mutex_);
    ensure_workers(helpers);
    fn_ = fn;
    context_ = context;
    num_tasks_ = num_tasks;
    next_task_ = 0;
    active_workers_ = helpers;
    pending_ = helpers;
    ++generation_;
  }
  wake_.notify_all();
  drain(0);
  std::unique_lock<std::mutex> lock(mutex_);
  done_.wait(lock, [&] { return pending_ == 0; });
}

}  // namespace memattn::cpu
