#include "dataplane/stream_relay.h"

#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <thread>
#include <unordered_map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "common/mutex.h"

namespace sflb {
namespace {

constexpr char kLastChunk[] = "0\r\n\r\n";
// Pieces read from one upstream per wake-up before the loop serves the others.
constexpr int kMaxReadsPerWake = 32;

enum class Phase {
  kStreaming,  // upstream body being relayed
  kFinishing,  // the body's last bytes are queued; then idle (keep-alive) or close
  kIdle,       // waiting for the client's next request
};

// One relayed connection. Owned by its loop thread.
struct Relayed {
  std::unique_ptr<ResponseStream> stream;  // null once finished
  int client_fd = -1;
  int upstream_fd = -1;  // registered in epoll while >= 0
  Phase phase = Phase::kStreaming;
  bool keep_alive = true;
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

  size_t pending() const { return out.size() - out_off; }
};

// epoll data: the Relayed pointer, low bit set for its upstream socket.
uint64_t Tag(Relayed* r, bool upstream) {
  return reinterpret_cast<uint64_t>(r) | (upstream ? 1u : 0u);
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
    r->stream->record().stream_end = "server_shutdown";
    r->stream.reset();
    relay_->server_->CloseDetached(r->client_fd);
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
      Close(r);
    }
  }

  void Start(std::unique_ptr<Relayed> owned) {
    Relayed* r = owned.get();
    streams_.emplace(r, std::move(owned));
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
    if (r->phase != Phase::kStreaming || r->upstream_paused) return;
    ReadUpstream(r);
  }

  void OnClient(Relayed* r, uint32_t events) {
    if (r->phase == Phase::kIdle) {
      if ((events & (EPOLLHUP | EPOLLERR)) == 0 && (events & EPOLLIN) != 0) {
        Resume(r);
      } else {
        Close(r);  // hung up or reset while idle
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
      AppendChunk(*piece, &r->out);
      // Send what is there before reading on: each event reaches the client at once.
      if (!Flush(r)) return;
    }
    Flush(r);
  }

  void SetUpstreamEvents(Relayed* r, uint32_t events) {
    if (r->upstream_fd < 0 || r->upstream_paused || r->upstream_events == events) return;
    epoll_event ev{};
    ev.events = events;
    ev.data.u64 = Tag(r, true);
    ::epoll_ctl(epfd_, EPOLL_CTL_MOD, r->upstream_fd, &ev);
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
    r->out.append(kLastChunk);
    StopUpstream(r);
    r->phase = Phase::kFinishing;
    Flush(r);
  }

  // The upstream stream cannot go on: end it well-formed if the client can be told, else cut.
  void EndStream(Relayed* r, const absl::Status& error) {
    absl::optional<std::string> last = r->stream->Ending(error, relay_->aborting_());
    StopUpstream(r);
    if (!last.has_value()) {
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

  // The client sent its next request: back to the server.
  void Resume(Relayed* r) {
    ::epoll_ctl(epfd_, EPOLL_CTL_DEL, r->client_fd, nullptr);
    relay_->server_->ResumeConnection(r->client_fd);
    streams_.erase(r);
  }

  void Close(Relayed* r) {
    StopUpstream(r);
    ::epoll_ctl(epfd_, EPOLL_CTL_DEL, r->client_fd, nullptr);
    relay_->server_->CloseDetached(r->client_fd);
    streams_.erase(r);
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
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  // Loop thread only.
  std::unordered_map<Relayed*, std::unique_ptr<Relayed>> streams_;
  std::vector<Relayed*> ready_;
  std::vector<Relayed*> again_;  // streams that stopped at kMaxReadsPerWake
};

StreamRelay::StreamRelay(StreamRelayOptions options, HttpServer* server,
                         std::function<bool()> aborting)
    : options_(options), server_(server), aborting_(std::move(aborting)) {
  for (int i = 0; i < std::max(1, options_.threads); ++i) {
    loops_.push_back(std::make_unique<Loop>(this));
  }
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
  r->upstream_fd = upstream_fd;
  r->keep_alive = keep_alive;
  r->out = std::move(head);
  loop->Add(std::move(r));
  return true;
}

void StreamRelay::Stop() {
  if (stopped_.exchange(true)) return;
  for (auto& loop : loops_) loop->Stop();
}

}  // namespace sflb
