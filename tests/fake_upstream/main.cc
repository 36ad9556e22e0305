// sflb-fake-upstream: runs FakeSiliconFlow as a process for end-to-end tests and benchmarks.
//
// Prints exactly one line to stdout once it accepts connections:
//   {"event":"listening","port":<port>}
// and exits 0 on SIGTERM or SIGINT. See README.md for the API and the /_fake/ control API.
#include <pthread.h>
#include <signal.h>
#include <sys/resource.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <string>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "tests/fake_upstream/fake_siliconflow.h"

namespace sflb::testing {
namespace {

// Command-line settings.
struct MainOptions {
  std::string host = "127.0.0.1";  // --host: address to bind.
  int port = 0;                    // --port: 0 picks an ephemeral port.
  FakeOptions fake;                // --threads, --chunks, --chunk-delay-ms, --quiet.
};

constexpr char kUsage[] =
    "Usage: sflb-fake-upstream [flags]\n"
    "A simulated SiliconFlow API (/v1/...) with a fault-injection control API (/_fake/...).\n"
    "\n"
    "  --host=ADDR            address to bind (default 127.0.0.1)\n"
    "  --port=N               port; 0 = ephemeral (default 0)\n"
    "  --threads=N            server worker threads = max concurrent connections (default 4096)\n"
    "  --chunks=N             SSE chunks per streamed completion (default 8)\n"
    "  --chunk-delay-ms=N     pause before each SSE chunk (default 20)\n"
    "  --quiet                do not log requests to stderr\n"
    "  --help                 show this text\n"
    "\n"
    "Once listening, prints {\"event\":\"listening\",\"port\":N} on stdout.\n";

// Parses argv into `out`. Returns 0 to run, 1 on a usage error, 2 for --help.
int ParseFlags(int argc, char** argv, MainOptions* out) {
  out->fake.threads = 4096;
  out->fake.log_requests = true;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") return 2;
    if (arg == "--quiet") {
      out->fake.log_requests = false;
      continue;
    }
    std::string name = arg, value;
    bool has_value = false;
    if (size_t eq = arg.find('='); eq != std::string::npos) {
      name = arg.substr(0, eq);
      value = arg.substr(eq + 1);
      has_value = true;
    }
    auto take_value = [&]() {
      if (has_value) return true;
      if (i + 1 >= argc) return false;
      value = argv[++i];
      return true;
    };
    auto take_int = [&](int lo, int hi, int* dst) {
      int v = 0;
      if (!take_value() || !absl::SimpleAtoi(value, &v) || v < lo || v > hi) {
        std::fprintf(stderr, "sflb-fake-upstream: %s needs an integer in [%d, %d]\n", name.c_str(),
                     lo, hi);
        return false;
      }
      *dst = v;
      return true;
    };
    if (name == "--host") {
      if (!take_value() || value.empty()) {
        std::fprintf(stderr, "sflb-fake-upstream: --host needs a value\n");
        return 1;
      }
      out->host = value;
    } else if (name == "--port") {
      if (!take_int(0, 65535, &out->port)) return 1;
    } else if (name == "--threads") {
      if (!take_int(1, 100000, &out->fake.threads)) return 1;
    } else if (name == "--chunks") {
      if (!take_int(1, 1000000, &out->fake.chunks)) return 1;
    } else if (name == "--chunk-delay-ms") {
      int ms = 0;
      if (!take_int(0, 3600 * 1000, &ms)) return 1;
      out->fake.chunk_delay = absl::Milliseconds(ms);
    } else {
      std::fprintf(stderr, "sflb-fake-upstream: unknown flag '%s'\n%s", arg.c_str(), kUsage);
      return 1;
    }
  }
  return 0;
}

// Thousands of concurrent streams need thousands of sockets: lift the soft descriptor limit
// to the hard one.
void RaiseFileLimit() {
  struct rlimit lim;
  if (getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < lim.rlim_max) {
    lim.rlim_cur = lim.rlim_max;
    setrlimit(RLIMIT_NOFILE, &lim);
  }
}

int Run(const MainOptions& options) {
  // Block SIGINT/SIGTERM in every thread (the mask is inherited by threads created later) and
  // take them synchronously in one thread, where calling Stop() is safe.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  RaiseFileLimit();

  FakeSiliconFlow fake(options.fake);
  const int port = fake.BindToPort(options.host, options.port);
  if (port < 0) {
    std::fprintf(stderr, "sflb-fake-upstream: cannot bind %s:%d: %s\n", options.host.c_str(),
                 options.port, std::strerror(errno));
    return 1;
  }

  std::atomic<bool> done{false};
  std::atomic<bool> signalled{false};
  std::thread signal_thread([&] {
    const struct timespec poll = {0, 200 * 1000 * 1000};
    while (!done.load()) {
      const int sig = sigtimedwait(&signals, nullptr, &poll);
      if (sig == SIGINT || sig == SIGTERM) {
        signalled.store(true);
        fake.Stop();
        return;
      }
    }
  });

  // The socket already listens (the kernel queues connections), so announcing now is safe.
  std::printf("{\"event\":\"listening\",\"port\":%d}\n", port);
  std::fflush(stdout);

  const bool ok = fake.ListenAfterBind();
  done.store(true);
  signal_thread.join();
  if (signalled.load()) return 0;
  if (!ok) std::fprintf(stderr, "sflb-fake-upstream: server stopped with an error\n");
  return ok ? 0 : 1;
}

}  // namespace
}  // namespace sflb::testing

int main(int argc, char** argv) {
  sflb::testing::MainOptions options;
  switch (sflb::testing::ParseFlags(argc, argv, &options)) {
    case 0:
      return sflb::testing::Run(options);
    case 2:
      std::fputs(sflb::testing::kUsage, stdout);
      return 0;
    default:
      return 1;
  }
}
