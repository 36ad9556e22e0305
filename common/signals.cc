#include "common/signals.h"

#include <pthread.h>

#include <cerrno>
#include <ctime>

namespace sflb {
namespace {

sigset_t TerminationSet() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGHUP);
  return set;
}

}  // namespace

void BlockTerminationSignals() {
  sigset_t set = TerminationSet();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  // Writes to a closed socket must fail with EPIPE, not kill the process.
  signal(SIGPIPE, SIG_IGN);
}

int WaitForSignal(absl::Duration timeout) {
  sigset_t set = TerminationSet();
  timespec ts = absl::ToTimespec(timeout);
  for (;;) {
    int sig = sigtimedwait(&set, nullptr, &ts);
    if (sig > 0) return sig;
    if (errno == EINTR) continue;
    return 0;  // EAGAIN: timed out
  }
}

}  // namespace sflb
