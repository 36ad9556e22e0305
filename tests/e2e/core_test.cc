// End-to-end tests of the core path: real controlplane, dataplane replicas and sflbctl against
// the fake SiliconFlow (issue: core).
#include <atomic>
#include <fstream>
#include <iterator>
#include <set>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "common/key_format.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/e2e/test_cluster.h"

namespace sflb::e2e {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

constexpr char kChatBody[] =
    R"({"model":"Qwen/Qwen2.5-7B-Instruct","messages":[{"role":"user","content":"hi"}]})";

// Fingerprints of the keys the fake saw, in request order.
std::vector<std::string> UsedFingerprints(const nlohmann::json& requests) {
  std::vector<std::string> out;
  for (const auto& r : requests) out.push_back(KeyFingerprint(r.value("key", "")));
  return out;
}

class CoreTest : public ::testing::Test {
 protected:
  void StartCluster(int keys, int dataplanes = 1, ClusterOptions extra = {}) {
    keys_ = MakeKeys(keys);
    extra.dataplanes = dataplanes;
    if (extra.key_lines.empty()) extra.key_lines = keys_;
    absl::Status s = cluster_.Start(extra);
    ASSERT_TRUE(s.ok()) << s;
  }

  void TearDown() override {
    // No secret may ever reach a log: scan everything every process wrote.
    std::string logs = cluster_.AllLogs();
    for (const std::string& key : keys_) {
      EXPECT_THAT(logs, Not(HasSubstr(key))) << "an upstream key leaked into a log (fingerprint "
                                             << KeyFingerprint(key) << ")";
    }
    EXPECT_THAT(logs, Not(HasSubstr(kUserKey)));
    EXPECT_THAT(logs, Not(HasSubstr(kAdminKey)));
  }

  std::set<std::string> KeyFingerprints() const {
    std::set<std::string> out;
    for (const auto& k : keys_) out.insert(KeyFingerprint(k));
    return out;
  }

  std::vector<std::string> keys_;
  TestCluster cluster_;
};

TEST_F(CoreTest, NonStreamingChatCompletionIsForwardedWithAPoolKey) {
  StartCluster(3);
  auto client = cluster_.Client();
  auto res = client->Post("/v1/chat/completions", TestCluster::UserAuth(), kChatBody,
                          "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  nlohmann::json body = nlohmann::json::parse(res->body);
  EXPECT_EQ(body["object"], "chat.completion");
  EXPECT_EQ(body["model"], "Qwen/Qwen2.5-7B-Instruct");
  EXPECT_TRUE(res->has_header("x-siliconcloud-trace-id"));
  EXPECT_TRUE(res->has_header("x-request-id"));

  nlohmann::json requests = cluster_.FakeRequests();
  ASSERT_EQ(requests.size(), 1u);
  EXPECT_EQ(requests[0]["path"], "/v1/chat/completions");
  EXPECT_EQ(requests[0]["body"], kChatBody);
  EXPECT_EQ(KeyFingerprints().count(KeyFingerprint(requests[0]["key"])), 1u)
      << "upstream got a key that is not in the pool";
}

TEST_F(CoreTest, PathsWithoutV1PrefixWorkToo) {
  StartCluster(2);
  auto client = cluster_.Client();
  auto res = client->Get("/models", TestCluster::UserAuth());
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  EXPECT_EQ(nlohmann::json::parse(res->body)["object"], "list");
  // "/v1beta" is not the "/v1" segment and must reach the upstream unchanged (under /v1).
  res = client->Get("/v1beta/things", TestCluster::UserAuth());
  ASSERT_TRUE(res);
  nlohmann::json requests = cluster_.FakeRequests();
  ASSERT_EQ(requests.size(), 2u);
  EXPECT_EQ(requests[0]["path"], "/v1/models");
  EXPECT_EQ(requests[1]["path"], "/v1/v1beta/things");
}

TEST_F(CoreTest, ForwardingIsExact) {
  StartCluster(2);
  auto client = cluster_.Client();
  httplib::Headers headers = TestCluster::UserAuth();
  headers.emplace("X-Custom-Thing", "value with  spaces");
  headers.emplace("Cookie", "session=secret-cookie");
  headers.emplace("Connection", "keep-alive, X-Hop");
  headers.emplace("X-Hop", "must-not-pass");
  headers.emplace("OpenAI-Organization", "org-123");
  std::string body = "{\"model\":\"m\",\"input\":\"caf\xC3\xA9 \\u00e9\",\"x\":[1,2,3]}";
  auto res = client->Post("/v1/some/endpoint?b=2&a=%2F1&a=3", headers, body, "application/json");
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200) << res->body;
  nlohmann::json requests = cluster_.FakeRequests();
  ASSERT_EQ(requests.size(), 1u);
  const nlohmann::json& r = requests[0];
  EXPECT_EQ(r["method"], "POST");
  EXPECT_EQ(r["path"], "/v1/some/endpoint");
  EXPECT_EQ(r["query"], "b=2&a=%2F1&a=3");
  EXPECT_EQ(r["body"], body);
  nlohmann::json h = r["headers"];
  auto header = [&h](const std::string& name) -> std::string {
    for (auto it = h.begin(); it != h.end(); ++it) {
      if (absl::EqualsIgnoreCase(it.key(), name)) {
        return it->is_array() ? (*it)[0].get<std::string>() : it->get<std::string>();
      }
    }
    return "<absent>";
  };
  EXPECT_EQ(header("X-Custom-Thing"), "value with  spaces");
  EXPECT_EQ(header("OpenAI-Organization"), "org-123");
  EXPECT_EQ(header("Content-Type"), "application/json");
  EXPECT_EQ(header("Cookie"), "<absent>");
  EXPECT_EQ(header("X-Hop"), "<absent>");
  EXPECT_THAT(header("Authorization"), Not(HasSubstr(kUserKey)));
  EXPECT_TRUE(absl::StartsWith(header("Authorization"), "Bearer sk-e2e-"));
}

TEST_F(CoreTest, StreamingArrivesEventByEventAndEndsWithDone) {
  StartCluster(2);
  auto client = cluster_.Client();
  httplib::Headers headers = TestCluster::UserAuth();
  headers.emplace("x-fake-chunks", "10");
  headers.emplace("x-fake-chunk-delay-ms", "60");
  headers.emplace("Accept-Encoding", "gzip, br");  // must not make the stream buffered
  std::vector<absl::Time> arrivals;
  std::string received;
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/chat/completions";
  req.headers = headers;
  req.body = R"({"model":"m","stream":true,"messages":[]})";
  req.set_header("Content-Type", "application/json");
  req.content_receiver = [&](const char* data, size_t len, uint64_t, uint64_t) {
    arrivals.push_back(absl::Now());
    received.append(data, len);
    return true;
  };
  httplib::Response res;
  httplib::Error error;
  ASSERT_TRUE(client->send(req, res, error)) << httplib::to_string(error);
  EXPECT_EQ(res.status, 200);
  EXPECT_TRUE(absl::StartsWith(res.get_header_value("Content-Type"), "text/event-stream"));
  EXPECT_FALSE(res.has_header("Content-Encoding"));
  // Events must have come in as produced (10 chunks 60 ms apart), not in one burst at the end.
  ASSERT_GE(arrivals.size(), 5u);
  EXPECT_GE(arrivals.back() - arrivals.front(), absl::Milliseconds(300));
  EXPECT_TRUE(absl::EndsWith(received, "data: [DONE]\n\n"));
  int data_lines = 0;
  for (absl::string_view line : absl::StrSplit(received, '\n')) {
    if (absl::StartsWith(line, "data: {")) {
      nlohmann::json chunk = nlohmann::json::parse(line.substr(6));
      EXPECT_EQ(chunk["x_fake_chunk_index"], data_lines) << "events out of order";
      ++data_lines;
    }
  }
  EXPECT_EQ(data_lines, 10);
}

TEST_F(CoreTest, ClientErrorsPassThroughUnchangedAndAreNotRetried) {
  StartCluster(3);
  auto client = cluster_.Client();
  auto res = client->Post("/v1/chat/completions", TestCluster::UserAuth(), "{not json",
                          "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 400);
  EXPECT_THAT(res->body, HasSubstr("\"code\":20015"));  // the fake's own error body
  EXPECT_EQ(cluster_.FakeRequests().size(), 1u);
}

TEST_F(CoreTest, AuthenticationIsRequiredAndUpstreamIsNeverContactedWithoutIt) {
  StartCluster(2);
  auto client = cluster_.Client();
  auto res = client->Post("/v1/chat/completions", kChatBody, "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 401);
  nlohmann::json body = nlohmann::json::parse(res->body);
  EXPECT_EQ(body["error"]["code"], "invalid_api_key");
  EXPECT_TRUE(body["error"].contains("message"));
  EXPECT_TRUE(body["error"].contains("type"));

  res = client->Get("/v1/models", {{"Authorization", "Bearer wrong-key"}});
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 401);
  res = client->Get("/v1/models", {{"Authorization", absl::StrCat("Basic ", kUserKey)}});
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 401);
  EXPECT_EQ(cluster_.FakeRequests().size(), 0u);

  // Scheme is case-insensitive and the admin key works wherever the user key does.
  res = client->Get("/v1/models", {{"Authorization", absl::StrCat("bearer ", kUserKey)}});
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  res = client->Get("/v1/models", {{"Authorization", absl::StrCat("Bearer ", kAdminKey)}});
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  // /info needs no key.
  res = client->Get("/info");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  // The failed attempts were logged with the client IP.
  auto line = cluster_.dataplane(0).WaitForLog(
      [](const nlohmann::json& j) {
        return j.value("event", "") == "auth_failed" && j.value("client_ip", "") == "127.0.0.1";
      },
      absl::Seconds(5));
  EXPECT_TRUE(line.ok()) << line.status();
}

TEST_F(CoreTest, OversizedBodyGets413InOpenAiShape) {
  ClusterOptions options;
  options.dataplane_env = {{"SFLB_MAX_BODY_BYTES", "2048"}};
  StartCluster(1, 1, options);
  auto client = cluster_.Client();
  std::string big(4096, 'x');
  auto res = client->Post("/v1/embeddings", TestCluster::UserAuth(), big, "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 413);
  nlohmann::json body = nlohmann::json::parse(res->body, nullptr, false);
  ASSERT_TRUE(body.is_object()) << res->body;
  EXPECT_EQ(body["error"]["code"], "request_too_large");
  EXPECT_EQ(cluster_.FakeRequests().size(), 0u);
}

TEST_F(CoreTest, RoundRobinIsEvenAcrossTwoReplicas) {
  StartCluster(6, 2);
  constexpr int kRequests = 600;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      auto client = cluster_.Client(t % 2);
      for (int i = 0; i < kRequests / 4; ++i) {
        auto res = client->Get("/v1/models", TestCluster::UserAuth());
        if (!res || res->status != 200) failures.fetch_add(1);
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
  std::map<std::string, int> counts;
  for (const std::string& fp : UsedFingerprints(cluster_.FakeRequests())) counts[fp]++;
  ASSERT_EQ(counts.size(), 6u);
  int min = kRequests, max = 0;
  for (const auto& [fp, n] : counts) {
    min = std::min(min, n);
    max = std::max(max, n);
  }
  // Each replica takes whole slices of the one global sequence: shares stay within a few
  // requests of 100 each.
  EXPECT_LE(static_cast<double>(max) / min, 1.1) << "min " << min << " max " << max;
}

TEST_F(CoreTest, ReloadAddsAndRemovesKeysUnderTrafficWithoutFailures) {
  StartCluster(3, 2);
  std::vector<std::string> next = {keys_[1], keys_[2]};
  std::vector<std::string> added = MakeKeys(2);
  next.insert(next.end(), added.begin(), added.end());

  std::atomic<bool> stop{false};
  std::atomic<int> ok{0}, failed{0};
  std::atomic<int> done[4] = {{0}, {0}, {0}, {0}};  // requests finished, per load thread
  std::vector<std::thread> load;
  for (int t = 0; t < 4; ++t) {
    load.emplace_back([&, t] {
      auto client = cluster_.Client(t % 2);
      while (!stop.load()) {
        auto res = client->Get("/v1/models", TestCluster::UserAuth());
        (res && res->status == 200 ? ok : failed).fetch_add(1);
        done[t].fetch_add(1);
      }
    });
  }
  absl::SleepFor(absl::Milliseconds(200));  // traffic before the reload
  WriteFileAtomically(cluster_.keys_file(),
                      "# rotated\n" + absl::StrJoin(next, "\n") + "\n");
  CommandResult reload = cluster_.Ctl({"reload"});
  EXPECT_EQ(reload.exit_code, 0) << reload.out << reload.err;
  EXPECT_THAT(reload.out, Not(HasSubstr(added[0])));
  ASSERT_TRUE(cluster_.WaitForKeyCount(0, 4).ok());
  ASSERT_TRUE(cluster_.WaitForKeyCount(1, 4).ok());
  // Requests that picked a key before the new snapshot may still finish with it (that is the
  // point of retiring keys gently): wait until every load thread has completed two requests
  // begun after both replicas held the new key set, then look only at what follows.
  int seen[4];
  for (int t = 0; t < 4; ++t) seen[t] = done[t].load();
  absl::Time settle = absl::Now() + absl::Seconds(30);
  for (int t = 0; t < 4; ++t) {
    while (done[t].load() < seen[t] + 2 && absl::Now() < settle) {
      absl::SleepFor(absl::Milliseconds(5));
    }
  }
  nlohmann::json before = cluster_.FakeRequests();
  uint64_t mark = before.empty() ? 0 : before.back()["seq"].get<uint64_t>();
  absl::SleepFor(absl::Milliseconds(500));  // traffic after the reload
  stop.store(true);
  for (auto& t : load) t.join();
  keys_.insert(keys_.end(), added.begin(), added.end());  // scan logs for these too

  EXPECT_EQ(failed.load(), 0);
  EXPECT_GT(ok.load(), 20);
  std::set<std::string> after;
  for (const std::string& fp : UsedFingerprints(cluster_.FakeRequests(mark))) after.insert(fp);
  EXPECT_EQ(after.count(KeyFingerprint(keys_[0])), 0u) << "removed key still used";
  EXPECT_EQ(after.count(KeyFingerprint(added[0])), 1u) << "new key not used";
  EXPECT_EQ(after.count(KeyFingerprint(added[1])), 1u) << "new key not used";
}

TEST_F(CoreTest, FailedReloadKeepsTheRunningKeys) {
  StartCluster(2);
  WriteFileAtomically(cluster_.keys_file(), "# nothing usable\nbad key with spaces\n");
  CommandResult reload = cluster_.Ctl({"reload"});
  EXPECT_NE(reload.exit_code, 0);
  EXPECT_THAT(reload.err + reload.out, HasSubstr("keys.txt:2"));
  auto client = cluster_.Client();
  auto res = client->Get("/v1/models", TestCluster::UserAuth());
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  EXPECT_TRUE(cluster_.WaitForKeyCount(0, 2).ok());
}

TEST_F(CoreTest, ClientDisconnectMidStreamCancelsTheUpstreamRequest) {
  StartCluster(1);
  auto client = cluster_.Client();
  httplib::Headers headers = TestCluster::UserAuth();
  headers.emplace("x-fake-chunks", "200");
  headers.emplace("x-fake-chunk-delay-ms", "50");
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/chat/completions";
  req.headers = headers;
  req.body = R"({"model":"m","stream":true,"messages":[]})";
  int pieces = 0;
  req.content_receiver = [&](const char*, size_t, uint64_t, uint64_t) {
    return ++pieces < 3;  // leave after a few events
  };
  httplib::Response res;
  httplib::Error error;
  client->send(req, res, error);
  client->stop();
  absl::Time deadline = absl::Now() + absl::Seconds(5);
  int cancelled = 0;
  while (absl::Now() < deadline) {
    cancelled = cluster_.FakeStats().value("cancelled_streams", 0);
    if (cancelled >= 1) break;
    absl::SleepFor(absl::Milliseconds(50));
  }
  EXPECT_EQ(cancelled, 1) << "the upstream stream kept running after the client left";
}

TEST_F(CoreTest, KeysFromEnvironmentWhenThereIsNoKeysFile) {
  ClusterOptions options;
  options.keys_via_env = true;
  StartCluster(3, 1, options);
  auto client = cluster_.Client();
  for (int i = 0; i < 6; ++i) {
    auto res = client->Get("/v1/models", TestCluster::UserAuth());
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 200);
  }
  std::set<std::string> used;
  for (const std::string& fp : UsedFingerprints(cluster_.FakeRequests())) used.insert(fp);
  EXPECT_EQ(used, KeyFingerprints());
}

TEST_F(CoreTest, DataplaneKeepsServingWhenTheControlplaneIsGone) {
  StartCluster(2, 1);
  cluster_.controlplane().Signal(SIGKILL);
  ASSERT_TRUE(cluster_.controlplane().Wait(absl::Seconds(10)).ok());
  auto client = cluster_.Client();
  for (int i = 0; i < 20; ++i) {
    auto res = client->Get("/v1/models", TestCluster::UserAuth());
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, 200);
  }
  // It reconnects by itself when the controlplane is back.
  ASSERT_TRUE(cluster_.StartControlplane().ok());
  auto reconnected = cluster_.dataplane(0).WaitForLog(
      [](const nlohmann::json& j) { return j.value("event", "") == "controlplane_connected"; },
      absl::Seconds(1));
  ASSERT_TRUE(reconnected.ok());  // the first connection
  absl::Time deadline = absl::Now() + absl::Seconds(15);
  int connects = 0;
  while (absl::Now() < deadline && connects < 2) {
    connects = 0;
    for (const auto& j : cluster_.dataplane(0).LogLines()) {
      if (j.value("event", "") == "controlplane_connected") ++connects;
    }
    absl::SleepFor(absl::Milliseconds(50));
  }
  EXPECT_EQ(connects, 2);
}

TEST_F(CoreTest, DataplaneRefusesToStartWithoutDistinctKeys) {
  StartCluster(1);
  CommandResult missing = RunCommand(SFLB_DATAPLANE_BIN, {}, {{"LB_ADMIN_KEY", "a"}});
  EXPECT_EQ(missing.exit_code, 2);
  EXPECT_THAT(missing.err, HasSubstr("LB_API_KEY is required"));
  CommandResult same = RunCommand(SFLB_DATAPLANE_BIN, {}, {{"LB_API_KEY", "a"}, {"LB_ADMIN_KEY", "a"}});
  EXPECT_EQ(same.exit_code, 2);
  EXPECT_THAT(same.err, HasSubstr("must differ"));
  CommandResult on_cmdline =
      RunCommand(SFLB_DATAPLANE_BIN, {"--lb-api-key", "x"}, {{"LB_ADMIN_KEY", "a"}});
  EXPECT_EQ(on_cmdline.exit_code, 2);
  EXPECT_THAT(on_cmdline.err, HasSubstr("not accepted on the command line"));
  CommandResult help = RunCommand(SFLB_DATAPLANE_BIN, {"--help"}, {});
  EXPECT_EQ(help.exit_code, 0);
  EXPECT_THAT(help.out, HasSubstr("SILICONFLOW_BASE_URL"));
  EXPECT_THAT(help.out, HasSubstr("SFLB_CONTROLPLANE"));
  CommandResult slow_log = RunCommand(
      SFLB_DATAPLANE_BIN, {},
      {{"LB_API_KEY", "a"}, {"LB_ADMIN_KEY", "b"}, {"SFLB_REQUEST_LOG_FLUSH", "1m"}});
  EXPECT_EQ(slow_log.exit_code, 2);
  EXPECT_THAT(slow_log.err, HasSubstr("SFLB_REQUEST_LOG_FLUSH: at most 10s"));
  CommandResult busy_log = RunCommand(
      SFLB_DATAPLANE_BIN, {},
      {{"LB_API_KEY", "a"}, {"LB_ADMIN_KEY", "b"}, {"SFLB_REQUEST_LOG_FLUSH", "1us"}});
  EXPECT_EQ(busy_log.exit_code, 2);
  EXPECT_THAT(busy_log.err, HasSubstr("at least 10ms"));
}

TEST_F(CoreTest, SflbctlStatsKeysAndErrors) {
  StartCluster(3);
  auto client = cluster_.Client();
  for (int i = 0; i < 9; ++i) ASSERT_TRUE(client->Get("/v1/models", TestCluster::UserAuth()));
  // Usage reaches the controlplane within a report interval or two.
  absl::Time deadline = absl::Now() + absl::Seconds(10);
  nlohmann::json stats;
  while (absl::Now() < deadline) {
    CommandResult r = cluster_.Ctl({"stats", "--json"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    stats = nlohmann::json::parse(r.out);
    // Protobuf's JSON mapping writes uint64 as a string.
    if (stats.value("total_requests", std::string("0")) == "9") break;
    absl::SleepFor(absl::Milliseconds(100));
  }
  EXPECT_EQ(stats["total_keys"], 3);
  CommandResult keys = cluster_.Ctl({"keys"});
  EXPECT_EQ(keys.exit_code, 0) << keys.err;
  for (const std::string& key : keys_) {
    EXPECT_THAT(keys.out, Not(HasSubstr(key)));
    EXPECT_THAT(keys.out, HasSubstr(KeyFingerprint(key)));
  }
  CommandResult bad = cluster_.Ctl({"stats"}, {{"LB_ADMIN_KEY", "wrong"}});
  EXPECT_EQ(bad.exit_code, 4) << bad.err;
  CommandResult unreachable = cluster_.Ctl({"stats", "--server", "127.0.0.1:1"});
  EXPECT_EQ(unreachable.exit_code, 3) << unreachable.err;
}

// The README's settings tables must list every environment variable the binaries accept.
TEST(DocumentationTest, ReadmeListsEverySetting) {
  std::ifstream in(std::string(SFLB_SOURCE_DIR) + "/README.md");
  std::string readme((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ASSERT_FALSE(readme.empty());
  int checked = 0;
  for (const char* binary : {SFLB_CONTROLPLANE_BIN, SFLB_DATAPLANE_BIN}) {
    CommandResult help = RunCommand(binary, {"--help"}, {});
    ASSERT_EQ(help.exit_code, 0);
    for (absl::string_view line : absl::StrSplit(help.out, '\n')) {
      size_t slash = line.find(" / ");
      if (!absl::StartsWith(line, "  --") || slash == absl::string_view::npos) continue;
      std::string env(line.substr(slash + 3));
      EXPECT_THAT(readme, HasSubstr(absl::StrCat("`", env, "`"))) << env << " is not documented";
      ++checked;
    }
  }
  EXPECT_GT(checked, 40);
}

}  // namespace
}  // namespace sflb::e2e
