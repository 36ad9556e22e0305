// The old Bun tool's own endpoints, with its JSON shapes, answered from controlplane data:
// GET / , /stats, /health, /balance and POST /reload-keys. sflb adds its own fields beside
// the old ones; nothing the old tool returned is renamed or removed. Pure JSON building here;
// routing and auth live in dataplane_server.cc.
#ifndef SFLB_DATAPLANE_LEGACY_API_H_
#define SFLB_DATAPLANE_LEGACY_API_H_

#include <string>

#include "absl/time/time.h"
#include "nlohmann/json.hpp"
#include "sflb/v1/admin_service.pb.h"

namespace sflb {

// The /stats object: totalKeys, activeKeys, keyStats[] (index is 1-based as in the old tool)
// with requestCount, lastUsed (ISO-8601 or "Never"), isActive, balance (when known),
// lastBalanceCheck, plus state, stateReason, cooldownUntil, account, fingerprint, key (masked),
// promptTokens, completionTokens, forbiddenModels; and blocks[] (rate-limit scopes).
nlohmann::ordered_json LegacyStatsJson(const v1::GetStatsResponse& stats,
                                       const v1::GetBalancesResponse* balances);

// The /balance object: success, timestamp, totalBalance ("0.0000"), keyBalances[] of index
// (1-based), balance ("0.0000" when unknown), lastChecked (ISO or "Never"), isActive; plus
// available, message and per-key status/error/accountId.
nlohmann::ordered_json LegacyBalanceJson(const v1::GetBalancesResponse& balances, absl::Time now);

// "healthy", "degraded" (controlplane unreachable, or fewer than half of the keys usable) or
// "unhealthy" (no usable key, or no key set yet).
std::string HealthStatus(bool has_snapshot, bool controlplane_connected, size_t total_keys,
                         size_t usable_keys);

}  // namespace sflb

#endif  // SFLB_DATAPLANE_LEGACY_API_H_
