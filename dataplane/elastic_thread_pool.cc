#include "dataplane/elastic_thread_pool.h"

#include "common/log.h"

namespace sflb {

ElasticThreadPool::ElasticThreadPool(size_t max_threads, size_t min_idle, absl::Duration idle_ttl)
    : max_threads_(max_threads < 1 ? 1 : max_threads), min_idle_(min_idle), idle_ttl_(idle_ttl) {}

ElasticThreadPool::~ElasticThreadPool() { shutdown(); }

void ElasticThreadPool::enqueue(std::function<void()> fn) {
  ReapFinished();
  MutexLock lock(&mu_);
  if (shutdown_) return;
  queue_.push_back(std::move(fn));
  if (idle_ >= queue_.size() || live_ >= max_threads_) {
    work_cv_.Signal();
    return;
  }
  // Nobody idle to take it: start a thread. The thread object lives in threads_ until it
  // exits; it then moves itself to finished_ to be joined by another thread.
  ++live_;
  threads_.emplace_back();
  auto self = std::prev(threads_.end());
  *self = std::thread([this, self] { Worker(self); });
}

void ElasticThreadPool::Worker(std::list<std::thread>::iterator self) {
  MutexLock lock(&mu_);
  for (;;) {
    while (queue_.empty() && !shutdown_) {
      ++idle_;
      bool signalled = work_cv_.WaitWithTimeout(&mu_, idle_ttl_);
      --idle_;
      if (!signalled && queue_.empty() && !shutdown_ && idle_ >= min_idle_) {
        // Idle too long and enough spare threads: leave.
        --live_;
        finished_.push_back(std::move(*self));
        threads_.erase(self);
        exit_cv_.SignalAll();
        return;
      }
    }
    if (queue_.empty() && shutdown_) break;
    std::function<void()> task = std::move(queue_.front());
    queue_.pop_front();
    mu_.Unlock();
    task();
    task = nullptr;  // release captured state outside the lock
    mu_.Lock();
  }
  --live_;
  exit_cv_.SignalAll();
}

void ElasticThreadPool::ReapFinished() {
  std::vector<std::thread> done;
  {
    MutexLock lock(&mu_);
    done.swap(finished_);
  }
  for (std::thread& t : done) t.join();
}

void ElasticThreadPool::shutdown() {
  std::list<std::thread> threads;
  {
    MutexLock lock(&mu_);
    if (shutdown_ && threads_.empty() && finished_.empty()) return;
    shutdown_ = true;
    work_cv_.SignalAll();
    // Each worker drains the queue and exits; wait in slices so the wait is never untimed.
    while (live_ > 0) {
      if (!exit_cv_.WaitWithTimeout(&mu_, absl::Seconds(5))) {
        LogInfo("waiting_for_connections", {{"threads", live_}, {"queued", queue_.size()}});
      }
    }
    threads.swap(threads_);
  }
  for (std::thread& t : threads) {
    if (t.joinable()) t.join();
  }
  ReapFinished();
}

ElasticThreadPool::Stats ElasticThreadPool::stats() const {
  MutexLock lock(&mu_);
  return Stats{live_, live_ - idle_, queue_.size()};
}

}  // namespace sflb
