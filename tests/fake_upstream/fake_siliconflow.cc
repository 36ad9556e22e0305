#include "tests/fake_upstream/fake_siliconflow.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <random>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"

namespace sflb::testing {
namespace {

using json = nlohmann::json;

constexpr char kTraceHeader[] = "x-siliconcloud-trace-id";
constexpr char kJson[] = "application/json";
// What SiliconFlow sends for streams. Note that cpp-httplib compresses any `text/*` type except
// exactly "text/event-stream" when the client accepts gzip/br, without flushing per write; see
// StartStream for how the fake avoids that.
constexpr char kEventStream[] = "text/event-stream; charset=utf-8";

// Slice length for waits that must also notice a client that went away.
constexpr absl::Duration kPollSlice = absl::Milliseconds(50);

// Accept queue length (the kernel caps it at net.core.somaxconn).
constexpr int kListenBacklog = 4096;

// Upper bound of x-fake-response-bytes (1 TiB): anything larger is surely a typo.
constexpr uint64_t kMaxResponseBytes = uint64_t{1} << 40;

const std::vector<std::string>& Models() {
  static const auto* const kModels = new std::vector<std::string>{
      "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-72B-Instruct", "deepseek-ai/DeepSeek-V3",
      "deepseek-ai/DeepSeek-R1",  "THUDM/glm-4-9b-chat",       "BAAI/bge-m3",
  };
  return *kModels;
}

// Serializes JSON without throwing on invalid UTF-8 (request bodies and headers are arbitrary
// bytes): bad sequences become U+FFFD.
std::string Dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

json ErrorJson(int code, absl::string_view message) {
  return json{{"code", code}, {"message", std::string(message)}, {"data", nullptr}};
}

void SetJson(httplib::Response& res, int status, const json& body) {
  res.status = status;
  res.set_content(Dump(body), kJson);
}

// SiliconFlow's body for an error status when a fault rule gives none.
std::string DefaultFaultBody(int status) {
  switch (status) {
    case 401:
      return Dump(ErrorJson(20001, "Invalid token"));
    case 403:
      return Dump(ErrorJson(30001, "Sorry, your account balance is insufficient"));
    case 429:
      return Dump(ErrorJson(
          50603, "Request was rejected due to rate limiting. Details: TPM limit reached."));
    default:
      if (status >= 500) return Dump(ErrorJson(50500, "Internal error"));
      return Dump(ErrorJson(status, "fake fault"));
  }
}

uint64_t Fnv1a(absl::string_view s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

std::string Hex(uint64_t v, int digits) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out(static_cast<size_t>(digits), '0');
  for (int i = digits - 1; i >= 0; --i, v >>= 4) out[static_cast<size_t>(i)] = kDigits[v & 0xf];
  return out;
}

std::string DefaultAccountId(absl::string_view key) {
  return absl::StrCat("acct-", Hex(Fnv1a(key), 12));
}

// The bearer token of `req`, or "" if there is none.
std::string BearerKey(const httplib::Request& req) {
  std::string auth = req.get_header_value("Authorization");
  absl::string_view v = absl::StripAsciiWhitespace(auth);
  if (v.size() < 7 || !absl::EqualsIgnoreCase(v.substr(0, 7), "bearer ")) return "";
  return std::string(absl::StripAsciiWhitespace(v.substr(7)));
}

// Integer header value clamped to [lo, hi], or `def` if absent or malformed.
int64_t HeaderInt(const httplib::Request& req, const char* name, int64_t def, int64_t lo,
                  int64_t hi) {
  if (!req.has_header(name)) return def;
  int64_t v = 0;
  if (!absl::SimpleAtoi(req.get_header_value(name), &v)) return def;
  return std::clamp(v, lo, hi);
}

json HeadersToJson(const httplib::Headers& headers) {
  json out = json::object();
  for (const auto& [name, value] : headers) {
    auto it = out.find(name);
    if (it == out.end()) {
      out[name] = value;
    } else {
      *it = absl::StrCat(it->get<std::string>(), ", ", value);
    }
  }
  return out;
}

// httplib adds the connection's addresses to req.headers as pseudo-headers (REMOTE_ADDR,
// REMOTE_PORT, LOCAL_ADDR, LOCAL_PORT), after the client's own headers. The client did not send
// them, so the request log and the echo leave them out (a client header of the same name stays).
httplib::Headers ClientHeaders(const httplib::Request& req) {
  httplib::Headers out = req.headers;
  const std::pair<const char*, std::string> injected[] = {
      {"REMOTE_ADDR", req.remote_addr},
      {"REMOTE_PORT", std::to_string(req.remote_port)},
      {"LOCAL_ADDR", req.local_addr},
      {"LOCAL_PORT", std::to_string(req.local_port)}};
  for (const auto& [name, value] : injected) {
    auto range = out.equal_range(name);
    if (range.first == range.second) continue;
    auto last = std::prev(range.second);
    if (last->second == value) out.erase(last);
  }
  return out;
}

std::string RawQuery(const std::string& target) {
  size_t q = target.find('?');
  return q == std::string::npos ? "" : target.substr(q + 1);
}

// Deterministic prompt size: about four characters per token, at least one token.
int64_t PromptTokens(const json& body) {
  int64_t chars = 0;
  if (body.is_object()) {
    auto it = body.find("messages");
    if (it != body.end() && it->is_array()) {
      for (const auto& m : *it) {
        if (!m.is_object()) continue;
        auto c = m.find("content");
        if (c != m.end())
          chars += static_cast<int64_t>(c->is_string() ? c->get_ref<const std::string&>().size()
                                                       : Dump(*c).size());
      }
    }
    auto in = body.find("input");
    if (in != body.end()) {
      chars += static_cast<int64_t>(in->is_string() ? in->get_ref<const std::string&>().size()
                                                    : Dump(*in).size());
    }
  }
  return std::max<int64_t>(1, (chars + 3) / 4);
}

json Usage(int64_t prompt, int64_t completion) {
  return json{{"prompt_tokens", prompt},
              {"completion_tokens", completion},
              {"total_tokens", prompt + completion}};
}

std::string TokenText(int64_t i) { return absl::StrCat("tok", i, " "); }

const char* ActionName(FaultRule::Action a) {
  switch (a) {
    case FaultRule::Action::kStatus:
      return "status";
    case FaultRule::Action::kStall:
      return "stall";
    case FaultRule::Action::kCut:
      return "cut";
    case FaultRule::Action::kLatency:
      return "latency";
  }
  return "?";
}

json FaultToJson(const FaultRule& f) {
  return json{{"id", f.id},
              {"key", f.key},
              {"model", f.model},
              {"path", f.path},
              {"action", ActionName(f.action)},
              {"status", f.status},
              {"body", f.body},
              {"headers", f.headers},
              {"times", f.times},
              {"delay_ms", f.delay_ms},
              {"after_chunks", f.after_chunks}};
}

// Parses a /_fake/faults body. Returns false and sets `error` if it is malformed.
bool ParseFault(const json& j, FaultRule* rule, std::string* error) {
  if (!j.is_object()) {
    *error = "body must be a JSON object";
    return false;
  }
  auto str = [&](const char* name, std::string* out) {
    auto it = j.find(name);
    if (it == j.end() || it->is_null()) return true;
    if (!it->is_string()) {
      *error = absl::StrCat("'", name, "' must be a string");
      return false;
    }
    *out = it->get<std::string>();
    return true;
  };
  auto num = [&](const char* name, int64_t* out) {
    auto it = j.find(name);
    if (it == j.end() || it->is_null()) return true;
    if (!it->is_number_integer()) {
      *error = absl::StrCat("'", name, "' must be an integer");
      return false;
    }
    *out = it->get<int64_t>();
    return true;
  };
  std::string action = "status";
  int64_t status = rule->status;
  if (!str("key", &rule->key) || !str("model", &rule->model) || !str("path", &rule->path) ||
      !str("action", &action) || !num("status", &status) || !num("times", &rule->times) ||
      !num("delay_ms", &rule->delay_ms) || !num("after_chunks", &rule->after_chunks)) {
    return false;
  }
  if (action == "status") {
    rule->action = FaultRule::Action::kStatus;
  } else if (action == "stall") {
    rule->action = FaultRule::Action::kStall;
  } else if (action == "cut") {
    rule->action = FaultRule::Action::kCut;
  } else if (action == "latency") {
    rule->action = FaultRule::Action::kLatency;
  } else {
    *error = "'action' must be one of status, stall, cut, latency";
    return false;
  }
  if (status < 100 || status > 599) {
    *error = "'status' must be in [100, 599]";
    return false;
  }
  rule->status = static_cast<int>(status);
  if (rule->times < -1) rule->times = -1;
  rule->delay_ms = std::max<int64_t>(0, rule->delay_ms);
  rule->after_chunks = std::max<int64_t>(0, rule->after_chunks);
  if (auto it = j.find("body"); it != j.end() && !it->is_null()) {
    // A raw string is sent as is; any other JSON value is serialized.
    rule->body = it->is_string() ? it->get<std::string>() : Dump(*it);
  }
  if (auto it = j.find("headers"); it != j.end() && !it->is_null()) {
    if (!it->is_object()) {
      *error = "'headers' must be an object";
      return false;
    }
    for (const auto& [name, value] : it->items()) {
      rule->headers[name] = value.is_string() ? value.get<std::string>() : Dump(value);
    }
  }
  return true;
}

bool Matches(const std::string& pattern, const std::string& value) {
  return pattern == "*" || pattern == value;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Per-request context.

struct FakeSiliconFlow::Call {
  uint64_t seq = 0;
  std::string trace_id;
  std::string path;
  std::string key;
  std::string model;
  bool stream = false;
  bool body_is_json = false;  // The body parsed as JSON.
  json body;                  // Parsed body; null if empty or malformed.
};

// State of one SSE stream. Only the connection's worker thread touches it (the content
// provider and then the resource releaser run there, one after the other), so no lock.
struct FakeSiliconFlow::StreamState {
  uint64_t seq = 0;
  std::string id;
  std::string model;
  int64_t created = 0;
  int64_t chunks = 0;
  absl::Duration chunk_delay;
  absl::Duration first_chunk_delay;
  int64_t prompt_tokens = 0;
  int64_t cut_after = -1;    // Close the connection after this many chunks (-1: never).
  int64_t stall_after = -1;  // Go silent after this many chunks (-1: never).
  uint64_t release_gen = 0;  // Stall-release generation at stream start.
  absl::Duration max_stall;

  bool completed = false;  // [DONE] and the terminating chunk were handed to httplib.
  bool cut = false;        // A cut (or an ended stall) closed the stream on purpose.
};

// ---------------------------------------------------------------------------------------------
// Construction and lifecycle.

FakeSiliconFlow::FakeSiliconFlow(FakeOptions options) : options_(std::move(options)) {
  {
    // A per-instance random prefix keeps trace ids unique across several fakes in one test.
    std::random_device rd;
    MutexLock lock(&mu_);
    next_trace_ = (static_cast<uint64_t>(rd()) << 32 | rd()) & 0xffffffff00000000ull;
  }
  const int threads = std::max(1, options_.threads);
  server_.new_task_queue = [threads] {
    return new httplib::ThreadPool(static_cast<size_t>(threads));
  };
  auto secs = [](absl::Duration d) { return absl::ToChronoMilliseconds(d); };
  server_.set_read_timeout(secs(options_.read_timeout));
  server_.set_write_timeout(secs(options_.write_timeout));
  server_.set_keep_alive_timeout(
      std::max<time_t>(1, absl::ToInt64Seconds(options_.keep_alive_timeout)));
  server_.set_keep_alive_max_count(1000000);
  server_.set_payload_max_length(options_.max_request_body_bytes);

  // Every response, including 404s and control answers, carries a fresh trace id.
  server_.set_pre_routing_handler([this](const httplib::Request&, httplib::Response& res) {
    res.set_header(kTraceHeader, NextTraceId());
    return httplib::Server::HandlerResponse::Unhandled;
  });
  if (options_.log_requests) {
    server_.set_logger([](const httplib::Request& req, const httplib::Response& res) {
      std::fprintf(stderr, "fake-upstream: %s %s -> %d\n", req.method.c_str(), req.target.c_str(),
                   res.status);
    });
  }

  // Control API.
  server_.Get("/_fake/requests", [this](const httplib::Request& req, httplib::Response& res) {
    HandleGetRequests(req, res);
  });
  server_.Delete("/_fake/requests", [this](const httplib::Request&, httplib::Response& res) {
    {
      MutexLock lock(&mu_);
      requests_.clear();
    }
    SetJson(res, 200, json{{"ok", true}});
  });
  server_.Get("/_fake/stats",
              [this](const httplib::Request&, httplib::Response& res) { HandleGetStats(res); });
  server_.Post("/_fake/faults", [this](const httplib::Request& req, httplib::Response& res) {
    HandlePostFaults(req, res);
  });
  server_.Get("/_fake/faults", [this](const httplib::Request&, httplib::Response& res) {
    json rules = json::array();
    {
      MutexLock lock(&mu_);
      for (const FaultRule& f : faults_) rules.push_back(FaultToJson(f));
    }
    SetJson(res, 200, json{{"faults", std::move(rules)}});
  });
  server_.Delete("/_fake/faults", [this](const httplib::Request&, httplib::Response& res) {
    {
      MutexLock lock(&mu_);
      faults_.clear();
      ++release_gen_;  // Held requests end: their rule is gone.
    }
    wake_.SignalAll();
    SetJson(res, 200, json{{"ok", true}});
  });
  server_.Post("/_fake/accounts", [this](const httplib::Request& req, httplib::Response& res) {
    HandlePostAccounts(req, res);
  });
  server_.Post("/_fake/reset", [this](const httplib::Request&, httplib::Response& res) {
    Reset();
    SetJson(res, 200, json{{"ok", true}});
  });

  // The API: one entry point for every method, so auth, recording and faults run first.
  auto api = [this](const httplib::Request& req, httplib::Response& res) { HandleApi(req, res); };
  server_.Get("/v1/.*", api);
  server_.Post("/v1/.*", api);
  server_.Put("/v1/.*", api);
  server_.Patch("/v1/.*", api);
  server_.Delete("/v1/.*", api);
  server_.Options("/v1/.*", api);

  // Everything else: JSON 404 (routes are tried in registration order).
  auto not_found = [](const httplib::Request& req, httplib::Response& res) {
    SetJson(res, 404,
            json{{"code", 404},
                 {"message", absl::StrCat("no route for ", req.path)},
                 {"data", nullptr}});
  };
  server_.Get(".*", not_found);
  server_.Post(".*", not_found);
  server_.Put(".*", not_found);
  server_.Patch(".*", not_found);
  server_.Delete(".*", not_found);
  server_.Options(".*", not_found);
}

FakeSiliconFlow::~FakeSiliconFlow() { Stop(); }

int FakeSiliconFlow::BindToPort(const std::string& host, int port) {
  if (port == 0) {
    port_ = server_.bind_to_any_port(host);
  } else {
    port_ = server_.bind_to_port(host, port) ? port : -1;
  }
  if (port_ < 0) {
    port_ = -1;
  } else if (!server_.RaiseBacklog(kListenBacklog)) {
    std::fprintf(stderr, "fake-upstream: could not raise the listen backlog: %s\n",
                 std::strerror(errno));
  }
  return port_;
}

bool FakeSiliconFlow::ListenAfterBind() {
  {
    MutexLock lock(&mu_);
    if (stopping_ || port_ < 0) return false;
    listening_ = true;
  }
  bool ok = server_.listen_after_bind();
  MutexLock lock(&mu_);
  listening_ = false;
  return ok;
}

void FakeSiliconFlow::Stop() {
  bool must_stop = false;
  {
    MutexLock lock(&mu_);
    if (!stopping_) must_stop = listening_;
    stopping_ = true;
  }
  wake_.SignalAll();
  if (!must_stop) return;
  // httplib's stop() does nothing until listen_after_bind() has marked the server running,
  // which happens just after ListenAfterBind() set listening_: wait (briefly) for that.
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (!server_.is_running() && absl::Now() < deadline) {
    {
      MutexLock lock(&mu_);
      if (!listening_) return;  // It already returned on its own.
    }
    absl::SleepFor(absl::Milliseconds(1));
  }
  server_.stop();              // No new connections.
  server_.CloseConnections();  // End idle keep-alive waits and anything still in flight.
}

void FakeSiliconFlow::Reset() {
  {
    MutexLock lock(&mu_);
    ResetLocked();
  }
  wake_.SignalAll();
}

void FakeSiliconFlow::ResetLocked() {
  requests_.clear();
  total_ = 0;
  by_key_.clear();
  by_model_.clear();
  // active_streams_ and stalled_requests_ describe live connections: they are not reset.
  completed_streams_ = 0;
  cancelled_streams_ = 0;
  cut_streams_ = 0;
  faults_applied_ = 0;
  faults_.clear();
  accounts_.clear();
  ++release_gen_;
}

int64_t FakeSiliconFlow::AddFault(FaultRule rule) {
  MutexLock lock(&mu_);
  rule.id = next_fault_id_++;
  faults_.push_back(std::move(rule));
  return faults_.back().id;
}

std::vector<RecordedRequest> FakeSiliconFlow::RequestsSince(uint64_t since) const {
  MutexLock lock(&mu_);
  std::vector<RecordedRequest> out;
  for (const RecordedRequest& r : requests_) {
    if (r.seq > since) out.push_back(r);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Waiting.

bool FakeSiliconFlow::SleepFor(absl::Duration duration, const uint64_t* release_gen) {
  const absl::Time deadline = absl::Now() + duration;
  MutexLock lock(&mu_);
  while (true) {
    if (stopping_) return false;
    if (release_gen != nullptr && release_gen_ != *release_gen) return false;
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) return true;
    wake_.WaitWithTimeout(&mu_, left);
  }
}

void FakeSiliconFlow::HoldStalledRequest() {
  // The worker thread stays busy meanwhile, like a hung upstream connection would.
  uint64_t gen = 0;
  {
    MutexLock lock(&mu_);
    gen = release_gen_;
    ++stalled_requests_;
  }
  SleepFor(options_.max_stall, &gen);
  MutexLock lock(&mu_);
  --stalled_requests_;
}

uint64_t FakeSiliconFlow::ReleaseGeneration() {
  MutexLock lock(&mu_);
  return release_gen_;
}

std::string FakeSiliconFlow::NextTraceId() {
  MutexLock lock(&mu_);
  return absl::StrCat("fake-", Hex(next_trace_++, 16));
}

// ---------------------------------------------------------------------------------------------
// Recording and faults.

uint64_t FakeSiliconFlow::Record(const httplib::Request& req, const Call& call) {
  // Build the entry before taking the lock: headers and body can be large.
  RecordedRequest r;
  r.method = req.method;
  r.path = req.path;
  r.target = req.target;
  r.query = RawQuery(req.target);
  r.headers = ClientHeaders(req);
  r.body_truncated = req.body.size() > options_.max_recorded_body_bytes;
  r.body = r.body_truncated ? req.body.substr(0, options_.max_recorded_body_bytes) : req.body;
  r.key = call.key;
  r.model = call.model;
  r.stream = call.stream;
  r.trace_id = call.trace_id;
  r.received_unix_ms = absl::ToUnixMillis(absl::Now());

  MutexLock lock(&mu_);
  r.seq = next_seq_++;
  ++total_;
  if (!r.key.empty()) ++by_key_[r.key];
  if (!r.model.empty()) ++by_model_[r.model];
  const uint64_t seq = r.seq;
  requests_.push_back(std::move(r));
  while (requests_.size() > std::max<size_t>(1, options_.max_recorded_requests)) {
    requests_.pop_front();
  }
  return seq;
}

RecordedRequest* FakeSiliconFlow::FindRecordLocked(uint64_t seq) {
  // Sequence numbers in the log are consecutive, so the entry's position is computable.
  if (requests_.empty() || seq < requests_.front().seq) return nullptr;
  const uint64_t index = seq - requests_.front().seq;
  if (index >= requests_.size()) return nullptr;
  return &requests_[static_cast<size_t>(index)];
}

void FakeSiliconFlow::SetRecordedStatus(uint64_t seq, int status, const std::string& fault) {
  MutexLock lock(&mu_);
  if (RecordedRequest* r = FindRecordLocked(seq)) {
    r->status = status;
    if (!fault.empty()) r->fault = fault;
  }
}

void FakeSiliconFlow::SetStreamOutcome(uint64_t seq, const std::string& outcome) {
  MutexLock lock(&mu_);
  if (RecordedRequest* r = FindRecordLocked(seq)) r->stream_outcome = outcome;
}

std::unique_ptr<FaultRule> FakeSiliconFlow::TakeFault(const Call& call) {
  MutexLock lock(&mu_);
  for (FaultRule& f : faults_) {
    if (f.times == 0 || !Matches(f.key, call.key) || !Matches(f.model, call.model)) continue;
    if (f.path != "*" && !absl::StartsWith(call.path, f.path)) continue;
    if (f.times > 0) --f.times;
    ++faults_applied_;
    return std::make_unique<FaultRule>(f);
  }
  return nullptr;
}

// ---------------------------------------------------------------------------------------------
// The API.

void FakeSiliconFlow::HandleApi(const httplib::Request& req, httplib::Response& res) {
  Call call;
  call.trace_id = res.get_header_value(kTraceHeader);
  call.path = req.path;
  call.key = BearerKey(req);
  if (!req.body.empty()) {
    call.body = json::parse(req.body, nullptr, /*allow_exceptions=*/false);
    call.body_is_json = !call.body.is_discarded();
    if (!call.body_is_json) call.body = nullptr;
  }
  if (call.body.is_object()) {
    auto m = call.body.find("model");
    if (m != call.body.end() && m->is_string()) call.model = m->get<std::string>();
    auto s = call.body.find("stream");
    call.stream = s != call.body.end() && s->is_boolean() && s->get<bool>();
  }
  call.seq = Record(req, call);

  // Auth runs before everything else, as on SiliconFlow.
  if (call.key.empty()) {
    SetJson(res, 401, ErrorJson(20001, "Invalid token"));
    SetRecordedStatus(call.seq, 401, "");
    return;
  }

  std::unique_ptr<FaultRule> fault = TakeFault(call);
  const std::string fault_name = fault ? ActionName(fault->action) : "";
  const bool is_chat = req.method == "POST" && req.path == "/v1/chat/completions";
  const bool sse = is_chat && call.stream && !req.has_header("x-fake-response-bytes");

  if (fault) {
    switch (fault->action) {
      case FaultRule::Action::kStatus: {
        res.status = fault->status;
        std::string content_type = kJson;
        for (const auto& [name, value] : fault->headers) {
          if (absl::EqualsIgnoreCase(name, "Content-Type")) {
            content_type = value;  // set_content() below sets the header.
          } else {
            res.set_header(name, value);
          }
        }
        res.set_content(fault->body.empty() ? DefaultFaultBody(fault->status) : fault->body,
                        content_type);
        SetRecordedStatus(call.seq, fault->status, fault_name);
        return;
      }
      case FaultRule::Action::kLatency:
        if (!SleepFor(absl::Milliseconds(fault->delay_ms))) {
          SetJson(res, 503, ErrorJson(50503, "fake upstream stopping"));
          SetRecordedStatus(call.seq, 503, fault_name);
          return;
        }
        break;
      case FaultRule::Action::kStall:
        if (sse && fault->after_chunks > 0) break;  // StartStream goes silent mid-stream.
        HoldStalledRequest();
        SetJson(res, 503, ErrorJson(50503, "fake stall ended"));
        SetRecordedStatus(call.seq, 503, fault_name);
        return;
      case FaultRule::Action::kCut:
        break;  // Applied below, once the normal response exists.
    }
  }

  if (req.has_header("x-fake-response-bytes")) {
    uint64_t bytes = 0;
    if (!absl::SimpleAtoi(req.get_header_value("x-fake-response-bytes"), &bytes) ||
        bytes > kMaxResponseBytes) {
      SetJson(res, 400, ErrorJson(20015, "x-fake-response-bytes must be an integer <= 2^40"));
    } else {
      SendLargeBody(static_cast<size_t>(bytes), fault && fault->action == FaultRule::Action::kCut,
                    res);
    }
    SetRecordedStatus(call.seq, res.status, fault_name);
    return;
  }

  if (is_chat) {
    HandleChatCompletions(call, req, res, fault.get());
  } else if (req.method == "POST" && req.path == "/v1/embeddings") {
    HandleEmbeddings(call, res);
  } else if ((req.method == "GET" || req.method == "HEAD") && req.path == "/v1/models") {
    HandleModels(res);
  } else if ((req.method == "GET" || req.method == "HEAD") && req.path == "/v1/user/info") {
    HandleUserInfo(call, res);
  } else {
    HandleEcho(req, res);
  }

  // A cut on a non-streamed answer: send half of the body, then close the connection.
  if (fault && fault->action == FaultRule::Action::kCut && !res.content_provider_) {
    std::string content_type = res.get_header_value("Content-Type");
    res.headers.erase("Content-Type");
    SendCutBody(std::move(res.body), content_type, res);
  }
  SetRecordedStatus(call.seq, res.status, fault_name);
}

void FakeSiliconFlow::HandleChatCompletions(Call& call, const httplib::Request& req,
                                            httplib::Response& res, const FaultRule* fault) {
  if (!call.body_is_json || !call.body.is_object()) {
    SetJson(res, 400, ErrorJson(20015, "The parameter is invalid. Please check again."));
    return;
  }
  if (call.model.empty()) {
    SetJson(res, 400, ErrorJson(20015, "The parameter is invalid: 'model' is required."));
    return;
  }
  if (call.stream) {
    StartStream(call, req, res, fault);
    return;
  }
  const int64_t chunks = HeaderInt(req, "x-fake-chunks", options_.chunks, 1, 1000000);
  std::string content;
  for (int64_t i = 0; i < chunks; ++i) content += TokenText(i);
  json message = {{"role", "assistant"}, {"content", std::move(content)}};
  json choice = {{"index", 0}, {"message", std::move(message)}, {"finish_reason", "stop"}};
  json body = {{"id", absl::StrCat("chatcmpl-", call.trace_id)},
               {"object", "chat.completion"},
               {"created", absl::ToUnixSeconds(absl::Now())},
               {"model", call.model},
               {"choices", json::array({std::move(choice)})},
               {"usage", Usage(PromptTokens(call.body), chunks)},
               {"system_fingerprint", ""}};
  SetJson(res, 200, body);
}

void FakeSiliconFlow::StartStream(Call& call, const httplib::Request& req, httplib::Response& res,
                                  const FaultRule* fault) {
  auto st = std::make_shared<StreamState>();
  st->seq = call.seq;
  st->id = absl::StrCat("chatcmpl-", call.trace_id);
  st->model = call.model;
  st->created = absl::ToUnixSeconds(absl::Now());
  st->chunks = HeaderInt(req, "x-fake-chunks", options_.chunks, 1, 1000000);
  const int64_t delay_ms =
      HeaderInt(req, "x-fake-chunk-delay-ms", absl::ToInt64Milliseconds(options_.chunk_delay), 0,
                3600 * 1000);
  st->chunk_delay = absl::Milliseconds(delay_ms);
  st->first_chunk_delay =
      absl::Milliseconds(HeaderInt(req, "x-fake-first-chunk-delay-ms", delay_ms, 0, 3600 * 1000));
  st->prompt_tokens = PromptTokens(call.body);
  st->max_stall = options_.max_stall;
  st->release_gen = ReleaseGeneration();
  if (fault != nullptr && fault->action == FaultRule::Action::kCut) {
    st->cut_after = std::min(fault->after_chunks, st->chunks);
  }
  if (fault != nullptr && fault->action == FaultRule::Action::kStall) {
    st->stall_after = std::min(fault->after_chunks, st->chunks);
  }

  // cpp-httplib compresses every `text/*` response except exactly "text/event-stream" when the
  // request's Accept-Encoding names gzip or br, and its compressor does not flush per write: the
  // whole stream would arrive at the end. SiliconFlow's real content type has "; charset=utf-8",
  // so instead the fake forgets the Accept-Encoding header (already recorded above). httplib
  // decides the encoding after this handler returns, from this same Request object, which
  // httplib owns as a non-const local: casting const away here is well defined.
  const_cast<httplib::Request&>(req).headers.erase("Accept-Encoding");

  {
    MutexLock lock(&mu_);
    ++active_streams_;
  }
  SetStreamOutcome(call.seq, "active");
  res.status = 200;
  res.set_header("Cache-Control", "no-cache");

  auto provider = [this, st](size_t /*offset*/, httplib::DataSink& sink) -> bool {
    // Waits `d` in slices, noticing Stop and a client that left. With `release` set, a stall
    // release also ends the wait. Returns true if the full time passed.
    auto wait = [&](absl::Duration d, bool release) {
      const absl::Time deadline = absl::Now() + d;
      while (true) {
        const absl::Duration left = deadline - absl::Now();
        if (left <= absl::ZeroDuration()) return true;
        if (!SleepFor(std::min(left, kPollSlice), release ? &st->release_gen : nullptr)) {
          return false;
        }
        if (!sink.is_writable()) return false;
      }
    };
    auto write = [&](const std::string& s) {
      return sink.is_writable() && sink.write(s.data(), s.size());
    };

    // Step i sends chunk i; step `chunks` sends [DONE]. Faults strike before their step.
    for (int64_t i = 0; i <= st->chunks; ++i) {
      if (i == st->cut_after) {
        st->cut = true;
        return false;  // httplib then closes the connection without the terminating chunk.
      }
      if (i == st->stall_after) {
        wait(st->max_stall, /*release=*/true);
        st->cut = sink.is_writable();  // Ended by release, Stop or time: not by the client.
        return false;
      }
      if (i == st->chunks) break;
      if (!wait(i == 0 ? st->first_chunk_delay : st->chunk_delay, false)) return false;

      const bool last = i + 1 == st->chunks;
      json delta = {{"role", "assistant"}, {"content", TokenText(i)}};
      json choice = {{"index", 0}, {"delta", std::move(delta)}};
      choice["finish_reason"] = last ? json("stop") : json(nullptr);
      json chunk = {{"id", st->id},
                    {"object", "chat.completion.chunk"},
                    {"created", st->created},
                    {"model", st->model},
                    {"choices", json::array({std::move(choice)})},
                    {"system_fingerprint", ""},
                    {"x_fake_chunk_index", i}};
      if (last) chunk["usage"] = Usage(st->prompt_tokens, st->chunks);
      if (!write(absl::StrCat("data: ", Dump(chunk), "\n\n"))) return false;
    }
    if (!write("data: [DONE]\n\n")) return false;
    sink.done();
    st->completed = true;
    return true;
  };

  // Runs exactly once, when httplib destroys the Response (after the provider finished, or
  // without it ever running if the client left before the headers were sent).
  auto releaser = [this, st](bool success) {
    std::string outcome;
    {
      MutexLock lock(&mu_);
      --active_streams_;
      if (st->completed && success) {
        ++completed_streams_;
        outcome = "completed";
      } else if (st->cut) {
        ++cut_streams_;
        outcome = "cut";
      } else {
        ++cancelled_streams_;
        outcome = "cancelled";
      }
    }
    SetStreamOutcome(st->seq, outcome);
  };

  res.set_chunked_content_provider(kEventStream, std::move(provider), std::move(releaser));
}

void FakeSiliconFlow::HandleEmbeddings(Call& call, httplib::Response& res) {
  if (!call.body_is_json || !call.body.is_object()) {
    SetJson(res, 400, ErrorJson(20015, "The parameter is invalid. Please check again."));
    return;
  }
  std::vector<std::string> inputs;
  auto in = call.body.find("input");
  if (in != call.body.end() && in->is_string()) {
    inputs.push_back(in->get<std::string>());
  } else if (in != call.body.end() && in->is_array()) {
    for (const auto& item : *in)
      inputs.push_back(item.is_string() ? item.get<std::string>() : Dump(item));
  } else {
    SetJson(res, 400, ErrorJson(20015, "The parameter is invalid: 'input' is required."));
    return;
  }
  json data = json::array();
  for (size_t i = 0; i < inputs.size(); ++i) {
    // Eight dimensions, one per byte of the input's hash, scaled to [-1, 1].
    uint64_t h = Fnv1a(inputs[i]);
    json vec = json::array();
    for (int d = 0; d < 8; ++d, h >>= 8) {
      vec.push_back(static_cast<double>(h & 0xff) / 127.5 - 1.0);
    }
    data.push_back(json{{"object", "embedding"}, {"embedding", std::move(vec)}, {"index", i}});
  }
  const int64_t prompt = PromptTokens(call.body);
  SetJson(res, 200,
          json{{"object", "list"},
               {"data", std::move(data)},
               {"model", call.model},
               {"usage", json{{"prompt_tokens", prompt}, {"total_tokens", prompt}}}});
}

void FakeSiliconFlow::HandleModels(httplib::Response& res) {
  json data = json::array();
  for (const std::string& id : Models()) {
    data.push_back(json{{"id", id}, {"object", "model"}, {"created", 0}, {"owned_by", ""}});
  }
  SetJson(res, 200, json{{"object", "list"}, {"data", std::move(data)}});
}

void FakeSiliconFlow::HandleUserInfo(Call& call, httplib::Response& res) {
  Account account{DefaultAccountId(call.key), "10.00", 200};
  {
    MutexLock lock(&mu_);
    auto it = accounts_.find(call.key);
    if (it != accounts_.end()) account = it->second;
  }
  if (account.status == 410) {
    SetJson(res, 410, json{{"code", 410}, {"message", "gone"}});
    return;
  }
  if (account.status != 200) {
    SetJson(res, account.status, ErrorJson(account.status, "fake account status"));
    return;
  }
  json data = {{"id", account.account_id},
               {"name", absl::StrCat("fake-user-", account.account_id)},
               {"image", ""},
               {"email", ""},
               {"isAdmin", false},
               {"balance", account.balance},
               {"status", "normal"},
               {"introduction", ""},
               {"role", ""},
               {"chargeBalance", "0.00"},
               {"totalBalance", account.balance}};
  SetJson(res, 200,
          json{{"code", 20000}, {"message", "OK"}, {"status", true}, {"data", std::move(data)}});
}

void FakeSiliconFlow::HandleEcho(const httplib::Request& req, httplib::Response& res) {
  json echo = {{"method", req.method},
               {"path", req.path},
               {"target", req.target},
               {"query", RawQuery(req.target)},
               {"headers", HeadersToJson(ClientHeaders(req))},
               {"body", req.body}};
  SetJson(res, 200, json{{"echo", std::move(echo)}});
}

void FakeSiliconFlow::SendCutBody(std::string body, const std::string& content_type,
                                  httplib::Response& res) {
  auto shared = std::make_shared<const std::string>(std::move(body));
  const size_t half = shared->size() / 2;
  res.set_content_provider(
      shared->size(), content_type.empty() ? kJson : content_type,
      [shared, half](size_t offset, size_t /*length*/, httplib::DataSink& sink) {
        if (offset >= half) return false;  // Close the connection, body incomplete.
        return sink.write(shared->data() + offset, half - offset);
      });
}

void FakeSiliconFlow::SendLargeBody(size_t bytes, bool cut, httplib::Response& res) {
  res.status = 200;
  const size_t stop_at = cut ? bytes / 2 : bytes;
  res.set_content_provider(
      bytes, "application/octet-stream",
      [stop_at](size_t offset, size_t length, httplib::DataSink& sink) {
        if (offset >= stop_at) return false;
        // Byte i of the body is 'a' + i % 26; write up to 64 KiB per call.
        const size_t n = std::min<size_t>({length, stop_at - offset, 64 * 1024});
        std::string buf(n, '\0');
        for (size_t i = 0; i < n; ++i) buf[i] = static_cast<char>('a' + (offset + i) % 26);
        return sink.write(buf.data(), buf.size());
      });
}

// ---------------------------------------------------------------------------------------------
// Control API.

nlohmann::json RecordedRequestToJson(const RecordedRequest& r) {
  return json{{"seq", r.seq},
              {"method", r.method},
              {"path", r.path},
              {"target", r.target},
              {"query", r.query},
              {"headers", HeadersToJson(r.headers)},
              {"body", r.body},
              {"body_truncated", r.body_truncated},
              {"key", r.key},
              {"model", r.model},
              {"stream", r.stream},
              {"trace_id", r.trace_id},
              {"received_unix_ms", r.received_unix_ms},
              {"status", r.status},
              {"fault", r.fault},
              {"stream_outcome", r.stream_outcome}};
}

void FakeSiliconFlow::HandleGetRequests(const httplib::Request& req, httplib::Response& res) {
  uint64_t since = 0;
  if (req.has_param("since") && !absl::SimpleAtoi(req.get_param_value("since"), &since)) {
    SetJson(res, 400, ErrorJson(400, "'since' must be a non-negative integer"));
    return;
  }
  json list = json::array();
  for (const RecordedRequest& r : RequestsSince(since)) list.push_back(RecordedRequestToJson(r));
  SetJson(res, 200, json{{"requests", std::move(list)}});
}

void FakeSiliconFlow::HandleGetStats(httplib::Response& res) {
  json stats;
  {
    MutexLock lock(&mu_);
    stats = json{{"total", total_},
                 {"by_key", by_key_},
                 {"by_model", by_model_},
                 {"active_streams", active_streams_},
                 {"completed_streams", completed_streams_},
                 {"cancelled_streams", cancelled_streams_},
                 {"cut_streams", cut_streams_},
                 {"stalled_requests", stalled_requests_},
                 {"faults_applied", faults_applied_},
                 {"recorded", requests_.size()},
                 {"last_seq", next_seq_ - 1}};
  }
  SetJson(res, 200, stats);
}

void FakeSiliconFlow::HandlePostFaults(const httplib::Request& req, httplib::Response& res) {
  json j = json::parse(req.body, nullptr, /*allow_exceptions=*/false);
  FaultRule rule;
  std::string error;
  if (j.is_discarded()) {
    SetJson(res, 400, ErrorJson(400, "body is not valid JSON"));
    return;
  }
  if (!ParseFault(j, &rule, &error)) {
    SetJson(res, 400, ErrorJson(400, error));
    return;
  }
  SetJson(res, 200, json{{"id", AddFault(std::move(rule))}});
}

void FakeSiliconFlow::HandlePostAccounts(const httplib::Request& req, httplib::Response& res) {
  json j = json::parse(req.body, nullptr, /*allow_exceptions=*/false);
  auto key = j.is_object() ? j.find("key") : j.end();
  if (!j.is_object() || key == j.end() || !key->is_string() ||
      key->get_ref<const std::string&>().empty()) {
    SetJson(res, 400, ErrorJson(400, "body must be an object with a non-empty string 'key'"));
    return;
  }
  const std::string k = key->get<std::string>();
  MutexLock lock(&mu_);
  auto [it, inserted] = accounts_.try_emplace(k, Account{DefaultAccountId(k), "10.00", 200});
  Account& a = it->second;
  if (auto f = j.find("account"); f != j.end() && f->is_string())
    a.account_id = f->get<std::string>();
  if (auto f = j.find("balance"); f != j.end()) {
    a.balance = f->is_string() ? f->get<std::string>() : Dump(*f);
  }
  if (auto f = j.find("status"); f != j.end() && f->is_number_integer()) {
    a.status = std::clamp(f->get<int>(), 100, 599);
  }
  SetJson(
      res, 200,
      json{{"key", k}, {"account", a.account_id}, {"balance", a.balance}, {"status", a.status}});
}

}  // namespace sflb::testing
