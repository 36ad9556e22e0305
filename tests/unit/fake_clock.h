// FakeClock: a Clock for tests whose time only moves when the test says so.
#ifndef SFLB_TESTS_UNIT_FAKE_CLOCK_H_
#define SFLB_TESTS_UNIT_FAKE_CLOCK_H_

#include "absl/time/time.h"
#include "common/clock.h"
#include "common/mutex.h"

namespace sflb {

// Thread-safe: Now() and Advance() may be called from any thread.
class FakeClock : public Clock {
 public:
  // Starts at a fixed, recognisable instant (2026-01-01T00:00:00Z) unless told otherwise.
  explicit FakeClock(absl::Time start = absl::FromUnixSeconds(1767225600)) : now_(start) {}

  absl::Time Now() const override {
    MutexLock lock(&mu_);
    return now_;
  }

  // Moves the time forward (or backward, for a negative `d`).
  void Advance(absl::Duration d) {
    MutexLock lock(&mu_);
    now_ += d;
  }

  void Set(absl::Time t) {
    MutexLock lock(&mu_);
    now_ = t;
  }

 private:
  mutable Mutex mu_;
  absl::Time now_ ABSL_GUARDED_BY(mu_);
};

}  // namespace sflb

#endif  // SFLB_TESTS_UNIT_FAKE_CLOCK_H_
