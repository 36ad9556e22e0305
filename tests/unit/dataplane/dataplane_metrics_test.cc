// Tests of dataplane/dataplane_metrics: what the cached recording paths expose.
#include "dataplane/dataplane_metrics.h"

#include <map>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "prometheus/metric_family.h"

namespace sflb {
namespace {

using LabelMap = std::map<std::string, std::string>;

// The metrics of family `name` with exactly `labels`, from a fresh collection.
std::vector<prometheus::ClientMetric> Find(const DataplaneMetrics& metrics,
                                           const std::string& name, const LabelMap& labels) {
  std::vector<prometheus::ClientMetric> out;
  for (const prometheus::MetricFamily& family : metrics.registry()->Collect()) {
    if (family.name != name) continue;
    for (const prometheus::ClientMetric& m : family.metric) {
      LabelMap have;
      for (const auto& l : m.label) have[l.name] = l.value;
      if (have == labels) out.push_back(m);
    }
  }
  return out;
}

double CounterValue(const DataplaneMetrics& metrics, const std::string& name,
                    const LabelMap& labels) {
  std::vector<prometheus::ClientMetric> found = Find(metrics, name, labels);
  return found.size() == 1 ? found[0].counter.value : -1;
}

uint64_t HistogramCount(const DataplaneMetrics& metrics, const std::string& name,
                        const LabelMap& labels) {
  std::vector<prometheus::ClientMetric> found = Find(metrics, name, labels);
  return found.size() == 1 ? found[0].histogram.sample_count : 0;
}

size_t SeriesCount(const DataplaneMetrics& metrics, const std::string& name) {
  for (const prometheus::MetricFamily& family : metrics.registry()->Collect()) {
    if (family.name == name) return family.metric.size();
  }
  return 0;
}

TEST(DataplaneMetricsTest, RouteLabels) {
  EXPECT_EQ(DataplaneMetrics::RouteLabel("/v1/chat/completions"), "/chat/completions");
  EXPECT_EQ(DataplaneMetrics::RouteLabel("/chat/completions"), "/chat/completions");
  EXPECT_EQ(DataplaneMetrics::RouteLabel("/v1/"), "/");
  EXPECT_EQ(DataplaneMetrics::RouteLabel("/v1"), "other");
  EXPECT_EQ(DataplaneMetrics::RouteLabel("/v1/v1/models"), "other");
  EXPECT_EQ(DataplaneMetrics::RouteLabel("/reload-keys"), "/reload-keys");
  EXPECT_EQ(DataplaneMetrics::RouteLabel("/v1/chat/completions/x"), "other");
  EXPECT_EQ(DataplaneMetrics::RouteLabelView("/v1/embeddings"), "/embeddings");
}

TEST(DataplaneMetricsTest, RequestsByRouteAndCode) {
  DataplaneMetrics metrics;
  EXPECT_EQ(SeriesCount(metrics, "sflb_http_requests_total"), 0u) << "series appear on use";
  for (int i = 0; i < 3; ++i) {
    metrics.RecordRequest("/chat/completions", 200, absl::Milliseconds(20),
                          absl::Milliseconds(5), true);
  }
  metrics.RecordRequest("/chat/completions", 429, absl::Milliseconds(1), absl::ZeroDuration(),
                        false);
  metrics.RecordRequest("/models", 200, absl::Milliseconds(1), absl::ZeroDuration(), false);
  EXPECT_EQ(CounterValue(metrics, "sflb_http_requests_total",
                         {{"route", "/chat/completions"}, {"code", "200"}}),
            3);
  EXPECT_EQ(CounterValue(metrics, "sflb_http_requests_total",
                         {{"route", "/chat/completions"}, {"code", "429"}}),
            1);
  EXPECT_EQ(CounterValue(metrics, "sflb_http_requests_total",
                         {{"route", "/models"}, {"code", "200"}}),
            1);
  EXPECT_EQ(SeriesCount(metrics, "sflb_http_requests_total"), 3u);
  EXPECT_EQ(HistogramCount(metrics, "sflb_http_request_duration_seconds",
                           {{"route", "/chat/completions"}}),
            4u);
  EXPECT_EQ(HistogramCount(metrics, "sflb_upstream_ttfb_seconds", {{"route", "/chat/completions"}}),
            3u) << "only answered requests have a TTFB";
  EXPECT_EQ(Find(metrics, "sflb_upstream_ttfb_seconds", {{"route", "/models"}}).size(), 0u);
  std::vector<prometheus::ClientMetric> duration =
      Find(metrics, "sflb_http_request_duration_seconds", {{"route", "/chat/completions"}});
  ASSERT_EQ(duration.size(), 1u);
  EXPECT_NEAR(duration[0].histogram.sample_sum, 0.061, 1e-9);
  EXPECT_EQ(duration[0].histogram.bucket.size(), 18u) << "17 bounds and +Inf";
}

TEST(DataplaneMetricsTest, UncachedRoutesAndCodesStillCount) {
  DataplaneMetrics metrics;
  for (int status : {0, 99, 600, 1000, -1, 100, 599}) {
    metrics.RecordRequest("other", status, absl::Milliseconds(1), absl::ZeroDuration(), false);
    metrics.RecordRequest("other", status, absl::Milliseconds(1), absl::ZeroDuration(), false);
    EXPECT_EQ(CounterValue(metrics, "sflb_http_requests_total",
                           {{"route", "other"}, {"code", absl::StrCat(status)}}),
              2)
        << status;
  }
  // A label that is not one of RouteLabel's.
  metrics.RecordRequest("/custom", 201, absl::Milliseconds(1), absl::Milliseconds(1), true);
  metrics.RecordRequest("/custom", 201, absl::Milliseconds(1), absl::Milliseconds(1), true);
  EXPECT_EQ(CounterValue(metrics, "sflb_http_requests_total",
                         {{"route", "/custom"}, {"code", "201"}}),
            2);
  EXPECT_EQ(HistogramCount(metrics, "sflb_upstream_ttfb_seconds", {{"route", "/custom"}}), 2u);
}

TEST(DataplaneMetricsTest, TokensByModel) {
  DataplaneMetrics metrics;
  metrics.RecordTokens("Qwen/Qwen2.5-7B-Instruct", 12, 9);
  metrics.RecordTokens("Qwen/Qwen2.5-7B-Instruct", 1, 2);
  metrics.RecordTokens("", 5, 6);
  EXPECT_EQ(CounterValue(metrics, "sflb_tokens_total",
                         {{"model", "Qwen/Qwen2.5-7B-Instruct"}, {"type", "prompt"}}),
            13);
  EXPECT_EQ(CounterValue(metrics, "sflb_tokens_total",
                         {{"model", "Qwen/Qwen2.5-7B-Instruct"}, {"type", "completion"}}),
            11);
  EXPECT_EQ(CounterValue(metrics, "sflb_tokens_total", {{"model", "unknown"}, {"type", "prompt"}}),
            5);
  // Long model names are cut to 128 bytes; both spellings land on the same series.
  std::string long_model(200, 'x');
  metrics.RecordTokens(long_model, 1, 1);
  metrics.RecordTokens(long_model.substr(0, 150), 1, 1);
  EXPECT_EQ(CounterValue(metrics, "sflb_tokens_total",
                         {{"model", std::string(128, 'x')}, {"type", "prompt"}}),
            2);
}

TEST(DataplaneMetricsTest, ManyModelsBeyondTheCacheStillCount) {
  DataplaneMetrics metrics;
  const size_t models = DataplaneMetrics::kMaxCachedLabelValues + 50;
  for (int round = 0; round < 2; ++round) {
    for (size_t i = 0; i < models; ++i) metrics.RecordTokens(absl::StrCat("model-", i), 1, 2);
  }
  EXPECT_EQ(SeriesCount(metrics, "sflb_tokens_total"), 2 * models);
  for (size_t i : {size_t{0}, models - 1}) {
    EXPECT_EQ(CounterValue(metrics, "sflb_tokens_total",
                           {{"model", absl::StrCat("model-", i)}, {"type", "completion"}}),
              4);
  }
}

TEST(DataplaneMetricsTest, RetriesByReason) {
  DataplaneMetrics metrics;
  for (int i = 0; i < 400; ++i) metrics.RecordRetry(absl::StrCat("status_", 100 + i));
  metrics.RecordRetry("transport");
  metrics.RecordRetry("transport");
  EXPECT_EQ(CounterValue(metrics, "sflb_upstream_retries_total", {{"reason", "transport"}}), 2);
  EXPECT_EQ(CounterValue(metrics, "sflb_upstream_retries_total", {{"reason", "status_499"}}), 1);
  metrics.RecordRetry("status_499");
  EXPECT_EQ(CounterValue(metrics, "sflb_upstream_retries_total", {{"reason", "status_499"}}), 2);
}

TEST(DataplaneMetricsTest, ConcurrentRecordingLosesNothing) {
  DataplaneMetrics metrics;
  constexpr int kThreads = 4;
  constexpr int kPerThread = 2000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&metrics, t] {
      for (int i = 0; i < kPerThread; ++i) {
        metrics.RecordRequest(DataplaneMetrics::RouteLabelView("/v1/chat/completions"),
                              200 + i % 3, absl::Milliseconds(1), absl::Milliseconds(1), true);
        metrics.RecordTokens(absl::StrCat("m", i % 5), 1, 1);
        metrics.RecordRetry(i % 2 == 0 ? "transport" : absl::StrCat("status_", 500 + t));
      }
    });
  }
  for (std::thread& t : threads) t.join();
  double requests = 0;
  for (int code : {200, 201, 202}) {
    requests += CounterValue(metrics, "sflb_http_requests_total",
                             {{"route", "/chat/completions"}, {"code", absl::StrCat(code)}});
  }
  EXPECT_EQ(requests, kThreads * kPerThread);
  EXPECT_EQ(HistogramCount(metrics, "sflb_upstream_ttfb_seconds", {{"route", "/chat/completions"}}),
            static_cast<uint64_t>(kThreads * kPerThread));
  double tokens = 0;
  for (int m = 0; m < 5; ++m) {
    tokens += CounterValue(metrics, "sflb_tokens_total",
                           {{"model", absl::StrCat("m", m)}, {"type", "prompt"}});
  }
  EXPECT_EQ(tokens, kThreads * kPerThread);
  EXPECT_EQ(CounterValue(metrics, "sflb_upstream_retries_total", {{"reason", "transport"}}),
            kThreads * kPerThread / 2);
}

}  // namespace
}  // namespace sflb
