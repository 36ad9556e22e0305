// sflb-sse-load: an epoll load generator for streamed chat completions (SSE), for the benchmark
// in tests/bench/run-bench.sh.
//
// It opens N connections (paced at --connect-rate per second, spread over --threads event
// loops; never one thread per stream), sends one streamed POST /v1/chat/completions on each,
// decodes the chunked body, splits it into SSE events and checks every stream against what
// sflb-fake-upstream sends for it: events carry "x_fake_chunk_index" 0, 1, ..., chunks-1 in
// order, all with the same completion id, then "data: [DONE]", then the end of the body.
// Each stream asks the fake for its own pacing (x-fake-chunks, x-fake-chunk-delay-ms drawn
// uniformly from [--delay-min-ms, --delay-max-ms]), so the time the proxy adds to each gap can
// be computed as (measured gap - requested delay).
//
// Prints one JSON object on stdout (see PrintResults) and exits 0 when it could run at all,
// whatever the streams did; 2 on a usage error.
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "nlohmann/json.hpp"

namespace sflb::bench {
namespace {

using Clock = std::chrono::steady_clock;

int64_t NowUs() {
  return std::chrono::duration_cast<std::chrono::microseconds>(Clock::now().time_since_epoch())
      .count();
}

// Command-line settings. Every field documents its default.
struct Options {
  std::string host = "127.0.0.1";           // --host
  int port = 0;                             // --port (required)
  std::string path = "/v1/chat/completions";  // --path
  std::string auth;                         // --auth: Authorization header value; none if empty
  int streams = 1000;                       // --streams
  int chunks = 50;                          // --chunks: x-fake-chunks per stream
  int delay_min_ms = 20;                    // --delay-min-ms
  int delay_max_ms = 50;                    // --delay-max-ms
  double connect_rate = 5000;               // --connect-rate: new streams per second
  double timeout_s = 60;                    // --timeout-s: whole run; unfinished streams fail
  int threads = 1;                          // --threads: event loops
  std::string model = "Qwen/Qwen2.5-7B-Instruct";  // --model
  uint32_t seed = 1;                        // --seed: for the per-stream delays
  bool validate_json = false;               // --validate-json: parse every event fully
  std::string label;                        // --label: echoed in the output
};

const char kUsage[] =
    "Usage: sflb-sse-load --port N [flags]\n"
    "  --host ADDR          server address (default 127.0.0.1; IPv4 only)\n"
    "  --port N             server port (required)\n"
    "  --path PATH          request path (default /v1/chat/completions)\n"
    "  --auth VALUE         Authorization header value, e.g. 'Bearer k' (default none)\n"
    "  --streams N          concurrent streams (default 1000)\n"
    "  --chunks N           SSE chunks per stream, sent as x-fake-chunks (default 50)\n"
    "  --delay-min-ms N     per-stream chunk delay drawn from [min,max] (default 20)\n"
    "  --delay-max-ms N     (default 50), sent as x-fake-chunk-delay-ms\n"
    "  --connect-rate R     new streams per second (default 5000)\n"
    "  --timeout-s S        whole-run deadline; unfinished streams count as errors (default 60)\n"
    "  --threads N          epoll event loops (default 1)\n"
    "  --model NAME         model in the request body\n"
    "  --seed N             seed of the per-stream delays (default 1)\n"
    "  --validate-json      parse every event as JSON (costs CPU at high rates)\n"
    "  --label TEXT         echoed as \"label\" in the JSON output\n";

bool ParseOptions(int argc, char** argv, Options* o) {
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    std::string value;
    bool has_inline = false;
    if (size_t eq = arg.find('='); eq != std::string::npos && arg.rfind("--", 0) == 0) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
      has_inline = true;
    }
    auto next = [&](std::string* out) {
      if (has_inline) {
        *out = value;
        return true;
      }
      if (i + 1 >= argc) return false;
      *out = argv[++i];
      return true;
    };
    std::string v;
    if (arg == "--validate-json") {
      o->validate_json = true;
      continue;
    }
    if (arg == "--help" || arg == "-h") return false;
    if (!next(&v)) {
      std::fprintf(stderr, "sflb-sse-load: %s needs a value\n", arg.c_str());
      return false;
    }
    char* end = nullptr;
    if (arg == "--host") o->host = v;
    else if (arg == "--port") o->port = static_cast<int>(std::strtol(v.c_str(), &end, 10));
    else if (arg == "--path") o->path = v;
    else if (arg == "--auth") o->auth = v;
    else if (arg == "--streams") o->streams = static_cast<int>(std::strtol(v.c_str(), &end, 10));
    else if (arg == "--chunks") o->chunks = static_cast<int>(std::strtol(v.c_str(), &end, 10));
    else if (arg == "--delay-min-ms") o->delay_min_ms = static_cast<int>(std::strtol(v.c_str(), &end, 10));
    else if (arg == "--delay-max-ms") o->delay_max_ms = static_cast<int>(std::strtol(v.c_str(), &end, 10));
    else if (arg == "--connect-rate") o->connect_rate = std::strtod(v.c_str(), &end);
    else if (arg == "--timeout-s") o->timeout_s = std::strtod(v.c_str(), &end);
    else if (arg == "--threads") o->threads = static_cast<int>(std::strtol(v.c_str(), &end, 10));
    else if (arg == "--model") o->model = v;
    else if (arg == "--seed") o->seed = static_cast<uint32_t>(std::strtoul(v.c_str(), &end, 10));
    else if (arg == "--label") o->label = v;
    else {
      std::fprintf(stderr, "sflb-sse-load: unknown flag %s\n", arg.c_str());
      return false;
    }
    if (end != nullptr && *end != '\0') {
      std::fprintf(stderr, "sflb-sse-load: %s: not a number: %s\n", arg.c_str(), v.c_str());
      return false;
    }
  }
  if (o->port <= 0 || o->port > 65535 || o->streams < 1 || o->chunks < 1 ||
      o->delay_min_ms < 0 || o->delay_max_ms < o->delay_min_ms || o->connect_rate <= 0 ||
      o->timeout_s <= 0 || o->threads < 1) {
    std::fprintf(stderr, "sflb-sse-load: invalid or missing settings\n");
    return false;
  }
  return true;
}

// Why a stream failed. Kept as short stable names for the JSON output.
enum class Failure {
  kNone,
  kConnect,       // socket/connect failed
  kWrite,         // sending the request failed
  kEofEarly,      // the server closed before the body ended
  kReset,         // read error (ECONNRESET, ...)
  kHttpStatus,    // status other than 200
  kNotSse,        // Content-Type is not text/event-stream
  kBadHead,       // unparsable status line / headers
  kBadFraming,    // malformed chunked encoding
  kOutOfOrder,    // x_fake_chunk_index not the next expected one
  kBadEvent,      // event data is not a well-formed chunk (or mixes completion ids)
  kMissingDone,   // body ended without [DONE], or [DONE] came early
  kErrorEvent,    // an SSE error event injected by a proxy
  kTimeout,       // not finished by the run deadline
};

const char* FailureName(Failure f) {
  switch (f) {
    case Failure::kNone: return "none";
    case Failure::kConnect: return "connect";
    case Failure::kWrite: return "write";
    case Failure::kEofEarly: return "eof_early";
    case Failure::kReset: return "read_error";
    case Failure::kHttpStatus: return "http_status";
    case Failure::kNotSse: return "not_sse";
    case Failure::kBadHead: return "bad_head";
    case Failure::kBadFraming: return "bad_framing";
    case Failure::kOutOfOrder: return "out_of_order";
    case Failure::kBadEvent: return "bad_event";
    case Failure::kMissingDone: return "missing_done";
    case Failure::kErrorEvent: return "error_event";
    case Failure::kTimeout: return "timeout";
  }
  return "unknown";
}

// Per-thread results, merged at the end.
struct Results {
  int64_t completed = 0;
  std::map<std::string, int64_t> failures;       // by FailureName
  std::map<int, int64_t> statuses;               // HTTP status of every answered stream
  std::vector<double> connect_ms;                // connect() start -> connected
  std::vector<double> ttfb_ms;                   // request written -> first response byte
  std::vector<double> first_event_ms;            // request written -> first data event
  std::vector<double> first_event_excess_ms;     // first_event - requested delay
  std::vector<double> gap_ms;                    // between consecutive chunks of a stream
  std::vector<double> gap_excess_ms;             // gap - requested delay
  std::vector<double> total_ms;                  // request written -> body end
  int64_t events = 0;
  int64_t bytes = 0;
  std::string first_error;                       // one example, for diagnosis
};

// One stream: a connection, its request and the parse state of its response.
struct Stream {
  enum class Phase { kIdle, kConnecting, kSending, kHead, kBody, kDone };
  int index = 0;
  int fd = -1;
  Phase phase = Phase::kIdle;
  int delay_ms = 0;
  std::string request;
  size_t sent = 0;
  int64_t t_connect = 0;
  int64_t t_connected = 0;
  int64_t t_sent = 0;
  int64_t t_first_byte = 0;
  int64_t t_last_event = 0;
  // Response head.
  std::string head;
  int status = 0;
  bool chunked = false;
  int64_t content_length = -1;  // -1: none (chunked or close-delimited)
  // Chunked decoding.
  enum class ChunkState { kSize, kSizeLf, kData, kDataCr, kDataLf, kTrailer, kEnd };
  ChunkState cstate = ChunkState::kSize;
  uint64_t chunk_left = 0;
  std::string size_line;
  std::string trailer_line;
  int64_t body_read = 0;
  // SSE parsing.
  std::string line;
  std::string data;  // data lines of the current event, joined by '\n'
  bool event_has_data = false;
  int next_index = 0;
  bool saw_done = false;
  std::string completion_id;
  Failure failure = Failure::kNone;
  std::string failure_detail;
};

class Loop {
 public:
  Loop(const Options& options, std::vector<int> indices, sockaddr_in addr)
      : options_(options), addr_(addr) {
    streams_.resize(indices.size());
    std::mt19937 rng(options.seed);
    std::uniform_int_distribution<int> delay(options.delay_min_ms, options.delay_max_ms);
    // Delays are drawn per global index, so threads and runs with the same seed match.
    std::vector<int> all_delays(static_cast<size_t>(options.streams));
    for (int& d : all_delays) d = delay(rng);
    for (size_t i = 0; i < indices.size(); ++i) {
      streams_[i].index = indices[i];
      streams_[i].delay_ms = all_delays[static_cast<size_t>(indices[i])];
    }
  }

  // Runs until every stream finished or `deadline_us`. `start_us` is the common start.
  void Run(int64_t start_us, int64_t deadline_us) {
    epfd_ = epoll_create1(EPOLL_CLOEXEC);
    size_t next_open = 0;
    int open_now = 0;
    size_t finished = 0;
    std::vector<epoll_event> events(1024);
    while (finished < streams_.size()) {
      int64_t now = NowUs();
      if (now >= deadline_us) break;
      // Open the streams that are due.
      while (next_open < streams_.size()) {
        Stream& s = streams_[next_open];
        int64_t due = start_us + static_cast<int64_t>(s.index * 1e6 / options_.connect_rate);
        if (due > now) break;
        ++next_open;
        if (Open(s)) {
          ++open_now;
        } else {
          ++finished;
        }
      }
      int64_t wait_us = deadline_us - now;
      if (next_open < streams_.size()) {
        int64_t due = start_us + static_cast<int64_t>(streams_[next_open].index * 1e6 /
                                                       options_.connect_rate);
        wait_us = std::min(wait_us, due - now);
      }
      int timeout_ms = static_cast<int>(std::clamp<int64_t>((wait_us + 999) / 1000, 0, 1000));
      int n = epoll_wait(epfd_, events.data(), static_cast<int>(events.size()), timeout_ms);
      if (n < 0 && errno != EINTR) break;
      for (int i = 0; i < n; ++i) {
        Stream& s = streams_[events[static_cast<size_t>(i)].data.u32];
        if (s.phase == Stream::Phase::kDone) continue;
        Step(s, events[static_cast<size_t>(i)].events);
        if (s.phase == Stream::Phase::kDone) {
          ++finished;
          --open_now;
        }
      }
    }
    for (Stream& s : streams_) {
      if (s.phase != Stream::Phase::kDone) Finish(s, Failure::kTimeout, "run deadline");
    }
    ::close(epfd_);
  }

  Results& results() { return results_; }

 private:
  bool Open(Stream& s) {
    s.request = BuildRequest(s);
    s.t_connect = NowUs();
    s.fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s.fd < 0) {
      Finish(s, Failure::kConnect, std::string("socket: ") + std::strerror(errno));
      return false;
    }
    int one = 1;
    ::setsockopt(s.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    int rc = ::connect(s.fd, reinterpret_cast<const sockaddr*>(&addr_), sizeof(addr_));
    if (rc != 0 && errno != EINPROGRESS) {
      Finish(s, Failure::kConnect, std::string("connect: ") + std::strerror(errno));
      return false;
    }
    s.phase = Stream::Phase::kConnecting;
    epoll_event ev{};
    ev.events = EPOLLOUT | EPOLLIN | EPOLLRDHUP;
    ev.data.u32 = static_cast<uint32_t>(&s - streams_.data());
    ::epoll_ctl(epfd_, EPOLL_CTL_ADD, s.fd, &ev);
    return true;
  }

  std::string BuildRequest(const Stream& s) const {
    std::string body = "{\"model\":\"" + options_.model +
                       "\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":"
                       "\"Write a short poem about load balancers.\"}],\"max_tokens\":256}";
    std::string r = "POST " + options_.path + " HTTP/1.1\r\nHost: " + options_.host + ":" +
                    std::to_string(options_.port) + "\r\n";
    if (!options_.auth.empty()) r += "Authorization: " + options_.auth + "\r\n";
    r += "Content-Type: application/json\r\nAccept: text/event-stream\r\n";
    r += "x-fake-chunks: " + std::to_string(options_.chunks) + "\r\n";
    r += "x-fake-chunk-delay-ms: " + std::to_string(s.delay_ms) + "\r\n";
    r += "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n";
    r += body;
    return r;
  }

  void Step(Stream& s, uint32_t ev) {
    if (s.phase == Stream::Phase::kConnecting) {
      int err = 0;
      socklen_t len = sizeof(err);
      ::getsockopt(s.fd, SOL_SOCKET, SO_ERROR, &err, &len);
      if (err != 0) {
        Finish(s, Failure::kConnect, std::string("connect: ") + std::strerror(err));
        return;
      }
      if ((ev & EPOLLOUT) == 0) return;
      s.t_connected = NowUs();
      s.phase = Stream::Phase::kSending;
    }
    if (s.phase == Stream::Phase::kSending) {
      while (s.sent < s.request.size()) {
        ssize_t n = ::send(s.fd, s.request.data() + s.sent, s.request.size() - s.sent,
                           MSG_NOSIGNAL);
        if (n > 0) {
          s.sent += static_cast<size_t>(n);
          continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
        Finish(s, Failure::kWrite, std::string("send: ") + std::strerror(errno));
        return;
      }
      s.t_sent = NowUs();
      s.phase = Stream::Phase::kHead;
      s.request.clear();
      s.request.shrink_to_fit();
      epoll_event mod{};
      mod.events = EPOLLIN | EPOLLRDHUP;
      mod.data.u32 = static_cast<uint32_t>(&s - streams_.data());
      ::epoll_ctl(epfd_, EPOLL_CTL_MOD, s.fd, &mod);
    }
    // Read everything available.
    char buf[16384];
    for (;;) {
      ssize_t n = ::recv(s.fd, buf, sizeof(buf), 0);
      if (n > 0) {
        int64_t now = NowUs();
        if (s.t_first_byte == 0) s.t_first_byte = now;
        results_.bytes += n;
        Consume(s, buf, static_cast<size_t>(n), now);
        if (s.phase == Stream::Phase::kDone) return;
        continue;
      }
      if (n == 0) {
        OnEof(s);
        return;
      }
      if (errno == EAGAIN || errno == EINTR) return;
      Finish(s, Failure::kReset, std::string("recv: ") + std::strerror(errno));
      return;
    }
  }

  void OnEof(Stream& s) {
    if (s.phase == Stream::Phase::kBody && !s.chunked && s.content_length < 0) {
      EndOfBody(s, NowUs());  // close-delimited body
      return;
    }
    Finish(s, Failure::kEofEarly,
           s.phase == Stream::Phase::kHead ? "closed before the response head"
                                           : "closed before the end of the body");
  }

  void Consume(Stream& s, const char* p, size_t n, int64_t now) {
    if (s.phase == Stream::Phase::kHead) {
      size_t before = s.head.size();
      s.head.append(p, n);
      size_t end = s.head.find("\r\n\r\n");
      if (end == std::string::npos) {
        if (s.head.size() > 64 * 1024) Finish(s, Failure::kBadHead, "head too large");
        return;
      }
      if (!ParseHead(s, s.head.substr(0, end))) return;
      size_t body_start = end + 4;
      s.phase = Stream::Phase::kBody;
      size_t consumed_from_p = body_start - before;
      p += consumed_from_p;
      n -= consumed_from_p;
      s.head.clear();
      s.head.shrink_to_fit();
      if (s.phase != Stream::Phase::kBody) return;
      if (s.content_length == 0) {
        EndOfBody(s, now);
        return;
      }
    }
    if (s.phase != Stream::Phase::kBody) return;
    if (!s.chunked) {
      size_t take = n;
      if (s.content_length >= 0) {
        take = static_cast<size_t>(
            std::min<int64_t>(static_cast<int64_t>(n), s.content_length - s.body_read));
      }
      s.body_read += static_cast<int64_t>(take);
      Body(s, p, take, now);
      if (s.phase == Stream::Phase::kDone) return;
      if (s.content_length >= 0 && s.body_read >= s.content_length) EndOfBody(s, now);
      return;
    }
    // Chunked transfer coding.
    size_t i = 0;
    while (i < n && s.phase == Stream::Phase::kBody) {
      char c = p[i];
      switch (s.cstate) {
        case Stream::ChunkState::kSize:
          if (c == '\r') {
            s.cstate = Stream::ChunkState::kSizeLf;
          } else if (s.size_line.size() < 64) {
            s.size_line.push_back(c);
          } else {
            Finish(s, Failure::kBadFraming, "chunk size line too long");
            return;
          }
          ++i;
          break;
        case Stream::ChunkState::kSizeLf: {
          if (c != '\n') {
            Finish(s, Failure::kBadFraming, "expected LF after chunk size");
            return;
          }
          ++i;
          std::string hex = s.size_line.substr(0, s.size_line.find(';'));
          s.size_line.clear();
          char* end = nullptr;
          s.chunk_left = std::strtoull(hex.c_str(), &end, 16);
          if (hex.empty() || end == hex.c_str() || *end != '\0') {
            Finish(s, Failure::kBadFraming, "bad chunk size '" + hex + "'");
            return;
          }
          s.cstate = s.chunk_left == 0 ? Stream::ChunkState::kTrailer
                                       : Stream::ChunkState::kData;
          break;
        }
        case Stream::ChunkState::kData: {
          size_t take = static_cast<size_t>(std::min<uint64_t>(s.chunk_left, n - i));
          Body(s, p + i, take, now);
          if (s.phase != Stream::Phase::kBody) return;
          i += take;
          s.chunk_left -= take;
          if (s.chunk_left == 0) s.cstate = Stream::ChunkState::kDataCr;
          break;
        }
        case Stream::ChunkState::kDataCr:
          if (c != '\r') {
            Finish(s, Failure::kBadFraming, "expected CR after chunk data");
            return;
          }
          ++i;
          s.cstate = Stream::ChunkState::kDataLf;
          break;
        case Stream::ChunkState::kDataLf:
          if (c != '\n') {
            Finish(s, Failure::kBadFraming, "expected LF after chunk data");
            return;
          }
          ++i;
          s.cstate = Stream::ChunkState::kSize;
          break;
        case Stream::ChunkState::kTrailer:
          // Trailer lines until an empty line.
          ++i;
          if (c == '\n') {
            bool empty = s.trailer_line.empty() || s.trailer_line == "\r";
            s.trailer_line.clear();
            if (empty) {
              EndOfBody(s, now);
              return;
            }
          } else {
            s.trailer_line.push_back(c);
          }
          break;
        case Stream::ChunkState::kEnd:
          return;
      }
    }
  }

  bool ParseHead(Stream& s, const std::string& head) {
    // "HTTP/1.1 200 OK"
    if (head.rfind("HTTP/1.", 0) != 0 || head.size() < 12) {
      Finish(s, Failure::kBadHead, "bad status line");
      return false;
    }
    s.status = std::atoi(head.c_str() + 9);
    results_.statuses[s.status]++;
    std::string content_type;
    size_t pos = head.find("\r\n");
    while (pos != std::string::npos && pos + 2 < head.size()) {
      size_t next = head.find("\r\n", pos + 2);
      std::string line = head.substr(pos + 2, next == std::string::npos ? std::string::npos
                                                                        : next - pos - 2);
      pos = next;
      size_t colon = line.find(':');
      if (colon == std::string::npos) continue;
      std::string name = line.substr(0, colon);
      for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      size_t v = colon + 1;
      while (v < line.size() && (line[v] == ' ' || line[v] == '\t')) ++v;
      std::string value = line.substr(v);
      if (name == "transfer-encoding") {
        std::string lower = value;
        for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
        s.chunked = lower.find("chunked") != std::string::npos;
      } else if (name == "content-length") {
        s.content_length = std::strtoll(value.c_str(), nullptr, 10);
      } else if (name == "content-type") {
        content_type = value;
      }
    }
    if (s.chunked) s.content_length = -1;
    if (s.status != 200) {
      s.failure = Failure::kHttpStatus;  // keep reading the body for the detail
      s.failure_detail = "HTTP " + std::to_string(s.status);
      return true;
    }
    if (content_type.rfind("text/event-stream", 0) != 0) {
      Finish(s, Failure::kNotSse, "Content-Type: " + content_type);
      return false;
    }
    return true;
  }

  // Decoded body bytes of a 200 response: SSE lines.
  void Body(Stream& s, const char* p, size_t n, int64_t now) {
    if (s.failure == Failure::kHttpStatus) {
      if (s.failure_detail.size() < 300) s.failure_detail.append(p, std::min<size_t>(n, 300));
      return;
    }
    for (size_t i = 0; i < n; ++i) {
      char c = p[i];
      if (c != '\n') {
        if (s.line.size() < 1 << 20) s.line.push_back(c);
        continue;
      }
      if (!s.line.empty() && s.line.back() == '\r') s.line.pop_back();
      if (s.line.empty()) {
        if (s.event_has_data) Event(s, now);
        if (s.phase == Stream::Phase::kDone) return;
        s.data.clear();
        s.event_has_data = false;
      } else if (s.line.rfind("data:", 0) == 0) {
        size_t start = s.line.size() > 5 && s.line[5] == ' ' ? 6 : 5;
        if (s.event_has_data) s.data.push_back('\n');
        s.data.append(s.line, start, std::string::npos);
        s.event_has_data = true;
      }
      // Other fields (event:, id:, comments) are ignored.
      s.line.clear();
    }
  }

  void Event(Stream& s, int64_t now) {
    ++results_.events;
    if (s.data == "[DONE]") {
      if (s.next_index != options_.chunks) {
        Finish(s, Failure::kMissingDone, "[DONE] after " + std::to_string(s.next_index) +
                                             " of " + std::to_string(options_.chunks) + " chunks");
        return;
      }
      s.saw_done = true;
      return;
    }
    if (s.saw_done) {
      Finish(s, Failure::kBadEvent, "event after [DONE]");
      return;
    }
    if (s.data.find("\"error\"") != std::string::npos &&
        s.data.find("x_fake_chunk_index") == std::string::npos) {
      Finish(s, Failure::kErrorEvent, s.data.substr(0, 300));
      return;
    }
    // Light integrity check: one JSON object with this stream's completion id and the next
    // chunk index. --validate-json parses it fully as well.
    if (s.data.size() < 2 || s.data.front() != '{' || s.data.back() != '}') {
      Finish(s, Failure::kBadEvent, "event is not a JSON object: " + s.data.substr(0, 120));
      return;
    }
    static const char kIdKey[] = "\"id\":\"";
    size_t id_at = s.data.find(kIdKey);
    size_t id_end = id_at == std::string::npos ? id_at : s.data.find('"', id_at + 6);
    if (id_end == std::string::npos) {
      Finish(s, Failure::kBadEvent, "event without an id");
      return;
    }
    std::string id = s.data.substr(id_at + 6, id_end - id_at - 6);
    if (s.completion_id.empty()) {
      s.completion_id = id;
    } else if (id != s.completion_id) {
      Finish(s, Failure::kBadEvent, "completion id changed mid-stream");
      return;
    }
    static const char kIndexKey[] = "\"x_fake_chunk_index\":";
    size_t idx_at = s.data.find(kIndexKey);
    if (idx_at == std::string::npos) {
      Finish(s, Failure::kBadEvent, "event without x_fake_chunk_index");
      return;
    }
    long index = std::strtol(s.data.c_str() + idx_at + sizeof(kIndexKey) - 1, nullptr, 10);
    if (options_.validate_json) {
      nlohmann::json parsed = nlohmann::json::parse(s.data, nullptr, false);
      if (parsed.is_discarded() || !parsed.is_object() ||
          parsed.value("x_fake_chunk_index", -1L) != index ||
          parsed.value("id", std::string()) != id) {
        Finish(s, Failure::kBadEvent, "event is not valid JSON: " + s.data.substr(0, 120));
        return;
      }
    }
    if (index != s.next_index) {
      Finish(s, Failure::kOutOfOrder, "expected chunk " + std::to_string(s.next_index) +
                                          ", got " + std::to_string(index));
      return;
    }
    if (s.next_index == 0) {
      double ms = (now - s.t_sent) / 1000.0;
      results_.first_event_ms.push_back(ms);
      results_.first_event_excess_ms.push_back(ms - s.delay_ms);
    } else {
      double gap = (now - s.t_last_event) / 1000.0;
      results_.gap_ms.push_back(gap);
      results_.gap_excess_ms.push_back(gap - s.delay_ms);
    }
    s.t_last_event = now;
    ++s.next_index;
  }

  void EndOfBody(Stream& s, int64_t now) {
    if (s.failure == Failure::kHttpStatus) {
      Finish(s, Failure::kHttpStatus, s.failure_detail);
      return;
    }
    if (s.event_has_data) Event(s, now);  // a last event without its blank line
    if (s.phase == Stream::Phase::kDone) return;
    if (!s.saw_done) {
      Finish(s, Failure::kMissingDone, "body ended after " + std::to_string(s.next_index) +
                                           " chunks without [DONE]");
      return;
    }
    results_.total_ms.push_back((now - s.t_sent) / 1000.0);
    Finish(s, Failure::kNone, "");
  }

  void Finish(Stream& s, Failure f, const std::string& detail) {
    if (s.phase == Stream::Phase::kDone) return;
    if (f == Failure::kNone) {
      ++results_.completed;
    } else {
      results_.failures[FailureName(f)]++;
      if (results_.first_error.empty()) {
        results_.first_error = std::string(FailureName(f)) + ": " + detail;
      }
    }
    if (s.t_connected != 0) results_.connect_ms.push_back((s.t_connected - s.t_connect) / 1000.0);
    if (s.t_first_byte != 0 && s.t_sent != 0) {
      results_.ttfb_ms.push_back((s.t_first_byte - s.t_sent) / 1000.0);
    }
    if (s.fd >= 0) {
      ::epoll_ctl(epfd_, EPOLL_CTL_DEL, s.fd, nullptr);
      ::close(s.fd);
      s.fd = -1;
    }
    s.phase = Stream::Phase::kDone;
    s.line.clear();
    s.line.shrink_to_fit();
    s.data.clear();
    s.data.shrink_to_fit();
  }

  const Options& options_;
  const sockaddr_in addr_;
  int epfd_ = -1;
  std::vector<Stream> streams_;
  Results results_;
};

// {"n", "p50", "p99", "p999", "max", "mean"} of `v` (sorted in place).
nlohmann::ordered_json Summary(std::vector<double>& v) {
  nlohmann::ordered_json out;
  out["n"] = v.size();
  if (v.empty()) return out;
  std::sort(v.begin(), v.end());
  auto pct = [&](double p) {
    size_t i = static_cast<size_t>(p / 100.0 * static_cast<double>(v.size() - 1) + 0.5);
    return std::round(v[std::min(i, v.size() - 1)] * 1000.0) / 1000.0;
  };
  double sum = 0;
  for (double x : v) sum += x;
  out["p50"] = pct(50);
  out["p90"] = pct(90);
  out["p99"] = pct(99);
  out["p999"] = pct(99.9);
  out["max"] = std::round(v.back() * 1000.0) / 1000.0;
  out["mean"] = std::round(sum / static_cast<double>(v.size()) * 1000.0) / 1000.0;
  return out;
}

void Append(std::vector<double>& to, const std::vector<double>& from) {
  to.insert(to.end(), from.begin(), from.end());
}

int Main(int argc, char** argv) {
  Options options;
  if (!ParseOptions(argc, argv, &options)) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  struct rlimit lim;
  if (getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < lim.rlim_max) {
    lim.rlim_cur = lim.rlim_max;
    setrlimit(RLIMIT_NOFILE, &lim);
  }
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(options.port));
  if (inet_pton(AF_INET, options.host.c_str(), &addr.sin_addr) != 1) {
    std::fprintf(stderr, "sflb-sse-load: --host must be an IPv4 address\n");
    return 2;
  }

  std::vector<std::unique_ptr<Loop>> loops;
  for (int t = 0; t < options.threads; ++t) {
    std::vector<int> indices;
    for (int i = t; i < options.streams; i += options.threads) indices.push_back(i);
    loops.push_back(std::make_unique<Loop>(options, std::move(indices), addr));
  }
  int64_t start = NowUs() + 1000;
  int64_t deadline = start + static_cast<int64_t>(options.timeout_s * 1e6);
  std::vector<std::thread> threads;
  for (auto& loop : loops) {
    Loop* l = loop.get();
    threads.emplace_back([l, start, deadline] { l->Run(start, deadline); });
  }
  for (std::thread& t : threads) t.join();
  double elapsed_s = (NowUs() - start) / 1e6;

  Results all;
  for (auto& loop : loops) {
    Results& r = loop->results();
    all.completed += r.completed;
    for (auto& [k, v] : r.failures) all.failures[k] += v;
    for (auto& [k, v] : r.statuses) all.statuses[k] += v;
    Append(all.connect_ms, r.connect_ms);
    Append(all.ttfb_ms, r.ttfb_ms);
    Append(all.first_event_ms, r.first_event_ms);
    Append(all.first_event_excess_ms, r.first_event_excess_ms);
    Append(all.gap_ms, r.gap_ms);
    Append(all.gap_excess_ms, r.gap_excess_ms);
    Append(all.total_ms, r.total_ms);
    all.events += r.events;
    all.bytes += r.bytes;
    if (all.first_error.empty()) all.first_error = r.first_error;
  }
  int64_t failed = 0;
  for (auto& [k, v] : all.failures) failed += v;

  nlohmann::ordered_json out;
  out["label"] = options.label;
  out["streams"] = options.streams;
  out["chunks"] = options.chunks;
  out["delay_ms"] = {options.delay_min_ms, options.delay_max_ms};
  out["threads"] = options.threads;
  out["completed"] = all.completed;
  out["failed"] = failed;
  out["failures"] = all.failures;
  nlohmann::ordered_json statuses = nlohmann::ordered_json::object();
  for (auto& [k, v] : all.statuses) statuses[std::to_string(k)] = v;
  out["statuses"] = statuses;
  out["first_error"] = all.first_error;
  out["events"] = all.events;
  out["bytes"] = all.bytes;
  out["elapsed_s"] = std::round(elapsed_s * 1000.0) / 1000.0;
  out["connect_ms"] = Summary(all.connect_ms);
  out["ttfb_ms"] = Summary(all.ttfb_ms);
  out["first_event_ms"] = Summary(all.first_event_ms);
  out["first_event_excess_ms"] = Summary(all.first_event_excess_ms);
  out["gap_ms"] = Summary(all.gap_ms);
  out["gap_excess_ms"] = Summary(all.gap_excess_ms);
  out["total_ms"] = Summary(all.total_ms);
  std::printf("%s\n", out.dump().c_str());
  return 0;
}

}  // namespace
}  // namespace sflb::bench

int main(int argc, char** argv) { return sflb::bench::Main(argc, argv); }
