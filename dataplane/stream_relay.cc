#include "dataplane/stream_relay.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>
#include <unordered_map>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "common/mutex.h"
#include "dataplane/error_response.h"
#include "dataplane/forwarding.h"

namespace sflb {
namespace {

constexpr char kLastChunk[] = "0\r\n\r\n";
// Pieces read from one upstream per wake-up before the loop serves the others.
constexpr int kMaxReadsPerWake = 32;

enum class Phase {
  kStreaming,  // upstream body being relayed
  kFinishing,  // the response's last bytes are queued; then idle (keep-alive) or close
  kIdle,       // waiting for the client's next request
  kReading,    // a request is arriving
  kUpstream,   // the loop serves a request: an upstream exchange is in progress
  kWorker,     // an attempt of a request the loop serves runs on a worker thread
};

// A request a loop serves, from its arrival until its response is committed. Shared with a
// worker thread while one runs an attempt (the loop leaves it alone meanwhile).
struct LoopCall {
  std::string body;  // the upstream request refers to it
  std::unique_ptr<ProxyCall> call;
  std::shared_ptr<CancelToken> cancel;
  bool keep_alive = true;
  std::unique_ptr<UpstreamExchange> exchange;  // the attempt in progress
  bool refused = false;  // reading the error body of a refused key (else a committed body)
  bool awaiting_first_byte = false;  // a stream's first body byte, before committing
  uint64_t worker_serial = 0;        // counts attempts handed to workers
  std::string response_body;
  absl::Time deadline = absl::InfiniteFuture();  // of the current wait on the upstream
};

// Longest request target and header line the loops serve (httplib's limits; beyond them it
// answers 414 or 400 itself).
constexpr size_t kMaxLineBytes = 8192;

// Time a worker may take to start opening a connection, on top of the connect timeout.
constexpr absl::Duration kWorkerQueueSlack = absl::Seconds(5);

// Largest error body read from an upstream that refused a key.
constexpr size_t kMaxRefusalBodyBytes = 64 * 1024;

// One connection a loop holds. Owned by its loop thread.
struct Relayed {
  std::unique_ptr<ResponseStream> stream;  // null once finished
  std::shared_ptr<LoopCall> call;          // the request the loop serves, until committed
  std::string in;                          // bytes of the request arriving
  size_t head_scan = 0;                    // FindHeadEnd's progress in `in`
  std::string peer_ip;
  int client_fd = -1;
  int upstream_fd = -1;  // registered in epoll while >= 0
  Phase phase = Phase::kStreaming;
  bool keep_alive = true;
  // The body goes out re-framed as chunked (else as is, for a Content-Length response).
  bool chunked = true;
  std::string out;  // bytes for the client; [out_off, size) still unsent
  size_t out_off = 0;
  uint32_t client_events = 0;    // current epoll interest of client_fd
  uint32_t upstream_events = 0;  // current epoll interest of upstream_fd
  // Backpressure: the client has too much unread; upstream_fd is out of the epoll set
  // meanwhile (a hang-up would otherwise be reported again and again).
  bool upstream_paused = false;
  absl::Time last_upstream;
  absl::Time write_blocked_since = absl::InfiniteFuture();
  absl::Time idle_deadline = absl::InfiniteFuture();
  absl::Time read_deadline = absl::InfiniteFuture();  // of a request arriving (kReading)

  size_t pending() const { return out.size() - out_off; }
};

// epoll data: the Relayed pointer, low bit set for its upstream socket.
uint64_t Tag(Relayed* r, bool upstream) {
  return reinterpret_cast<uint64_t>(r) | (upstream ? 1u : 0u);
}

// The socket's peer address ("" if unknown), for request records.
std::string PeerIp(int fd) {
  sockaddr_storage addr{};
  socklen_t len = sizeof(addr);
  char ip[INET6_ADDRSTRLEN] = {0};
  if (::getpeername(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    if (addr.ss_family == AF_INET) {
      inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(&addr)->sin_addr, ip, sizeof(ip));
    } else if (addr.ss_family == AF_INET6) {
      inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(&addr)->sin6_addr, ip, sizeof(ip));
    }
  }
  return ip;
}

}  // namespace

void AppendChunk(absl::string_view data, std::string* out) {
  if (data.empty()) return;
  char size[20];
  int n = 0;
  for (size_t v = data.size(); v != 0; v >>= 4) size[n++] = "0123456789abcdef"[v & 15];
  out->reserve(out->size() + static_cast<size_t>(n) + data.size() + 4);
  while (n > 0) out->push_back(size[--n]);
  out->append("\r\n", 2);
  out->append(data.data(), data.size());
  out->append("\r\n", 2);
}

class StreamRelay::Loop {
 public:
  explicit Loop(StreamRelay* relay) : relay_(relay) {
    epfd_ = ::epoll_create1(EPOLL_CLOEXEC);
    wakefd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = 0;
    if (epfd_ < 0 || wakefd_ < 0 || ::epoll_ctl(epfd_, EPOLL_CTL_ADD, wakefd_, &ev) != 0) {
      // Out of descriptors at start-up: this loop takes no streams (Adopt declines, streams
      // keep their request thread).
      LogError("relay_loop_unavailable", {{"errno", errno}});
      return;
    }
    ok_ = true;
    thread_ = std::thread([this] { Run(); });
  }
  ~Loop() {
    Stop();
    if (wakefd_ >= 0) ::close(wakefd_);
    if (epfd_ >= 0) ::close(epfd_);
  }

  bool ok() const { return ok_; }

  void Add(std::unique_ptr<Relayed> r) {
    {
      MutexLock lock(&mu_);
      if (!stop_) {
        incoming_.push_back(std::move(r));
        r = nullptr;
      }
    }
    if (r == nullptr) {
      Wake();
      return;
    }
    // The loop has ended (process shutdown): cut the stream here.
    if (r->stream != nullptr) r->stream->record().stream_end = "server_shutdown";
    r->stream.reset();
    relay_->server_->CloseDetached(r->client_fd);
  }

  // From a worker thread: the attempt of `call` (served on `r`) is done.
  void PostSent(Relayed* r, std::shared_ptr<LoopCall> call, uint64_t serial,
                absl::StatusOr<std::unique_ptr<UpstreamExchange>> sent) {
    {
      MutexLock lock(&mu_);
      if (stop_) return;  // the loop has ended: the exchange closes here
      sent_.push_back(Sent{r, std::move(call), serial, std::move(sent)});
    }
    Wake();
  }

  void Stop() {
    {
      MutexLock lock(&mu_);
      stop_ = true;
    }
    Wake();
    if (thread_.joinable()) thread_.join();
  }

 private:
  void Wake() {
    uint64_t one = 1;
    ssize_t n = ::write(wakefd_, &one, sizeof(one));
    (void)n;  // EAGAIN: the counter is already non-zero, the loop wakes anyway
  }

  void Run() {
    std::vector<epoll_event> events(256);
    const int tick_ms = static_cast<int>(absl::ToInt64Milliseconds(relay_->options_.tick));
    absl::Time next_tick = absl::Now() + relay_->options_.tick;
    for (;;) {
      int n = ::epoll_wait(epfd_, events.data(), static_cast<int>(events.size()),
                           again_.empty() ? std::max(1, tick_ms) : 0);
      if (n < 0 && errno != EINTR) {
        LogError("relay_epoll_failed", {{"errno", errno}});
        absl::SleepFor(relay_->options_.tick);
      }
      for (int i = 0; i < n; ++i) {
        uint64_t data = events[i].data.u64;
        if (data == 0) {
          uint64_t count;
          while (::read(wakefd_, &count, sizeof(count)) > 0) {
          }
          continue;
        }
        // No Relayed is created while a batch is handled, so a pointer found in streams_
        // is the one the event was registered for.
        Relayed* r = reinterpret_cast<Relayed*>(data & ~uint64_t{1});
        if (streams_.count(r) == 0) continue;  // ended earlier in this batch
        if ((data & 1) != 0) {
          OnUpstream(r);
        } else {
          OnClient(r, events[i].events);
        }
      }
      // Streams whose client caught up: read on (their exchange may hold bytes already,
      // which no epoll event would announce).
      while (!ready_.empty()) {
        std::vector<Relayed*> ready;
        ready.swap(ready_);
        for (Relayed* r : ready) {
          if (streams_.count(r) != 0 && r->phase == Phase::kStreaming) ReadUpstream(r);
        }
      }
      std::vector<Relayed*> again;
      again.swap(again_);
      for (Relayed* r : again) {
        if (streams_.count(r) != 0 && r->phase == Phase::kStreaming && !r->upstream_paused) {
          ReadUpstream(r);
        }
      }
      std::vector<std::unique_ptr<Relayed>> incoming;
      bool stop;
      {
        MutexLock lock(&mu_);
        incoming.swap(incoming_);
        stop = stop_;
      }
      for (auto& r : incoming) Start(std::move(r));
      std::vector<Sent> sent;
      {
        MutexLock lock(&mu_);
        sent.swap(sent_);
      }
      for (Sent& result : sent) {
        // The connection may have ended meanwhile (its call is then another or none), or the
        // attempt timed out and the call moved on.
        Relayed* r = result.r;
        if (streams_.count(r) == 0 || r->call != result.call || r->phase != Phase::kWorker ||
            r->call->worker_serial != result.serial) {
          continue;
        }
        OnSent(r, std::move(result.sent));
      }
      if (stop) break;
      absl::Time now = absl::Now();
      if (now >= next_tick) {
        next_tick = now + relay_->options_.tick;
        Tick(now);
      }
    }
    // Stop: whatever is left is cut.
    std::vector<Relayed*> left;
    for (auto& [r, owned] : streams_) left.push_back(r);
    for (Relayed* r : left) {
      if (r->stream != nullptr) r->stream->record().stream_end = "server_shutdown";
      if (r->call != nullptr) r->call->call->record().stream_end = "server_shutdown";
      Close(r);
    }
  }

  void Start(std::unique_ptr<Relayed> owned) {
    Relayed* r = owned.get();
    streams_.emplace(r, std::move(owned));
    if (r->stream == nullptr) {
      // A parked connection: wait for its next request.
      epoll_event ev{};
      ev.events = EPOLLIN | EPOLLRDHUP;
      ev.data.u64 = Tag(r, false);
      r->client_events = ev.events;
      if (::epoll_ctl(epfd_, EPOLL_CTL_ADD, r->client_fd, &ev) != 0) {
        LogError("relay_epoll_add_failed", {{"errno", errno}});
        Close(r);
        return;
      }
      r->phase = Phase::kIdle;
      r->idle_deadline = absl::Now() + relay_->options_.keep_alive_timeout;
      return;
    }
    r->last_upstream = absl::Now();
    epoll_event ev{};
    ev.events = EPOLLRDHUP;
    ev.data.u64 = Tag(r, false);
    r->client_events = ev.events;
    if (::epoll_ctl(epfd_, EPOLL_CTL_ADD, r->client_fd, &ev) != 0) {
      LogError("relay_epoll_add_failed", {{"errno", errno}});
      r->stream->record().stream_end = "server_error";
      Close(r);
      return;
    }
    ev.events = EPOLLIN;
    ev.data.u64 = Tag(r, true);
    r->upstream_events = ev.events;
    if (::epoll_ctl(epfd_, EPOLL_CTL_ADD, r->upstream_fd, &ev) != 0) {
      LogError("relay_epoll_add_failed", {{"errno", errno}});
      r->upstream_fd = -1;
      r->stream->record().stream_end = "server_error";
      Close(r);
      return;
    }
    // The exchange may hold more than the first piece already: read before waiting.
    if (Flush(r)) ReadUpstream(r);
  }

  void OnUpstream(Relayed* r) {
    if (r->phase == Phase::kUpstream) {
      AdvanceCall(r);
      return;
    }
    if (r->phase != Phase::kStreaming || r->upstream_paused) return;
    ReadUpstream(r);
  }

  void OnClient(Relayed* r, uint32_t events) {
    if (r->phase == Phase::kIdle || r->phase == Phase::kReading) {
      if ((events & (EPOLLHUP | EPOLLERR)) == 0 && (events & EPOLLIN) != 0) {
        ReadRequest(r);
      } else {
        Close(r);  // hung up or reset while idle
      }
      return;
    }
    if (r->phase == Phase::kUpstream || r->phase == Phase::kWorker) {
      // A client that closes (or half-closes, as nginx also reads it) while the upstream works
      // has given up: the upstream request is cancelled. More bytes (a pipelined request) wait
      // until the response is out: only a close is watched for meanwhile (the interest comes
      // back when the connection is idle again).
      if ((events & (EPOLLHUP | EPOLLERR | EPOLLRDHUP)) != 0) {
        ClientGone(r);
      } else {
        SetClientEvents(r, EPOLLRDHUP);
      }
      return;
    }
    if ((events & (EPOLLHUP | EPOLLERR | EPOLLRDHUP)) != 0) {
      ClientGone(r);
      return;
    }
    if ((events & EPOLLOUT) != 0) Flush(r);
  }

  // Reads what the upstream has, queues it for the client and sends it.
  void ReadUpstream(Relayed* r) {
    UpstreamExchange* ex = r->stream->exchange();
    for (int reads = 0;; ++reads) {
      if (reads == kMaxReadsPerWake) {
        // The exchange may hold more already decoded or inside TLS, which no epoll event
        // would announce: read on in the next round, after the other streams.
        again_.push_back(r);
        break;
      }
      if (r->pending() >= relay_->options_.max_pending_bytes) {
        SetUpstreamPaused(r, true);
        break;
      }
      UpstreamExchange::Wait wait;
      absl::StatusOr<absl::string_view> piece = ex->TryReadSome(&wait);
      if (!piece.ok()) {
        EndStream(r, piece.status());
        return;
      }
      if (piece->empty()) {
        if (wait == UpstreamExchange::Wait::kNone) {
          CompleteBody(r);
          return;
        }
        SetUpstreamEvents(r, wait == UpstreamExchange::Wait::kWrite ? EPOLLOUT : EPOLLIN);
        break;
      }
      r->last_upstream = absl::Now();
      r->stream->Forwarded(*piece);
      if (r->chunked) {
        AppendChunk(*piece, &r->out);
      } else {
        r->out.append(piece->data(), piece->size());
      }
      // Send what is there before reading on: each event reaches the client at once.
      if (!Flush(r)) return;
    }
    Flush(r);
  }

  // Sets what the upstream socket is watched for; the first call registers it (events 0 means
  // not registered yet).
  void SetUpstreamEvents(Relayed* r, uint32_t events) {
    if (r->upstream_fd < 0 || r->upstream_paused || r->upstream_events == events) return;
    epoll_event ev{};
    ev.events = events;
    ev.data.u64 = Tag(r, true);
    if (::epoll_ctl(epfd_, r->upstream_events == 0 ? EPOLL_CTL_ADD : EPOLL_CTL_MOD,
                    r->upstream_fd, &ev) != 0) {
      LogError("relay_epoll_ctl_failed", {{"errno", errno}});
    }
    r->upstream_events = events;
  }

  void SetUpstreamPaused(Relayed* r, bool paused) {
    if (r->upstream_fd < 0 || r->upstream_paused == paused) return;
    r->upstream_paused = paused;
    if (paused) {
      ::epoll_ctl(epfd_, EPOLL_CTL_DEL, r->upstream_fd, nullptr);
      return;
    }
    epoll_event ev{};
    ev.events = r->upstream_events;
    ev.data.u64 = Tag(r, true);
    ::epoll_ctl(epfd_, EPOLL_CTL_ADD, r->upstream_fd, &ev);
    ready_.push_back(r);
  }

  void SetClientEvents(Relayed* r, uint32_t events) {
    if (r->client_events == events) return;
    epoll_event ev{};
    ev.events = events;
    ev.data.u64 = Tag(r, false);
    ::epoll_ctl(epfd_, EPOLL_CTL_MOD, r->client_fd, &ev);
    r->client_events = events;
  }

  // Sends queued bytes. False if the relayed connection ended (it is gone then).
  bool Flush(Relayed* r) {
    while (r->pending() > 0) {
      ssize_t n = ::send(r->client_fd, r->out.data() + r->out_off, r->pending(),
                         MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n > 0) {
        r->out_off += static_cast<size_t>(n);
        // The client is reading: the write timeout counts from its last progress.
        if (r->write_blocked_since != absl::InfiniteFuture()) r->write_blocked_since = absl::Now();
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        if (r->write_blocked_since == absl::InfiniteFuture()) r->write_blocked_since = absl::Now();
        SetClientEvents(r, EPOLLRDHUP | EPOLLOUT);
        // Drop what was sent, so a client that stays a little behind does not make `out`
        // hold the whole stream.
        if (r->out_off >= 64 * 1024) {
          r->out.erase(0, r->out_off);
          r->out_off = 0;
        }
        return true;
      }
      ClientGone(r);
      return false;
    }
    r->out.clear();
    r->out_off = 0;
    r->write_blocked_since = absl::InfiniteFuture();
    if (r->phase == Phase::kFinishing) return Finished(r);
    SetClientEvents(r, EPOLLRDHUP);
    if (r->upstream_paused) SetUpstreamPaused(r, false);
    return true;
  }

  // The upstream body ended completely.
  void CompleteBody(Relayed* r) {
    if (r->chunked) r->out.append(kLastChunk);
    StopUpstream(r);
    r->phase = Phase::kFinishing;
    Flush(r);
  }

  // The upstream stream cannot go on: end it well-formed if the client can be told, else cut.
  void EndStream(Relayed* r, const absl::Status& error) {
    absl::optional<std::string> last = r->stream->Ending(error, relay_->aborting_());
    StopUpstream(r);
    if (!last.has_value() || !r->chunked) {  // a body of announced length can only be cut
      Close(r);
      return;
    }
    AppendChunk(*last, &r->out);
    r->out.append(kLastChunk);
    r->phase = Phase::kFinishing;
    Flush(r);
  }

  // Unregisters the upstream socket and finishes the stream (its connection goes back to the
  // pool if the body was complete, is closed otherwise; the request is logged).
  void StopUpstream(Relayed* r) {
    if (r->upstream_fd >= 0) {
      if (!r->upstream_paused) ::epoll_ctl(epfd_, EPOLL_CTL_DEL, r->upstream_fd, nullptr);
      r->upstream_fd = -1;
    }
    if (r->stream != nullptr) {
      r->stream->Finish();
      r->stream.reset();
    }
  }

  void ClientGone(Relayed* r) {
    if (r->stream != nullptr) r->stream->record().stream_end = "client_disconnected";
    if (r->call != nullptr) {
      // Logged as nginx does: 499, the client closed the request.
      r->call->call->record().stream_end = "client_disconnected";
      if (r->call->call->record().status == 0) r->call->call->record().status = 499;
    }
    Close(r);
  }

  // Everything sent. False: the connection ended here.
  bool Finished(Relayed* r) {
    if (!r->keep_alive || relay_->aborting_()) {
      Close(r);
      return false;
    }
    r->phase = Phase::kIdle;
    r->idle_deadline = absl::Now() + relay_->options_.keep_alive_timeout;
    SetClientEvents(r, EPOLLIN | EPOLLRDHUP);
    relay_->server_->SetDetachedIdle(r->client_fd, true);
    return true;
  }

  // The client sent a request the loop leaves to the server: back to a server thread, with
  // the bytes read so far.
  void Resume(Relayed* r) {
    ::epoll_ctl(epfd_, EPOLL_CTL_DEL, r->client_fd, nullptr);
    relay_->server_->ResumeConnection(r->client_fd, std::move(r->in));
    streams_.erase(r);
  }

  void Close(Relayed* r) {
    EndCall(r, /*abandon=*/true);
    StopUpstream(r);
    ::epoll_ctl(epfd_, EPOLL_CTL_DEL, r->client_fd, nullptr);
    relay_->server_->CloseDetached(r->client_fd);
    streams_.erase(r);
  }

  // ---------------------------------------------------------------------------------------
  // Serving requests

  // Reads what the client sent and serves, waits for more, or hands the request back.
  void ReadRequest(Relayed* r) {
    bool eof = false;
    for (;;) {
      if (r->in.size() > kMaxRequestHeadBytes + relay_->options_.max_body_bytes) break;
      // Into the loop's scratch buffer, then only what arrived is appended (a request is
      // usually far smaller than the buffer).
      ssize_t n = ::recv(r->client_fd, scratch_, sizeof(scratch_), MSG_DONTWAIT);
      if (n > 0) {
        r->in.append(scratch_, static_cast<size_t>(n));
        if (static_cast<size_t>(n) < sizeof(scratch_)) break;  // most likely all there is
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
      eof = true;  // closed (0) or reset
      break;
    }
    if (r->in.empty()) {
      Close(r);
      return;
    }
    if (r->phase == Phase::kIdle) {
      r->phase = Phase::kReading;
      r->read_deadline = absl::Now() + relay_->options_.read_timeout;
      relay_->server_->SetDetachedIdle(r->client_fd, false);
    }
    TryServe(r);
    if (eof && streams_.count(r) != 0 && r->phase == Phase::kReading) Close(r);
  }

  // Serves the buffered request in the loop if it is complete and the loop may; hands it back
  // to a server thread if the loop may not; else waits for more bytes.
  void TryServe(Relayed* r) {
    if (relay_->proxy_ == nullptr) {  // the loops only relay streams
      Resume(r);
      return;
    }
    size_t head_end = FindHeadEnd(r->in, &r->head_scan);
    if (head_end == absl::string_view::npos) {
      if (r->in.size() > kMaxRequestHeadBytes) Resume(r);
      return;
    }
    RequestHead head;
    if (!ParseRequestHead(absl::string_view(r->in).substr(0, head_end), &head).ok() ||
        head.version_minor != 1 || head.has_transfer_encoding || head.has_expect ||
        head.content_length > relay_->options_.max_body_bytes) {
      Resume(r);
      return;
    }
    // httplib refuses longer targets (414) and header lines: let it.
    bool long_line = head.target.size() > kMaxLineBytes;
    for (const HttpHeader& h : head.headers) {
      long_line = long_line || h.name.size() + h.value.size() + 2 > kMaxLineBytes;
    }
    if (long_line) {
      Resume(r);
      return;
    }
    const bool with_body = head.method == "POST" || head.method == "PUT" ||
                           head.method == "PATCH" || head.method == "DELETE";
    if (!with_body && head.method != "GET") {
      Resume(r);
      return;
    }
    // httplib reads and drops the body of a GET; the loop does not bother.
    if (!with_body && head.content_length > 0) {
      Resume(r);
      return;
    }
    const size_t total = head_end + static_cast<size_t>(head.content_length);
    if (r->in.size() < total) return;  // the body is still arriving
    absl::string_view path = SplitTarget(head.target).first;
    if (r->in.size() > total || path.find('%') != absl::string_view::npos) {
      // A pipelined request behind this one, or a path httplib decodes: the server's way.
      Resume(r);
      return;
    }
    absl::string_view body = absl::string_view(r->in).substr(head_end);
    BodySummary summary = SummarizeBody(body);
    std::shared_ptr<RequestRecord> record = relay_->admit_(head, path, body, r->peer_ip);
    if (record == nullptr) {
      Resume(r);
      return;
    }
    Proxy* proxy = relay_->proxy_;
    auto call = std::make_shared<LoopCall>();
    call->body = r->in.substr(head_end);
    call->keep_alive = head.keep_alive;
    call->call = std::make_unique<ProxyCall>(
        proxy, std::move(record), std::move(summary),
        proxy->UpstreamRequestFor(head.method, head.target, head.headers, call->body));
    call->cancel = std::make_shared<CancelToken>();
    proxy->Track(call->cancel);
    r->in.clear();
    r->head_scan = 0;
    r->call = std::move(call);
    r->phase = Phase::kUpstream;
    r->read_deadline = absl::InfiniteFuture();
    if (proxy->aborting()) {
      Answer(r, r->call->call->ShuttingDown());
      return;
    }
    NextAttempt(r);
  }

  // Starts the next attempt of the call on `r`, or answers when none is left.
  void NextAttempt(Relayed* r) {
    LoopCall& c = *r->call;
    Proxy* proxy = relay_->proxy_;
    for (;;) {
      if (!c.call->NextAttempt()) {
        Answer(r, c.call->FinalAnswer());
        return;
      }
      absl::StatusOr<std::unique_ptr<UpstreamExchange>> started =
          proxy->client()->StartInLoop(c.call->request(), c.cancel);
      if (!started.ok()) {
        c.call->TransportFailed(started.status());
        continue;
      }
      if (*started == nullptr) {
        RunOnWorker(r);
        return;
      }
      c.exchange = std::move(*started);
      const UpstreamClientOptions& upstream = relay_->proxy_->client()->options();
      c.deadline = absl::Now() + (c.exchange->connecting() ? upstream.connect_timeout
                                                           : upstream.write_timeout);
      r->upstream_fd = c.exchange->fd();  // watched from its first wait (SetUpstreamEvents)
      r->upstream_events = 0;
      r->upstream_paused = false;
      r->phase = Phase::kUpstream;
      AdvanceCall(r);
      return;
    }
  }

  // An attempt needs a new upstream connection: a worker opens it (DNS, connect and TLS
  // handshake may block); the loop then sends the request on it.
  void RunOnWorker(Relayed* r) {
    r->phase = Phase::kWorker;
    std::shared_ptr<LoopCall> call = r->call;
    UpstreamClient* client = relay_->proxy_->client();
    // Bounded like a connect, plus time to get a worker: past it the attempt counts as failed
    // (the worker's late result is then dropped).
    call->deadline = absl::Now() + client->options().connect_timeout + kWorkerQueueSlack;
    const uint64_t serial = ++call->worker_serial;
    // The worker gets its own copy: the loop may move on to the next attempt meanwhile (the
    // body it refers to is the call's, which the worker keeps alive).
    UpstreamRequest request = call->call->request();
    relay_->workers_->enqueue([this, r, call, client, serial,
                               request = std::move(request)]() mutable {
      absl::StatusOr<std::unique_ptr<UpstreamExchange>> opened = client->Open(request, call->cancel);
      PostSent(r, std::move(call), serial, std::move(opened));
    });
  }

  // A worker's connection is back (or the connect failed).
  void OnSent(Relayed* r, absl::StatusOr<std::unique_ptr<UpstreamExchange>> opened) {
    LoopCall& c = *r->call;
    if (!opened.ok()) {
      AttemptFailed(r, opened.status());
      return;
    }
    c.exchange = std::move(*opened);
    c.deadline = absl::Now() + relay_->proxy_->client()->options().write_timeout;
    r->upstream_fd = c.exchange->fd();
    r->upstream_events = 0;
    r->upstream_paused = false;
    r->phase = Phase::kUpstream;
    AdvanceCall(r);
  }

  // The current attempt failed before anything was committed: the next one, or the answer.
  void AttemptFailed(Relayed* r, const absl::Status& error) {
    DropExchange(r);
    if (relay_->proxy_->aborting()) {
      Answer(r, r->call->call->ShuttingDown());
      return;
    }
    r->call->call->TransportFailed(error);
    NextAttempt(r);
  }

  // Unregisters and closes (or pools, when its body was read) the attempt's exchange.
  void DropExchange(Relayed* r) {
    if (r->upstream_fd >= 0) {
      if (!r->upstream_paused && r->upstream_events != 0) {
        ::epoll_ctl(epfd_, EPOLL_CTL_DEL, r->upstream_fd, nullptr);
      }
      r->upstream_fd = -1;
      r->upstream_events = 0;
    }
    if (r->call != nullptr) r->call->exchange.reset();
  }

  // Drives the exchange in progress as far as it goes without waiting.
  void AdvanceCall(Relayed* r) {
    LoopCall& c = *r->call;
    if (c.exchange == nullptr) return;
    if (!c.exchange->head_complete()) {
      const bool was_connecting = c.exchange->connecting();
      const bool was_written = c.exchange->request_written();
      UpstreamExchange::Wait wait;
      absl::StatusOr<bool> done = c.exchange->TryCompleteHead(&wait);
      if (was_connecting && !c.exchange->connecting()) {
        // Connected: from now on the wait is for writing the request.
        c.deadline = absl::Now() + relay_->proxy_->client()->options().write_timeout;
      }
      if (!was_written && c.exchange->request_written()) {
        // The request is out: from now on the wait is for the answer.
        c.deadline = absl::Now() + relay_->options_.first_byte_timeout;
      }
      if (!done.ok()) {
        if (c.exchange->stale() || c.exchange->connect_failed()) {
          // The server had closed the pooled connection, or the cached address refused: a
          // worker opens a fresh connection (resolving again, trying every address).
          if (c.exchange->stale()) relay_->proxy_->client()->CountStaleRetry();
          DropExchange(r);
          RunOnWorker(r);
          return;
        }
        AttemptFailed(r, done.status());
        return;
      }
      if (!*done) {
        SetUpstreamEvents(r, wait == UpstreamExchange::Wait::kWrite ? EPOLLOUT : EPOLLIN);
        return;
      }
      OnHead(r);
      return;
    }
    if (c.awaiting_first_byte) {
      ReadFirstByte(r);
      return;
    }
    ReadCallBody(r);
  }

  // The response head of the attempt is in.
  void OnHead(Relayed* r) {
    LoopCall& c = *r->call;
    const ResponseHead& head = c.exchange->head();
    c.response_body.clear();
    c.deadline = absl::Now() + relay_->options_.idle_timeout;
    if (ProxyCall::IsKeyFailure(head.status)) {
      c.refused = true;
      ReadCallBody(r);
      return;
    }
    c.refused = false;
    const bool whole = head.framing == BodyFraming::kContentLength &&
                       static_cast<size_t>(head.content_length) <=
                           relay_->proxy_->options().buffer_limit;
    if (head.framing != BodyFraming::kNone && !whole && c.call->summary().stream &&
        head.status < 300) {
      // A stream must show its first byte before sflb commits to it: a stall is retried on
      // another key (as on the server's way, see Proxy::Forward).
      c.awaiting_first_byte = true;
      c.deadline = absl::Now() + relay_->proxy_->options().stream_first_byte_timeout;
      ReadFirstByte(r);
      return;
    }
    c.call->Commit(head);
    if (head.framing == BodyFraming::kNone) {
      AnswerCommitted(r);
      return;
    }
    if (whole) {
      c.response_body.reserve(static_cast<size_t>(head.content_length));
      ReadCallBody(r);
      return;
    }
    StreamCommitted(r, absl::string_view());
  }

  // A stream's first body bytes, before committing to it.
  void ReadFirstByte(Relayed* r) {
    LoopCall& c = *r->call;
    UpstreamExchange::Wait wait;
    absl::StatusOr<absl::string_view> piece = c.exchange->TryReadSome(&wait);
    if (!piece.ok()) {
      StreamStalled(r, piece.status(), /*stalled=*/false);
      return;
    }
    if (piece->empty() && wait != UpstreamExchange::Wait::kNone) {
      SetUpstreamEvents(r, wait == UpstreamExchange::Wait::kWrite ? EPOLLOUT : EPOLLIN);
      return;
    }
    // Some bytes, or a body that ended empty: commit.
    c.awaiting_first_byte = false;
    c.call->Commit(c.exchange->head());
    StreamCommitted(r, *piece);
  }

  // A stream broke or stalled before its first byte: the next attempt.
  void StreamStalled(Relayed* r, const absl::Status& error, bool stalled) {
    LoopCall& c = *r->call;
    const int status = c.exchange->head().status;
    const ResponseHead head_seen = c.exchange->head();
    c.awaiting_first_byte = false;
    DropExchange(r);
    if (relay_->proxy_->aborting()) {
      Answer(r, c.call->ShuttingDown());
      return;
    }
    c.call->SawHead(head_seen);
    c.call->TransportFailed(
        stalled ? absl::DeadlineExceededError(absl::StrCat(
                      "no first byte within ",
                      absl::FormatDuration(relay_->proxy_->options().stream_first_byte_timeout)))
                : error,
        stalled ? "first_byte_timeout" : "transport", status, "upstream_stream_stalled");
    NextAttempt(r);
  }

  // Reads a refused key's error body or a committed plain body, as far as it has arrived.
  void ReadCallBody(Relayed* r) {
    LoopCall& c = *r->call;
    for (;;) {
      UpstreamExchange::Wait wait;
      absl::StatusOr<absl::string_view> piece = c.exchange->TryReadSome(&wait);
      absl::Status error;
      if (!piece.ok()) {
        error = piece.status();
      } else if (piece->empty() && wait != UpstreamExchange::Wait::kNone) {
        SetUpstreamEvents(r, wait == UpstreamExchange::Wait::kWrite ? EPOLLOUT : EPOLLIN);
        return;
      } else if (!piece->empty()) {
        c.deadline = absl::Now() + relay_->options_.idle_timeout;
        if (c.refused && c.response_body.size() + piece->size() > kMaxRefusalBodyBytes) {
          error = absl::OutOfRangeError("body too large");
        } else {
          c.response_body.append(piece->data(), piece->size());
          continue;
        }
      }
      BodyDone(r, error);
      return;
    }
  }

  // The body being read ended (completely when `error` is OK).
  void BodyDone(Relayed* r, const absl::Status& error) {
    LoopCall& c = *r->call;
    if (c.refused) {
      c.call->KeyRefused(c.exchange->head(), std::move(c.response_body), error);
      c.response_body.clear();
      c.refused = false;
      DropExchange(r);  // pooled again when its body was read
      if (relay_->proxy_->aborting()) {
        Answer(r, c.call->ShuttingDown());
        return;
      }
      NextAttempt(r);
      return;
    }
    if (!error.ok()) {
      RequestRecord& record = c.call->record();
      record.status = 502;
      record.error_code = "upstream_broken_response";
      Answer(r, ProxyAnswer{502, {}, "application/json",
                            OpenAiErrorJson(absl::StrCat("upstream response broke off: ",
                                                         error.message()),
                                            "upstream_error", "upstream_broken_response")});
      return;
    }
    c.call->CountUsage(c.response_body);
    AnswerCommitted(r);
  }

  // No upstream byte within the deadline of the current wait.
  void CallTimedOut(Relayed* r) {
    LoopCall& c = *r->call;
    const bool head_wait = c.exchange == nullptr || !c.exchange->head_complete();
    const bool connect_wait = head_wait && c.exchange != nullptr && c.exchange->connecting();
    const bool write_wait = head_wait && c.exchange != nullptr && !c.exchange->request_written();
    const UpstreamClientOptions& upstream = relay_->proxy_->client()->options();
    absl::Status error = absl::DeadlineExceededError(
        connect_wait
            ? absl::StrCat("upstream connect to ", relay_->proxy_->client()->endpoint().Origin(),
                           ": timed out after ", absl::FormatDuration(upstream.connect_timeout))
        : write_wait
            ? absl::StrCat("upstream request write: timed out after ",
                           absl::FormatDuration(upstream.write_timeout))
            : absl::StrCat(
                  head_wait ? "upstream response head: timed out after "
                            : "upstream body: no data for ",
                  absl::FormatDuration(head_wait ? relay_->options_.first_byte_timeout
                                                 : relay_->options_.idle_timeout)));
    if (c.awaiting_first_byte) {
      StreamStalled(r, error, /*stalled=*/true);
    } else if (head_wait) {
      AttemptFailed(r, error);
    } else {
      BodyDone(r, error);
    }
  }

  // Sends the committed upstream response, its body read whole.
  void AnswerCommitted(Relayed* r) {
    LoopCall& c = *r->call;
    const ResponseHead& head = c.exchange->head();
    ProxyAnswer answer;
    answer.status = head.status;
    answer.headers = ClientResponseHeaders(head, &answer.content_type);
    answer.body = std::move(c.response_body);
    DropExchange(r);
    Answer(r, std::move(answer));
  }

  // Sends `answer` as the whole response and ends the call.
  void Answer(Relayed* r, ProxyAnswer answer) {
    LoopCall& c = *r->call;
    RequestRecord& record = c.call->record();
    answer.headers.push_back({"x-request-id", record.request_id});
    r->keep_alive = c.keep_alive && !relay_->server_->draining();
    const bool bodiless_status = answer.status == 204 || answer.status == 304;
    std::string framing = bodiless_status ? std::string()
                                          : absl::StrCat("Content-Length: ", answer.body.size());
    r->out = ResponseHeadBytes(answer.status, answer.headers, answer.content_type, framing,
                               r->keep_alive);
    if (!bodiless_status) r->out.append(answer.body);
    r->out_off = 0;
    EndCall(r);  // the request is logged now, as on the server's way
    r->phase = Phase::kFinishing;
    Flush(r);
  }

  // A chunked or large committed response: relayed as a stream from here, starting with
  // `first` (body bytes already read).
  void StreamCommitted(Relayed* r, absl::string_view first) {
    LoopCall& c = *r->call;
    const ResponseHead& head = c.exchange->head();
    std::string content_type;
    std::vector<HttpHeader> headers = ClientResponseHeaders(head, &content_type);
    headers.push_back({"x-request-id", c.call->record().request_id});
    r->keep_alive = c.keep_alive && !relay_->server_->draining();
    // A body of known length keeps it (as on the server's way); others are re-framed chunked.
    r->chunked = head.framing != BodyFraming::kContentLength;
    r->out = ResponseHeadBytes(
        head.status, headers, content_type,
        r->chunked ? std::string("Transfer-Encoding: chunked")
                   : absl::StrCat("Content-Length: ", head.content_length),
        r->keep_alive);
    r->out_off = 0;
    r->stream = std::make_unique<ResponseStream>(
        std::move(c.exchange), c.call->key(), relay_->proxy_->reports(), c.call->shared_record(),
        relay_->proxy_->metrics(), absl::StartsWithIgnoreCase(content_type, "text/event-stream"));
    r->stream->Forwarded(first);
    if (r->chunked) {
      AppendChunk(first, &r->out);
    } else {
      r->out.append(first.data(), first.size());
    }
    EndCall(r);
    r->phase = Phase::kStreaming;
    r->last_upstream = absl::Now();
    SetUpstreamEvents(r, EPOLLIN);
    if (Flush(r)) ReadUpstream(r);
  }

  // The loop is done with the call on `r`: answered, streaming (the stream's exchange keeps
  // obeying the call's cancel token, so it is not cancelled here), or abandoned (`abandon`: a
  // worker still sending ends at once, the exchange in progress is closed).
  void EndCall(Relayed* r, bool abandon = false) {
    if (r->call == nullptr) return;
    std::shared_ptr<LoopCall> call = std::move(r->call);
    if (abandon) call->cancel->Cancel();
    relay_->proxy_->Forget(call->cancel);
    if (call->exchange != nullptr) DropExchange(r);
    call->exchange.reset();
  }

  void Tick(absl::Time now) {
    const bool aborting = relay_->aborting_();
    std::vector<Relayed*> all;
    all.reserve(streams_.size());
    for (auto& [r, owned] : streams_) all.push_back(r);
    for (Relayed* r : all) {
      if (streams_.count(r) == 0) continue;
      if (r->phase == Phase::kIdle) {
        if (now >= r->idle_deadline || aborting) Close(r);
        continue;
      }
      if (r->phase == Phase::kReading) {
        if (now >= r->read_deadline || aborting) Close(r);
        continue;
      }
      if (r->phase == Phase::kUpstream) {
        if (aborting) {
          r->call->cancel->Cancel();
          AdvanceCall(r);
        } else if (now >= r->call->deadline) {
          CallTimedOut(r);
        }
        continue;
      }
      if (r->phase == Phase::kWorker) {
        if (aborting) {
          r->call->cancel->Cancel();  // the worker's connect ends at once
        } else if (now >= r->call->deadline) {
          AttemptFailed(r, absl::DeadlineExceededError(absl::StrCat(
                               "upstream connect: no connection within ",
                               absl::FormatDuration(relay_->proxy_->client()->options()
                                                        .connect_timeout +
                                                    kWorkerQueueSlack))));
        }
        continue;
      }
      if (now - r->write_blocked_since > relay_->options_.write_timeout) {
        if (r->stream != nullptr) r->stream->record().stream_end = "client_write_timeout";
        Close(r);
        continue;
      }
      if (r->phase != Phase::kStreaming) continue;
      if (aborting) {
        EndStream(r, absl::CancelledError("replica shutting down"));
      } else if (!r->upstream_paused &&
                 now - r->last_upstream > relay_->options_.idle_timeout) {
        EndStream(r, absl::DeadlineExceededError(absl::StrCat(
                         "upstream body: no data for ",
                         absl::FormatDuration(relay_->options_.idle_timeout))));
      }
    }
  }

  StreamRelay* const relay_;
  int epfd_ = -1;
  int wakefd_ = -1;
  bool ok_ = false;
  std::thread thread_;
  Mutex mu_;
  std::vector<std::unique_ptr<Relayed>> incoming_ ABSL_GUARDED_BY(mu_);
  struct Sent {
    Relayed* r;
    std::shared_ptr<LoopCall> call;
    uint64_t serial;  // LoopCall::worker_serial of the attempt
    absl::StatusOr<std::unique_ptr<UpstreamExchange>> sent;
  };
  std::vector<Sent> sent_ ABSL_GUARDED_BY(mu_);  // workers' results
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  // Loop thread only.
  std::unordered_map<Relayed*, std::unique_ptr<Relayed>> streams_;
  std::vector<Relayed*> ready_;
  std::vector<Relayed*> again_;  // streams that stopped at kMaxReadsPerWake
  char scratch_[16 * 1024];      // ReadRequest's receive buffer
};

StreamRelay::StreamRelay(StreamRelayOptions options, HttpServer* server,
                         std::function<bool()> aborting)
    : options_(options), server_(server), aborting_(std::move(aborting)) {
  for (int i = 0; i < std::max(1, options_.threads); ++i) {
    loops_.push_back(std::make_unique<Loop>(this));
  }
}

StreamRelay::StreamRelay(StreamRelayOptions options, HttpServer* server, Proxy* proxy,
                         LoopAdmission admit)
    : options_(options),
      server_(server),
      proxy_(proxy),
      admit_(std::move(admit)),
      aborting_([proxy] { return proxy->aborting(); }),
      workers_(std::make_unique<ElasticThreadPool>(std::max<size_t>(1, options.max_workers),
                                                   /*min_idle=*/1, absl::Seconds(30))) {
  for (int i = 0; i < std::max(1, options_.threads); ++i) {
    loops_.push_back(std::make_unique<Loop>(this));
  }
}

bool StreamRelay::Park(int fd) {
  if (proxy_ == nullptr || stopped_.load()) return false;
  Loop* loop = loops_[next_loop_.fetch_add(1, std::memory_order_relaxed) % loops_.size()].get();
  if (!loop->ok()) return false;
  auto r = std::make_unique<Relayed>();
  r->peer_ip = PeerIp(fd);
  int flags = ::fcntl(fd, F_GETFL, 0);
  if (flags >= 0) ::fcntl(fd, F_SETFL, flags | O_NONBLOCK);
  r->client_fd = fd;
  loop->Add(std::move(r));
  return true;
}

StreamRelay::~StreamRelay() { Stop(); }

bool StreamRelay::Adopt(std::unique_ptr<ResponseStream>& stream, std::string head,
                        bool keep_alive) {
  if (stopped_.load()) return false;
  Loop* loop = loops_[next_loop_.fetch_add(1, std::memory_order_relaxed) % loops_.size()].get();
  if (!loop->ok()) return false;
  const int upstream_fd = stream->exchange()->fd();
  if (upstream_fd < 0) return false;
  const int fd = server_->DetachConnection();
  if (fd < 0) return false;
  int flags = ::fcntl(fd, F_GETFL, 0);
  if (flags >= 0) ::fcntl(fd, F_SETFL, flags | O_NONBLOCK);
  auto r = std::make_unique<Relayed>();
  r->stream = std::move(stream);
  r->client_fd = fd;
  if (proxy_ != nullptr) r->peer_ip = PeerIp(fd);  // for the requests served after the stream
  r->upstream_fd = upstream_fd;
  r->keep_alive = keep_alive;
  r->out = std::move(head);
  loop->Add(std::move(r));
  return true;
}

void StreamRelay::Stop() {
  if (stopped_.exchange(true)) return;
  // The loops end their calls (cancelling what workers still send), then the workers finish.
  for (auto& loop : loops_) loop->Stop();
  if (workers_ != nullptr) workers_->shutdown();
}

}  // namespace sflb
