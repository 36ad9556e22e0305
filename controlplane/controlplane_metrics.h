// ControlplaneMetrics: the controlplane's Prometheus metrics, refreshed from the registry and
// services once a second (Update) rather than on every change.
#ifndef SFLB_CONTROLPLANE_CONTROLPLANE_METRICS_H_
#define SFLB_CONTROLPLANE_CONTROLPLANE_METRICS_H_

#include <map>
#include <memory>
#include <string>

#include "controlplane/key_registry.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/registry.h"
#include "sflb/v1/admin_service.pb.h"

namespace sflb {

// Update must always be called from the same thread (the maintenance loop); RecordBalances
// only touches prometheus-cpp's own thread-safe metrics and may run anywhere.
class ControlplaneMetrics {
 public:
  ControlplaneMetrics();
  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }

  void Update(const KeyRegistry::Counts& counts, uint32_t watching_replicas,
              uint64_t lease_calls, uint64_t report_calls, uint64_t leased_total);
  // Known balances per account (sum over the account's keys), from a balance check.
  void RecordBalances(const v1::GetBalancesResponse& balances,
                      const std::map<uint64_t, std::string>& account_by_id);

 private:
  // Adds what `total` grew by since the last call to a counter.
  void Advance(prometheus::Counter* counter, uint64_t total, uint64_t* last);

  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Gauge>* keys_;
  prometheus::Family<prometheus::Gauge>* blocks_;
  prometheus::Family<prometheus::Counter>* cooldowns_;
  prometheus::Family<prometheus::Gauge>* balance_;
  prometheus::Gauge* watchers_;
  prometheus::Counter* lease_calls_;
  prometheus::Counter* report_calls_;
  prometheus::Counter* leased_;
  uint64_t last_lease_calls_ = 0;
  uint64_t last_report_calls_ = 0;
  uint64_t last_leased_ = 0;
  std::map<std::string, uint64_t> last_cooldowns_;
};

}  // namespace sflb

#endif  // SFLB_CONTROLPLANE_CONTROLPLANE_METRICS_H_
