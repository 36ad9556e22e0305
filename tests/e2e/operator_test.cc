// End-to-end tests of the operator surface (issue: operator surface): the old tool's HTTP
// endpoints field by field, auth levels per endpoint, /health reflecting reality, balance
// aggregation with failing and 410-answering keys, depletion, the audit log (and its durability
// across a kill -9 of the controlplane), Prometheus metrics, and the per-request log lines.
// Real processes on ephemeral ports against the fake SiliconFlow; every log and the audit log are
// scanned for secrets after each test.
#include <signal.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <optional>
#include <regex>
#include <set>
#include <sstream>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/key_format.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/e2e/test_cluster.h"

namespace sflb::e2e {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using json = nlohmann::json;

constexpr char kModel[] = "Qwen/Qwen2.5-7B-Instruct";
// 21 characters of content: the fake counts ceil(21 / 4) = 6 prompt tokens.
constexpr char kContent[] = "hello world, count me";
constexpr int kPromptTokens = 6;

std::string ChatBody(bool stream = false) {
  return json{{"model", kModel},
              {"stream", stream},
              {"messages", {{{"role", "user"}, {"content", kContent}}}}}
      .dump();
}

enum class Auth { kNone, kWrong, kUser, kAdmin };

httplib::Headers Headers(Auth auth) {
  switch (auth) {
    case Auth::kNone:
      return {};
    case Auth::kWrong:
      return {{"Authorization", "Bearer not-the-right-key"}};
    case Auth::kUser:
      return {{"Authorization", absl::StrCat("Bearer ", kUserKey)}};
    case Auth::kAdmin:
      return {{"Authorization", absl::StrCat("Bearer ", kAdminKey)}};
  }
  return {};
}

const char* AuthName(Auth auth) {
  switch (auth) {
    case Auth::kNone: return "no key";
    case Auth::kWrong: return "wrong key";
    case Auth::kUser: return "user key";
    case Auth::kAdmin: return "admin key";
  }
  return "?";
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// ISO-8601 / RFC 3339 with a time zone ("2026-11-26T13:00:00.123Z").
::testing::AssertionResult IsIso8601(const json& v) {
  if (!v.is_string()) return ::testing::AssertionFailure() << v.dump() << " is not a string";
  const std::string s = v.get<std::string>();
  static const std::regex kIso(
      R"(^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$)");
  absl::Time t;
  std::string err;
  if (!std::regex_match(s, kIso) || !absl::ParseTime(absl::RFC3339_full, s, &t, &err)) {
    return ::testing::AssertionFailure() << "'" << s << "' is not ISO-8601 " << err;
  }
  if (t < absl::Now() - absl::Hours(1) || t > absl::Now() + absl::Minutes(5)) {
    return ::testing::AssertionFailure() << "'" << s << "' is not a recent time";
  }
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult IsIsoOrNever(const json& v) {
  if (v == "Never") return ::testing::AssertionSuccess();
  return IsIso8601(v);
}

// A decimal string with exactly four places ("1.5000"), as the old tool answered balances.
::testing::AssertionResult IsDecimal4(const json& v) {
  static const std::regex kDecimal(R"(^-?\d+\.\d{4}$)");
  if (!v.is_string() || !std::regex_match(v.get<std::string>(), kDecimal)) {
    return ::testing::AssertionFailure() << v.dump() << " is not a decimal string with 4 places";
  }
  return ::testing::AssertionSuccess();
}

// ---------------------------------------------------------------------------------------------
// A strict parser of the Prometheus text exposition format (version 0.0.4).

struct PromSample {
  std::string name;
  std::string family;
  std::map<std::string, std::string> labels;
  double value = 0;
};

struct PromText {
  std::map<std::string, std::string> types;  // family -> counter|gauge|histogram|summary|untyped
  std::map<std::string, std::string> help;
  std::vector<PromSample> samples;

  // The value of the one sample named `name` whose labels include `labels`; nullopt if none.
  std::optional<double> Value(const std::string& name,
                              const std::map<std::string, std::string>& labels = {}) const {
    std::optional<double> out;
    for (const PromSample& s : samples) {
      if (s.name != name) continue;
      bool match = true;
      for (const auto& [k, v] : labels) {
        auto it = s.labels.find(k);
        match = match && it != s.labels.end() && it->second == v;
      }
      if (match) out = out.value_or(0) + s.value;
    }
    return out;
  }
};

bool IsMetricName(absl::string_view s) {
  static const std::regex kName("^[a-zA-Z_:][a-zA-Z0-9_:]*$");
  return std::regex_match(std::string(s), kName);
}

bool IsLabelName(absl::string_view s) {
  static const std::regex kName("^[a-zA-Z_][a-zA-Z0-9_]*$");
  return std::regex_match(std::string(s), kName);
}

// Values are what Go's strconv.ParseFloat accepts (Prometheus parses them with it): decimal
// floats, and NaN / Inf / Infinity with an optional sign, in any case.
bool ParsePromValue(absl::string_view s, double* out) {
  std::string lower = absl::AsciiStrToLower(s);
  if (lower == "nan") {
    *out = NAN;
    return true;
  }
  absl::string_view unsigned_part = lower;
  bool negative = false;
  if (!unsigned_part.empty() && (unsigned_part[0] == '+' || unsigned_part[0] == '-')) {
    negative = unsigned_part[0] == '-';
    unsigned_part.remove_prefix(1);
  }
  if (unsigned_part == "inf" || unsigned_part == "infinity") {
    *out = negative ? -INFINITY : INFINITY;
    return true;
  }
  static const std::regex kFloat(R"(^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$)");
  if (!std::regex_match(std::string(s), kFloat)) return false;
  return absl::SimpleAtod(s, out);
}

// Sorted "k=v,..." of all labels except `skip`.
std::string LabelKey(const std::map<std::string, std::string>& labels, const std::string& skip = "") {
  std::string out;
  for (const auto& [k, v] : labels) {
    if (k != skip) absl::StrAppend(&out, k, "=", v, ",");
  }
  return out;
}

absl::StatusOr<PromText> ParsePrometheus(absl::string_view text) {
  PromText out;
  auto fail = [](size_t line_no, absl::string_view line, absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat("line ", line_no, ": ", why, ": '", line, "'"));
  };
  if (text.empty() || text.back() != '\n') {
    return absl::InvalidArgumentError("exposition must be non-empty and end with a newline");
  }
  std::vector<absl::string_view> lines = absl::StrSplit(text.substr(0, text.size() - 1), '\n');
  std::set<std::string> families_done;   // families whose samples ended
  std::string current_family;            // family of the previous sample
  std::set<std::string> series;          // name + labels, for duplicates
  std::set<std::string> sampled_families;
  for (size_t n = 0; n < lines.size(); ++n) {
    absl::string_view line = lines[n];
    const size_t no = n + 1;
    if (line.empty()) continue;
    if (absl::StrContains(line, '\r')) return fail(no, line, "carriage return");
    if (line[0] == '#') {
      std::vector<absl::string_view> parts = absl::StrSplit(line, absl::MaxSplits(' ', 3));
      if (parts.size() >= 3 && (parts[1] == "HELP" || parts[1] == "TYPE")) {
        std::string name(parts[2]);
        if (!IsMetricName(name)) return fail(no, line, "bad metric name in comment");
        std::string rest = parts.size() > 3 ? std::string(parts[3]) : "";
        if (parts[1] == "HELP") {
          if (out.help.count(name)) return fail(no, line, "second HELP for a metric");
          for (size_t i = 0; i < rest.size(); ++i) {
            if (rest[i] == '\\') {
              if (i + 1 >= rest.size() || (rest[i + 1] != '\\' && rest[i + 1] != 'n')) {
                return fail(no, line, "bad escape in HELP");
              }
              ++i;
            }
          }
          out.help[name] = rest;
        } else {
          static const std::set<std::string> kTypes = {"counter", "gauge", "histogram", "summary",
                                                       "untyped"};
          if (!kTypes.count(rest)) return fail(no, line, "unknown TYPE");
          if (out.types.count(name)) return fail(no, line, "second TYPE for a metric");
          if (sampled_families.count(name)) return fail(no, line, "TYPE after its samples");
          out.types[name] = rest;
        }
      }
      continue;  // any other comment is allowed
    }
    // A sample: name[{labels}] value [timestamp]
    PromSample s;
    size_t i = 0;
    while (i < line.size() && line[i] != '{' && line[i] != ' ' && line[i] != '\t') ++i;
    s.name = std::string(line.substr(0, i));
    if (!IsMetricName(s.name)) return fail(no, line, "bad metric name");
    if (i < line.size() && line[i] == '{') {
      ++i;
      for (;;) {
        if (i < line.size() && line[i] == '}') {
          ++i;
          break;
        }
        size_t eq = line.find('=', i);
        if (eq == absl::string_view::npos) return fail(no, line, "label without '='");
        std::string label(line.substr(i, eq - i));
        if (!IsLabelName(label) || absl::StartsWith(label, "__")) {
          return fail(no, line, "bad label name");
        }
        i = eq + 1;
        if (i >= line.size() || line[i] != '"') return fail(no, line, "label value not quoted");
        ++i;
        std::string value;
        bool closed = false;
        while (i < line.size()) {
          char c = line[i++];
          if (c == '"') {
            closed = true;
            break;
          }
          if (c == '\\') {
            if (i >= line.size()) return fail(no, line, "dangling escape");
            char e = line[i++];
            if (e == '\\') value += '\\';
            else if (e == '"') value += '"';
            else if (e == 'n') value += '\n';
            else return fail(no, line, "bad escape in label value");
            continue;
          }
          value += c;
        }
        if (!closed) return fail(no, line, "unterminated label value");
        if (!s.labels.emplace(label, value).second) return fail(no, line, "duplicate label");
        if (i < line.size() && line[i] == ',') {
          ++i;
          continue;
        }
        if (i < line.size() && line[i] == '}') {
          ++i;
          break;
        }
        return fail(no, line, "expected ',' or '}' after a label");
      }
    }
    if (i >= line.size() || (line[i] != ' ' && line[i] != '\t')) {
      return fail(no, line, "no whitespace before the value");
    }
    std::vector<absl::string_view> rest =
        absl::StrSplit(line.substr(i), absl::ByAnyChar(" \t"), absl::SkipEmpty());
    if (rest.empty() || rest.size() > 2) return fail(no, line, "expected value [timestamp]");
    if (!ParsePromValue(rest[0], &s.value)) return fail(no, line, "bad value");
    int64_t ts;
    if (rest.size() == 2 && !absl::SimpleAtoi(rest[1], &ts)) return fail(no, line, "bad timestamp");
    // Family: the name itself, or a histogram/summary base.
    if (out.types.count(s.name)) {
      s.family = s.name;
    } else {
      for (const char* suffix : {"_bucket", "_sum", "_count"}) {
        if (!absl::EndsWith(s.name, suffix)) continue;
        std::string base = s.name.substr(0, s.name.size() - strlen(suffix));
        auto t = out.types.find(base);
        if (t == out.types.end()) continue;
        if (t->second == "histogram" || (t->second == "summary" && std::string(suffix) != "_bucket")) {
          s.family = base;
        }
      }
    }
    if (s.family.empty()) return fail(no, line, "sample of a family without a TYPE line");
    const std::string& type = out.types[s.family];
    if (type == "histogram") {
      bool is_bucket = absl::EndsWith(s.name, "_bucket") && s.name != s.family;
      if (is_bucket != (s.labels.count("le") == 1)) {
        return fail(no, line, "histogram: 'le' label on exactly the _bucket samples");
      }
      if (s.name == s.family) return fail(no, line, "histogram sample without a suffix");
      if (is_bucket) {
        double le;
        if (!ParsePromValue(s.labels["le"], &le)) return fail(no, line, "bad 'le'");
      }
    }
    if (type == "counter" && (std::isnan(s.value) || s.value < 0)) {
      return fail(no, line, "negative counter");
    }
    if (s.family != current_family) {
      if (families_done.count(s.family)) return fail(no, line, "family's samples not contiguous");
      if (!current_family.empty()) families_done.insert(current_family);
      current_family = s.family;
    }
    sampled_families.insert(s.family);
    if (!series.insert(s.name + "{" + LabelKey(s.labels) + "}").second) {
      return fail(no, line, "duplicate series");
    }
    out.samples.push_back(std::move(s));
  }
  // Histograms: per series, buckets with increasing le ending in +Inf, cumulative counts, _sum,
  // and _count equal to the +Inf bucket.
  for (const auto& [family, type] : out.types) {
    if (type != "histogram") continue;
    std::map<std::string, std::vector<std::pair<double, double>>> buckets;
    std::map<std::string, double> counts;
    std::set<std::string> sums;
    for (const PromSample& s : out.samples) {
      if (s.family != family) continue;
      std::string key = LabelKey(s.labels, "le");
      if (s.name == family + "_bucket") {
        double le;
        ParsePromValue(s.labels.at("le"), &le);
        buckets[key].emplace_back(le, s.value);
      } else if (s.name == family + "_count") {
        counts[key] = s.value;
      } else if (s.name == family + "_sum") {
        sums.insert(key);
      }
    }
    for (const auto& [key, b] : buckets) {
      std::string where = absl::StrCat(family, "{", key, "}");
      for (size_t i = 1; i < b.size(); ++i) {
        if (!(b[i].first > b[i - 1].first)) {
          return absl::InvalidArgumentError(absl::StrCat(where, ": 'le' not increasing"));
        }
        if (b[i].second < b[i - 1].second) {
          return absl::InvalidArgumentError(absl::StrCat(where, ": buckets not cumulative"));
        }
      }
      if (b.empty() || !std::isinf(b.back().first)) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": last bucket is not +Inf"));
      }
      if (!counts.count(key) || counts[key] != b.back().second) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": _count missing or != +Inf bucket"));
      }
      if (!sums.count(key)) return absl::InvalidArgumentError(absl::StrCat(where, ": no _sum"));
    }
    for (const auto& [key, c] : counts) {
      if (!buckets.count(key)) {
        return absl::InvalidArgumentError(absl::StrCat(family, "{", key, "}: _count without buckets"));
      }
    }
  }
  return out;
}

// The parser itself must reject what Prometheus rejects, or it proves nothing.
TEST(PrometheusParserTest, AcceptsValidAndRejectsInvalidText) {
  const std::string valid =
      "# HELP a_total Things\\n done\n"
      "# TYPE a_total counter\n"
      "a_total{code=\"200\",route=\"/x\"} 3\n"
      "a_total{code=\"500\",route=\"q\\\"\\\\\\n\"} 1e3\n"
      "# TYPE h histogram\n"
      "h_bucket{le=\"0.5\"} 1\n"
      "h_bucket{le=\"+Inf\"} 2\n"
      "h_sum 0.7\n"
      "h_count 2\n"
      "# TYPE g gauge\n"
      "g NaN\n"
      "# TYPE s summary\n"
      "s{quantile=\"0.5\"} Nan\n"
      "s_sum 0\n"
      "s_count 0\n";
  absl::StatusOr<PromText> ok = ParsePrometheus(valid);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->Value("a_total", {{"code", "200"}}), 3);
  EXPECT_EQ(ok->Value("a_total", {{"route", "q\"\\\n"}}), 1000);
  for (const std::string& bad : {
           std::string("a 1\n"),                                             // no TYPE
           std::string("# TYPE a counter\na 1"),                             // no final newline
           std::string("# TYPE a counter\na{x=\"1\" 1\n"),                  // unterminated labels
           std::string("# TYPE a counter\na{x=\"\\q\"} 1\n"),               // bad escape
           std::string("# TYPE a counter\na{1x=\"1\"} 1\n"),                // bad label name
           std::string("# TYPE a counter\na one\n"),                         // bad value
           std::string("# TYPE a counter\na 0x1p-2\n"),                      // hex float
           std::string("# TYPE a counter\na 1\na 2\n"),                      // duplicate series
           std::string("# TYPE a wibble\na 1\n"),                            // unknown type
           std::string("# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n"),  // no +Inf
           std::string("# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 1\n"),
           std::string("# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n"),  // no _sum
           std::string("# TYPE a gauge\n# TYPE b gauge\na 1\nb 1\na{x=\"y\"} 1\n"),  // split
           std::string("# TYPE 9a gauge\n9a 1\n"),                           // bad name
       }) {
    EXPECT_FALSE(ParsePrometheus(bad).ok()) << "accepted: " << bad;
  }
}

// ---------------------------------------------------------------------------------------------

class OperatorTest : public ::testing::Test {
 protected:
  // `metrics`: give every process a metrics listener on an ephemeral port (read it with
  // MetricsPort). Off otherwise: a metrics listener makes each process take ~1.5-2 s longer to
  // exit on SIGTERM (prometheus-cpp's exposer), which would triple the time of every test.
  void StartCluster(int keys, ClusterOptions options = {}, bool metrics = false) {
    keys_ = MakeKeys(keys);
    if (options.key_lines.empty()) options.key_lines = keys_;
    const char* listen = metrics ? "127.0.0.1:0" : "off";
    options.dataplane_env.emplace("SFLB_METRICS_LISTEN", listen);
    options.controlplane_env.emplace("SFLB_METRICS_LISTEN", listen);
    absl::Status s = cluster_.Start(options);
    ASSERT_TRUE(s.ok()) << s;
  }

  void TearDown() override {
    // No secret may ever reach a log or the audit log.
    std::string logs = cluster_.AllLogs();
    for (const std::string& path : extra_scanned_files_) logs += ReadFile(path);
    if (!cluster_.dir().empty()) {
      logs += ReadFile(cluster_.dir() + "/sflb-audit.jsonl");
      logs += ReadFile(cluster_.dir() + "/sflb-state.json");
    }
    for (const std::string& key : keys_) {
      EXPECT_THAT(logs, Not(HasSubstr(key))) << "an upstream key leaked (fingerprint "
                                             << KeyFingerprint(key) << ")";
    }
    EXPECT_THAT(logs, Not(HasSubstr(kUserKey)));
    EXPECT_THAT(logs, Not(HasSubstr(kAdminKey)));
  }

  httplib::Result Get(const std::string& path, Auth auth, int dp = 0) {
    return cluster_.Client(dp)->Get(path, Headers(auth));
  }
  httplib::Result Post(const std::string& path, Auth auth, int dp = 0) {
    return cluster_.Client(dp)->Post(path, Headers(auth), "", "application/json");
  }
  httplib::Result Chat(int dp = 0, httplib::Headers extra = {}, bool stream = false) {
    httplib::Headers headers = Headers(Auth::kUser);
    for (const auto& h : extra) headers.insert(h);
    return cluster_.Client(dp)->Post("/v1/chat/completions", headers, ChatBody(stream),
                                     "application/json");
  }

  // GET `path` and parse the JSON body; fails the test on a transport error or non-JSON.
  json GetJson(const std::string& path, Auth auth = Auth::kUser, int expected_status = 200,
               int dp = 0) {
    auto res = Get(path, auth, dp);
    EXPECT_TRUE(res) << path;
    if (!res) return nullptr;
    EXPECT_EQ(res->status, expected_status) << path << ": " << res->body;
    EXPECT_TRUE(absl::StartsWith(res->get_header_value("Content-Type"), "application/json"))
        << path << ": " << res->get_header_value("Content-Type");
    json body = json::parse(res->body, nullptr, false);
    EXPECT_TRUE(body.is_object()) << path << ": " << res->body;
    return body;
  }

  // Polls `probe` every 20 ms until it returns true or `timeout` passes.
  static bool WaitUntil(const std::function<bool()>& probe,
                        absl::Duration timeout = absl::Seconds(10)) {
    absl::Time deadline = absl::Now() + timeout;
    for (;;) {
      if (probe()) return true;
      if (absl::Now() > deadline) return false;
      absl::SleepFor(absl::Milliseconds(20));
    }
  }

  // The controlplane's state name ("KEY_STATE_INVALID", ...) of key `i`.
  std::string CpState(size_t i) {
    CommandResult r = cluster_.Ctl({"stats", "--json"});
    json stats = json::parse(r.out, nullptr, false);
    if (!stats.is_object() || !stats.contains("keys")) return "";
    for (const auto& k : stats["keys"]) {
      if (k.value("fingerprint", "") == KeyFingerprint(keys_[i])) return k.value("state", "");
    }
    return "";
  }

  // Sends chat requests until the controlplane reports key `i` in `state`.
  bool DriveUntilState(size_t i, const std::string& state, int dp = 0) {
    return WaitUntil(
        [&] {
          Chat(dp);
          return CpState(i) == state;
        },
        absl::Seconds(15));
  }

  int MetricsPort(ChildProcess& process) {
    auto line = process.WaitForLog(
        [](const json& j) { return j.value("event", "") == "metrics_listening"; },
        absl::Seconds(5));
    if (!line.ok()) return 0;
    return (*line).value("port", 0);
  }

  // GET /metrics on `port`, checked and parsed.
  absl::StatusOr<PromText> ScrapeMetrics(int port) {
    httplib::Client c("127.0.0.1", port);
    c.set_read_timeout(10, 0);
    auto res = c.Get("/metrics");
    if (!res) return absl::UnavailableError("no answer from /metrics");
    if (res->status != 200) return absl::InternalError(absl::StrCat("HTTP ", res->status));
    if (!absl::StartsWith(res->get_header_value("Content-Type"), "text/plain")) {
      return absl::InternalError(
          absl::StrCat("Content-Type ", res->get_header_value("Content-Type")));
    }
    last_metrics_ = res->body;
    return ParsePrometheus(res->body);
  }

  std::set<std::string> Fingerprints() const {
    std::set<std::string> out;
    for (const auto& k : keys_) out.insert(KeyFingerprint(k));
    return out;
  }

  // Sets the fake's user/info answer for a key.
  void SetAccount(const std::string& key, const json& fields) {
    json body = fields;
    body["key"] = key;
    httplib::Client c("127.0.0.1", cluster_.fake_port());
    auto res = c.Post("/_fake/accounts", body.dump(), "application/json");
    ASSERT_TRUE(res);
    ASSERT_EQ(res->status, 200) << res->body;
  }

  std::vector<std::string> keys_;
  std::vector<std::string> extra_scanned_files_;
  std::string last_metrics_;
  TestCluster cluster_;
};

// ---------------------------------------------------------------------------------------------
// 1. Shapes of every endpoint.

TEST_F(OperatorTest, InfoShape) {
  StartCluster(2);
  json info = GetJson("/info", Auth::kNone);
  EXPECT_EQ(info["name"], "SiliconFlow API Load Balancer");
  ASSERT_TRUE(info["version"].is_string());
  EXPECT_FALSE(info["version"].get<std::string>().empty());
  EXPECT_EQ(info["status"], "running");
  EXPECT_EQ(info["authentication"], "required");
  ASSERT_TRUE(info["endpoints"].is_object()) << info.dump();
  for (const char* path : {"/", "/health", "/stats", "/balance", "/reload-keys"}) {
    ASSERT_TRUE(info["endpoints"].contains(path)) << path << " missing: " << info.dump();
    EXPECT_TRUE(info["endpoints"][path].is_string()) << path;
    EXPECT_FALSE(info["endpoints"][path].get<std::string>().empty()) << path;
  }
  // /info answers without touching the controlplane or the upstream, and reveals no key.
  EXPECT_EQ(cluster_.FakeRequests().size(), 0u);
  for (const auto& k : keys_) {
    EXPECT_THAT(info.dump(), Not(HasSubstr(KeyFingerprint(k))));
  }
}

TEST_F(OperatorTest, StatsRootAndHealthShapesAndRequestCountsGrow) {
  StartCluster(3);
  auto check_key_stats = [&](const json& stats, int64_t* total_requests) {
    ASSERT_TRUE(stats.is_object()) << stats.dump();
    ASSERT_TRUE(stats["totalKeys"].is_number_unsigned()) << stats.dump();
    EXPECT_EQ(stats["totalKeys"], 3);
    ASSERT_TRUE(stats["activeKeys"].is_number_unsigned());
    EXPECT_EQ(stats["activeKeys"], 3);
    ASSERT_TRUE(stats["keyStats"].is_array());
    ASSERT_EQ(stats["keyStats"].size(), 3u);
    *total_requests = 0;
    std::set<std::string> seen;
    for (size_t i = 0; i < 3; ++i) {
      const json& row = stats["keyStats"][i];
      SCOPED_TRACE(row.dump());
      ASSERT_TRUE(row["index"].is_number_integer());
      EXPECT_EQ(row["index"], i + 1) << "index is 1-based, in file order";
      ASSERT_TRUE(row["requestCount"].is_number_integer());
      *total_requests += row["requestCount"].get<int64_t>();
      EXPECT_TRUE(IsIsoOrNever(row["lastUsed"]));
      if (row["requestCount"] == 0) {
        EXPECT_EQ(row["lastUsed"], "Never");
      } else {
        EXPECT_TRUE(IsIso8601(row["lastUsed"]));
      }
      ASSERT_TRUE(row["isActive"].is_boolean());
      EXPECT_TRUE(row["isActive"].get<bool>());
      EXPECT_TRUE(IsIsoOrNever(row["lastBalanceCheck"]));
      // sflb's own fields beside the old ones.
      EXPECT_EQ(row["fingerprint"], KeyFingerprint(keys_[i]));
      seen.insert(row.value("fingerprint", ""));
      EXPECT_TRUE(row["account"].is_string());
      EXPECT_EQ(row["state"], "active");
      ASSERT_TRUE(row["key"].is_string());
      EXPECT_EQ(row["key"], MaskKey(keys_[i]));
      EXPECT_NE(row["key"], keys_[i]);
      for (const char* f : {"promptTokens", "completionTokens", "tokensUsed"}) {
        EXPECT_TRUE(row[f].is_number_unsigned()) << f;
      }
    }
    EXPECT_EQ(seen, Fingerprints());
    for (const auto& k : keys_) EXPECT_THAT(stats.dump(), Not(HasSubstr(k)));
  };

  int64_t total = -1;
  json stats = GetJson("/stats");
  check_key_stats(stats, &total);
  EXPECT_EQ(total, 0);

  constexpr int kRequests = 5;
  for (int i = 0; i < kRequests; ++i) {
    auto res = Chat();
    ASSERT_TRUE(res);
    ASSERT_EQ(res->status, 200) << res->body;
  }
  // Counts reach the controlplane with the next report and /stats within its cache time.
  bool counted = WaitUntil([&] {
    stats = GetJson("/stats");
    int64_t n = 0;
    for (const auto& row : stats["keyStats"]) n += row.value("requestCount", int64_t{0});
    return n == kRequests;
  });
  ASSERT_TRUE(counted) << "requestCount never reached " << kRequests << ": " << stats.dump();
  check_key_stats(stats, &total);
  EXPECT_EQ(total, kRequests);
  // Tokens from the usage objects are counted too.
  bool tokens = WaitUntil([&] {
    stats = GetJson("/stats");
    int64_t prompt = 0;
    for (const auto& row : stats["keyStats"]) prompt += row.value("promptTokens", int64_t{0});
    return prompt == kRequests * kPromptTokens;
  });
  EXPECT_TRUE(tokens) << stats.dump();

  // "/" wraps the same object.
  json root = GetJson("/");
  EXPECT_TRUE(root["message"].is_string());
  EXPECT_FALSE(root["message"].get<std::string>().empty());
  EXPECT_EQ(root["status"], "running");
  check_key_stats(root["stats"], &total);
  EXPECT_EQ(total, kRequests);

  json health = GetJson("/health");
  EXPECT_EQ(health["status"], "healthy") << health.dump();
  EXPECT_TRUE(IsIso8601(health["timestamp"]));
  check_key_stats(health["stats"], &total);
}

TEST_F(OperatorTest, BalanceShape) {
  StartCluster(3);
  json balance = GetJson("/balance");
  EXPECT_EQ(balance["success"], true) << balance.dump();
  EXPECT_TRUE(IsIso8601(balance["timestamp"]));
  EXPECT_TRUE(IsDecimal4(balance["totalBalance"]));
  // The fake's default balance is "10.00" per key.
  EXPECT_EQ(balance["totalBalance"], "30.0000");
  ASSERT_TRUE(balance["keyBalances"].is_array());
  ASSERT_EQ(balance["keyBalances"].size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    const json& row = balance["keyBalances"][i];
    SCOPED_TRACE(row.dump());
    EXPECT_EQ(row["index"], i + 1);
    EXPECT_TRUE(IsDecimal4(row["balance"]));
    EXPECT_EQ(row["balance"], "10.0000");
    EXPECT_TRUE(IsIso8601(row["lastChecked"]));
    ASSERT_TRUE(row["isActive"].is_boolean());
    EXPECT_TRUE(row["isActive"].get<bool>());
    EXPECT_EQ(row["fingerprint"], KeyFingerprint(keys_[i]));
    EXPECT_EQ(row["status"], "ok");
  }
  EXPECT_EQ(balance["available"], true);
  EXPECT_TRUE(balance["message"].is_string());
  for (const auto& k : keys_) EXPECT_THAT(balance.dump(), Not(HasSubstr(k)));
  // The balances were fetched with the pool keys, once each.
  std::set<std::string> fetched;
  for (const auto& r : cluster_.FakeRequests()) {
    if (r.value("path", "") == "/v1/user/info") fetched.insert(KeyFingerprint(r.value("key", "")));
  }
  EXPECT_EQ(fetched, Fingerprints());
  // Afterwards /stats knows the balances (a number, as the old tool had it) and when.
  json stats = GetJson("/stats");
  for (const auto& row : stats["keyStats"]) {
    SCOPED_TRACE(row.dump());
    ASSERT_TRUE(row.contains("balance"));
    EXPECT_TRUE(row["balance"].is_number());
    EXPECT_DOUBLE_EQ(row["balance"].get<double>(), 10.0);
    EXPECT_TRUE(IsIso8601(row["lastBalanceCheck"]));
  }
}

// httplib dispatches every POST to the content-reader handlers first, and the catch-all proxy
// route (POST "/.*" with a ContentReader) is one of them: POST /reload-keys never reaches its
// own handler. It is proxied to the upstream as POST /v1/reload-keys with a pool key, whatever
// key the client sent (a user key gets the upstream's answer instead of 403), and no reload
// happens.
TEST_F(OperatorTest, PostReloadKeysReloadsAndIsNeverProxied) {
  std::string audit_path = MakeTempDir("audit") + "/audit.jsonl";
  extra_scanned_files_.push_back(audit_path);
  ClusterOptions options;
  options.controlplane_env = {{"SFLB_AUDIT_LOG", audit_path}, {"SFLB_KEYS_FILE_POLL", "0"}};
  StartCluster(3, options);
  std::vector<std::string> added = MakeKeys(1);
  WriteFileAtomically(cluster_.keys_file(), absl::StrJoin(keys_, "\n") + "\n" + added[0] + "\n");
  keys_.push_back(added[0]);

  // The user key may not reload.
  auto res = Post("/reload-keys", Auth::kUser);
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 403) << res->body;
  json body = json::parse(res->body, nullptr, false);
  EXPECT_TRUE(body.is_object() && body["error"] == "Forbidden" && body["message"].is_string())
      << res->body;

  // The admin key reloads, in the old tool's shape.
  res = Post("/reload-keys", Auth::kAdmin);
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200) << res->body;
  body = json::parse(res->body, nullptr, false);
  ASSERT_TRUE(body.is_object()) << res->body;
  EXPECT_TRUE(IsIso8601(body["timestamp"])) << res->body;
  EXPECT_EQ(body["success"], true) << res->body;
  EXPECT_EQ(body["message"], "Successfully reloaded API keys. Previous: 3, New: 4") << res->body;
  EXPECT_TRUE(body["keyCount"].is_number_integer()) << res->body;
  EXPECT_EQ(body["keyCount"], 4) << res->body;
  EXPECT_THAT(res->body, Not(HasSubstr(added[0])));

  int proxied = 0;
  for (const auto& r : cluster_.FakeRequests()) proxied += r.value("path", "") == "/v1/reload-keys";
  EXPECT_EQ(proxied, 0) << "POST /reload-keys was proxied to the upstream " << proxied << " times";
  EXPECT_TRUE(cluster_.WaitForKeyCount(0, 4, absl::Seconds(3)).ok()) << "no reload happened";
  // The reload is audited with the replica that asked for it.
  std::string audit = ReadFile(audit_path);
  bool audited = false;
  for (absl::string_view line : absl::StrSplit(audit, '\n', absl::SkipEmpty())) {
    json e = json::parse(line, nullptr, false);
    audited = audited || (e.is_object() && e["type"] == "reload" &&
                          absl::StrContains(e["details"].value("reason", ""), "dp-0"));
  }
  EXPECT_TRUE(audited) << audit;
}

// Same cause as above: a failed reload must answer success:false with the reason, keep the keys.
TEST_F(OperatorTest, FailedPostReloadKeysAnswersSuccessFalseAndKeepsTheKeys) {
  ClusterOptions options;
  options.controlplane_env = {{"SFLB_KEYS_FILE_POLL", "0"}};
  StartCluster(2, options);
  WriteFileAtomically(cluster_.keys_file(), "bad key with spaces\n");
  auto res = Post("/reload-keys", Auth::kAdmin);
  ASSERT_TRUE(res);
  json body = json::parse(res->body, nullptr, false);
  ASSERT_TRUE(body.is_object()) << res->body;
  EXPECT_EQ(body["success"], false) << res->body;
  EXPECT_TRUE(IsIso8601(body["timestamp"])) << res->body;
  EXPECT_THAT(body.value("message", ""), HasSubstr("keys.txt:1")) << res->body;
  EXPECT_EQ(body["keyCount"], 2) << res->body;
  EXPECT_TRUE(cluster_.WaitForKeyCount(0, 2).ok());
}

TEST_F(OperatorTest, LivezAndReadyz) {
  StartCluster(1);
  for (const char* path : {"/livez", "/readyz"}) {
    auto res = Get(path, Auth::kNone);
    ASSERT_TRUE(res) << path;
    EXPECT_EQ(res->status, 200) << path;
    // They reveal nothing: a short plain word.
    EXPECT_LT(res->body.size(), 32u) << res->body;
    EXPECT_THAT(res->body, Not(HasSubstr(KeyFingerprint(keys_[0]))));
  }
}

TEST_F(OperatorTest, ReadyzFailsWhileDrainingAndLivezDoesNot) {
  ClusterOptions options;
  options.dataplane_env = {{"SFLB_DRAIN_GRACE", "1s"}};
  StartCluster(1, options);
  cluster_.dataplane(0).Signal(SIGTERM);
  int status = 0;
  std::string body;
  bool not_ready = WaitUntil([&] {
    auto ready = Get("/readyz", Auth::kNone);
    status = ready ? ready->status : 0;
    body = ready ? ready->body : "";
    return status == 503;
  }, absl::Seconds(1));
  ASSERT_TRUE(not_ready) << "readyz kept answering " << status;
  EXPECT_LT(body.size(), 32u) << body;
  // Still alive and still serving during the grace.
  auto live = Get("/livez", Auth::kNone);
  ASSERT_TRUE(live);
  EXPECT_EQ(live->status, 200);
  auto res = Get("/v1/models", Auth::kUser);
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
}

// ---------------------------------------------------------------------------------------------
// 2. Auth levels per endpoint.

TEST_F(OperatorTest, AuthLevelsPerEndpoint) {
  StartCluster(2);
  struct Endpoint {
    std::string method;
    std::string path;
    bool legacy;
  };
  const std::vector<Endpoint> guarded = {{"GET", "/", true},          {"GET", "/stats", true},
                                         {"GET", "/health", true},    {"GET", "/balance", true},
                                         {"POST", "/reload-keys", true}, {"GET", "/v1/models", false},
                                         {"POST", "/v1/chat/completions", false}};
  auto call = [&](const Endpoint& e, Auth auth) {
    httplib::Headers h = Headers(auth);
    if (e.method == "GET") return cluster_.Client()->Get(e.path, h);
    return cluster_.Client()->Post(e.path, h, e.legacy ? "" : ChatBody(), "application/json");
  };
  for (const Endpoint& e : guarded) {
    for (Auth auth : {Auth::kNone, Auth::kWrong}) {
      SCOPED_TRACE(absl::StrCat(e.method, " ", e.path, " with ", AuthName(auth)));
      auto res = call(e, auth);
      ASSERT_TRUE(res);
      EXPECT_EQ(res->status, 401);
      json body = json::parse(res->body, nullptr, false);
      ASSERT_TRUE(body.is_object()) << res->body;
      if (e.legacy) {
        // The old tool's shape.
        EXPECT_EQ(body["error"], "Unauthorized") << res->body;
        EXPECT_TRUE(body["message"].is_string()) << res->body;
      } else {
        ASSERT_TRUE(body["error"].is_object()) << res->body;
        EXPECT_EQ(body["error"]["code"], "invalid_api_key");
        EXPECT_TRUE(body["error"]["message"].is_string());
        EXPECT_TRUE(body["error"]["type"].is_string());
      }
    }
  }
  EXPECT_EQ(cluster_.FakeRequests().size(), 0u) << "an unauthenticated request reached upstream";

  // POST /reload-keys with the user key (403) and the admin key (200): see
  // PostReloadKeysReloadsAndIsNeverProxied.
  for (const Endpoint& e : guarded) {
    if (e.path == "/reload-keys") continue;
    SCOPED_TRACE(absl::StrCat(e.method, " ", e.path, " with the user key"));
    auto res = call(e, Auth::kUser);
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 200) << res->body;
  }
  for (const Endpoint& e : guarded) {
    if (e.path == "/reload-keys") continue;
    SCOPED_TRACE(absl::StrCat(e.method, " ", e.path, " with the admin key"));
    auto res = call(e, Auth::kAdmin);
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 200) << res->body;
  }
  for (const char* path : {"/info", "/livez", "/readyz"}) {
    for (Auth auth : {Auth::kNone, Auth::kWrong, Auth::kUser}) {
      auto res = Get(path, auth);
      ASSERT_TRUE(res);
      EXPECT_EQ(res->status, 200) << path << " with " << AuthName(auth);
    }
  }
}

TEST_F(OperatorTest, UpstreamUserInfoIsForAdminsOnly) {
  StartCluster(2);
  for (const char* path : {"/v1/user/info", "/user/info", "/v1/user/info?x=1", "/v1/user/info/"}) {
    auto res = Get(path, Auth::kUser);
    ASSERT_TRUE(res) << path;
    EXPECT_EQ(res->status, 403) << path << ": " << res->body;
    json body = json::parse(res->body, nullptr, false);
    ASSERT_TRUE(body.is_object()) << res->body;
    ASSERT_TRUE(body["error"].is_object()) << res->body;  // OpenAI shape
    EXPECT_TRUE(body["error"]["message"].is_string());
    EXPECT_TRUE(body["error"]["type"].is_string());
    EXPECT_TRUE(body["error"]["code"].is_string());
  }
  EXPECT_EQ(cluster_.FakeRequests().size(), 0u) << "user/info reached the upstream for a user";

  auto res = Get("/v1/user/info", Auth::kAdmin);
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200) << res->body;
  json body = json::parse(res->body, nullptr, false);
  ASSERT_TRUE(body.is_object()) << res->body;
  EXPECT_EQ(body["code"], 20000);
  EXPECT_EQ(body["data"]["totalBalance"], "10.00");
  json requests = cluster_.FakeRequests();
  ASSERT_EQ(requests.size(), 1u);
  EXPECT_EQ(requests[0]["path"], "/v1/user/info");
  EXPECT_EQ(Fingerprints().count(KeyFingerprint(requests[0].value("key", ""))), 1u)
      << "forwarded with something other than a pool key";
}

// RFC 3986 normalization as HTTP servers apply it before routing (nginx: $uri): merge slashes,
// drop "." segments, resolve ".." segments. (The fake has already percent-decoded the path.)
std::string NormalizePath(absl::string_view path) {
  std::vector<std::string> out;
  for (absl::string_view seg : absl::StrSplit(path, '/', absl::SkipEmpty())) {
    if (seg == ".") continue;
    if (seg == "..") {
      if (!out.empty()) out.pop_back();
      continue;
    }
    out.emplace_back(seg);
  }
  return "/" + absl::StrJoin(out, "/");
}

// The guard compares the raw request target with "/user/info"; the upstream decodes
// percent-escapes ("%69" is "i", RFC 3986 6.2.2.2) and normalizes the path before routing, and
// so serves a pool key's user/info to a user-key holder.
TEST_F(OperatorTest, UserInfoGuardHoldsForEncodedAndUnnormalizedPaths) {
  StartCluster(2);
  std::vector<std::string> leaked;
  for (const char* path : {"/v1/user/%69nfo", "/v1/%75ser/info", "/v1/user%2Finfo",
                           "/v1/user/inf%6F", "/v1//user/info", "/v1/user/./info",
                           "/v1/x/../user/info", "//v1/user/info"}) {
    uint64_t mark = 0;
    json before = cluster_.FakeRequests();
    if (!before.empty()) mark = before.back()["seq"].get<uint64_t>();
    auto res = Get(path, Auth::kUser);
    ASSERT_TRUE(res) << path;
    for (const auto& r : cluster_.FakeRequests(mark)) {
      if (NormalizePath(r.value("path", "")) == "/v1/user/info") {
        leaked.push_back(absl::StrCat(path, " -> forwarded as ", r.value("target", ""),
                                      "; client got HTTP ", res->status, " ",
                                      res->body.substr(0, 60)));
      }
    }
  }
  EXPECT_TRUE(leaked.empty()) << "user/info reached the upstream for a user-key holder:\n"
                              << absl::StrJoin(leaked, "\n");
}

// ---------------------------------------------------------------------------------------------
// 3. /health reflects reality.

TEST_F(OperatorTest, HealthIsDegradedWithoutTheControlplane) {
  StartCluster(2);
  json health = GetJson("/health");
  EXPECT_EQ(health["status"], "healthy") << health.dump();
  cluster_.controlplane().Signal(SIGKILL);
  ASSERT_TRUE(cluster_.controlplane().Wait(absl::Seconds(10)).ok());
  bool degraded = WaitUntil([&] {
    health = GetJson("/health");
    return health["status"] == "degraded";
  });
  EXPECT_TRUE(degraded) << health.dump();
  EXPECT_TRUE(IsIso8601(health["timestamp"]));
  EXPECT_EQ(health["replica"]["controlplaneConnected"], false) << health.dump();
  // The stats come from the replica's own snapshot now, in the same shape.
  ASSERT_TRUE(health["stats"].is_object());
  EXPECT_EQ(health["stats"]["totalKeys"], 2);
  EXPECT_EQ(health["stats"]["activeKeys"], 2);
  ASSERT_EQ(health["stats"]["keyStats"].size(), 2u) << health.dump();
  for (size_t i = 0; i < 2; ++i) {
    const json& row = health["stats"]["keyStats"][i];
    EXPECT_EQ(row["index"], i + 1);
    EXPECT_EQ(row["fingerprint"], KeyFingerprint(keys_[i]));
    EXPECT_EQ(row["isActive"], true);
    EXPECT_TRUE(row["requestCount"].is_number_integer());
    EXPECT_TRUE(IsIsoOrNever(row["lastUsed"]));
  }
  // Still serving.
  auto res = Chat();
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  // (Reconnection after a controlplane restart is covered by the core tests; it takes several
  // seconds of gRPC reconnect backoff.)
}

TEST_F(OperatorTest, HealthIsDegradedWithFewUsableKeysAndUnhealthyWithNone) {
  StartCluster(4);
  EXPECT_EQ(GetJson("/health")["status"], "healthy");
  // Three of four keys invalid: fewer than half usable.
  for (int i = 0; i < 3; ++i) {
    cluster_.AddFault({{"key", keys_[i]}, {"action", "status"}, {"status", 401}, {"times", -1}});
  }
  for (size_t i = 0; i < 3; ++i) {
    ASSERT_TRUE(DriveUntilState(i, "KEY_STATE_INVALID")) << "key " << i << " never marked";
  }
  json health;
  bool degraded = WaitUntil([&] {
    health = GetJson("/health");
    return health["status"] == "degraded";
  });
  EXPECT_TRUE(degraded) << health.dump();
  // Every key invalid.
  cluster_.AddFault({{"key", keys_[3]}, {"action", "status"}, {"status", 401}, {"times", -1}});
  ASSERT_TRUE(DriveUntilState(3, "KEY_STATE_INVALID"));
  // The stats inside come from the controlplane through a short cache: wait for both.
  bool unhealthy = WaitUntil([&] {
    health = GetJson("/health");
    return health["status"] == "unhealthy" && health["stats"]["activeKeys"] == 0;
  });
  EXPECT_TRUE(unhealthy) << health.dump();
  EXPECT_EQ(health["replica"]["usableKeys"], 0);
  for (const auto& row : health["stats"]["keyStats"]) {
    EXPECT_EQ(row["state"], "invalid") << row.dump();
    EXPECT_EQ(row["isActive"], false) << row.dump();
  }
  auto res = Chat();
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 503);
}

// ---------------------------------------------------------------------------------------------
// 4. Balances.

TEST_F(OperatorTest, BalanceAggregatesOkUnavailableAndFailingKeys) {
  StartCluster(4);
  SetAccount(keys_[0], {{"account", "acct-one"}, {"balance", "1.50"}});
  SetAccount(keys_[1], {{"account", "acct-two"}, {"balance", "2.25"}});
  SetAccount(keys_[2], {{"status", 410}});
  SetAccount(keys_[3], {{"status", 500}});
  json b = GetJson("/balance?refresh=true");
  EXPECT_EQ(b["success"], true) << b.dump();
  EXPECT_TRUE(IsIso8601(b["timestamp"]));
  EXPECT_EQ(b["totalBalance"], "3.7500") << b.dump();
  ASSERT_EQ(b["keyBalances"].size(), 4u) << b.dump();
  const char* balances[] = {"1.5000", "2.2500", "0.0000", "0.0000"};
  const char* statuses[] = {"ok", "ok", "unavailable", "error"};
  for (size_t i = 0; i < 4; ++i) {
    const json& row = b["keyBalances"][i];
    SCOPED_TRACE(row.dump());
    EXPECT_EQ(row["index"], i + 1);
    EXPECT_EQ(row["balance"], balances[i]);
    EXPECT_EQ(row["status"], statuses[i]);
    EXPECT_TRUE(IsIso8601(row["lastChecked"]));
    EXPECT_EQ(row["isActive"], true);
    EXPECT_EQ(row["fingerprint"], KeyFingerprint(keys_[i]));
  }
  EXPECT_EQ(b["keyBalances"][0]["accountId"], "acct-one");
  EXPECT_EQ(b["keyBalances"][1]["accountId"], "acct-two");
  EXPECT_TRUE(b["keyBalances"][2]["error"].is_string());
  EXPECT_THAT(b["keyBalances"][3].value("error", ""), HasSubstr("500"));
  EXPECT_EQ(b["available"], true);
  EXPECT_TRUE(b["message"].is_string());
  // One balance request per key was made, each with its own key.
  std::map<std::string, int> fetched;
  for (const auto& r : cluster_.FakeRequests()) {
    if (r.value("path", "") == "/v1/user/info") fetched[KeyFingerprint(r.value("key", ""))]++;
  }
  EXPECT_EQ(fetched.size(), 4u);
  for (const auto& [fp, n] : fetched) EXPECT_EQ(n, 1) << fp;
  // The keys keep serving: a failing balance check is not a key failure.
  for (int i = 0; i < 4; ++i) {
    auto res = Chat();
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 200);
  }

  // The endpoint retired for every key: still 200 and success, but unavailable, and said so.
  for (const auto& k : keys_) SetAccount(k, {{"status", 410}});
  b = GetJson("/balance?refresh=true");
  EXPECT_EQ(b["success"], true) << b.dump();
  EXPECT_EQ(b["available"], false) << b.dump();
  EXPECT_EQ(b["totalBalance"], "0.0000");
  EXPECT_THAT(absl::AsciiStrToLower(b.value("message", "")), HasSubstr("unavailable"));
  for (const auto& row : b["keyBalances"]) {
    EXPECT_EQ(row["status"], "unavailable") << row.dump();
    EXPECT_EQ(row["balance"], "0.0000") << row.dump();
  }
  EXPECT_EQ(GetJson("/health")["status"], "healthy");
  // sflbctl says the same.
  CommandResult ctl = cluster_.Ctl({"balance", "--json"});
  ASSERT_EQ(ctl.exit_code, 0) << ctl.err;
  json from_ctl = json::parse(ctl.out, nullptr, false);
  ASSERT_TRUE(from_ctl.is_object()) << ctl.out;
  EXPECT_EQ(from_ctl.value("unavailable", false), true) << ctl.out;
  for (const auto& k : keys_) EXPECT_THAT(ctl.out, Not(HasSubstr(k)));
}

TEST_F(OperatorTest, BalanceWithoutRefreshIsServedFromTheCache) {
  StartCluster(2);
  SetAccount(keys_[0], {{"balance", "1.00"}});
  json b = GetJson("/balance");
  EXPECT_EQ(b["totalBalance"], "11.0000") << b.dump();
  SetAccount(keys_[0], {{"balance", "5.00"}});
  b = GetJson("/balance");
  EXPECT_EQ(b["totalBalance"], "11.0000") << "a cached balance was not served: " << b.dump();
  b = GetJson("/balance?refresh=true");
  EXPECT_EQ(b["totalBalance"], "15.0000") << b.dump();
  int fetches = 0;
  for (const auto& r : cluster_.FakeRequests()) fetches += r.value("path", "") == "/v1/user/info";
  EXPECT_EQ(fetches, 4);
}

TEST_F(OperatorTest, KeyAtOrBelowTheThresholdIsDepletedAndGetsNoTraffic) {
  ClusterOptions options;
  options.controlplane_env = {{"SFLB_DEPLETED_THRESHOLD", "1.0"}};
  StartCluster(3, options);
  SetAccount(keys_[1], {{"balance", "0.50"}});
  json b = GetJson("/balance?refresh=true");
  EXPECT_EQ(b["keyBalances"][1]["balance"], "0.5000") << b.dump();
  json stats;
  bool depleted = WaitUntil([&] {
    stats = GetJson("/stats");
    return stats["keyStats"][1]["state"] == "depleted";
  });
  ASSERT_TRUE(depleted) << stats.dump();
  EXPECT_EQ(stats["keyStats"][1]["isActive"], false);
  EXPECT_EQ(stats["activeKeys"], 2);
  EXPECT_EQ(stats["keyStats"][0]["state"], "active");
  EXPECT_EQ(stats["keyStats"][2]["state"], "active");
  // Once the dataplane's snapshot has it, no more traffic to the depleted key.
  ASSERT_TRUE(WaitUntil([&] { return GetJson("/health")["replica"]["usableKeys"] == 2; }));
  json before = cluster_.FakeRequests();
  uint64_t mark = before.empty() ? 0 : before.back()["seq"].get<uint64_t>();
  for (int i = 0; i < 12; ++i) {
    auto res = Chat();
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 200);
  }
  int to_depleted = 0, chats = 0;
  for (const auto& r : cluster_.FakeRequests(mark)) {
    if (r.value("path", "") != "/v1/chat/completions") continue;
    ++chats;
    to_depleted += KeyFingerprint(r.value("key", "")) == KeyFingerprint(keys_[1]);
  }
  EXPECT_EQ(chats, 12);
  EXPECT_EQ(to_depleted, 0) << "a depleted key still got traffic";
  // The change is audited (default audit log: beside the keys file).
  std::string audit = ReadFile(cluster_.dir() + "/sflb-audit.jsonl");
  bool found = false;
  for (absl::string_view line : absl::StrSplit(audit, '\n', absl::SkipEmpty())) {
    json e = json::parse(line, nullptr, false);
    found = found || (e.is_object() && e["type"] == "key_state" &&
                      e["details"].value("key", "") == KeyFingerprint(keys_[1]) &&
                      e["details"].value("to", "") == "KEY_STATE_DEPLETED");
  }
  EXPECT_TRUE(found) << audit;
}

// ---------------------------------------------------------------------------------------------
// 5. Audit log.

// Parses a JSON Lines audit file strictly: every line an object with the five fields, seq
// increasing by one. Returns the entries; records failures.
std::vector<json> ReadAuditFile(const std::string& path) {
  std::string text = ReadFile(path);
  std::vector<json> entries;
  EXPECT_FALSE(text.empty()) << path;
  if (text.empty()) return entries;
  EXPECT_EQ(text.back(), '\n') << "torn last line in " << path;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (line.empty()) continue;
    json e = json::parse(line, nullptr, false);
    EXPECT_TRUE(e.is_object()) << "not a JSON object: " << line;
    if (!e.is_object()) continue;
    EXPECT_TRUE(e["seq"].is_number_unsigned()) << line;
    EXPECT_TRUE(IsIso8601(e["ts"])) << line;
    EXPECT_TRUE(e["type"].is_string()) << line;
    EXPECT_TRUE(e["actor"].is_string()) << line;
    EXPECT_TRUE(e["details"].is_object()) << line;
    if (!entries.empty() && e["seq"].is_number_unsigned()) {
      EXPECT_EQ(e["seq"].get<uint64_t>(), entries.back()["seq"].get<uint64_t>() + 1)
          << "seq not consecutive at " << line;
    }
    entries.push_back(std::move(e));
  }
  if (!entries.empty()) {
    EXPECT_EQ(entries.front()["seq"], 1);
  }
  return entries;
}

const json* FindEntry(const std::vector<json>& entries,
                      const std::function<bool(const json&)>& predicate) {
  for (const json& e : entries) {
    if (predicate(e)) return &e;
  }
  return nullptr;
}

TEST_F(OperatorTest, AuditRecordsEveryAdminActionDurablyAcrossAKill9) {
  std::string audit_dir = MakeTempDir("audit");
  std::string audit_path = audit_dir + "/audit.jsonl";
  extra_scanned_files_.push_back(audit_path);
  ClusterOptions options;
  options.controlplane_env = {{"SFLB_AUDIT_LOG", audit_path}, {"SFLB_KEYS_FILE_POLL", "0"}};
  StartCluster(3, options);

  // A key found invalid by dataplane dp-0.
  cluster_.AddFault({{"key", keys_[2]}, {"action", "status"}, {"status", 401}, {"times", -1}});
  ASSERT_TRUE(DriveUntilState(2, "KEY_STATE_INVALID"));
  // A reload that adds one key and removes another.
  std::vector<std::string> added = MakeKeys(1);
  WriteFileAtomically(cluster_.keys_file(),
                      absl::StrCat(keys_[0], "\n", keys_[2], "\n", added[0], "\n"));
  std::string removed_fp = KeyFingerprint(keys_[1]);
  keys_.push_back(added[0]);
  CommandResult reload = cluster_.Ctl({"reload"});
  ASSERT_EQ(reload.exit_code, 0) << reload.err;
  // A failed admin authentication.
  CommandResult wrong = cluster_.Ctl({"stats"}, {{"LB_ADMIN_KEY", "wrong-admin-key"}});
  EXPECT_EQ(wrong.exit_code, 4) << wrong.err;
  // Disabling a key; the controlplane dies the moment the call has returned.
  CommandResult disable = cluster_.Ctl({"keys", "disable", "0"});
  cluster_.controlplane().Signal(SIGKILL);
  ASSERT_EQ(disable.exit_code, 0) << disable.err;
  ASSERT_TRUE(cluster_.controlplane().Wait(absl::Seconds(10)).ok());

  std::vector<json> entries = ReadAuditFile(audit_path);
  ASSERT_FALSE(entries.empty());
  std::string text = ReadFile(audit_path);
  EXPECT_EQ(entries.front()["type"], "start");

  // The 401: who reported it, from and to.
  const json* invalid = FindEntry(entries, [&](const json& e) {
    return e["type"] == "key_state" && e["details"].value("key", "") == KeyFingerprint(keys_[2]) &&
           e["details"].value("to", "") == "KEY_STATE_INVALID";
  });
  ASSERT_NE(invalid, nullptr) << text;
  EXPECT_EQ((*invalid)["actor"], "dataplane:dp-0");
  EXPECT_EQ((*invalid)["details"]["from"], "KEY_STATE_ACTIVE");
  EXPECT_TRUE((*invalid)["details"]["reason"].is_string());
  // The reload with its fingerprints.
  const json* reloaded = FindEntry(entries, [](const json& e) { return e["type"] == "reload"; });
  ASSERT_NE(reloaded, nullptr) << text;
  EXPECT_EQ((*reloaded)["details"]["result"], "ok");
  EXPECT_EQ((*reloaded)["details"]["added"], json::array({KeyFingerprint(added[0])}));
  EXPECT_EQ((*reloaded)["details"]["removed"], json::array({removed_fp}));
  EXPECT_EQ((*reloaded)["details"]["previous"], 3);
  EXPECT_EQ((*reloaded)["details"]["new"], 3);
  EXPECT_THAT((*reloaded)["actor"].get<std::string>(), HasSubstr("127.0.0.1"));
  // The failed authentication.
  const json* failed = FindEntry(entries, [](const json& e) { return e["type"] == "auth_failed"; });
  ASSERT_NE(failed, nullptr) << text;
  EXPECT_EQ((*failed)["details"]["method"], "GetStats");
  EXPECT_THAT((*failed)["actor"].get<std::string>(), HasSubstr("127.0.0.1"));
  // Admin calls (the dataplanes' and sflbctl's GetStats).
  EXPECT_NE(FindEntry(entries, [](const json& e) {
              return e["type"] == "admin_call" && e["details"].value("method", "") == "GetStats";
            }),
            nullptr)
      << text;
  // The disable, acknowledged and therefore on disk before the kill.
  const json* disabled = FindEntry(entries, [&](const json& e) {
    return e["type"] == "key_state" && e["details"].value("key", "") == KeyFingerprint(keys_[0]) &&
           e["details"].value("to", "") == "KEY_STATE_DISABLED";
  });
  ASSERT_NE(disabled, nullptr) << "an acknowledged disable is not in the audit log:\n" << text;
  EXPECT_EQ((*disabled)["details"]["action"], "KEY_ACTION_DISABLE");
  EXPECT_EQ((*disabled)["details"]["from"], "KEY_STATE_ACTIVE");
  EXPECT_THAT((*disabled)["actor"].get<std::string>(), HasSubstr("admin@"));
  // Order: invalid < reload < auth_failed < disable.
  EXPECT_LT((*invalid)["seq"], (*reloaded)["seq"]);
  EXPECT_LT((*reloaded)["seq"], (*failed)["seq"]);
  EXPECT_LT((*failed)["seq"], (*disabled)["seq"]);
  uint64_t last_seq = entries.back()["seq"].get<uint64_t>();
  // (entries is re-read below: keep the seqs, not pointers into it.)
  const std::vector<uint64_t> first_run_seqs = {
      (*invalid)["seq"].get<uint64_t>(), (*reloaded)["seq"].get<uint64_t>(),
      (*failed)["seq"].get<uint64_t>(), (*disabled)["seq"].get<uint64_t>(), last_seq};

  // Restart: the log stays valid JSON Lines and seq continues.
  ASSERT_TRUE(cluster_.StartControlplane().ok());
  CommandResult enable = cluster_.Ctl({"keys", "enable", "0"});
  ASSERT_EQ(enable.exit_code, 0) << enable.err;
  entries = ReadAuditFile(audit_path);
  text = ReadFile(audit_path);
  const json* restarted = FindEntry(entries, [&](const json& e) {
    return e["type"] == "start" && e["seq"].get<uint64_t>() > last_seq;
  });
  ASSERT_NE(restarted, nullptr) << text;
  const uint64_t restarted_seq = (*restarted)["seq"].get<uint64_t>();
  EXPECT_EQ(restarted_seq, last_seq + 1) << "seq did not continue after the restart";
  EXPECT_NE(FindEntry(entries, [&](const json& e) {
              return e["type"] == "key_state" && e["seq"].get<uint64_t>() > last_seq &&
                     e["details"].value("to", "") == "KEY_STATE_ACTIVE" &&
                     e["details"].value("key", "") == KeyFingerprint(keys_[0]);
            }),
            nullptr)
      << text;
  for (const auto& k : keys_) EXPECT_THAT(text, Not(HasSubstr(k)));
  EXPECT_THAT(text, Not(HasSubstr(kAdminKey)));
  EXPECT_THAT(text, Not(HasSubstr("wrong-admin-key")));

  // sflbctl audit, once it exists, returns the same entries.
  CommandResult help = cluster_.Ctl({"help"});
  if (!absl::StrContains(help.out + help.err, "\n  audit")) {
    std::cout << "[ NOTE     ] sflbctl has no 'audit' command yet; checked the file only\n";
    return;
  }
  CommandResult audit = cluster_.Ctl({"audit", "--json", "--limit", "1000"});
  ASSERT_EQ(audit.exit_code, 0) << audit.err;
  std::vector<json> listed;
  json whole = json::parse(audit.out, nullptr, false);
  auto add = [&listed](const json& e) {
    listed.push_back(e.is_string() ? json::parse(e.get<std::string>(), nullptr, false) : e);
  };
  if (whole.is_array()) {
    for (const auto& e : whole) add(e);
  } else if (whole.is_object() && whole.contains("entries")) {
    for (const auto& e : whole["entries"]) add(e);
  } else {
    for (absl::string_view line : absl::StrSplit(audit.out, '\n', absl::SkipEmpty())) {
      add(json::parse(line, nullptr, false));
    }
  }
  std::set<uint64_t> listed_seqs;
  for (const json& e : listed) {
    if (e.is_object() && e["seq"].is_number_unsigned()) listed_seqs.insert(e["seq"].get<uint64_t>());
  }
  std::vector<uint64_t> expected_seqs = first_run_seqs;
  expected_seqs.push_back(restarted_seq);
  for (uint64_t seq : expected_seqs) {
    EXPECT_EQ(listed_seqs.count(seq), 1u) << "sflbctl audit misses seq " << seq << ":\n"
                                          << audit.out;
  }
}

// ---------------------------------------------------------------------------------------------
// 6. Metrics.

TEST_F(OperatorTest, DataplaneMetricsAreValidPrometheusText) {
  StartCluster(2, {}, /*metrics=*/true);
  int port = MetricsPort(cluster_.dataplane(0));
  ASSERT_GT(port, 0) << "no metrics_listening line";
  ASSERT_NE(port, cluster_.dataplane_port(0));
  constexpr int kRequests = 5;
  for (int i = 0; i < kRequests; ++i) {
    auto res = Chat();
    ASSERT_TRUE(res);
    ASSERT_EQ(res->status, 200);
  }
  ASSERT_TRUE(Get("/v1/models", Auth::kUser));
  absl::StatusOr<PromText> m;
  bool ready = WaitUntil([&] {
    m = ScrapeMetrics(port);
    return m.ok() &&
           m->Value("sflb_http_requests_total", {{"code", "200"}, {"route", "/chat/completions"}})
                   .value_or(0) >= kRequests &&
           m->Value("sflb_controlplane_connected") == 1;
  });
  ASSERT_TRUE(m.ok()) << m.status() << "\n" << last_metrics_;
  EXPECT_TRUE(ready) << last_metrics_;
  EXPECT_EQ(m->types["sflb_http_requests_total"], "counter");
  EXPECT_EQ(m->types["sflb_upstream_ttfb_seconds"], "histogram");
  EXPECT_GE(m->Value("sflb_http_requests_total", {{"code", "200"}, {"route", "/chat/completions"}})
                .value_or(0),
            kRequests);
  EXPECT_GE(m->Value("sflb_http_requests_total", {{"code", "200"}, {"route", "/models"}}).value_or(0),
            1);
  EXPECT_GE(m->Value("sflb_upstream_ttfb_seconds_count", {{"route", "/chat/completions"}})
                .value_or(0),
            kRequests);
  EXPECT_TRUE(m->Value("sflb_upstream_ttfb_seconds_bucket", {{"le", "+Inf"}}).has_value());
  EXPECT_TRUE(m->Value("sflb_http_request_duration_seconds_sum").has_value());
  EXPECT_EQ(m->Value("sflb_active_streams"), 0);
  EXPECT_EQ(m->Value("sflb_controlplane_connected"), 1);
  EXPECT_GE(m->Value("sflb_tokens_total", {{"model", kModel}, {"type", "prompt"}}).value_or(0),
            kRequests * kPromptTokens);
  for (const auto& [family, help] : m->help) EXPECT_FALSE(help.empty()) << family;
  for (const auto& k : keys_) {
    EXPECT_THAT(last_metrics_, Not(HasSubstr(k)));
  }
  EXPECT_THAT(last_metrics_, Not(HasSubstr(kUserKey)));

  // A stream in flight shows in sflb_active_streams.
  std::thread stream([&] {
    httplib::Headers h = {{"x-fake-chunks", "10"}, {"x-fake-chunk-delay-ms", "60"}};
    Chat(0, h, /*stream=*/true);
  });
  bool active = WaitUntil([&] {
    m = ScrapeMetrics(port);
    return m.ok() && m->Value("sflb_active_streams") == 1;
  }, absl::Seconds(5));
  stream.join();
  EXPECT_TRUE(active) << last_metrics_;
  bool done = WaitUntil([&] {
    m = ScrapeMetrics(port);
    return m.ok() && m->Value("sflb_active_streams") == 0;
  }, absl::Seconds(5));
  EXPECT_TRUE(done) << last_metrics_;
  // Without the controlplane the gauge drops to 0.
  cluster_.controlplane().Signal(SIGKILL);
  ASSERT_TRUE(cluster_.controlplane().Wait(absl::Seconds(10)).ok());
  bool disconnected = WaitUntil([&] {
    m = ScrapeMetrics(port);
    return m.ok() && m->Value("sflb_controlplane_connected") == 0;
  }, absl::Seconds(5));
  EXPECT_TRUE(disconnected) << last_metrics_;
}

// sflb_http_requests_total ("Client requests by route and HTTP status") only counts requests
// that reach the proxy: the old tool's endpoints (although DataplaneMetrics::RouteLabel names
// "/", "/stats", "/health", "/balance", "/reload-keys" and "/info") and the 401s answered before
// routing never show up, so an operator sees neither dashboard polling nor failed logins.
TEST_F(OperatorTest, RequestsAnsweredBySflbItselfAreCountedInMetrics) {
  StartCluster(1, {}, /*metrics=*/true);
  int port = MetricsPort(cluster_.dataplane(0));
  ASSERT_GT(port, 0);
  for (const char* path : {"/stats", "/health", "/info", "/balance"}) {
    auto res = Get(path, Auth::kUser);
    ASSERT_TRUE(res);
    ASSERT_EQ(res->status, 200) << path;
  }
  auto res = Get("/v1/models", Auth::kWrong);
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 401);
  absl::StatusOr<PromText> m;
  auto count = [&m](const std::map<std::string, std::string>& labels) {
    return m->Value("sflb_http_requests_total", labels).value_or(0);
  };
  bool counted = WaitUntil([&] {
    m = ScrapeMetrics(port);
    return m.ok() && count({{"route", "/stats"}, {"code", "200"}}) >= 1 &&
           count({{"route", "/health"}, {"code", "200"}}) >= 1 &&
           count({{"route", "/info"}, {"code", "200"}}) >= 1 &&
           count({{"route", "/balance"}, {"code", "200"}}) >= 1 && count({{"code", "401"}}) >= 1;
  }, absl::Seconds(3));
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_TRUE(counted) << "sflb_http_requests_total: /stats " << count({{"route", "/stats"}})
                       << ", /health " << count({{"route", "/health"}}) << ", /info "
                       << count({{"route", "/info"}}) << ", /balance "
                       << count({{"route", "/balance"}}) << ", code 401 "
                       << count({{"code", "401"}}) << "\n"
                       << last_metrics_;
}

TEST_F(OperatorTest, ControlplaneMetricsAreValidPrometheusTextWhenPresent) {
  StartCluster(2, {}, /*metrics=*/true);
  bool has_listener = false;
  for (const json& j : cluster_.controlplane().LogLines()) {
    has_listener = has_listener || j.value("event", "") == "metrics_listening";
  }
  if (!has_listener) {
    GTEST_SKIP() << "the controlplane has no metrics listener (no metrics_listening line)";
  }
  int port = MetricsPort(cluster_.controlplane());
  ASSERT_GT(port, 0);
  absl::StatusOr<PromText> m = ScrapeMetrics(port);
  ASSERT_TRUE(m.ok()) << m.status() << "\n" << last_metrics_;
  EXPECT_FALSE(m->samples.empty());
  // Gauges are refreshed about once a second.
  bool current = WaitUntil([&] {
    m = ScrapeMetrics(port);
    return m.ok() && m->Value("sflb_keys", {{"state", "active"}}) == 2 &&
           m->Value("sflb_watching_replicas") == 1;
  }, absl::Seconds(5));
  ASSERT_TRUE(m.ok()) << m.status() << "\n" << last_metrics_;
  EXPECT_TRUE(current) << last_metrics_;
  for (const PromSample& s : m->samples) {
    EXPECT_TRUE(absl::StartsWith(s.name, "sflb_") || absl::StartsWith(s.name, "process_") ||
                absl::StartsWith(s.name, "exposer_"))
        << s.name;
  }
  for (const auto& k : keys_) EXPECT_THAT(last_metrics_, Not(HasSubstr(k)));
  // After a balance check, a scrape still parses (balance per account is a labelled family).
  GetJson("/balance?refresh=true");
  m = ScrapeMetrics(port);
  ASSERT_TRUE(m.ok()) << m.status() << "\n" << last_metrics_;
}

// ---------------------------------------------------------------------------------------------
// 7. Request logs.

// The dataplane's "request" line with this request id.
absl::StatusOr<json> RequestLine(ChildProcess& dp, const std::string& request_id,
                                 absl::Duration timeout = absl::Seconds(5)) {
  return dp.WaitForLog(
      [&](const json& j) {
        return j.value("event", "") == "request" && j.value("request_id", "") == request_id;
      },
      timeout);
}

void ExpectRequestLineShape(const json& line, const std::set<std::string>& fingerprints) {
  SCOPED_TRACE(line.dump());
  EXPECT_TRUE(IsIso8601(line["ts"]));
  EXPECT_TRUE(line["request_id"].is_string());
  EXPECT_EQ(line["client_ip"], "127.0.0.1");
  EXPECT_TRUE(line["method"].is_string());
  EXPECT_TRUE(line["path"].is_string());
  EXPECT_TRUE(line["status"].is_number_integer());
  EXPECT_TRUE(line["attempts"].is_number_integer());
  ASSERT_TRUE(line["keys"].is_array());
  for (const auto& fp : line["keys"]) {
    EXPECT_EQ(fingerprints.count(fp.get<std::string>()), 1u) << "not a pool key's fingerprint: " << fp;
  }
  EXPECT_EQ(line["keys"].size(), line["attempts"].get<size_t>());
  ASSERT_TRUE(line["ttfb_ms"].is_number());
  ASSERT_TRUE(line["total_ms"].is_number());
  EXPECT_GE(line["ttfb_ms"].get<double>(), 0);
  EXPECT_GE(line["total_ms"].get<double>(), line["ttfb_ms"].get<double>());
  EXPECT_TRUE(line["stream"].is_boolean());
}

TEST_F(OperatorTest, OneRequestLinePerRequestWithIdsKeysTimesAndUsage) {
  StartCluster(2);
  // Plain.
  auto res = Chat();
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200);
  std::string id = res->get_header_value("x-request-id");
  ASSERT_FALSE(id.empty());
  auto line = RequestLine(cluster_.dataplane(0), id);
  ASSERT_TRUE(line.ok()) << line.status();
  ExpectRequestLineShape(*line, Fingerprints());
  EXPECT_EQ((*line)["method"], "POST");
  EXPECT_EQ((*line)["path"], "/v1/chat/completions");
  EXPECT_EQ((*line)["status"], 200);
  EXPECT_EQ((*line)["attempts"], 1);
  EXPECT_EQ((*line)["model"], kModel);
  EXPECT_EQ((*line)["stream"], false);
  EXPECT_EQ((*line)["upstream_trace_id"], res->get_header_value("x-siliconcloud-trace-id"));
  EXPECT_EQ((*line)["prompt_tokens"], kPromptTokens);
  json fake = cluster_.FakeRequests();
  ASSERT_EQ(fake.size(), 1u);
  EXPECT_EQ((*line)["keys"][0], KeyFingerprint(fake[0].value("key", "")));

  // Streamed: tokens from the final usage chunk.
  res = Chat(0, {{"x-fake-chunks", "7"}, {"x-fake-chunk-delay-ms", "5"}}, /*stream=*/true);
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200);
  id = res->get_header_value("x-request-id");
  line = RequestLine(cluster_.dataplane(0), id);
  ASSERT_TRUE(line.ok()) << line.status();
  ExpectRequestLineShape(*line, Fingerprints());
  EXPECT_EQ((*line)["stream"], true);
  EXPECT_EQ((*line)["prompt_tokens"], kPromptTokens);
  EXPECT_EQ((*line)["completion_tokens"], 7);

  // A retried request names both keys.
  cluster_.ResetFake();
  cluster_.AddFault({{"key", "*"}, {"action", "status"}, {"status", 503}, {"times", 1}});
  res = Chat();
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200) << res->body;
  line = RequestLine(cluster_.dataplane(0), res->get_header_value("x-request-id"));
  ASSERT_TRUE(line.ok()) << line.status();
  ExpectRequestLineShape(*line, Fingerprints());
  EXPECT_EQ((*line)["attempts"], 2);
  EXPECT_EQ((*line)["keys"].size(), 2u);

  // Unique ids, and exactly one line per id.
  std::map<std::string, int> per_id;
  for (const json& j : cluster_.dataplane(0).LogLines()) {
    if (j.value("event", "") == "request") per_id[j.value("request_id", "")]++;
  }
  EXPECT_EQ(per_id.size(), 3u);
  for (const auto& [rid, n] : per_id) EXPECT_EQ(n, 1) << rid;
}

// Every line of a process's log is exactly one JSON object; none was forged by client text.
void ExpectOneJsonObjectPerLine(const std::string& log) {
  for (absl::string_view l : absl::StrSplit(log, '\n', absl::SkipEmpty())) {
    json j = json::parse(l, nullptr, false);
    EXPECT_TRUE(j.is_object() && j.contains("ts") && j.contains("event"))
        << "not one log object per line: " << l;
  }
}

TEST_F(OperatorTest, ClientSuppliedTextIsEscapedInRequestLines) {
  StartCluster(1);
  auto client = cluster_.Client();
  // Quotes, a backslash, a tab, an escape character, a byte that is not UTF-8, and a forged
  // JSON object; all URL-encoded.
  const std::string raw = "/v1/odd%22path%5C%09%1B%FF%7D%7B%22event%22%3A%22forged%22%7D";
  auto res = client->Get(raw, Headers(Auth::kUser));
  ASSERT_TRUE(res);
  std::string id = res->get_header_value("x-request-id");
  ASSERT_FALSE(id.empty());
  auto line = RequestLine(cluster_.dataplane(0), id);
  ASSERT_TRUE(line.ok()) << line.status();
  std::string path = (*line)["path"];
  EXPECT_TRUE(absl::StartsWith(path, "/v1/odd\"path\\\t\x1b")) << path;
  EXPECT_THAT(path, HasSubstr("{\"event\":\"forged\"}"));
  ExpectRequestLineShape(*line, Fingerprints());
  // Unauthenticated attempts with odd paths are logged with the IP, escaped as well.
  res = client->Get("/v1/x%22y%5Cz%09", Headers(Auth::kWrong));
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 401);
  EXPECT_TRUE(cluster_.dataplane(0)
                  .WaitForLog([](const json& j) {
                    return j.value("event", "") == "auth_failed" &&
                           j.value("client_ip", "") == "127.0.0.1" &&
                           j.value("path", "") == "/v1/x\"y\\z\t";
                  },
                              absl::Seconds(5))
                  .ok());
  ExpectOneJsonObjectPerLine(cluster_.dataplane(0).ReadLog());
  for (const json& j : cluster_.dataplane(0).LogLines()) {
    EXPECT_NE(j.value("event", ""), "forged") << "client text injected a log line";
  }
}

// httplib's router matches "/.*" with std::regex, whose '.' does not match a line terminator:
// a request whose decoded path holds a newline or a carriage return (%0A, %0D) matches no
// route and gets httplib's 404, which the error handler dresses up. It is answered by sflb but
// gets no request line (and no metric), so it is invisible in the logs.
TEST_F(OperatorTest, RequestWithEncodedNewlineInPathGetsARequestLine) {
  StartCluster(1);
  auto client = cluster_.Client();
  const std::string raw = "/v1/odd%0Apath%0D%0A%7B%22event%22%3A%22forged%22%7D";
  auto res = client->Get(raw, Headers(Auth::kUser));
  ASSERT_TRUE(res);
  std::string id = res->get_header_value("x-request-id");
  ASSERT_FALSE(id.empty());
  auto line = RequestLine(cluster_.dataplane(0), id, absl::Seconds(2));
  EXPECT_TRUE(line.ok()) << "no request line (the client got HTTP " << res->status << " "
                         << res->body << ")";
  if (line.ok()) {
    EXPECT_EQ((*line)["path"], "/v1/odd\npath\r\n{\"event\":\"forged\"}");
  }
  ExpectOneJsonObjectPerLine(cluster_.dataplane(0).ReadLog());
}

}  // namespace
}  // namespace sflb::e2e
