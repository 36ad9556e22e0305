// TestCluster: a whole sflb deployment for one end-to-end test — the fake SiliconFlow, one
// controlplane and N dataplane replicas, each a real process on an ephemeral port — plus
// helpers to drive the fake's control API and run sflbctl.
#ifndef SFLB_TESTS_E2E_TEST_CLUSTER_H_
#define SFLB_TESTS_E2E_TEST_CLUSTER_H_

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "httplib.h"
#include "nlohmann/json.hpp"
#include "tests/e2e/child_process.h"

namespace sflb::e2e {

inline constexpr char kUserKey[] = "lb-user-key-for-tests-7f3a9c";
inline constexpr char kAdminKey[] = "lb-admin-key-for-tests-2b8e41";

struct ClusterOptions {
  int dataplanes = 1;
  // Upstream keys written to keys.txt (one line each, may carry " account=x").
  std::vector<std::string> key_lines;
  // When true the keys go into SILICONFLOW_API_KEY_N instead of a keys file.
  bool keys_via_env = false;
  std::map<std::string, std::string> controlplane_env;
  std::map<std::string, std::string> dataplane_env;
  std::vector<std::string> fake_args;
};

// Generates `n` distinct upstream test keys ("sk-e2e-<i>-<random>").
std::vector<std::string> MakeKeys(int n);

class TestCluster {
 public:
  TestCluster() = default;
  ~TestCluster();  // stops every process

  // Starts the fake, the controlplane and the dataplanes, and waits until every dataplane is
  // ready (holds a snapshot).
  absl::Status Start(ClusterOptions options);

  // Adds one more dataplane replica; returns its index.
  absl::StatusOr<int> StartDataplane(std::map<std::string, std::string> extra_env = {});
  // Stops (SIGTERM) and starts the controlplane again on the same port.
  absl::Status RestartControlplane();
  absl::Status StartControlplane();

  ChildProcess& fake() { return *fake_; }
  ChildProcess& controlplane() { return *controlplane_; }
  ChildProcess& dataplane(int i) { return *dataplanes_.at(static_cast<size_t>(i)); }
  int dataplane_count() const { return static_cast<int>(dataplanes_.size()); }
  int dataplane_port(int i) const { return dataplane_ports_.at(static_cast<size_t>(i)); }
  int fake_port() const { return fake_port_; }
  int controlplane_port() const { return controlplane_port_; }
  std::string controlplane_address() const;
  const std::string& dir() const { return dir_; }
  const std::string& keys_file() const { return keys_file_; }
  std::string base_url() const;

  // An HTTP client for dataplane `i` with generous timeouts.
  std::unique_ptr<httplib::Client> Client(int i = 0) const;
  // Headers with the user key.
  static httplib::Headers UserAuth();

  // Fake control API.
  nlohmann::json FakeRequests(uint64_t since = 0) const;
  nlohmann::json FakeStats() const;
  void AddFault(const nlohmann::json& rule) const;
  void ClearFaults() const;
  void ResetFake() const;

  // Runs sflbctl against the controlplane with the admin key in the environment.
  CommandResult Ctl(const std::vector<std::string>& args,
                    const std::map<std::string, std::string>& extra_env = {}) const;

  // Waits until dataplane `i` reports `total_keys` keys in /health.
  absl::Status WaitForKeyCount(int i, size_t total_keys, absl::Duration timeout = absl::Seconds(20));
  // Waits until dataplane `i`'s /readyz answers 200.
  absl::Status WaitReady(int i, absl::Duration timeout = absl::Seconds(30));

  // Concatenated logs of every process (for secret scans and failure output).
  std::string AllLogs() const;

 private:
  ClusterOptions options_;
  std::string dir_;
  std::string keys_file_;
  std::unique_ptr<ChildProcess> fake_;
  std::unique_ptr<ChildProcess> controlplane_;
  std::vector<std::unique_ptr<ChildProcess>> dataplanes_;
  std::vector<int> dataplane_ports_;
  int fake_port_ = 0;
  int controlplane_port_ = 0;
  int controlplane_starts_ = 0;
};

}  // namespace sflb::e2e

#endif  // SFLB_TESTS_E2E_TEST_CLUSTER_H_
