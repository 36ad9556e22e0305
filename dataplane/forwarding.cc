#include "dataplane/forwarding.h"

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "nlohmann/json.hpp"

namespace sflb {
namespace {

// ---------------------------------------------------------------------------------------------
// Header names

// ASCII lower-casing that does not consult the C locale (std::tolower does, on every call).
inline char AsciiLower(char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c | 0x20) : c; }

// `name` equals `lower` (which is all lower case) ignoring ASCII case.
bool EqualsLower(absl::string_view name, absl::string_view lower) {
  if (name.size() != lower.size()) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    if (AsciiLower(name[i]) != lower[i]) return false;
  }
  return true;
}

bool StartsWithLower(absl::string_view name, absl::string_view lower) {
  return name.size() >= lower.size() && EqualsLower(name.substr(0, lower.size()), lower);
}

// The length decides which few names can match, so a header costs at most two short compares.
bool IsHopByHop(absl::string_view name) {
  switch (name.size()) {
    case 2: return EqualsLower(name, "te");
    case 7: return EqualsLower(name, "trailer") || EqualsLower(name, "upgrade");
    case 10: return EqualsLower(name, "connection") || EqualsLower(name, "keep-alive");
    case 16: return EqualsLower(name, "proxy-connection");
    case 17: return EqualsLower(name, "transfer-encoding");
    case 18: return EqualsLower(name, "proxy-authenticate");
    case 19: return EqualsLower(name, "proxy-authorization");
    default: return false;
  }
}

// Request headers the proxy owns (besides hop-by-hop ones and the prefixes checked apart).
bool IsProxyOwnedRequestHeader(absl::string_view name) {
  switch (name.size()) {
    case 4: return EqualsLower(name, "host");
    case 6: return EqualsLower(name, "cookie") || EqualsLower(name, "expect");
    case 9: return EqualsLower(name, "forwarded");
    case 10: return EqualsLower(name, "local_addr") || EqualsLower(name, "local_port");
    case 11: return EqualsLower(name, "remote_addr") || EqualsLower(name, "remote_port");
    case 13: return EqualsLower(name, "authorization");
    case 14: return EqualsLower(name, "content-length");
    case 15: return EqualsLower(name, "accept-encoding");
    default: return false;
  }
}

// `name` is one of the comma-separated tokens of a Connection header (surrounding whitespace
// ignored). An empty header is one empty token, which matches only an empty name.
bool NamedInConnection(absl::string_view name, absl::string_view connection_header) {
  if (connection_header.empty()) return name.empty();
  size_t start = 0;
  for (;;) {
    size_t comma = connection_header.find(',', start);
    absl::string_view token = connection_header.substr(
        start, comma == absl::string_view::npos ? absl::string_view::npos : comma - start);
    if (absl::EqualsIgnoreCase(absl::StripAsciiWhitespace(token), name)) return true;
    if (comma == absl::string_view::npos) return false;
    start = comma + 1;
  }
}

// SAX handler that records the top-level "model" and "stream" members and stops early.
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
    return depth_ > 0;  // the top-level object ended: stop
  }
  bool start_array(std::size_t) override {
    if (depth_ == 0) return false;  // not an object
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
  // After a value: stop once both members are known.
  bool Scalar() { return depth_ > 0 && !(seen_model_ && seen_stream_); }

  BodySummary* out_;
  int depth_ = 0;
  bool started_ = false;
  bool seen_model_ = false;
  bool seen_stream_ = false;
  std::string key_;
};

}  // namespace

std::pair<absl::string_view, absl::string_view> SplitTarget(absl::string_view target) {
  size_t q = target.find('?');
  if (q == absl::string_view::npos) return {target, absl::string_view()};
  return {target.substr(0, q), target.substr(q + 1)};
}

std::string StripVersionPrefix(absl::string_view path) {
  if (path == "/v1") return "/";
  if (absl::StartsWith(path, "/v1/")) return std::string(path.substr(3));
  if (path.empty() || path.front() != '/') return absl::StrCat("/", path);
  return std::string(path);
}

std::string NormalizePath(absl::string_view decoded_path) {
  std::vector<absl::string_view> segments;
  for (absl::string_view segment : absl::StrSplit(decoded_path, '/')) {
    if (segment.empty() || segment == ".") continue;
    if (segment == "..") {
      if (!segments.empty()) segments.pop_back();
      continue;
    }
    segments.push_back(segment);
  }
  std::string out;
  for (absl::string_view segment : segments) absl::StrAppend(&out, "/", segment);
  return out.empty() ? "/" : out;
}

std::string UpstreamTarget(absl::string_view base_path, absl::string_view path,
                           absl::string_view query) {
  std::string out = absl::StrCat(base_path, path);
  if (!query.empty()) absl::StrAppend(&out, "?", query);
  return out;
}

bool IsRequestHeaderDropped(absl::string_view name, absl::string_view connection_header) {
  return IsHopByHop(name) || IsProxyOwnedRequestHeader(name) ||
         StartsWithLower(name, "x-forwarded-") || StartsWithLower(name, "proxy-") ||
         NamedInConnection(name, connection_header);
}

bool IsResponseHeaderDropped(absl::string_view name, absl::string_view connection_header) {
  return IsHopByHop(name) || EqualsLower(name, "content-length") ||
         NamedInConnection(name, connection_header);
}

BodySummary SummarizeBody(absl::string_view body) {
  BodySummary out;
  absl::string_view trimmed = absl::StripLeadingAsciiWhitespace(body);
  if (trimmed.empty() || trimmed.front() != '{') return out;
  SummaryHandler handler(&out);
  // Returns false when the handler stops early or the JSON is malformed; either way `out`
  // holds what was found before that point.
  nlohmann::json::sax_parse(trimmed.begin(), trimmed.end(), &handler,
                            nlohmann::json::input_format_t::json, /*strict=*/false);
  return out;
}

}  // namespace sflb
