#include "dataplane/forwarding.h"

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "nlohmann/json.hpp"

namespace sflb {
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
