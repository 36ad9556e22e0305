#include "controlplane/key_balances.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/log.h"
#include "common/time_format.h"

namespace sflb {

KeyBalances::KeyBalances(KeyRegistry* registry, BalanceChecker* checker, AuditLog* audit,
                         double depleted_threshold)
    : registry_(registry),
      checker_(checker),
      audit_(audit),
      depleted_threshold_(depleted_threshold) {}

v1::GetBalancesResponse KeyBalances::Check(bool refresh, bool cached_only) {
  std::vector<KeyRegistry::BalanceKey> keys = registry_->BalanceKeys();
  std::vector<KeyBalance> results;
  if (cached_only) {
    for (const auto& k : keys) {
      absl::optional<KeyBalance> cached = checker_->Cached(k.id);
      if (cached.has_value() && cached->fingerprint == k.fingerprint) {
        results.push_back(*cached);
      } else {
        KeyBalance unknown;
        unknown.id = k.id;
        unknown.fingerprint = k.fingerprint;
        unknown.status = BalanceStatus::kError;
        unknown.error = "not checked yet";
        results.push_back(unknown);
      }
    }
  } else {
    std::vector<BalanceTarget> targets;
    targets.reserve(keys.size());
    for (const auto& k : keys) targets.push_back({k.id, k.secret, k.fingerprint});
    results = checker_->Get(targets, refresh);
  }

  v1::GetBalancesResponse out;
  double total = 0;
  size_t ok = 0, unavailable = 0;
  std::vector<std::pair<uint64_t, std::string>> accounts;
  for (size_t i = 0; i < keys.size() && i < results.size(); ++i) {
    const KeyRegistry::BalanceKey& k = keys[i];
    const KeyBalance& b = results[i];
    v1::KeyBalance* row = out.add_keys();
    row->set_index(k.index);
    row->set_id(k.id);
    row->set_fingerprint(k.fingerprint);
    row->set_active(k.active);
    if (b.checked_at != absl::InfinitePast()) *row->mutable_checked_at() = ToProtoTime(b.checked_at);
    switch (b.status) {
      case BalanceStatus::kOk:
        row->set_status(v1::BALANCE_STATUS_OK);
        row->set_balance(b.total_balance);
        row->set_account_id(b.account_id);
        total += b.total_balance_value;
        ++ok;
        if (!b.account_id.empty()) accounts.emplace_back(k.id, b.account_id);
        if (!b.from_cache && k.active && b.total_balance_value <= depleted_threshold_) {
          std::string reason =
              absl::StrCat("balance ", b.total_balance, " at or below the threshold ",
                           absl::StrFormat("%.4f", depleted_threshold_));
          registry_->SetState(k.id, v1::KEY_STATE_DEPLETED, reason, absl::InfinitePast(),
                              "balance-check");
          LogWarning("key_depleted", {{"key", k.fingerprint}, {"balance", b.total_balance}});
          if (audit_ != nullptr) {
            absl::Status w = audit_->Append(AuditEntry{"key_state", "balance-check",
                                                       {{"key", k.fingerprint},
                                                        {"from", "KEY_STATE_ACTIVE"},
                                                        {"to", "KEY_STATE_DEPLETED"},
                                                        {"reason", reason}}});
            if (!w.ok()) LogError("audit_write_failed", {{"reason", std::string(w.message())}});
          }
        }
        break;
      case BalanceStatus::kUnavailable:
        row->set_status(v1::BALANCE_STATUS_UNAVAILABLE);
        row->set_error(b.error);
        ++unavailable;
        break;
      default:
        row->set_status(v1::BALANCE_STATUS_ERROR);
        row->set_error(b.error);
        break;
    }
  }
  if (!accounts.empty()) registry_->AssignAccounts(accounts);
  out.set_total_balance(absl::StrFormat("%.4f", total));
  out.set_unavailable(!keys.empty() && unavailable == keys.size());
  if (keys.empty()) {
    out.set_message("no keys configured");
  } else if (out.unavailable()) {
    out.set_message(
        "balances are unavailable: the upstream no longer offers user/info (HTTP 410); "
        "sflb keeps serving, and token counts per key remain in /stats");
  } else {
    out.set_message(absl::StrCat(ok, " of ", keys.size(), " balances known",
                                 unavailable > 0 ? absl::StrCat(", ", unavailable, " unavailable") : "",
                                 ok + unavailable < keys.size()
                                     ? absl::StrCat(", ", keys.size() - ok - unavailable, " failed")
                                     : ""));
  }
  return out;
}

}  // namespace sflb
