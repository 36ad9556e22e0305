// Tests of dataplane/forwarding: target splitting, path rewriting, header filtering, the
// streaming body summary and the usage/error readers. The JSON readers and header filters are
// also checked against reference implementations (the nlohmann-based code they replaced) on
// many generated and mutated inputs.
#include "dataplane/forwarding.h"

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

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
// Reference implementations: the code the fast versions replaced, kept verbatim (apart from
// names) so randomized tests can compare the two.

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

class SummaryHandler : public nlohmann::json_sax<nlohmann::json> {
 public:
  explicit SummaryHandler(BodySummary* out) : out_(out) {}

  bool null() override { return Scalar(); }
  bool boolean(bool value) override {
    if (depth_ == 1 && key_ == "stream") {
      out_->stream = value;
      seen_stream_ = true;
    }
    return Scalar();
  }
  bool number_integer(number_integer_t) override { return Scalar(); }
  bool number_unsigned(number_unsigned_t) override { return Scalar(); }
  bool number_float(number_float_t, const string_t&) override { return Scalar(); }
  bool string(string_t& value) override {
    if (depth_ == 1 && key_ == "model") {
      out_->model = value;
      seen_model_ = true;
    }
    return Scalar();
  }
  bool binary(binary_t&) override { return Scalar(); }
  bool start_object(std::size_t) override {
    if (depth_ == 0 && !started_) started_ = true;
    else if (depth_ == 0) return false;
    ++depth_;
    return true;
  }
  bool end_object() override {
    --depth_;
    return depth_ > 0;
  }
  bool start_array(std::size_t) override {
    if (depth_ == 0) return false;
    ++depth_;
    return true;
  }
  bool end_array() override {
    --depth_;
    return true;
  }
  bool key(string_t& value) override {
    if (depth_ == 1) key_ = value;
    return true;
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception&) override {
    return false;
  }

 private:
  bool Scalar() { return depth_ > 0 && !(seen_model_ && seen_stream_); }

  BodySummary* out_;
  int depth_ = 0;
  bool started_ = false;
  bool seen_model_ = false;
  bool seen_stream_ = false;
  std::string key_;
};

BodySummary SummarizeBody(absl::string_view body) {
  BodySummary out;
  absl::string_view trimmed = absl::StripLeadingAsciiWhitespace(body);
  if (trimmed.empty() || trimmed.front() != '{') return out;
  SummaryHandler handler(&out);
  nlohmann::json::sax_parse(trimmed.begin(), trimmed.end(), &handler,
                            nlohmann::json::input_format_t::json, /*strict=*/false);
  return out;
}

// dataplane/proxy.cc's ReadUsage, verbatim: value<uint64_t>() throws for non-numbers and
// wraps negative numbers.
bool ReadUsage(const nlohmann::json& object, uint64_t* prompt, uint64_t* completion) {
  if (!object.is_object()) return false;
  auto usage = object.find("usage");
  if (usage == object.end() || !usage->is_object()) return false;
  *prompt = usage->value("prompt_tokens", uint64_t{0});
  *completion = usage->value("completion_tokens", uint64_t{0});
  return true;
}

// ExtractUsage's documented contract on top of a parsed document.
bool TokenCount(const nlohmann::json& usage, const char* name, uint64_t* out) {
  auto it = usage.find(name);
  if (it == usage.end()) {
    *out = 0;
    return true;
  }
  if (it->is_number_unsigned()) {
    *out = it->get<uint64_t>();
    return true;
  }
  if (it->is_number_integer()) {  // negative, or -0
    *out = 0;
    return it->get<int64_t>() == 0;
  }
  if (it->is_number_float()) {
    double value = it->get<double>();
    if (!(value > -1.0 && value < 18446744073709551616.0)) return false;
    *out = static_cast<uint64_t>(value);
    return true;
  }
  return false;
}

bool ExtractUsage(absl::string_view text, uint64_t* prompt, uint64_t* completion) {
  nlohmann::json doc = nlohmann::json::parse(text.begin(), text.end(), nullptr, false);
  if (!doc.is_object()) return false;
  auto usage = doc.find("usage");
  if (usage == doc.end() || !usage->is_object()) return false;
  return TokenCount(*usage, "prompt_tokens", prompt) &&
         TokenCount(*usage, "completion_tokens", completion);
}

// dataplane/proxy.cc's ErrorMessageOf, verbatim.
std::string ErrorMessageOf(absl::string_view body) {
  nlohmann::json parsed = nlohmann::json::parse(body.begin(), body.end(), nullptr, false);
  std::string message;
  if (parsed.is_object()) {
    auto it = parsed.find("message");
    if (it != parsed.end() && it->is_string()) message = it->get<std::string>();
    auto err = parsed.find("error");
    if (message.empty() && err != parsed.end() && err->is_object()) {
      auto m = err->find("message");
      if (m != err->end() && m->is_string()) message = m->get<std::string>();
    }
  }
  if (message.size() > 512) message.resize(512);
  return message;
}

}  // namespace
}  // namespace reference

namespace {

// ---------------------------------------------------------------------------------------------
// Random JSON-ish documents

class JsonGenerator {
 public:
  explicit JsonGenerator(uint64_t seed) : rng_(seed) {}

  size_t Uniform(size_t n) { return std::uniform_int_distribution<size_t>(0, n - 1)(rng_); }
  bool Chance(int percent) { return Uniform(100) < static_cast<size_t>(percent); }

  // A top-level object, biased towards the members the readers look for.
  std::string Document() {
    std::string out = "{";
    size_t members = Uniform(7);
    for (size_t i = 0; i < members; ++i) {
      if (i > 0) out += Ws() + ",";
      out += Ws();
      size_t kind = Uniform(12);
      if (kind < 3) {
        out += "\"usage\"" + Ws() + ":" + Ws() + Usage();
      } else if (kind == 3) {
        out += "\"error\"" + Ws() + ":" + Ws() + Error();
      } else if (kind == 4) {
        out += "\"model\"" + Ws() + ":" + Ws() + (Chance(80) ? String() : Value(1));
      } else if (kind == 5) {
        out += "\"stream\"" + Ws() + ":" + Ws() + (Chance(80) ? "true" : Value(1));
      } else {
        out += Key() + Ws() + ":" + Ws() + Value(1);
      }
    }
    out += Ws() + "}";
    return Ws() + out + Ws();
  }

  // One of many small corruptions of `text`.
  std::string Mutate(std::string text) {
    static const char* const kBytes[] = {",", "}", "]", "{", "[", "\"", "\\", ":", " ", "0",
                                         "-", ".", "e", "x", "\x80", "\xC3", "\xFF", "\x01",
                                         "\\u", "\\uD800", "n", "t"};
    size_t pos = text.empty() ? 0 : Uniform(text.size() + 1);
    switch (Uniform(6)) {
      case 0: text.resize(pos); break;
      case 1:
        if (pos < text.size()) text.erase(pos, 1);
        break;
      case 2: text.insert(pos, kBytes[Uniform(std::size(kBytes))]); break;
      case 3:
        if (pos < text.size()) text[pos] = kBytes[Uniform(std::size(kBytes))][0];
        break;
      case 4: text += kBytes[Uniform(std::size(kBytes))]; break;
      default: {
        // Repeat a slice somewhere else.
        size_t from = Uniform(text.size() + 1);
        size_t len = Uniform(std::min<size_t>(text.size() - from, 20) + 1);
        text.insert(pos, text.substr(from, len));
        break;
      }
    }
    return text;
  }

 private:
  std::string Ws() {
    static const char* const kWs[] = {"", "", "", "", " ", "\n", "\r\n", "\t ", "  "};
    return kWs[Uniform(std::size(kWs))];
  }

  std::string Key() {
    static const char* const kKeys[] = {
        "\"model\"", "\"stream\"", "\"usage\"", "\"prompt_tokens\"", "\"completion_tokens\"",
        "\"total_tokens\"", "\"message\"", "\"error\"", "\"choices\"", "\"content\"", "\"id\"",
        "\"mod\\u0065l\"", "\"us\\u0061ge\"", "\"\\u0075sage\"", "\"stre\\u0061m\"",
        "\"messag\\u0065\"", "\"\"", "\"Model\"", "\"usage \"", "\"model\\u0000\"", "\"x\""};
    return kKeys[Uniform(std::size(kKeys))];
  }

  std::string String() {
    static const char* const kPieces[] = {
        "hello", " ", "Qwen/Qwen2.5-7B-Instruct", "\\\"usage\\\":{\\\"prompt_tokens\\\":5}",
        "usage", "\\n", "\\\"", "\\\\", "\\/", "\\b\\f\\r\\t", "\\u00e9", "\\u4e2d",
        "\\uD83D\\uDE00", "\\u0000", "\xC3\xA9", "\xE4\xB8\xAD", "\xF0\x9F\x98\x80", "\x7F",
        "{\\\"model\\\":\\\"x\\\"}", "}", "]", ",", "model", "\\u0022", "\\uDBFF\\uDFFF"};
    std::string out = "\"";
    size_t n = Uniform(5);
    for (size_t i = 0; i < n; ++i) out += kPieces[Uniform(std::size(kPieces))];
    if (Chance(2)) out += std::string(600, 'm');  // beyond ExtractErrorMessage's cut
    if (Chance(4)) {
      // Invalid (or truncated) UTF-8 and escapes, each at the edge of a rule.
      static const char* const kBad[] = {
          "\xC0\x80", "\xC1\xBF", "\xE0\x9F\xBF", "\xED\xA0\x80", "\xED\x9F\xBF",
          "\xF0\x8F\xBF\xBF", "\xF0\x90\x80\x80", "\xF4\x8F\xBF\xBF", "\xF4\x90\x80\x80",
          "\xF5\x80\x80\x80", "\xE4\xB8", "\xC3", "\xEF\xBF\xBF", "\xE1\x80\x80",
          "\\uD800", "\\uDBFF\\uE000", "\\uDC00", "\\uD7FF", "\\uE000", "\\u12G4",
          "\\uD800\\n", "\x1F", "\x7F"};
      out.insert(1 + Uniform(out.size()), kBad[Uniform(std::size(kBad))]);
    }
    return out + "\"";
  }

  std::string Number() {
    static const char* const kNumbers[] = {
        "0", "-0", "7", "12", "9", "1700000000", "18446744073709551615",
        "18446744073709551616", "99999999999999999999999", "-1", "-12", "1.5", "12.0", "12.9",
        "1e2", "1E+2", "2e-1", "-0.5", "-0.0", "0.9999", "1e400", "-1e400", "1e-400",
        "1.7976931348623157e308", "1.8e308", "0.00001e310", "-9223372036854775809",
        "100000000000000000000000000000000000000000000000000000000000000000e250", "3.14159"};
    if (Chance(30)) return std::to_string(Uniform(100000));
    return kNumbers[Uniform(std::size(kNumbers))];
  }

  std::string Scalar() {
    switch (Uniform(6)) {
      case 0: return String();
      case 1: return Number();
      case 2: return "true";
      case 3: return "false";
      case 4: return "null";
      default: return Number();
    }
  }

  std::string Value(int depth) {
    size_t kind = Uniform(depth > 4 ? 3 : 6);
    if (kind < 3) return Scalar();
    if (kind == 3) {
      std::string out = "[";
      size_t n = Uniform(4);
      for (size_t i = 0; i < n; ++i) {
        if (i > 0) out += ",";
        out += Ws() + Value(depth + 1) + Ws();
      }
      return out + "]";
    }
    if (kind == 4 && Chance(30)) return Usage();
    std::string out = "{";
    size_t n = Uniform(4);
    for (size_t i = 0; i < n; ++i) {
      if (i > 0) out += ",";
      out += Ws() + Key() + Ws() + ":" + Ws() + Value(depth + 1) + Ws();
    }
    return out + "}";
  }

  std::string Usage() {
    if (Chance(10)) return Scalar();  // null, a string...
    std::string out = "{";
    size_t n = Uniform(5);
    for (size_t i = 0; i < n; ++i) {
      if (i > 0) out += ",";
      static const char* const kNames[] = {"\"prompt_tokens\"", "\"completion_tokens\"",
                                           "\"total_tokens\"", "\"prompt_tok\\u0065ns\""};
      std::string name = Chance(85) ? kNames[Uniform(std::size(kNames))] : Key();
      out += Ws() + name + Ws() + ":" + Ws() + (Chance(85) ? Number() : Value(3)) + Ws();
    }
    return out + "}";
  }

  std::string Error() {
    if (Chance(10)) return Scalar();
    std::string out = "{";
    size_t n = Uniform(4);
    for (size_t i = 0; i < n; ++i) {
      if (i > 0) out += ",";
      out += Ws() + (Chance(60) ? std::string("\"message\"") : Key()) + ":" +
             (Chance(70) ? String() : Value(3));
    }
    return out + "}";
  }

  std::mt19937_64 rng_;
};

// Checks the three JSON readers against their references on one input.
void ExpectSameAsReference(const std::string& text) {
  BodySummary fast = SummarizeBody(text);
  BodySummary slow = reference::SummarizeBody(text);
  EXPECT_EQ(fast.model, slow.model) << text;
  EXPECT_EQ(fast.stream, slow.stream) << text;

  uint64_t p1 = 111, c1 = 222, p2 = 111, c2 = 222;
  bool ok1 = ExtractUsage(text, &p1, &c1);
  bool ok2 = reference::ExtractUsage(text, &p2, &c2);
  EXPECT_EQ(ok1, ok2) << text;
  if (ok1 && ok2) {
    EXPECT_EQ(p1, p2) << text;
    EXPECT_EQ(c1, c2) << text;
  }
  if (!ok1) {
    EXPECT_EQ(p1, 111u) << "outputs untouched on false: " << text;
    EXPECT_EQ(c1, 222u) << text;
  }
  // Where proxy.cc's ReadUsage neither threw nor wrapped a negative number, it agrees.
  nlohmann::json doc = nlohmann::json::parse(text, nullptr, false);
  uint64_t p3 = 0, c3 = 0;
  bool ok3 = false;
  try {
    ok3 = reference::ReadUsage(doc, &p3, &c3);
  } catch (const nlohmann::json::exception&) {
    ok3 = false;
    EXPECT_FALSE(ok1) << "a count value<uint64_t>() cannot read is rejected: " << text;
  }
  if (ok3 && ok1) {
    EXPECT_EQ(p1, p3) << text;
    EXPECT_EQ(c1, c3) << text;
  }

  EXPECT_EQ(ExtractErrorMessage(text), reference::ErrorMessageOf(text)) << text;
}

TEST(JsonReadersDifferentialTest, GeneratedDocumentsMatchNlohmann) {
  JsonGenerator gen(20240611);
  int valid = 0, with_usage = 0, with_model = 0, with_message = 0;
  for (int i = 0; i < 20000; ++i) {
    std::string doc = gen.Document();
    valid += nlohmann::json::accept(doc);
    uint64_t p, c;
    with_usage += ExtractUsage(doc, &p, &c);
    with_model += !SummarizeBody(doc).model.empty();
    with_message += !ExtractErrorMessage(doc).empty();
    ExpectSameAsReference(doc);
    if (::testing::Test::HasFailure()) return;
  }
  // The generator must exercise every outcome, not just failures.
  EXPECT_GT(valid, 5000);
  EXPECT_GT(with_usage, 2000);
  EXPECT_GT(with_model, 500);
  EXPECT_GT(with_message, 500);
}

TEST(JsonReadersDifferentialTest, MutatedDocumentsMatchNlohmann) {
  JsonGenerator gen(7);
  for (int i = 0; i < 20000; ++i) {
    std::string doc = gen.Document();
    int rounds = 1 + static_cast<int>(gen.Uniform(3));
    for (int r = 0; r < rounds; ++r) doc = gen.Mutate(doc);
    ExpectSameAsReference(doc);
    if (::testing::Test::HasFailure()) return;
  }
}

TEST(JsonReadersDifferentialTest, EveryPrefixOfAResponseMatchesNlohmann) {
  const std::string response =
      "\xEF\xBB\xBF {\"id\":\"chatcmpl-1\",\"model\":\"m\\u00e9\",\"choices\":[{\"index\":0,"
      "\"message\":{\"role\":\"assistant\",\"content\":\"say \\\"usage\\\" \\uD83D\\uDE00\"},"
      "\"usage\":{\"prompt_tokens\":99}}],\"usage\":{\"prompt_tokens\":12,"
      "\"completion_tokens\":9.5e0,\"total_tokens\":21},\"stream\":true,"
      "\"error\":{\"message\":\"bad\"}}\r\n";
  for (size_t len = 0; len <= response.size(); ++len) {
    ExpectSameAsReference(response.substr(0, len));
  }
}

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

// ---------------------------------------------------------------------------------------------
// ExtractUsage

constexpr char kChatResponse[] =
    R"({"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,)"
    R"("model":"Qwen/Qwen2.5-7B-Instruct","choices":[{"index":0,"message":{"role":"assistant",)"
    R"("content":"Hello! I am a fixed benchmark response."},"finish_reason":"stop"}],)"
    R"("usage":{"prompt_tokens":12,"completion_tokens":9,"total_tokens":21}})";

struct Usage {
  bool ok = false;
  uint64_t prompt = 0;
  uint64_t completion = 0;
};

Usage UsageOf(absl::string_view json) {
  Usage u;
  u.ok = ExtractUsage(json, &u.prompt, &u.completion);
  return u;
}

TEST(ExtractUsageTest, ReadsAChatCompletion) {
  Usage u = UsageOf(kChatResponse);
  EXPECT_TRUE(u.ok);
  EXPECT_EQ(u.prompt, 12u);
  EXPECT_EQ(u.completion, 9u);
}

TEST(ExtractUsageTest, UsageBeforeChoicesAndSsePayloads) {
  Usage u = UsageOf(R"({"usage":{"completion_tokens":3,"prompt_tokens":4},"choices":[]})");
  EXPECT_TRUE(u.ok);
  EXPECT_EQ(u.prompt, 4u);
  EXPECT_EQ(u.completion, 3u);
  // An SSE "data:" payload as the proxy cuts it: leading space, trailing '\r'.
  u = UsageOf(" {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\r");
  EXPECT_TRUE(u.ok);
  EXPECT_EQ(u.completion, 2u);
  EXPECT_FALSE(UsageOf(" [DONE]").ok);
}

TEST(ExtractUsageTest, IsNotFooledByUsageInStringsOrNestedObjects) {
  EXPECT_FALSE(UsageOf(R"({"choices":[{"message":{"content":"\"usage\":{\"prompt_tokens\":5}"}}]})").ok);
  EXPECT_FALSE(UsageOf(R"({"choices":[{"usage":{"prompt_tokens":5}}],"x":{"usage":{}}})").ok);
  EXPECT_FALSE(UsageOf(R"({"note":"usage","usage_":{"prompt_tokens":5}})").ok);
  Usage u = UsageOf(R"({"choices":[{"usage":{"prompt_tokens":5}}],"usage":{"prompt_tokens":6}})");
  EXPECT_TRUE(u.ok);
  EXPECT_EQ(u.prompt, 6u);
  EXPECT_EQ(u.completion, 0u) << "missing counts are 0";
}

TEST(ExtractUsageTest, UsageThatIsNotAnObject) {
  for (const char* body : {R"({"usage":null})", R"({"usage":[]})", R"({"usage":"x"})",
                           R"({"usage":5})", R"({"usage":true})", R"({})", "[]", "null", "",
                           R"({"usage":{}} x)", R"({"usage":{})"}) {
    EXPECT_FALSE(UsageOf(body).ok) << body;
  }
  Usage u = UsageOf(R"({"usage":{}})");
  EXPECT_TRUE(u.ok);
  EXPECT_EQ(u.prompt, 0u);
  EXPECT_EQ(u.completion, 0u);
}

TEST(ExtractUsageTest, KeysAreComparedDecodedAndTheLastDuplicateWins) {
  Usage u = UsageOf(R"({"us\u0061ge":{"prompt_tok\u0065ns":7}})");
  EXPECT_TRUE(u.ok);
  EXPECT_EQ(u.prompt, 7u);
  u = UsageOf(R"({"usage":{"prompt_tokens":1},"usage":{"prompt_tokens":2,"prompt_tokens":3}})");
  EXPECT_TRUE(u.ok);
  EXPECT_EQ(u.prompt, 3u);
  EXPECT_FALSE(UsageOf(R"({"usage":{"prompt_tokens":1},"usage":null})").ok);
  u = UsageOf(R"({"usage":{"prompt_tokens":"x","prompt_tokens":4}})");
  EXPECT_TRUE(u.ok);
  EXPECT_EQ(u.prompt, 4u);
}

TEST(ExtractUsageTest, Numbers) {
  auto prompt = [](const std::string& value) {
    Usage u = UsageOf(R"({"usage":{"prompt_tokens":)" + value + "}}");
    return u.ok ? absl::StrCat(u.prompt) : std::string("rejected");
  };
  EXPECT_EQ(prompt("0"), "0");
  EXPECT_EQ(prompt("-0"), "0");
  EXPECT_EQ(prompt("18446744073709551615"), "18446744073709551615");
  EXPECT_EQ(prompt("18446744073709551616"), "rejected") << "beyond uint64";
  EXPECT_EQ(prompt("99999999999999999999999"), "rejected");
  EXPECT_EQ(prompt("-1"), "rejected") << "value<uint64_t>() would wrap it";
  EXPECT_EQ(prompt("12.9"), "12") << "truncated, as value<uint64_t>() does";
  EXPECT_EQ(prompt("1e2"), "100");
  EXPECT_EQ(prompt("-0.5"), "0");
  EXPECT_EQ(prompt("1e19"), "10000000000000000000");
  EXPECT_EQ(prompt("2e19"), "rejected");
  EXPECT_EQ(prompt("true"), "rejected");
  EXPECT_EQ(prompt("\"12\""), "rejected") << "value<uint64_t>() would throw";
  EXPECT_EQ(prompt("null"), "rejected");
  EXPECT_EQ(prompt("{}"), "rejected");
  // Malformed numbers make the whole body invalid.
  for (const char* bad : {"01", "1.", ".5", "-", "1e", "1e+", "+1", "0x10", "1.5.5", "NaN"}) {
    EXPECT_EQ(prompt(bad), "rejected") << bad;
  }
  // nlohmann rejects a document with a number that overflows a double, wherever it is.
  EXPECT_FALSE(UsageOf(R"({"x":1e400,"usage":{"prompt_tokens":1}})").ok);
  EXPECT_FALSE(UsageOf(R"({"x":[-1.8e308],"usage":{}})").ok);
  EXPECT_TRUE(UsageOf(R"({"x":1.7976931348623157e308,"y":1e-400,"z":0e99999,"usage":{}})").ok);
  EXPECT_FALSE(UsageOf(absl::StrCat(R"({"x":1)", std::string(400, '0'), R"(,"usage":{}})")).ok);
  EXPECT_TRUE(UsageOf(absl::StrCat(R"({"x":1)", std::string(300, '0'), R"(,"usage":{}})")).ok);
}

TEST(ExtractUsageTest, StringsAreValidated) {
  // Invalid UTF-8, control characters and broken escapes make the body invalid, as for nlohmann.
  for (const char* bad :
       {"\xFF", "\xC3", "\xC0\x80", "\xED\xA0\x80", "\xF4\x90\x80\x80", "\x01", "\\x", "\\u12",
        "\\uD800", "\\uD800\\u0041", "\\uDC00", "\t"}) {
    std::string body = absl::StrCat(R"({"s":")", bad, R"(","usage":{}})");
    EXPECT_FALSE(UsageOf(body).ok) << body;
    EXPECT_FALSE(nlohmann::json::accept(body)) << body;
  }
  for (const char* good : {"\xC3\xA9", "\xF4\x8F\xBF\xBF", "\x7F", "\\uD800\\uDC00", "\\u0000",
                           "\\\"\\\\\\/\\b\\f\\n\\r\\t"}) {
    std::string body = absl::StrCat(R"({"s":")", good, R"(","usage":{}})");
    EXPECT_TRUE(UsageOf(body).ok) << body;
  }
}

TEST(ExtractUsageTest, DeepNesting) {
  auto nested = [](int depth) {
    return absl::StrCat(R"({"usage":{},"x":)", std::string(depth, '['), std::string(depth, ']'),
                        "}");
  };
  EXPECT_TRUE(UsageOf(nested(1023)).ok) << "1024 levels with the top-level object";
  EXPECT_FALSE(UsageOf(nested(1024)).ok) << "deeper than the limit";
  EXPECT_FALSE(UsageOf(nested(1000000)).ok);
  std::string objects = R"({"usage":{},"x":)";
  for (int i = 0; i < 100000; ++i) objects += R"({"a":)";
  EXPECT_FALSE(UsageOf(objects).ok) << "unterminated";
}

TEST(ExtractUsageTest, LargeBodyWithUsageAtTheEnd) {
  std::string body = R"({"object":"list","data":[{"embedding":[)";
  for (int i = 0; i < 100000; ++i) absl::StrAppend(&body, i == 0 ? "" : ",", "-0.0123456789");
  body += R"(]}],"usage":{"prompt_tokens":8,"total_tokens":8}})";
  Usage u = UsageOf(body);
  EXPECT_TRUE(u.ok);
  EXPECT_EQ(u.prompt, 8u);
}

// ---------------------------------------------------------------------------------------------
// ExtractErrorMessage

TEST(ExtractErrorMessageTest, TopLevelOrOpenAiShape) {
  EXPECT_EQ(ExtractErrorMessage(R"({"message":"Rate limited","code":429})"), "Rate limited");
  EXPECT_EQ(ExtractErrorMessage(R"({"error":{"message":"Bad key","type":"auth"}})"), "Bad key");
  EXPECT_EQ(ExtractErrorMessage(R"({"message":"top","error":{"message":"inner"}})"), "top");
  EXPECT_EQ(ExtractErrorMessage(R"({"message":"","error":{"message":"inner"}})"), "inner");
  EXPECT_EQ(ExtractErrorMessage(R"({"message":5,"error":{"message":"inner"}})"), "inner");
  EXPECT_EQ(ExtractErrorMessage(R"({"error":"just a string"})"), "");
  EXPECT_EQ(ExtractErrorMessage(R"({"error":{"message":{"text":"x"}}})"), "");
  EXPECT_EQ(ExtractErrorMessage(R"({"data":{"message":"nested"}})"), "");
  EXPECT_EQ(ExtractErrorMessage(R"({"message":"a\nb\u00e9\ud83d\ude00"})"),
            "a\nb\xC3\xA9\xF0\x9F\x98\x80");
}

TEST(ExtractErrorMessageTest, InvalidJsonGivesNothing) {
  for (const char* body : {"", "Bad Gateway", R"({"message":"x")", R"({"message":"x"} trailing)",
                           R"(["message"])", R"({"message":"\uDC00"})"}) {
    EXPECT_EQ(ExtractErrorMessage(body), "") << body;
  }
}

TEST(ExtractErrorMessageTest, CutTo512Bytes) {
  std::string long_message(1000, 'a');
  EXPECT_EQ(ExtractErrorMessage(absl::StrCat(R"({"message":")", long_message, "\"}")),
            std::string(512, 'a'));
  // Escapes count decoded: 511 'a' then a two-byte character cut in the middle.
  std::string body = absl::StrCat(R"({"error":{"message":")", std::string(511, 'a'),
                                  R"(\u00e9\u00e9"}})");
  EXPECT_EQ(ExtractErrorMessage(body), reference::ErrorMessageOf(body));
  EXPECT_EQ(ExtractErrorMessage(body).size(), 512u);
}

// ---------------------------------------------------------------------------------------------
// SummarizeBody: more edge cases of the hand-written scanner

TEST(SummarizeBodyTest, KeysAndModelAreDecoded) {
  BodySummary s = SummarizeBody(R"({"mod\u0065l":"a\ud83d\ude00","str\u0065am":true})");
  EXPECT_EQ(s.model, "a\xF0\x9F\x98\x80");
  EXPECT_TRUE(s.stream);
  EXPECT_EQ(SummarizeBody(R"({"model":"bad\ud800"})").model, "") << "lone surrogate";
  EXPECT_EQ(SummarizeBody("{\"model\":\"bad\xC3\"}").model, "") << "invalid UTF-8";
  EXPECT_EQ(SummarizeBody(R"({"Model":"x","model ":"y"})").model, "") << "exact keys only";
}

TEST(SummarizeBodyTest, MalformedValueBeforeTheModelStopsTheScan) {
  for (const char* body : {R"({"x":01,"model":"m"})", R"({"x":1e400,"model":"m"})",
                           R"({"x":[1,],"model":"m"})", R"({"x":"\q","model":"m"})",
                           R"({"x" 1,"model":"m"})", R"({"x":tru,"model":"m"})"}) {
    EXPECT_EQ(SummarizeBody(body).model, "") << body;
    EXPECT_EQ(reference::SummarizeBody(body).model, "") << body;
  }
}

TEST(SummarizeBodyTest, NestingBeyondTheDepthLimitStopsTheScan) {
  std::string body = R"({"x":)";
  body.append(2000, '[');
  body.append(2000, ']');
  body += R"(,"model":"m"})";
  EXPECT_EQ(SummarizeBody(body).model, "") << "documented difference from nlohmann";
  EXPECT_EQ(reference::SummarizeBody(body).model, "m");
}

}  // namespace
}  // namespace sflb
