#include "dataplane/report_buffer.h"

#include "common/time_format.h"

namespace sflb {

void ReportBuffer::RecordRequest(uint64_t key_id, absl::Time when) {
  v1::KeyUsage usage;
  usage.set_key_id(key_id);
  usage.set_requests(1);
  *usage.mutable_last_used() = ToProtoTime(when);
  MutexLock lock(&mu_);
  AddUsage(usage);
}

void ReportBuffer::RecordTokens(uint64_t key_id, uint64_t prompt_tokens,
                                uint64_t completion_tokens) {
  v1::KeyUsage usage;
  usage.set_key_id(key_id);
  usage.set_prompt_tokens(prompt_tokens);
  usage.set_completion_tokens(completion_tokens);
  MutexLock lock(&mu_);
  AddUsage(usage);
}

void ReportBuffer::AddUsage(const v1::KeyUsage& usage) {
  v1::KeyUsage& sum = usage_[usage.key_id()];
  sum.set_key_id(usage.key_id());
  sum.set_requests(sum.requests() + usage.requests());
  sum.set_prompt_tokens(sum.prompt_tokens() + usage.prompt_tokens());
  sum.set_completion_tokens(sum.completion_tokens() + usage.completion_tokens());
  if (usage.has_last_used() &&
      (!sum.has_last_used() || FromProtoTime(usage.last_used()) > FromProtoTime(sum.last_used()))) {
    *sum.mutable_last_used() = usage.last_used();
  }
}

void ReportBuffer::RecordOutcome(v1::KeyOutcome outcome) {
  MutexLock lock(&mu_);
  outcomes_.push_back(std::move(outcome));
  while (outcomes_.size() > kMaxOutcomes) {
    outcomes_.pop_front();
    ++dropped_;
  }
  urgent_cv_.Signal();
}

bool ReportBuffer::WaitForUrgent(absl::Duration timeout) {
  absl::Time deadline = absl::Now() + timeout;
  MutexLock lock(&mu_);
  while (outcomes_.empty()) {
    if (!urgent_cv_.WaitWithDeadline(&mu_, deadline)) break;
  }
  return !outcomes_.empty();
}

bool ReportBuffer::Take(v1::ReportRequest* out) {
  MutexLock lock(&mu_);
  if (usage_.empty() && outcomes_.empty()) return false;
  for (auto& [id, usage] : usage_) *out->add_usage() = std::move(usage);
  for (auto& outcome : outcomes_) *out->add_outcomes() = std::move(outcome);
  usage_.clear();
  outcomes_.clear();
  return true;
}

void ReportBuffer::Restore(const v1::ReportRequest& report) {
  MutexLock lock(&mu_);
  for (const v1::KeyUsage& usage : report.usage()) AddUsage(usage);
  // Older outcomes go in front, keeping the order in which they were seen.
  for (int i = report.outcomes_size() - 1; i >= 0; --i) outcomes_.push_front(report.outcomes(i));
  while (outcomes_.size() > kMaxOutcomes) {
    outcomes_.pop_front();
    ++dropped_;
  }
}

uint64_t ReportBuffer::dropped_outcomes() const {
  MutexLock lock(&mu_);
  return dropped_;
}

}  // namespace sflb
