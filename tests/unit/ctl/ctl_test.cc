// sflbctl against a real in-process controlplane: the real AdminServiceImpl, KeyRegistry,
// KeySource and KeyServiceImpl on 127.0.0.1:<ephemeral>, with a keys file in a temp dir.
#include "ctl/ctl.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "common/clock.h"
#include "common/key_format.h"
#include "common/time_format.h"
#include "common/version.h"
#include "controlplane/admin_service.h"
#include "controlplane/key_registry.h"
#include "controlplane/key_service.h"
#include "controlplane/key_source.h"
#include "gmock/gmock.h"
#include "grpcpp/generic/async_generic_service.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace sflb {
namespace {

using ::testing::AllOf;
using ::testing::AnyOf;
using ::testing::Eq;
using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::StartsWith;

constexpr char kAdminKey[] = "test-admin-key-0123456789";
constexpr char kKeyA[] = "sk-aaaaaaaaaaaaaaaaaaaaaaaaaaaa0001";
constexpr char kKeyB[] = "sk-bbbbbbbbbbbbbbbbbbbbbbbbbbbb0002";
constexpr char kKeyC[] = "sk-cccccccccccccccccccccccccccc0003";
constexpr char kKeyD[] = "sk-dddddddddddddddddddddddddddd0004";

void WriteFile(const std::string& path, const std::string& content) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << content;
  ASSERT_TRUE(out.good()) << path;
}

// Splits UTF-8 text into code points, so table columns can be located by display position.
std::vector<std::string> CodePoints(absl::string_view text) {
  std::vector<std::string> out;
  for (char c : text) {
    if ((static_cast<unsigned char>(c) & 0xC0) == 0x80 && !out.empty()) {
      out.back() += c;
    } else {
      out.emplace_back(1, c);
    }
  }
  return out;
}

// A table as printed by TextTable, parsed back through its rule line ("-----  ----"), which
// gives every column's exact position. Checks on the way that every cell is aligned: left
// aligned cells start at the column, right aligned ones end at its edge.
struct ParsedTable {
  std::vector<std::string> headers;
  std::vector<std::map<std::string, std::string>> rows;  // by header
  std::map<std::string, std::string> totals;             // by header
};

ParsedTable ParseTable(const std::vector<std::string>& lines,
                       const std::vector<std::string>& right_aligned) {
  ParsedTable table;
  size_t rule = 0;
  while (rule < lines.size() &&
         (lines[rule].empty() || lines[rule].find_first_not_of("- ") != std::string::npos)) {
    ++rule;
  }
  EXPECT_LT(rule, lines.size()) << "no rule line";
  if (rule >= lines.size()) return table;
  std::vector<std::pair<size_t, size_t>> spans;  // [begin, end) in code points
  const std::string& r = lines[rule];
  for (size_t i = 0; i < r.size();) {
    if (r[i] != '-') {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < r.size() && r[j] == '-') ++j;
    spans.push_back({i, j});
    i = j;
  }
  auto cells_of = [&](const std::string& line, bool check_alignment,
                      const std::vector<std::string>& names) {
    std::vector<std::string> cps = CodePoints(line);
    size_t width = spans.empty() ? 0 : spans.back().second;
    while (cps.size() < width) cps.push_back(" ");
    std::vector<std::string> cells;
    for (size_t c = 0; c < spans.size(); ++c) {
      std::string cell;
      for (size_t k = spans[c].first; k < spans[c].second; ++k) cell += cps[k];
      // Separators between columns are blank.
      if (c + 1 < spans.size()) {
        for (size_t k = spans[c].second; k < spans[c + 1].first; ++k) {
          EXPECT_EQ(cps[k], " ") << "text between columns in: " << line;
        }
      }
      std::string trimmed(absl::StripAsciiWhitespace(cell));
      if (check_alignment && !trimmed.empty()) {
        bool right = std::find(right_aligned.begin(), right_aligned.end(), names[c]) !=
                     right_aligned.end();
        if (right) {
          EXPECT_NE(cps[spans[c].second - 1], " ") << names[c] << " not right-aligned: " << line;
        } else {
          EXPECT_NE(cps[spans[c].first], " ") << names[c] << " not left-aligned: " << line;
        }
      }
      cells.push_back(trimmed);
    }
    return cells;
  };
  EXPECT_GE(rule, 1u);
  if (rule < 1) return table;
  // The header is the line above the first row: the first line of the block before the rule.
  size_t header = rule;
  while (header > 0 && !lines[header - 1].empty()) --header;
  table.headers = cells_of(lines[header], false, {});
  for (size_t i = header + 1; i < rule; ++i) {
    std::vector<std::string> cells = cells_of(lines[i], true, table.headers);
    std::map<std::string, std::string> row;
    for (size_t c = 0; c < cells.size(); ++c) row[table.headers[c]] = cells[c];
    table.rows.push_back(row);
  }
  if (rule + 1 < lines.size()) {
    std::vector<std::string> cells = cells_of(lines[rule + 1], true, table.headers);
    for (size_t c = 0; c < cells.size(); ++c) table.totals[table.headers[c]] = cells[c];
  }
  return table;
}

std::vector<std::string> Lines(const std::string& text) {
  std::vector<std::string> lines = absl::StrSplit(text, '\n');
  if (!lines.empty() && lines.back().empty()) lines.pop_back();
  return lines;
}

class CtlTest : public ::testing::Test {
 protected:
  struct Result {
    int code = -1;
    std::string out;
    std::string err;
  };

  void SetUp() override {
    char dir_template[] = "/tmp/sflb_ctl_test_XXXXXX";
    ASSERT_NE(mkdtemp(dir_template), nullptr);
    dir_ = dir_template;
    keys_path_ = dir_ + "/keys.txt";
    WriteFile(keys_path_, absl::StrCat("# test keys\n", kKeyA, "\n", kKeyB, " account=team-a\n",
                                       kKeyC, " account=team-a\n"));
    registry_ = std::make_unique<KeyRegistry>(RealClock::Get());
    source_ = std::make_unique<KeySource>(
        keys_path_, [](const std::string&) -> absl::optional<std::string> { return {}; },
        registry_.get());
    ASSERT_TRUE(source_->Reload().ok());
    key_service_ = std::make_unique<KeyServiceImpl>(registry_.get(), absl::Seconds(1));
    started_at_ = absl::Now() - absl::Minutes(62);
    admin_ = std::make_unique<AdminServiceImpl>(kAdminKey, registry_.get(), source_.get(),
                                                key_service_.get(), started_at_);
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(key_service_.get());
    builder.RegisterService(admin_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    ASSERT_GT(port, 0);
    address_ = absl::StrCat("127.0.0.1:", port);
    env_ = {{"SFLB_CONTROLPLANE", address_}, {"LB_ADMIN_KEY", kAdminKey}};
  }

  void TearDown() override {
    if (server_ != nullptr) {
      key_service_->Shutdown();
      server_->Shutdown(std::chrono::system_clock::now());
    }
    for (int fd : sockets_) close(fd);
    std::string cmd = absl::StrCat("rm -rf '", dir_, "'");
    if (!dir_.empty()) {
      EXPECT_EQ(std::system(cmd.c_str()), 0);
    }
  }

  Result Run(std::vector<std::string> args) {
    Result result;
    std::ostringstream out, err;
    std::map<std::string, std::string> env = env_;
    result.code = RunCtl(
        args,
        [&env](const std::string& name) -> absl::optional<std::string> {
          auto it = env.find(name);
          if (it == env.end()) return absl::nullopt;
          return it->second;
        },
        out, err);
    result.out = out.str();
    result.err = err.str();
    return result;
  }

  // Ids in file order.
  std::vector<uint64_t> KeyIds() {
    std::vector<uint64_t> ids;
    for (const v1::KeyStatus& k : registry_->ListKeys(v1::KEY_STATE_UNSPECIFIED)) {
      ids.push_back(k.id());
    }
    return ids;
  }

  // Key A: 12 requests 3 s ago, 120 tokens, active. Key B: 3 requests 5 min ago, cooling for
  // 90 s. Key C: never used, disabled.
  void SeedUsage() {
    std::vector<uint64_t> ids = KeyIds();
    ASSERT_EQ(ids.size(), 3u);
    v1::ReportRequest report;
    v1::KeyUsage* a = report.add_usage();
    a->set_key_id(ids[0]);
    a->set_requests(12);
    *a->mutable_last_used() = ToProtoTime(absl::Now() - absl::Seconds(3));
    a->set_prompt_tokens(100);
    a->set_completion_tokens(20);
    v1::KeyUsage* b = report.add_usage();
    b->set_key_id(ids[1]);
    b->set_requests(3);
    *b->mutable_last_used() = ToProtoTime(absl::Now() - absl::Minutes(5));
    registry_->ApplyUsage(report);
    ASSERT_TRUE(registry_->SetState(ids[1], v1::KEY_STATE_COOLING, "429 rate limited",
                                    absl::Now() + absl::Seconds(90)));
    ASSERT_TRUE(registry_->SetState(ids[2], v1::KEY_STATE_DISABLED, "operator: rotating",
                                    absl::InfinitePast()));
  }

  // A port that refuses connections: bound, never listening. Held until TearDown so nobody
  // else takes it.
  std::string RefusingAddress() { return OpenSocket(/*listen=*/false); }
  // A port that accepts TCP connections (kernel backlog) but never speaks HTTP/2.
  std::string SilentAddress() { return OpenSocket(/*listen=*/true); }

  std::string OpenSocket(bool listen_on_it) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    EXPECT_GE(fd, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = 0;
    EXPECT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    if (listen_on_it) {
      EXPECT_EQ(listen(fd, 16), 0);
    }
    socklen_t len = sizeof(addr);
    EXPECT_EQ(getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
    sockets_.push_back(fd);
    return absl::StrCat("127.0.0.1:", ntohs(addr.sin_port));
  }

  std::string dir_;
  std::string keys_path_;
  std::unique_ptr<KeyRegistry> registry_;
  std::unique_ptr<KeySource> source_;
  std::unique_ptr<KeyServiceImpl> key_service_;
  std::unique_ptr<AdminServiceImpl> admin_;
  std::unique_ptr<grpc::Server> server_;
  absl::Time started_at_;
  std::string address_;
  std::map<std::string, std::string> env_;
  std::vector<int> sockets_;
};

// ---- stats ----

TEST_F(CtlTest, StatsPrintsPoolTotalsAndAlignedKeyTable) {
  SeedUsage();
  Result r = Run({"stats"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  EXPECT_EQ(r.err, "");
  std::vector<std::string> lines = Lines(r.out);
  EXPECT_THAT(r.out, HasSubstr("Keys:               3 total, 1 active\n"));
  EXPECT_THAT(r.out, HasSubstr("Requests:           15\n"));
  EXPECT_THAT(r.out, HasSubstr("Leased:             0\n"));
  EXPECT_THAT(r.out, HasSubstr("Watching replicas:  0\n"));
  EXPECT_THAT(r.out, HasSubstr(absl::StrCat("Snapshot version:   ", registry_->version(), "\n")));
  EXPECT_THAT(r.out, HasSubstr(absl::StrCat("Source:             ", keys_path_, "\n")));
  EXPECT_THAT(r.out, HasSubstr(absl::StrCat("Uptime:             1h02m (since ",
                                            FormatIso8601(started_at_), ")\n")));

  ParsedTable table = ParseTable(lines, {"INDEX", "REQUESTS", "TOKENS"});
  EXPECT_EQ(table.headers,
            (std::vector<std::string>{"INDEX", "KEY", "FINGERPRINT", "ACCOUNT", "STATE",
                                      "REQUESTS", "LAST USED", "TOKENS"}));
  ASSERT_EQ(table.rows.size(), 3u);
  EXPECT_EQ(table.rows[0]["INDEX"], "0");
  EXPECT_EQ(table.rows[0]["KEY"], MaskKey(kKeyA));
  EXPECT_EQ(table.rows[0]["FINGERPRINT"], KeyFingerprint(kKeyA));
  EXPECT_EQ(table.rows[0]["ACCOUNT"], "-");  // its own scope
  EXPECT_EQ(table.rows[0]["STATE"], "active");
  EXPECT_EQ(table.rows[0]["REQUESTS"], "12");
  EXPECT_THAT(table.rows[0]["LAST USED"], AnyOf(Eq("3s ago"), Eq("4s ago")));
  EXPECT_EQ(table.rows[0]["TOKENS"], "120");
  EXPECT_EQ(table.rows[1]["ACCOUNT"], "team-a");
  EXPECT_THAT(table.rows[1]["STATE"], AllOf(StartsWith("cooling (1m"), HasSubstr("s left)")));
  EXPECT_EQ(table.rows[1]["LAST USED"], "5m ago");
  EXPECT_EQ(table.rows[2]["STATE"], "disabled");
  EXPECT_EQ(table.rows[2]["LAST USED"], "never");
  EXPECT_EQ(table.rows[2]["REQUESTS"], "0");
  EXPECT_EQ(table.totals["INDEX"], "TOTAL");
  EXPECT_EQ(table.totals["REQUESTS"], "15");
  EXPECT_EQ(table.totals["TOKENS"], "120");
  EXPECT_EQ(table.totals["LAST USED"], "");
  // Never a secret.
  EXPECT_THAT(r.out, Not(HasSubstr(kKeyA)));
  EXPECT_THAT(r.out, Not(HasSubstr(kAdminKey)));
}

TEST_F(CtlTest, StatsJsonIsTheResponseWithProtoFieldNamesAndDefaults) {
  SeedUsage();
  Result r = Run({"stats", "--json"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  std::vector<std::string> lines = Lines(r.out);
  ASSERT_EQ(lines.size(), 1u) << "one object on one line";
  nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["total_keys"], 3);
  EXPECT_EQ(j["active_keys"], 1);
  EXPECT_EQ(j["total_requests"], "15");  // uint64 is a string in proto3 JSON
  EXPECT_EQ(j["watching_replicas"], 0);   // defaults are printed
  EXPECT_EQ(j["leased_total"], "0");
  EXPECT_EQ(j["source"], keys_path_);
  ASSERT_EQ(j["keys"].size(), 3u);
  EXPECT_EQ(j["keys"][0]["fingerprint"], KeyFingerprint(kKeyA));
  EXPECT_EQ(j["keys"][0]["request_count"], "12");
  EXPECT_EQ(j["keys"][1]["state"], "KEY_STATE_COOLING");
  EXPECT_EQ(j["keys"][2]["state_reason"], "operator: rotating");
  EXPECT_FALSE(j["keys"][2].contains("last_used"));  // unset message: absent
  EXPECT_TRUE(j.contains("started_at"));
}

TEST_F(CtlTest, GlobalFlagsWorkAnywhereOnTheLine) {
  std::string server = address_;
  env_.erase("SFLB_CONTROLPLANE");
  for (const std::vector<std::string>& args :
       std::vector<std::vector<std::string>>{{"--json", "stats", "--server", server},
                                             {"--server=" + server, "--timeout", "5s", "stats",
                                              "--json"},
                                             {"stats", "--timeout=2s", "--json", "--server",
                                              server}}) {
    Result r = Run(args);
    ASSERT_EQ(r.code, kCtlOk) << absl::StrJoin(args, " ") << ": " << r.err;
    EXPECT_EQ(nlohmann::json::parse(r.out)["total_keys"], 3);
  }
}

// ---- keys ----

TEST_F(CtlTest, KeysListsEveryKeyWithReason) {
  SeedUsage();
  Result r = Run({"keys"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  ParsedTable table = ParseTable(Lines(r.out), {"INDEX", "REQUESTS"});
  EXPECT_EQ(table.headers,
            (std::vector<std::string>{"INDEX", "KEY", "FINGERPRINT", "ACCOUNT", "STATE",
                                      "REASON", "REQUESTS", "LAST USED"}));
  ASSERT_EQ(table.rows.size(), 3u);
  EXPECT_EQ(table.rows[0]["REASON"], "-");
  EXPECT_EQ(table.rows[1]["REASON"], "429 rate limited");
  EXPECT_EQ(table.rows[2]["REASON"], "operator: rotating");
  EXPECT_EQ(table.rows[2]["KEY"], MaskKey(kKeyC));
  EXPECT_EQ(table.totals["REQUESTS"], "15");
}

TEST_F(CtlTest, KeysFiltersByState) {
  SeedUsage();
  Result r = Run({"keys", "--state", "disabled"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  ParsedTable table = ParseTable(Lines(r.out), {"INDEX", "REQUESTS"});
  ASSERT_EQ(table.rows.size(), 1u);
  EXPECT_EQ(table.rows[0]["INDEX"], "2");
  EXPECT_EQ(table.rows[0]["STATE"], "disabled");

  r = Run({"keys", "--state=COOLING", "--json"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  nlohmann::json j = nlohmann::json::parse(r.out);
  ASSERT_EQ(j["keys"].size(), 1u);
  EXPECT_EQ(j["keys"][0]["index"], 1);

  r = Run({"keys", "--state", "invalid"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  EXPECT_EQ(r.out, "No keys in state invalid.\n");
}

TEST_F(CtlTest, KeysRejectsUnknownStateWithUsage) {
  Result r = Run({"keys", "--state", "sleeping"});
  EXPECT_EQ(r.code, kCtlUsage);
  EXPECT_EQ(r.out, "");
  EXPECT_THAT(r.err, StartsWith("sflbctl: --state: expected one of active, cooling, invalid, "
                                "depleted, disabled, got 'sleeping'\n"));
  EXPECT_THAT(r.err, HasSubstr("Usage: sflbctl keys [--state STATE]"));
}

// ---- reload ----

TEST_F(CtlTest, ReloadReportsChangesAndWarnings) {
  WriteFile(keys_path_, absl::StrCat(kKeyA, "\n", kKeyB, " account=team-a\n", kKeyD, "\n",
                                     kKeyA, "\n"));
  Result r = Run({"reload", "--reason", "rotate C"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  std::vector<std::string> lines = Lines(r.out);
  ASSERT_EQ(lines.size(), 4u) << r.out;
  EXPECT_EQ(lines[0], absl::StrCat("Reloaded 3 keys from ", keys_path_,
                                   " (previous 3): +1 added, -1 removed"));
  EXPECT_EQ(lines[1], absl::StrCat("  added:   ", KeyFingerprint(kKeyD)));
  EXPECT_EQ(lines[2], absl::StrCat("  removed: ", KeyFingerprint(kKeyC)));
  EXPECT_THAT(lines[3], AllOf(StartsWith(absl::StrCat("warning: ", keys_path_, ":4: duplicate")),
                              Not(HasSubstr(kKeyA))));
  EXPECT_EQ(registry_->size(), 3u);
}

TEST_F(CtlTest, ReloadJson) {
  Result r = Run({"reload", "--json"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["previous_count"], 3);
  EXPECT_EQ(j["new_count"], 3);
  EXPECT_EQ(j["added"], nlohmann::json::array());
  EXPECT_EQ(j["warnings"], nlohmann::json::array());
  EXPECT_EQ(j["source"], keys_path_);
}

TEST_F(CtlTest, RejectedReloadExitsOneWithReasonAndKeepsKeys) {
  WriteFile(keys_path_, "# nothing usable\nnot a key\n");
  Result r = Run({"reload"});
  EXPECT_EQ(r.code, kCtlFailed);
  EXPECT_EQ(r.out, "");
  EXPECT_THAT(r.err, StartsWith("sflbctl: reload failed, keeping the 3 running keys: "));
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << "one line: " << r.err;
  EXPECT_EQ(registry_->size(), 3u);
}

// ---- admin key ----

TEST_F(CtlTest, WrongAdminKeyExitsFourAndNamesItsOrigin) {
  env_["LB_ADMIN_KEY"] = "wrong-admin-key-4711";
  Result r = Run({"stats"});
  EXPECT_EQ(r.code, kCtlAuthFailed);
  EXPECT_EQ(r.out, "");
  EXPECT_EQ(r.err, absl::StrCat("sflbctl: admin key rejected by the controlplane at ", address_,
                                " (key from LB_ADMIN_KEY)\n"));
}

TEST_F(CtlTest, AdminKeyFromFileWinsOverEnvironment) {
  std::string path = dir_ + "/admin.key";
  WriteFile(path, absl::StrCat(kAdminKey, "\n"));
  env_["LB_ADMIN_KEY"] = "wrong-admin-key-4711";
  Result r = Run({"stats", "--admin-key-file", path});
  EXPECT_EQ(r.code, kCtlOk) << r.err;

  WriteFile(path, "wrong-admin-key-4711\n");
  r = Run({"--admin-key-file=" + path, "keys"});
  EXPECT_EQ(r.code, kCtlAuthFailed);
  EXPECT_THAT(r.err, HasSubstr(absl::StrCat("(key from --admin-key-file ", path, ")")));
  EXPECT_THAT(r.err, Not(HasSubstr("wrong-admin-key-4711")));
}

TEST_F(CtlTest, MissingAdminKeyExitsFive) {
  env_.erase("LB_ADMIN_KEY");
  Result r = Run({"stats"});
  EXPECT_EQ(r.code, kCtlNoAdminKey);
  EXPECT_EQ(r.err, "sflbctl: no admin key: set LB_ADMIN_KEY or pass --admin-key-file PATH\n");

  env_["LB_ADMIN_KEY"] = "  \n";
  EXPECT_EQ(Run({"stats"}).code, kCtlNoAdminKey);

  r = Run({"stats", "--admin-key-file", dir_ + "/does-not-exist"});
  EXPECT_EQ(r.code, kCtlNoAdminKey);
  EXPECT_THAT(r.err, HasSubstr("cannot read admin key file"));

  WriteFile(dir_ + "/empty.key", "\n");
  r = Run({"stats", "--admin-key-file", dir_ + "/empty.key"});
  EXPECT_EQ(r.code, kCtlNoAdminKey);
  EXPECT_THAT(r.err, HasSubstr("is empty"));
}

TEST_F(CtlTest, AdminKeyAsFlagIsRefusedWithoutEchoingIt) {
  for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
           {"stats", "--admin-key", "super-secret-value"},
           {"--admin-key=super-secret-value", "stats"}}) {
    Result r = Run(args);
    EXPECT_EQ(r.code, kCtlUsage);
    EXPECT_EQ(r.out, "");
    EXPECT_THAT(r.err, StartsWith("sflbctl: --admin-key is not accepted"));
    EXPECT_THAT(r.err, AllOf(HasSubstr("LB_ADMIN_KEY"), HasSubstr("--admin-key-file PATH")));
    EXPECT_THAT(r.err, Not(HasSubstr("super-secret-value")));
  }
}

// ---- unreachable controlplane ----

TEST_F(CtlTest, RefusedConnectionExitsThreeNamingTheAddress) {
  std::string refusing = RefusingAddress();
  Result r = Run({"stats", "--server", refusing});
  EXPECT_EQ(r.code, kCtlUnreachable);
  EXPECT_THAT(r.err, StartsWith(absl::StrCat("sflbctl: cannot reach the controlplane at ",
                                             refusing, " (")));
  EXPECT_THAT(r.err, HasSubstr("check --server or SFLB_CONTROLPLANE"));
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
}

// A TCP listener that never speaks HTTP/2: the channel gives up on the handshake (UNAVAILABLE)
// or the call's deadline passes first (DEADLINE_EXCEEDED); either way "unreachable".
TEST_F(CtlTest, SilentListenerExitsThree) {
  std::string silent = SilentAddress();
  env_["SFLB_CONTROLPLANE"] = silent;
  absl::Time start = absl::Now();
  Result r = Run({"keys", "--timeout", "2s"});
  EXPECT_EQ(r.code, kCtlUnreachable);
  EXPECT_THAT(r.err, AllOf(HasSubstr(absl::StrCat("the controlplane at ", silent)),
                           HasSubstr("check --server or SFLB_CONTROLPLANE")));
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
}

// A gRPC server that accepts every call and never answers it: only the deadline ends the call.
TEST_F(CtlTest, UnansweredCallHitsTheDeadlineAndExitsThree) {
  grpc::AsyncGenericService never_answers;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterAsyncGenericService(&never_answers);
  std::unique_ptr<grpc::ServerCompletionQueue> cq = builder.AddCompletionQueue();
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);
  std::string address = absl::StrCat("127.0.0.1:", port);

  absl::Time start = absl::Now();
  Result r = Run({"stats", "--server", address, "--timeout", "300ms"});
  absl::Duration took = absl::Now() - start;
  EXPECT_EQ(r.code, kCtlUnreachable);
  EXPECT_EQ(r.err, absl::StrCat("sflbctl: no answer from the controlplane at ", address,
                                " within 300ms; check --server or SFLB_CONTROLPLANE, or raise "
                                "--timeout\n"));
  EXPECT_GE(took, absl::Milliseconds(250));
  EXPECT_LT(took, absl::Seconds(5));

  server->Shutdown(std::chrono::system_clock::now());
  cq->Shutdown();
  void* tag;
  bool ok;
  while (cq->Next(&tag, &ok)) {
  }
}

// ---- usage ----

TEST_F(CtlTest, UsageErrorsExitTwo) {
  Result r = Run({});
  EXPECT_EQ(r.code, kCtlUsage);
  EXPECT_THAT(r.err, HasSubstr("Usage: sflbctl <command>"));

  r = Run({"frobnicate"});
  EXPECT_EQ(r.code, kCtlUsage);
  EXPECT_THAT(r.err, StartsWith("sflbctl: unknown command 'frobnicate'\n"));
  EXPECT_THAT(r.err, HasSubstr("Commands:"));

  r = Run({"stats", "--verbose"});
  EXPECT_EQ(r.code, kCtlUsage);
  EXPECT_THAT(r.err, StartsWith("sflbctl: unknown flag --verbose for 'stats'\n"));
  EXPECT_THAT(r.err, HasSubstr("Usage: sflbctl stats"));

  r = Run({"stats", "extra"});
  EXPECT_EQ(r.code, kCtlUsage);
  EXPECT_THAT(r.err, StartsWith("sflbctl: 'stats' takes no arguments (got 'extra')\n"));

  r = Run({"--state", "active", "keys"});
  EXPECT_EQ(r.code, kCtlUsage);
  EXPECT_THAT(r.err, HasSubstr("unknown flag --state (a command's flags follow the command)"));

  r = Run({"keys", "--state"});
  EXPECT_EQ(r.code, kCtlUsage);
  EXPECT_THAT(r.err, StartsWith("sflbctl: --state needs a value (STATE)\n"));

  for (const char* bad : {"0", "-1s", "soon"}) {
    r = Run({"stats", "--timeout", bad});
    EXPECT_EQ(r.code, kCtlUsage) << bad;
    EXPECT_THAT(r.err, StartsWith("sflbctl: --timeout: expected a positive duration")) << bad;
  }

  r = Run({"stats", "--server"});
  EXPECT_EQ(r.code, kCtlUsage);

  r = Run({"stats", "--json=maybe"});
  EXPECT_EQ(r.code, kCtlUsage);

  r = Run({"reload", "-x"});
  EXPECT_EQ(r.code, kCtlUsage);
  EXPECT_THAT(r.err, StartsWith("sflbctl: unknown flag -x\n"));
}

TEST_F(CtlTest, HelpNeedsNeitherServerNorKey) {
  env_.clear();
  Result r = Run({"help"});
  EXPECT_EQ(r.code, kCtlOk);
  EXPECT_EQ(r.err, "");
  for (const char* text : {"stats", "keys", "reload", "help", "version", "--server ADDR",
                           "--admin-key-file PATH", "--json", "--timeout DURATION",
                           "Exit codes:"}) {
    EXPECT_THAT(r.out, HasSubstr(text));
  }
  EXPECT_EQ(Run({"--help"}).out, r.out);
  EXPECT_EQ(Run({"-h"}).out, r.out);

  r = Run({"help", "keys"});
  EXPECT_EQ(r.code, kCtlOk);
  EXPECT_THAT(r.out, StartsWith("Usage: sflbctl keys [--state STATE]\n"));
  EXPECT_THAT(r.out, HasSubstr("--state STATE"));
  EXPECT_EQ(Run({"keys", "--help"}).out, r.out);
  EXPECT_EQ(Run({"-h", "keys", "--state", "nonsense"}).out, r.out);

  r = Run({"help", "nope"});
  EXPECT_EQ(r.code, kCtlUsage);
  EXPECT_THAT(r.err, StartsWith("sflbctl: no command 'nope'"));
}

TEST_F(CtlTest, Version) {
  env_.clear();
  Result r = Run({"version"});
  EXPECT_EQ(r.code, kCtlOk);
  EXPECT_EQ(r.out, absl::StrCat("sflbctl ", kVersion, "\n"));
  r = Run({"version", "--json"});
  EXPECT_EQ(r.code, kCtlOk);
  nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["name"], "sflbctl");
  EXPECT_EQ(j["version"], kVersion);
}

// ---- formatting helpers ----

TEST(CtlFormatTest, TimeAgo) {
  absl::Time now = absl::FromUnixSeconds(1'800'000'000);
  EXPECT_EQ(FormatTimeAgo(absl::InfinitePast(), now), "never");
  EXPECT_EQ(FormatTimeAgo(now - absl::Milliseconds(300), now), "just now");
  EXPECT_EQ(FormatTimeAgo(now - absl::Seconds(3), now), "3s ago");
  EXPECT_EQ(FormatTimeAgo(now - absl::Seconds(59), now), "59s ago");
  EXPECT_EQ(FormatTimeAgo(now - absl::Seconds(61), now), "1m ago");
  EXPECT_EQ(FormatTimeAgo(now - absl::Hours(5), now), "5h ago");
  EXPECT_EQ(FormatTimeAgo(now - absl::Hours(72), now), "3d ago");
  EXPECT_EQ(FormatTimeAgo(now + absl::Seconds(42), now), "in 42s");
}

TEST(CtlFormatTest, ShortDuration) {
  EXPECT_EQ(FormatShortDuration(absl::Seconds(-5)), "0s");
  EXPECT_EQ(FormatShortDuration(absl::Seconds(42)), "42s");
  EXPECT_EQ(FormatShortDuration(absl::Seconds(187)), "3m07s");
  EXPECT_EQ(FormatShortDuration(absl::Minutes(62)), "1h02m");
  EXPECT_EQ(FormatShortDuration(absl::Hours(51)), "2d03h");
}

TEST(CtlFormatTest, TableAlignsByCodePointsAndPrintsTotals) {
  TextTable table({{"NAME"}, {"N", TextTable::Align::kRight}, {"NOTE"}});
  table.AddRow({"sk-ab\xE2\x80\xA6wxyz", "7", "x"});
  table.AddRow({"b", "1234", ""});
  table.SetTotals({"TOTAL", "1241"});
  std::ostringstream out;
  table.Print(out);
  EXPECT_EQ(out.str(),
            "NAME           N  NOTE\n"
            "sk-ab\xE2\x80\xA6wxyz     7  x\n"
            "b           1234\n"
            "----------  ----  ----\n"
            "TOTAL       1241\n");
}

TEST(CtlFormatTest, HeaderlessTableIsALabelList) {
  TextTable table({{""}, {""}});
  table.AddRow({"Keys:", "3"});
  table.AddRow({"Watching replicas:", "1"});
  std::ostringstream out;
  table.Print(out, "  ");
  EXPECT_EQ(out.str(), "  Keys:               3\n  Watching replicas:  1\n");
}

}  // namespace
}  // namespace sflb
