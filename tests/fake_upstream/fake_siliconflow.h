// FakeSiliconFlow: an in-process HTTP server that imitates SiliconFlow's OpenAI-compatible API
// (https://api.siliconflow.cn/v1) for sflb's end-to-end tests and benchmarks.
//
// It answers the API shapes sflb relies on (chat completions, streamed or not, embeddings,
// models, user/info, and an echo for every other /v1/ path), records every API request, and
// injects faults per key / model / path prefix. Tests drive it over HTTP through the /_fake/
// control API (see README.md in this folder), so the same server works in-process from a gtest
// and as the `sflb-fake-upstream` binary.
//
// Thread safety: every public method may be called from any thread. All mutable state lives
// under one mutex; no lock is held across socket I/O or sleeps.
#ifndef SFLB_TESTS_FAKE_UPSTREAM_FAKE_SILICONFLOW_H_
#define SFLB_TESTS_FAKE_UPSTREAM_FAKE_SILICONFLOW_H_

#include <httplib.h>

#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/time/time.h"
#include "common/http_server.h"
#include "common/mutex.h"

namespace sflb::testing {

// Construction-time settings. Every field documents its default.
struct FakeOptions {
  // Worker threads of the HTTP server. A connection (and so every open SSE stream or stalled
  // request) holds one worker for its whole life, so this bounds concurrency. Default 64 suits
  // an in-process gtest; the binary defaults to 4096.
  int threads = 64;
  // Number of SSE data chunks in a streamed chat completion (before `data: [DONE]`), unless the
  // request overrides it with `x-fake-chunks`. Default 8.
  int chunks = 8;
  // Pause before each SSE chunk, unless overridden by `x-fake-chunk-delay-ms`. Default 20 ms.
  absl::Duration chunk_delay = absl::Milliseconds(20);
  // Socket read / write timeouts of the server. Default 60 s (httplib's own default is 5 s).
  absl::Duration read_timeout = absl::Seconds(60);
  absl::Duration write_timeout = absl::Seconds(60);
  // How long an idle keep-alive connection is kept open. Default 5 s.
  absl::Duration keep_alive_timeout = absl::Seconds(5);
  // Longest time a `stall` fault holds a request open. Default 10 minutes.
  absl::Duration max_stall = absl::Minutes(10);
  // Number of most recent API requests kept by the request log. Default 100,000.
  size_t max_recorded_requests = 100000;
  // Request bodies longer than this are truncated in the request log (not in the echo
  // endpoint). Default 1 MiB.
  size_t max_recorded_body_bytes = 1 << 20;
  // Largest accepted request body. Default 64 MiB.
  size_t max_request_body_bytes = 64 << 20;
  // Print one line per request to stderr. Default off.
  bool log_requests = false;
};

// One recorded API request (everything except /_fake/*).
struct RecordedRequest {
  uint64_t seq = 0;          // 1, 2, 3, ... in arrival order; never reused, even by Reset.
  std::string method;        // "GET", "POST", ...
  std::string path;          // Decoded path, without the query string.
  std::string target;        // The raw request target as sent (path?query).
  std::string query;         // Raw query string (after '?', not decoded); may be empty.
  httplib::Headers headers;  // All request headers as received.
  std::string body;          // Possibly truncated to max_recorded_body_bytes.
  bool body_truncated = false;
  std::string key;       // Bearer key; empty if none was sent.
  std::string model;     // "model" of a JSON body; empty if none.
  bool stream = false;   // JSON body had "stream": true.
  std::string trace_id;  // The x-siliconcloud-trace-id this request was answered with.
  int64_t received_unix_ms = 0;
  int status = 0;              // Answered status; 0 while still being processed or stalled.
  std::string fault;           // Action of the fault rule applied, if any ("status", "cut", ...).
  std::string stream_outcome;  // For SSE: "active", "completed", "cancelled" or "cut".
};

// A fault-injection rule, as posted to /_fake/faults.
struct FaultRule {
  enum class Action { kStatus, kStall, kCut, kLatency };

  int64_t id = 0;
  std::string key = "*";    // Bearer key to match, or "*".
  std::string model = "*";  // Model (from the JSON body) to match, or "*".
  std::string path = "*";   // Path prefix to match, or "*".
  Action action = Action::kStatus;
  int status = 429;  // kStatus: the status to answer.
  std::string body;  // kStatus: raw body; empty = SiliconFlow-style default.
  std::map<std::string, std::string> headers;  // kStatus: extra response headers.
  int64_t times = -1;                          // Applications left; -1 = forever, 0 = spent.
  int64_t delay_ms = 0;                        // kLatency: added delay.
  int64_t after_chunks = 0;  // kCut / kStall on streams: chunks sent before the fault.
};

class FakeSiliconFlow {
 public:
  // Configures routes; does not open any socket.
  explicit FakeSiliconFlow(FakeOptions options);
  // Stops the server. The thread running ListenAfterBind() must have returned (joined) before
  // the object is destroyed.
  ~FakeSiliconFlow();

  FakeSiliconFlow(const FakeSiliconFlow&) = delete;
  FakeSiliconFlow& operator=(const FakeSiliconFlow&) = delete;

  // Binds and listens on host:port; port 0 picks an ephemeral port. Connections are queued by
  // the kernel from here on. Returns the bound port, or -1 on failure. Call once.
  int BindToPort(const std::string& host, int port);

  // Serves until Stop(). Blocks; returns at once if Stop() was already called or nothing is
  // bound. Returns false if the server could not run.
  bool ListenAfterBind();

  // Wakes every sleeping, stalled or streaming handler, stops accepting and shuts down every
  // open connection (streams end abruptly), so ListenAfterBind() returns within milliseconds.
  // Idempotent; callable from any thread (not from a signal handler: use sigwait).
  void Stop();

  // True once the server is accepting connections (after ListenAfterBind started).
  bool IsRunning() const { return server_.is_running(); }

  // Clears the request log, statistics, fault rules and accounts, and releases stalled
  // requests. Same as POST /_fake/reset.
  void Reset();

  // Adds a fault rule (its id is assigned and returned). Same as POST /_fake/faults.
  int64_t AddFault(FaultRule rule);

  // Copies of recorded requests with seq > `since`, oldest first.
  std::vector<RecordedRequest> RequestsSince(uint64_t since) const;

 private:
  // Per-request context shared by the helpers of one API request.
  struct Call;
  // Shared state of one SSE stream; lives as long as the response's content provider.
  struct StreamState;

  // --- Route handlers (thin: parse, then call the helpers below). ---
  void HandleApi(const httplib::Request& req, httplib::Response& res);
  void HandleChatCompletions(Call& call, const httplib::Request& req, httplib::Response& res,
                             const FaultRule* fault);
  void HandleEmbeddings(Call& call, httplib::Response& res);
  void HandleModels(httplib::Response& res);
  void HandleUserInfo(Call& call, httplib::Response& res);
  void HandleEcho(const httplib::Request& req, httplib::Response& res);
  void HandleGetRequests(const httplib::Request& req, httplib::Response& res);
  void HandleGetStats(httplib::Response& res);
  void HandlePostFaults(const httplib::Request& req, httplib::Response& res);
  void HandlePostAccounts(const httplib::Request& req, httplib::Response& res);

  // --- Response helpers. ---
  void StartStream(Call& call, const httplib::Request& req, httplib::Response& res,
                   const FaultRule* fault);
  // Announces `body` with its full length but closes the connection after half of it.
  void SendCutBody(std::string body, const std::string& content_type, httplib::Response& res);
  // Answers `bytes` deterministic bytes ('a' + i % 26); with `cut`, only the first half.
  void SendLargeBody(size_t bytes, bool cut, httplib::Response& res);

  // --- State helpers. ---
  // Records the request and returns its seq.
  uint64_t Record(const httplib::Request& req, const Call& call);
  void SetRecordedStatus(uint64_t seq, int status, const std::string& fault);
  void SetStreamOutcome(uint64_t seq, const std::string& outcome);
  RecordedRequest* FindRecordLocked(uint64_t seq) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Returns a copy of the first matching rule with times != 0 (decrementing its times), or
  // nullptr.
  std::unique_ptr<FaultRule> TakeFault(const Call& call);
  std::string NextTraceId();
  void ResetLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Sleeps for `duration` unless Stop() (or a stall release, if `release_gen` is given) comes
  // first. Returns true if the whole duration passed.
  bool SleepFor(absl::Duration duration, const uint64_t* release_gen = nullptr);
  // Holds a stalled request without answering until Stop(), a release (Reset or DELETE
  // /_fake/faults) or options_.max_stall.
  void HoldStalledRequest();
  // Current stall-release generation: bumped by Reset and DELETE /_fake/faults.
  uint64_t ReleaseGeneration();

  const FakeOptions options_;
  // httplib::Server with a raised backlog and efficient, stoppable keep-alive waits.
  HttpServer server_;
  int port_ = -1;  // Set by BindToPort before any handler runs.

  mutable sflb::Mutex mu_;
  sflb::CondVar wake_;  // Signalled on Stop and on stall release.
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool listening_ ABSL_GUARDED_BY(mu_) = false;  // Inside ListenAfterBind().
  uint64_t release_gen_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t next_trace_ ABSL_GUARDED_BY(mu_) = 0;

  // Request log and counters.
  std::deque<RecordedRequest> requests_ ABSL_GUARDED_BY(mu_);
  uint64_t next_seq_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t total_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<std::string, uint64_t> by_key_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, uint64_t> by_model_ ABSL_GUARDED_BY(mu_);
  int64_t active_streams_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t completed_streams_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t cancelled_streams_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t cut_streams_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t stalled_requests_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t faults_applied_ ABSL_GUARDED_BY(mu_) = 0;

  // Fault rules, in insertion order.
  std::vector<FaultRule> faults_ ABSL_GUARDED_BY(mu_);
  int64_t next_fault_id_ ABSL_GUARDED_BY(mu_) = 1;

  // user/info overrides per key.
  struct Account {
    std::string account_id;
    std::string balance;
    int status = 200;
  };
  std::map<std::string, Account> accounts_ ABSL_GUARDED_BY(mu_);
};

// JSON form of a recorded request, as served by GET /_fake/requests.
nlohmann::json RecordedRequestToJson(const RecordedRequest& r);

}  // namespace sflb::testing

#endif  // SFLB_TESTS_FAKE_UPSTREAM_FAKE_SILICONFLOW_H_
