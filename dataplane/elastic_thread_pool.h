// ElasticThreadPool: httplib's TaskQueue that grows a thread per waiting connection up to a
// hard cap and shrinks when threads sit idle.
//
// httplib ties a worker to a connection for the connection's whole life (including keep-alive
// idle time and a streaming response), so a fixed pool of N threads starves everything once N
// long streams are open. This pool starts threads on demand, so /health and short requests get
// a thread even while thousands of streams are open. Beyond `max_threads` connections queue
// (as in httplib), and the queue length is observable.
//
// Thread-safe.
#ifndef SFLB_DATAPLANE_ELASTIC_THREAD_POOL_H_
#define SFLB_DATAPLANE_ELASTIC_THREAD_POOL_H_

#include <cstddef>
#include <deque>
#include <functional>
#include <list>
#include <thread>
#include <vector>

#include "absl/time/time.h"
#include "common/mutex.h"
#include "httplib.h"

namespace sflb {

class ElasticThreadPool : public httplib::TaskQueue {
 public:
  // Keeps up to `min_idle` idle threads around; idle threads beyond that exit after
  // `idle_ttl`; never more than `max_threads` threads.
  ElasticThreadPool(size_t max_threads, size_t min_idle, absl::Duration idle_ttl);
  ~ElasticThreadPool() override;

  void enqueue(std::function<void()> fn) override;
  // Runs every queued task, then joins all threads. Waits as long as tasks run: httplib only
  // calls this after the listener closed, and callers bound in-flight work with timeouts.
  void shutdown() override;

  struct Stats {
    size_t threads = 0;
    size_t busy = 0;
    size_t queued = 0;
  };
  Stats stats() const;

 private:
  void Worker(std::list<std::thread>::iterator self);
  void ReapFinished();

  const size_t max_threads_;
  const size_t min_idle_;
  const absl::Duration idle_ttl_;

  mutable Mutex mu_;
  CondVar work_cv_;
  CondVar exit_cv_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  std::list<std::thread> threads_ ABSL_GUARDED_BY(mu_);
  // Threads that returned and wait to be joined by someone else.
  std::vector<std::thread> finished_ ABSL_GUARDED_BY(mu_);
  size_t live_ ABSL_GUARDED_BY(mu_) = 0;
  size_t idle_ ABSL_GUARDED_BY(mu_) = 0;
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace sflb

#endif  // SFLB_DATAPLANE_ELASTIC_THREAD_POOL_H_
