// DataplaneMetrics: the dataplane's Prometheus metrics (names follow Prometheus conventions:
// sflb_ prefix, _total counters, _seconds histograms, base units).
#ifndef SFLB_DATAPLANE_DATAPLANE_METRICS_H_
#define SFLB_DATAPLANE_DATAPLANE_METRICS_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "common/mutex.h"

namespace sflb {

// Thread-safe (prometheus-cpp metrics are, and the caches below are).
//
// Recording does not go through prometheus::Family::Add on the request path (a lock, a
// std::map of labels and a new metric object per call): the labelled children are looked up
// once and cached. The cache is bounded: per route and status code for requests, up to
// kMaxCachedLabelValues models for tokens and reasons for retries; values beyond that still
// work, through Family::Add.
class DataplaneMetrics {
 public:
  DataplaneMetrics();

  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }

  // One finished client request. `route` is a bounded label (see RouteLabel); any other
  // value is recorded too, but without the cache.
  void RecordRequest(absl::string_view route, int status, absl::Duration total,
                     absl::Duration ttfb, bool upstream_answered);
  // One upstream attempt that failed and (if attempts remained) was retried.
  void RecordRetry(absl::string_view reason);
  // Tokens of one response, labelled with the first 128 bytes of `model` ("unknown" if empty).
  void RecordTokens(absl::string_view model, uint64_t prompt, uint64_t completion);
  void StreamStarted() { active_streams_->Increment(); }
  void StreamEnded() { active_streams_->Decrement(); }
  // Periodic view of the key pool and the controlplane link.
  void SetPool(size_t total_keys, size_t usable_keys, size_t leased, bool connected);
  void SetThreads(size_t threads, size_t busy, size_t queued);

  // Known API paths keep their name; anything else is "other" so clients cannot blow up the
  // label space.
  static std::string RouteLabel(absl::string_view path);
  // The same label without a copy (it points at a string literal).
  static absl::string_view RouteLabelView(absl::string_view path);

  // Distinct models (and retry reasons) whose counters are cached.
  static constexpr size_t kMaxCachedLabelValues = 256;

 private:
  // Status codes 100..599 have a cached counter per route.
  static constexpr int kMinCachedStatus = 100;
  static constexpr int kMaxCachedStatus = 599;
  static constexpr size_t kRouteCount = 18;  // the known routes and "other"

  // One route's children, each filled on first use (so only routes and codes that were seen
  // appear in the exposition, as before). Written at most once per slot, with a pointer that
  // Family::Add returns for every call with the same labels, so racing writers agree.
  struct RouteChildren {
    std::atomic<prometheus::Histogram*> duration{nullptr};
    std::atomic<prometheus::Histogram*> ttfb{nullptr};
    std::array<std::atomic<prometheus::Counter*>, kMaxCachedStatus - kMinCachedStatus + 1>
        requests{};
  };
  struct TokenCounters {
    prometheus::Counter* prompt;
    prometheus::Counter* completion;
  };

  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>* requests_;
  prometheus::Family<prometheus::Histogram>* duration_;
  prometheus::Family<prometheus::Histogram>* ttfb_;
  prometheus::Family<prometheus::Counter>* retries_;
  prometheus::Family<prometheus::Counter>* tokens_;
  prometheus::Gauge* active_streams_;
  prometheus::Gauge* keys_total_;
  prometheus::Gauge* keys_usable_;
  prometheus::Gauge* leased_;
  prometheus::Gauge* connected_;
  prometheus::Gauge* threads_;
  prometheus::Gauge* threads_busy_;
  prometheus::Gauge* queued_;

  // Indexed like the route table in dataplane_metrics.cc.
  std::unique_ptr<RouteChildren[]> routes_;
  Mutex tokens_mu_;
  absl::flat_hash_map<std::string, TokenCounters> token_counters_ ABSL_GUARDED_BY(tokens_mu_);
  Mutex retries_mu_;
  absl::flat_hash_map<std::string, prometheus::Counter*> retry_counters_
      ABSL_GUARDED_BY(retries_mu_);
};

}  // namespace sflb

#endif  // SFLB_DATAPLANE_DATAPLANE_METRICS_H_
