#include "dataplane/http_wire.h"

#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "gtest/gtest.h"

namespace sflb {
namespace {

absl::Status Parse(absl::string_view head, ResponseHead* out, bool head_request = false) {
  return ParseResponseHead(head, head_request, out);
}

TEST(FindHeadEndTest, FindsCrlfAndBareLfTerminators) {
  size_t scan = 0;
  EXPECT_EQ(FindHeadEnd("HTTP/1.1 200 OK\r\nA: b\r\n\r\nbody", &scan), 25u);
  scan = 0;
  EXPECT_EQ(FindHeadEnd("HTTP/1.1 200 OK\nA: b\n\nbody", &scan), 22u);
  scan = 0;
  EXPECT_EQ(FindHeadEnd("HTTP/1.1 200 OK\r\nA: b\r\n", &scan), absl::string_view::npos);
}

TEST(FindHeadEndTest, IncrementalByteByByte) {
  const std::string msg = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc";
  const size_t want = msg.find("abc");
  size_t scan = 0;
  size_t found = absl::string_view::npos;
  for (size_t len = 1; len <= msg.size() && found == absl::string_view::npos; ++len) {
    found = FindHeadEnd(absl::string_view(msg).substr(0, len), &scan);
    if (found != absl::string_view::npos) {
      EXPECT_EQ(len, want);
    }
  }
  EXPECT_EQ(found, want);
}

TEST(ParseResponseHeadTest, ParsesStatusReasonAndHeaders) {
  ResponseHead h;
  ASSERT_TRUE(Parse("HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
                    "X-Empty:\r\nContent-Length:  12 \r\nx-multi: a\r\nX-Multi: b\r\n\r\n",
                    &h)
                  .ok());
  EXPECT_EQ(h.status, 429);
  EXPECT_EQ(h.reason, "Too Many Requests");
  EXPECT_EQ(h.version_minor, 1);
  ASSERT_EQ(h.headers.size(), 5u);
  EXPECT_EQ(h.headers[0].name, "Content-Type");
  EXPECT_EQ(h.headers[0].value, "application/json");
  EXPECT_EQ(h.headers[1].value, "");
  ASSERT_NE(h.Find("content-type"), nullptr);
  EXPECT_EQ(*h.Find("CONTENT-TYPE"), "application/json");
  EXPECT_EQ(*h.Find("X-MULTI"), "a");
  EXPECT_EQ(h.Find("missing"), nullptr);
  EXPECT_EQ(h.framing, BodyFraming::kContentLength);
  EXPECT_EQ(h.content_length, 12);
  EXPECT_TRUE(h.keep_alive);
}

TEST(ParseResponseHeadTest, ReasonIsOptional) {
  ResponseHead h;
  ASSERT_TRUE(Parse("HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n", &h).ok());
  EXPECT_EQ(h.status, 200);
  EXPECT_EQ(h.reason, "");
  ASSERT_TRUE(Parse("HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n", &h).ok());
  EXPECT_EQ(h.reason, "");
}

TEST(ParseResponseHeadTest, Framing) {
  ResponseHead h;
  ASSERT_TRUE(Parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", &h).ok());
  EXPECT_EQ(h.framing, BodyFraming::kChunked);
  EXPECT_TRUE(h.keep_alive);

  // Transfer-Encoding wins over Content-Length, and the connection is not reused.
  ASSERT_TRUE(
      Parse("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: CHUNKED\r\n\r\n", &h).ok());
  EXPECT_EQ(h.framing, BodyFraming::kChunked);
  EXPECT_EQ(h.content_length, -1);
  EXPECT_FALSE(h.keep_alive);

  // A final coding other than chunked: delimited by close.
  ASSERT_TRUE(Parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", &h).ok());
  EXPECT_EQ(h.framing, BodyFraming::kUntilClose);
  EXPECT_FALSE(h.keep_alive);
  ASSERT_TRUE(
      Parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n", &h)
          .ok());
  EXPECT_EQ(h.framing, BodyFraming::kChunked);

  ASSERT_TRUE(Parse("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n", &h).ok());
  EXPECT_EQ(h.framing, BodyFraming::kUntilClose);
  EXPECT_FALSE(h.keep_alive);

  ASSERT_TRUE(Parse("HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n", &h).ok());
  EXPECT_EQ(h.framing, BodyFraming::kNone);
  ASSERT_TRUE(Parse("HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n", &h).ok());
  EXPECT_EQ(h.framing, BodyFraming::kNone);
  ASSERT_TRUE(Parse("HTTP/1.1 100 Continue\r\n\r\n", &h).ok());
  EXPECT_EQ(h.framing, BodyFraming::kNone);
  ASSERT_TRUE(
      Parse("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", &h, /*head_request=*/true).ok());
  EXPECT_EQ(h.framing, BodyFraming::kNone);
  EXPECT_TRUE(h.keep_alive);

  // Identical repeated Content-Length values are accepted.
  ASSERT_TRUE(
      Parse("HTTP/1.1 200 OK\r\nContent-Length: 7, 7\r\nContent-Length: 7\r\n\r\n", &h).ok());
  EXPECT_EQ(h.content_length, 7);
}

TEST(ParseResponseHeadTest, KeepAlive) {
  ResponseHead h;
  ASSERT_TRUE(Parse("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", &h).ok());
  EXPECT_FALSE(h.keep_alive);
  ASSERT_TRUE(
      Parse("HTTP/1.1 200 OK\r\nConnection: foo, Close\r\nContent-Length: 0\r\n\r\n", &h).ok());
  EXPECT_FALSE(h.keep_alive);
  ASSERT_TRUE(Parse("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", &h).ok());
  EXPECT_EQ(h.version_minor, 0);
  EXPECT_FALSE(h.keep_alive);
  ASSERT_TRUE(
      Parse("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n", &h).ok());
  EXPECT_TRUE(h.keep_alive);
}

TEST(ParseResponseHeadTest, RejectsMalformedHeads) {
  const std::vector<std::string> bad = {
      "\r\n\r\n",
      "HTTP/2 200 OK\r\n\r\n",
      "HTTX/1.1 200 OK\r\n\r\n",
      "HTTP/1.1 20 OK\r\n\r\n",
      "HTTP/1.1 2000 OK\r\n\r\n",
      "HTTP/1.1 abc OK\r\n\r\n",
      "HTTP/1.1 099 OK\r\n\r\n",
      "HTTP/1.1 600 OK\r\n\r\n",
      "HTTP/1.1  200 OK\r\n\r\n",
      "HTTP/1.1 200 O\x01K\r\n\r\n",
      "HTTP/1.1 200 OK\r\nNoColon\r\n\r\n",
      "HTTP/1.1 200 OK\r\nName : value\r\n\r\n",
      "HTTP/1.1 200 OK\r\n: value\r\n\r\n",
      "HTTP/1.1 200 OK\r\nBad Name: value\r\n\r\n",
      "HTTP/1.1 200 OK\r\nA: b\r\n folded\r\n\r\n",
      "HTTP/1.1 200 OK\r\nA: b\rc\r\n\r\n",
      std::string("HTTP/1.1 200 OK\r\nA: b\0c\r\n\r\n", 27),
      "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
      "HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
      "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
      "HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
      "HTTP/1.1 200 OK\r\nContent-Length: 0x10\r\n\r\n",
      "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
      "HTTP/1.1 200 OK\r\nContent-Length:\r\n\r\n",
      "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
      "HTTP/1.1 200 OK\r\nA: b\r\n",
  };
  for (const std::string& head : bad) {
    ResponseHead h;
    absl::Status st = Parse(head, &h);
    EXPECT_EQ(st.code(), absl::StatusCode::kInternal) << "accepted: " << head;
  }
}

TEST(ParseResponseHeadTest, ErrorMessagesDoNotLeakHeaderValues) {
  ResponseHead h;
  absl::Status st = Parse("HTTP/1.1 200 OK\r\nAuthorization: sk-secret\rx\r\n\r\n", &h);
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.message().find("sk-secret"), absl::string_view::npos) << st;
}

TEST(ParseResponseHeadTest, RejectsTooLargeHead) {
  std::string head = "HTTP/1.1 200 OK\r\n";
  while (head.size() <= kMaxResponseHeadBytes) head += "X-Filler: aaaaaaaaaaaaaaaaaaaaaaaa\r\n";
  head += "\r\n";
  ResponseHead h;
  EXPECT_EQ(Parse(head, &h).code(), absl::StatusCode::kInternal);
}

// Decodes `wire` fed in slices of `step` bytes (the way a socket would deliver it), returning
// the decoded body or the first error.
absl::Status DecodeAll(absl::string_view wire, size_t step, std::string* body,
                       std::vector<std::string>* pieces = nullptr, size_t* leftover = nullptr) {
  ChunkedDecoder d;
  std::string buffered;
  size_t fed = 0;
  body->clear();
  while (!d.done()) {
    size_t consumed = 0;
    absl::string_view data;
    absl::Status st = d.Decode(buffered, &consumed, &data);
    if (!st.ok()) return st;
    if (!data.empty()) {
      body->append(data.data(), data.size());
      if (pieces != nullptr) pieces->emplace_back(data);
    }
    buffered.erase(0, consumed);
    if (consumed == 0 && data.empty() && !d.done()) {
      if (fed == wire.size()) return absl::OutOfRangeError("needs more input");
      size_t n = std::min(step, wire.size() - fed);
      buffered.append(wire.data() + fed, n);
      fed += n;
    }
  }
  if (leftover != nullptr) *leftover = buffered.size() + (wire.size() - fed);
  return absl::OkStatus();
}

TEST(ChunkedDecoderTest, DecodesWholeInputAndByteByByte) {
  const std::string wire =
      "5\r\nhello\r\n1;name=value;x=\"q\"\r\n,\r\nA \r\n0123456789\r\n0\r\nTrailer: x\r\n\r\n";
  for (size_t step : {size_t{1}, size_t{2}, size_t{3}, size_t{7}, wire.size()}) {
    std::string body;
    size_t leftover = 99;
    ASSERT_TRUE(DecodeAll(wire, step, &body, nullptr, &leftover).ok()) << step;
    EXPECT_EQ(body, "hello,0123456789") << step;
    EXPECT_EQ(leftover, 0u);
  }
}

TEST(ChunkedDecoderTest, ReturnsOnePiecePerChunkWithoutCopy) {
  const std::string wire = "3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
  ChunkedDecoder d;
  absl::string_view in = wire;
  size_t consumed;
  absl::string_view data;
  ASSERT_TRUE(d.Decode(in, &consumed, &data).ok());
  EXPECT_EQ(data, "abc");
  EXPECT_EQ(data.data(), wire.data() + 3);  // a view into the input
  in.remove_prefix(consumed);
  ASSERT_TRUE(d.Decode(in, &consumed, &data).ok());
  EXPECT_EQ(data, "de");
  in.remove_prefix(consumed);
  ASSERT_TRUE(d.Decode(in, &consumed, &data).ok());
  EXPECT_TRUE(data.empty());
  EXPECT_TRUE(d.done());
  EXPECT_EQ(consumed, in.size());
}

TEST(ChunkedDecoderTest, AcceptsBareLfAndUppercaseHex) {
  std::string body;
  ASSERT_TRUE(DecodeAll("B\nhello world\n0\n\n", 4, &body).ok());
  EXPECT_EQ(body, "hello world");
}

TEST(ChunkedDecoderTest, StopsAtEndOfBody) {
  std::string body;
  size_t leftover = 0;
  ASSERT_TRUE(DecodeAll("1\r\na\r\n0\r\n\r\nHTTP/1.1 200", 100, &body, nullptr, &leftover).ok());
  EXPECT_EQ(body, "a");
  EXPECT_EQ(leftover, 12u);
}

TEST(ChunkedDecoderTest, RejectsMalformedFraming) {
  const std::vector<std::string> bad = {
      "\r\n",                      // empty size
      "g\r\n",                     // not hex
      "-1\r\n",                    // sign
      "5x\r\nhello\r\n0\r\n\r\n",  // junk after size
      "5\r\nhelloXX0\r\n\r\n",     // no CRLF after data
      "5\r\nhello\rX",             // CR not followed by LF
      "fffffffffffffffff\r\n",     // overflow
      "0\r\n folded: x\r\n\r\n",   // obs-fold in trailers
      "0\r\nno colon\r\n\r\n",     // bad trailer
  };
  for (const std::string& wire : bad) {
    std::string body;
    absl::Status st = DecodeAll(wire, 1, &body);
    EXPECT_EQ(st.code(), absl::StatusCode::kInternal) << "accepted: " << wire << " " << st;
  }
  std::string long_line(kMaxChunkLineBytes + 10, '0');
  std::string body;
  EXPECT_EQ(DecodeAll(long_line, 1000, &body).code(), absl::StatusCode::kInternal);
  std::string huge_trailer = "0\r\n";
  while (huge_trailer.size() <= kMaxTrailerBytes + 100) huge_trailer += "X-T: 1234567890\r\n";
  EXPECT_EQ(DecodeAll(huge_trailer, 4096, &body).code(), absl::StatusCode::kInternal);
}

TEST(ChunkedDecoderTest, TruncatedInputNeedsMore) {
  std::string body;
  EXPECT_EQ(DecodeAll("5\r\nhel", 100, &body).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(body, "hel");
}

TEST(SerializeRequestHeadTest, WritesRequestLineHostHeadersAndFraming) {
  std::vector<HttpHeader> headers = {{"Authorization", "Bearer sk-1"},
                                     {"Content-Type", "application/json"},
                                     {"host", "evil"},
                                     {"Content-Length", "999"},
                                     {"Connection", "close"},
                                     {"transfer-encoding", "chunked"},
                                     {"X-Trace", "a b"}};
  HttpRequestHeadInput in;
  in.method = "POST";
  in.target = "/v1/chat/completions?x=1";
  in.host_header = "api.siliconflow.cn";
  in.headers = &headers;
  in.body_size = 17;
  std::string out;
  ASSERT_TRUE(SerializeRequestHead(in, &out).ok());
  EXPECT_EQ(out,
            "POST /v1/chat/completions?x=1 HTTP/1.1\r\n"
            "Host: api.siliconflow.cn\r\n"
            "Authorization: Bearer sk-1\r\n"
            "Content-Type: application/json\r\n"
            "X-Trace: a b\r\n"
            "Content-Length: 17\r\n"
            "Connection: keep-alive\r\n\r\n");

  in.method = "GET";
  in.target = "/v1/models";
  in.headers = nullptr;
  in.body_size = 0;
  ASSERT_TRUE(SerializeRequestHead(in, &out).ok());
  EXPECT_EQ(out,
            "GET /v1/models HTTP/1.1\r\nHost: api.siliconflow.cn\r\n"
            "Connection: keep-alive\r\n\r\n");

  in.method = "POST";
  ASSERT_TRUE(SerializeRequestHead(in, &out).ok());
  EXPECT_NE(out.find("Content-Length: 0\r\n"), std::string::npos);
}

TEST(SerializeRequestHeadTest, RejectsInjection) {
  std::string out;
  HttpRequestHeadInput in;
  in.method = "GET";
  in.target = "/ok";
  in.host_header = "h";
  EXPECT_TRUE(SerializeRequestHead(in, &out).ok());
  in.method = "GE T";
  EXPECT_EQ(SerializeRequestHead(in, &out).code(), absl::StatusCode::kInvalidArgument);
  in.method = "GET";
  in.target = "/a b";
  EXPECT_EQ(SerializeRequestHead(in, &out).code(), absl::StatusCode::kInvalidArgument);
  in.target = "/a\r\nX: y";
  EXPECT_EQ(SerializeRequestHead(in, &out).code(), absl::StatusCode::kInvalidArgument);
  in.target = "http://absolute/form";
  EXPECT_EQ(SerializeRequestHead(in, &out).code(), absl::StatusCode::kInvalidArgument);
  in.target = "/ok";
  std::vector<HttpHeader> headers = {{"X-A", "v\r\nInjected: 1"}};
  in.headers = &headers;
  absl::Status st = SerializeRequestHead(in, &out);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(st.message().find("Injected"), absl::string_view::npos);
  headers = {{"X A", "v"}};
  EXPECT_EQ(SerializeRequestHead(in, &out).code(), absl::StatusCode::kInvalidArgument);
}

// ---------------------------------------------------------------------------------------------
// ParseRequestHead (the event loop's request parser)

TEST(ParseRequestHeadTest, ParsesRequestLineHeadersAndFraming) {
  RequestHead h;
  ASSERT_TRUE(ParseRequestHead("POST /v1/chat/completions?x=1 HTTP/1.1\r\n"
                               "Host: lb\r\nAuthorization: Bearer k\r\n"
                               "Content-Length: 12\r\nX-Empty:\r\n\r\n",
                               &h)
                  .ok());
  EXPECT_EQ(h.method, "POST");
  EXPECT_EQ(h.target, "/v1/chat/completions?x=1");
  EXPECT_EQ(h.version_minor, 1);
  ASSERT_EQ(h.headers.size(), 4u);
  EXPECT_EQ(h.headers[1].name, "Authorization");
  EXPECT_EQ(h.headers[1].value, "Bearer k");
  EXPECT_EQ(h.headers[3].value, "");
  EXPECT_TRUE(h.has_content_length);
  EXPECT_EQ(h.content_length, 12u);
  EXPECT_FALSE(h.has_transfer_encoding);
  EXPECT_FALSE(h.has_expect);
  EXPECT_TRUE(h.keep_alive);
  ASSERT_NE(h.Find("authorization"), nullptr);
  EXPECT_EQ(*h.Find("AUTHORIZATION"), "Bearer k");
  EXPECT_EQ(h.Find("cookie"), nullptr);
}

TEST(ParseRequestHeadTest, KeepAliveFollowsVersionAndConnection) {
  RequestHead h;
  ASSERT_TRUE(ParseRequestHead("GET / HTTP/1.1\r\nConnection: Close\r\n\r\n", &h).ok());
  EXPECT_FALSE(h.keep_alive);
  ASSERT_TRUE(ParseRequestHead("GET / HTTP/1.0\r\n\r\n", &h).ok());
  EXPECT_EQ(h.version_minor, 0);
  EXPECT_FALSE(h.keep_alive);
  ASSERT_TRUE(ParseRequestHead("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", &h).ok());
  EXPECT_TRUE(h.keep_alive);
  ASSERT_TRUE(ParseRequestHead("GET / HTTP/1.1\r\nConnection: te, keep-alive\r\n\r\n", &h).ok());
  EXPECT_TRUE(h.keep_alive);
}

TEST(ParseRequestHeadTest, FlagsWhatTheLoopLeavesToHttplib) {
  RequestHead h;
  ASSERT_TRUE(
      ParseRequestHead("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", &h).ok());
  EXPECT_TRUE(h.has_transfer_encoding);
  ASSERT_TRUE(ParseRequestHead("POST / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n", &h).ok());
  EXPECT_TRUE(h.has_expect);
  // The same length twice is one length; two different ones are an error.
  ASSERT_TRUE(
      ParseRequestHead("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", &h)
          .ok());
  EXPECT_EQ(h.content_length, 5u);
}

TEST(ParseRequestHeadTest, RejectsMalformedHeads) {
  const char* bad[] = {
      "POST /x HTTP/1.1\n\n",                                   // bare LF
      "POST /x HTTP/1.1\r\nA: b\n\r\n",                        // bare LF in a header line
      "POST /x HTTP/1.1\r\nA: b\rc\r\n\r\n",                   // bare CR in a value
      "POST  /x HTTP/1.1\r\n\r\n",                              // double space
      "POST /x HTTP/1.1 \r\n\r\n",                              // trailing space
      "POST x HTTP/1.1\r\n\r\n",                                // not origin-form
      "POST http://h/x HTTP/1.1\r\n\r\n",                       // absolute-form
      "POST /x#f HTTP/1.1\r\n\r\n",                             // fragment
      "POST /x HTTP/2.0\r\n\r\n",                               // version
      "POST /x HTTP/1.1\r\n",                                   // not terminated
      "P(ST /x HTTP/1.1\r\n\r\n",                               // method not a token
      "POST /x HTTP/1.1\r\n Folded: x\r\n\r\n",                 // obs-fold
      "POST /x HTTP/1.1\r\nBad Name: x\r\n\r\n",                // space in name
      "POST /x HTTP/1.1\r\nNoColon\r\n\r\n",                    // no colon
      "POST /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n",         // negative length
      "POST /x HTTP/1.1\r\nContent-Length: 1,1\r\n\r\n",        // list
      "POST /x HTTP/1.1\r\nContent-Length: \r\n\r\n",           // empty
      "POST /x HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",  // too long
      "POST /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",  // conflicting
      "POST /x HTTP/1.1\r\n\r\nextra",                          // bytes after the head
  };
  for (const char* head : bad) {
    RequestHead h;
    absl::Status st = ParseRequestHead(head, &h);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << head;
    EXPECT_TRUE(absl::StartsWith(st.message(), "malformed request: ")) << st.message();
  }
}

TEST(ParseRequestHeadTest, RejectsHeadsLongerThanTheLimit) {
  std::string head = "GET / HTTP/1.1\r\nX-Big: " + std::string(kMaxRequestHeadBytes, 'a') +
                     "\r\n\r\n";
  RequestHead h;
  EXPECT_EQ(ParseRequestHead(head, &h).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace sflb
