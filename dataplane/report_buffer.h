// ReportBuffer: what a dataplane owes the controlplane — per-key usage counters and key
// outcomes — gathered off the request path and shipped in batches by ControlplaneLink.
//
// Thread-safe. Record*() are called on request threads: O(1), one short lock.
#ifndef SFLB_DATAPLANE_REPORT_BUFFER_H_
#define SFLB_DATAPLANE_REPORT_BUFFER_H_

#include <cstdint>
#include <deque>

#include "absl/container/flat_hash_map.h"
#include "absl/time/time.h"
#include "common/mutex.h"
#include "sflb/v1/key_service.pb.h"

namespace sflb {

class ReportBuffer {
 public:
  // At most this many outcomes are kept while the controlplane is away; older ones are
  // dropped (and counted).
  static constexpr size_t kMaxOutcomes = 10000;

  // One request sent upstream with key `key_id` at `when`.
  void RecordRequest(uint64_t key_id, absl::Time when);
  // Tokens from an upstream usage object.
  void RecordTokens(uint64_t key_id, uint64_t prompt_tokens, uint64_t completion_tokens);
  // A failure (or probe success) with a key. Wakes the sender at once: failures are urgent.
  void RecordOutcome(v1::KeyOutcome outcome);

  // Waits up to `timeout` for an urgent outcome. Returns true if one is pending.
  bool WaitForUrgent(absl::Duration timeout);

  // Moves everything recorded so far into `out` (usage and outcomes). Returns false when
  // there was nothing to send.
  bool Take(v1::ReportRequest* out);
  // Puts back a report that could not be delivered, merging with what arrived since.
  void Restore(const v1::ReportRequest& report);

  uint64_t dropped_outcomes() const;

 private:
  void AddUsage(const v1::KeyUsage& usage) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable Mutex mu_;
  CondVar urgent_cv_;
  absl::flat_hash_map<uint64_t, v1::KeyUsage> usage_ ABSL_GUARDED_BY(mu_);
  std::deque<v1::KeyOutcome> outcomes_ ABSL_GUARDED_BY(mu_);
  uint64_t dropped_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace sflb

#endif  // SFLB_DATAPLANE_REPORT_BUFFER_H_
