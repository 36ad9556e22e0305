// Tests FakeSiliconFlow over real sockets: the server runs in-process on an ephemeral port and
// every feature is driven through httplib::Client (or a raw socket, where the point is to see
// the bytes on the wire).
#include "tests/fake_upstream/fake_siliconflow.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace sflb::testing {
namespace {

using json = nlohmann::json;

// Polls `done` until it holds or `timeout` passes. Returns the last result.
bool WaitFor(const std::function<bool()>& done, absl::Duration timeout = absl::Seconds(5)) {
  const absl::Time deadline = absl::Now() + timeout;
  while (!done()) {
    if (absl::Now() > deadline) return false;
    absl::SleepFor(absl::Milliseconds(5));
  }
  return true;
}

// Sends `request` verbatim on a fresh TCP connection and returns everything read until the
// server closes it (or 5 s pass).
std::string RawExchange(int port, const std::string& request) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  EXPECT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  timeval tv{5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  std::string out;
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      send(fd, request.data(), request.size(), MSG_NOSIGNAL) ==
          static_cast<ssize_t>(request.size())) {
    char buf[4096];
    ssize_t n;
    while ((n = recv(fd, buf, sizeof(buf), 0)) > 0) out.append(buf, static_cast<size_t>(n));
  }
  close(fd);
  return out;
}

std::string ChatBody(const std::string& model, bool stream) {
  return json{{"model", model},
              {"stream", stream},
              {"messages", json::array({json{{"role", "user"}, {"content", "Hello there!"}}})}}
      .dump();
}

// Splits an SSE body into the payloads of its `data:` lines.
std::vector<std::string> SseData(const std::string& body) {
  std::vector<std::string> out;
  for (absl::string_view event : absl::StrSplit(body, "\n\n", absl::SkipEmpty())) {
    if (absl::StartsWith(event, "data: ")) out.emplace_back(event.substr(6));
  }
  return out;
}

class FakeSiliconFlowTest : public ::testing::Test {
 protected:
  void SetUp() override {
    FakeOptions options;
    options.threads = 32;
    options.chunks = 4;
    options.chunk_delay = absl::Milliseconds(5);
    fake_ = std::make_unique<FakeSiliconFlow>(options);
    port_ = fake_->BindToPort("127.0.0.1", 0);
    ASSERT_GT(port_, 0);
    server_thread_ = std::thread([this] { fake_->ListenAfterBind(); });
    ASSERT_TRUE(WaitFor([this] { return fake_->IsRunning(); }));
  }

  void TearDown() override {
    fake_->Stop();
    if (server_thread_.joinable()) server_thread_.join();
  }

  std::unique_ptr<httplib::Client> NewClient(absl::Duration read_timeout = absl::Seconds(5)) {
    auto client = std::make_unique<httplib::Client>("127.0.0.1", port_);
    client->set_connection_timeout(std::chrono::seconds(2));
    client->set_read_timeout(absl::ToChronoMilliseconds(read_timeout));
    client->set_write_timeout(std::chrono::seconds(5));
    return client;
  }

  static httplib::Headers Auth(const std::string& key) {
    return {{"Authorization", absl::StrCat("Bearer ", key)}};
  }

  json GetJson(const std::string& path) {
    auto res = NewClient()->Get(path.c_str());
    EXPECT_TRUE(res) << path;
    if (!res) return json();
    EXPECT_EQ(res->status, 200) << path << ": " << res->body;
    return json::parse(res->body, nullptr, false);
  }

  int64_t AddFault(const json& rule) {
    auto res = NewClient()->Post("/_fake/faults", rule.dump(), "application/json");
    EXPECT_TRUE(res);
    if (!res) return -1;
    EXPECT_EQ(res->status, 200) << res->body;
    return json::parse(res->body).value("id", int64_t{-1});
  }

  json Stats() { return GetJson("/_fake/stats"); }

  std::unique_ptr<FakeSiliconFlow> fake_;
  int port_ = -1;
  std::thread server_thread_;
};

TEST_F(FakeSiliconFlowTest, ModelsAuthTraceIdAndNotFound) {
  auto client = NewClient();
  auto a = client->Get("/v1/models", Auth("k1"));
  auto b = client->Get("/v1/models", Auth("k1"));
  ASSERT_TRUE(a && b);
  ASSERT_EQ(a->status, 200);
  json models = json::parse(a->body);
  EXPECT_EQ(models["object"], "list");
  ASSERT_GE(models["data"].size(), 3u);
  EXPECT_EQ(models["data"][0]["id"], "Qwen/Qwen2.5-7B-Instruct");
  EXPECT_EQ(models["data"][0]["object"], "model");
  // A trace id on every response, fresh each time.
  ASSERT_TRUE(a->has_header("x-siliconcloud-trace-id"));
  EXPECT_NE(a->get_header_value("x-siliconcloud-trace-id"),
            b->get_header_value("x-siliconcloud-trace-id"));

  auto no_key = client->Get("/v1/models");
  ASSERT_TRUE(no_key);
  EXPECT_EQ(no_key->status, 401);
  EXPECT_EQ(json::parse(no_key->body),
            json::parse(R"({"code":20001,"message":"Invalid token","data":null})"));
  EXPECT_TRUE(no_key->has_header("x-siliconcloud-trace-id"));

  // A long path (deep std::regex recursion in httplib's router) is served.
  auto long_path = client->Get(("/v1/" + std::string(8000, 'x')).c_str(), Auth("k1"));
  ASSERT_TRUE(long_path);
  EXPECT_EQ(long_path->status, 200);

  auto other = client->Get("/v2/whatever", Auth("k1"));
  ASSERT_TRUE(other);
  EXPECT_EQ(other->status, 404);
  EXPECT_TRUE(json::parse(other->body, nullptr, false).is_object());
  EXPECT_TRUE(other->has_header("x-siliconcloud-trace-id"));
}

TEST_F(FakeSiliconFlowTest, ChatCompletionNonStream) {
  auto client = NewClient();
  auto res = client->Post("/v1/chat/completions", Auth("k1"),
                          ChatBody("Qwen/Qwen2.5-7B-Instruct", false), "application/json");
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200) << res->body;
  EXPECT_TRUE(absl::StartsWith(res->get_header_value("Content-Type"), "application/json"));
  json body = json::parse(res->body);
  EXPECT_TRUE(body["id"].is_string());
  EXPECT_EQ(body["object"], "chat.completion");
  EXPECT_TRUE(body["created"].is_number_integer());
  EXPECT_EQ(body["model"], "Qwen/Qwen2.5-7B-Instruct");
  EXPECT_EQ(body["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(body["choices"][0]["message"]["content"], "tok0 tok1 tok2 tok3 ");
  EXPECT_EQ(body["choices"][0]["finish_reason"], "stop");
  const json& usage = body["usage"];
  EXPECT_GT(usage["prompt_tokens"].get<int>(), 0);
  EXPECT_EQ(usage["completion_tokens"], 4);
  EXPECT_EQ(usage["total_tokens"].get<int>(),
            usage["prompt_tokens"].get<int>() + usage["completion_tokens"].get<int>());

  auto bad = client->Post("/v1/chat/completions", Auth("k1"), "{not json", "application/json");
  ASSERT_TRUE(bad);
  EXPECT_EQ(bad->status, 400);
  json err = json::parse(bad->body);
  EXPECT_EQ(err["code"], 20015);
  EXPECT_TRUE(err["data"].is_null());
}

TEST_F(FakeSiliconFlowTest, ChatCompletionStream) {
  auto res = NewClient()->Post("/v1/chat/completions", Auth("k1"),
                               ChatBody("deepseek-ai/DeepSeek-V3", true), "application/json");
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200);
  EXPECT_EQ(res->get_header_value("Content-Type"), "text/event-stream; charset=utf-8");
  std::vector<std::string> data = SseData(res->body);
  ASSERT_EQ(data.size(), 5u) << res->body;  // 4 chunks + [DONE]
  EXPECT_EQ(data.back(), "[DONE]");
  for (int i = 0; i < 4; ++i) {
    json chunk = json::parse(data[static_cast<size_t>(i)]);
    EXPECT_EQ(chunk["object"], "chat.completion.chunk");
    EXPECT_EQ(chunk["model"], "deepseek-ai/DeepSeek-V3");
    EXPECT_EQ(chunk["x_fake_chunk_index"], i);
    EXPECT_EQ(chunk["choices"][0]["delta"]["content"], absl::StrCat("tok", i, " "));
    EXPECT_EQ(chunk.contains("usage"), i == 3);
    EXPECT_EQ(chunk["choices"][0]["finish_reason"].is_null(), i != 3);
  }
  json last = json::parse(data[3]);
  EXPECT_EQ(last["usage"]["completion_tokens"], 4);
  EXPECT_EQ(last["choices"][0]["finish_reason"], "stop");

  // Per-request overrides of the chunk count.
  auto seven = NewClient()->Post("/v1/chat/completions",
                                 {{"Authorization", "Bearer k1"}, {"x-fake-chunks", "7"}},
                                 ChatBody("m", true), "application/json");
  ASSERT_TRUE(seven);
  EXPECT_EQ(SseData(seven->body).size(), 8u);
}

TEST_F(FakeSiliconFlowTest, StreamArrivesIncrementallyEvenWhenClientAcceptsGzip) {
  // 3 chunks 150 ms apart: the first must arrive long before the last.
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/chat/completions";
  req.headers = {{"Authorization", "Bearer k1"},
                 {"Accept-Encoding", "gzip, deflate, br"},
                 {"x-fake-chunks", "3"},
                 {"x-fake-chunk-delay-ms", "150"},
                 {"x-fake-first-chunk-delay-ms", "0"},
                 {"Content-Type", "application/json"}};
  req.body = ChatBody("m", true);
  const absl::Time start = absl::Now();
  absl::Duration first_data = absl::InfiniteDuration();
  std::string body;
  req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
    if (body.empty()) first_data = absl::Now() - start;
    body.append(data, n);
    return true;
  };
  httplib::Response res;
  httplib::Error error = httplib::Error::Success;
  ASSERT_TRUE(NewClient()->send(req, res, error)) << httplib::to_string(error);
  const absl::Duration total = absl::Now() - start;
  EXPECT_EQ(res.get_header_value("Content-Encoding"), "");
  EXPECT_LT(first_data, absl::Milliseconds(150));
  EXPECT_GE(total, absl::Milliseconds(300));
  EXPECT_EQ(SseData(body).size(), 4u);
}

TEST_F(FakeSiliconFlowTest, RecordsRequestsAndEchoesUnknownPaths) {
  const uint64_t since = fake_->RequestsSince(0).size();
  auto client = NewClient();
  httplib::Headers headers = Auth("key-rec");
  headers.emplace("X-Custom", "v1");
  auto echo = client->Post("/v1/files/abc?b=2&a=%20x", headers, "raw body", "text/plain");
  ASSERT_TRUE(echo);
  ASSERT_EQ(echo->status, 200);
  json e = json::parse(echo->body)["echo"];
  EXPECT_EQ(e["method"], "POST");
  EXPECT_EQ(e["path"], "/v1/files/abc");
  EXPECT_EQ(e["query"], "b=2&a=%20x");
  EXPECT_EQ(e["body"], "raw body");
  EXPECT_EQ(e["headers"]["X-Custom"], "v1");
  EXPECT_EQ(e["headers"]["Authorization"], "Bearer key-rec");
  EXPECT_FALSE(e["headers"].contains("REMOTE_ADDR")) << "httplib's pseudo-headers leaked";
  EXPECT_FALSE(e["headers"].contains("LOCAL_PORT"));

  auto chat = client->Post("/v1/chat/completions", Auth("key-rec"),
                           ChatBody("THUDM/glm-4-9b-chat", false), "application/json");
  ASSERT_TRUE(chat);

  json list = GetJson(absl::StrCat("/_fake/requests?since=", since))["requests"];
  ASSERT_EQ(list.size(), 2u) << list.dump();
  EXPECT_EQ(list[0]["method"], "POST");
  EXPECT_EQ(list[0]["path"], "/v1/files/abc");
  EXPECT_EQ(list[0]["query"], "b=2&a=%20x");
  EXPECT_EQ(list[0]["key"], "key-rec");
  EXPECT_EQ(list[0]["body"], "raw body");
  EXPECT_EQ(list[0]["headers"]["X-Custom"], "v1");
  EXPECT_FALSE(list[0]["headers"].contains("REMOTE_PORT"));
  EXPECT_EQ(list[0]["status"], 200);
  EXPECT_EQ(list[0]["trace_id"], echo->get_header_value("x-siliconcloud-trace-id"));
  EXPECT_EQ(list[1]["model"], "THUDM/glm-4-9b-chat");
  EXPECT_EQ(list[1]["key"], "key-rec");
  EXPECT_EQ(list[1]["seq"].get<uint64_t>(), list[0]["seq"].get<uint64_t>() + 1);

  // since filters; DELETE clears.
  json later = GetJson(absl::StrCat("/_fake/requests?since=", list[0]["seq"].get<uint64_t>()));
  EXPECT_EQ(later["requests"].size(), 1u);
  auto del = client->Delete("/_fake/requests");
  ASSERT_TRUE(del);
  EXPECT_EQ(del->status, 200);
  EXPECT_TRUE(GetJson("/_fake/requests")["requests"].empty());
}

TEST_F(FakeSiliconFlowTest, FaultStatusWithHeadersAndTimes) {
  AddFault({{"key", "k429"},
            {"action", "status"},
            {"status", 429},
            {"headers", {{"Retry-After", "7"}}},
            {"times", 1}});
  AddFault({{"model", "bad-model"}, {"action", "status"}, {"status", 503}});
  AddFault({{"path", "/v1/user/info"}, {"action", "status"}, {"status", 403}, {"key", "poor"}});
  auto client = NewClient();

  auto first = client->Get("/v1/models", Auth("k429"));
  ASSERT_TRUE(first);
  EXPECT_EQ(first->status, 429);
  EXPECT_EQ(first->get_header_value("Retry-After"), "7");
  json body = json::parse(first->body);
  EXPECT_EQ(body["code"], 50603);
  EXPECT_TRUE(absl::StrContains(body["message"].get<std::string>(), "rate limiting"));
  auto second = client->Get("/v1/models", Auth("k429"));  // times: 1 is spent.
  ASSERT_TRUE(second);
  EXPECT_EQ(second->status, 200);

  auto by_model = client->Post("/v1/chat/completions", Auth("any"), ChatBody("bad-model", false),
                               "application/json");
  ASSERT_TRUE(by_model);
  EXPECT_EQ(by_model->status, 503);
  EXPECT_EQ(json::parse(by_model->body)["code"], 50500);
  auto other_model = client->Post("/v1/chat/completions", Auth("any"), ChatBody("good", false),
                                  "application/json");
  ASSERT_TRUE(other_model);
  EXPECT_EQ(other_model->status, 200);

  auto poor = client->Get("/v1/user/info", Auth("poor"));
  ASSERT_TRUE(poor);
  EXPECT_EQ(poor->status, 403);
  EXPECT_EQ(json::parse(poor->body)["code"], 30001);

  // A custom raw body.
  AddFault({{"key", "raw"}, {"action", "status"}, {"status", 500}, {"body", "oops"}});
  auto raw = client->Get("/v1/models", Auth("raw"));
  ASSERT_TRUE(raw);
  EXPECT_EQ(raw->status, 500);
  EXPECT_EQ(raw->body, "oops");

  // Malformed rules are refused.
  auto bad = client->Post("/_fake/faults", R"({"action":"explode"})", "application/json");
  ASSERT_TRUE(bad);
  EXPECT_EQ(bad->status, 400);
}

TEST_F(FakeSiliconFlowTest, FaultStallHoldsUntilReleased) {
  AddFault({{"key", "slow"}, {"action", "stall"}});
  auto client = NewClient(absl::Milliseconds(300));
  const absl::Time start = absl::Now();
  auto res = client->Get("/v1/models", Auth("slow"));
  EXPECT_FALSE(res);
  EXPECT_EQ(res.error(), httplib::Error::Read);
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(250));
  EXPECT_EQ(Stats()["stalled_requests"], 1);

  // Other keys are not affected; clearing the rules releases the held request.
  auto other = NewClient()->Get("/v1/models", Auth("fast"));
  ASSERT_TRUE(other);
  EXPECT_EQ(other->status, 200);
  ASSERT_TRUE(NewClient()->Delete("/_fake/faults"));
  EXPECT_TRUE(WaitFor([&] { return Stats()["stalled_requests"] == 0; }));
}

TEST_F(FakeSiliconFlowTest, StallDoesNotBlockStop) {
  AddFault({{"action", "stall"}});
  auto client = NewClient(absl::Milliseconds(100));
  EXPECT_FALSE(client->Get("/v1/models", Auth("k")));
  // TearDown's Stop() must return promptly although a handler is still stalled.
}

TEST_F(FakeSiliconFlowTest, StopIsPromptWithIdleKeepAliveConnections) {
  // httplib alone keeps serving an idle keep-alive connection until its keep-alive timeout.
  auto client = NewClient();
  client->set_keep_alive(true);
  auto res = client->Get("/v1/models", Auth("k"));
  ASSERT_TRUE(res);
  ASSERT_EQ(res->get_header_value("Connection"), "");  // The connection stays open.
  const absl::Time start = absl::Now();
  fake_->Stop();
  server_thread_.join();
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));
}

TEST_F(FakeSiliconFlowTest, FaultStallMidStream) {
  AddFault({{"key", "k"}, {"action", "stall"}, {"after_chunks", 1}});
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/chat/completions";
  req.headers = Auth("k");
  req.body = ChatBody("m", true);
  std::string body;
  req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
    body.append(data, n);
    return true;
  };
  httplib::Response res;
  httplib::Error error = httplib::Error::Success;
  EXPECT_FALSE(NewClient(absl::Milliseconds(400))->send(req, res, error));
  EXPECT_EQ(res.status, 200);
  EXPECT_EQ(SseData(body).size(), 1u) << body;
}

TEST_F(FakeSiliconFlowTest, FaultCutMidStreamOnTheWire) {
  AddFault({{"key", "cutme"}, {"action", "cut"}, {"after_chunks", 2}});
  const std::string body = ChatBody("m", true);
  const std::string wire = RawExchange(
      port_, absl::StrCat("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n",
                          "Authorization: Bearer cutme\r\nContent-Type: application/json\r\n",
                          "Content-Length: ", body.size(), "\r\n\r\n", body));
  EXPECT_TRUE(absl::StartsWith(wire, "HTTP/1.1 200")) << wire;
  EXPECT_TRUE(absl::StrContains(wire, "Transfer-Encoding: chunked"));
  EXPECT_TRUE(absl::StrContains(wire, "\"tok0 \""));
  EXPECT_TRUE(absl::StrContains(wire, "\"tok1 \""));
  EXPECT_FALSE(absl::StrContains(wire, "\"tok2 \""));
  EXPECT_FALSE(absl::StrContains(wire, "[DONE]"));
  EXPECT_FALSE(absl::EndsWith(wire, "0\r\n\r\n")) << "terminating chunk was sent";
  EXPECT_TRUE(WaitFor([&] { return Stats()["cut_streams"] == 1; }));

  // after_chunks beyond the last chunk: every chunk, then the cut instead of [DONE].
  AddFault({{"key", "cutend"}, {"action", "cut"}, {"after_chunks", 100}});
  const std::string all = RawExchange(
      port_, absl::StrCat("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n",
                          "Authorization: Bearer cutend\r\nContent-Length: ", body.size(),
                          "\r\n\r\n", body));
  EXPECT_TRUE(absl::StrContains(all, "\"tok3 \"")) << all;
  EXPECT_FALSE(absl::StrContains(all, "[DONE]"));
  EXPECT_TRUE(WaitFor([&] { return Stats()["cut_streams"] == 2; }));

  // A cut on a non-streamed answer closes after half the announced body.
  AddFault({{"key", "cutjson"}, {"action", "cut"}});
  auto res = NewClient()->Get("/v1/models", Auth("cutjson"));
  EXPECT_FALSE(res);
}

TEST_F(FakeSiliconFlowTest, FaultLatency) {
  AddFault({{"key", "lag"}, {"action", "latency"}, {"delay_ms", 300}});
  const absl::Time start = absl::Now();
  auto res = NewClient()->Get("/v1/models", Auth("lag"));
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(300));
}

TEST_F(FakeSiliconFlowTest, UserInfoAndAccounts) {
  auto client = NewClient();
  auto def = client->Get("/v1/user/info", Auth("k-default"));
  ASSERT_TRUE(def);
  ASSERT_EQ(def->status, 200);
  json info = json::parse(def->body);
  EXPECT_EQ(info["code"], 20000);
  EXPECT_EQ(info["status"], true);
  EXPECT_EQ(info["data"]["totalBalance"], "10.00");
  const std::string derived = info["data"]["id"];
  EXPECT_FALSE(derived.empty());
  // Stable for a key, different across keys.
  EXPECT_EQ(json::parse(client->Get("/v1/user/info", Auth("k-default"))->body)["data"]["id"],
            derived);
  EXPECT_NE(json::parse(client->Get("/v1/user/info", Auth("k-other"))->body)["data"]["id"],
            derived);

  ASSERT_TRUE(client->Post("/_fake/accounts",
                           R"({"key":"k1","account":"acct-1","balance":"1.23","status":200})",
                           "application/json"));
  json k1 = json::parse(client->Get("/v1/user/info", Auth("k1"))->body);
  EXPECT_EQ(k1["data"]["id"], "acct-1");
  EXPECT_EQ(k1["data"]["totalBalance"], "1.23");

  ASSERT_TRUE(client->Post("/_fake/accounts", R"({"key":"k1","status":410})", "application/json"));
  auto gone = client->Get("/v1/user/info", Auth("k1"));
  ASSERT_TRUE(gone);
  EXPECT_EQ(gone->status, 410);
  EXPECT_EQ(json::parse(gone->body), json::parse(R"({"code":410,"message":"gone"})"));
}

TEST_F(FakeSiliconFlowTest, StatsCountKeysModelsAndStreamOutcomes) {
  auto client = NewClient();
  ASSERT_TRUE(
      client->Post("/v1/chat/completions", Auth("ka"), ChatBody("m1", true), "application/json"));
  ASSERT_TRUE(
      client->Post("/v1/chat/completions", Auth("ka"), ChatBody("m2", false), "application/json"));
  ASSERT_TRUE(client->Get("/v1/models", Auth("kb")));

  // A client that leaves after the first event.
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/chat/completions";
  req.headers = {
      {"Authorization", "Bearer kb"}, {"x-fake-chunks", "200"}, {"x-fake-chunk-delay-ms", "10"}};
  req.body = ChatBody("m1", true);
  req.content_receiver = [](const char*, size_t, uint64_t, uint64_t) { return false; };
  httplib::Response res;
  httplib::Error error = httplib::Error::Success;
  EXPECT_FALSE(NewClient()->send(req, res, error));
  EXPECT_EQ(error, httplib::Error::Canceled);

  ASSERT_TRUE(WaitFor([&] { return Stats()["cancelled_streams"] == 1; })) << Stats().dump();
  json stats = Stats();
  EXPECT_EQ(stats["total"], 4);
  EXPECT_EQ(stats["by_key"]["ka"], 2);
  EXPECT_EQ(stats["by_key"]["kb"], 2);
  EXPECT_EQ(stats["by_model"]["m1"], 2);
  EXPECT_EQ(stats["by_model"]["m2"], 1);
  EXPECT_EQ(stats["active_streams"], 0);
  EXPECT_EQ(stats["completed_streams"], 1);
  EXPECT_EQ(stats["cancelled_streams"], 1);

  json log = GetJson("/_fake/requests")["requests"];
  ASSERT_EQ(log.size(), 4u);
  EXPECT_EQ(log[0]["stream_outcome"], "completed");
  EXPECT_EQ(log[3]["stream_outcome"], "cancelled");

  // Reset clears everything.
  ASSERT_TRUE(client->Post("/_fake/reset", "", "application/json"));
  stats = Stats();
  EXPECT_EQ(stats["total"], 0);
  EXPECT_TRUE(stats["by_key"].empty());
  EXPECT_TRUE(GetJson("/_fake/requests")["requests"].empty());
}

TEST_F(FakeSiliconFlowTest, LargeBodyAndEmbeddings) {
  auto client = NewClient();
  httplib::Headers headers = Auth("k");
  headers.emplace("x-fake-response-bytes", "300000");
  auto big = client->Get("/v1/anything", headers);
  ASSERT_TRUE(big);
  EXPECT_EQ(big->status, 200);
  EXPECT_EQ(big->get_header_value("Content-Type"), "application/octet-stream");
  EXPECT_EQ(big->get_header_value("Content-Length"), "300000");
  ASSERT_EQ(big->body.size(), 300000u);
  bool pattern_ok = true;
  for (size_t i = 0; i < big->body.size(); ++i) {
    pattern_ok = pattern_ok && big->body[i] == static_cast<char>('a' + i % 26);
  }
  EXPECT_TRUE(pattern_ok);

  auto emb = client->Post("/v1/embeddings", Auth("k"),
                          R"({"model":"BAAI/bge-m3","input":["a","b"]})", "application/json");
  ASSERT_TRUE(emb);
  ASSERT_EQ(emb->status, 200);
  json e = json::parse(emb->body);
  EXPECT_EQ(e["object"], "list");
  ASSERT_EQ(e["data"].size(), 2u);
  EXPECT_EQ(e["data"][1]["index"], 1);
  EXPECT_EQ(e["data"][0]["object"], "embedding");
  EXPECT_EQ(e["data"][0]["embedding"].size(), 8u);
  EXPECT_NE(e["data"][0]["embedding"], e["data"][1]["embedding"]);
  EXPECT_GT(e["usage"]["total_tokens"].get<int>(), 0);
  // Deterministic.
  auto again = client->Post("/v1/embeddings", Auth("k"),
                            R"({"model":"BAAI/bge-m3","input":["a","b"]})", "application/json");
  ASSERT_TRUE(again);
  EXPECT_EQ(json::parse(again->body)["data"], e["data"]);
}

}  // namespace
}  // namespace sflb::testing
