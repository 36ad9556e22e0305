// Clock: the seam through which all time-dependent logic reads the time, so tests can advance
// a fake clock instead of sleeping.
#ifndef SFLB_COMMON_CLOCK_H_
#define SFLB_COMMON_CLOCK_H_

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace sflb {

// Thread-safe.
class Clock {
 public:
  virtual ~Clock() = default;
  virtual absl::Time Now() const = 0;
};

// The system's wall clock.
class RealClock : public Clock {
 public:
  absl::Time Now() const override { return absl::Now(); }
  // A process-wide instance; never destroyed.
  static Clock* Get() {
    static RealClock* clock = new RealClock();
    return clock;
  }
};

}  // namespace sflb

#endif  // SFLB_COMMON_CLOCK_H_
