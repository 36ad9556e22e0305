#include "dataplane/dataplane_metrics.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace sflb {
namespace {

// Route labels: the known API paths (without "/v1"), then "other".
constexpr absl::string_view kRouteLabels[] = {
    "/chat/completions", "/completions", "/embeddings", "/models", "/rerank",
    "/images/generations", "/audio/transcriptions", "/audio/speech", "/video/submit",
    "/video/status", "/user/info", "/", "/stats", "/health", "/balance", "/reload-keys",
    "/info", "other"};
constexpr size_t kOtherRoute = std::size(kRouteLabels) - 1;

// Index of a label in kRouteLabels, or -1.
int LabelIndex(absl::string_view label) {
  for (size_t i = 0; i < std::size(kRouteLabels); ++i) {
    if (label == kRouteLabels[i]) return static_cast<int>(i);
  }
  return -1;
}

// The route index of a request path.
size_t RouteIndex(absl::string_view path) {
  if (absl::StartsWith(path, "/v1/")) path.remove_prefix(3);
  for (size_t i = 0; i < kOtherRoute; ++i) {
    if (path == kRouteLabels[i]) return i;
  }
  return kOtherRoute;
}

const prometheus::Histogram::BucketBoundaries& LatencyBuckets() {
  static const auto* buckets = new prometheus::Histogram::BucketBoundaries{
      0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300};
  return *buckets;
}

// The child in `slot`, made by `make` (a Family::Add call) on first use.
template <typename T, typename Make>
T& CachedChild(std::atomic<T*>* slot, Make&& make) {
  T* child = slot->load(std::memory_order_acquire);
  if (child == nullptr) {
    child = &make();
    slot->store(child, std::memory_order_release);
  }
  return *child;
}

}  // namespace

DataplaneMetrics::DataplaneMetrics()
    : registry_(std::make_shared<prometheus::Registry>()),
      routes_(std::make_unique<RouteChildren[]>(kRouteCount)) {
  static_assert(std::size(kRouteLabels) == kRouteCount, "kRouteCount out of date");
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
  return std::string(RouteLabelView(path));
}

absl::string_view DataplaneMetrics::RouteLabelView(absl::string_view path) {
  return kRouteLabels[RouteIndex(path)];
}

void DataplaneMetrics::RecordRequest(absl::string_view route, int status, absl::Duration total,
                                     absl::Duration ttfb, bool upstream_answered) {
  int index = LabelIndex(route);
  if (index < 0) {  // not a label of ours: no cache slot
    std::string label(route);
    requests_->Add({{"route", label}, {"code", absl::StrCat(status)}}).Increment();
    duration_->Add({{"route", label}}, LatencyBuckets()).Observe(absl::ToDoubleSeconds(total));
    if (upstream_answered) {
      ttfb_->Add({{"route", label}}, LatencyBuckets()).Observe(absl::ToDoubleSeconds(ttfb));
    }
    return;
  }
  RouteChildren& children = routes_[static_cast<size_t>(index)];
  auto route_label = [route] { return prometheus::Labels{{"route", std::string(route)}}; };
  if (status >= kMinCachedStatus && status <= kMaxCachedStatus) {
    CachedChild(&children.requests[static_cast<size_t>(status - kMinCachedStatus)],
                [&]() -> prometheus::Counter& {
                  return requests_->Add(
                      {{"route", std::string(route)}, {"code", absl::StrCat(status)}});
                })
        .Increment();
  } else {
    requests_->Add({{"route", std::string(route)}, {"code", absl::StrCat(status)}}).Increment();
  }
  CachedChild(&children.duration, [&]() -> prometheus::Histogram& {
    return duration_->Add(route_label(), LatencyBuckets());
  }).Observe(absl::ToDoubleSeconds(total));
  if (upstream_answered) {
    CachedChild(&children.ttfb, [&]() -> prometheus::Histogram& {
      return ttfb_->Add(route_label(), LatencyBuckets());
    }).Observe(absl::ToDoubleSeconds(ttfb));
  }
}

void DataplaneMetrics::RecordRetry(absl::string_view reason) {
  {
    MutexLock lock(&retries_mu_);
    auto it = retry_counters_.find(reason);
    if (it != retry_counters_.end()) {
      it->second->Increment();
      return;
    }
  }
  // Family::Add returns the existing child if another thread added it meanwhile.
  prometheus::Counter& counter = retries_->Add({{"reason", std::string(reason)}});
  counter.Increment();
  MutexLock lock(&retries_mu_);
  if (retry_counters_.size() < kMaxCachedLabelValues) retry_counters_.emplace(reason, &counter);
}

void DataplaneMetrics::RecordTokens(absl::string_view model, uint64_t prompt,
                                    uint64_t completion) {
  absl::string_view m = model.empty() ? absl::string_view("unknown") : model.substr(0, 128);
  TokenCounters counters{nullptr, nullptr};
  {
    MutexLock lock(&tokens_mu_);
    auto it = token_counters_.find(m);
    if (it != token_counters_.end()) counters = it->second;
  }
  if (counters.prompt == nullptr) {
    std::string label(m);
    counters.prompt = &tokens_->Add({{"model", label}, {"type", "prompt"}});
    counters.completion = &tokens_->Add({{"model", label}, {"type", "completion"}});
    MutexLock lock(&tokens_mu_);
    if (token_counters_.size() < kMaxCachedLabelValues) token_counters_.emplace(m, counters);
  }
  counters.prompt->Increment(static_cast<double>(prompt));
  counters.completion->Increment(static_cast<double>(completion));
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
