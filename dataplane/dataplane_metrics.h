// DataplaneMetrics: the dataplane's Prometheus metrics (names follow Prometheus conventions:
// sflb_ prefix, _total counters, _seconds histograms, base units).
#ifndef SFLB_DATAPLANE_DATAPLANE_METRICS_H_
#define SFLB_DATAPLANE_DATAPLANE_METRICS_H_

#include <memory>
#include <string>

#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace sflb {

// Thread-safe (prometheus-cpp metrics are).
class DataplaneMetrics {
 public:
  DataplaneMetrics();

  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }

  // One finished client request. `route` is a bounded label (see RouteLabel).
  void RecordRequest(const std::string& route, int status, absl::Duration total,
                     absl::Duration ttfb, bool upstream_answered);
  // One upstream attempt that failed and (if attempts remained) was retried.
  void RecordRetry(absl::string_view reason);
  void RecordTokens(const std::string& model, uint64_t prompt, uint64_t completion);
  void StreamStarted() { active_streams_->Increment(); }
  void StreamEnded() { active_streams_->Decrement(); }
  // Periodic view of the key pool and the controlplane link.
  void SetPool(size_t total_keys, size_t usable_keys, size_t leased, bool connected);
  void SetThreads(size_t threads, size_t busy, size_t queued);

  // Known API paths keep their name; anything else is "other" so clients cannot blow up the
  // label space.
  static std::string RouteLabel(absl::string_view path);

 private:
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
};

}  // namespace sflb

#endif  // SFLB_DATAPLANE_DATAPLANE_METRICS_H_
