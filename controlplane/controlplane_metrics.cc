#include "controlplane/controlplane_metrics.h"

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/strip.h"

namespace sflb {
namespace {

std::string StateLabel(v1::KeyState state) {
  std::string name = v1::KeyState_Name(state);
  absl::string_view v = name;
  absl::ConsumePrefix(&v, "KEY_STATE_");
  return absl::AsciiStrToLower(v);
}

}  // namespace

ControlplaneMetrics::ControlplaneMetrics() : registry_(std::make_shared<prometheus::Registry>()) {
  keys_ = &prometheus::BuildGauge()
               .Name("sflb_keys")
               .Help("Upstream keys by state")
               .Register(*registry_);
  // Every state present from the start, so dashboards see zeros rather than gaps.
  for (v1::KeyState s : {v1::KEY_STATE_ACTIVE, v1::KEY_STATE_COOLING, v1::KEY_STATE_INVALID,
                         v1::KEY_STATE_DEPLETED, v1::KEY_STATE_DISABLED}) {
    keys_->Add({{"state", StateLabel(s)}});
  }
  blocks_ = &prometheus::BuildGauge()
                 .Name("sflb_rate_limit_blocks")
                 .Help("Rate-limit scope blocks by phase")
                 .Register(*registry_);
  blocks_->Add({{"phase", "cooling"}});
  blocks_->Add({{"phase", "half_open"}});
  cooldowns_ = &prometheus::BuildCounter()
                    .Name("sflb_cooldowns_started_total")
                    .Help("Scope cooldowns started or extended, by the limit that caused them")
                    .Register(*registry_);
  balance_ = &prometheus::BuildGauge()
                  .Name("sflb_account_balance")
                  .Help("Known balance per upstream account (sum of its keys' totalBalance)")
                  .Register(*registry_);
  watchers_ = &prometheus::BuildGauge()
                   .Name("sflb_watching_replicas")
                   .Help("Dataplane replicas with an open watch stream")
                   .Register(*registry_)
                   .Add({});
  auto& rpcs = prometheus::BuildCounter()
                   .Name("sflb_controlplane_rpcs_total")
                   .Help("Key service calls answered, by method")
                   .Register(*registry_);
  lease_calls_ = &rpcs.Add({{"method", "Lease"}});
  report_calls_ = &rpcs.Add({{"method", "Report"}});
  leased_ = &prometheus::BuildCounter()
                 .Name("sflb_leased_assignments_total")
                 .Help("Round-robin assignments handed out to dataplanes")
                 .Register(*registry_)
                 .Add({});
}

void ControlplaneMetrics::Advance(prometheus::Counter* counter, uint64_t total, uint64_t* last) {
  if (total > *last) counter->Increment(static_cast<double>(total - *last));
  *last = total;
}

void ControlplaneMetrics::Update(const KeyRegistry::Counts& counts, uint32_t watching_replicas,
                                 uint64_t lease_calls, uint64_t report_calls,
                                 uint64_t leased_total) {
  for (v1::KeyState s : {v1::KEY_STATE_ACTIVE, v1::KEY_STATE_COOLING, v1::KEY_STATE_INVALID,
                         v1::KEY_STATE_DEPLETED, v1::KEY_STATE_DISABLED}) {
    auto it = counts.keys_by_state.find(s);
    keys_->Add({{"state", StateLabel(s)}}).Set(it == counts.keys_by_state.end() ? 0 : it->second);
  }
  auto phase = [&counts](v1::BlockPhase p) {
    auto it = counts.blocks_by_phase.find(p);
    return it == counts.blocks_by_phase.end() ? 0.0 : static_cast<double>(it->second);
  };
  blocks_->Add({{"phase", "cooling"}}).Set(phase(v1::BLOCK_PHASE_COOLING));
  blocks_->Add({{"phase", "half_open"}}).Set(phase(v1::BLOCK_PHASE_HALF_OPEN));
  for (const auto& [limit, total] : counts.cooldowns_started) {
    Advance(&cooldowns_->Add({{"limit", limit}}), total, &last_cooldowns_[limit]);
  }
  watchers_->Set(watching_replicas);
  Advance(lease_calls_, lease_calls, &last_lease_calls_);
  Advance(report_calls_, report_calls, &last_report_calls_);
  Advance(leased_, leased_total, &last_leased_);
}

void ControlplaneMetrics::RecordBalances(const v1::GetBalancesResponse& balances,
                                         const std::map<uint64_t, std::string>& account_by_id) {
  std::map<std::string, double> per_account;
  for (const v1::KeyBalance& b : balances.keys()) {
    if (b.status() != v1::BALANCE_STATUS_OK) continue;
    double value = 0;
    if (!absl::SimpleAtod(b.balance(), &value)) continue;
    auto it = account_by_id.find(b.id());
    per_account[it == account_by_id.end() ? b.fingerprint() : it->second] += value;
  }
  for (const auto& [account, value] : per_account) {
    balance_->Add({{"account", account}}).Set(value);
  }
}

}  // namespace sflb
