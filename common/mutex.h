// Mutex: a std::mutex with Clang thread-safety annotations.
//
// Debian's absl::Mutex is not instrumented for ThreadSanitizer (see TOOLCHAIN.md), so sflb
// uses std::mutex underneath and keeps Clang's -Wthread-safety checks through these
// annotations. Use `ABSL_GUARDED_BY(mu_)` on members and `MutexLock lock(&mu_);` in code.
#ifndef SFLB_COMMON_MUTEX_H_
#define SFLB_COMMON_MUTEX_H_

#include <chrono>
#include <condition_variable>
#include <mutex>

#include "absl/base/thread_annotations.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace sflb {

class ABSL_LOCKABLE Mutex {
 public:
  Mutex() = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void Lock() ABSL_EXCLUSIVE_LOCK_FUNCTION() { mu_.lock(); }
  void Unlock() ABSL_UNLOCK_FUNCTION() { mu_.unlock(); }
  bool TryLock() ABSL_EXCLUSIVE_TRYLOCK_FUNCTION(true) { return mu_.try_lock(); }
  // Documents (for the analysis) that the caller holds the lock.
  void AssertHeld() const ABSL_ASSERT_EXCLUSIVE_LOCK() {}

 private:
  friend class CondVar;
  std::mutex mu_;
};

// Scoped lock over a Mutex. Takes a pointer, like absl::MutexLock.
class ABSL_SCOPED_LOCKABLE MutexLock {
 public:
  explicit MutexLock(Mutex* mu) ABSL_EXCLUSIVE_LOCK_FUNCTION(mu) : mu_(mu) { mu_->Lock(); }
  ~MutexLock() ABSL_UNLOCK_FUNCTION() { mu_->Unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex* const mu_;
};

// Condition variable over a Mutex. Every wait has a deadline: there is no untimed Wait.
class CondVar {
 public:
  // Waits until notified or `timeout` passes; the caller must hold `mu`. Returns false on timeout.
  // Spurious wakeups are possible: callers loop on their predicate.
  bool WaitWithTimeout(Mutex* mu, absl::Duration timeout) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    std::unique_lock<std::mutex> lock(mu->mu_, std::adopt_lock);
    auto status = cv_.wait_for(lock, absl::ToChronoNanoseconds(timeout));
    lock.release();  // ownership stays with the caller's MutexLock
    return status == std::cv_status::no_timeout;
  }
  // Waits until notified or `deadline` (wall clock) passes. Returns false on timeout.
  bool WaitWithDeadline(Mutex* mu, absl::Time deadline) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    return WaitWithTimeout(mu, deadline - absl::Now());
  }
  void Signal() { cv_.notify_one(); }
  void SignalAll() { cv_.notify_all(); }

 private:
  std::condition_variable cv_;
};

}  // namespace sflb

#endif  // SFLB_COMMON_MUTEX_H_
