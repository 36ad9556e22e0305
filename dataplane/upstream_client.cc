#include "dataplane/upstream_client.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <deque>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"

namespace sflb {

// ---------------------------------------------------------------------------------------------
// Endpoint parsing

namespace {

bool IsIpv6Literal(absl::string_view host) { return host.find(':') != absl::string_view::npos; }

bool IsIpLiteral(const std::string& host) {
  unsigned char buf[sizeof(struct in6_addr)];
  return inet_pton(AF_INET, host.c_str(), buf) == 1 || inet_pton(AF_INET6, host.c_str(), buf) == 1;
}

}  // namespace

std::string UpstreamEndpoint::HostHeader() const {
  std::string out = IsIpv6Literal(host) ? absl::StrCat("[", host, "]") : host;
  if (port != (tls ? 443 : 80)) absl::StrAppend(&out, ":", port);
  return out;
}

std::string UpstreamEndpoint::Origin() const {
  return absl::StrCat(tls ? "https://" : "http://",
                      IsIpv6Literal(host) ? absl::StrCat("[", host, "]") : host, ":", port);
}

absl::StatusOr<UpstreamEndpoint> ParseBaseUrl(absl::string_view url) {
  url = absl::StripAsciiWhitespace(url);
  UpstreamEndpoint ep;
  size_t sep = url.find("://");
  if (sep == absl::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("base URL \"", url, "\" must start with http:// or https://"));
  }
  std::string scheme = absl::AsciiStrToLower(url.substr(0, sep));
  if (scheme == "https") {
    ep.tls = true;
    ep.port = 443;
  } else if (scheme == "http") {
    ep.tls = false;
    ep.port = 80;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("base URL has unsupported scheme \"", scheme, "\" (want http or https)"));
  }
  absl::string_view rest = url.substr(sep + 3);
  size_t auth_end = rest.find_first_of("/?#");
  absl::string_view authority = rest.substr(0, auth_end);
  absl::string_view path =
      auth_end == absl::string_view::npos ? absl::string_view() : rest.substr(auth_end);
  if (authority.find('@') != absl::string_view::npos) {
    return absl::InvalidArgumentError("base URL must not contain user info (user@host)");
  }
  if (authority.empty()) return absl::InvalidArgumentError("base URL has no host");

  absl::string_view host;
  absl::string_view port_text;
  bool has_port = false;
  if (authority[0] == '[') {
    size_t close = authority.find(']');
    if (close == absl::string_view::npos) {
      return absl::InvalidArgumentError("base URL has an unterminated IPv6 literal");
    }
    host = authority.substr(1, close - 1);
    std::string host_str(host);
    unsigned char buf[sizeof(struct in6_addr)];
    if (inet_pton(AF_INET6, host_str.c_str(), buf) != 1) {
      return absl::InvalidArgumentError("base URL has an invalid IPv6 literal");
    }
    absl::string_view after = authority.substr(close + 1);
    if (!after.empty()) {
      if (after[0] != ':') return absl::InvalidArgumentError("base URL has junk after the host");
      has_port = true;
      port_text = after.substr(1);
    }
  } else {
    size_t colon = authority.find(':');
    host = authority.substr(0, colon);
    if (colon != absl::string_view::npos) {
      has_port = true;
      port_text = authority.substr(colon + 1);
    }
    if (host.empty()) return absl::InvalidArgumentError("base URL has no host");
    for (char c : host) {
      if (!absl::ascii_isalnum(c) && c != '-' && c != '.' && c != '_') {
        return absl::InvalidArgumentError(
            absl::StrCat("base URL host \"", host, "\" has an invalid character"));
      }
    }
  }
  if (host.empty()) return absl::InvalidArgumentError("base URL has no host");
  ep.host = absl::AsciiStrToLower(host);

  if (has_port) {
    int port = 0;
    bool digits = !port_text.empty() && port_text.size() <= 5;
    for (char c : port_text) digits = digits && absl::ascii_isdigit(c);
    if (!digits || !absl::SimpleAtoi(port_text, &port) || port < 1 || port > 65535) {
      return absl::InvalidArgumentError(
          absl::StrCat("base URL has an invalid port \"", port_text, "\" (want 1-65535)"));
    }
    ep.port = port;
  }

  if (path.find_first_of("?#") != absl::string_view::npos) {
    return absl::InvalidArgumentError("base URL must not contain a query or fragment");
  }
  for (char c : path) {
    unsigned char u = static_cast<unsigned char>(c);
    if (u <= 0x20 || u == 0x7f) {
      return absl::InvalidArgumentError("base URL path has a space or control character");
    }
  }
  while (!path.empty() && path.back() == '/') path.remove_suffix(1);
  ep.base_path = std::string(path);
  return ep;
}

// ---------------------------------------------------------------------------------------------
// CancelToken

void CancelToken::Cancel() {
  cancelled_.store(true, std::memory_order_release);
  MutexLock lock(&mu_);
  // shutdown() (not close()) wakes a poll() blocked on the socket in another thread at once;
  // the fd stays valid until its owner unregisters it under mu_ and closes it.
  for (int fd : fds_) ::shutdown(fd, SHUT_RDWR);
}

void CancelToken::Register(int fd) {
  MutexLock lock(&mu_);
  fds_.push_back(fd);
  if (cancelled_.load(std::memory_order_acquire)) ::shutdown(fd, SHUT_RDWR);
}

void CancelToken::Unregister(int fd) {
  MutexLock lock(&mu_);
  auto it = std::find(fds_.begin(), fds_.end(), fd);
  if (it != fds_.end()) fds_.erase(it);
}

namespace upstream_internal {
namespace {

// ---------------------------------------------------------------------------------------------
// A socket BIO for OpenSSL that sends with MSG_NOSIGNAL: OpenSSL's own socket BIO uses write(),
// which raises SIGPIPE on a reset connection unless the whole process ignores it.

int NsBioWrite(BIO* bio, const char* data, int len) {
  int fd = static_cast<int>(reinterpret_cast<intptr_t>(BIO_get_data(bio)));
  BIO_clear_retry_flags(bio);
  ssize_t n;
  do {
    n = ::send(fd, data, static_cast<size_t>(len), MSG_NOSIGNAL);
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) BIO_set_retry_write(bio);
    return -1;
  }
  return static_cast<int>(n);
}

int NsBioRead(BIO* bio, char* out, int len) {
  int fd = static_cast<int>(reinterpret_cast<intptr_t>(BIO_get_data(bio)));
  BIO_clear_retry_flags(bio);
  ssize_t n;
  do {
    n = ::recv(fd, out, static_cast<size_t>(len), 0);
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) BIO_set_retry_read(bio);
    return -1;
  }
  if (n == 0) BIO_set_flags(bio, BIO_FLAGS_IN_EOF);  // lets SSL_OP_IGNORE_UNEXPECTED_EOF work
  return static_cast<int>(n);
}

int NsBioPuts(BIO* bio, const char* str) {
  return NsBioWrite(bio, str, static_cast<int>(std::strlen(str)));
}

long NsBioCtrl(BIO* bio, int cmd, long /*num*/, void* /*ptr*/) {  // NOLINT(runtime/int)
  switch (cmd) {
    case BIO_CTRL_FLUSH:
      return 1;
    case BIO_CTRL_EOF:
      return BIO_test_flags(bio, BIO_FLAGS_IN_EOF) != 0 ? 1 : 0;
    default:
      return 0;
  }
}

int NsBioCreate(BIO* bio) {
  BIO_set_init(bio, 0);
  BIO_set_data(bio, nullptr);
  return 1;
}

int NsBioDestroy(BIO* /*bio*/) { return 1; }  // the Connection owns and closes the fd

BIO_METHOD* NoSigpipeBioMethod() {
  static BIO_METHOD* method = [] {
    BIO_METHOD* m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "sflb socket");
    BIO_meth_set_write(m, NsBioWrite);
    BIO_meth_set_read(m, NsBioRead);
    BIO_meth_set_puts(m, NsBioPuts);
    BIO_meth_set_ctrl(m, NsBioCtrl);
    BIO_meth_set_create(m, NsBioCreate);
    BIO_meth_set_destroy(m, NsBioDestroy);
    return m;
  }();
  return method;
}

// Drains this thread's OpenSSL error queue into a short description.
std::string TakeSslErrors() {
  std::string out;
  unsigned long err;  // NOLINT(runtime/int)
  while ((err = ERR_get_error()) != 0) {
    char buf[256];
    ERR_error_string_n(err, buf, sizeof(buf));
    if (!out.empty()) out.append("; ");
    out.append(buf);
  }
  return out;
}

std::string ErrnoText(int err) {
  char buf[128];
  // GNU strerror_r returns the message pointer (which may or may not be buf).
  return std::string(strerror_r(err, buf, sizeof(buf)));
}

std::string DurationText(absl::Duration d) { return absl::FormatDuration(d); }

}  // namespace

// ---------------------------------------------------------------------------------------------
// Connection: one socket (and TLS session). Used by one thread at a time.

enum class IoKind { kOk, kEof, kWantRead, kWantWrite, kError };
struct IoResult {
  IoKind kind = IoKind::kOk;
  size_t n = 0;
  std::string error;  // set for kError only
};

struct Connection {
  explicit Connection(int fd_in) : fd(fd_in) {}
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;
  ~Connection() {
    Detach();
    if (ssl != nullptr) SSL_free(ssl);
    if (fd >= 0) ::close(fd);
  }

  // While attached, token->Cancel() shuts this socket down.
  void Attach(CancelToken* token);
  void Detach();

  IoResult Read(char* buf, size_t len);
  IoResult Write(const char* data, size_t len);

  // For a pooled connection about to be reused: false if the server closed it (EOF, reset) or
  // sent something unsolicited. Never blocks.
  bool IdleAlive();
  // Best-effort TLS close_notify before closing a healthy connection. Never blocks. Besides
  // politeness it matters for resumption: OpenSSL marks the session of an SSL freed without
  // SSL_shutdown as not resumable, and that session is the one cached from the last ticket.
  void SendCloseNotify() {
    if (ssl != nullptr) {
      ERR_clear_error();
      SSL_shutdown(ssl);
      ERR_clear_error();
    }
  }

  IoResult SslResult(int ret);

  int fd = -1;
  SSL* ssl = nullptr;
  absl::Time idle_since;
  CancelToken* attached = nullptr;
};

}  // namespace upstream_internal

class UpstreamCancelAccess {
 public:
  static void Register(CancelToken* t, int fd) { t->Register(fd); }
  static void Unregister(CancelToken* t, int fd) { t->Unregister(fd); }
};

namespace upstream_internal {

void Connection::Attach(CancelToken* token) {
  Detach();
  attached = token;
  UpstreamCancelAccess::Register(token, fd);
}

void Connection::Detach() {
  if (attached != nullptr) {
    UpstreamCancelAccess::Unregister(attached, fd);
    attached = nullptr;
  }
}

IoResult Connection::SslResult(int ret) {
  IoResult r;
  int e = SSL_get_error(ssl, ret);
  switch (e) {
    case SSL_ERROR_WANT_READ:
      r.kind = IoKind::kWantRead;
      return r;
    case SSL_ERROR_WANT_WRITE:
      r.kind = IoKind::kWantWrite;
      return r;
    case SSL_ERROR_ZERO_RETURN:
      r.kind = IoKind::kEof;
      return r;
    case SSL_ERROR_SYSCALL: {
      int err = errno;
      std::string ssl_errors = TakeSslErrors();
      if (ssl_errors.empty() && err == 0) {
        r.kind = IoKind::kEof;
        return r;
      }
      r.kind = IoKind::kError;
      r.error = ssl_errors.empty() ? ErrnoText(err) : ssl_errors;
      return r;
    }
    default:
      r.kind = IoKind::kError;
      r.error = absl::StrCat("TLS error: ", TakeSslErrors());
      return r;
  }
}

IoResult Connection::Read(char* buf, size_t len) {
  IoResult r;
  if (ssl != nullptr) {
    ERR_clear_error();
    errno = 0;
    int n = SSL_read(ssl, buf, static_cast<int>(std::min<size_t>(len, INT_MAX)));
    if (n > 0) {
      r.n = static_cast<size_t>(n);
      return r;
    }
    return SslResult(n);
  }
  ssize_t n;
  do {
    n = ::recv(fd, buf, len, 0);
  } while (n < 0 && errno == EINTR);
  if (n > 0) {
    r.n = static_cast<size_t>(n);
  } else if (n == 0) {
    r.kind = IoKind::kEof;
  } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
    r.kind = IoKind::kWantRead;
  } else {
    r.kind = IoKind::kError;
    r.error = ErrnoText(errno);
  }
  return r;
}

IoResult Connection::Write(const char* data, size_t len) {
  IoResult r;
  if (ssl != nullptr) {
    ERR_clear_error();
    errno = 0;
    int n = SSL_write(ssl, data, static_cast<int>(std::min<size_t>(len, INT_MAX)));
    if (n > 0) {
      r.n = static_cast<size_t>(n);
      return r;
    }
    IoResult s = SslResult(n);
    if (s.kind == IoKind::kEof) {  // EOF while writing: the peer is gone
      s.kind = IoKind::kError;
      s.error = "connection closed by peer";
    }
    return s;
  }
  ssize_t n;
  do {
    n = ::send(fd, data, len, MSG_NOSIGNAL);
  } while (n < 0 && errno == EINTR);
  if (n >= 0) {
    r.n = static_cast<size_t>(n);
  } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
    r.kind = IoKind::kWantWrite;
  } else {
    r.kind = IoKind::kError;
    r.error = ErrnoText(errno);
  }
  return r;
}

bool Connection::IdleAlive() {
  struct pollfd p = {fd, POLLIN, 0};
  int r;
  do {
    r = ::poll(&p, 1, 0);
  } while (r < 0 && errno == EINTR);
  if (r == 0) return true;
  if (r < 0 || (p.revents & (POLLERR | POLLHUP | POLLNVAL)) != 0) return false;
  // Readable. Plain HTTP: EOF or unsolicited bytes, unusable either way. TLS: it may be a
  // record that carries no application data (session ticket, key update); let OpenSSL eat it.
  if (ssl == nullptr) return false;
  char byte;
  ERR_clear_error();
  int n = SSL_read(ssl, &byte, 1);
  if (n > 0) return false;
  bool alive = SSL_get_error(ssl, n) == SSL_ERROR_WANT_READ;
  ERR_clear_error();
  return alive;
}

// ---------------------------------------------------------------------------------------------
// Waiting with deadlines, abort polling and cancellation.

struct WaitCtx {
  const std::function<bool()>* should_abort = nullptr;
  CancelToken* token = nullptr;
  absl::Duration poll_interval;
};

absl::Status CancelledIn(absl::string_view phase) {
  return absl::CancelledError(absl::StrCat(phase, ": cancelled"));
}

// Waits until `fd` is ready for `events`. OK when ready (or in error: the next I/O reports it),
// DEADLINE_EXCEEDED after `deadline`, CANCELLED when the token fires or should_abort says so.
absl::Status WaitFd(int fd, short events, absl::Time deadline, const WaitCtx& ctx,  // NOLINT
                    absl::string_view phase, absl::Duration timeout) {
  while (true) {
    if (ctx.token->cancelled()) return CancelledIn(phase);
    if (ctx.should_abort != nullptr && *ctx.should_abort && (*ctx.should_abort)()) {
      return CancelledIn(phase);
    }
    absl::Time now = absl::Now();
    if (now >= deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat(phase, ": timed out after ", DurationText(timeout)));
    }
    absl::Duration wait = std::min(deadline - now, ctx.poll_interval);
    int64_t ms = absl::ToInt64Milliseconds(absl::Ceil(wait, absl::Milliseconds(1)));
    struct pollfd p = {fd, events, 0};
    int r = ::poll(&p, 1, static_cast<int>(std::clamp<int64_t>(ms, 1, INT_MAX)));
    if (r > 0) return absl::OkStatus();
    if (r < 0 && errno != EINTR) {
      return absl::UnavailableError(absl::StrCat(phase, ": poll failed: ", ErrnoText(errno)));
    }
  }
}

// An I/O failure, reported as CANCELLED when the token fired (its shutdown() caused it).
absl::Status IoFailure(const WaitCtx& ctx, absl::string_view phase, absl::string_view why) {
  if (ctx.token->cancelled()) return CancelledIn(phase);
  return absl::UnavailableError(absl::StrCat(phase, ": ", why));
}

// Writes all of `data`, waiting as needed until `deadline`.
absl::Status WriteAll(Connection* c, absl::string_view data, absl::Time deadline,
                      const WaitCtx& ctx, absl::string_view phase, absl::Duration timeout) {
  while (!data.empty()) {
    IoResult r = c->Write(data.data(), data.size());
    absl::Status st;
    switch (r.kind) {
      case IoKind::kOk:
        data.remove_prefix(r.n);
        continue;
      case IoKind::kWantWrite:
        st = WaitFd(c->fd, POLLOUT, deadline, ctx, phase, timeout);
        break;
      case IoKind::kWantRead:
        st = WaitFd(c->fd, POLLIN, deadline, ctx, phase, timeout);
        break;
      case IoKind::kEof:
      case IoKind::kError:
        return IoFailure(ctx, phase, r.error.empty() ? "connection closed" : r.error);
    }
    if (!st.ok()) return st;
  }
  return absl::OkStatus();
}

// Writes `a` then `b`. On a plain socket both go out in one sendmsg() where possible.
absl::Status WriteRequest(Connection* c, absl::string_view a, absl::string_view b,
                          absl::Time deadline, const WaitCtx& ctx, absl::Duration timeout) {
  static constexpr absl::string_view kPhase = "upstream write";
  if (c->ssl != nullptr) {
    absl::Status st = WriteAll(c, a, deadline, ctx, kPhase, timeout);
    if (st.ok()) st = WriteAll(c, b, deadline, ctx, kPhase, timeout);
    return st;
  }
  while (!a.empty() || !b.empty()) {
    struct iovec iov[2];
    int n_iov = 0;
    if (!a.empty()) iov[n_iov++] = {const_cast<char*>(a.data()), a.size()};
    if (!b.empty()) iov[n_iov++] = {const_cast<char*>(b.data()), b.size()};
    struct msghdr msg;
    std::memset(&msg, 0, sizeof(msg));
    msg.msg_iov = iov;
    msg.msg_iovlen = static_cast<size_t>(n_iov);
    ssize_t n = ::sendmsg(c->fd, &msg, MSG_NOSIGNAL);
    if (n >= 0) {
      size_t sent = static_cast<size_t>(n);
      size_t from_a = std::min(sent, a.size());
      a.remove_prefix(from_a);
      b.remove_prefix(sent - from_a);
      continue;
    }
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) return IoFailure(ctx, kPhase, ErrnoText(errno));
    absl::Status st = WaitFd(c->fd, POLLOUT, deadline, ctx, kPhase, timeout);
    if (!st.ok()) return st;
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Shared: state of one UpstreamClient that exchanges keep alive (pool, TLS context, stats).

struct ResolvedAddress {
  struct sockaddr_storage addr;
  socklen_t len;
};

struct Shared {
  Shared(UpstreamEndpoint ep, UpstreamClientOptions opts)
      : endpoint(std::move(ep)),
        options(std::move(opts)),
        host_header(endpoint.HostHeader()),
        origin(endpoint.Origin()),
        host_is_ip(IsIpLiteral(endpoint.host)) {}
  ~Shared();

  absl::Status InitTls();
  std::unique_ptr<Connection> TakeIdle();
  void ReleaseIdle(std::unique_ptr<Connection> conn);
  absl::StatusOr<std::vector<ResolvedAddress>> Resolve();
  absl::StatusOr<std::unique_ptr<Connection>> Connect(const WaitCtx& ctx);
  absl::Status Handshake(Connection* c, absl::Time deadline, const WaitCtx& ctx);
  // The TLS state of a connected socket: SNI, verification of the host, session resumption.
  absl::Status SetUpTls(Connection* c, absl::string_view phase);
  // One non-blocking handshake step: kOk once done, kWantRead/kWantWrite, or a failure.
  IoResult HandshakeStep(Connection* c);
  // Why a handshake failed, for its error message.
  std::string HandshakeFailure(Connection* c, const IoResult& io);
  // The first resolved address while the DNS cache is fresh (never resolves). False if none.
  bool CachedAddress(ResolvedAddress* out);
  static int OnNewSession(SSL* ssl, SSL_SESSION* session);

  const UpstreamEndpoint endpoint;
  const UpstreamClientOptions options;
  const std::string host_header;
  const std::string origin;
  const bool host_is_ip;
  absl::Status init_status;  // written only in the constructor
  SSL_CTX* ssl_ctx = nullptr;

  std::atomic<uint64_t> connects{0};
  std::atomic<uint64_t> reuses{0};
  std::atomic<uint64_t> stale_retries{0};
  std::atomic<uint64_t> tls_resumptions{0};

  mutable Mutex mu;
  // Idle keep-alive connections, oldest at the front; taken from the back (LIFO keeps the
  // warmest connections busy and lets the cold ones expire).
  std::deque<std::unique_ptr<Connection>> idle ABSL_GUARDED_BY(mu);
  std::vector<ResolvedAddress> dns_addrs ABSL_GUARDED_BY(mu);
  absl::Time dns_expiry ABSL_GUARDED_BY(mu) = absl::InfinitePast();
  SSL_SESSION* session ABSL_GUARDED_BY(mu) = nullptr;  // latest resumable TLS session
};

Shared::~Shared() {
  std::deque<std::unique_ptr<Connection>> closing;
  {
    MutexLock lock(&mu);
    closing.swap(idle);
    if (session != nullptr) SSL_SESSION_free(session);
    session = nullptr;
  }
  for (auto& c : closing) c->SendCloseNotify();
  closing.clear();
  if (ssl_ctx != nullptr) SSL_CTX_free(ssl_ctx);
}

int Shared::OnNewSession(SSL* ssl, SSL_SESSION* new_session) {
  auto* self = static_cast<Shared*>(SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl)));
  if (self == nullptr || !SSL_SESSION_is_resumable(new_session)) return 0;
  SSL_SESSION* old;
  {
    MutexLock lock(&self->mu);
    old = self->session;
    self->session = new_session;
  }
  if (old != nullptr) SSL_SESSION_free(old);
  return 1;  // we keep the reference
}

absl::Status Shared::InitTls() {
  ssl_ctx = SSL_CTX_new(TLS_client_method());
  if (ssl_ctx == nullptr) {
    return absl::InternalError(absl::StrCat("SSL_CTX_new failed: ", TakeSslErrors()));
  }
  SSL_CTX_set_min_proto_version(ssl_ctx, TLS1_2_VERSION);
  SSL_CTX_set_options(ssl_ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_IGNORE_UNEXPECTED_EOF);
  SSL_CTX_set_mode(ssl_ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  static const unsigned char kAlpn[] = {8, 'h', 't', 't', 'p', '/', '1', '.', '1'};
  SSL_CTX_set_alpn_protos(ssl_ctx, kAlpn, sizeof(kAlpn));
  if (options.verify_tls) {
    SSL_CTX_set_verify(ssl_ctx, SSL_VERIFY_PEER, nullptr);
    SSL_CTX_set_default_verify_paths(ssl_ctx);
    ERR_clear_error();
  } else {
    SSL_CTX_set_verify(ssl_ctx, SSL_VERIFY_NONE, nullptr);
  }
  if (!options.ca_file.empty() &&
      SSL_CTX_load_verify_locations(ssl_ctx, options.ca_file.c_str(), nullptr) != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot load CA file ", options.ca_file, ": ", TakeSslErrors()));
  }
  SSL_CTX_set_app_data(ssl_ctx, this);
  SSL_CTX_set_session_cache_mode(ssl_ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
  SSL_CTX_sess_set_new_cb(ssl_ctx, &Shared::OnNewSession);
  return absl::OkStatus();
}

// Pooled connections idle for less than this are reused without checking them first.
constexpr absl::Duration kTrustIdleFor = absl::Seconds(1);

std::unique_ptr<Connection> Shared::TakeIdle() {
  while (true) {
    std::vector<std::unique_ptr<Connection>> expired;  // closed outside the lock
    std::unique_ptr<Connection> conn;
    const absl::Time now = absl::Now();
    {
      absl::Time cutoff = now - options.idle_connection_ttl;
      MutexLock lock(&mu);
      while (!idle.empty() && idle.front()->idle_since < cutoff) {
        expired.push_back(std::move(idle.front()));
        idle.pop_front();
      }
      if (!idle.empty()) {
        conn = std::move(idle.back());
        idle.pop_back();
      }
    }
    for (auto& c : expired) c->SendCloseNotify();
    if (conn == nullptr) return nullptr;
    // A connection pooled moments ago is trusted without the probe (a syscall per request);
    // if the server did close it, Send's stale-connection retry covers it.
    if (now - conn->idle_since < kTrustIdleFor || conn->IdleAlive()) return conn;
    // The server closed it while idle: drop it and try the next one. Its TLS session is still
    // good (an orderly close), so keep OpenSSL from marking it not resumable on SSL_free.
    if (conn->ssl != nullptr)
      SSL_set_shutdown(conn->ssl, SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN);
  }
}

void Shared::ReleaseIdle(std::unique_ptr<Connection> conn) {
  if (options.max_idle_connections == 0) {
    conn->SendCloseNotify();
    return;
  }
  conn->idle_since = absl::Now();
  std::vector<std::unique_ptr<Connection>> dropped;
  {
    absl::Time cutoff = conn->idle_since - options.idle_connection_ttl;
    MutexLock lock(&mu);
    while (!idle.empty() &&
           (idle.size() >= options.max_idle_connections || idle.front()->idle_since < cutoff)) {
      dropped.push_back(std::move(idle.front()));
      idle.pop_front();
    }
    idle.push_back(std::move(conn));
  }
  for (auto& c : dropped) c->SendCloseNotify();
}

absl::StatusOr<std::vector<ResolvedAddress>> Shared::Resolve() {
  absl::Time now = absl::Now();
  {
    MutexLock lock(&mu);
    if (!dns_addrs.empty() && now < dns_expiry) return dns_addrs;
  }
  struct addrinfo hints;
  std::memset(&hints, 0, sizeof(hints));
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_protocol = IPPROTO_TCP;
  if (host_is_ip) hints.ai_flags |= AI_NUMERICHOST;
  struct addrinfo* res = nullptr;
  std::string port = absl::StrCat(endpoint.port);
  int rc = ::getaddrinfo(endpoint.host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0) {
    return absl::UnavailableError(
        absl::StrCat("upstream DNS lookup of ", endpoint.host, " failed: ", gai_strerror(rc)));
  }
  std::vector<ResolvedAddress> addrs;
  for (struct addrinfo* ai = res; ai != nullptr; ai = ai->ai_next) {
    if (ai->ai_addrlen > sizeof(sockaddr_storage)) continue;
    ResolvedAddress a;
    std::memset(&a.addr, 0, sizeof(a.addr));
    std::memcpy(&a.addr, ai->ai_addr, ai->ai_addrlen);
    a.len = ai->ai_addrlen;
    addrs.push_back(a);
  }
  ::freeaddrinfo(res);
  if (addrs.empty()) {
    return absl::UnavailableError(
        absl::StrCat("upstream DNS lookup of ", endpoint.host, " returned no address"));
  }
  if (options.dns_cache_ttl > absl::ZeroDuration()) {
    MutexLock lock(&mu);
    dns_addrs = addrs;
    dns_expiry = now + options.dns_cache_ttl;
  }
  return addrs;
}

absl::StatusOr<std::unique_ptr<Connection>> Shared::Connect(const WaitCtx& ctx) {
  const std::string phase = absl::StrCat("upstream connect to ", origin);
  const absl::Time deadline = absl::Now() + options.connect_timeout;
  absl::StatusOr<std::vector<ResolvedAddress>> addrs = Resolve();
  if (!addrs.ok()) return addrs.status();
  std::string last_error = "no address";
  for (const ResolvedAddress& a : *addrs) {
    if (ctx.token->cancelled()) return CancelledIn(phase);
    int fd = ::socket(a.addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_TCP);
    if (fd < 0) {
      last_error = ErrnoText(errno);
      continue;
    }
    auto conn = std::make_unique<Connection>(fd);
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    conn->Attach(ctx.token);
    int err = 0;
    if (::connect(fd, reinterpret_cast<const struct sockaddr*>(&a.addr), a.len) != 0) {
      err = errno;
      if (err == EINPROGRESS || err == EINTR) {
        absl::Status st = WaitFd(fd, POLLOUT, deadline, ctx, phase, options.connect_timeout);
        if (!st.ok()) return st;
        socklen_t len = sizeof(err);
        if (::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
      }
    }
    if (err != 0) {
      if (ctx.token->cancelled()) return CancelledIn(phase);
      last_error = ErrnoText(err);
      continue;  // try the next address
    }
    if (endpoint.tls) {
      absl::Status st = Handshake(conn.get(), deadline, ctx);
      if (!st.ok()) return st;
    }
    connects.fetch_add(1, std::memory_order_relaxed);
    return conn;
  }
  {
    MutexLock lock(&mu);
    dns_expiry = absl::InfinitePast();  // maybe the addresses moved: resolve again next time
  }
  return absl::UnavailableError(absl::StrCat(phase, " failed: ", last_error));
}

absl::Status Shared::SetUpTls(Connection* c, absl::string_view phase) {
  c->ssl = SSL_new(ssl_ctx);
  BIO* bio = c->ssl != nullptr ? BIO_new(NoSigpipeBioMethod()) : nullptr;
  if (bio == nullptr) {
    return absl::UnavailableError(absl::StrCat(phase, ": out of memory: ", TakeSslErrors()));
  }
  BIO_set_data(bio, reinterpret_cast<void*>(static_cast<intptr_t>(c->fd)));
  BIO_set_init(bio, 1);
  SSL_set_bio(c->ssl, bio, bio);
  if (!host_is_ip) SSL_set_tlsext_host_name(c->ssl, endpoint.host.c_str());
  if (options.verify_tls) {
    int ok = host_is_ip
                 ? X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c->ssl), endpoint.host.c_str())
                 : SSL_set1_host(c->ssl, endpoint.host.c_str());
    if (ok != 1) {
      return absl::UnavailableError(absl::StrCat(phase, ": cannot set the expected host name"));
    }
  }
  {
    MutexLock lock(&mu);
    if (session != nullptr) SSL_set_session(c->ssl, session);
  }
  SSL_set_connect_state(c->ssl);
  return absl::OkStatus();
}

IoResult Shared::HandshakeStep(Connection* c) {
  ERR_clear_error();
  errno = 0;
  int r = SSL_do_handshake(c->ssl);
  if (r == 1) {
    if (SSL_session_reused(c->ssl)) tls_resumptions.fetch_add(1, std::memory_order_relaxed);
    return IoResult();
  }
  return c->SslResult(r);
}

std::string Shared::HandshakeFailure(Connection* c, const IoResult& io) {
  long verify = SSL_get_verify_result(c->ssl);  // NOLINT(runtime/int)
  if (verify != X509_V_OK) {
    return absl::StrCat("certificate verification failed: ", X509_verify_cert_error_string(verify));
  }
  return io.kind == IoKind::kEof ? "connection closed" : io.error;
}

bool Shared::CachedAddress(ResolvedAddress* out) {
  MutexLock lock(&mu);
  if (dns_addrs.empty() || absl::Now() >= dns_expiry) return false;
  *out = dns_addrs.front();
  return true;
}

absl::Status Shared::Handshake(Connection* c, absl::Time deadline, const WaitCtx& ctx) {
  const std::string phase = absl::StrCat("upstream TLS handshake with ", origin);
  absl::Status st = SetUpTls(c, phase);
  if (!st.ok()) return st;
  while (true) {
    IoResult io = HandshakeStep(c);
    if (io.kind == IoKind::kOk) return absl::OkStatus();
    if (io.kind == IoKind::kWantRead) {
      st = WaitFd(c->fd, POLLIN, deadline, ctx, phase, options.connect_timeout);
    } else if (io.kind == IoKind::kWantWrite) {
      st = WaitFd(c->fd, POLLOUT, deadline, ctx, phase, options.connect_timeout);
    } else {
      return IoFailure(ctx, phase, HandshakeFailure(c, io));
    }
    if (!st.ok()) return st;
  }
}

}  // namespace upstream_internal

using upstream_internal::Connection;
using upstream_internal::IoKind;
using upstream_internal::IoResult;
using upstream_internal::Shared;
using upstream_internal::WaitCtx;

namespace {

constexpr size_t kInitialBufferBytes = 16 * 1024;

// The request head as sent to the endpoint (its Host header). FAILED_PRECONDITION when the
// client cannot work (see init_status()), INVALID_ARGUMENT for fields that would corrupt the
// framing.
absl::Status SerializeUpstreamHead(const Shared& s, const UpstreamRequest& request,
                                   std::string* wire) {
  if (!s.init_status.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("upstream client unusable: ", s.init_status.message()));
  }
  HttpRequestHeadInput in;
  in.method = request.method;
  in.target = request.target;
  in.host_header = s.host_header;
  in.headers = &request.headers;
  in.body_size = request.body.size();
  return SerializeRequestHead(in, wire);
}
constexpr size_t kMaxBufferBytes = kMaxResponseHeadBytes;
constexpr int kMaxInterimResponses = 16;

}  // namespace

// ---------------------------------------------------------------------------------------------
// UpstreamExchange

// Internal steps of an exchange that need private access; kept out of the public header.
class UpstreamExchangeIo {
 public:
  // Reads into the buffer tail (compacting or growing it first). Returns the byte count, 0 at
  // EOF.
  // With `would_block` set, never waits: returns 0 with *would_block = kRead/kWrite when the
  // socket has nothing yet (and 0 with kNone at EOF).
  static absl::StatusOr<size_t> ReadMore(UpstreamExchange* ex, absl::Time deadline,
                                         const WaitCtx& ctx, absl::string_view phase,
                                         absl::Duration timeout,
                                         UpstreamExchange::Wait* would_block = nullptr) {
    if (would_block != nullptr) *would_block = UpstreamExchange::Wait::kNone;
    if (ex->begin_ == ex->end_) {
      ex->begin_ = ex->end_ = 0;
    } else if (ex->begin_ > 0 && (ex->end_ == ex->cap_ || ex->cap_ - ex->end_ < ex->cap_ / 4)) {
      std::memmove(ex->buf_.get(), ex->buf_.get() + ex->begin_, ex->end_ - ex->begin_);
      ex->end_ -= ex->begin_;
      ex->begin_ = 0;
    }
    if (ex->end_ == ex->cap_) {
      if (ex->cap_ >= kMaxBufferBytes) {
        return absl::InternalError(absl::StrCat(phase, ": read buffer full"));
      }
      size_t cap = std::min(ex->cap_ * 2, kMaxBufferBytes);
      std::unique_ptr<char[]> bigger(new char[cap]);
      std::memcpy(bigger.get(), ex->buf_.get() + ex->begin_, ex->end_ - ex->begin_);
      ex->end_ -= ex->begin_;
      ex->begin_ = 0;
      ex->buf_ = std::move(bigger);
      ex->cap_ = cap;
    }
    Connection* c = ex->conn_.get();
    while (true) {
      IoResult r = c->Read(ex->buf_.get() + ex->end_, ex->cap_ - ex->end_);
      absl::Status st;
      switch (r.kind) {
        case IoKind::kOk:
          ex->end_ += r.n;
          return r.n;
        case IoKind::kEof:
          if (ctx.token->cancelled()) return upstream_internal::CancelledIn(phase);
          return 0;
        case IoKind::kWantRead:
          if (would_block != nullptr) {
            *would_block = UpstreamExchange::Wait::kRead;
            return 0;
          }
          st = upstream_internal::WaitFd(c->fd, POLLIN, deadline, ctx, phase, timeout);
          break;
        case IoKind::kWantWrite:
          if (would_block != nullptr) {
            *would_block = UpstreamExchange::Wait::kWrite;
            return 0;
          }
          st = upstream_internal::WaitFd(c->fd, POLLOUT, deadline, ctx, phase, timeout);
          break;
        case IoKind::kError:
          return upstream_internal::IoFailure(ctx, phase, r.error);
      }
      if (!st.ok()) return st;
    }
  }

  // Parses a response head from the buffered bytes, skipping 1xx responses. True when a final
  // head is in ex->head_ (its bytes consumed), false when more bytes are needed. `*scan` and
  // `*interim` carry the search position and the count of 1xx responses between calls.
  static absl::StatusOr<bool> ParseBufferedHead(UpstreamExchange* ex, bool head_request,
                                                size_t* scan, int* interim) {
    while (true) {
      absl::string_view avail(ex->buf_.get() + ex->begin_, ex->end_ - ex->begin_);
      size_t head_end = FindHeadEnd(avail, scan);
      if (head_end == absl::string_view::npos) {
        if (avail.size() >= kMaxResponseHeadBytes) {
          return absl::InternalError("malformed upstream response: response head exceeds 64 KiB");
        }
        return false;
      }
      absl::Status st = ParseResponseHead(avail.substr(0, head_end), head_request, &ex->head_);
      if (!st.ok()) return st;
      ex->begin_ += head_end;
      *scan = 0;
      int status = ex->head_.status;
      if (status >= 100 && status < 200) {
        if (status == 101) {
          return absl::InternalError(
              "malformed upstream response: unexpected 101 Switching Protocols");
        }
        if (++*interim > kMaxInterimResponses) {
          return absl::InternalError("malformed upstream response: too many 1xx responses");
        }
        continue;
      }
      switch (ex->head_.framing) {
        case BodyFraming::kNone:
          ex->body_done_ = true;
          break;
        case BodyFraming::kContentLength:
          ex->remaining_ = static_cast<uint64_t>(ex->head_.content_length);
          ex->body_done_ = ex->remaining_ == 0;
          break;
        case BodyFraming::kChunked:
        case BodyFraming::kUntilClose:
          break;
      }
      return true;
    }
  }

  // Reads and parses the response head, skipping 1xx responses. `*got_bytes` tells whether any
  // response byte arrived (a stale pooled connection fails before that).
  static absl::Status ReadHead(UpstreamExchange* ex, bool head_request, absl::Duration timeout,
                               const WaitCtx& ctx, bool* got_bytes) {
    static constexpr absl::string_view kPhase = "upstream response head";
    const absl::Time deadline = absl::Now() + timeout;
    size_t scan = 0;
    int interim = 0;
    while (true) {
      absl::StatusOr<bool> done = ParseBufferedHead(ex, head_request, &scan, &interim);
      if (!done.ok()) return done.status();
      if (*done) return absl::OkStatus();
      absl::StatusOr<size_t> n = ReadMore(ex, deadline, ctx, kPhase, timeout);
      if (!n.ok()) return n.status();
      if (*n == 0) return HeadEof(*got_bytes);
      *got_bytes = true;
    }
  }

  static absl::Status HeadEof(bool got_bytes) {
    return absl::UnavailableError(
        got_bytes ? "upstream response head: connection closed in the middle of the head"
                  : "upstream response head: connection closed before any response byte");
  }

  // Non-blocking steps of an exchange started on a pooled connection (see TryCompleteHead).
  static absl::StatusOr<bool> TryCompleteHead(UpstreamExchange* ex, UpstreamExchange::Wait* wait) {
    static constexpr absl::string_view kWritePhase = "upstream request write";
    static constexpr absl::string_view kHeadPhase = "upstream response head";
    *wait = UpstreamExchange::Wait::kNone;
    UpstreamExchange::Pending& p = *ex->pending_;
    const WaitCtx ctx{nullptr, ex->cancel_.get(), ex->shared_->options.abort_poll_interval};
    if (ex->cancel_->cancelled()) return upstream_internal::CancelledIn(kWritePhase);
    Connection* c = ex->conn_.get();
    Shared& s = *ex->shared_;
    if (p.connecting) {
      pollfd pfd{c->fd, POLLOUT, 0};
      if (::poll(&pfd, 1, 0) == 0) {
        *wait = UpstreamExchange::Wait::kWrite;
        return false;
      }
      int err = 0;
      socklen_t len = sizeof(err);
      if (::getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
      if (err != 0) {
        ex->connect_failed_ = true;
        return upstream_internal::IoFailure(ctx, absl::StrCat("upstream connect to ", s.origin),
                                            upstream_internal::ErrnoText(err));
      }
      p.connecting = false;
      if (s.endpoint.tls) {
        absl::Status st = s.SetUpTls(c, absl::StrCat("upstream TLS handshake with ", s.origin));
        if (!st.ok()) return st;
        p.handshaking = true;
      } else {
        s.connects.fetch_add(1, std::memory_order_relaxed);
      }
    }
    if (p.handshaking) {
      IoResult io = s.HandshakeStep(c);
      if (io.kind == IoKind::kWantRead || io.kind == IoKind::kWantWrite) {
        *wait = io.kind == IoKind::kWantRead ? UpstreamExchange::Wait::kRead
                                             : UpstreamExchange::Wait::kWrite;
        return false;
      }
      if (io.kind != IoKind::kOk) {
        return upstream_internal::IoFailure(
            ctx, absl::StrCat("upstream TLS handshake with ", s.origin), s.HandshakeFailure(c, io));
      }
      p.handshaking = false;
      s.connects.fetch_add(1, std::memory_order_relaxed);
    }
    const bool writing = p.written < p.wire.size() + p.body.size();
    while (p.written < p.wire.size() + p.body.size()) {
      const bool in_wire = p.written < p.wire.size();
      const char* data = in_wire ? p.wire.data() + p.written
                                 : p.body.data() + (p.written - p.wire.size());
      size_t len = in_wire ? p.wire.size() - p.written : p.body.size() - (p.written - p.wire.size());
      IoResult r = c->Write(data, len);
      switch (r.kind) {
        case IoKind::kOk:
          p.written += r.n;
          continue;
        case IoKind::kWantWrite:
          *wait = UpstreamExchange::Wait::kWrite;
          return false;
        case IoKind::kWantRead:
          *wait = UpstreamExchange::Wait::kRead;
          return false;
        case IoKind::kEof:
          return upstream_internal::IoFailure(ctx, kWritePhase, "connection closed");
        case IoKind::kError:
          return upstream_internal::IoFailure(ctx, kWritePhase, r.error);
      }
    }
    if (writing) {
      // The request just went out: its answer cannot be there yet (saves a read per request).
      *wait = UpstreamExchange::Wait::kRead;
      return false;
    }
    while (true) {
      absl::StatusOr<bool> done = ParseBufferedHead(ex, p.head_request, &p.scan, &p.interim);
      if (!done.ok() || *done) return done;
      UpstreamExchange::Wait would_block;
      absl::StatusOr<size_t> n = ReadMore(ex, absl::InfiniteFuture(), ctx, kHeadPhase,
                                          absl::InfiniteDuration(), &would_block);
      if (!n.ok()) return n.status();
      if (*n == 0) {
        if (would_block != UpstreamExchange::Wait::kNone) {
          *wait = would_block;
          return false;
        }
        return HeadEof(p.got_bytes);
      }
      p.got_bytes = true;
    }
  }

  // Decodes body bytes already buffered, without I/O. Sets `*piece` to the next piece, or
  // leaves it empty when the body is complete (ex->body_done_) or more input is needed.
  static absl::Status DecodeBuffered(UpstreamExchange* ex, absl::string_view* piece) {
    *piece = absl::string_view();
    absl::string_view avail(ex->buf_.get() + ex->begin_, ex->end_ - ex->begin_);
    switch (ex->head_.framing) {
      case BodyFraming::kNone:
        ex->body_done_ = true;
        return absl::OkStatus();
      case BodyFraming::kContentLength: {
        size_t n = static_cast<size_t>(std::min<uint64_t>(avail.size(), ex->remaining_));
        *piece = avail.substr(0, n);
        ex->begin_ += n;
        ex->remaining_ -= n;
        if (ex->remaining_ == 0) ex->body_done_ = true;
        return absl::OkStatus();
      }
      case BodyFraming::kChunked:
        while (true) {
          size_t consumed = 0;
          absl::Status st = ex->chunked_.Decode(avail, &consumed, piece);
          if (!st.ok()) return st;
          ex->begin_ += consumed;
          if (ex->chunked_.done()) ex->body_done_ = true;
          if (!piece->empty() || ex->body_done_ || consumed == 0) return absl::OkStatus();
          avail.remove_prefix(consumed);
        }
      case BodyFraming::kUntilClose:
        *piece = avail;
        ex->begin_ = ex->end_;
        return absl::OkStatus();
    }
    return absl::OkStatus();
  }
};

UpstreamExchange::UpstreamExchange(std::shared_ptr<Shared> shared, std::unique_ptr<Connection> conn,
                                   std::shared_ptr<CancelToken> cancel, bool reused)
    : shared_(std::move(shared)),
      cancel_(std::move(cancel)),
      conn_(std::move(conn)),
      reused_(reused),
      buf_(new char[kInitialBufferBytes]),
      cap_(kInitialBufferBytes) {}

UpstreamExchange::~UpstreamExchange() {
  if (conn_ == nullptr) return;
  if (!failed_ && !body_done_) ConsumeBuffered();
  conn_->Detach();
  // Checked after Detach: a Cancel() that raced with us has shut the socket down by now.
  // An exchange whose head never completed (e.g. left after a 1xx) may still get an answer.
  bool reusable = pending_ == nullptr && body_done_ && !failed_ && head_.keep_alive &&
                  begin_ == end_ &&
                  head_.framing != BodyFraming::kUntilClose && !cancel_->cancelled();
  if (reusable) {
    shared_->ReleaseIdle(std::move(conn_));
    return;
  }
  if (body_done_ && !failed_ && !cancel_->cancelled()) conn_->SendCloseNotify();
  conn_.reset();
}

void UpstreamExchange::ConsumeBuffered() {
  absl::string_view piece;
  while (!body_done_) {
    if (!UpstreamExchangeIo::DecodeBuffered(this, &piece).ok()) {
      failed_ = true;
      return;
    }
    if (piece.empty()) return;  // needs more input than is buffered
  }
}

absl::Status UpstreamExchange::Fail(absl::Status status) {
  failed_ = true;
  return status;
}

void UpstreamExchange::Cancel() { cancel_->Cancel(); }

absl::StatusOr<absl::string_view> UpstreamExchange::ReadSome(
    const std::function<bool()>& should_abort) {
  return ReadPiece(&should_abort, nullptr);
}

absl::StatusOr<absl::string_view> UpstreamExchange::TryReadSome(Wait* wait) {
  *wait = Wait::kNone;
  return ReadPiece(nullptr, wait);
}

absl::StatusOr<absl::string_view> UpstreamExchange::ReadPiece(
    const std::function<bool()>* should_abort, Wait* wait) {
  static constexpr absl::string_view kPhase = "upstream body";
  if (body_done_) return absl::string_view();
  if (failed_) return absl::FailedPreconditionError("upstream body: exchange already failed");
  if (cancel_->cancelled()) return Fail(upstream_internal::CancelledIn(kPhase));
  WaitCtx ctx{should_abort, cancel_.get(), shared_->options.abort_poll_interval};
  const absl::Duration timeout = shared_->options.idle_timeout;
  while (true) {
    absl::string_view piece;
    absl::Status st = UpstreamExchangeIo::DecodeBuffered(this, &piece);
    if (!st.ok()) return Fail(st);
    if (!piece.empty()) return piece;
    if (body_done_) return absl::string_view();
    absl::StatusOr<size_t> n = UpstreamExchangeIo::ReadMore(
        this, wait == nullptr ? absl::Now() + timeout : absl::InfiniteFuture(), ctx, kPhase,
        timeout, wait);
    if (!n.ok()) return Fail(n.status());
    if (*n > 0) continue;
    if (wait != nullptr && *wait != Wait::kNone) return absl::string_view();  // nothing yet
    return AtEof();
  }
}

absl::StatusOr<absl::string_view> UpstreamExchange::AtEof() {
  if (head_.framing == BodyFraming::kUntilClose) {
    body_done_ = true;
    return absl::string_view();
  }
  return Fail(absl::UnavailableError(
      head_.framing == BodyFraming::kContentLength
          ? absl::StrCat("upstream body: connection closed with ", remaining_, " of ",
                         head_.content_length, " body bytes missing")
          : "upstream body: connection closed before the last chunk"));
}

int UpstreamExchange::fd() const { return conn_ == nullptr ? -1 : conn_->fd; }

// ---------------------------------------------------------------------------------------------
// UpstreamClient

UpstreamClient::UpstreamClient(UpstreamEndpoint endpoint, UpstreamClientOptions options)
    : shared_(std::make_shared<Shared>(std::move(endpoint), std::move(options))) {
  if (shared_->endpoint.tls) shared_->init_status = shared_->InitTls();
}

UpstreamClient::~UpstreamClient() = default;

absl::Status UpstreamClient::init_status() const { return shared_->init_status; }

const UpstreamEndpoint& UpstreamClient::endpoint() const { return shared_->endpoint; }

const UpstreamClientOptions& UpstreamClient::options() const { return shared_->options; }

absl::StatusOr<std::unique_ptr<UpstreamExchange>> UpstreamClient::Send(
    const UpstreamRequest& request, const std::function<bool()>& should_abort,
    std::shared_ptr<CancelToken> cancel) {
  Shared& s = *shared_;
  std::string wire;
  absl::Status st = SerializeUpstreamHead(s, request, &wire);
  if (!st.ok()) return st;
  absl::string_view second = request.body;
  if (s.endpoint.tls && request.body.size() <= 16 * 1024) {
    // One TLS record instead of two; the copy is cheap next to the encryption.
    wire.append(request.body.data(), request.body.size());
    second = absl::string_view();
  }
  if (cancel == nullptr) cancel = std::make_shared<CancelToken>();
  const WaitCtx ctx{&should_abort, cancel.get(), s.options.abort_poll_interval};
  const bool head_request = request.method == "HEAD";

  for (int attempt = 0;; ++attempt) {
    if (cancel->cancelled()) return upstream_internal::CancelledIn("upstream request");
    std::unique_ptr<Connection> conn;
    if (attempt == 0) conn = s.TakeIdle();
    const bool reused = conn != nullptr;
    if (reused) {
      s.reuses.fetch_add(1, std::memory_order_relaxed);
      conn->Attach(cancel.get());
    } else {
      absl::StatusOr<std::unique_ptr<Connection>> fresh = s.Connect(ctx);
      if (!fresh.ok()) return fresh.status();
      conn = std::move(*fresh);
    }
    std::unique_ptr<UpstreamExchange> ex(
        new UpstreamExchange(shared_, std::move(conn), cancel, reused));
    bool got_bytes = false;
    st = upstream_internal::WriteRequest(ex->conn_.get(), wire, second,
                                         absl::Now() + s.options.write_timeout, ctx,
                                         s.options.write_timeout);
    if (st.ok()) {
      st = UpstreamExchangeIo::ReadHead(ex.get(), head_request, s.options.first_byte_timeout, ctx,
                                        &got_bytes);
    }
    if (st.ok()) return ex;
    ex->failed_ = true;
    ex.reset();  // closes the connection
    const bool stale = reused && !got_bytes && absl::IsUnavailable(st) && !cancel->cancelled();
    if (!stale) return st;
    s.stale_retries.fetch_add(1, std::memory_order_relaxed);
  }
}

absl::StatusOr<std::unique_ptr<UpstreamExchange>> UpstreamClient::StartInLoop(
    const UpstreamRequest& request, std::shared_ptr<CancelToken> cancel) {
  return Start(request, std::move(cancel), /*pooled_only=*/true);
}

absl::StatusOr<std::unique_ptr<UpstreamExchange>> UpstreamClient::Open(
    const UpstreamRequest& request, std::shared_ptr<CancelToken> cancel) {
  return Start(request, std::move(cancel), /*pooled_only=*/false);
}

absl::StatusOr<std::unique_ptr<UpstreamExchange>> UpstreamClient::Start(
    const UpstreamRequest& request, std::shared_ptr<CancelToken> cancel, bool pooled_only) {
  Shared& s = *shared_;
  auto pending = std::make_unique<UpstreamExchange::Pending>();
  absl::Status st = SerializeUpstreamHead(s, request, &pending->wire);
  if (!st.ok()) return st;
  pending->body = request.body;
  if (request.body.size() <= 64 * 1024) {
    // One write (one TLS record) instead of two; the copy is cheap next to a system call.
    pending->wire.append(request.body.data(), request.body.size());
    pending->body = absl::string_view();
  }
  pending->head_request = request.method == "HEAD";
  if (cancel == nullptr) cancel = std::make_shared<CancelToken>();
  std::unique_ptr<Connection> conn;
  bool reused = false;
  if (pooled_only) {
    conn = s.TakeIdle();
    if (conn != nullptr) {
      reused = true;
      s.reuses.fetch_add(1, std::memory_order_relaxed);
      conn->Attach(cancel.get());
    } else {
      // Nothing pooled: a non-blocking connect to the cached address, if there is one (the
      // loop then drives connect and handshake); else the caller's worker resolves and opens.
      upstream_internal::ResolvedAddress a;
      if (!s.CachedAddress(&a)) return std::unique_ptr<UpstreamExchange>();
      int fd = ::socket(a.addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_TCP);
      if (fd < 0) return std::unique_ptr<UpstreamExchange>();
      conn = std::make_unique<Connection>(fd);
      int one = 1;
      ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      if (::connect(fd, reinterpret_cast<const struct sockaddr*>(&a.addr), a.len) != 0 &&
          errno != EINPROGRESS) {
        return std::unique_ptr<UpstreamExchange>();  // closes; the worker tries every address
      }
      conn->Attach(cancel.get());
      pending->connecting = true;
    }
  } else {
    const std::function<bool()> no_abort;
    absl::StatusOr<std::unique_ptr<Connection>> fresh =
        s.Connect(WaitCtx{&no_abort, cancel.get(), s.options.abort_poll_interval});
    if (!fresh.ok()) return fresh.status();
    conn = std::move(*fresh);
  }
  std::unique_ptr<UpstreamExchange> ex(
      new UpstreamExchange(shared_, std::move(conn), std::move(cancel), reused));
  ex->pending_ = std::move(pending);
  return ex;
}

absl::StatusOr<bool> UpstreamExchange::TryCompleteHead(Wait* wait) {
  if (pending_ == nullptr) return true;
  if (failed_) return absl::FailedPreconditionError("upstream exchange already failed");
  absl::StatusOr<bool> done = UpstreamExchangeIo::TryCompleteHead(this, wait);
  if (!done.ok()) {
    stale_ = reused_ && !pending_->got_bytes && absl::IsUnavailable(done.status()) &&
             !cancel_->cancelled();
    return Fail(done.status());
  }
  if (*done) pending_.reset();
  return done;
}

void UpstreamClient::CountStaleRetry() {
  shared_->stale_retries.fetch_add(1, std::memory_order_relaxed);
}

UpstreamClient::Stats UpstreamClient::GetStats() const {
  Stats stats;
  stats.connects = shared_->connects.load(std::memory_order_relaxed);
  stats.reuses = shared_->reuses.load(std::memory_order_relaxed);
  stats.stale_retries = shared_->stale_retries.load(std::memory_order_relaxed);
  stats.tls_resumptions = shared_->tls_resumptions.load(std::memory_order_relaxed);
  MutexLock lock(&shared_->mu);
  stats.idle_now = shared_->idle.size();
  return stats;
}

}  // namespace sflb
