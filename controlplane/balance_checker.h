// BalanceChecker: asks SiliconFlow for the balance behind each upstream key
// (GET {SILICONFLOW_BASE_URL}/user/info with the key as bearer token), with a cache, bounded
// concurrency and a timeout per call.
//
// A success looks like {"code":20000,"status":true,"data":{"id":"<account>","balance":"0.88",
// "chargeBalance":"88.00","totalBalance":"88.88",...}}: `totalBalance` is the total, as a
// decimal string. The endpoint is reportedly being retired: HTTP 410 (or 404) is reported as
// kUnavailable, not as an error. One key's failure never affects another key's result.
//
// Secrets: a key's secret is used only for the request; it is never stored in the cache, logged
// or put into an error message (upstream error text is scrubbed of it).
//
// Thread-safe: every method may be called from any thread. Get() blocks its caller while it
// fetches, on worker threads it starts and joins itself; no lock is held across a fetch.
#ifndef SFLB_CONTROLPLANE_BALANCE_CHECKER_H_
#define SFLB_CONTROLPLANE_BALANCE_CHECKER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "absl/types/optional.h"
#include "common/clock.h"
#include "common/mutex.h"

namespace sflb {

// What one GET user/info returned. The seam between the checker and the network.
struct FetchResult {
  // HTTP status; 0 if no response was received (connect/TLS/timeout error).
  int http_status = 0;
  // Response body (possibly truncated by the fetcher).
  std::string body;
  // Transport error description when http_status == 0. Must not contain the secret.
  std::string error;
};

// Fetches user/info for one key. Must return within a bounded time (the default one honours
// BalanceCheckerOptions::timeout) and be callable from several threads at once.
using BalanceFetchFn = std::function<FetchResult(const std::string& secret)>;

struct BalanceCheckerOptions {
  // SILICONFLOW_BASE_URL: "http[s]://host[:port][/path]"; user/info is fetched from
  // `base_url` + "/user/info". Used only by the default fetch. Default SiliconFlow's API.
  std::string base_url = "https://api.siliconflow.cn/v1";
  // Per call: connect, and each read/write, of the default fetch; the whole call is also
  // abandoned once this much time has passed while reading the body. Default 10 s.
  absl::Duration timeout = absl::Seconds(10);
  // Most user/info requests in flight at once, across all concurrent Get() calls. Default 8.
  int max_concurrency = 8;
  // How long a kOk or kUnavailable result is served from the cache. Default 5 minutes.
  absl::Duration cache_ttl = absl::Minutes(5);
  // How long a kError result is served from the cache, so that a failing key is not retried on
  // every request. Default 30 s.
  absl::Duration error_ttl = absl::Seconds(30);
  // Time source for `checked_at` and cache expiry. Default: the real clock. Must outlive the
  // checker.
  Clock* clock = RealClock::Get();
  // The fetch used for every key. Default (empty): DefaultBalanceFetch(base_url, timeout), an
  // httplib client over HTTP(S) with certificate verification.
  BalanceFetchFn fetch;
};

// One key to check.
struct BalanceTarget {
  uint64_t id = 0;          // Registry id; the cache key.
  std::string secret;       // Used only for the request.
  std::string fingerprint;  // KeyFingerprint(secret); echoed in the result.
};

enum class BalanceStatus {
  kOk,           // total_balance and account_id are set.
  kUnavailable,  // HTTP 410/404: the balance endpoint is retired upstream. Not the key's fault.
  kError,        // Network error, timeout, 401/403/429/5xx, unexpected body, ... See `error`.
};

// "ok", "unavailable", "error".
const char* BalanceStatusName(BalanceStatus status);

struct KeyBalance {
  uint64_t id = 0;
  std::string fingerprint;
  BalanceStatus status = BalanceStatus::kError;
  // data.totalBalance with exactly 4 decimal places ("88.8800"); empty unless kOk.
  std::string total_balance;
  // The same as a double (0 unless kOk).
  double total_balance_value = 0;
  // data.id, the account the key belongs to; empty unless kOk.
  std::string account_id;
  // When the answer was received (clock time). InfinitePast() for a never-checked key.
  absl::Time checked_at = absl::InfinitePast();
  // Why the status is not kOk, for people; never contains the key. Empty for kOk.
  std::string error;
  // HTTP status of the upstream answer (0 if none).
  int http_status = 0;
  // True if this result came from the cache rather than a fetch made for this Get().
  bool from_cache = false;
};

// Parses a decimal string ("88.88", "-1.5", "0") and returns it with exactly `places` decimal
// places, rounding half away from zero ("0.88" -> "0.8800", "88" -> "88.0000",
// "1.23456" -> "1.2346"). INVALID_ARGUMENT for anything else (exponents, spaces, "", "1,5").
absl::StatusOr<std::string> NormalizeDecimal(absl::string_view text, int places = 4);

// The production fetch: GET `base_url`/user/info with "Authorization: Bearer <secret>" through
// httplib (HTTPS verified against the system CA store), connect/read/write timeouts of `timeout`,
// no redirects, body capped at 1 MiB. A malformed base URL yields an error result on every call.
BalanceFetchFn DefaultBalanceFetch(const std::string& base_url, absl::Duration timeout);

class BalanceChecker {
 public:
  explicit BalanceChecker(BalanceCheckerOptions options);
  // No Get() may be in progress.
  ~BalanceChecker();
  BalanceChecker(const BalanceChecker&) = delete;
  BalanceChecker& operator=(const BalanceChecker&) = delete;

  // One result per target, in the order of `keys`. A key whose cached result is still fresh
  // (see cache_ttl / error_ttl) and whose fingerprint is unchanged is answered from the cache
  // unless `refresh`; the others are fetched, at most max_concurrency at a time (across all
  // callers). A key whose fetch another caller already started is not fetched again: this call
  // waits for that result. Blocks for about ceil(fetches / max_concurrency) * timeout at worst.
  std::vector<KeyBalance> Get(const std::vector<BalanceTarget>& keys, bool refresh);

  // The last result for key `id`, however old (from_cache = true), or nullopt if it was never
  // checked.
  absl::optional<KeyBalance> Cached(uint64_t id) const;

  // Number of fetches made so far (for tests and metrics).
  uint64_t fetch_count() const;

 private:
  // A fetch in progress, shared by every Get() that wants its result.
  struct Pending {
    bool done = false;
    KeyBalance result;
  };

  // Runs the fetch for one key (taking a concurrency slot) and publishes the result.
  void FetchOne(const BalanceTarget& target, const std::shared_ptr<Pending>& pending);
  // Turns the fetch's answer into a result (no locks held).
  KeyBalance Interpret(const BalanceTarget& target, const FetchResult& fetched) const;
  bool FreshLocked(const KeyBalance& cached, absl::Time now) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const BalanceCheckerOptions options_;
  const BalanceFetchFn fetch_;

  mutable Mutex mu_;
  // Signalled when a pending fetch completes and when a concurrency slot frees up.
  CondVar changed_;
  absl::flat_hash_map<uint64_t, KeyBalance> cache_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<uint64_t, std::shared_ptr<Pending>> pending_ ABSL_GUARDED_BY(mu_);
  int active_fetches_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t fetch_count_ ABSL_GUARDED_BY(mu_) = 0;
  bool logged_unavailable_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace sflb

#endif  // SFLB_CONTROLPLANE_BALANCE_CHECKER_H_
