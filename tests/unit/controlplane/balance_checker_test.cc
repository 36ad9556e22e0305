#include "controlplane/balance_checker.h"

#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/key_format.h"
#include "nlohmann/json.hpp"
#include "tests/fake_upstream/fake_siliconflow.h"
#include "tests/unit/fake_clock.h"

namespace sflb {
namespace {

using json = nlohmann::json;

std::string UserInfoBody(const std::string& total, const std::string& account = "acct-1") {
  return json{
      {"code", 20000},
      {"message", "OK"},
      {"status", true},
      {"data",
       {{"id", account}, {"balance", "0.88"}, {"chargeBalance", "88.00"}, {"totalBalance", total}}}}
      .dump();
}

BalanceTarget Target(uint64_t id, const std::string& secret) {
  return BalanceTarget{id, secret, KeyFingerprint(secret)};
}

FetchResult Answer(int status, std::string body) {
  FetchResult r;
  r.http_status = status;
  r.body = std::move(body);
  return r;
}

// A scripted fetch: answers per secret, counts calls per secret.
class ScriptedFetch {
 public:
  void Set(const std::string& secret, FetchResult result) {
    std::lock_guard<std::mutex> lock(mu_);
    answers_[secret] = std::move(result);
  }
  int Calls(const std::string& secret) {
    std::lock_guard<std::mutex> lock(mu_);
    return calls_[secret];
  }
  BalanceFetchFn Fn() {
    return [this](const std::string& secret) {
      std::lock_guard<std::mutex> lock(mu_);
      ++calls_[secret];
      auto it = answers_.find(secret);
      if (it == answers_.end()) return Answer(500, "{}");
      return it->second;
    };
  }

 private:
  std::mutex mu_;
  std::map<std::string, FetchResult> answers_;
  std::map<std::string, int> calls_;
};

class BalanceCheckerTest : public ::testing::Test {
 protected:
  BalanceCheckerOptions Options() {
    BalanceCheckerOptions o;
    o.clock = &clock_;
    o.fetch = fetch_.Fn();
    return o;
  }

  FakeClock clock_;
  ScriptedFetch fetch_;
};

// Every error text of `results` is free of every secret of `targets`.
void ExpectNoSecrets(const std::vector<KeyBalance>& results,
                     const std::vector<BalanceTarget>& targets) {
  for (const KeyBalance& b : results) {
    for (const BalanceTarget& t : targets) {
      EXPECT_FALSE(absl::StrContains(b.error, t.secret)) << b.error;
      EXPECT_FALSE(absl::StrContains(b.account_id, t.secret)) << b.account_id;
    }
  }
}

TEST(NormalizeDecimalTest, FourPlaces) {
  EXPECT_EQ(*NormalizeDecimal("0.88"), "0.8800");
  EXPECT_EQ(*NormalizeDecimal("88"), "88.0000");
  EXPECT_EQ(*NormalizeDecimal("88.88"), "88.8800");
  EXPECT_EQ(*NormalizeDecimal("0"), "0.0000");
  EXPECT_EQ(*NormalizeDecimal("007.5"), "7.5000");
  EXPECT_EQ(*NormalizeDecimal("1.23456"), "1.2346");
  EXPECT_EQ(*NormalizeDecimal("1.23454"), "1.2345");
  EXPECT_EQ(*NormalizeDecimal("9.99995"), "10.0000");
  EXPECT_EQ(*NormalizeDecimal("-1.5"), "-1.5000");
  EXPECT_EQ(*NormalizeDecimal("-0.00001"), "0.0000");
  EXPECT_EQ(*NormalizeDecimal("12345678901234567890.1"), "12345678901234567890.1000");
  EXPECT_EQ(*NormalizeDecimal("2.5", 0), "3");
  for (const char* bad : {"", "abc", "1,5", "1.", ".5", "1e5", " 1", "1 ", "+1", "--1", "1.2.3",
                          "0x10", "NaN", "-"}) {
    EXPECT_FALSE(NormalizeDecimal(bad).ok()) << bad;
  }
}

TEST_F(BalanceCheckerTest, AggregatesOkUnavailableAndErrorKeys) {
  fetch_.Set("sk-ok", Answer(200, UserInfoBody("88.88", "acct-9")));
  fetch_.Set("sk-small", Answer(200, UserInfoBody("0.88")));
  fetch_.Set("sk-gone", Answer(410, R"({"code":410,"message":"gone"})"));
  fetch_.Set("sk-404", Answer(404, "not found"));
  FetchResult network;
  network.error = "request failed (Connection)";
  fetch_.Set("sk-net", network);
  fetch_.Set("sk-5xx", Answer(503, "<html>busy</html>"));
  fetch_.Set("sk-401", Answer(401, R"({"message":"Invalid token sk-401"})"));
  fetch_.Set("sk-notjson", Answer(200, "<html>"));
  fetch_.Set("sk-code", Answer(200, R"({"code":30001,"message":"account frozen","data":null})"));
  fetch_.Set("sk-garbage", Answer(200, UserInfoBody("lots")));
  fetch_.Set("sk-nodata", Answer(200, R"({"code":20000,"status":true})"));

  std::vector<BalanceTarget> targets;
  uint64_t id = 1;
  for (const char* s : {"sk-ok", "sk-small", "sk-gone", "sk-404", "sk-net", "sk-5xx", "sk-401",
                        "sk-notjson", "sk-code", "sk-garbage", "sk-nodata"}) {
    targets.push_back(Target(id++, s));
  }
  BalanceChecker checker(Options());
  std::vector<KeyBalance> r = checker.Get(targets, /*refresh=*/false);
  ASSERT_EQ(r.size(), targets.size());
  for (size_t i = 0; i < r.size(); ++i) {
    EXPECT_EQ(r[i].id, targets[i].id);
    EXPECT_EQ(r[i].fingerprint, targets[i].fingerprint);
    EXPECT_EQ(r[i].checked_at, clock_.Now());
    EXPECT_FALSE(r[i].from_cache);
  }
  EXPECT_EQ(r[0].status, BalanceStatus::kOk);
  EXPECT_EQ(r[0].total_balance, "88.8800");
  EXPECT_DOUBLE_EQ(r[0].total_balance_value, 88.88);
  EXPECT_EQ(r[0].account_id, "acct-9");
  EXPECT_EQ(r[0].error, "");
  EXPECT_EQ(r[1].status, BalanceStatus::kOk);
  EXPECT_EQ(r[1].total_balance, "0.8800");
  EXPECT_EQ(r[2].status, BalanceStatus::kUnavailable);
  EXPECT_TRUE(absl::StrContains(r[2].error, "retired")) << r[2].error;
  EXPECT_EQ(r[2].http_status, 410);
  EXPECT_EQ(r[3].status, BalanceStatus::kUnavailable);
  for (size_t i = 4; i < r.size(); ++i) {
    EXPECT_EQ(r[i].status, BalanceStatus::kError) << targets[i].secret;
    EXPECT_FALSE(r[i].error.empty()) << targets[i].secret;
    EXPECT_EQ(r[i].total_balance, "") << targets[i].secret;
  }
  EXPECT_TRUE(absl::StrContains(r[4].error, "Connection")) << r[4].error;
  EXPECT_TRUE(absl::StrContains(r[5].error, "503")) << r[5].error;
  EXPECT_TRUE(absl::StrContains(r[6].error, "key rejected")) << r[6].error;
  EXPECT_TRUE(absl::StrContains(r[6].error, "Invalid token")) << r[6].error;
  EXPECT_TRUE(absl::StrContains(r[8].error, "30001")) << r[8].error;
  EXPECT_TRUE(absl::StrContains(r[8].error, "account frozen")) << r[8].error;
  EXPECT_TRUE(absl::StrContains(r[9].error, "lots")) << r[9].error;
  ExpectNoSecrets(r, targets);
  EXPECT_STREQ(BalanceStatusName(r[0].status), "ok");
  EXPECT_STREQ(BalanceStatusName(r[2].status), "unavailable");
  EXPECT_STREQ(BalanceStatusName(r[4].status), "error");
}

TEST_F(BalanceCheckerTest, NumericTotalAndAccountIdAreAccepted) {
  fetch_.Set("sk-num", Answer(200, R"({"code":20000,"data":{"id":12345,"totalBalance":12.5}})"));
  BalanceChecker checker(Options());
  std::vector<KeyBalance> r = checker.Get({Target(1, "sk-num")}, false);
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].status, BalanceStatus::kOk) << r[0].error;
  EXPECT_EQ(r[0].total_balance, "12.5000");
  EXPECT_EQ(r[0].account_id, "12345");
}

TEST_F(BalanceCheckerTest, CacheHitRefreshAndExpiry) {
  fetch_.Set("sk-a", Answer(200, UserInfoBody("1.00")));
  fetch_.Set("sk-b", Answer(410, ""));
  const std::vector<BalanceTarget> targets = {Target(1, "sk-a"), Target(2, "sk-b")};
  BalanceChecker checker(Options());
  EXPECT_FALSE(checker.Cached(1).has_value());

  const absl::Time first = clock_.Now();
  checker.Get(targets, false);
  EXPECT_EQ(fetch_.Calls("sk-a"), 1);
  EXPECT_EQ(fetch_.Calls("sk-b"), 1);

  clock_.Advance(absl::Minutes(4));
  fetch_.Set("sk-a", Answer(200, UserInfoBody("2.00")));
  std::vector<KeyBalance> r = checker.Get(targets, false);
  EXPECT_EQ(fetch_.Calls("sk-a"), 1);  // within the 5-minute TTL
  EXPECT_EQ(fetch_.Calls("sk-b"), 1);  // kUnavailable is cached like a success
  EXPECT_TRUE(r[0].from_cache);
  EXPECT_EQ(r[0].total_balance, "1.0000");
  EXPECT_EQ(r[0].checked_at, first);

  r = checker.Get(targets, /*refresh=*/true);
  EXPECT_EQ(fetch_.Calls("sk-a"), 2);
  EXPECT_EQ(fetch_.Calls("sk-b"), 2);
  EXPECT_FALSE(r[0].from_cache);
  EXPECT_EQ(r[0].total_balance, "2.0000");
  EXPECT_EQ(r[0].checked_at, clock_.Now());

  clock_.Advance(absl::Minutes(5) - absl::Milliseconds(1));
  checker.Get(targets, false);
  EXPECT_EQ(fetch_.Calls("sk-a"), 2);
  clock_.Advance(absl::Milliseconds(1));  // exactly the TTL: stale
  checker.Get(targets, false);
  EXPECT_EQ(fetch_.Calls("sk-a"), 3);

  absl::optional<KeyBalance> cached = checker.Cached(1);
  ASSERT_TRUE(cached.has_value());
  EXPECT_TRUE(cached->from_cache);
  EXPECT_EQ(cached->total_balance, "2.0000");
  EXPECT_EQ(checker.fetch_count(), 6u);
}

TEST_F(BalanceCheckerTest, ErrorsAreCachedBriefly) {
  fetch_.Set("sk-bad", Answer(500, ""));
  BalanceCheckerOptions o = Options();
  o.error_ttl = absl::Seconds(30);
  BalanceChecker checker(o);
  const std::vector<BalanceTarget> targets = {Target(1, "sk-bad")};
  checker.Get(targets, false);
  clock_.Advance(absl::Seconds(29));
  checker.Get(targets, false);
  EXPECT_EQ(fetch_.Calls("sk-bad"), 1);
  clock_.Advance(absl::Seconds(1));
  fetch_.Set("sk-bad", Answer(200, UserInfoBody("3")));
  std::vector<KeyBalance> r = checker.Get(targets, false);
  EXPECT_EQ(fetch_.Calls("sk-bad"), 2);
  EXPECT_EQ(r[0].status, BalanceStatus::kOk);
  EXPECT_EQ(r[0].total_balance, "3.0000");
}

TEST_F(BalanceCheckerTest, ChangedFingerprintIsNotServedFromCache) {
  fetch_.Set("sk-old", Answer(200, UserInfoBody("1")));
  fetch_.Set("sk-new", Answer(200, UserInfoBody("2")));
  BalanceChecker checker(Options());
  checker.Get({Target(7, "sk-old")}, false);
  std::vector<KeyBalance> r = checker.Get({Target(7, "sk-new")}, false);
  EXPECT_EQ(fetch_.Calls("sk-new"), 1);
  EXPECT_EQ(r[0].total_balance, "2.0000");
  EXPECT_EQ(r[0].fingerprint, KeyFingerprint("sk-new"));
}

// Tracks fetches in flight. The first fetches wait until `limit` are in flight at once (or a
// deadline passes), which proves the limit is reached; every fetch records the maximum seen.
class InFlightProbe {
 public:
  explicit InFlightProbe(int limit) : limit_(limit) {}
  BalanceFetchFn Fn() {
    return [this](const std::string&) {
      std::unique_lock<std::mutex> lock(mu_);
      ++in_flight_;
      max_in_flight_ = std::max(max_in_flight_, in_flight_);
      if (in_flight_ >= limit_) {
        reached_ = true;
        cv_.notify_all();
      }
      cv_.wait_for(lock, std::chrono::seconds(5), [this] { return reached_; });
      --in_flight_;
      return Answer(200, UserInfoBody("1"));
    };
  }
  int max_in_flight() {
    std::lock_guard<std::mutex> lock(mu_);
    return max_in_flight_;
  }

 private:
  const int limit_;
  std::mutex mu_;
  std::condition_variable cv_;
  int in_flight_ = 0;
  int max_in_flight_ = 0;
  bool reached_ = false;
};

TEST_F(BalanceCheckerTest, ConcurrencyIsBounded) {
  InFlightProbe probe(3);
  BalanceCheckerOptions o = Options();
  o.max_concurrency = 3;
  o.fetch = probe.Fn();
  BalanceChecker checker(o);
  std::vector<BalanceTarget> targets;
  for (uint64_t i = 1; i <= 40; ++i) targets.push_back(Target(i, absl::StrCat("sk-", i)));
  std::vector<KeyBalance> r = checker.Get(targets, false);
  ASSERT_EQ(r.size(), 40u);
  for (const KeyBalance& b : r) EXPECT_EQ(b.status, BalanceStatus::kOk);
  EXPECT_EQ(probe.max_in_flight(), 3);
  EXPECT_EQ(checker.fetch_count(), 40u);
}

TEST_F(BalanceCheckerTest, ConcurrencyIsBoundedAcrossCallers) {
  InFlightProbe probe(2);
  BalanceCheckerOptions o = Options();
  o.max_concurrency = 2;
  o.fetch = probe.Fn();
  BalanceChecker checker(o);
  std::vector<BalanceTarget> a, b;
  for (uint64_t i = 1; i <= 20; ++i) a.push_back(Target(i, absl::StrCat("sk-a", i)));
  for (uint64_t i = 101; i <= 120; ++i) b.push_back(Target(i, absl::StrCat("sk-b", i)));
  std::thread other([&] { EXPECT_EQ(checker.Get(b, true).size(), 20u); });
  EXPECT_EQ(checker.Get(a, true).size(), 20u);
  other.join();
  EXPECT_EQ(probe.max_in_flight(), 2);
}

TEST_F(BalanceCheckerTest, ConcurrentCallersShareAFetchInProgress) {
  // The fetch of "sk-shared" blocks until the test releases it; meanwhile a second caller
  // asks for the same key (refresh) and for another one.
  std::mutex mu;
  std::condition_variable cv;
  bool release = false;
  int shared_calls = 0;
  BalanceCheckerOptions o = Options();
  o.fetch = [&](const std::string& secret) {
    if (secret == "sk-shared") {
      std::unique_lock<std::mutex> lock(mu);
      ++shared_calls;
      cv.notify_all();
      cv.wait_for(lock, std::chrono::seconds(5), [&] { return release; });
    }
    return Answer(200, UserInfoBody("5"));
  };
  BalanceChecker checker(o);
  std::vector<KeyBalance> first;
  std::thread caller([&] { first = checker.Get({Target(1, "sk-shared")}, true); });
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(5), [&] { return shared_calls == 1; }));
  }
  // The second caller fetches "sk-other" itself, then waits for the shared fetch; once it has
  // fetched "sk-other" it has necessarily made its decision about "sk-shared".
  std::thread second_caller([&] {
    std::vector<KeyBalance> r = checker.Get({Target(1, "sk-shared"), Target(2, "sk-other")}, true);
    EXPECT_EQ(r[0].status, BalanceStatus::kOk);
    EXPECT_EQ(r[1].status, BalanceStatus::kOk);
  });
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  while (checker.fetch_count() < 2 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(1));
  {
    std::lock_guard<std::mutex> lock(mu);
    release = true;
  }
  cv.notify_all();
  caller.join();
  second_caller.join();
  EXPECT_EQ(shared_calls, 1);
  EXPECT_EQ(checker.fetch_count(), 2u);
  ASSERT_EQ(first.size(), 1u);
  EXPECT_EQ(first[0].total_balance, "5.0000");
}

// The production fetch against the in-process fake SiliconFlow.
class DefaultFetchTest : public ::testing::Test {
 protected:
  void SetUp() override {
    testing::FakeOptions options;
    options.threads = 8;
    fake_ = std::make_unique<testing::FakeSiliconFlow>(options);
    port_ = fake_->BindToPort("127.0.0.1", 0);
    ASSERT_GT(port_, 0);
    server_ = std::thread([this] { fake_->ListenAfterBind(); });
    const absl::Time deadline = absl::Now() + absl::Seconds(5);
    while (!fake_->IsRunning() && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(1));
    ASSERT_TRUE(fake_->IsRunning());
  }
  void TearDown() override {
    fake_->Stop();
    if (server_.joinable()) server_.join();
  }
  void SetAccount(const json& body) {
    httplib::Client client("127.0.0.1", port_);
    auto res = client.Post("/_fake/accounts", body.dump(), "application/json");
    ASSERT_TRUE(res);
    ASSERT_EQ(res->status, 200) << res->body;
  }
  BalanceCheckerOptions Options() {
    BalanceCheckerOptions o;
    o.base_url = absl::StrCat("http://127.0.0.1:", port_, "/v1/");
    o.timeout = absl::Seconds(5);
    return o;
  }

  std::unique_ptr<testing::FakeSiliconFlow> fake_;
  int port_ = -1;
  std::thread server_;
};

TEST_F(DefaultFetchTest, OkAndRetiredAndRejected) {
  const std::string ok_key = "sk-okokokokokokokokokokokokokokokokokok";
  const std::string gone_key = "sk-gonegonegonegonegonegonegonegone";
  const std::string denied_key = "sk-denieddenieddenieddenieddenied";
  SetAccount({{"key", ok_key}, {"balance", "12.3"}, {"account", "acct-42"}});
  SetAccount({{"key", gone_key}, {"status", 410}});
  SetAccount({{"key", denied_key}, {"status", 401}});
  BalanceChecker checker(Options());
  const std::vector<BalanceTarget> targets = {Target(1, ok_key), Target(2, gone_key),
                                              Target(3, denied_key)};
  std::vector<KeyBalance> r = checker.Get(targets, true);
  ASSERT_EQ(r.size(), 3u);
  EXPECT_EQ(r[0].status, BalanceStatus::kOk) << r[0].error;
  EXPECT_EQ(r[0].total_balance, "12.3000");
  EXPECT_EQ(r[0].account_id, "acct-42");
  EXPECT_EQ(r[0].http_status, 200);
  EXPECT_EQ(r[1].status, BalanceStatus::kUnavailable) << r[1].error;
  EXPECT_EQ(r[1].http_status, 410);
  EXPECT_EQ(r[2].status, BalanceStatus::kError);
  EXPECT_EQ(r[2].http_status, 401);
  ExpectNoSecrets(r, targets);

  // What went over the wire: GET /v1/user/info with the key as bearer token.
  std::vector<testing::RecordedRequest> requests = fake_->RequestsSince(0);
  ASSERT_EQ(requests.size(), 3u);
  for (const testing::RecordedRequest& req : requests) {
    EXPECT_EQ(req.method, "GET");
    EXPECT_EQ(req.path, "/v1/user/info");
  }
  std::vector<std::string> keys;
  for (const testing::RecordedRequest& req : requests) keys.push_back(req.key);
  std::sort(keys.begin(), keys.end());
  std::vector<std::string> want = {ok_key, gone_key, denied_key};
  std::sort(want.begin(), want.end());
  EXPECT_EQ(keys, want);
}

TEST_F(DefaultFetchTest, ConnectionErrorsAndBadBaseUrl) {
  // A port nobody listens on: bind one, note it, close it.
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  socklen_t len = sizeof(addr);
  ASSERT_EQ(getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  const int closed_port = ntohs(addr.sin_port);
  close(fd);

  FetchResult refused = DefaultBalanceFetch(absl::StrCat("http://127.0.0.1:", closed_port, "/v1"),
                                            absl::Seconds(2))("sk-whatever-secret");
  EXPECT_EQ(refused.http_status, 0);
  EXPECT_FALSE(refused.error.empty());
  EXPECT_FALSE(absl::StrContains(refused.error, "sk-whatever-secret"));

  for (const char* bad : {"ftp://host/v1", "api.siliconflow.cn/v1", "https:///v1",
                          "https://user@host/v1", "https://host/v1?x=1"}) {
    FetchResult r = DefaultBalanceFetch(bad, absl::Seconds(1))("sk-secret");
    EXPECT_EQ(r.http_status, 0) << bad;
    EXPECT_TRUE(absl::StrContains(r.error, "invalid base URL")) << bad << ": " << r.error;
  }
}

}  // namespace
}  // namespace sflb
