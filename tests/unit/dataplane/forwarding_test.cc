// Tests of dataplane/forwarding: target splitting, path rewriting, header filtering and the
// streaming body summary.
#include "dataplane/forwarding.h"

#include <random>
#include <string>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sflb {
namespace {

// ---------------------------------------------------------------------------------------------
// SplitTarget / StripVersionPrefix / UpstreamTarget

TEST(SplitTargetTest, SplitsAtTheFirstQuestionMark) {
  auto [path, query] = SplitTarget("/v1/chat/completions?x=1&y=a?b");
  EXPECT_EQ(path, "/v1/chat/completions");
  EXPECT_EQ(query, "x=1&y=a?b");
}

TEST(SplitTargetTest, NoQuery) {
  auto [path, query] = SplitTarget("/v1/models");
  EXPECT_EQ(path, "/v1/models");
  EXPECT_EQ(query, "");
}

TEST(SplitTargetTest, EmptyQueryAndEmptyPath) {
  auto [path, query] = SplitTarget("/x?");
  EXPECT_EQ(path, "/x");
  EXPECT_EQ(query, "");
  auto [path2, query2] = SplitTarget("?a=b");
  EXPECT_EQ(path2, "");
  EXPECT_EQ(query2, "a=b");
}

TEST(StripVersionPrefixTest, RemovesOneLeadingV1Segment) {
  EXPECT_EQ(StripVersionPrefix("/v1/models"), "/models");
  EXPECT_EQ(StripVersionPrefix("/v1/chat/completions"), "/chat/completions");
  EXPECT_EQ(StripVersionPrefix("/v1"), "/");
  EXPECT_EQ(StripVersionPrefix("/v1/"), "/");
  EXPECT_EQ(StripVersionPrefix("/v1/v1/models"), "/v1/models") << "only one segment";
}

TEST(StripVersionPrefixTest, LeavesOtherPathsAlone) {
  EXPECT_EQ(StripVersionPrefix("/v1beta/x"), "/v1beta/x");
  EXPECT_EQ(StripVersionPrefix("/v1beta"), "/v1beta");
  EXPECT_EQ(StripVersionPrefix("/v10/models"), "/v10/models");
  EXPECT_EQ(StripVersionPrefix("/models"), "/models");
  EXPECT_EQ(StripVersionPrefix("/V1/models"), "/V1/models") << "paths are case-sensitive";
  EXPECT_EQ(StripVersionPrefix("/"), "/");
  EXPECT_EQ(StripVersionPrefix("/x/v1/y"), "/x/v1/y");
}

TEST(StripVersionPrefixTest, ResultAlwaysStartsWithSlash) {
  EXPECT_EQ(StripVersionPrefix(""), "/");
  EXPECT_EQ(StripVersionPrefix("models"), "/models");
  for (const char* p : {"", "a", "/v1", "/v1/", "v1", "/v1beta", "?"}) {
    std::string out = StripVersionPrefix(p);
    ASSERT_FALSE(out.empty()) << p;
    EXPECT_EQ(out.front(), '/') << p;
  }
}

TEST(UpstreamTargetTest, JoinsBasePathPathAndQueryByteExact) {
  EXPECT_EQ(UpstreamTarget("/v1", "/chat/completions", ""), "/v1/chat/completions");
  EXPECT_EQ(UpstreamTarget("", "/models", ""), "/models");
  // The query is passed on exactly: no decoding, re-encoding or reordering.
  const std::string query = "b=2&a=%2F%20+x&empty=&flag&u=%E2%9C%93&dup=1&dup=2";
  EXPECT_EQ(UpstreamTarget("/v1", "/models", query), absl::StrCat("/v1/models?", query));
  EXPECT_EQ(UpstreamTarget("/v1", "/files/a%2Fb", "x=1"), "/v1/files/a%2Fb?x=1");
}

TEST(UpstreamTargetTest, RoundTripOfAClientTarget) {
  const std::string target = "/v1/embeddings?api-version=2024-01-01&x=%3D";
  auto [path, query] = SplitTarget(target);
  EXPECT_EQ(UpstreamTarget("/v1", StripVersionPrefix(path), query), target);
}

// ---------------------------------------------------------------------------------------------
// Header filtering

TEST(IsRequestHeaderDroppedTest, DropsHopByHopAndProxyOwnedHeaders) {
  for (const char* h : {"Connection",
                        "Keep-Alive",
                        "Proxy-Connection",
                        "TE",
                        "Trailer",
                        "Transfer-Encoding",
                        "Upgrade",
                        "Proxy-Authenticate",
                        "Proxy-Authorization",
                        "Host",
                        "Content-Length",
                        "Authorization",
                        "Cookie",
                        "Accept-Encoding",
                        "Expect",
                        "X-Forwarded-For",
                        "X-Forwarded-Proto",
                        "X-Forwarded-Host",
                        "Forwarded",
                        "Proxy-Anything",
                        "REMOTE_ADDR",
                        "REMOTE_PORT",
                        "LOCAL_ADDR",
                        "LOCAL_PORT"}) {
    EXPECT_TRUE(IsRequestHeaderDropped(h, "")) << h;
  }
}

TEST(IsRequestHeaderDroppedTest, KeepsEndToEndHeaders) {
  for (const char* h :
       {"Content-Type", "Accept", "User-Agent", "X-Request-Id", "OpenAI-Beta", "Accept-Language",
        "X-Forwarded", "Hostname", "Authorization-Extra", "Content-Type-Options", "X-Custom"}) {
    EXPECT_FALSE(IsRequestHeaderDropped(h, "")) << h;
  }
}

TEST(IsRequestHeaderDroppedTest, IsCaseInsensitive) {
  for (const char* h :
       {"authorization", "AUTHORIZATION", "aUtHoRiZaTiOn", "host", "HOST", "x-forwarded-for",
        "X-FORWARDED-FOR", "transfer-encoding", "cOOKIE", "remote_addr", "PROXY-CONNECTION"}) {
    EXPECT_TRUE(IsRequestHeaderDropped(h, "")) << h;
  }
}

TEST(IsRequestHeaderDroppedTest, DropsHeadersNamedInConnection) {
  const char* connection = "keep-alive, X-Secret-Hop ,\tx-other";
  EXPECT_TRUE(IsRequestHeaderDropped("X-Secret-Hop", connection));
  EXPECT_TRUE(IsRequestHeaderDropped("x-secret-hop", connection));
  EXPECT_TRUE(IsRequestHeaderDropped("X-Other", connection));
  EXPECT_FALSE(IsRequestHeaderDropped("X-Secret", connection)) << "whole tokens only";
  EXPECT_FALSE(IsRequestHeaderDropped("X-Secret-Hop-2", connection));
  EXPECT_FALSE(IsRequestHeaderDropped("Content-Type", connection));
  EXPECT_FALSE(IsRequestHeaderDropped("Content-Type", "close"));
}

TEST(IsResponseHeaderDroppedTest, DropsHopByHopAndFramingHeaders) {
  for (const char* h :
       {"Connection", "Keep-Alive", "Transfer-Encoding", "transfer-encoding", "Content-Length",
        "CONTENT-LENGTH", "Upgrade", "Trailer", "TE", "Proxy-Authenticate"}) {
    EXPECT_TRUE(IsResponseHeaderDropped(h, "")) << h;
  }
}

TEST(IsResponseHeaderDroppedTest, KeepsEndToEndHeaders) {
  for (const char* h : {"Content-Type", "Content-Encoding", "X-Request-Id", "Retry-After",
                        "X-RateLimit-Remaining", "Cache-Control", "Date", "Set-Cookie"}) {
    EXPECT_FALSE(IsResponseHeaderDropped(h, "")) << h;
  }
}

TEST(IsResponseHeaderDroppedTest, DropsHeadersNamedInConnection) {
  EXPECT_TRUE(IsResponseHeaderDropped("X-Hop", "close, x-hop"));
  EXPECT_TRUE(IsResponseHeaderDropped("X-HOP", "X-Hop"));
  EXPECT_FALSE(IsResponseHeaderDropped("X-Hop", "close"));
  EXPECT_FALSE(IsResponseHeaderDropped("X-Request-Id", "close, x-hop"));
}

// ---------------------------------------------------------------------------------------------
// SummarizeBody

TEST(SummarizeBodyTest, FindsModelAndStream) {
  BodySummary s = SummarizeBody(
      R"({"model":"deepseek-ai/DeepSeek-V3","messages":[{"role":"user","content":"hi"}],)"
      R"("stream":true})");
  EXPECT_EQ(s.model, "deepseek-ai/DeepSeek-V3");
  EXPECT_TRUE(s.stream);
}

TEST(SummarizeBodyTest, StreamDefaultsToFalse) {
  BodySummary s = SummarizeBody(R"({"model":"m","messages":[]})");
  EXPECT_EQ(s.model, "m");
  EXPECT_FALSE(s.stream);
  s = SummarizeBody(R"({"stream":false,"model":"m"})");
  EXPECT_FALSE(s.stream);
  EXPECT_EQ(s.model, "m");
  // Only a JSON true counts.
  s = SummarizeBody(R"({"stream":"true","model":"m"})");
  EXPECT_FALSE(s.stream);
  s = SummarizeBody(R"({"stream":1,"model":"m"})");
  EXPECT_FALSE(s.stream);
}

TEST(SummarizeBodyTest, MembersInAnyOrderAndWithWhitespace) {
  BodySummary s = SummarizeBody(
      " \r\n\t{ \"temperature\" : 0.7 , \"stream\" : true ,\n \"model\" : \"Qwen/Qwen2.5\" } ");
  EXPECT_EQ(s.model, "Qwen/Qwen2.5");
  EXPECT_TRUE(s.stream);
}

TEST(SummarizeBodyTest, NestedModelAndStreamKeysAreIgnored) {
  BodySummary s = SummarizeBody(R"({"metadata":{"model":"inner","stream":true},)"
                                R"("messages":[{"model":"in-array","content":{"model":"deeper"}}],)"
                                R"("model":"outer"})");
  EXPECT_EQ(s.model, "outer");
  EXPECT_FALSE(s.stream) << "only a top-level stream counts";

  s = SummarizeBody(R"({"tools":[{"model":"x"}],"extra":{"a":{"model":"y"}}})");
  EXPECT_EQ(s.model, "") << "no top-level model";
}

TEST(SummarizeBodyTest, NonStringModelIsIgnored) {
  EXPECT_EQ(SummarizeBody(R"({"model":42,"stream":true})").model, "");
  EXPECT_EQ(SummarizeBody(R"({"model":null})").model, "");
  EXPECT_EQ(SummarizeBody(R"({"model":["a"]})").model, "");
  EXPECT_EQ(SummarizeBody(R"({"model":{"name":"a"}})").model, "");
}

TEST(SummarizeBodyTest, ModelWithEscapes) {
  EXPECT_EQ(SummarizeBody(R"({"model":"a\/b\u00e9\"q"})").model, "a/b\xC3\xA9\"q");
}

TEST(SummarizeBodyTest, NonJsonAndNonObjectBodiesGiveAnEmptySummary) {
  for (const char* body :
       {"", "   ", "model=x&stream=true", "not json", "null", "42", "\"model\"", R"(["model","m"])",
        R"([{"model":"m","stream":true}])", "<xml/>", "{", "}"}) {
    BodySummary s = SummarizeBody(body);
    EXPECT_EQ(s.model, "") << body;
    EXPECT_FALSE(s.stream) << body;
  }
}

TEST(SummarizeBodyTest, ArraysInsideTheObjectAreSkipped) {
  BodySummary s = SummarizeBody(
      R"({"input":[[1,2,[3,[4]]],["model"],{"stream":true}],"stream":true,"model":"emb"})");
  EXPECT_EQ(s.model, "emb");
  EXPECT_TRUE(s.stream);
}

TEST(SummarizeBodyTest, StopsEarlyOnceBothAreKnown) {
  // A later duplicate "model" is only seen by a parse that goes on: the early stop keeps the
  // first value. (A full JSON parse would keep the last.)
  BodySummary s = SummarizeBody(R"({"model":"first","stream":true,"model":"second"})");
  EXPECT_EQ(s.model, "first");
  EXPECT_TRUE(s.stream);
  // Garbage after both members does not matter either.
  s = SummarizeBody(R"({"stream":true,"model":"m","messages":[ this is not json )");
  EXPECT_EQ(s.model, "m");
  EXPECT_TRUE(s.stream);
}

TEST(SummarizeBodyTest, DoesNotStopBeforeBothAreKnown) {
  // Only the model is known after the first member: the parse goes on and finds the stream.
  BodySummary s = SummarizeBody(R"({"model":"m","messages":[{"stream":false}],"stream":true})");
  EXPECT_EQ(s.model, "m");
  EXPECT_TRUE(s.stream);
}

TEST(SummarizeBodyTest, TruncatedJsonNeverThrowsAndKeepsWhatWasSeen) {
  const std::string full = R"({"model":"m","messages":[{"role":"user","content":"hello"}]})";
  for (size_t len = 0; len <= full.size(); ++len) {
    BodySummary s;
    ASSERT_NO_THROW(s = SummarizeBody(full.substr(0, len))) << len;
    EXPECT_FALSE(s.stream);
    // Before the model's value is complete nothing is known; after it, the model is.
    if (len < std::string(R"({"model":"m")").size()) {
      EXPECT_EQ(s.model, "") << full.substr(0, len);
    } else {
      EXPECT_EQ(s.model, "m") << full.substr(0, len);
    }
  }
}

TEST(SummarizeBodyTest, InvalidUtf8AndControlBytesDoNotThrow) {
  std::string body = "{\"model\":\"m\",\"x\":\"\xff\xfe\",\"y\":\"\x01\"}";
  BodySummary s;
  ASSERT_NO_THROW(s = SummarizeBody(body));
  EXPECT_EQ(s.model, "m");
  std::string nul_body("{\"model\":\"m\0x\"}", 15);
  ASSERT_NO_THROW(SummarizeBody(nul_body));
}

TEST(SummarizeBodyTest, HugeBodyWithModelAndStreamFirst) {
  // 64 MiB of prompt after the two members; the summary must not need to parse it (it is
  // also left unterminated, so a full parse could not succeed).
  std::string body = R"({"model":"big","stream":true,"messages":[{"role":"user","content":")";
  body.append(64u << 20, 'x');
  BodySummary s = SummarizeBody(body);
  EXPECT_EQ(s.model, "big");
  EXPECT_TRUE(s.stream);
}

TEST(SummarizeBodyTest, LargeValidBodyWithModelLast) {
  // The slow path still works: members after a big prompt are found.
  std::string body = R"({"messages":[{"role":"user","content":")";
  body.append(1u << 20, 'y');
  body += R"("}],"stream":true,"model":"late"})";
  BodySummary s = SummarizeBody(body);
  EXPECT_EQ(s.model, "late");
  EXPECT_TRUE(s.stream);
}

TEST(SummarizeBodyTest, DeeplyNestedBodyDoesNotCrash) {
  std::string body = R"({"model":"deep","x":)";
  body.append(100000, '[');
  body.append(100000, ']');
  body += "}";
  BodySummary s;
  ASSERT_NO_THROW(s = SummarizeBody(body));
  EXPECT_EQ(s.model, "deep");
}

}  // namespace
}  // namespace sflb

namespace sflb {
namespace {

TEST(NormalizePathTest, CollapsesSlashesAndDotSegments) {
  EXPECT_EQ(NormalizePath("/v1//user/./info"), "/v1/user/info");
  EXPECT_EQ(NormalizePath("/v1/x/../user/info"), "/v1/user/info");
  EXPECT_EQ(NormalizePath("/../../etc"), "/etc");
  EXPECT_EQ(NormalizePath(""), "/");
  EXPECT_EQ(NormalizePath("/a/b/"), "/a/b");
}

}  // namespace
}  // namespace sflb

// ---------------------------------------------------------------------------------------------
// Reference implementation: the header filters the fast versions replaced, kept verbatim so a
// randomized test can compare the two.

namespace sflb {
namespace reference {
namespace {

bool IsHopByHop(absl::string_view name) {
  static const char* const kHopByHop[] = {"connection", "keep-alive", "proxy-connection",
                                          "te", "trailer", "transfer-encoding", "upgrade",
                                          "proxy-authenticate", "proxy-authorization"};
  for (const char* h : kHopByHop) {
    if (absl::EqualsIgnoreCase(name, h)) return true;
  }
  return false;
}

bool NamedInConnection(absl::string_view name, absl::string_view connection_header) {
  for (absl::string_view token : absl::StrSplit(connection_header, ',')) {
    if (absl::EqualsIgnoreCase(absl::StripAsciiWhitespace(token), name)) return true;
  }
  return false;
}

bool IsRequestHeaderDropped(absl::string_view name, absl::string_view connection_header) {
  if (IsHopByHop(name) || NamedInConnection(name, connection_header)) return true;
  static const char* const kDropped[] = {"host", "content-length", "authorization", "cookie",
                                         "accept-encoding", "expect", "remote_addr",
                                         "remote_port", "local_addr", "local_port"};
  for (const char* h : kDropped) {
    if (absl::EqualsIgnoreCase(name, h)) return true;
  }
  return absl::StartsWithIgnoreCase(name, "x-forwarded-") ||
         absl::EqualsIgnoreCase(name, "forwarded") || absl::StartsWithIgnoreCase(name, "proxy-");
}

bool IsResponseHeaderDropped(absl::string_view name, absl::string_view connection_header) {
  return IsHopByHop(name) || NamedInConnection(name, connection_header) ||
         absl::EqualsIgnoreCase(name, "content-length");
}

}  // namespace
}  // namespace reference

namespace {

// ---------------------------------------------------------------------------------------------
// Header filters against the reference

TEST(HeaderFilterDifferentialTest, RandomNamesMatchTheReference) {
  static const char* const kNames[] = {
      "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
      "upgrade", "proxy-authenticate", "proxy-authorization", "host", "content-length",
      "authorization", "cookie", "accept-encoding", "expect", "remote_addr", "remote_port",
      "local_addr", "local_port", "x-forwarded-for", "x-forwarded-", "x-forwarded", "forwarded",
      "proxy-", "proxy", "content-type", "accept", "user-agent", "x-request-id", "", "t", "tE",
      "hosts", "x-hop", "date", "set-cookie", "local@addr", "remote-addr", "te\xC3\xA9"};
  static const char* const kConnections[] = {"", "close", "keep-alive, X-Hop", " , ,",
                                             "x-hop,\tupgrade ", ",", "TE", "a,,b"};
  std::mt19937_64 rng(99);
  auto pick = [&rng](size_t n) { return std::uniform_int_distribution<size_t>(0, n - 1)(rng); };
  for (int i = 0; i < 50000; ++i) {
    std::string name = kNames[pick(std::size(kNames))];
    for (char& c : name) {
      if (pick(2) == 0) c = absl::ascii_toupper(static_cast<unsigned char>(c));
    }
    if (pick(10) == 0 && !name.empty()) name[pick(name.size())] ^= 0x20;  // '-' <-> '\r' etc.
    if (pick(10) == 0) name += "x";
    const char* connection = kConnections[pick(std::size(kConnections))];
    ASSERT_EQ(IsRequestHeaderDropped(name, connection),
              reference::IsRequestHeaderDropped(name, connection))
        << name << " / " << connection;
    ASSERT_EQ(IsResponseHeaderDropped(name, connection),
              reference::IsResponseHeaderDropped(name, connection))
        << name << " / " << connection;
  }
}

TEST(HeaderFilterDifferentialTest, EmptyNameAndEmptyTokens) {
  // Quirks of the original kept on purpose: an empty Connection header is one empty token.
  EXPECT_TRUE(IsRequestHeaderDropped("", ""));
  EXPECT_FALSE(IsRequestHeaderDropped("", "close"));
  EXPECT_TRUE(IsResponseHeaderDropped("", "close, "));
}

}  // namespace
}  // namespace sflb
