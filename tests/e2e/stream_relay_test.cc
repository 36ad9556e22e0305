// End-to-end tests of how a dataplane serves one client connection: streams through the
// event-loop relay (default) and the thread-per-stream path (SFLB_RELAY_THREADS=0) must both
// frame every response correctly and keep the connection usable after a stream (keep-alive), or
// close it when the client asked for that; plain requests served inside the event loops must
// follow every rule of the server threads' way (retries, errors, framing, logs), and requests
// the loops leave to the server threads must be answered in order on the same connection.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/e2e/test_cluster.h"

namespace sflb::e2e {
namespace {

using ::testing::HasSubstr;

// A blocking client socket with a receive timeout, speaking HTTP/1.1 by hand so the test sees
// exactly what crosses the wire, connection reuse included.
class RawConnection {
 public:
  // `receive_buffer` > 0 shrinks the socket's receive buffer (a slow reader fills it fast).
  explicit RawConnection(int port, int receive_buffer = 0) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    timeval tv{10, 0};
    setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    if (receive_buffer > 0) {
      setsockopt(fd_, SOL_SOCKET, SO_RCVBUF, &receive_buffer, sizeof(receive_buffer));
    }
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(port));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connected_ = ::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  }
  ~RawConnection() { ::close(fd_); }
  bool connected() const { return connected_; }

  bool Send(const std::string& data) {
    return ::send(fd_, data.data(), data.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(data.size());
  }

  // Reads one response: head, then a chunked or Content-Length body (decoded). False on
  // timeout, EOF or bad framing.
  bool ReadResponse(std::string* head, std::string* body) {
    size_t end;
    while ((end = buf_.find("\r\n\r\n")) == std::string::npos) {
      if (!Fill()) return false;
    }
    *head = buf_.substr(0, end + 4);
    buf_.erase(0, end + 4);
    body->clear();
    if (absl::StartsWith(*head, "HTTP/1.1 1")) return true;  // interim (100 Continue): no body
    const std::string lower = Lower(*head);
    if (lower.find("transfer-encoding: chunked") != std::string::npos) {
      for (;;) {
        size_t eol;
        while ((eol = buf_.find("\r\n")) == std::string::npos) {
          if (!Fill()) return false;
        }
        size_t size = 0;
        if (!absl::SimpleHexAtoi(buf_.substr(0, eol), &size)) return false;
        while (buf_.size() < eol + 2 + size + 2) {
          if (!Fill()) return false;
        }
        if (buf_.compare(eol + 2 + size, 2, "\r\n") != 0) return false;
        body->append(buf_, eol + 2, size);
        buf_.erase(0, eol + 2 + size + 2);
        if (size == 0) return true;
      }
    }
    size_t pos = lower.find("content-length: ");
    if (pos == std::string::npos) return false;
    size_t length = std::stoul(lower.substr(pos + 16));
    while (buf_.size() < length) {
      if (!Fill()) return false;
    }
    *body = buf_.substr(0, length);
    buf_.erase(0, length);
    return true;
  }

  // True if the server closed the connection (EOF) within the receive timeout.
  bool ClosedByServer() {
    char c;
    return buf_.empty() && ::recv(fd_, &c, 1, 0) == 0;
  }

 private:
  static std::string Lower(std::string s) {
    for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return s;
  }
  bool Fill() {
    char chunk[4096];
    ssize_t n = ::recv(fd_, chunk, sizeof(chunk), 0);
    if (n <= 0) return false;
    buf_.append(chunk, static_cast<size_t>(n));
    return true;
  }

  int fd_ = -1;
  bool connected_ = false;
  std::string buf_;
};

std::string ChatRequest(bool stream, const std::string& connection = "keep-alive",
                        int chunks = 5, int delay_ms = 20) {
  std::string body = absl::StrCat(R"({"model":"Qwen/Qwen2.5-7B-Instruct","stream":)",
                                  stream ? "true" : "false", R"(,"messages":[]})");
  return absl::StrCat("POST /v1/chat/completions HTTP/1.1\r\nHost: sflb\r\n",
                      "Authorization: Bearer ", kUserKey, "\r\n",
                      "Content-Type: application/json\r\n", "x-fake-chunks: ", chunks, "\r\n",
                      "x-fake-chunk-delay-ms: ", delay_ms, "\r\n", "Connection: ", connection,
                      "\r\n",
                      "Content-Length: ", body.size(), "\r\n\r\n", body);
}

class StreamConnectionTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    ClusterOptions options;
    options.key_lines = MakeKeys(2);
    options.dataplane_env = {{"SFLB_RELAY_THREADS", GetParam()}};
    absl::Status s = cluster_.Start(options);
    ASSERT_TRUE(s.ok()) << s;
  }
  TestCluster cluster_;
};

TEST_P(StreamConnectionTest, StreamsAndPlainRequestsShareOneKeepAliveConnection) {
  RawConnection conn(cluster_.dataplane_port(0));
  ASSERT_TRUE(conn.connected());
  // stream, plain, stream, plain: every response complete and well-framed on one connection.
  for (int round = 0; round < 2; ++round) {
    std::string head, body;
    ASSERT_TRUE(conn.Send(ChatRequest(true)));
    ASSERT_TRUE(conn.ReadResponse(&head, &body)) << "round " << round;
    EXPECT_TRUE(absl::StartsWith(head, "HTTP/1.1 200 ")) << head;
    EXPECT_THAT(head, HasSubstr("text/event-stream"));
    EXPECT_THAT(head, HasSubstr("x-request-id"));
    EXPECT_TRUE(absl::EndsWith(body, "data: [DONE]\n\n")) << body;
    for (int i = 0; i < 5; ++i) {
      EXPECT_THAT(body, HasSubstr(absl::StrCat("\"x_fake_chunk_index\":", i)));
    }
    ASSERT_TRUE(conn.Send(ChatRequest(false)));
    ASSERT_TRUE(conn.ReadResponse(&head, &body)) << "round " << round;
    EXPECT_TRUE(absl::StartsWith(head, "HTTP/1.1 200 ")) << head;
    EXPECT_THAT(body, HasSubstr("\"usage\""));
  }
  // Every request reached the upstream: 4 of them.
  EXPECT_EQ(cluster_.FakeRequests().size(), 4u);
}

TEST_P(StreamConnectionTest, ConnectionCloseIsHonouredAfterAStream) {
  RawConnection conn(cluster_.dataplane_port(0));
  ASSERT_TRUE(conn.connected());
  std::string head, body;
  ASSERT_TRUE(conn.Send(ChatRequest(true, "close")));
  ASSERT_TRUE(conn.ReadResponse(&head, &body));
  EXPECT_THAT(head, HasSubstr("Connection: close"));
  EXPECT_TRUE(absl::EndsWith(body, "data: [DONE]\n\n"));
  EXPECT_TRUE(conn.ClosedByServer());
}

TEST_P(StreamConnectionTest, PipelinedRequestAfterAStreamIsServed) {
  // The second request is sent before the first (streamed) response has begun: the dataplane
  // must serve both, in order.
  RawConnection conn(cluster_.dataplane_port(0));
  ASSERT_TRUE(conn.connected());
  ASSERT_TRUE(conn.Send(ChatRequest(true) + ChatRequest(false)));
  std::string head, body;
  ASSERT_TRUE(conn.ReadResponse(&head, &body));
  EXPECT_TRUE(absl::EndsWith(body, "data: [DONE]\n\n"));
  ASSERT_TRUE(conn.ReadResponse(&head, &body));
  EXPECT_TRUE(absl::StartsWith(head, "HTTP/1.1 200 ")) << head;
  EXPECT_THAT(body, HasSubstr("\"usage\""));
}

TEST_P(StreamConnectionTest, SlowReaderGetsEveryEventInOrder) {
  // 30,000 events sent back to back (~9 MB) to a client that reads nothing for a second: far
  // more than the socket buffers and the relay's 256 KiB backlog hold, so the relay has to
  // pause reading the upstream and resume it as the client catches up, losing nothing.
  constexpr int kChunks = 30000;
  RawConnection conn(cluster_.dataplane_port(0), /*receive_buffer=*/4096);
  ASSERT_TRUE(conn.connected());
  ASSERT_TRUE(conn.Send(ChatRequest(true, "keep-alive", kChunks, 0)));
  absl::SleepFor(absl::Seconds(1));
  std::string head, body;
  ASSERT_TRUE(conn.ReadResponse(&head, &body));
  EXPECT_TRUE(absl::EndsWith(body, "data: [DONE]\n\n"));
  size_t pos = 0;
  for (int i = 0; i < kChunks; ++i) {
    pos = body.find(absl::StrCat("\"x_fake_chunk_index\":", i, "}"), pos);
    ASSERT_NE(pos, std::string::npos) << "event " << i << " missing or out of order";
  }
  // The connection is still good for the next request.
  ASSERT_TRUE(conn.Send(ChatRequest(false)));
  ASSERT_TRUE(conn.ReadResponse(&head, &body));
  EXPECT_TRUE(absl::StartsWith(head, "HTTP/1.1 200 ")) << head;
}

INSTANTIATE_TEST_SUITE_P(RelayAndThreadPerStream, StreamConnectionTest,
                         ::testing::Values("2", "0"),
                         [](const ::testing::TestParamInfo<const char*>& param_info) {
                           return std::string(param_info.param) == "0" ? "ThreadPerStream" : "Relay";
                         });

// ---------------------------------------------------------------------------------------------
// Requests served inside the event loops

std::string PlainRequest(const std::string& method, const std::string& target,
                         const std::string& body = "", const std::string& extra_headers = "",
                         const std::string& version = "HTTP/1.1",
                         const std::string& key = kUserKey) {
  return absl::StrCat(method, " ", target, " ", version, "\r\nHost: sflb\r\n",
                      "Authorization: Bearer ", key, "\r\n", extra_headers,
                      body.empty() && method == "GET"
                          ? std::string()
                          : absl::StrCat("Content-Length: ", body.size(), "\r\n"),
                      "\r\n", body);
}

std::string ChatBody(int chunks) {
  return absl::StrCat(R"({"model":"Qwen/Qwen2.5-7B-Instruct","messages":[],"x_n":)", chunks, "}");
}

std::string HeaderValue(const std::string& head, const std::string& name) {
  std::string lower_head = head;
  for (char& c : lower_head) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  size_t pos = lower_head.find("\r\n" + name + ": ");
  if (pos == std::string::npos) return "";
  size_t start = pos + 2 + name.size() + 2;
  return head.substr(start, head.find("\r\n", start) - start);
}

class LoopServingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    keys_ = MakeKeys(2);
    ClusterOptions options;
    options.key_lines = keys_;
    options.dataplane_env = {{"SFLB_REQUEST_LOG_FLUSH", "0"},
                             {"SFLB_FIRST_BYTE_TIMEOUT", "1s"},
                             {"SFLB_STREAM_FIRST_BYTE_TIMEOUT", "1s"}};
    absl::Status s = cluster_.Start(options);
    ASSERT_TRUE(s.ok()) << s;
  }

  // The request log line with `request_id`.
  nlohmann::json RequestLine(const std::string& request_id) {
    absl::StatusOr<nlohmann::json> line = cluster_.dataplane(0).WaitForLog(
        [&](const nlohmann::json& j) {
          return j.value("event", "") == "request" && j.value("request_id", "") == request_id;
        },
        absl::Seconds(10));
    EXPECT_TRUE(line.ok()) << line.status();
    return line.ok() ? *line : nlohmann::json();
  }

  std::vector<std::string> keys_;
  TestCluster cluster_;
};

TEST_F(LoopServingTest, PlainRequestsOnOneConnectionAreFramedAndLoggedEachOnItsOwn) {
  RawConnection conn(cluster_.dataplane_port(0));
  ASSERT_TRUE(conn.connected());
  std::set<std::string> ids;
  for (int i = 1; i <= 6; ++i) {
    ASSERT_TRUE(conn.Send(PlainRequest("POST", "/v1/chat/completions", ChatBody(i),
                                       absl::StrCat("x-fake-chunks: ", i, "\r\n"))));
    std::string head, body;
    ASSERT_TRUE(conn.ReadResponse(&head, &body)) << "request " << i;
    EXPECT_TRUE(absl::StartsWith(head, "HTTP/1.1 200 OK\r\n")) << head;
    EXPECT_EQ(HeaderValue(head, "content-length"), std::to_string(body.size()));
    EXPECT_EQ(HeaderValue(head, "content-type"), "application/json");
    EXPECT_EQ(HeaderValue(head, "connection"), "keep-alive");
    EXPECT_FALSE(HeaderValue(head, "x-siliconcloud-trace-id").empty()) << head;
    std::string id = HeaderValue(head, "x-request-id");
    EXPECT_EQ(id.size(), 16u) << head;
    ids.insert(id);
    nlohmann::json answer = nlohmann::json::parse(body);
    EXPECT_EQ(answer["usage"]["completion_tokens"], i);
    nlohmann::json line = RequestLine(id);
    EXPECT_EQ(line.value("status", 0), 200);
    EXPECT_EQ(line.value("attempts", 0), 1);
    EXPECT_EQ(line.value("path", ""), "/v1/chat/completions");
    EXPECT_EQ(line.value("model", ""), "Qwen/Qwen2.5-7B-Instruct");
    EXPECT_EQ(line.value("completion_tokens", 0), i);
    EXPECT_EQ(line.value("response_bytes", 0u), body.size());
    EXPECT_EQ(line.value("client_ip", ""), "127.0.0.1");
  }
  EXPECT_EQ(ids.size(), 6u);
  // Round robin over both keys, one upstream request each.
  nlohmann::json seen = cluster_.FakeRequests();
  ASSERT_EQ(seen.size(), 6u);
  std::map<std::string, int> per_key;
  for (const auto& r : seen) per_key[r.value("key", "")]++;
  EXPECT_GE(per_key[keys_[0]], 2);
  EXPECT_GE(per_key[keys_[1]], 2);
}

TEST_F(LoopServingTest, ARefusedKeyIsRetriedOnTheOtherOne) {
  cluster_.AddFault({{"key", keys_[0]}, {"action", "status"}, {"status", 429}});
  RawConnection conn(cluster_.dataplane_port(0));
  ASSERT_TRUE(conn.connected());
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(conn.Send(PlainRequest("POST", "/v1/chat/completions", ChatBody(1))));
    std::string head, body;
    ASSERT_TRUE(conn.ReadResponse(&head, &body));
    EXPECT_TRUE(absl::StartsWith(head, "HTTP/1.1 200 ")) << head << body;
  }
  int refused = 0, served = 0;
  for (const auto& r : cluster_.FakeRequests()) {
    if (r.value("key", "") == keys_[0]) {
      ++refused;
      EXPECT_EQ(r.value("status", 0), 429);
    } else {
      ++served;
    }
  }
  // The 429 blocks the key's account locally at once: it is tried once, not per request.
  EXPECT_EQ(refused, 1);
  EXPECT_EQ(served, 4);
}

TEST_F(LoopServingTest, EveryKeyRateLimitedGives429InOpenAiShape) {
  cluster_.AddFault({{"action", "status"}, {"status", 429}, {"headers", {{"Retry-After", "7"}}}});
  RawConnection conn(cluster_.dataplane_port(0));
  ASSERT_TRUE(conn.connected());
  ASSERT_TRUE(conn.Send(PlainRequest("POST", "/v1/chat/completions", ChatBody(1))));
  std::string head, body;
  ASSERT_TRUE(conn.ReadResponse(&head, &body));
  EXPECT_TRUE(absl::StartsWith(head, "HTTP/1.1 429 ")) << head;
  int retry_after = 0;
  EXPECT_TRUE(absl::SimpleAtoi(HeaderValue(head, "retry-after"), &retry_after)) << head;
  EXPECT_GE(retry_after, 1);
  nlohmann::json error = nlohmann::json::parse(body);
  EXPECT_EQ(error["error"]["type"], "rate_limit_error");
  EXPECT_EQ(error["error"]["code"], "rate_limited");
  nlohmann::json line = RequestLine(HeaderValue(head, "x-request-id"));
  EXPECT_EQ(line.value("status", 0), 429);
  EXPECT_EQ(line.value("error_code", ""), "rate_limited");
  EXPECT_EQ(line.value("attempts", 0), 2);
  EXPECT_EQ(line["keys"].size(), 2u);
  // The connection is still good.
  cluster_.ClearFaults();
  ASSERT_TRUE(conn.Send(PlainRequest("GET", "/v1/models")));
  ASSERT_TRUE(conn.ReadResponse(&head, &body));
  EXPECT_TRUE(absl::StartsWith(head, "HTTP/1.1 200 ")) << head;
}

TEST_F(LoopServingTest, ABodyThatBreaksOffGives502AndAStalledUpstream504) {
  RawConnection conn(cluster_.dataplane_port(0));
  ASSERT_TRUE(conn.connected());
  cluster_.AddFault({{"action", "cut"}, {"times", 1}});
  ASSERT_TRUE(conn.Send(PlainRequest("POST", "/v1/chat/completions", ChatBody(1))));
  std::string head, body;
  ASSERT_TRUE(conn.ReadResponse(&head, &body));
  EXPECT_TRUE(absl::StartsWith(head, "HTTP/1.1 502 ")) << head;
  EXPECT_EQ(nlohmann::json::parse(body)["error"]["code"], "upstream_broken_response");
  EXPECT_EQ(RequestLine(HeaderValue(head, "x-request-id")).value("status", 0), 502);

  // SFLB_FIRST_BYTE_TIMEOUT is 1s: each attempt times out, then the client gets 504.
  cluster_.AddFault({{"action", "stall"}});
  absl::Time start = absl::Now();
  ASSERT_TRUE(conn.Send(PlainRequest("POST", "/v1/chat/completions", ChatBody(1))));
  ASSERT_TRUE(conn.ReadResponse(&head, &body));
  EXPECT_TRUE(absl::StartsWith(head, "HTTP/1.1 504 ")) << head;
  EXPECT_EQ(nlohmann::json::parse(body)["error"]["code"], "upstream_timeout");
  EXPECT_GE(absl::Now() - start, absl::Seconds(2));  // two attempts of 1s (two keys)
  cluster_.ClearFaults();
  ASSERT_TRUE(conn.Send(PlainRequest("POST", "/v1/chat/completions", ChatBody(1))));
  ASSERT_TRUE(conn.ReadResponse(&head, &body));
  EXPECT_TRUE(absl::StartsWith(head, "HTTP/1.1 200 ")) << head;
}

TEST_F(LoopServingTest, AStreamWithoutAFirstByteIsRetriedThenAnswered504) {
  // Headers at once, the first event after 3 s: past SFLB_STREAM_FIRST_BYTE_TIMEOUT (1 s) on
  // both keys.
  RawConnection conn(cluster_.dataplane_port(0));
  ASSERT_TRUE(conn.connected());
  const std::string stream_body =
      R"({"model":"Qwen/Qwen2.5-7B-Instruct","stream":true,"messages":[]})";
  ASSERT_TRUE(conn.Send(PlainRequest("POST", "/v1/chat/completions", stream_body,
                                     "x-fake-first-chunk-delay-ms: 3000\r\n")));
  std::string head, body;
  ASSERT_TRUE(conn.ReadResponse(&head, &body));
  EXPECT_TRUE(absl::StartsWith(head, "HTTP/1.1 504 ")) << head;
  EXPECT_EQ(nlohmann::json::parse(body)["error"]["code"], "upstream_timeout");
  nlohmann::json line = RequestLine(HeaderValue(head, "x-request-id"));
  EXPECT_EQ(line.value("attempts", 0), 2);
  EXPECT_TRUE(line.value("stream", false));
  // The upstream answered (its head came, its first event did not): its trace id is kept.
  EXPECT_TRUE(absl::StartsWith(line.value("upstream_trace_id", ""), "fake-")) << line.dump();
  int stalled = 0;
  for (const nlohmann::json& l : cluster_.dataplane(0).LogLines()) {
    stalled += l.value("event", "") == "upstream_stream_stalled" ? 1 : 0;
  }
  EXPECT_EQ(stalled, 2);
  // A stream that starts in time is relayed event by event on the same connection.
  ASSERT_TRUE(conn.Send(ChatRequest(true)));
  ASSERT_TRUE(conn.ReadResponse(&head, &body));
  EXPECT_TRUE(absl::StartsWith(head, "HTTP/1.1 200 ")) << head;
  EXPECT_TRUE(absl::EndsWith(body, "data: [DONE]\n\n")) << body;
  line = RequestLine(HeaderValue(head, "x-request-id"));
  EXPECT_EQ(line.value("completion_tokens", 0), 5);
}

TEST_F(LoopServingTest, ALargeAnswerIsRelayedWithItsContentLengthAndTheConnectionStaysUsable) {
  // 300,000 bytes: above the 256 KiB the loop reads whole, so it is relayed as it arrives.
  constexpr size_t kBytes = 300000;
  RawConnection conn(cluster_.dataplane_port(0));
  ASSERT_TRUE(conn.connected());
  for (int round = 0; round < 2; ++round) {
    ASSERT_TRUE(conn.Send(PlainRequest("POST", "/v1/files/blob", "{}",
                                       absl::StrCat("x-fake-response-bytes: ", kBytes, "\r\n"))));
    std::string head, body;
    ASSERT_TRUE(conn.ReadResponse(&head, &body)) << "round " << round;
    EXPECT_TRUE(absl::StartsWith(head, "HTTP/1.1 200 ")) << head;
    EXPECT_EQ(HeaderValue(head, "content-length"), std::to_string(kBytes)) << head;
    EXPECT_EQ(HeaderValue(head, "transfer-encoding"), "") << head;
    ASSERT_EQ(body.size(), kBytes);
    bool intact = true;
    for (size_t i = 0; i < kBytes && intact; ++i) intact = body[i] == static_cast<char>('a' + i % 26);
    EXPECT_TRUE(intact);
    nlohmann::json line = RequestLine(HeaderValue(head, "x-request-id"));
    EXPECT_EQ(line.value("status", 0), 200);
    EXPECT_EQ(line.value("response_bytes", 0u), kBytes);
    EXPECT_FALSE(line.contains("stream_end")) << line.dump();
  }
  ASSERT_TRUE(conn.Send(PlainRequest("GET", "/v1/models")));
  std::string head, body;
  ASSERT_TRUE(conn.ReadResponse(&head, &body));
  EXPECT_TRUE(absl::StartsWith(head, "HTTP/1.1 200 ")) << head;
}

TEST_F(LoopServingTest, RequestsLeftToServerThreadsAreAnsweredInOrderOnTheSameConnection) {
  RawConnection conn(cluster_.dataplane_port(0));
  ASSERT_TRUE(conn.connected());
  std::string head, body;
  auto exchange = [&](const std::string& request) {
    EXPECT_TRUE(conn.Send(request));
    EXPECT_TRUE(conn.ReadResponse(&head, &body)) << request;
  };
  // Served in the loop.
  exchange(PlainRequest("POST", "/v1/chat/completions", ChatBody(1)));
  EXPECT_TRUE(absl::StartsWith(head, "HTTP/1.1 200 ")) << head;
  // sflb's own endpoint (the old tool's shape): a server thread.
  exchange(PlainRequest("GET", "/health"));
  EXPECT_TRUE(absl::StartsWith(head, "HTTP/1.1 200 ")) << head;
  EXPECT_THAT(body, HasSubstr("\"status\""));
  // A percent-encoded path: httplib decodes it for the access check.
  exchange(PlainRequest("POST", "/v1/some%20thing", "{}"));
  EXPECT_TRUE(absl::StartsWith(head, "HTTP/1.1 200 ")) << head;
  EXPECT_EQ(nlohmann::json::parse(body)["echo"]["target"], "/v1/some%20thing");
  // A chunked request body.
  exchange(absl::StrCat("POST /v1/echo-me HTTP/1.1\r\nHost: sflb\r\nAuthorization: Bearer ",
                        kUserKey, "\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"));
  EXPECT_TRUE(absl::StartsWith(head, "HTTP/1.1 200 ")) << head;
  EXPECT_EQ(nlohmann::json::parse(body)["echo"]["body"], "hello");
  // Expect: 100-continue.
  exchange(PlainRequest("POST", "/v1/echo-me", "abc", "Expect: 100-continue\r\n"));
  if (absl::StartsWith(head, "HTTP/1.1 100")) {
    ASSERT_TRUE(conn.ReadResponse(&head, &body));
  }
  EXPECT_TRUE(absl::StartsWith(head, "HTTP/1.1 200 ")) << head;
  EXPECT_EQ(nlohmann::json::parse(body)["echo"]["body"], "abc");
  // HTTP/1.0 with keep-alive (httplib honours exactly "Keep-Alive").
  exchange(PlainRequest("GET", "/v1/models", "", "Connection: Keep-Alive\r\n", "HTTP/1.0"));
  EXPECT_THAT(head, HasSubstr(" 200 "));
  // A stream.
  exchange(ChatRequest(true));
  EXPECT_TRUE(absl::EndsWith(body, "data: [DONE]\n\n")) << body;
  // user/info is refused to a user key.
  exchange(PlainRequest("GET", "/v1/user/info"));
  EXPECT_TRUE(absl::StartsWith(head, "HTTP/1.1 403 ")) << head;
  // Back in the loop.
  exchange(PlainRequest("POST", "/v1/embeddings", R"({"model":"m","input":"x"})"));
  EXPECT_TRUE(absl::StartsWith(head, "HTTP/1.1 200 ")) << head;
  EXPECT_THAT(body, HasSubstr("\"embedding\""));
  // A wrong key: 401 in OpenAI shape, and the connection closes (its body was not read).
  exchange(PlainRequest("POST", "/v1/chat/completions", ChatBody(1), "", "HTTP/1.1", "wrong"));
  EXPECT_TRUE(absl::StartsWith(head, "HTTP/1.1 401 ")) << head;
  EXPECT_EQ(nlohmann::json::parse(body)["error"]["code"], "invalid_api_key");
  EXPECT_TRUE(conn.ClosedByServer());
}

TEST_F(LoopServingTest, AWrongKeyWithExpectContinueGets401WithoutAnInvitationAndAClose) {
  RawConnection conn(cluster_.dataplane_port(0));
  ASSERT_TRUE(conn.connected());
  // Only the head: a client that expects 100 Continue waits before sending its body.
  std::string request = PlainRequest("POST", "/v1/chat/completions", std::string(100000, 'x'),
                                     "Expect: 100-continue\r\n", "HTTP/1.1", "wrong");
  ASSERT_TRUE(conn.Send(request.substr(0, request.find("\r\n\r\n") + 4)));
  std::string head, body;
  ASSERT_TRUE(conn.ReadResponse(&head, &body));
  EXPECT_TRUE(absl::StartsWith(head, "HTTP/1.1 401 ")) << head;
  EXPECT_EQ(HeaderValue(head, "connection"), "close") << head;
  EXPECT_TRUE(conn.ClosedByServer());
}

TEST_F(LoopServingTest, PipelinedAndTrickledRequestsAreServedInOrder) {
  RawConnection conn(cluster_.dataplane_port(0));
  ASSERT_TRUE(conn.connected());
  std::string three;
  for (int i = 1; i <= 3; ++i) {
    three += PlainRequest("POST", "/v1/chat/completions", ChatBody(i),
                          absl::StrCat("x-fake-chunks: ", i, "\r\n"));
  }
  ASSERT_TRUE(conn.Send(three));
  std::string head, body;
  for (int i = 1; i <= 3; ++i) {
    ASSERT_TRUE(conn.ReadResponse(&head, &body)) << i;
    EXPECT_EQ(nlohmann::json::parse(body)["usage"]["completion_tokens"], i);
  }
  // One request in four pieces, with pauses between them.
  std::string request = PlainRequest("POST", "/v1/chat/completions", ChatBody(4),
                                     "x-fake-chunks: 4\r\n");
  size_t quarter = request.size() / 4;
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(conn.Send(request.substr(i * quarter, i == 3 ? std::string::npos : quarter)));
    absl::SleepFor(absl::Milliseconds(60));
  }
  ASSERT_TRUE(conn.ReadResponse(&head, &body));
  EXPECT_EQ(nlohmann::json::parse(body)["usage"]["completion_tokens"], 4);
}

TEST_F(LoopServingTest, AClientLeavingMidRequestIsLoggedAndOthersAreServedMeanwhile) {
  cluster_.AddFault({{"action", "latency"}, {"delay_ms", 1500}, {"times", 1}});
  std::string id;
  {
    RawConnection leaving(cluster_.dataplane_port(0));
    ASSERT_TRUE(leaving.connected());
    ASSERT_TRUE(leaving.Send(PlainRequest("POST", "/v1/chat/completions", ChatBody(1))));
    absl::SleepFor(absl::Milliseconds(200));
    // Meanwhile another client is served at once.
    RawConnection other(cluster_.dataplane_port(0));
    ASSERT_TRUE(other.Send(PlainRequest("GET", "/v1/models")));
    std::string head, body;
    absl::Time start = absl::Now();
    ASSERT_TRUE(other.ReadResponse(&head, &body));
    EXPECT_TRUE(absl::StartsWith(head, "HTTP/1.1 200 ")) << head;
    EXPECT_LT(absl::Now() - start, absl::Seconds(1));
  }  // `leaving` closes here, its request still waiting for the upstream
  absl::StatusOr<nlohmann::json> line = cluster_.dataplane(0).WaitForLog(
      [](const nlohmann::json& j) {
        return j.value("event", "") == "request" &&
               j.value("stream_end", "") == "client_disconnected";
      },
      absl::Seconds(10));
  ASSERT_TRUE(line.ok()) << line.status();
  EXPECT_EQ(line->value("path", ""), "/v1/chat/completions");
  EXPECT_EQ(line->value("status", 0), 499);
  // Logged when the client left, not when the upstream answered (1.5 s after the request).
  EXPECT_LT(line->value("total_ms", 1e9), 1200.0);
}

}  // namespace
}  // namespace sflb::e2e
