// End-to-end tests of how a dataplane serves streams over one client connection: the event-loop
// relay (default) and the thread-per-stream path (SFLB_RELAY_THREADS=0) must both frame every
// response correctly and keep the connection usable after a stream (keep-alive), or close it
// when the client asked for that.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <string>

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

}  // namespace
}  // namespace sflb::e2e
