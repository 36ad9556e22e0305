// Tests of dataplane/report_buffer: usage sums, outcome queue, Take/Restore and the urgent wait.
#include "dataplane/report_buffer.h"

#include <algorithm>
#include <atomic>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/time_format.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sflb {
namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;
using ::testing::SizeIs;

const absl::Time kT0 = absl::FromUnixSeconds(1767225600);

v1::KeyOutcome Outcome(uint64_t key_id, int n) {
  v1::KeyOutcome o;
  o.set_key_id(key_id);
  o.set_kind(v1::OUTCOME_KIND_RATE_LIMITED);
  o.set_http_status(429);
  o.set_model(absl::StrCat("model-", n));
  return o;
}

std::map<uint64_t, v1::KeyUsage> UsageById(const v1::ReportRequest& r) {
  std::map<uint64_t, v1::KeyUsage> out;
  for (const v1::KeyUsage& u : r.usage()) {
    EXPECT_EQ(out.count(u.key_id()), 0u) << "one entry per key";
    out[u.key_id()] = u;
  }
  return out;
}

std::vector<std::string> Models(const v1::ReportRequest& r) {
  std::vector<std::string> out;
  for (const v1::KeyOutcome& o : r.outcomes()) out.push_back(o.model());
  return out;
}

TEST(ReportBufferTest, TakeOnEmptyIsFalseAndLeavesOutAlone) {
  ReportBuffer buffer;
  v1::ReportRequest out;
  out.set_replica_id("r1");
  EXPECT_FALSE(buffer.Take(&out));
  EXPECT_EQ(out.replica_id(), "r1");
  EXPECT_THAT(out.usage(), IsEmpty());
  EXPECT_THAT(out.outcomes(), IsEmpty());
}

TEST(ReportBufferTest, SumsPerKeyWithLatestLastUsed) {
  ReportBuffer buffer;
  buffer.RecordRequest(1, kT0 + absl::Seconds(5));
  buffer.RecordRequest(1, kT0 + absl::Seconds(9));
  buffer.RecordRequest(1, kT0 + absl::Seconds(2));  // out of order: not the latest
  buffer.RecordRequest(2, kT0);
  buffer.RecordTokens(1, 100, 10);
  buffer.RecordTokens(1, 50, 5);
  buffer.RecordTokens(2, 7, 0);
  buffer.RecordTokens(3, 1, 1);  // tokens only

  v1::ReportRequest out;
  ASSERT_TRUE(buffer.Take(&out));
  std::map<uint64_t, v1::KeyUsage> usage = UsageById(out);
  ASSERT_THAT(usage, SizeIs(3));
  EXPECT_EQ(usage[1].requests(), 3u);
  EXPECT_EQ(usage[1].prompt_tokens(), 150u);
  EXPECT_EQ(usage[1].completion_tokens(), 15u);
  EXPECT_EQ(FromProtoTime(usage[1].last_used()), kT0 + absl::Seconds(9));
  EXPECT_EQ(usage[2].requests(), 1u);
  EXPECT_EQ(usage[2].prompt_tokens(), 7u);
  EXPECT_EQ(FromProtoTime(usage[2].last_used()), kT0);
  EXPECT_EQ(usage[3].requests(), 0u);
  EXPECT_EQ(usage[3].prompt_tokens(), 1u);
  EXPECT_FALSE(usage[3].has_last_used()) << "no request, no last_used";
  EXPECT_THAT(out.outcomes(), IsEmpty());
}

TEST(ReportBufferTest, TakeEmptiesTheBuffer) {
  ReportBuffer buffer;
  buffer.RecordRequest(1, kT0);
  buffer.RecordOutcome(Outcome(1, 0));
  v1::ReportRequest first;
  ASSERT_TRUE(buffer.Take(&first));
  EXPECT_THAT(first.usage(), SizeIs(1));
  EXPECT_THAT(first.outcomes(), SizeIs(1));
  v1::ReportRequest second;
  EXPECT_FALSE(buffer.Take(&second));
  EXPECT_THAT(second.usage(), IsEmpty());
  EXPECT_THAT(second.outcomes(), IsEmpty());

  // New records after a Take start from zero.
  buffer.RecordRequest(1, kT0);
  v1::ReportRequest third;
  ASSERT_TRUE(buffer.Take(&third));
  ASSERT_THAT(third.usage(), SizeIs(1));
  EXPECT_EQ(third.usage(0).requests(), 1u);
}

TEST(ReportBufferTest, OutcomesKeepTheirOrder) {
  ReportBuffer buffer;
  for (int i = 0; i < 5; ++i) buffer.RecordOutcome(Outcome(i % 2, i));
  v1::ReportRequest out;
  ASSERT_TRUE(buffer.Take(&out));
  EXPECT_THAT(Models(out), ElementsAre("model-0", "model-1", "model-2", "model-3", "model-4"));
  EXPECT_EQ(out.outcomes(1).key_id(), 1u);
  EXPECT_EQ(out.outcomes(1).http_status(), 429);
}

TEST(ReportBufferTest, RestoreMergesWithWhatArrivedSince) {
  ReportBuffer buffer;
  buffer.RecordRequest(1, kT0 + absl::Seconds(10));
  buffer.RecordTokens(1, 100, 20);
  buffer.RecordOutcome(Outcome(1, 0));
  buffer.RecordOutcome(Outcome(1, 1));
  v1::ReportRequest failed;
  ASSERT_TRUE(buffer.Take(&failed));

  // While the report was in flight:
  buffer.RecordRequest(1, kT0 + absl::Seconds(5));  // older than the restored last_used
  buffer.RecordRequest(2, kT0 + absl::Seconds(1));
  buffer.RecordOutcome(Outcome(2, 2));

  buffer.Restore(failed);
  v1::ReportRequest out;
  ASSERT_TRUE(buffer.Take(&out));
  std::map<uint64_t, v1::KeyUsage> usage = UsageById(out);
  ASSERT_THAT(usage, SizeIs(2));
  EXPECT_EQ(usage[1].requests(), 2u);
  EXPECT_EQ(usage[1].prompt_tokens(), 100u);
  EXPECT_EQ(usage[1].completion_tokens(), 20u);
  EXPECT_EQ(FromProtoTime(usage[1].last_used()), kT0 + absl::Seconds(10));
  EXPECT_EQ(usage[2].requests(), 1u);
  // Restored (older) outcomes come first.
  EXPECT_THAT(Models(out), ElementsAre("model-0", "model-1", "model-2"));
  EXPECT_EQ(buffer.dropped_outcomes(), 0u);
}

TEST(ReportBufferTest, RestoreIntoAnEmptyBufferGivesTheSameReport) {
  ReportBuffer buffer;
  buffer.RecordRequest(4, kT0);
  buffer.RecordOutcome(Outcome(4, 0));
  v1::ReportRequest failed;
  ASSERT_TRUE(buffer.Take(&failed));
  buffer.Restore(failed);
  v1::ReportRequest again;
  ASSERT_TRUE(buffer.Take(&again));
  EXPECT_EQ(again.SerializeAsString(), failed.SerializeAsString());
}

TEST(ReportBufferTest, OutcomesAreBoundedAndDropsCounted) {
  ReportBuffer buffer;
  const int extra = 7;
  for (size_t i = 0; i < ReportBuffer::kMaxOutcomes + extra; ++i) {
    buffer.RecordOutcome(Outcome(1, static_cast<int>(i)));
  }
  EXPECT_EQ(buffer.dropped_outcomes(), static_cast<uint64_t>(extra));
  v1::ReportRequest out;
  ASSERT_TRUE(buffer.Take(&out));
  ASSERT_EQ(static_cast<size_t>(out.outcomes_size()), ReportBuffer::kMaxOutcomes);
  // The oldest were dropped.
  EXPECT_EQ(out.outcomes(0).model(), absl::StrCat("model-", extra));
  EXPECT_EQ(out.outcomes(out.outcomes_size() - 1).model(),
            absl::StrCat("model-", ReportBuffer::kMaxOutcomes + extra - 1));
  EXPECT_EQ(buffer.dropped_outcomes(), static_cast<uint64_t>(extra)) << "Take does not reset it";
}

TEST(ReportBufferTest, RestoreBeyondTheBoundDropsTheOldest) {
  ReportBuffer buffer;
  for (size_t i = 0; i < ReportBuffer::kMaxOutcomes; ++i) {
    buffer.RecordOutcome(Outcome(1, static_cast<int>(i)));
  }
  v1::ReportRequest failed;
  ASSERT_TRUE(buffer.Take(&failed));
  EXPECT_EQ(buffer.dropped_outcomes(), 0u);
  buffer.RecordOutcome(Outcome(2, -1));
  buffer.RecordOutcome(Outcome(2, -2));
  buffer.Restore(failed);
  EXPECT_EQ(buffer.dropped_outcomes(), 2u);
  v1::ReportRequest out;
  ASSERT_TRUE(buffer.Take(&out));
  ASSERT_EQ(static_cast<size_t>(out.outcomes_size()), ReportBuffer::kMaxOutcomes);
  EXPECT_EQ(out.outcomes(0).model(), "model-2");
  EXPECT_EQ(out.outcomes(out.outcomes_size() - 2).model(), "model--1");
  EXPECT_EQ(out.outcomes(out.outcomes_size() - 1).model(), "model--2");
}

TEST(ReportBufferTest, WaitForUrgentTimesOutWithoutOutcome) {
  ReportBuffer buffer;
  buffer.RecordRequest(1, kT0);  // usage is not urgent
  buffer.RecordTokens(1, 1, 1);
  absl::Time start = absl::Now();
  EXPECT_FALSE(buffer.WaitForUrgent(absl::Milliseconds(100)));
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(95));
}

TEST(ReportBufferTest, WaitForUrgentReturnsAtOnceWhenAnOutcomeIsPending) {
  ReportBuffer buffer;
  buffer.RecordOutcome(Outcome(1, 0));
  absl::Time start = absl::Now();
  EXPECT_TRUE(buffer.WaitForUrgent(absl::Seconds(10)));
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  // Waiting does not consume it.
  EXPECT_TRUE(buffer.WaitForUrgent(absl::ZeroDuration()));
}

TEST(ReportBufferTest, WaitForUrgentWakesOnRecordOutcome) {
  ReportBuffer buffer;
  std::atomic<bool> returned{false};
  bool result = false;
  absl::Duration waited;
  std::thread waiter([&] {
    absl::Time start = absl::Now();
    result = buffer.WaitForUrgent(absl::Seconds(10));
    waited = absl::Now() - start;
    returned = true;
  });
  buffer.RecordRequest(1, kT0);
  EXPECT_FALSE(returned.load()) << "usage must not satisfy the wait";
  buffer.RecordOutcome(Outcome(1, 0));
  waiter.join();
  EXPECT_TRUE(result);
  EXPECT_LT(waited, absl::Seconds(5)) << "woken by the outcome, not the timeout";
}

TEST(ReportBufferTest, ConcurrentRecordsAreAllCounted) {
  ReportBuffer buffer;
  constexpr int kThreads = 4;
  constexpr int kPerThread = 2000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&buffer, t] {
      for (int i = 0; i < kPerThread; ++i) {
        uint64_t id = static_cast<uint64_t>(i % 3);
        buffer.RecordRequest(id, kT0 + absl::Seconds(t * kPerThread + i));
        buffer.RecordTokens(id, 2, 1);
        if (i % 100 == 0) buffer.RecordOutcome(Outcome(id, i));
      }
    });
  }
  // A sender taking reports concurrently.
  v1::ReportRequest taken;
  for (int i = 0; i < 50; ++i) buffer.Take(&taken);
  for (std::thread& t : threads) t.join();
  buffer.Take(&taken);

  uint64_t requests = 0, prompt = 0, completion = 0;
  absl::Time latest = absl::InfinitePast();
  for (const v1::KeyUsage& u : taken.usage()) {
    requests += u.requests();
    prompt += u.prompt_tokens();
    completion += u.completion_tokens();
    if (u.has_last_used()) latest = std::max(latest, FromProtoTime(u.last_used()));
  }
  EXPECT_EQ(requests, static_cast<uint64_t>(kThreads * kPerThread));
  EXPECT_EQ(prompt, 2u * kThreads * kPerThread);
  EXPECT_EQ(completion, 1u * kThreads * kPerThread);
  EXPECT_EQ(latest, kT0 + absl::Seconds(kThreads * kPerThread - 1));
  EXPECT_EQ(taken.outcomes_size(), kThreads * (kPerThread / 100));
}

}  // namespace
}  // namespace sflb
