#include "tests/e2e/test_cluster.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fstream>

#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"

namespace sflb::e2e {
namespace {

// Paths of the binaries under test, injected by CMake.
const char* kControlplaneBin = SFLB_CONTROLPLANE_BIN;
const char* kDataplaneBin = SFLB_DATAPLANE_BIN;
const char* kCtlBin = SFLB_CTL_BIN;
const char* kFakeBin = SFLB_FAKE_UPSTREAM_BIN;

int FreePort() {
  // Bind to port 0, read the port, close: good enough on loopback for a process that binds it
  // right away (the controlplane needs a fixed port across restarts). Not httplib: its Server
  // keeps a socket bound and never closed unless it ran, and gRPC's SO_REUSEPORT would then
  // share the port with that dead listener.
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  int port = 0;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    socklen_t len = sizeof(addr);
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
    port = ntohs(addr.sin_port);
  }
  ::close(fd);
  return port;
}

}  // namespace

std::vector<std::string> MakeKeys(int n) {
  absl::BitGen gen;
  std::vector<std::string> keys;
  for (int i = 0; i < n; ++i) {
    keys.push_back(absl::StrFormat("sk-e2e-%03d-%016x", i, absl::Uniform<uint64_t>(gen)));
  }
  return keys;
}

TestCluster::~TestCluster() {
  for (auto& dp : dataplanes_) dp->Stop(absl::Seconds(5));
  if (controlplane_) controlplane_->Stop(absl::Seconds(5));
  if (fake_) fake_->Stop(absl::Seconds(5));
}

std::string TestCluster::controlplane_address() const {
  return absl::StrCat("127.0.0.1:", controlplane_port_);
}

std::string TestCluster::base_url() const {
  return absl::StrCat("http://127.0.0.1:", fake_port_, "/v1");
}

absl::Status TestCluster::Start(ClusterOptions options) {
  options_ = std::move(options);
  dir_ = MakeTempDir("e2e");
  keys_file_ = dir_ + "/keys.txt";
  if (!options_.keys_via_env) {
    WriteFileAtomically(keys_file_, absl::StrJoin(options_.key_lines, "\n") + "\n");
  }
  fake_ = std::make_unique<ChildProcess>();
  std::vector<std::string> fake_args = {"--port", "0", "--threads", "512"};
  fake_args.insert(fake_args.end(), options_.fake_args.begin(), options_.fake_args.end());
  absl::Status s = fake_->Start(kFakeBin, fake_args, {}, dir_ + "/fake.log");
  if (!s.ok()) return s;
  absl::StatusOr<int> port = fake_->WaitForListening();
  if (!port.ok()) return port.status();
  fake_port_ = *port;

  controlplane_port_ = FreePort();
  s = StartControlplane();
  if (!s.ok()) return s;
  for (int i = 0; i < options_.dataplanes; ++i) {
    absl::StatusOr<int> index = StartDataplane();
    if (!index.ok()) return index.status();
  }
  return absl::OkStatus();
}

absl::Status TestCluster::StartControlplane() {
  std::map<std::string, std::string> env = {
      {"SFLB_LISTEN", controlplane_address()},
      {"SFLB_KEYS_FILE", keys_file_},
      {"LB_ADMIN_KEY", kAdminKey},
      {"SILICONFLOW_BASE_URL", base_url()},
      {"SFLB_WATCH_HEARTBEAT", "1s"},
      // Off unless a test asks: prometheus-cpp's exporter adds ~2 s to every process exit.
      {"SFLB_METRICS_LISTEN", "off"},
  };
  if (options_.keys_via_env) {
    for (size_t i = 0; i < options_.key_lines.size(); ++i) {
      env[absl::StrCat("SILICONFLOW_API_KEY_", i + 1)] = options_.key_lines[i];
    }
  }
  for (const auto& [k, v] : options_.controlplane_env) env[k] = v;
  controlplane_ = std::make_unique<ChildProcess>();
  absl::Status s = controlplane_->Start(
      kControlplaneBin, {}, env, absl::StrCat(dir_, "/controlplane.", controlplane_starts_++, ".log"));
  if (!s.ok()) return s;
  return controlplane_->WaitForListening().status();
}

absl::Status TestCluster::RestartControlplane() {
  controlplane_->Stop();
  return StartControlplane();
}

absl::StatusOr<int> TestCluster::StartDataplane(std::map<std::string, std::string> extra_env) {
  int index = static_cast<int>(dataplanes_.size());
  std::map<std::string, std::string> env = {
      {"PORT", "0"},
      {"SFLB_HOST", "127.0.0.1"},
      {"LB_API_KEY", kUserKey},
      {"LB_ADMIN_KEY", kAdminKey},
      {"SILICONFLOW_BASE_URL", base_url()},
      {"SFLB_CONTROLPLANE", controlplane_address()},
      {"SFLB_REPLICA_ID", absl::StrCat("dp-", index)},
      {"SFLB_METRICS_LISTEN", "off"},
      // Tests stop replicas often; drain tests set their own grace.
      {"SFLB_DRAIN_GRACE", "0s"},
  };
  for (const auto& [k, v] : options_.dataplane_env) env[k] = v;
  for (const auto& [k, v] : extra_env) env[k] = v;
  auto dp = std::make_unique<ChildProcess>();
  absl::Status s =
      dp->Start(kDataplaneBin, {}, env, absl::StrCat(dir_, "/dataplane.", index, ".log"));
  if (!s.ok()) return s;
  absl::StatusOr<int> port = dp->WaitForListening();
  if (!port.ok()) return port.status();
  dataplanes_.push_back(std::move(dp));
  dataplane_ports_.push_back(*port);
  // A replica that cannot get its key set (wrong credentials) is not ready: give it a
  // generous but finite time.
  s = WaitReady(index, absl::Seconds(15));
  if (!s.ok()) return s;
  return index;
}

std::unique_ptr<httplib::Client> TestCluster::Client(int i) const {
  auto client = std::make_unique<httplib::Client>("127.0.0.1", dataplane_ports_.at(static_cast<size_t>(i)));
  client->set_connection_timeout(5, 0);
  client->set_read_timeout(60, 0);
  client->set_write_timeout(60, 0);
  return client;
}

httplib::Headers TestCluster::UserAuth() {
  return {{"Authorization", absl::StrCat("Bearer ", kUserKey)}};
}

nlohmann::json TestCluster::FakeRequests(uint64_t since) const {
  httplib::Client c("127.0.0.1", fake_port_);
  c.set_read_timeout(30, 0);
  auto res = c.Get(absl::StrCat("/_fake/requests?since=", since));
  if (!res || res->status != 200) return nlohmann::json::array();
  return nlohmann::json::parse(res->body)["requests"];
}

nlohmann::json TestCluster::FakeStats() const {
  httplib::Client c("127.0.0.1", fake_port_);
  auto res = c.Get("/_fake/stats");
  if (!res || res->status != 200) return nlohmann::json::object();
  return nlohmann::json::parse(res->body);
}

void TestCluster::AddFault(const nlohmann::json& rule) const {
  httplib::Client c("127.0.0.1", fake_port_);
  c.Post("/_fake/faults", rule.dump(), "application/json");
}

void TestCluster::ClearFaults() const {
  httplib::Client c("127.0.0.1", fake_port_);
  c.Delete("/_fake/faults");
}

void TestCluster::ResetFake() const {
  httplib::Client c("127.0.0.1", fake_port_);
  c.Post("/_fake/reset", "", "application/json");
}

CommandResult TestCluster::Ctl(const std::vector<std::string>& args,
                               const std::map<std::string, std::string>& extra_env) const {
  std::map<std::string, std::string> env = {{"SFLB_CONTROLPLANE", controlplane_address()},
                                            {"LB_ADMIN_KEY", kAdminKey}};
  for (const auto& [k, v] : extra_env) env[k] = v;
  return RunCommand(kCtlBin, args, env);
}

absl::Status TestCluster::WaitForKeyCount(int i, size_t total_keys, absl::Duration timeout) {
  absl::Time deadline = absl::Now() + timeout;
  auto client = Client(i);
  std::string last;
  while (absl::Now() < deadline) {
    auto res = client->Get("/health", UserAuth());
    if (res) {
      last = res->body;
      nlohmann::json body = nlohmann::json::parse(res->body, nullptr, false);
      if (body.is_object() && body["replica"].value("totalKeys", size_t{0}) == total_keys) {
        return absl::OkStatus();
      }
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  return absl::DeadlineExceededError(absl::StrCat("dataplane ", i, " never saw ", total_keys,
                                                  " keys; last /health: ", last));
}

absl::Status TestCluster::WaitReady(int i, absl::Duration timeout) {
  absl::Time deadline = absl::Now() + timeout;
  auto client = Client(i);
  while (absl::Now() < deadline) {
    auto res = client->Get("/readyz");
    if (res && res->status == 200) return absl::OkStatus();
    absl::SleepFor(absl::Milliseconds(20));
  }
  return absl::DeadlineExceededError(absl::StrCat("dataplane ", i, " never became ready"));
}

std::string TestCluster::AllLogs() const {
  std::string out;
  if (fake_) out += fake_->ReadLog();
  for (int i = 0; i < controlplane_starts_; ++i) {
    std::ifstream in(absl::StrCat(dir_, "/controlplane.", i, ".log"));
    out += std::string(std::istreambuf_iterator<char>(in), {});
  }
  for (const auto& dp : dataplanes_) out += dp->ReadLog();
  return out;
}

}  // namespace sflb::e2e
