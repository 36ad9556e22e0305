#include "dataplane/dataplane_metrics.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace sflb {
namespace {

const prometheus::Histogram::BucketBoundaries& LatencyBuckets() {
  static const auto* buckets = new prometheus::Histogram::BucketBoundaries{
      0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300};
  return *buckets;
}

}  // namespace

DataplaneMetrics::DataplaneMetrics() : registry_(std::make_shared<prometheus::Registry>()) {
  requests_ = &prometheus::BuildCounter()
                   .Name("sflb_http_requests_total")
                   .Help("Client requests by route and HTTP status")
                   .Register(*registry_);
  duration_ = &prometheus::BuildHistogram()
                   .Name("sflb_http_request_duration_seconds")
                   .Help("Time from request to the end of the response, by route")
                   .Register(*registry_);
  ttfb_ = &prometheus::BuildHistogram()
               .Name("sflb_upstream_ttfb_seconds")
               .Help("Time from request to the upstream's response head, by route")
               .Register(*registry_);
  retries_ = &prometheus::BuildCounter()
                  .Name("sflb_upstream_retries_total")
                  .Help("Upstream attempts that failed and were retried on another key, by reason")
                  .Register(*registry_);
  tokens_ = &prometheus::BuildCounter()
                 .Name("sflb_tokens_total")
                 .Help("Tokens from upstream usage objects, by model and type")
                 .Register(*registry_);
  active_streams_ = &prometheus::BuildGauge()
                         .Name("sflb_active_streams")
                         .Help("Streamed responses in progress")
                         .Register(*registry_)
                         .Add({});
  auto& pool = prometheus::BuildGauge()
                   .Name("sflb_dataplane_keys")
                   .Help("Keys in this replica's snapshot, by kind (total, usable)")
                   .Register(*registry_);
  keys_total_ = &pool.Add({{"kind", "total"}});
  keys_usable_ = &pool.Add({{"kind", "usable"}});
  leased_ = &prometheus::BuildGauge()
                 .Name("sflb_lease_remaining")
                 .Help("Leased round-robin assignments not yet used")
                 .Register(*registry_)
                 .Add({});
  connected_ = &prometheus::BuildGauge()
                    .Name("sflb_controlplane_connected")
                    .Help("1 while the watch stream to the controlplane is open")
                    .Register(*registry_)
                    .Add({});
  auto& threads = prometheus::BuildGauge()
                      .Name("sflb_dataplane_threads")
                      .Help("Connection threads by state (total, busy) and queued connections")
                      .Register(*registry_);
  threads_ = &threads.Add({{"state", "total"}});
  threads_busy_ = &threads.Add({{"state", "busy"}});
  queued_ = &threads.Add({{"state", "queued"}});
}

std::string DataplaneMetrics::RouteLabel(absl::string_view path) {
  static const char* const kKnown[] = {
      "/chat/completions", "/completions", "/embeddings", "/models", "/rerank",
      "/images/generations", "/audio/transcriptions", "/audio/speech", "/video/submit",
      "/video/status", "/user/info", "/", "/stats", "/health", "/balance", "/reload-keys",
      "/info"};
  absl::string_view p = path;
  if (absl::StartsWith(p, "/v1/")) p.remove_prefix(3);
  for (const char* known : kKnown) {
    if (p == known) return known;
  }
  return "other";
}

void DataplaneMetrics::RecordRequest(const std::string& route, int status, absl::Duration total,
                                     absl::Duration ttfb, bool upstream_answered) {
  requests_->Add({{"route", route}, {"code", absl::StrCat(status)}}).Increment();
  duration_->Add({{"route", route}}, LatencyBuckets()).Observe(absl::ToDoubleSeconds(total));
  if (upstream_answered) {
    ttfb_->Add({{"route", route}}, LatencyBuckets()).Observe(absl::ToDoubleSeconds(ttfb));
  }
}

void DataplaneMetrics::RecordRetry(absl::string_view reason) {
  retries_->Add({{"reason", std::string(reason)}}).Increment();
}

void DataplaneMetrics::RecordTokens(const std::string& model, uint64_t prompt,
                                    uint64_t completion) {
  std::string m = model.empty() ? "unknown" : model.substr(0, 128);
  tokens_->Add({{"model", m}, {"type", "prompt"}}).Increment(static_cast<double>(prompt));
  tokens_->Add({{"model", m}, {"type", "completion"}}).Increment(static_cast<double>(completion));
}

void DataplaneMetrics::SetPool(size_t total_keys, size_t usable_keys, size_t leased,
                               bool connected) {
  keys_total_->Set(static_cast<double>(total_keys));
  keys_usable_->Set(static_cast<double>(usable_keys));
  leased_->Set(static_cast<double>(leased));
  connected_->Set(connected ? 1 : 0);
}

void DataplaneMetrics::SetThreads(size_t threads, size_t busy, size_t queued) {
  threads_->Set(static_cast<double>(threads));
  threads_busy_->Set(static_cast<double>(busy));
  queued_->Set(static_cast<double>(queued));
}

}  // namespace sflb
