// End-to-end tests of key health (issue: key health): rate-limit scopes shared by all replicas,
// failover, cooldown lengths, half-open recovery, watchdogs, pool exhaustion, and controlplane
// loss and restart — real processes against the fake SiliconFlow injecting faults.
#include <algorithm>
#include <atomic>
#include <set>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/key_format.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/e2e/test_cluster.h"

namespace sflb::e2e {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

constexpr char kModelA[] = "Qwen/Qwen2.5-7B-Instruct";
constexpr char kModelB[] = "deepseek-ai/DeepSeek-V3";

std::string ChatBody(const std::string& model, bool stream = false) {
  return nlohmann::json{{"model", model},
                        {"stream", stream},
                        {"messages", {{{"role", "user"}, {"content", "hi"}}}}}
      .dump();
}

class KeyHealthTest : public ::testing::Test {
 protected:
  // Accounts: "team-a" holds keys 0 and 1, "team-b" key 2, "team-c" key 3.
  void StartCluster(int dataplanes, ClusterOptions options = {}) {
    keys_ = MakeKeys(4);
    options.key_lines = {keys_[0] + " account=team-a", keys_[1] + " account=team-a",
                         keys_[2] + " account=team-b", keys_[3] + " account=team-c"};
    options.dataplanes = dataplanes;
    absl::Status s = cluster_.Start(options);
    ASSERT_TRUE(s.ok()) << s;
  }

  void TearDown() override {
    std::string logs = cluster_.AllLogs();
    for (const std::string& key : keys_) {
      EXPECT_THAT(logs, Not(HasSubstr(key))) << "key leaked into a log: " << KeyFingerprint(key);
    }
  }

  httplib::Result Chat(int dp, const std::string& model, httplib::Headers extra = {}) {
    httplib::Headers headers = TestCluster::UserAuth();
    for (const auto& h : extra) headers.insert(h);
    return cluster_.Client(dp)->Post("/v1/chat/completions", headers, ChatBody(model),
                                     "application/json");
  }

  nlohmann::json Stats() {
    CommandResult r = cluster_.Ctl({"stats", "--json"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return nlohmann::json::parse(r.out, nullptr, false);
  }

  // Waits until the controlplane lists a block satisfying `predicate`.
  nlohmann::json WaitForBlock(const std::function<bool(const nlohmann::json&)>& predicate,
                              absl::Duration timeout = absl::Seconds(10)) {
    absl::Time deadline = absl::Now() + timeout;
    while (absl::Now() < deadline) {
      nlohmann::json stats = Stats();
      if (stats.contains("blocks")) {
        for (const auto& b : stats["blocks"]) {
          if (predicate(b)) return b;
        }
      }
      absl::SleepFor(absl::Milliseconds(20));
    }
    return nullptr;
  }

  std::string Account(const std::string& key) const {
    for (size_t i = 0; i < keys_.size(); ++i) {
      if (keys_[i] == key) return i < 2 ? "team-a" : (i == 2 ? "team-b" : "team-c");
    }
    return "?";
  }

  void AddFault(int key_index, const std::string& model, int status, int times,
                nlohmann::json headers = nlohmann::json::object(), const std::string& body = "") {
    nlohmann::json rule = {{"key", key_index < 0 ? "*" : keys_[key_index]},
                           {"model", model},
                           {"action", "status"},
                           {"status", status},
                           {"times", times},
                           {"headers", headers}};
    if (!body.empty()) rule["body"] = body;
    cluster_.AddFault(rule);
  }

  std::vector<std::string> keys_;
  TestCluster cluster_;
};

TEST_F(KeyHealthTest, RateLimitSeenByOneReplicaStopsAllReplicasForThatAccountAndModel) {
  StartCluster(3);
  // Both team-a keys answer 429 for model A (the account's TPM limit).
  AddFault(0, kModelA, 429, -1);
  AddFault(1, kModelA, 429, -1);
  // Until dp0 runs into team-a, keep sending; the client must never see the 429.
  bool hit = false;
  for (int i = 0; i < 8 && !hit; ++i) {
    auto res = Chat(0, kModelA);
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 200) << res->body;
    for (const auto& r : cluster_.FakeRequests()) hit = hit || r.value("status", 0) == 429;
  }
  ASSERT_TRUE(hit);
  nlohmann::json block = WaitForBlock([](const nlohmann::json& b) {
    return b.value("account", "") == "team-a" && b.value("model", "") == kModelA;
  });
  ASSERT_FALSE(block.is_null()) << "the controlplane never blocked (team-a, model A)";
  EXPECT_EQ(block.value("limit", ""), "TPM");
  // Give the watch push a moment to land (<100 ms in practice), then hammer replicas 1 and 2.
  absl::SleepFor(absl::Milliseconds(300));
  uint64_t mark = cluster_.FakeRequests().back()["seq"].get<uint64_t>();
  for (int i = 0; i < 24; ++i) {
    auto res = Chat(1 + i % 2, kModelA);
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 200);
  }
  // Model B still flows through team-a.
  for (int i = 0; i < 8; ++i) {
    auto res = Chat(1 + i % 2, kModelB);
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 200);
  }
  int team_a_model_a = 0, team_a_model_b = 0;
  for (const auto& r : cluster_.FakeRequests(mark)) {
    if (Account(r.value("key", "")) != "team-a") continue;
    if (r.value("model", "") == kModelA) ++team_a_model_a;
    if (r.value("model", "") == kModelB) ++team_a_model_b;
  }
  EXPECT_EQ(team_a_model_a, 0) << "a replica kept sending model A to a rate-limited account";
  EXPECT_GT(team_a_model_b, 0) << "a per-model limit blocked other models too";
}

TEST_F(KeyHealthTest, ClientErrorsAreNotRetriedAndReturnedUntouched) {
  StartCluster(1);
  std::string body = R"({"code":20012,"message":"Model does not exist.","data":null})";
  for (int status : {400, 404, 413, 422}) {
    cluster_.ResetFake();
    AddFault(-1, "*", status, 1, {{"X-Upstream-Detail", "kept"}}, body);
    auto res = Chat(0, kModelA);
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, status);
    EXPECT_EQ(res->body, body);
    EXPECT_EQ(res->get_header_value("X-Upstream-Detail"), "kept");
    EXPECT_EQ(cluster_.FakeRequests().size(), 1u) << "status " << status << " was retried";
  }
}

TEST_F(KeyHealthTest, InvalidKeyIsTakenOutEverywhereAndTheClientNeverNotices) {
  StartCluster(2);
  AddFault(2, "*", 401, -1);
  bool seen = false;
  for (int i = 0; i < 40 && !seen; ++i) {
    auto res = Chat(i % 2, kModelA);
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 200);
    for (const auto& r : cluster_.FakeRequests()) seen = seen || r.value("status", 0) == 401;
  }
  ASSERT_TRUE(seen);
  absl::Time deadline = absl::Now() + absl::Seconds(10);
  std::string state;
  while (absl::Now() < deadline && state != "KEY_STATE_INVALID") {
    nlohmann::json stats = Stats();
    for (const auto& k : stats["keys"]) {
      if (k.value("fingerprint", "") == KeyFingerprint(keys_[2])) state = k.value("state", "");
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_EQ(state, "KEY_STATE_INVALID");
  absl::SleepFor(absl::Milliseconds(200));
  uint64_t mark = cluster_.FakeRequests().back()["seq"].get<uint64_t>();
  for (int i = 0; i < 12; ++i) ASSERT_TRUE(Chat(i % 2, kModelA));
  for (const auto& r : cluster_.FakeRequests(mark)) {
    EXPECT_NE(KeyFingerprint(r.value("key", "")), KeyFingerprint(keys_[2]));
  }
}

TEST_F(KeyHealthTest, RetryAfterAndMessageDeriveTheCooldown) {
  StartCluster(1);
  AddFault(2, kModelA, 429, -1, {{"Retry-After", "7"}});
  AddFault(3, kModelA, 429, -1, nlohmann::json::object(),
           R"({"code":50603,"message":"Request was rejected due to rate limiting. Details: RPD limit reached.","data":null})");
  for (int i = 0; i < 8; ++i) ASSERT_TRUE(Chat(0, kModelA));
  nlohmann::json b = WaitForBlock([](const nlohmann::json& x) { return x["account"] == "team-b"; });
  ASSERT_FALSE(b.is_null());
  EXPECT_EQ(b.value("limit", ""), "Retry-After");
  absl::Time until;
  std::string err;
  ASSERT_TRUE(absl::ParseTime(absl::RFC3339_full, b["until"].get<std::string>(), &until, &err));
  EXPECT_GT(until - absl::Now(), absl::Seconds(4));
  EXPECT_LT(until - absl::Now(), absl::Seconds(8));
  nlohmann::json c = WaitForBlock([](const nlohmann::json& x) { return x["account"] == "team-c"; });
  ASSERT_FALSE(c.is_null());
  EXPECT_EQ(c.value("limit", ""), "RPD");
  ASSERT_TRUE(absl::ParseTime(absl::RFC3339_full, c["until"].get<std::string>(), &until, &err));
  EXPECT_GT(until - absl::Now(), absl::Minutes(1)) << "a per-day limit must cool much longer";
}

TEST_F(KeyHealthTest, HalfOpenProbeReopensTheScopeWithoutAStampede) {
  ClusterOptions options;
  options.controlplane_env = {{"SFLB_DEFAULT_COOLDOWN", "1s"}, {"SFLB_PROBE_TIMEOUT", "5s"}};
  StartCluster(2, options);
  // team-b's only key is limited exactly once.
  AddFault(2, kModelA, 429, 1, nlohmann::json::object(),
           R"({"code":50603,"message":"rate limited","data":null})");
  for (int i = 0; i < 8; ++i) ASSERT_TRUE(Chat(i % 2, kModelA));
  ASSERT_FALSE(WaitForBlock([](const nlohmann::json& x) { return x["account"] == "team-b"; }).is_null());
  uint64_t mark = cluster_.FakeRequests().back()["seq"].get<uint64_t>();
  // From now on team-b answers slowly, so its probe stays in flight for 1.5 s (well inside the
  // 5 s probe timeout, so a loaded machine cannot time the probe out and let a second one in).
  cluster_.AddFault({{"key", keys_[2]}, {"model", "*"}, {"action", "latency"},
                     {"delay_ms", 1500}, {"times", -1}});
  // Concurrent traffic on both replicas until the block is gone.
  absl::Time deadline = absl::Now() + absl::Seconds(20);
  bool cleared = false;
  std::atomic<int> failed{0};
  while (absl::Now() < deadline && !cleared) {
    std::vector<std::thread> burst;
    for (int i = 0; i < 8; ++i) {
      burst.emplace_back([&, i] {
        auto res = Chat(i % 2, kModelA);
        if (!res || res->status != 200) failed.fetch_add(1);
      });
    }
    for (auto& t : burst) t.join();
    nlohmann::json stats = Stats();
    cleared = !stats.contains("blocks") || stats["blocks"].empty();
  }
  ASSERT_TRUE(cleared) << "the half-open probe never reopened the scope";
  EXPECT_EQ(failed.load(), 0);
  // The first team-b request after the 429 is the probe; while it was in flight (1.5 s) no
  // other request, from either replica, reached team-b.
  std::vector<int64_t> team_b_times;
  for (const auto& r : cluster_.FakeRequests(mark)) {
    if (Account(r.value("key", "")) == "team-b" && r.value("model", "") == kModelA) {
      team_b_times.push_back(r["received_unix_ms"].get<int64_t>());
    }
  }
  ASSERT_FALSE(team_b_times.empty());
  std::sort(team_b_times.begin(), team_b_times.end());
  for (size_t i = 1; i < team_b_times.size(); ++i) {
    EXPECT_GE(team_b_times[i] - team_b_times[0], 1400)
        << "another request reached the half-open scope while its probe was in flight";
  }
  cluster_.ClearFaults();
  // And afterwards team-b serves model A again.
  uint64_t mark2 = cluster_.FakeRequests().back()["seq"].get<uint64_t>();
  absl::SleepFor(absl::Milliseconds(200));
  for (int i = 0; i < 12; ++i) ASSERT_TRUE(Chat(i % 2, kModelA));
  int team_b_after = 0;
  for (const auto& r : cluster_.FakeRequests(mark2)) {
    if (Account(r.value("key", "")) == "team-b") ++team_b_after;
  }
  EXPECT_GT(team_b_after, 0);
}

TEST_F(KeyHealthTest, AllKeysRateLimitedGives429WithRetryAfter) {
  StartCluster(1);
  AddFault(-1, kModelA, 429, -1, {{"Retry-After", "30"}});
  auto res = Chat(0, kModelA);
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 429);
  nlohmann::json body = nlohmann::json::parse(res->body, nullptr, false);
  ASSERT_TRUE(body.is_object()) << res->body;
  EXPECT_EQ(body["error"]["type"], "rate_limit_error");
  int64_t retry_after = 0;
  ASSERT_TRUE(absl::SimpleAtoi(res->get_header_value("Retry-After"), &retry_after));
  EXPECT_GE(retry_after, 1);
  EXPECT_LE(retry_after, 31);
  // Once the blocks have spread, later requests are answered without touching the upstream.
  ASSERT_FALSE(WaitForBlock([](const nlohmann::json& x) { return x["account"] == "team-c"; }).is_null());
  absl::SleepFor(absl::Milliseconds(200));
  size_t before = cluster_.FakeRequests().size();
  res = Chat(0, kModelA);
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 429);
  ASSERT_TRUE(absl::SimpleAtoi(res->get_header_value("Retry-After"), &retry_after));
  EXPECT_GE(retry_after, 20);
  EXPECT_LE(retry_after, 31);
  EXPECT_EQ(cluster_.FakeRequests().size(), before);
  // Other models are unaffected.
  res = Chat(0, kModelB);
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
}

TEST_F(KeyHealthTest, NoUsableKeyGives503) {
  StartCluster(1);
  AddFault(-1, "*", 401, -1);
  auto res = Chat(0, kModelA);
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 503) << res->body;
  EXPECT_EQ(nlohmann::json::parse(res->body)["error"]["code"], "no_usable_key");
  EXPECT_TRUE(res->has_header("Retry-After"));
}

TEST_F(KeyHealthTest, FirstByteWatchdogRetriesAStalledUpstream) {
  ClusterOptions options;
  options.dataplane_env = {{"SFLB_FIRST_BYTE_TIMEOUT", "1s"}, {"SFLB_MAX_ATTEMPTS", "4"}};
  StartCluster(1, options);
  cluster_.AddFault({{"key", keys_[0]}, {"model", "*"}, {"action", "stall"}, {"times", -1}});
  cluster_.AddFault({{"key", keys_[1]}, {"model", "*"}, {"action", "stall"}, {"times", -1}});
  for (int i = 0; i < 4; ++i) {
    auto res = Chat(0, kModelA);
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 200);
  }
}

TEST_F(KeyHealthTest, StreamBrokenAfterFirstByteEndsWithAnSseErrorAndIsNotRetried) {
  ClusterOptions options;
  options.dataplane_env = {{"SFLB_IDLE_TIMEOUT", "1s"}};
  StartCluster(1, options);
  cluster_.AddFault({{"key", "*"}, {"model", "*"}, {"action", "stall"}, {"after_chunks", 2},
                     {"times", -1}});
  httplib::Headers headers = TestCluster::UserAuth();
  headers.emplace("x-fake-chunks", "10");
  auto res = cluster_.Client(0)->Post("/v1/chat/completions", headers, ChatBody(kModelA, true),
                                      "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  EXPECT_THAT(res->body, HasSubstr("\"x_fake_chunk_index\":1"));
  EXPECT_THAT(res->body, HasSubstr("data: {\"error\":{"));
  EXPECT_THAT(res->body, HasSubstr("stream_interrupted"));
  EXPECT_TRUE(absl::EndsWith(res->body, "\n\n"));
  EXPECT_EQ(cluster_.FakeRequests().size(), 1u) << "a stream was retried after bytes were sent";
}

TEST_F(KeyHealthTest, ControlplaneLossCausesNoFailuresAndStatesSurviveARestart) {
  StartCluster(2);
  // An invalid key and an operator-disabled key: both must survive the restart.
  AddFault(3, "*", 401, -1);
  // Send until key 3 has met its 401 (which key a request gets is the round robin's call).
  bool seen = false;
  for (int i = 0; i < 40 && !seen; ++i) {
    ASSERT_TRUE(Chat(i % 2, kModelA));
    for (const auto& r : cluster_.FakeRequests()) seen = seen || r.value("status", 0) == 401;
  }
  ASSERT_TRUE(seen);
  absl::Time deadline = absl::Now() + absl::Seconds(10);
  bool invalid = false;
  while (absl::Now() < deadline && !invalid) {
    nlohmann::json stats = Stats();
    for (const auto& k : stats["keys"]) {
      invalid = invalid || (k.value("fingerprint", "") == KeyFingerprint(keys_[3]) &&
                            k.value("state", "") == "KEY_STATE_INVALID");
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  ASSERT_TRUE(invalid);
  absl::SleepFor(absl::Milliseconds(300));  // the state file is written within ~100 ms

  std::atomic<bool> stop{false};
  std::atomic<int> ok{0}, failed{0};
  std::vector<std::thread> load;
  for (int t = 0; t < 4; ++t) {
    load.emplace_back([&, t] {
      auto client = cluster_.Client(t % 2);
      while (!stop.load()) {
        auto res = client->Post("/v1/chat/completions", TestCluster::UserAuth(),
                                ChatBody(kModelA), "application/json");
        (res && res->status == 200 ? ok : failed).fetch_add(1);
      }
    });
  }
  absl::SleepFor(absl::Milliseconds(300));
  cluster_.controlplane().Signal(SIGKILL);
  ASSERT_TRUE(cluster_.controlplane().Wait(absl::Seconds(10)).ok());
  absl::SleepFor(absl::Seconds(1));  // serve without a controlplane for a while
  ASSERT_TRUE(cluster_.StartControlplane().ok());
  absl::SleepFor(absl::Seconds(1));
  stop.store(true);
  for (auto& t : load) t.join();
  EXPECT_EQ(failed.load(), 0);
  EXPECT_GT(ok.load(), 20);

  bool still_invalid = false;
  nlohmann::json stats = Stats();
  for (const auto& k : stats["keys"]) {
    still_invalid = still_invalid || (k.value("fingerprint", "") == KeyFingerprint(keys_[3]) &&
                                      k.value("state", "") == "KEY_STATE_INVALID");
  }
  EXPECT_TRUE(still_invalid) << "key state was lost across the controlplane restart";
}

}  // namespace
}  // namespace sflb::e2e
