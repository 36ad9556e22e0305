#include "dataplane/legacy_api.h"

#include "absl/container/flat_hash_map.h"
#include "common/time_format.h"

namespace sflb {
namespace {

std::string IsoOrNever(const google::protobuf::Timestamp& t, bool has) {
  return has ? FormatIso8601(FromProtoTime(t)) : std::string("Never");
}

const char* StateName(v1::KeyState state) {
  switch (state) {
    case v1::KEY_STATE_ACTIVE: return "active";
    case v1::KEY_STATE_COOLING: return "cooling";
    case v1::KEY_STATE_INVALID: return "invalid";
    case v1::KEY_STATE_DEPLETED: return "depleted";
    case v1::KEY_STATE_DISABLED: return "disabled";
    default: return "unknown";
  }
}

}  // namespace

nlohmann::ordered_json LegacyStatsJson(const v1::GetStatsResponse& stats,
                                       const v1::GetBalancesResponse* balances) {
  absl::flat_hash_map<uint64_t, const v1::KeyBalance*> balance_by_id;
  if (balances != nullptr) {
    for (const v1::KeyBalance& b : balances->keys()) balance_by_id[b.id()] = &b;
  }
  nlohmann::ordered_json out;
  out["totalKeys"] = stats.total_keys();
  out["activeKeys"] = stats.active_keys();
  nlohmann::ordered_json keys = nlohmann::ordered_json::array();
  for (const v1::KeyStatus& k : stats.keys()) {
    nlohmann::ordered_json row;
    row["index"] = k.index() + 1;
    row["requestCount"] = k.request_count();
    row["lastUsed"] = IsoOrNever(k.last_used(), k.has_last_used());
    row["isActive"] = k.state() == v1::KEY_STATE_ACTIVE;
    auto b = balance_by_id.find(k.id());
    bool known = b != balance_by_id.end() && b->second->status() == v1::BALANCE_STATUS_OK;
    if (known) row["balance"] = std::stod(b->second->balance());
    row["lastBalanceCheck"] =
        b != balance_by_id.end() ? IsoOrNever(b->second->checked_at(), b->second->has_checked_at())
                                 : std::string("Never");
    row["key"] = k.masked();
    row["fingerprint"] = k.fingerprint();
    row["account"] = k.account();
    row["state"] = StateName(k.state());
    row["stateReason"] = k.state_reason();
    if (k.has_state_until()) row["cooldownUntil"] = FormatIso8601(FromProtoTime(k.state_until()));
    row["promptTokens"] = k.prompt_tokens();
    row["completionTokens"] = k.completion_tokens();
    row["tokensUsed"] = k.prompt_tokens() + k.completion_tokens();
    row["forbiddenModels"] = std::vector<std::string>(k.forbidden_models().begin(),
                                                      k.forbidden_models().end());
    keys.push_back(std::move(row));
  }
  out["keyStats"] = std::move(keys);
  nlohmann::ordered_json blocks = nlohmann::ordered_json::array();
  for (const v1::ScopeBlock& b : stats.blocks()) {
    blocks.push_back({{"account", b.account()},
                      {"model", b.model()},
                      {"phase", b.phase() == v1::BLOCK_PHASE_HALF_OPEN ? "half-open" : "cooling"},
                      {"until", FormatIso8601(FromProtoTime(b.until()))},
                      {"limit", b.limit()},
                      {"strikes", b.strikes()}});
  }
  out["blocks"] = std::move(blocks);
  out["totalRequests"] = stats.total_requests();
  return out;
}

nlohmann::ordered_json LegacyBalanceJson(const v1::GetBalancesResponse& balances, absl::Time now) {
  nlohmann::ordered_json out;
  out["success"] = true;
  out["timestamp"] = FormatIso8601(now);
  out["totalBalance"] = balances.total_balance().empty() ? "0.0000" : balances.total_balance();
  nlohmann::ordered_json keys = nlohmann::ordered_json::array();
  for (const v1::KeyBalance& b : balances.keys()) {
    nlohmann::ordered_json row;
    row["index"] = b.index() + 1;
    row["balance"] = b.status() == v1::BALANCE_STATUS_OK ? b.balance() : std::string("0.0000");
    row["lastChecked"] = IsoOrNever(b.checked_at(), b.has_checked_at());
    row["isActive"] = b.active();
    row["fingerprint"] = b.fingerprint();
    row["status"] = b.status() == v1::BALANCE_STATUS_OK
                        ? "ok"
                        : (b.status() == v1::BALANCE_STATUS_UNAVAILABLE ? "unavailable" : "error");
    if (!b.error().empty()) row["error"] = b.error();
    if (!b.account_id().empty()) row["accountId"] = b.account_id();
    keys.push_back(std::move(row));
  }
  out["keyBalances"] = std::move(keys);
  out["available"] = !balances.unavailable();
  out["message"] = balances.message();
  return out;
}

std::string HealthStatus(bool has_snapshot, bool controlplane_connected, size_t total_keys,
                         size_t usable_keys) {
  if (!has_snapshot || usable_keys == 0) return "unhealthy";
  if (!controlplane_connected || usable_keys * 2 < total_keys) return "degraded";
  return "healthy";
}

}  // namespace sflb
