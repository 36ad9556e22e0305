// End-to-end tests of deployment behaviour (issue: deployment): dataplane drain on SIGTERM,
// controlplane reloads on SIGHUP and keys-file change, TLS and mutual TLS on the control
// channel, and separate credentials for dataplanes and admins.
#include <signal.h>

#include <atomic>
#include <cstdlib>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "common/key_format.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/e2e/test_cluster.h"

namespace sflb::e2e {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

constexpr char kToken[] = "dataplane-token-for-tests-5c1e";

// Opens one SSE stream in a thread and collects it.
struct Stream {
  std::thread thread;
  std::string body;
  int status = 0;
  bool transport_ok = false;
};

void OpenStream(const TestCluster& cluster, int chunks, int delay_ms, Stream* s) {
  s->thread = std::thread([&cluster, chunks, delay_ms, s] {
    auto client = cluster.Client(0);
    httplib::Headers headers = TestCluster::UserAuth();
    headers.emplace("x-fake-chunks", absl::StrCat(chunks));
    headers.emplace("x-fake-chunk-delay-ms", absl::StrCat(delay_ms));
    auto res = client->Post("/v1/chat/completions", headers,
                            R"({"model":"m","stream":true,"messages":[]})", "application/json");
    s->transport_ok = static_cast<bool>(res);
    if (res) {
      s->status = res->status;
      s->body = res->body;
    }
  });
}

class LifecycleTest : public ::testing::Test {
 protected:
  void TearDown() override {
    std::string logs = cluster_.AllLogs();
    for (const std::string& key : keys_) EXPECT_THAT(logs, Not(HasSubstr(key)));
    EXPECT_THAT(logs, Not(HasSubstr(kToken)));
  }
  std::vector<std::string> keys_ = MakeKeys(2);
  TestCluster cluster_;
};

TEST_F(LifecycleTest, SigtermLetsActiveStreamsFinishAndStopsBeingReady) {
  ClusterOptions options;
  options.key_lines = keys_;
  options.dataplane_env = {{"SFLB_DRAIN_GRACE", "1s"}, {"SFLB_DRAIN_TIMEOUT", "30s"}};
  ASSERT_TRUE(cluster_.Start(options).ok());
  std::vector<Stream> streams(5);
  for (auto& s : streams) OpenStream(cluster_, 20, 100, &s);  // ~2 s each
  absl::SleepFor(absl::Milliseconds(400));
  cluster_.dataplane(0).Signal(SIGTERM);
  // Readiness fails at once, while the grace still serves.
  absl::Time deadline = absl::Now() + absl::Seconds(2);
  int ready_status = 0;
  while (absl::Now() < deadline && ready_status != 503) {
    auto res = cluster_.Client(0)->Get("/readyz");
    ready_status = res ? res->status : -1;
  }
  EXPECT_EQ(ready_status, 503);
  for (auto& s : streams) s.thread.join();
  for (const auto& s : streams) {
    ASSERT_TRUE(s.transport_ok);
    EXPECT_EQ(s.status, 200);
    EXPECT_TRUE(absl::EndsWith(s.body, "data: [DONE]\n\n")) << "a stream was cut by the drain";
    EXPECT_THAT(s.body, Not(HasSubstr("\"error\"")));
  }
  absl::StatusOr<int> code = cluster_.dataplane(0).Wait(absl::Seconds(20));
  ASSERT_TRUE(code.ok());
  EXPECT_EQ(*code, 0);
}

TEST_F(LifecycleTest, DrainDeadlineEndsStreamsWithAnSseError) {
  ClusterOptions options;
  options.key_lines = keys_;
  options.dataplane_env = {{"SFLB_DRAIN_GRACE", "0s"}, {"SFLB_DRAIN_TIMEOUT", "1s"}};
  ASSERT_TRUE(cluster_.Start(options).ok());
  Stream s;
  OpenStream(cluster_, 200, 100, &s);  // ~20 s: longer than the drain allows
  absl::SleepFor(absl::Milliseconds(500));
  cluster_.dataplane(0).Signal(SIGTERM);
  s.thread.join();
  ASSERT_TRUE(s.transport_ok);
  EXPECT_EQ(s.status, 200);
  EXPECT_THAT(s.body, HasSubstr("server_shutting_down"));
  EXPECT_TRUE(absl::EndsWith(s.body, "\n\n"));
  absl::StatusOr<int> code = cluster_.dataplane(0).Wait(absl::Seconds(20));
  ASSERT_TRUE(code.ok());
  EXPECT_EQ(*code, 0);
}

TEST_F(LifecycleTest, KeysFileChangeAndSighupReloadWithoutARestart) {
  ClusterOptions options;
  options.key_lines = keys_;
  options.controlplane_env = {{"SFLB_KEYS_FILE_POLL", "200ms"}};
  ASSERT_TRUE(cluster_.Start(options).ok());
  std::vector<std::string> more = MakeKeys(3);
  WriteFileAtomically(cluster_.keys_file(), absl::StrJoin(more, "\n") + "\n");
  keys_.insert(keys_.end(), more.begin(), more.end());
  EXPECT_TRUE(cluster_.WaitForKeyCount(0, 3).ok());
  CommandResult audit = cluster_.Ctl({"audit", "--json"});
  EXPECT_EQ(audit.exit_code, 0) << audit.err;
  EXPECT_THAT(audit.out, HasSubstr("keys-file-watch"));

  // SIGHUP reloads too (here with polling's help excluded: the file changes and is read at
  // once on the signal).
  std::vector<std::string> one = MakeKeys(1);
  keys_.insert(keys_.end(), one.begin(), one.end());
  WriteFileAtomically(cluster_.keys_file(), one[0] + "\n");
  cluster_.controlplane().Signal(SIGHUP);
  EXPECT_TRUE(cluster_.WaitForKeyCount(0, 1).ok());
}

// Generates a CA, a server certificate for 127.0.0.1 and a client certificate in `dir`.
void MakeCertificates(const std::string& dir) {
  WriteFileAtomically(dir + "/make.sh", R"(set -e
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key \
  -out ca.pem -subj /CN=sflb-test-ca -days 2 2>/dev/null
for n in server client; do
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout $n.key -out $n.csr \
    -subj /CN=$n 2>/dev/null
done
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > san.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem \
  -days 2 -extfile san.ext 2>/dev/null
openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem \
  -days 2 2>/dev/null
)");
  ASSERT_EQ(std::system(absl::StrCat("cd '", dir, "' && bash make.sh").c_str()), 0);
}

TEST_F(LifecycleTest, TlsAndMutualTlsOnTheControlChannel) {
  std::string certs = MakeTempDir("certs");
  MakeCertificates(certs);
  ClusterOptions options;
  options.key_lines = keys_;
  options.controlplane_env = {{"SFLB_TLS_CERT_FILE", certs + "/server.pem"},
                              {"SFLB_TLS_KEY_FILE", certs + "/server.key"},
                              {"SFLB_TLS_CLIENT_CA_FILE", certs + "/ca.pem"}};
  options.dataplane_env = {{"SFLB_CONTROLPLANE_CA_FILE", certs + "/ca.pem"},
                           {"SFLB_CONTROLPLANE_CERT_FILE", certs + "/client.pem"},
                           {"SFLB_CONTROLPLANE_KEY_FILE", certs + "/client.key"}};
  // Start() waits for readiness: the dataplane got its snapshot over mutual TLS.
  ASSERT_TRUE(cluster_.Start(options).ok());
  auto res = cluster_.Client(0)->Get("/v1/models", TestCluster::UserAuth());
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);

  std::map<std::string, std::string> tls = {{"SFLB_CONTROLPLANE_CA_FILE", certs + "/ca.pem"},
                                            {"SFLB_CONTROLPLANE_CERT_FILE", certs + "/client.pem"},
                                            {"SFLB_CONTROLPLANE_KEY_FILE", certs + "/client.key"}};
  CommandResult ok = cluster_.Ctl({"stats"}, tls);
  EXPECT_EQ(ok.exit_code, 0) << ok.err;
  // Without a client certificate, or in plaintext, the controlplane is out of reach.
  CommandResult no_cert = cluster_.Ctl({"stats"}, {{"SFLB_CONTROLPLANE_CA_FILE", certs + "/ca.pem"}});
  EXPECT_EQ(no_cert.exit_code, 3);
  CommandResult plain = cluster_.Ctl({"stats"});
  EXPECT_EQ(plain.exit_code, 3);
  // A dataplane without a client certificate never becomes ready.
  absl::StatusOr<int> index = cluster_.StartDataplane(
      {{"SFLB_CONTROLPLANE_CERT_FILE", ""}, {"SFLB_CONTROLPLANE_KEY_FILE", ""}});
  EXPECT_FALSE(index.ok());
}

TEST_F(LifecycleTest, EachCallerKindNeedsItsOwnCredential) {
  ClusterOptions options;
  options.key_lines = keys_;
  options.controlplane_env = {{"SFLB_DATAPLANE_TOKEN", kToken}};
  options.dataplane_env = {{"SFLB_DATAPLANE_TOKEN", kToken}};
  ASSERT_TRUE(cluster_.Start(options).ok());  // the right token: ready

  // A dataplane with a wrong token, or with the admin key, gets no keys.
  auto wrong = cluster_.StartDataplane({{"SFLB_DATAPLANE_TOKEN", "not-the-token"}});
  EXPECT_FALSE(wrong.ok());
  auto admin = cluster_.StartDataplane({{"SFLB_DATAPLANE_TOKEN", kAdminKey}});
  EXPECT_FALSE(admin.ok());
  // The dataplane token cannot call admin methods.
  CommandResult as_admin = cluster_.Ctl({"stats"}, {{"LB_ADMIN_KEY", kToken}});
  EXPECT_EQ(as_admin.exit_code, 4) << as_admin.err;
  // Every rejection is audited, with the kind of credential that was wrong.
  CommandResult audit = cluster_.Ctl({"audit", "--json", "--limit", "1000"});
  ASSERT_EQ(audit.exit_code, 0) << audit.err;
  EXPECT_THAT(audit.out, HasSubstr("\"wrong token\""));
  EXPECT_THAT(audit.out, HasSubstr("\"admin key\""));
  EXPECT_THAT(audit.out, HasSubstr("\"dataplane token\""));
}

}  // namespace
}  // namespace sflb::e2e
