// Shutdown signals for the long-running binaries.
#ifndef SFLB_COMMON_SIGNALS_H_
#define SFLB_COMMON_SIGNALS_H_

#include <csignal>

#include "absl/time/time.h"

namespace sflb {

// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread and every thread it creates later,
// so that only WaitForSignal sees them. Call first thing in main(), before any thread starts.
void BlockTerminationSignals();

// Waits up to `timeout` for one of the blocked signals. Returns the signal number, or 0 on
// timeout.
int WaitForSignal(absl::Duration timeout);

}  // namespace sflb

#endif  // SFLB_COMMON_SIGNALS_H_
