#include "dataplane/upstream_client.h"

#include <httplib.h>
#include <netinet/in.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sflb {
namespace {

using ::testing::HasSubstr;

// ---------------------------------------------------------------------------------------------
// Helpers

absl::StatusOr<std::string> ReadBody(UpstreamExchange* ex,
                                     std::vector<std::string>* pieces = nullptr) {
  std::string body;
  while (true) {
    absl::StatusOr<absl::string_view> piece = ex->ReadSome();
    if (!piece.ok()) return piece.status();
    if (piece->empty()) return body;
    if (pieces != nullptr) pieces->emplace_back(*piece);
    body.append(piece->data(), piece->size());
  }
}

UpstreamEndpoint Endpoint(int port, bool tls = false, std::string host = "127.0.0.1") {
  UpstreamEndpoint ep;
  ep.tls = tls;
  ep.host = std::move(host);
  ep.port = port;
  return ep;
}

UpstreamRequest Get(std::string target) {
  UpstreamRequest r;
  r.method = "GET";
  r.target = std::move(target);
  return r;
}

// Waits (with a deadline) for `pred` to become true.
bool WaitFor(const std::function<bool()>& pred, absl::Duration timeout = absl::Seconds(5)) {
  absl::Time deadline = absl::Now() + timeout;
  while (!pred()) {
    if (absl::Now() > deadline) return false;
    absl::SleepFor(absl::Milliseconds(1));
  }
  return true;
}

// Runs an httplib::Server (or SSLServer) on 127.0.0.1 with an ephemeral port.
class HttplibRunner {
 public:
  explicit HttplibRunner(httplib::Server* svr) : svr_(svr) {
    svr_->set_read_timeout(10, 0);
    svr_->set_write_timeout(10, 0);
    // httplib listens with a backlog of 5: a burst of connects overflows it and the dropped
    // SYNs are retried after 1 s. Capture the socket and raise the backlog after bind.
    int listen_fd = -1;
    svr_->set_socket_options([&listen_fd](int sock) {
      httplib::default_socket_options(sock);
      listen_fd = sock;
    });
    port_ = svr_->bind_to_any_port("127.0.0.1");
    if (listen_fd >= 0) ::listen(listen_fd, 256);
    thread_ = std::thread([this] { svr_->listen_after_bind(); });
    EXPECT_TRUE(WaitFor([this] { return svr_->is_running(); }));
  }
  ~HttplibRunner() {
    svr_->stop();
    thread_.join();
  }
  int port() const { return port_; }

 private:
  httplib::Server* svr_;
  int port_ = -1;
  std::thread thread_;
};

// A tiny TCP server whose per-connection handler writes whatever bytes a test needs.
class RawServer {
 public:
  // Runs on its own thread per accepted connection; `index` counts connections from 0. The
  // server closes `fd` after the handler returns.
  using Handler = std::function<void(RawServer* server, int fd, int index)>;

  explicit RawServer(Handler handler) : handler_(std::move(handler)) {
    listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = 0;
    EXPECT_EQ(::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    EXPECT_EQ(::listen(listen_fd_, 64), 0);
    socklen_t len = sizeof(addr);
    ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
    accept_thread_ = std::thread([this] { AcceptLoop(); });
  }

  ~RawServer() {
    stop_.store(true);
    accept_thread_.join();
    std::vector<std::thread> threads;
    {
      std::lock_guard<std::mutex> lock(mu_);
      threads.swap(threads_);
    }
    for (auto& t : threads) t.join();
    ::close(listen_fd_);
  }

  int port() const { return port_; }
  bool stopping() const { return stop_.load(); }
  int accepted() const { return accepted_.load(); }

  // Reads one request head (through the blank line, plus whatever came with it). Returns ""
  // on EOF, error, stop, or after 5 s.
  std::string ReadRequestHead(int fd) {
    std::string data;
    absl::Time deadline = absl::Now() + absl::Seconds(5);
    while (data.find("\r\n\r\n") == std::string::npos) {
      if (stopping() || absl::Now() > deadline) return "";
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, 20) <= 0) continue;
      char buf[4096];
      ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
      if (n <= 0) return "";
      data.append(buf, static_cast<size_t>(n));
    }
    return data;
  }

  static void WriteAll(int fd, absl::string_view data) {
    while (!data.empty()) {
      ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL);
      if (n <= 0) return;
      data.remove_prefix(static_cast<size_t>(n));
    }
  }

  // Blocks until the client closes the connection or the server stops.
  void Hang(int fd) {
    while (!stopping()) {
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, 20) > 0) {
        char buf[4096];
        if (::recv(fd, buf, sizeof(buf), 0) <= 0) return;
      }
    }
  }

 private:
  void AcceptLoop() {
    int index = 0;
    while (!stopping()) {
      pollfd p{listen_fd_, POLLIN, 0};
      if (::poll(&p, 1, 20) <= 0) continue;
      int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) continue;
      accepted_.fetch_add(1);
      int i = index++;
      std::lock_guard<std::mutex> lock(mu_);
      threads_.emplace_back([this, fd, i] {
        handler_(this, fd, i);
        ::close(fd);
      });
    }
  }

  Handler handler_;
  int listen_fd_ = -1;
  int port_ = -1;
  std::atomic<bool> stop_{false};
  std::atomic<int> accepted_{0};
  std::thread accept_thread_;
  std::mutex mu_;
  std::vector<std::thread> threads_;
};

// Target of the request line in `head` ("GET /x HTTP/1.1" -> "/x").
std::string TargetOf(const std::string& head) {
  size_t sp1 = head.find(' ');
  size_t sp2 = head.find(' ', sp1 + 1);
  if (sp1 == std::string::npos || sp2 == std::string::npos) return "";
  return head.substr(sp1 + 1, sp2 - sp1 - 1);
}

// A self-signed certificate for DNS:localhost, written as PEM files in a temporary directory.
struct TestCert {
  std::string dir;
  std::string cert_path;
  std::string key_path;

  TestCert() {
    char tmpl[] = "/tmp/sflb_upstream_test_XXXXXX";
    dir = ::mkdtemp(tmpl);
    cert_path = dir + "/cert.pem";
    key_path = dir + "/key.pem";
    EVP_PKEY* key = EVP_EC_gen("P-256");
    X509* x = X509_new();
    X509_set_version(x, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
    X509_gmtime_adj(X509_getm_notBefore(x), -3600);
    X509_gmtime_adj(X509_getm_notAfter(x), 86400);
    X509_set_pubkey(x, key);
    X509_NAME* name = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                               reinterpret_cast<const unsigned char*>("localhost"), -1, -1, 0);
    X509_set_issuer_name(x, name);
    X509V3_CTX ctx;
    X509V3_set_ctx_nodb(&ctx);
    X509V3_set_ctx(&ctx, x, x, nullptr, nullptr, 0);
    X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, NID_subject_alt_name, "DNS:localhost");
    X509_add_ext(x, ext, -1);
    X509_EXTENSION_free(ext);
    X509_sign(x, key, EVP_sha256());
    FILE* f = std::fopen(cert_path.c_str(), "w");
    PEM_write_X509(f, x);
    std::fclose(f);
    f = std::fopen(key_path.c_str(), "w");
    PEM_write_PrivateKey(f, key, nullptr, nullptr, 0, nullptr, nullptr);
    std::fclose(f);
    X509_free(x);
    EVP_PKEY_free(key);
  }
  ~TestCert() {
    std::remove(cert_path.c_str());
    std::remove(key_path.c_str());
    ::rmdir(dir.c_str());
  }
};

const TestCert& Cert() {
  static const TestCert cert;  // its files are removed at exit
  return cert;
}

// ---------------------------------------------------------------------------------------------
// ParseBaseUrl

TEST(ParseBaseUrlTest, ParsesValidUrls) {
  absl::StatusOr<UpstreamEndpoint> ep = ParseBaseUrl("https://api.siliconflow.cn/v1");
  ASSERT_TRUE(ep.ok()) << ep.status();
  EXPECT_TRUE(ep->tls);
  EXPECT_EQ(ep->host, "api.siliconflow.cn");
  EXPECT_EQ(ep->port, 443);
  EXPECT_EQ(ep->base_path, "/v1");
  EXPECT_EQ(ep->HostHeader(), "api.siliconflow.cn");

  ep = ParseBaseUrl("http://localhost:8080/");
  ASSERT_TRUE(ep.ok()) << ep.status();
  EXPECT_FALSE(ep->tls);
  EXPECT_EQ(ep->port, 8080);
  EXPECT_EQ(ep->base_path, "");
  EXPECT_EQ(ep->HostHeader(), "localhost:8080");

  ep = ParseBaseUrl("  HTTPS://API.Example.COM:443/v1//\n");
  ASSERT_TRUE(ep.ok()) << ep.status();
  EXPECT_EQ(ep->host, "api.example.com");
  EXPECT_EQ(ep->base_path, "/v1");
  EXPECT_EQ(ep->HostHeader(), "api.example.com");

  ep = ParseBaseUrl("http://[::1]:9000/api/v1");
  ASSERT_TRUE(ep.ok()) << ep.status();
  EXPECT_EQ(ep->host, "::1");
  EXPECT_EQ(ep->port, 9000);
  EXPECT_EQ(ep->base_path, "/api/v1");
  EXPECT_EQ(ep->HostHeader(), "[::1]:9000");

  ep = ParseBaseUrl("https://[2001:db8::1]");
  ASSERT_TRUE(ep.ok()) << ep.status();
  EXPECT_EQ(ep->port, 443);
  EXPECT_EQ(ep->HostHeader(), "[2001:db8::1]");

  ep = ParseBaseUrl("http://10.0.0.1:80");
  ASSERT_TRUE(ep.ok()) << ep.status();
  EXPECT_EQ(ep->HostHeader(), "10.0.0.1");
}

TEST(ParseBaseUrlTest, RejectsInvalidUrls) {
  struct Case {
    const char* url;
    const char* message;
  };
  const Case cases[] = {
      {"ftp://host/v1", "scheme"},    {"api.siliconflow.cn/v1", "http:// or https://"},
      {"https://", "no host"},        {"https:///v1", "no host"},
      {"https://:443/v1", "no host"}, {"https://h:0", "port"},
      {"https://h:65536", "port"},    {"https://h:abc", "port"},
      {"https://h:", "port"},         {"https://user:pw@h/v1", "user info"},
      {"https://[::1/v1", "IPv6"},    {"https://[zz::1]/v1", "IPv6"},
      {"https://[::1]x/v1", "junk"},  {"https://h/v1?x=1", "query"},
      {"https://h/v1#frag", "query"}, {"https://h st/v1", "invalid character"},
      {"https://h:1:2/", "port"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<UpstreamEndpoint> ep = ParseBaseUrl(c.url);
    ASSERT_FALSE(ep.ok()) << c.url;
    EXPECT_EQ(ep.status().code(), absl::StatusCode::kInvalidArgument) << c.url;
    EXPECT_THAT(std::string(ep.status().message()), HasSubstr(c.message)) << c.url;
  }
}

// ---------------------------------------------------------------------------------------------
// Round trips against httplib

struct Recorded {
  std::mutex mu;
  std::string method, target, body, host, auth, custom, content_type, connection;
  int count = 0;
};

void Record(Recorded* rec, const httplib::Request& req) {
  std::lock_guard<std::mutex> lock(rec->mu);
  rec->method = req.method;
  rec->target = req.target;
  rec->body = req.body;
  rec->host = req.get_header_value("Host");
  rec->auth = req.get_header_value("Authorization");
  rec->custom = req.get_header_value("X-Custom");
  rec->content_type = req.get_header_value("Content-Type");
  rec->connection = req.get_header_value("Connection");
  rec->count++;
}

TEST(UpstreamClientTest, GetAndPostRoundTrip) {
  Recorded rec;
  httplib::Server svr;
  svr.Get("/v1/models", [&](const httplib::Request& req, httplib::Response& res) {
    Record(&rec, req);
    res.set_header("X-Reply", "yes");
    res.set_content("{\"data\":[]}", "application/json");
  });
  svr.Post("/v1/chat/completions", [&](const httplib::Request& req, httplib::Response& res) {
    Record(&rec, req);
    res.status = 201;
    res.set_content("echo:" + req.body, "text/plain");
  });
  HttplibRunner run(&svr);
  UpstreamClient client(Endpoint(run.port()), {});
  ASSERT_TRUE(client.init_status().ok());

  UpstreamRequest get = Get("/v1/models?x=1&y=a%20b");
  get.headers = {{"Authorization", "Bearer sk-test"},
                 {"X-Custom", "v 1"},
                 {"Host", "ignored"},
                 {"Connection", "close"}};
  auto ex = client.Send(get);
  ASSERT_TRUE(ex.ok()) << ex.status();
  EXPECT_EQ((*ex)->head().status, 200);
  EXPECT_EQ((*ex)->head().reason, "OK");
  ASSERT_NE((*ex)->head().Find("x-reply"), nullptr);
  EXPECT_EQ(*(*ex)->head().Find("X-REPLY"), "yes");
  EXPECT_EQ(*(*ex)->head().Find("content-type"), "application/json");
  EXPECT_EQ((*ex)->head().framing, BodyFraming::kContentLength);
  EXPECT_EQ((*ex)->head().content_length, 11);
  EXPECT_FALSE((*ex)->reused_connection());
  absl::StatusOr<std::string> body = ReadBody(ex->get());
  ASSERT_TRUE(body.ok()) << body.status();
  EXPECT_EQ(*body, "{\"data\":[]}");
  EXPECT_TRUE((*ex)->body_complete());
  ex->reset();
  {
    std::lock_guard<std::mutex> lock(rec.mu);
    EXPECT_EQ(rec.method, "GET");
    EXPECT_EQ(rec.target, "/v1/models?x=1&y=a%20b");
    EXPECT_EQ(rec.host, absl::StrCat("127.0.0.1:", run.port()));
    EXPECT_EQ(rec.auth, "Bearer sk-test");
    EXPECT_EQ(rec.custom, "v 1");
    EXPECT_EQ(rec.connection, "keep-alive");
  }

  UpstreamRequest post;
  post.method = "POST";
  post.target = "/v1/chat/completions";
  post.headers = {{"Content-Type", "application/json"}, {"Authorization", "Bearer sk-2"}};
  const std::string payload =
      "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}";
  post.body = payload;
  ex = client.Send(post);
  ASSERT_TRUE(ex.ok()) << ex.status();
  EXPECT_EQ((*ex)->head().status, 201);
  EXPECT_TRUE((*ex)->reused_connection());
  body = ReadBody(ex->get());
  ASSERT_TRUE(body.ok()) << body.status();
  EXPECT_EQ(*body, "echo:" + payload);
  ex->reset();
  {
    std::lock_guard<std::mutex> lock(rec.mu);
    EXPECT_EQ(rec.method, "POST");
    EXPECT_EQ(rec.target, "/v1/chat/completions");
    EXPECT_EQ(rec.body, payload);
    EXPECT_EQ(rec.content_type, "application/json");
    EXPECT_EQ(rec.auth, "Bearer sk-2");
  }
  UpstreamClient::Stats stats = client.GetStats();
  EXPECT_EQ(stats.connects, 1u);
  EXPECT_EQ(stats.reuses, 1u);
  EXPECT_EQ(stats.idle_now, 1u);
}

TEST(UpstreamClientTest, LargeContentLengthBodyHeadAnd204) {
  std::string big(3 * 1024 * 1024 + 7, '\0');
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>('a' + i % 26);
  httplib::Server svr;
  svr.Get("/big", [&](const httplib::Request&, httplib::Response& res) {
    res.set_content(big, "application/octet-stream");
  });
  svr.Get("/empty", [&](const httplib::Request&, httplib::Response& res) { res.status = 204; });
  HttplibRunner run(&svr);
  UpstreamClient client(Endpoint(run.port()), {});

  auto ex = client.Send(Get("/big"));
  ASSERT_TRUE(ex.ok()) << ex.status();
  std::vector<std::string> pieces;
  absl::StatusOr<std::string> body = ReadBody(ex->get(), &pieces);
  ASSERT_TRUE(body.ok()) << body.status();
  EXPECT_TRUE(*body == big);
  EXPECT_GT(pieces.size(), 10u);
  for (const std::string& p : pieces) EXPECT_LE(p.size(), 16u * 1024);
  ex->reset();

  UpstreamRequest head = Get("/big");
  head.method = "HEAD";
  ex = client.Send(head);
  ASSERT_TRUE(ex.ok()) << ex.status();
  EXPECT_EQ((*ex)->head().framing, BodyFraming::kNone);
  EXPECT_TRUE((*ex)->body_complete());
  body = ReadBody(ex->get());
  ASSERT_TRUE(body.ok());
  EXPECT_EQ(*body, "");
  ex->reset();

  ex = client.Send(Get("/empty"));
  ASSERT_TRUE(ex.ok()) << ex.status();
  EXPECT_EQ((*ex)->head().status, 204);
  body = ReadBody(ex->get());
  ASSERT_TRUE(body.ok());
  EXPECT_EQ(*body, "");
  ex->reset();
  EXPECT_EQ(client.GetStats().connects, 1u);
  EXPECT_EQ(client.GetStats().reuses, 2u);
}

TEST(UpstreamClientTest, ChunkedBodyArrivesAsProduced) {
  std::mutex mu;
  std::condition_variable cv;
  bool first_seen = false;
  bool waited_too_long = false;
  httplib::Server svr;
  svr.Get("/v1/stream", [&](const httplib::Request&, httplib::Response& res) {
    res.set_chunked_content_provider("text/event-stream", [&](size_t, httplib::DataSink& sink) {
      std::string first = "data: {\"n\":1}\n\n";
      sink.write(first.data(), first.size());
      {
        // The second event is produced only after the client has seen the first one.
        std::unique_lock<std::mutex> lock(mu);
        if (!cv.wait_for(lock, std::chrono::seconds(5), [&] { return first_seen; })) {
          waited_too_long = true;
        }
      }
      std::string second = "data: [DONE]\n\n";
      sink.write(second.data(), second.size());
      sink.done();
      return true;
    });
  });
  HttplibRunner run(&svr);
  UpstreamClient client(Endpoint(run.port()), {});
  auto ex = client.Send(Get("/v1/stream"));
  ASSERT_TRUE(ex.ok()) << ex.status();
  EXPECT_EQ((*ex)->head().framing, BodyFraming::kChunked);
  EXPECT_EQ(*(*ex)->head().Find("content-type"), "text/event-stream");
  absl::StatusOr<absl::string_view> piece = (*ex)->ReadSome();
  ASSERT_TRUE(piece.ok()) << piece.status();
  EXPECT_EQ(*piece, "data: {\"n\":1}\n\n");
  {
    std::lock_guard<std::mutex> lock(mu);
    first_seen = true;
  }
  cv.notify_all();
  piece = (*ex)->ReadSome();
  ASSERT_TRUE(piece.ok()) << piece.status();
  EXPECT_EQ(*piece, "data: [DONE]\n\n");
  piece = (*ex)->ReadSome();
  ASSERT_TRUE(piece.ok()) << piece.status();
  EXPECT_TRUE(piece->empty());
  EXPECT_TRUE((*ex)->body_complete());
  ex->reset();
  EXPECT_FALSE(waited_too_long);
  EXPECT_EQ(client.GetStats().idle_now, 1u);  // chunked body fully read: connection pooled
}

TEST(UpstreamClientTest, UntilCloseBody) {
  RawServer raw([](RawServer* s, int fd, int) {
    if (s->ReadRequestHead(fd).empty()) return;
    RawServer::WriteAll(fd, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello ");
    RawServer::WriteAll(fd, "world");
  });
  UpstreamClient client(Endpoint(raw.port()), {});
  auto ex = client.Send(Get("/"));
  ASSERT_TRUE(ex.ok()) << ex.status();
  EXPECT_EQ((*ex)->head().framing, BodyFraming::kUntilClose);
  absl::StatusOr<std::string> body = ReadBody(ex->get());
  ASSERT_TRUE(body.ok()) << body.status();
  EXPECT_EQ(*body, "hello world");
  ex->reset();
  EXPECT_EQ(client.GetStats().idle_now, 0u);
}

TEST(UpstreamClientTest, InterimResponsesSkippedAndBufferedBodyKeepsConnection) {
  RawServer raw([](RawServer* s, int fd, int) {
    while (true) {
      std::string head = s->ReadRequestHead(fd);
      if (head.empty()) return;
      // One write: head and body arrive together, so the client has the body buffered.
      RawServer::WriteAll(fd,
                          "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n"
                          "\r\nHTTP/1.1 429 Too Many Requests\r\nContent-Length: 12\r\n\r\n"
                          "{\"error\":1}\n");
    }
  });
  UpstreamClient client(Endpoint(raw.port()), {});
  for (int i = 0; i < 3; ++i) {
    auto ex = client.Send(Get("/"));
    ASSERT_TRUE(ex.ok()) << ex.status();
    EXPECT_EQ((*ex)->head().status, 429);
    EXPECT_EQ((*ex)->head().reason, "Too Many Requests");
    // Dropped without reading the body (e.g. to retry on another key): still reusable.
  }
  UpstreamClient::Stats stats = client.GetStats();
  EXPECT_EQ(stats.connects, 1u);
  EXPECT_EQ(stats.reuses, 2u);
}

TEST(UpstreamClientTest, StalePooledConnectionIsRetriedOnce) {
  RawServer raw([](RawServer* s, int fd, int index) {
    if (s->ReadRequestHead(fd).empty()) return;
    if (index == 0) {
      RawServer::WriteAll(fd, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
      // The next request on this connection finds the server gone (keep-alive race).
      s->ReadRequestHead(fd);
      ::shutdown(fd, SHUT_RDWR);
      return;
    }
    RawServer::WriteAll(fd, "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok2");
    s->Hang(fd);
  });
  UpstreamClient client(Endpoint(raw.port()), {});
  auto ex = client.Send(Get("/a"));
  ASSERT_TRUE(ex.ok()) << ex.status();
  EXPECT_EQ(*ReadBody(ex->get()), "ok");
  ex->reset();
  ex = client.Send(Get("/b"));
  ASSERT_TRUE(ex.ok()) << ex.status();
  EXPECT_EQ(*ReadBody(ex->get()), "ok2");
  EXPECT_FALSE((*ex)->reused_connection());
  ex->reset();
  UpstreamClient::Stats stats = client.GetStats();
  EXPECT_EQ(stats.connects, 2u);
  EXPECT_EQ(stats.reuses, 1u);
  EXPECT_EQ(stats.stale_retries, 1u);
}

TEST(UpstreamClientTest, ServerClosedIdleConnectionIsNotUsed) {
  std::atomic<int> closed{0};
  RawServer raw([&](RawServer* s, int fd, int) {
    if (s->ReadRequestHead(fd).empty()) return;
    // Advertises keep-alive, then closes right away (server-side idle timeout).
    RawServer::WriteAll(fd, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    ::shutdown(fd, SHUT_RDWR);
    closed.fetch_add(1);
  });
  UpstreamClient client(Endpoint(raw.port()), {});
  for (int i = 0; i < 3; ++i) {
    auto ex = client.Send(Get("/"));
    ASSERT_TRUE(ex.ok()) << ex.status();
    EXPECT_EQ(*ReadBody(ex->get()), "ok");
    ex->reset();
    ASSERT_TRUE(WaitFor([&] { return closed.load() == i + 1; }));
  }
  UpstreamClient::Stats stats = client.GetStats();
  EXPECT_EQ(stats.connects, 3u);
  // The FIN is normally seen when taking the connection; the retry covers a late one.
  EXPECT_EQ(stats.reuses, stats.stale_retries);
}

TEST(UpstreamClientTest, IdleConnectionTtlAndPoolLimit) {
  httplib::Server svr;
  svr.Get("/", [](const httplib::Request&, httplib::Response& res) {
    res.set_content("x", "text/plain");
  });
  HttplibRunner run(&svr);
  UpstreamClientOptions options;
  options.idle_connection_ttl = absl::ZeroDuration();
  UpstreamClient client(Endpoint(run.port()), options);
  for (int i = 0; i < 2; ++i) {
    auto ex = client.Send(Get("/"));
    ASSERT_TRUE(ex.ok()) << ex.status();
    EXPECT_EQ(*ReadBody(ex->get()), "x");
  }
  EXPECT_EQ(client.GetStats().connects, 2u);  // expired right away: never reused

  options.idle_connection_ttl = absl::Minutes(1);
  options.max_idle_connections = 1;
  UpstreamClient limited(Endpoint(run.port()), options);
  {
    auto a = limited.Send(Get("/"));
    auto b = limited.Send(Get("/"));
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_EQ(*ReadBody(a->get()), "x");
    EXPECT_EQ(*ReadBody(b->get()), "x");
  }
  EXPECT_EQ(limited.GetStats().connects, 2u);
  EXPECT_EQ(limited.GetStats().idle_now, 1u);
}

// ---------------------------------------------------------------------------------------------
// Failures and timeouts

TEST(UpstreamClientTest, ConnectRefusedIsUnavailable) {
  // A bound but not listening socket: connecting to its port is refused.
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  socklen_t len = sizeof(addr);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  UpstreamClient client(Endpoint(ntohs(addr.sin_port)), {});
  auto ex = client.Send(Get("/"));
  ::close(fd);
  ASSERT_FALSE(ex.ok());
  EXPECT_EQ(ex.status().code(), absl::StatusCode::kUnavailable) << ex.status();
  EXPECT_THAT(std::string(ex.status().message()), HasSubstr("connect"));
  EXPECT_THAT(std::string(ex.status().message()), HasSubstr("refused"));
}

TEST(UpstreamClientTest, DnsFailureIsUnavailable) {
  UpstreamClient client(Endpoint(80, false, "no-such-host.invalid"), {});
  auto ex = client.Send(Get("/"));
  ASSERT_FALSE(ex.ok());
  EXPECT_EQ(ex.status().code(), absl::StatusCode::kUnavailable) << ex.status();
  EXPECT_THAT(std::string(ex.status().message()), HasSubstr("DNS"));
}

TEST(UpstreamClientTest, InvalidRequestIsRejectedBeforeConnecting) {
  UpstreamClient client(Endpoint(1), {});
  UpstreamRequest r = Get("/x");
  r.headers = {{"X-Bad", "a\r\nInjected: yes"}};
  auto ex = client.Send(r);
  ASSERT_FALSE(ex.ok());
  EXPECT_EQ(ex.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(client.GetStats().connects, 0u);
}

TEST(UpstreamClientTest, FirstByteTimeout) {
  RawServer raw([](RawServer* s, int fd, int) {
    if (s->ReadRequestHead(fd).empty()) return;
    s->Hang(fd);
  });
  UpstreamClientOptions options;
  options.first_byte_timeout = absl::Milliseconds(200);
  UpstreamClient client(Endpoint(raw.port()), options);
  absl::Time start = absl::Now();
  auto ex = client.Send(Get("/"));
  absl::Duration took = absl::Now() - start;
  ASSERT_FALSE(ex.ok());
  EXPECT_EQ(ex.status().code(), absl::StatusCode::kDeadlineExceeded) << ex.status();
  EXPECT_THAT(std::string(ex.status().message()), HasSubstr("response head"));
  EXPECT_GE(took, absl::Milliseconds(190));
  EXPECT_LT(took, absl::Seconds(2));
}

TEST(UpstreamClientTest, IdleTimeoutMidBody) {
  RawServer raw([](RawServer* s, int fd, int) {
    if (s->ReadRequestHead(fd).empty()) return;
    RawServer::WriteAll(fd, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc");
    s->Hang(fd);
  });
  UpstreamClientOptions options;
  options.idle_timeout = absl::Milliseconds(200);
  UpstreamClient client(Endpoint(raw.port()), options);
  auto ex = client.Send(Get("/"));
  ASSERT_TRUE(ex.ok()) << ex.status();
  absl::StatusOr<absl::string_view> piece = (*ex)->ReadSome();
  ASSERT_TRUE(piece.ok()) << piece.status();
  EXPECT_EQ(*piece, "abc");
  absl::Time start = absl::Now();
  piece = (*ex)->ReadSome();
  ASSERT_FALSE(piece.ok());
  EXPECT_EQ(piece.status().code(), absl::StatusCode::kDeadlineExceeded) << piece.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(2));
  ex->reset();
  EXPECT_EQ(client.GetStats().idle_now, 0u);
}

TEST(UpstreamClientTest, TruncatedBodyIsUnavailable) {
  RawServer raw([](RawServer* s, int fd, int index) {
    if (s->ReadRequestHead(fd).empty()) return;
    if (index == 0) {
      RawServer::WriteAll(fd, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc");
    } else {
      RawServer::WriteAll(fd, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n");
    }
  });
  UpstreamClient client(Endpoint(raw.port()), {});
  for (int i = 0; i < 2; ++i) {
    auto ex = client.Send(Get("/"));
    ASSERT_TRUE(ex.ok()) << ex.status();
    absl::StatusOr<std::string> body = ReadBody(ex->get());
    ASSERT_FALSE(body.ok());
    EXPECT_EQ(body.status().code(), absl::StatusCode::kUnavailable) << body.status();
    EXPECT_THAT(std::string(body.status().message()), HasSubstr("closed"));
  }
}

TEST(UpstreamClientTest, CancelFromAnotherThreadUnblocksSend) {
  std::atomic<bool> request_seen{false};
  RawServer raw([&](RawServer* s, int fd, int) {
    if (s->ReadRequestHead(fd).empty()) return;
    request_seen.store(true);
    s->Hang(fd);
  });
  UpstreamClientOptions options;
  options.abort_poll_interval = absl::Seconds(30);  // the wakeup must come from Cancel itself
  UpstreamClient client(Endpoint(raw.port()), options);
  auto token = std::make_shared<CancelToken>();
  absl::Time cancelled_at;
  std::thread watchdog([&] {
    ASSERT_TRUE(WaitFor([&] { return request_seen.load(); }));
    cancelled_at = absl::Now();
    token->Cancel();
    token->Cancel();  // idempotent
  });
  auto ex = client.Send(Get("/"), nullptr, token);
  absl::Time returned_at = absl::Now();
  watchdog.join();
  ASSERT_FALSE(ex.ok());
  EXPECT_EQ(ex.status().code(), absl::StatusCode::kCancelled) << ex.status();
  EXPECT_LT(returned_at - cancelled_at, absl::Seconds(1));

  // A cancelled token fails later Sends at once.
  ex = client.Send(Get("/"), nullptr, token);
  ASSERT_FALSE(ex.ok());
  EXPECT_EQ(ex.status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(client.GetStats().idle_now, 0u);
}

TEST(UpstreamClientTest, CancelFromAnotherThreadUnblocksReadSome) {
  RawServer raw([](RawServer* s, int fd, int) {
    if (s->ReadRequestHead(fd).empty()) return;
    RawServer::WriteAll(fd, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n");
    s->Hang(fd);
  });
  UpstreamClientOptions options;
  options.abort_poll_interval = absl::Seconds(30);
  UpstreamClient client(Endpoint(raw.port()), options);
  auto ex = client.Send(Get("/"));
  ASSERT_TRUE(ex.ok()) << ex.status();
  absl::StatusOr<absl::string_view> piece = (*ex)->ReadSome();
  ASSERT_TRUE(piece.ok());
  EXPECT_EQ(*piece, "hi");
  std::shared_ptr<CancelToken> token = (*ex)->cancel_token();
  absl::Time cancelled_at;
  std::thread watchdog([&] {
    // Whether ReadSome is already blocked or not, it must end with CANCELLED.
    absl::SleepFor(absl::Milliseconds(50));
    cancelled_at = absl::Now();
    token->Cancel();
  });
  piece = (*ex)->ReadSome();
  absl::Time returned_at = absl::Now();
  watchdog.join();
  ASSERT_FALSE(piece.ok());
  EXPECT_EQ(piece.status().code(), absl::StatusCode::kCancelled) << piece.status();
  EXPECT_LT(returned_at - cancelled_at, absl::Seconds(1));
  ex->reset();
  EXPECT_EQ(client.GetStats().idle_now, 0u);
}

TEST(UpstreamClientTest, ShouldAbortIsPolled) {
  RawServer raw([](RawServer* s, int fd, int index) {
    if (s->ReadRequestHead(fd).empty()) return;
    if (index == 1) RawServer::WriteAll(fd, "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab");
    s->Hang(fd);
  });
  UpstreamClientOptions options;
  options.abort_poll_interval = absl::Milliseconds(20);
  UpstreamClient client(Endpoint(raw.port()), options);

  absl::Time start = absl::Now();
  std::function<bool()> abort_later = [&] { return absl::Now() - start > absl::Milliseconds(150); };
  auto ex = client.Send(Get("/"), abort_later);
  ASSERT_FALSE(ex.ok());
  EXPECT_EQ(ex.status().code(), absl::StatusCode::kCancelled) << ex.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));

  ex = client.Send(Get("/"));
  ASSERT_TRUE(ex.ok()) << ex.status();
  absl::StatusOr<absl::string_view> piece = (*ex)->ReadSome(abort_later);
  ASSERT_TRUE(piece.ok()) << piece.status();
  EXPECT_EQ(*piece, "ab");
  start = absl::Now();
  piece = (*ex)->ReadSome(abort_later);
  ASSERT_FALSE(piece.ok());
  EXPECT_EQ(piece.status().code(), absl::StatusCode::kCancelled) << piece.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));
}

TEST(UpstreamClientTest, MalformedResponsesAreInternal) {
  std::string huge_head = "HTTP/1.1 200 OK\r\n";
  while (huge_head.size() < 70 * 1024) huge_head += "X-Filler: 0123456789012345678901234567\r\n";
  const std::map<std::string, std::string> responses = {
      {"/garbage", "SSH-2.0-OpenSSH_9.2\r\n\r\n"},
      {"/status", "HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n"},
      {"/fold", "HTTP/1.1 200 OK\r\nX-A: b\r\n c\r\nContent-Length: 0\r\n\r\n"},
      {"/nocolon", "HTTP/1.1 200 OK\r\nJustAName\r\n\r\n"},
      {"/space", "HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n"},
      {"/cl", "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"},
      {"/clneg", "HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\n"},
      {"/switch", "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"},
      {"/huge", huge_head},
  };
  RawServer raw([&](RawServer* s, int fd, int) {
    std::string head = s->ReadRequestHead(fd);
    if (head.empty()) return;
    auto it = responses.find(TargetOf(head));
    if (it != responses.end()) RawServer::WriteAll(fd, it->second);
    if (TargetOf(head) == "/badchunk") {
      RawServer::WriteAll(fd, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n");
    }
    ::shutdown(fd, SHUT_WR);
    s->Hang(fd);
  });
  UpstreamClient client(Endpoint(raw.port()), {});
  for (const auto& [target, response] : responses) {
    auto ex = client.Send(Get(target));
    ASSERT_FALSE(ex.ok()) << target;
    EXPECT_EQ(ex.status().code(), absl::StatusCode::kInternal) << target << ": " << ex.status();
  }
  auto ex = client.Send(Get("/badchunk"));
  ASSERT_TRUE(ex.ok()) << ex.status();
  absl::StatusOr<std::string> body = ReadBody(ex->get());
  ASSERT_FALSE(body.ok());
  EXPECT_EQ(body.status().code(), absl::StatusCode::kInternal) << body.status();
  // A second read after an error fails too, without crashing.
  EXPECT_FALSE((*ex)->ReadSome().ok());
  ex->reset();
  EXPECT_EQ(client.GetStats().idle_now, 0u);
}

TEST(UpstreamClientTest, ExchangeMayOutliveClient) {
  httplib::Server svr;
  svr.Get("/", [](const httplib::Request&, httplib::Response& res) {
    res.set_content("still here", "text/plain");
  });
  HttplibRunner run(&svr);
  std::unique_ptr<UpstreamExchange> ex;
  {
    UpstreamClient client(Endpoint(run.port()), {});
    auto sent = client.Send(Get("/"));
    ASSERT_TRUE(sent.ok()) << sent.status();
    ex = std::move(*sent);
  }
  EXPECT_EQ(*ReadBody(ex.get()), "still here");
  ex.reset();  // returns the connection to the orphaned pool, which then closes it
}

TEST(UpstreamClientTest, PlainWriteToResetConnectionDoesNotRaiseSigpipe) {
  RawServer raw([](RawServer* s, int fd, int) {
    if (s->ReadRequestHead(fd).empty()) return;
    linger l{1, 0};  // close with RST
    ::setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
  });
  struct sigaction old_action;
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  ::sigaction(SIGPIPE, &dfl, &old_action);
  UpstreamClient client(Endpoint(raw.port()), {});
  std::string body(32 * 1024 * 1024, 'x');
  UpstreamRequest r = Get("/upload");
  r.method = "POST";
  r.body = body;
  auto ex = client.Send(r);
  ::sigaction(SIGPIPE, &old_action, nullptr);
  ASSERT_FALSE(ex.ok());
  EXPECT_EQ(ex.status().code(), absl::StatusCode::kUnavailable) << ex.status();
}

// ---------------------------------------------------------------------------------------------
// ---------------------------------------------------------------------------------------------
// The event-loop API (StartInLoop / Open / TryCompleteHead / TryReadSome), driven with poll()
// as a loop would

absl::Status DriveHead(UpstreamExchange* ex) {
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  for (;;) {
    UpstreamExchange::Wait wait;
    absl::StatusOr<bool> done = ex->TryCompleteHead(&wait);
    if (!done.ok()) return done.status();
    if (*done) return absl::OkStatus();
    if (absl::Now() > deadline) return absl::DeadlineExceededError("head");
    EXPECT_NE(wait, UpstreamExchange::Wait::kNone);
    pollfd p{ex->fd(), static_cast<short>(wait == UpstreamExchange::Wait::kWrite ? POLLOUT : POLLIN),
             0};
    ::poll(&p, 1, 100);
  }
}

absl::StatusOr<std::string> DriveBody(UpstreamExchange* ex) {
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  std::string body;
  for (;;) {
    UpstreamExchange::Wait wait;
    absl::StatusOr<absl::string_view> piece = ex->TryReadSome(&wait);
    if (!piece.ok()) return piece.status();
    if (!piece->empty()) {
      body.append(piece->data(), piece->size());
      continue;
    }
    if (wait == UpstreamExchange::Wait::kNone) return body;
    if (absl::Now() > deadline) return absl::DeadlineExceededError("body");
    pollfd p{ex->fd(), static_cast<short>(wait == UpstreamExchange::Wait::kWrite ? POLLOUT : POLLIN),
             0};
    ::poll(&p, 1, 100);
  }
}

TEST(UpstreamClientLoopTest, OpenThenPooledExchangesWithoutBlocking) {
  httplib::Server svr;
  svr.Post("/echo", [](const httplib::Request& req, httplib::Response& res) {
    res.set_content("echo:" + req.body, "text/plain");
  });
  HttplibRunner run(&svr);
  UpstreamClient client(Endpoint(run.port()), {});
  UpstreamRequest post = Get("/echo");
  post.method = "POST";
  const std::string small = "hello";
  const std::string big(300 * 1024, 'x');  // beyond the one-write limit: head and body apart
  post.body = small;
  // Nothing pooled yet: the loop must hand the attempt to a worker.
  absl::StatusOr<std::unique_ptr<UpstreamExchange>> none = client.StartInLoop(post, nullptr);
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_EQ(*none, nullptr);
  auto ex = client.Open(post, nullptr);
  ASSERT_TRUE(ex.ok()) << ex.status();
  EXPECT_FALSE((*ex)->head_complete());
  EXPECT_FALSE((*ex)->reused_connection());
  ASSERT_TRUE(DriveHead(ex->get()).ok());
  EXPECT_TRUE((*ex)->head_complete());
  EXPECT_EQ((*ex)->head().status, 200);
  EXPECT_EQ(*DriveBody(ex->get()), "echo:hello");
  ex->reset();  // pooled again
  for (const std::string* body : {&small, &big}) {
    post.body = *body;
    ex = client.StartInLoop(post, nullptr);
    ASSERT_TRUE(ex.ok()) << ex.status();
    ASSERT_NE(*ex, nullptr);
    EXPECT_TRUE((*ex)->reused_connection());
    ASSERT_TRUE(DriveHead(ex->get()).ok());
    EXPECT_EQ(*DriveBody(ex->get()), "echo:" + *body);
    ex->reset();
  }
  UpstreamClient::Stats stats = client.GetStats();
  EXPECT_EQ(stats.connects, 1u);
  EXPECT_EQ(stats.reuses, 2u);
  EXPECT_EQ(stats.idle_now, 1u);
}

TEST(UpstreamClientLoopTest, OnceTheAddressIsCachedNewConnectionsAreOpenedInTheLoop) {
  httplib::Server svr;
  svr.Get("/a", [](const httplib::Request&, httplib::Response& res) {
    res.set_content("a", "text/plain");
  });
  HttplibRunner run(&svr);
  UpstreamClientOptions options;
  options.max_idle_connections = 0;  // nothing is pooled: every exchange needs a connection
  UpstreamClient client(Endpoint(run.port()), options);
  // Cold DNS cache: a worker has to open the first connection.
  auto ex = client.StartInLoop(Get("/a"), nullptr);
  ASSERT_TRUE(ex.ok());
  EXPECT_EQ(*ex, nullptr);
  ex = client.Open(Get("/a"), nullptr);
  ASSERT_TRUE(ex.ok()) << ex.status();
  ASSERT_TRUE(DriveHead(ex->get()).ok());
  EXPECT_EQ(*DriveBody(ex->get()), "a");
  ex->reset();
  // Now the loop connects by itself.
  for (int i = 0; i < 2; ++i) {
    ex = client.StartInLoop(Get("/a"), nullptr);
    ASSERT_TRUE(ex.ok() && *ex != nullptr);
    EXPECT_FALSE((*ex)->reused_connection());
    ASSERT_TRUE(DriveHead(ex->get()).ok());
    EXPECT_FALSE((*ex)->connecting());
    EXPECT_EQ(*DriveBody(ex->get()), "a");
    ex->reset();
  }
  EXPECT_EQ(client.GetStats().connects, 3u);
  EXPECT_EQ(client.GetStats().reuses, 0u);
}

TEST(UpstreamClientLoopTest, AConnectRefusedInTheLoopIsLeftToAWorker) {
  auto svr = std::make_unique<httplib::Server>();
  svr->Get("/a", [](const httplib::Request&, httplib::Response& res) {
    res.set_content("a", "text/plain");
  });
  auto run = std::make_unique<HttplibRunner>(svr.get());
  UpstreamClientOptions options;
  options.max_idle_connections = 0;
  UpstreamClient client(Endpoint(run->port()), options);
  auto ex = client.Open(Get("/a"), nullptr);  // caches the address
  ASSERT_TRUE(ex.ok()) << ex.status();
  ex->reset();
  run.reset();  // nothing listens there any more
  svr.reset();
  ex = client.StartInLoop(Get("/a"), nullptr);
  ASSERT_TRUE(ex.ok());
  if (*ex != nullptr) {  // else the connect failed at once: also left to a worker
    absl::Status st = DriveHead(ex->get());
    EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
    EXPECT_TRUE((*ex)->connect_failed());
    EXPECT_FALSE((*ex)->stale());
  }
}

TEST(UpstreamClientLoopTest, APooledConnectionTheServerClosedIsFlaggedStale) {
  RawServer raw([](RawServer* s, int fd, int index) {
    if (s->ReadRequestHead(fd).empty()) return;
    if (index == 0) {
      RawServer::WriteAll(fd, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
      s->ReadRequestHead(fd);
      ::shutdown(fd, SHUT_RDWR);  // the keep-alive race: gone without answering
      return;
    }
    RawServer::WriteAll(fd, "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n");
    ::shutdown(fd, SHUT_RDWR);
  });
  UpstreamClient client(Endpoint(raw.port()), {});
  auto ex = client.Open(Get("/a"), nullptr);
  ASSERT_TRUE(ex.ok()) << ex.status();
  ASSERT_TRUE(DriveHead(ex->get()).ok());
  EXPECT_EQ(*DriveBody(ex->get()), "ok");
  ex->reset();
  ex = client.StartInLoop(Get("/b"), nullptr);
  ASSERT_TRUE(ex.ok() && *ex != nullptr);
  absl::Status st = DriveHead(ex->get());
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  EXPECT_TRUE((*ex)->stale());
  ex->reset();
  // A fresh connection that fails before answering is not stale: its error is the upstream's.
  ex = client.Open(Get("/c"), nullptr);
  ASSERT_TRUE(ex.ok()) << ex.status();
  ASSERT_TRUE(DriveHead(ex->get()).ok());
  EXPECT_EQ((*ex)->head().status, 500);
  EXPECT_FALSE((*ex)->stale());
}

TEST(UpstreamClientLoopTest, AnExchangeLeftAfterAnInterimResponseIsNotPooled) {
  RawServer raw([](RawServer* s, int fd, int) {
    if (s->ReadRequestHead(fd).empty()) return;
    RawServer::WriteAll(fd, "HTTP/1.1 100 Continue\r\n\r\n");
    s->Hang(fd);  // the final answer never comes (a loop gives up at its deadline)
  });
  UpstreamClient client(Endpoint(raw.port()), {});
  auto ex = client.Open(Get("/a"), nullptr);
  ASSERT_TRUE(ex.ok()) << ex.status();
  const absl::Time until = absl::Now() + absl::Milliseconds(300);
  while (absl::Now() < until) {
    UpstreamExchange::Wait wait;
    absl::StatusOr<bool> done = (*ex)->TryCompleteHead(&wait);
    ASSERT_TRUE(done.ok()) << done.status();
    ASSERT_FALSE(*done);
    absl::SleepFor(absl::Milliseconds(20));
  }
  ex->reset();
  EXPECT_EQ(client.GetStats().idle_now, 0u);
}

// TLS

class TlsTest : public ::testing::Test {
 protected:
  TlsTest() : svr_(Cert().cert_path.c_str(), Cert().key_path.c_str()) {
    svr_.Get("/v1/models", [](const httplib::Request& req, httplib::Response& res) {
      res.set_content("tls:" + req.get_header_value("Host"), "text/plain");
    });
    svr_.Post("/upload", [](const httplib::Request& req, httplib::Response& res) {
      res.set_content(std::to_string(req.body.size()), "text/plain");
    });
    runner_ = std::make_unique<HttplibRunner>(&svr_);
  }
  ~TlsTest() override { runner_.reset(); }

  UpstreamClientOptions TrustingOptions() {
    UpstreamClientOptions o;
    o.ca_file = Cert().cert_path;
    return o;
  }

  httplib::SSLServer svr_;
  std::unique_ptr<HttplibRunner> runner_;
};

TEST_F(TlsTest, RoundTripWithVerification) {
  ASSERT_TRUE(svr_.is_valid());
  UpstreamClient client(Endpoint(runner_->port(), true, "localhost"), TrustingOptions());
  ASSERT_TRUE(client.init_status().ok()) << client.init_status();
  for (int i = 0; i < 2; ++i) {
    auto ex = client.Send(Get("/v1/models"));
    ASSERT_TRUE(ex.ok()) << ex.status();
    EXPECT_EQ((*ex)->head().status, 200);
    EXPECT_EQ(*ReadBody(ex->get()), absl::StrCat("tls:localhost:", runner_->port()));
  }
  std::string big(200 * 1024, 'b');
  UpstreamRequest post = Get("/upload");
  post.method = "POST";
  post.body = big;
  auto ex = client.Send(post);
  ASSERT_TRUE(ex.ok()) << ex.status();
  EXPECT_EQ(*ReadBody(ex->get()), std::to_string(big.size()));
  ex->reset();
  EXPECT_EQ(client.GetStats().connects, 1u);
  EXPECT_EQ(client.GetStats().reuses, 2u);
}

TEST_F(TlsTest, LoopExchangesOverTls) {
  UpstreamClient client(Endpoint(runner_->port(), true, "localhost"), TrustingOptions());
  auto ex = client.Open(Get("/v1/models"), nullptr);
  ASSERT_TRUE(ex.ok()) << ex.status();
  ASSERT_TRUE(DriveHead(ex->get()).ok());
  EXPECT_EQ(*DriveBody(ex->get()), absl::StrCat("tls:localhost:", runner_->port()));
  ex->reset();
  const std::string big(200 * 1024, 'b');
  UpstreamRequest post = Get("/upload");
  post.method = "POST";
  post.body = big;
  ex = client.StartInLoop(post, nullptr);
  ASSERT_TRUE(ex.ok() && *ex != nullptr);
  ASSERT_TRUE(DriveHead(ex->get()).ok());
  EXPECT_EQ(*DriveBody(ex->get()), std::to_string(big.size()));
  ex->reset();
  EXPECT_EQ(client.GetStats().connects, 1u);
}

TEST_F(TlsTest, TheLoopConnectsAndHandshakesWithoutBlocking) {
  UpstreamClientOptions options = TrustingOptions();
  options.max_idle_connections = 0;
  UpstreamClient client(Endpoint(runner_->port(), true, "localhost"), options);
  auto ex = client.Open(Get("/v1/models"), nullptr);  // caches the address and a session
  ASSERT_TRUE(ex.ok()) << ex.status();
  ASSERT_TRUE(DriveHead(ex->get()).ok());
  EXPECT_TRUE(DriveBody(ex->get()).ok());
  ex->reset();
  ex = client.StartInLoop(Get("/v1/models"), nullptr);
  ASSERT_TRUE(ex.ok() && *ex != nullptr);
  EXPECT_TRUE((*ex)->connecting());
  ASSERT_TRUE(DriveHead(ex->get()).ok());
  EXPECT_EQ(*DriveBody(ex->get()), absl::StrCat("tls:localhost:", runner_->port()));
  ex->reset();
  EXPECT_EQ(client.GetStats().connects, 2u);
  EXPECT_GE(client.GetStats().tls_resumptions, 1u);
}

TEST_F(TlsTest, AnUntrustedCertificateFailsTheLoopsHandshake) {
  UpstreamClientOptions options;  // system CAs only: the test certificate is not trusted
  UpstreamClient client(Endpoint(runner_->port(), true, "localhost"), options);
  auto ex = client.Open(Get("/v1/models"), nullptr);
  ASSERT_FALSE(ex.ok());  // but the address is cached now
  ex = client.StartInLoop(Get("/v1/models"), nullptr);
  ASSERT_TRUE(ex.ok() && *ex != nullptr);
  absl::Status st = DriveHead(ex->get());
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  EXPECT_THAT(std::string(st.message()), HasSubstr("certificate verification failed"));
  EXPECT_FALSE((*ex)->connect_failed());  // a real failure, not one for a worker to retry
}

TEST_F(TlsTest, NewConnectionsResumeTheSession) {
  UpstreamClientOptions options = TrustingOptions();
  options.max_idle_connections = 0;  // every request connects anew
  UpstreamClient client(Endpoint(runner_->port(), true, "localhost"), options);
  for (int i = 0; i < 3; ++i) {
    auto ex = client.Send(Get("/v1/models"));
    ASSERT_TRUE(ex.ok()) << ex.status();
    EXPECT_TRUE(ReadBody(ex->get()).ok());
  }
  EXPECT_EQ(client.GetStats().connects, 3u);
  EXPECT_GE(client.GetStats().tls_resumptions, 1u);
}

TEST_F(TlsTest, UntrustedCertificateFails) {
  UpstreamClient client(Endpoint(runner_->port(), true, "localhost"), {});
  auto ex = client.Send(Get("/v1/models"));
  ASSERT_FALSE(ex.ok());
  EXPECT_EQ(ex.status().code(), absl::StatusCode::kUnavailable) << ex.status();
  EXPECT_THAT(std::string(ex.status().message()), HasSubstr("certificate verification failed"));
}

TEST_F(TlsTest, WrongHostnameFails) {
  // The certificate names only DNS:localhost.
  UpstreamClient client(Endpoint(runner_->port(), true, "127.0.0.1"), TrustingOptions());
  auto ex = client.Send(Get("/v1/models"));
  ASSERT_FALSE(ex.ok());
  EXPECT_EQ(ex.status().code(), absl::StatusCode::kUnavailable) << ex.status();
  EXPECT_THAT(std::string(ex.status().message()), HasSubstr("certificate verification failed"));
  EXPECT_THAT(std::string(ex.status().message()), HasSubstr("mismatch"));
}

TEST_F(TlsTest, VerificationCanBeDisabled) {
  UpstreamClientOptions options;
  options.verify_tls = false;
  UpstreamClient client(Endpoint(runner_->port(), true, "127.0.0.1"), options);
  auto ex = client.Send(Get("/v1/models"));
  ASSERT_TRUE(ex.ok()) << ex.status();
  EXPECT_TRUE(ReadBody(ex->get()).ok());
}

TEST_F(TlsTest, BadCaFileMakesClientUnusable) {
  UpstreamClientOptions options;
  options.ca_file = "/nonexistent/ca.pem";
  UpstreamClient client(Endpoint(runner_->port(), true, "localhost"), options);
  EXPECT_FALSE(client.init_status().ok());
  auto ex = client.Send(Get("/v1/models"));
  ASSERT_FALSE(ex.ok());
  EXPECT_EQ(ex.status().code(), absl::StatusCode::kFailedPrecondition) << ex.status();
}

TEST_F(TlsTest, WriteToClosedConnectionDoesNotRaiseSigpipe) {
  svr_.set_payload_max_length(1024);  // the server rejects the upload and closes
  struct sigaction old_action;
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  ::sigaction(SIGPIPE, &dfl, &old_action);
  UpstreamClient client(Endpoint(runner_->port(), true, "localhost"), TrustingOptions());
  std::string body(32 * 1024 * 1024, 'x');
  UpstreamRequest r = Get("/upload");
  r.method = "POST";
  r.body = body;
  auto ex = client.Send(r);
  ::sigaction(SIGPIPE, &old_action, nullptr);
  // Either the write fails (reset) or, if the kernel took it all, the 413 arrives.
  if (ex.ok()) {
    EXPECT_EQ((*ex)->head().status, 413);
  } else {
    EXPECT_EQ(ex.status().code(), absl::StatusCode::kUnavailable) << ex.status();
  }
}

// ---------------------------------------------------------------------------------------------
// Concurrency

TEST(UpstreamClientTest, ManyConcurrentRequests) {
  httplib::Server svr;
  svr.new_task_queue = [] { return new httplib::ThreadPool(16); };
  svr.set_keep_alive_max_count(1000);
  svr.set_tcp_nodelay(true);  // else Nagle on the server adds 40 ms per response
  svr.Get(R"(/echo/(\d+))", [](const httplib::Request& req, httplib::Response& res) {
    res.set_content(std::string(static_cast<size_t>(std::stoi(req.matches[1])) % 3000, 'e') +
                        req.matches[1].str(),
                    "text/plain");
  });
  svr.Get(R"(/chunks/(\d+))", [](const httplib::Request& req, httplib::Response& res) {
    std::string id = req.matches[1];
    res.set_chunked_content_provider("text/event-stream", [id](size_t, httplib::DataSink& sink) {
      for (int i = 0; i < 3; ++i) {
        std::string event = "data: " + id + "-" + std::to_string(i) + "\n\n";
        sink.write(event.data(), event.size());
      }
      sink.done();
      return true;
    });
  });
  HttplibRunner run(&svr);
  UpstreamClient client(Endpoint(run.port()), {});
  constexpr int kThreads = 8;
  constexpr int kPerThread = 50;
  std::atomic<int> ok{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        int n = t * 1000 + i;
        bool chunked = i % 2 == 1;
        auto ex = client.Send(Get(absl::StrCat(chunked ? "/chunks/" : "/echo/", n)));
        if (!ex.ok()) {
          ADD_FAILURE() << ex.status();
          continue;
        }
        absl::StatusOr<std::string> body = ReadBody(ex->get());
        if (!body.ok()) {
          ADD_FAILURE() << body.status();
          continue;
        }
        std::string want =
            chunked ? absl::StrCat("data: ", n, "-0\n\ndata: ", n, "-1\n\ndata: ", n, "-2\n\n")
                    : std::string(static_cast<size_t>(n % 3000), 'e') + std::to_string(n);
        if (*body == want) {
          ok.fetch_add(1);
        } else {
          ADD_FAILURE() << "wrong body for " << n;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), kThreads * kPerThread);
  UpstreamClient::Stats stats = client.GetStats();
  EXPECT_LE(stats.connects, 2u * kThreads);
  EXPECT_EQ(stats.connects + stats.reuses - stats.stale_retries,
            static_cast<uint64_t>(kThreads * kPerThread));
  EXPECT_LE(stats.idle_now, static_cast<size_t>(kThreads));
}

}  // namespace
}  // namespace sflb
