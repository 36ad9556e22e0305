// KeyBalances: the pool's balances — BalanceChecker results joined with the key registry.
// Turns a known balance at or below the threshold into DEPLETED (never deleting the key, unlike
// the old tool), groups keys into accounts by the upstream's data.id where keys.txt named none,
// and builds the AdminService answer.
#ifndef SFLB_CONTROLPLANE_KEY_BALANCES_H_
#define SFLB_CONTROLPLANE_KEY_BALANCES_H_

#include "controlplane/audit_log.h"
#include "controlplane/balance_checker.h"
#include "controlplane/key_registry.h"
#include "sflb/v1/admin_service.pb.h"

namespace sflb {

// Thread-safe (its parts are).
class KeyBalances {
 public:
  // All pointers must outlive this; `audit` may be null. A balance at or below
  // `depleted_threshold` marks an active key DEPLETED.
  KeyBalances(KeyRegistry* registry, BalanceChecker* checker, AuditLog* audit,
              double depleted_threshold);

  // Balances of every key: from the checker's cache unless `refresh`; with `cached_only` no
  // upstream call is made at all. Applies depletion and account grouping from fresh results.
  v1::GetBalancesResponse Check(bool refresh, bool cached_only);

 private:
  KeyRegistry* const registry_;
  BalanceChecker* const checker_;
  AuditLog* const audit_;
  const double depleted_threshold_;
};

}  // namespace sflb

#endif  // SFLB_CONTROLPLANE_KEY_BALANCES_H_
