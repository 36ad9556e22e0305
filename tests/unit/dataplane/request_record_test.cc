// Tests of dataplane/request_record: the request log line's exact text, the millisecond
// formatting it uses, and request ids.
#include "dataplane/request_record.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <random>
#include <regex>
#include <set>
#include <string>

#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "dataplane/dataplane_metrics.h"
#include "gtest/gtest.h"

namespace sflb {
namespace {

// Runs `f` with stderr (where log lines go) redirected to a file; returns what it wrote.
template <typename F>
std::string CaptureStderr(F&& f) {
  char path[] = "/tmp/request_record_test_XXXXXX";
  int fd = mkstemp(path);
  EXPECT_GE(fd, 0);
  unlink(path);
  int saved = dup(STDERR_FILENO);
  dup2(fd, STDERR_FILENO);
  f();
  dup2(saved, STDERR_FILENO);
  close(saved);
  std::string out;
  lseek(fd, 0, SEEK_SET);
  char buf[4096];
  ssize_t n;
  while ((n = read(fd, buf, sizeof(buf))) > 0) out.append(buf, static_cast<size_t>(n));
  close(fd);
  return out;
}

// The line with its two time-dependent values (ts, total_ms) replaced by placeholders.
std::string WithoutTimes(const std::string& line) {
  static const std::regex kTs(R"re("ts":"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")re");
  static const std::regex kTotal(R"re("total_ms":\d+\.\d{3})re");
  return std::regex_replace(std::regex_replace(line, kTs, "\"ts\":TS"), kTotal,
                            "\"total_ms\":TOTAL");
}

TEST(RequestRecordTest, FullLogLine) {
  DataplaneMetrics metrics;
  std::string out = CaptureStderr([&] {
    RequestRecord r;
    r.request_id = "0123456789abcdef";
    r.started = absl::Now() - absl::Milliseconds(5);
    r.client_ip = "203.0.113.9";
    r.method = "POST";
    r.path = "/v1/chat/completions";
    r.model = "Qwen/Qwen2.5-7B-Instruct";
    r.stream = true;
    r.status = 200;
    r.attempts = 2;
    r.key_fingerprints = {"sk-a...1234", "sk-b...5678"};
    r.upstream_trace_id = "trace-1";
    r.error_code = "upstream_error";
    r.request_bytes = 170;
    r.response_bytes = 358;
    r.time_to_first_byte = absl::Microseconds(2345) + absl::Nanoseconds(600);
    r.have_usage = true;
    r.prompt_tokens = 12;
    r.completion_tokens = 9;
    r.stream_end = "client_gone";
    r.metrics = &metrics;
    r.upstream_answered = true;
  });
  EXPECT_EQ(WithoutTimes(out),
            R"({"ts":TS,"level":"info","component":"dataplane","event":"request",)"
            R"("request_id":"0123456789abcdef","client_ip":"203.0.113.9","method":"POST",)"
            R"("path":"/v1/chat/completions","model":"Qwen/Qwen2.5-7B-Instruct","stream":true,)"
            R"("status":200,"attempts":2,"keys":["sk-a...1234","sk-b...5678"],)"
            R"("upstream_trace_id":"trace-1","error_code":"upstream_error","request_bytes":170,)"
            R"("response_bytes":358,"ttfb_ms":2.346,"total_ms":TOTAL,"prompt_tokens":12,)"
            R"("completion_tokens":9,"stream_end":"client_gone"})"
            "\n");
  std::smatch total;
  ASSERT_TRUE(std::regex_search(out, total, std::regex(R"("total_ms":(\d+\.\d{3}))")));
  EXPECT_GE(std::stod(total[1]), 5.0);
}

TEST(RequestRecordTest, MinimalLogLineAndEscaping) {
  std::string out = CaptureStderr([] {
    RequestRecord r;
    r.started = absl::Now();
    r.client_ip = "\"quoted\"\n\x01\xFF";
    r.method = "GET";
    r.path = "/v1/models";
    r.status = 401;
  });
  EXPECT_EQ(WithoutTimes(out),
            R"({"ts":TS,"level":"info","component":"dataplane","event":"request",)"
            R"("request_id":"","client_ip":"\"quoted\"\n\u0001)" "\xEF\xBF\xBD" R"(","method":"GET",)"
            R"("path":"/v1/models","stream":false,"status":401,"attempts":0,"keys":[],)"
            R"("request_bytes":0,"response_bytes":0,"ttfb_ms":0.000,"total_ms":TOTAL})"
            "\n");
}

TEST(RequestRecordTest, DisabledWritesNothingButRecordsMetrics) {
  DataplaneMetrics metrics;
  std::string out = CaptureStderr([&] {
    RequestRecord r;
    r.enabled = false;
    r.path = "/v1/embeddings";
    r.status = 200;
    r.model = "m";
    r.have_usage = true;
    r.prompt_tokens = 3;
    r.metrics = &metrics;
  });
  EXPECT_EQ(out, "");
  bool found = false;
  for (const auto& family : metrics.registry()->Collect()) {
    if (family.name != "sflb_http_requests_total") continue;
    ASSERT_EQ(family.metric.size(), 1u);
    for (const auto& label : family.metric[0].label) {
      if (label.name == "route") {
        EXPECT_EQ(label.value, "/embeddings");
      } else {
        EXPECT_EQ(label.name, "code");
        EXPECT_EQ(label.value, "200");
      }
    }
    found = true;
  }
  EXPECT_TRUE(found);
}

TEST(AppendMillisecondsTest, Examples) {
  auto ms = [](absl::Duration d) {
    std::string out;
    AppendMilliseconds(d, &out);
    return out;
  };
  EXPECT_EQ(ms(absl::ZeroDuration()), "0.000");
  EXPECT_EQ(ms(absl::Nanoseconds(499)), "0.000");
  EXPECT_EQ(ms(absl::Nanoseconds(501)), "0.001");
  EXPECT_EQ(ms(absl::Microseconds(2345)), "2.345");
  EXPECT_EQ(ms(absl::Nanoseconds(999999600)), "1000.000");
  EXPECT_EQ(ms(absl::Hours(30)), "108000000.000");
  EXPECT_EQ(ms(absl::InfiniteDuration()), "inf");
  EXPECT_EQ(ms(-absl::Milliseconds(3)), "-3.000");
  std::string out = "x=";
  AppendMilliseconds(absl::Milliseconds(1), &out);
  EXPECT_EQ(out, "x=1.000");
}

TEST(AppendMillisecondsTest, MatchesPrintf) {
  auto reference = [](absl::Duration d) {
    return absl::StrFormat("%.3f", absl::ToDoubleMilliseconds(d));
  };
  auto fast = [](absl::Duration d) {
    std::string out;
    AppendMilliseconds(d, &out);
    return out;
  };
  std::mt19937_64 rng(5);
  for (int i = 0; i < 300000; ++i) {
    absl::Duration d;
    switch (i % 6) {
      case 0: d = absl::Nanoseconds(static_cast<int64_t>(rng() % 100000000)); break;  // < 100 ms
      case 1: d = absl::Nanoseconds(static_cast<int64_t>(rng() % (int64_t{1} << 51))); break;
      case 2:  // ties and their neighbours
        d = absl::Nanoseconds(static_cast<int64_t>(rng() % 10000000) * 1000 + 499 +
                              static_cast<int64_t>(rng() % 3));
        break;
      case 3: d = absl::Nanoseconds(static_cast<int64_t>(rng() % 1000000)) / 4; break;
      case 4: d = -absl::Nanoseconds(static_cast<int64_t>(rng() % 100000000)); break;
      default: d = absl::Seconds(static_cast<int64_t>(rng() % 100000000000)); break;
    }
    ASSERT_EQ(fast(d), reference(d)) << absl::FormatDuration(d);
  }
}

TEST(NewRequestIdTest, SixteenLowerCaseHexDigits) {
  std::set<std::string> seen;
  for (int i = 0; i < 1000; ++i) {
    std::string id = NewRequestId();
    ASSERT_TRUE(std::regex_match(id, std::regex("[0-9a-f]{16}"))) << id;
    seen.insert(id);
  }
  EXPECT_EQ(seen.size(), 1000u);
}

}  // namespace
}  // namespace sflb
