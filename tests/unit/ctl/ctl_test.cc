// sflbctl against a real in-process controlplane: the real AdminServiceImpl, KeyRegistry,
// KeySource, KeyServiceImpl, AuditLog and KeyBalances (over a BalanceChecker with a fake fetch,
// so no network) on 127.0.0.1:<ephemeral> with the standard gRPC health service, with a keys
// file and the audit log in a temp dir.
#include "ctl/ctl.h"

#include <httplib.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
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
#include "controlplane/audit_log.h"
#include "controlplane/balance_checker.h"
#include "controlplane/key_balances.h"
#include "controlplane/key_registry.h"
#include "controlplane/key_service.h"
#include "controlplane/key_source.h"
#include "gmock/gmock.h"
#include "grpcpp/generic/async_generic_service.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
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

// A table without a totals rule (the rate-limit blocks), found by its first header and parsed
// by the header's positions. Every cell is non-empty ("-" when there is nothing) and free of
// double spaces, so cells are the runs separated by 2+ spaces; checks that left-aligned cells
// start where their header starts and right-aligned ones end where it ends.
std::vector<std::map<std::string, std::string>> ParseHeaderTable(
    const std::vector<std::string>& lines, const std::string& first_header,
    const std::vector<std::string>& right_aligned) {
  struct Run {
    size_t begin, end;  // code points
    std::string text;
  };
  auto runs_of = [](const std::string& line) {
    std::vector<std::string> cps = CodePoints(line);
    std::vector<Run> runs;
    size_t i = 0;
    while (i < cps.size()) {
      if (cps[i] == " ") {
        ++i;
        continue;
      }
      Run run{i, i, ""};
      size_t j = i;
      while (j < cps.size() && !(cps[j] == " " && (j + 1 >= cps.size() || cps[j + 1] == " "))) {
        run.text += cps[j];
        ++j;
      }
      run.end = j;
      runs.push_back(run);
      i = j;
    }
    return runs;
  };
  std::vector<std::map<std::string, std::string>> rows;
  size_t header = 0;
  while (header < lines.size() && !absl::StartsWith(lines[header], first_header)) ++header;
  EXPECT_LT(header, lines.size()) << "no table starting with " << first_header;
  if (header >= lines.size()) return rows;
  std::vector<Run> headers = runs_of(lines[header]);
  for (size_t i = header + 1; i < lines.size() && !lines[i].empty(); ++i) {
    std::vector<Run> cells = runs_of(lines[i]);
    EXPECT_EQ(cells.size(), headers.size()) << "cells of: " << lines[i];
    if (cells.size() != headers.size()) continue;
    std::map<std::string, std::string> row;
    for (size_t c = 0; c < cells.size(); ++c) {
      const std::string& name = headers[c].text;
      bool right =
          std::find(right_aligned.begin(), right_aligned.end(), name) != right_aligned.end();
      if (right) {
        EXPECT_EQ(cells[c].end, headers[c].end) << name << " not right-aligned: " << lines[i];
      } else {
        EXPECT_EQ(cells[c].begin, headers[c].begin) << name << " not left-aligned: " << lines[i];
      }
      row[name] = cells[c].text;
    }
    rows.push_back(row);
  }
  return rows;
}

// The "Label:  value" lines at the top of `keys show` (up to the first blank line), by label.
// Checks that every value starts in the same column.
std::map<std::string, std::string> ParseFields(const std::vector<std::string>& lines) {
  std::map<std::string, std::string> fields;
  size_t value_column = 0;
  for (const std::string& line : lines) {
    if (line.empty()) break;
    size_t colon = line.find(':');
    EXPECT_NE(colon, std::string::npos) << line;
    if (colon == std::string::npos) continue;
    std::string label = line.substr(0, colon);
    size_t value = line.find_first_not_of(' ', colon + 1);
    EXPECT_NE(value, std::string::npos) << "no value: " << line;
    if (value == std::string::npos) continue;
    // Labels are ASCII, so byte offsets are columns here.
    if (value_column == 0) value_column = value;
    EXPECT_EQ(value, value_column) << "value not aligned: " << line;
    fields[label] = line.substr(value);
  }
  return fields;
}

// The explanation printed after "Why:", unwrapped.
std::string WhyText(const std::string& out) {
  size_t why = out.find("\nWhy:\n");
  if (why == std::string::npos) return "";
  std::vector<std::string> words =
      absl::StrSplit(out.substr(why + 6), absl::ByAnyChar(" \n"), absl::SkipEmpty());
  return absl::StrJoin(words, " ");
}

// Real time shifted by a settable offset: audit entries "written" hours ago.
class ShiftedClock : public Clock {
 public:
  absl::Time Now() const override {
    return absl::Now() + absl::Nanoseconds(offset_ns_.load());
  }
  void Shift(absl::Duration offset) { offset_ns_.store(absl::ToInt64Nanoseconds(offset)); }

 private:
  std::atomic<int64_t> offset_ns_{0};
};

// The upstream's user/info answer with a balance.
FetchResult BalanceAnswer(const std::string& account, const std::string& total) {
  FetchResult r;
  r.http_status = 200;
  r.body = absl::StrCat(R"({"code":20000,"status":true,"data":{"id":")", account,
                        R"(","balance":"0","chargeBalance":"0","totalBalance":")", total, R"("}})");
  return r;
}

FetchResult HttpAnswer(int status, const std::string& body = "") {
  FetchResult r;
  r.http_status = status;
  r.body = body;
  return r;
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
    AuditLogOptions audit_options;
    audit_options.path = dir_ + "/audit.log";
    audit_options.clock = &audit_clock_;
    absl::StatusOr<std::unique_ptr<AuditLog>> audit = AuditLog::Open(audit_options);
    ASSERT_TRUE(audit.ok()) << audit.status();
    audit_ = std::move(*audit);
    // The upstream's user/info, faked per key secret (a key without an answer: no connection).
    BalanceCheckerOptions balance_options;
    balance_options.fetch = [this](const std::string& secret) {
      std::lock_guard<std::mutex> lock(fetch_mu_);
      auto it = fetch_answers_.find(secret);
      if (it != fetch_answers_.end()) return it->second;
      FetchResult none;
      none.error = "connection refused";
      return none;
    };
    checker_ = std::make_unique<BalanceChecker>(balance_options);
    balances_ = std::make_unique<KeyBalances>(registry_.get(), checker_.get(), audit_.get(),
                                              /*depleted_threshold=*/0.0);
    admin_ = std::make_unique<AdminServiceImpl>(kAdminKey, registry_.get(), source_.get(),
                                                key_service_.get(), audit_.get(), balances_.get(),
                                                started_at_);
    // The standard grpc.health.v1.Health service, as the controlplane serves it.
    grpc::EnableDefaultHealthCheckService(true);
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

  Result Run(std::vector<std::string> args) { return RunUntil(std::move(args), nullptr); }

  // Runs with a stop predicate (for `audit --follow`), which is given the output so far. It is
  // called on the thread that writes the output, so reading it there is safe.
  Result RunUntil(std::vector<std::string> args,
                  const std::function<bool(const std::string& out)>& stop) {
    Result result;
    std::ostringstream out, err;
    std::map<std::string, std::string> env = env_;
    EnvLookup lookup = [&env](const std::string& name) -> absl::optional<std::string> {
      auto it = env.find(name);
      if (it == env.end()) return absl::nullopt;
      return it->second;
    };
    if (stop) {
      result.code = RunCtl(args, lookup, out, err, [&] { return stop(out.str()); });
    } else {
      result.code = RunCtl(args, lookup, out, err);
    }
    result.out = out.str();
    result.err = err.str();
    return result;
  }

  void SetFetchAnswer(const std::string& secret, FetchResult answer) {
    std::lock_guard<std::mutex> lock(fetch_mu_);
    fetch_answers_[secret] = std::move(answer);
  }

  void AppendAudit(const std::string& type, const std::string& actor, nlohmann::json details,
                   uint64_t* seq = nullptr) {
    ASSERT_TRUE(audit_->Append(AuditEntry{type, actor, std::move(details)}, seq).ok());
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
    registry_->ApplyReport(report);
    ASSERT_TRUE(registry_->SetState(ids[1], v1::KEY_STATE_COOLING, "429 rate limited",
                                    absl::Now() + absl::Seconds(90)));
    ASSERT_TRUE(registry_->SetState(ids[2], v1::KEY_STATE_DISABLED, "operator: rotating",
                                    absl::InfinitePast()));
  }

  // A replica's report of one 429 for `model` with the key at `index`.
  void ReportRateLimited(size_t index, const std::string& model, const std::string& message) {
    std::vector<uint64_t> ids = KeyIds();
    ASSERT_LT(index, ids.size());
    v1::ReportRequest report;
    report.set_replica_id("dp-test");
    v1::KeyOutcome* outcome = report.add_outcomes();
    outcome->set_key_id(ids[index]);
    outcome->set_kind(v1::OUTCOME_KIND_RATE_LIMITED);
    outcome->set_http_status(429);
    outcome->set_model(model);
    outcome->set_message(message);
    *outcome->mutable_observed_at() = ToProtoTime(absl::Now());
    registry_->ApplyReport(report);
  }

  // A replica's report of a 403 for `model` (not about balance: the model is refused).
  void ReportForbiddenModel(size_t index, const std::string& model) {
    std::vector<uint64_t> ids = KeyIds();
    ASSERT_LT(index, ids.size());
    v1::ReportRequest report;
    report.set_replica_id("dp-test");
    v1::KeyOutcome* outcome = report.add_outcomes();
    outcome->set_key_id(ids[index]);
    outcome->set_kind(v1::OUTCOME_KIND_FORBIDDEN);
    outcome->set_http_status(403);
    outcome->set_model(model);
    outcome->set_message("model access denied");
    registry_->ApplyReport(report);
  }

  v1::KeyStatus KeyAt(size_t index) {
    std::vector<v1::KeyStatus> keys = registry_->ListKeys(v1::KEY_STATE_UNSPECIFIED);
    EXPECT_LT(index, keys.size());
    return index < keys.size() ? keys[index] : v1::KeyStatus();
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
  ShiftedClock audit_clock_;
  std::unique_ptr<AuditLog> audit_;
  std::mutex fetch_mu_;
  std::map<std::string, FetchResult> fetch_answers_;
  std::unique_ptr<BalanceChecker> checker_;
  std::unique_ptr<KeyBalances> balances_;
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
  EXPECT_THAT(r.out, HasSubstr("Controlplane RPCs:  0 lease, 0 report\n"));
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
  // No blocks, no blocks table.
  EXPECT_THAT(r.out, Not(HasSubstr("Rate-limit blocks")));
}

TEST_F(CtlTest, StatsShowsRateLimitBlocksAfterA429) {
  SeedUsage();
  const std::string model = "Qwen/Qwen2.5-72B-Instruct";
  // Key B is of account team-a: the 429 blocks (team-a, model) for keys B and C.
  ReportRateLimited(1, model,
                    "Request was rejected due to rate limiting. Details: TPM limit reached.");
  ASSERT_EQ(registry_->Blocks().size(), 1u);

  Result r = Run({"stats"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  std::vector<std::string> lines = Lines(r.out);
  // The key table is unchanged and still aligned.
  ParsedTable keys = ParseTable(lines, {"INDEX", "REQUESTS", "TOKENS"});
  EXPECT_EQ(keys.rows.size(), 3u);
  EXPECT_EQ(keys.totals["REQUESTS"], "15");
  // Then the blocks, after a blank line and a title.
  auto title = std::find(lines.begin(), lines.end(), "Rate-limit blocks (1):");
  ASSERT_NE(title, lines.end()) << r.out;
  ASSERT_NE(title, lines.begin());
  EXPECT_EQ(*(title - 1), "");
  EXPECT_THAT(*(title + 1), StartsWith("ACCOUNT"));
  std::vector<std::map<std::string, std::string>> blocks =
      ParseHeaderTable(lines, "ACCOUNT", {"LEFT", "STRIKES"});
  ASSERT_EQ(blocks.size(), 1u) << r.out;
  EXPECT_EQ(blocks[0]["ACCOUNT"], "team-a");
  EXPECT_EQ(blocks[0]["MODEL"], model);
  EXPECT_EQ(blocks[0]["PHASE"], "cooling");
  EXPECT_EQ(blocks[0]["LIMIT"], "TPM");
  EXPECT_NE(blocks[0]["LEFT"], "-");
  EXPECT_EQ(blocks[0]["STRIKES"], "1");
  EXPECT_EQ(blocks[0]["PROBE BY"], "-");
  std::vector<std::string> headers;
  for (const auto& [name, value] : blocks[0]) headers.push_back(name);
  EXPECT_THAT(headers, ::testing::UnorderedElementsAre("ACCOUNT", "MODEL", "PHASE", "LIMIT", "LEFT",
                                                       "STRIKES", "PROBE BY"));

  r = Run({"stats", "--json"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  nlohmann::json j = nlohmann::json::parse(r.out);
  ASSERT_EQ(j["blocks"].size(), 1u);
  EXPECT_EQ(j["blocks"][0]["account"], "team-a");
  EXPECT_EQ(j["blocks"][0]["model"], model);
  EXPECT_EQ(j["blocks"][0]["phase"], "BLOCK_PHASE_COOLING");
  EXPECT_EQ(j["lease_calls"], "0");
  EXPECT_EQ(j["report_calls"], "0");
}

// Pool-wide and all-model blocks, and a half-open one waiting for its probe.
TEST_F(CtlTest, BlocksTablesShowPoolWideAndHalfOpenBlocks) {
  // As restored from the state file: a pool-wide block whose cooldown has ended, and one for
  // every model of team-a. The next tick makes the ended one half-open with a probe replica.
  const int64_t now_ms = absl::ToUnixMillis(absl::Now());
  registry_->ImportState(nlohmann::json{{"blocks",
                                         {{{"account", "*"},
                                           {"model", "Qwen/QwQ-32B"},
                                           {"until_unix_ms", now_ms - 5000},
                                           {"strikes", 3},
                                           {"limit", "pool-wide"},
                                           {"reason", "most accounts were rate limited at once"}},
                                          {{"account", "team-a"},
                                           {"model", "*"},
                                           {"until_unix_ms", now_ms + 600000},
                                           {"strikes", 2},
                                           {"limit", "RPD"},
                                           {"reason", "Details: RPD limit reached."}}}}});
  registry_->Tick({"dp-a"});

  Result r = Run({"stats"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  std::vector<std::map<std::string, std::string>> blocks =
      ParseHeaderTable(Lines(r.out), "ACCOUNT", {"LEFT", "STRIKES"});
  ASSERT_EQ(blocks.size(), 2u) << r.out;
  EXPECT_EQ(blocks[0]["ACCOUNT"], "* (pool-wide)");
  EXPECT_EQ(blocks[0]["MODEL"], "Qwen/QwQ-32B");
  EXPECT_EQ(blocks[0]["PHASE"], "half-open");
  EXPECT_EQ(blocks[0]["LIMIT"], "pool-wide");
  EXPECT_EQ(blocks[0]["LEFT"], "-");
  EXPECT_EQ(blocks[0]["STRIKES"], "3");
  EXPECT_EQ(blocks[0]["PROBE BY"], "dp-a");
  EXPECT_EQ(blocks[1]["ACCOUNT"], "team-a");
  EXPECT_EQ(blocks[1]["MODEL"], "* (all models)");
  EXPECT_EQ(blocks[1]["PHASE"], "cooling");
  EXPECT_THAT(blocks[1]["LEFT"], AnyOf(StartsWith("9m5"), Eq("10m00s")));
  EXPECT_EQ(blocks[1]["PROBE BY"], "-");

  // Key A is its own account: only the pool-wide block applies to it.
  r = Run({"keys", "show", "0"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  blocks = ParseHeaderTable(Lines(r.out), "ACCOUNT", {"STRIKES"});
  ASSERT_EQ(blocks.size(), 1u) << r.out;
  EXPECT_EQ(blocks[0]["ACCOUNT"], "* (pool-wide)");
  EXPECT_EQ(blocks[0]["PHASE"], "half-open");
  EXPECT_THAT(blocks[0]["UNTIL/LEFT"], StartsWith("ended "));
  EXPECT_EQ(blocks[0]["REASON"], "most accounts were rate limited at once");
  EXPECT_THAT(WhyText(r.out), HasSubstr("Rate limited pool-wide for model Qwen/QwQ-32B"));
  // Key B (team-a): both.
  r = Run({"keys", "show", "1"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  EXPECT_THAT(r.out, HasSubstr("Rate-limit blocks (2):\n"));
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
  ParsedTable table = ParseTable(Lines(r.out), {"INDEX", "LEFT", "REQUESTS"});
  EXPECT_EQ(table.headers,
            (std::vector<std::string>{"INDEX", "KEY", "FINGERPRINT", "ACCOUNT", "STATE", "LEFT",
                                      "REASON", "REQUESTS", "LAST USED"}));
  ASSERT_EQ(table.rows.size(), 3u);
  EXPECT_EQ(table.rows[0]["STATE"], "active");
  EXPECT_EQ(table.rows[0]["LEFT"], "-");
  EXPECT_EQ(table.rows[0]["REASON"], "-");
  EXPECT_EQ(table.rows[1]["STATE"], "cooling");
  EXPECT_THAT(table.rows[1]["LEFT"], AllOf(StartsWith("1m"), ::testing::EndsWith("s")));
  EXPECT_EQ(table.rows[1]["REASON"], "429 rate limited");
  EXPECT_EQ(table.rows[2]["LEFT"], "-");
  EXPECT_EQ(table.rows[2]["REASON"], "operator: rotating");
  EXPECT_EQ(table.rows[2]["KEY"], MaskKey(kKeyC));
  EXPECT_EQ(table.totals["REQUESTS"], "15");
}

TEST_F(CtlTest, KeysCountsForbiddenModelsInReason) {
  SeedUsage();
  ReportForbiddenModel(0, "deepseek-ai/DeepSeek-R1");
  ReportForbiddenModel(1, "deepseek-ai/DeepSeek-R1");
  ReportForbiddenModel(1, "Qwen/QwQ-32B");
  Result r = Run({"keys"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  ParsedTable table = ParseTable(Lines(r.out), {"INDEX", "LEFT", "REQUESTS"});
  ASSERT_EQ(table.rows.size(), 3u);
  EXPECT_EQ(table.rows[0]["STATE"], "active");
  EXPECT_EQ(table.rows[0]["REASON"], "1 model forbidden");
  EXPECT_EQ(table.rows[1]["REASON"], "429 rate limited; 2 models forbidden");
  EXPECT_EQ(table.rows[2]["REASON"], "operator: rotating");
}

TEST_F(CtlTest, KeysFiltersByState) {
  SeedUsage();
  Result r = Run({"keys", "--state", "disabled"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  ParsedTable table = ParseTable(Lines(r.out), {"INDEX", "LEFT", "REQUESTS"});
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

// ---- keys show ----

TEST_F(CtlTest, KeysShowByIndexPrintsFieldsAndWhy) {
  SeedUsage();
  Result r = Run({"keys", "show", "1"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  EXPECT_EQ(r.err, "");
  std::map<std::string, std::string> f = ParseFields(Lines(r.out));
  EXPECT_EQ(f["Index"], "1");
  EXPECT_EQ(f["Key"], MaskKey(kKeyB));
  EXPECT_EQ(f["Fingerprint"], KeyFingerprint(kKeyB));
  EXPECT_EQ(f["Id"], absl::StrCat(KeyIds()[1]));
  EXPECT_EQ(f["Account"], "team-a");
  EXPECT_THAT(f["State"], AllOf(StartsWith("cooling (1m"), HasSubstr("s left)")));
  EXPECT_EQ(f["Reason"], "429 rate limited");
  EXPECT_THAT(f["Since"], ::testing::EndsWith(" (just now)"));
  EXPECT_THAT(f["Until"], AllOf(HasSubstr("Z (1m"), ::testing::EndsWith("s left)")));
  EXPECT_EQ(f["Upstream said"], "-");
  EXPECT_EQ(f["Set by"], "-");
  EXPECT_EQ(f["Requests"], "3");
  EXPECT_THAT(f["Last used"], ::testing::EndsWith(" (5m ago)"));
  EXPECT_EQ(f["Tokens"], "0 (0 prompt, 0 completion)");
  EXPECT_EQ(f["Forbidden models"], "-");
  EXPECT_THAT(f["Added"], HasSubstr("Z ("));
  EXPECT_THAT(r.out, HasSubstr("\nRate-limit blocks: none\n"));
  EXPECT_THAT(WhyText(r.out), AllOf(StartsWith("Cooling until "), HasSubstr("429 rate limited")));
  // Wrapped to 100 columns.
  for (const std::string& line : Lines(r.out)) {
    EXPECT_LE(CodePoints(line).size(), 100u) << line;
  }
  EXPECT_THAT(r.out, Not(HasSubstr(kKeyB)));

  // Key A is its own scope; never used keys say so.
  r = Run({"keys", "show", "2"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  f = ParseFields(Lines(r.out));
  EXPECT_EQ(f["State"], "disabled");
  EXPECT_EQ(f["Until"], "-");
  EXPECT_EQ(f["Last used"], "never");
  r = Run({"keys", "show", "0"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  f = ParseFields(Lines(r.out));
  EXPECT_EQ(f["Account"], "- (the key is its own rate-limit scope)");
  EXPECT_EQ(f["Tokens"], "120 (100 prompt, 20 completion)");
  EXPECT_THAT(WhyText(r.out), StartsWith("Active"));
}

TEST_F(CtlTest, KeysShowByFingerprintPrefixAndId) {
  const std::string fp = KeyFingerprint(kKeyC);
  for (const std::string& ref :
       {fp, fp.substr(0, 6), fp.substr(0, 9), absl::AsciiStrToUpper(fp.substr(0, 8)),
        absl::StrCat("id:", KeyIds()[2])}) {
    Result r = Run({"keys", "show", ref});
    ASSERT_EQ(r.code, kCtlOk) << ref << ": " << r.err;
    std::map<std::string, std::string> f = ParseFields(Lines(r.out));
    EXPECT_EQ(f["Index"], "2") << ref;
    EXPECT_EQ(f["Fingerprint"], fp) << ref;
  }
}

TEST_F(CtlTest, KeysShowUnknownKeyExitsOneWithTheServersMessage) {
  Result r = Run({"keys", "show", "7"});
  EXPECT_EQ(r.code, kCtlFailed);
  EXPECT_EQ(r.out, "");
  EXPECT_EQ(r.err, "sflbctl: no key at index 7 (there are 3)\n");

  r = Run({"keys", "show", "id:999"});
  EXPECT_EQ(r.code, kCtlFailed);
  EXPECT_EQ(r.err, "sflbctl: no key with id 999\n");

  // Six hex digits that no fingerprint here starts with.
  std::string absent;
  for (char c : std::string("0123456789abcdef")) {
    absent = absl::StrCat("00000", std::string(1, c));
    if (!absl::StartsWith(KeyFingerprint(kKeyA), absent) &&
        !absl::StartsWith(KeyFingerprint(kKeyB), absent) &&
        !absl::StartsWith(KeyFingerprint(kKeyC), absent)) {
      break;
    }
  }
  r = Run({"keys", "disable", absent});
  EXPECT_EQ(r.code, kCtlFailed);
  EXPECT_EQ(r.err, absl::StrCat("sflbctl: no key with fingerprint ", absent, "\n"));
}

TEST_F(CtlTest, ShortOrAmbiguousKeyReferenceExitsTwo) {
  Result r = Run({"keys", "show", "abc"});
  EXPECT_EQ(r.code, kCtlUsage);
  EXPECT_EQ(r.out, "");
  EXPECT_EQ(r.err, "sflbctl: a key reference is an index, a fingerprint (6+ hex digits) or id:N\n");

  // Two keys whose fingerprints share their first 6 hex digits: found by trying (a birthday
  // search over 16^6 prefixes takes a few thousand tries).
  std::map<std::string, std::string> by_prefix;
  std::string first, second, prefix;
  for (int i = 0; i < 200000 && second.empty(); ++i) {
    std::string key = absl::StrCat("sk-ambiguous-test-key-", i);
    std::string p = KeyFingerprint(key).substr(0, 6);
    auto [it, inserted] = by_prefix.emplace(p, key);
    if (!inserted) {
      first = it->second;
      second = key;
      prefix = p;
    }
  }
  ASSERT_FALSE(second.empty());
  WriteFile(keys_path_, absl::StrCat(kKeyA, "\n", first, "\n", second, "\n"));
  ASSERT_TRUE(source_->Reload().ok());
  for (const char* command : {"show", "disable", "enable"}) {
    r = Run({"keys", command, prefix});
    EXPECT_EQ(r.code, kCtlUsage) << command;
    EXPECT_EQ(r.err, absl::StrCat("sflbctl: fingerprint prefix '", prefix,
                                  "' matches more than one key\n"))
        << command;
  }
  EXPECT_EQ(KeyAt(1).state(), v1::KEY_STATE_ACTIVE);
  EXPECT_EQ(KeyAt(2).state(), v1::KEY_STATE_ACTIVE);
  // A longer prefix tells them apart.
  std::string fp = KeyFingerprint(second);
  size_t n = 7;
  while (absl::StartsWith(KeyFingerprint(first), fp.substr(0, n))) ++n;
  r = Run({"keys", "show", fp.substr(0, n)});
  EXPECT_EQ(r.code, kCtlOk) << r.err;
  EXPECT_EQ(ParseFields(Lines(r.out))["Index"], "2");
}

TEST_F(CtlTest, KeysShowJsonIsTheGetKeyResponse) {
  SeedUsage();
  Result r = Run({"keys", "show", "1", "--json"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  ASSERT_EQ(Lines(r.out).size(), 1u);
  nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["key"]["index"], 1);
  EXPECT_EQ(j["key"]["fingerprint"], KeyFingerprint(kKeyB));
  EXPECT_EQ(j["key"]["masked"], MaskKey(kKeyB));
  EXPECT_EQ(j["key"]["state"], "KEY_STATE_COOLING");
  EXPECT_EQ(j["key"]["state_reason"], "429 rate limited");
  EXPECT_EQ(j["key"]["forbidden_models"], nlohmann::json::array());
  EXPECT_EQ(j["key"]["state_status"], 0);
  EXPECT_TRUE(j["key"].contains("state_until"));
  EXPECT_EQ(j["blocks"], nlohmann::json::array());
  EXPECT_THAT(j["explanation"].get<std::string>(), StartsWith("Cooling until "));
  EXPECT_THAT(r.out, Not(HasSubstr(kKeyB)));
}

TEST_F(CtlTest, KeysShowListsTheBlocksOfItsAccount) {
  SeedUsage();
  const std::string model = "Qwen/Qwen2.5-72B-Instruct";
  ReportRateLimited(1, model,
                    "Request was rejected due to rate limiting. Details: TPM limit reached.");
  ReportForbiddenModel(2, "deepseek-ai/DeepSeek-R1");

  // Key C shares account team-a with key B, so the block applies to it as well.
  Result r = Run({"keys", "show", "2"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  std::vector<std::string> lines = Lines(r.out);
  std::map<std::string, std::string> f = ParseFields(lines);
  EXPECT_EQ(f["Forbidden models"], "deepseek-ai/DeepSeek-R1 (403)");
  // A refused model leaves the key's state (and who set it) alone.
  EXPECT_NE(f["Set by"], "dataplane:dp-test");
  EXPECT_NE(f["Upstream said"], "HTTP 403: model access denied");
  ASSERT_NE(std::find(lines.begin(), lines.end(), "Rate-limit blocks (1):"), lines.end()) << r.out;
  std::vector<std::map<std::string, std::string>> blocks =
      ParseHeaderTable(lines, "ACCOUNT", {"STRIKES"});
  ASSERT_EQ(blocks.size(), 1u) << r.out;
  EXPECT_EQ(blocks[0]["ACCOUNT"], "team-a");
  EXPECT_EQ(blocks[0]["MODEL"], model);
  EXPECT_EQ(blocks[0]["PHASE"], "cooling");
  EXPECT_EQ(blocks[0]["LIMIT"], "TPM");
  EXPECT_THAT(blocks[0]["UNTIL/LEFT"], AllOf(HasSubstr("Z ("), ::testing::EndsWith(" left)")));
  EXPECT_EQ(blocks[0]["STRIKES"], "1");
  EXPECT_EQ(blocks[0]["PROBE BY"], "-");
  EXPECT_EQ(blocks[0]["REASON"],
            "Request was rejected due to rate limiting. Details: TPM limit reached.");
  std::string why = WhyText(r.out);
  EXPECT_THAT(why, AllOf(StartsWith("Disabled by an operator"),
                         HasSubstr("Models refused to its account (403): deepseek-ai/DeepSeek-R1"),
                         HasSubstr(absl::StrCat("Rate limited on its account for model ", model))));

  // Key A is its own account: not affected.
  r = Run({"keys", "show", "0"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  EXPECT_THAT(r.out, HasSubstr("\nRate-limit blocks: none\n"));

  r = Run({"keys", "show", "1", "--json"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  nlohmann::json j = nlohmann::json::parse(r.out);
  ASSERT_EQ(j["blocks"].size(), 1u);
  EXPECT_EQ(j["blocks"][0]["limit"], "TPM");
  EXPECT_EQ(j["blocks"][0]["strikes"], 1);
}

// ---- keys disable / enable / cooldown ----

TEST_F(CtlTest, DisableThenEnable) {
  env_["USER"] = "alice";
  const std::string label =
      absl::StrCat("Key 0 (", MaskKey(kKeyA), ", fingerprint ", KeyFingerprint(kKeyA), ")");
  Result r = Run({"keys", "disable", "0", "--reason", "leaked in a log"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  EXPECT_EQ(r.err, "");
  EXPECT_EQ(r.out, absl::StrCat(label, " is now disabled: leaked in a log\n"));
  EXPECT_EQ(KeyAt(0).state(), v1::KEY_STATE_DISABLED);
  EXPECT_EQ(KeyAt(0).state_reason(), "leaked in a log");
  EXPECT_THAT(KeyAt(0).state_actor(), StartsWith("admin@"));

  // ListKeys agrees, through sflbctl as well.
  r = Run({"keys", "--state", "disabled"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  ParsedTable table = ParseTable(Lines(r.out), {"INDEX", "LEFT", "REQUESTS"});
  ASSERT_EQ(table.rows.size(), 1u);
  EXPECT_EQ(table.rows[0]["INDEX"], "0");
  EXPECT_EQ(table.rows[0]["REASON"], "leaked in a log");
  r = Run({"keys", "show", KeyFingerprint(kKeyA)});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  std::map<std::string, std::string> f = ParseFields(Lines(r.out));
  EXPECT_EQ(f["State"], "disabled");
  EXPECT_THAT(f["Set by"], StartsWith("admin@"));

  // Default reason names the user.
  r = Run({"keys", "enable", "0"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  EXPECT_EQ(r.out, absl::StrCat(label, " is now active: sflbctl enable by alice\n"));
  EXPECT_EQ(KeyAt(0).state(), v1::KEY_STATE_ACTIVE);
  r = Run({"keys", "--state", "disabled"});
  EXPECT_EQ(r.out, "No keys in state disabled.\n");

  r = Run({"keys", "disable", KeyFingerprint(kKeyB).substr(0, 7)});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  EXPECT_THAT(r.out, ::testing::EndsWith(" is now disabled: sflbctl disable by alice\n"));
  EXPECT_EQ(KeyAt(1).state(), v1::KEY_STATE_DISABLED);

  env_.erase("USER");
  r = Run({"keys", "enable", "1", "--json"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["key"]["state"], "KEY_STATE_ACTIVE");
  EXPECT_EQ(j["key"]["state_reason"], "sflbctl enable");
  EXPECT_EQ(j["key"]["index"], 1);
}

TEST_F(CtlTest, EnableClearsForbiddenModelsAndBlocks) {
  SeedUsage();
  ReportRateLimited(1, "m1", "Details: RPM limit reached.");
  ReportForbiddenModel(2, "m2");
  Result r = Run({"keys", "enable", "2", "--reason", "fixed"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  EXPECT_THAT(r.out, ::testing::EndsWith(" is now active: fixed\n"));
  EXPECT_EQ(KeyAt(2).forbidden_models_size(), 0);
  EXPECT_TRUE(registry_->Blocks().empty());
  r = Run({"stats"});
  EXPECT_THAT(r.out, Not(HasSubstr("Rate-limit blocks")));
}

TEST_F(CtlTest, CooldownNeedsADuration) {
  env_["USER"] = "bob";
  Result r = Run({"keys", "cooldown", "0", "--duration", "5m"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  EXPECT_EQ(r.out, absl::StrCat("Key 0 (", MaskKey(kKeyA), ", fingerprint ", KeyFingerprint(kKeyA),
                                ") is now cooling (5m00s left): sflbctl cooldown by bob\n"));
  v1::KeyStatus k = KeyAt(0);
  EXPECT_EQ(k.state(), v1::KEY_STATE_COOLING);
  absl::Duration left = FromProtoTime(k.state_until()) - absl::Now();
  EXPECT_GT(left, absl::Minutes(4));
  EXPECT_LE(left, absl::Minutes(5));

  r = Run({"keys", "--state", "cooling"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  ParsedTable table = ParseTable(Lines(r.out), {"INDEX", "LEFT", "REQUESTS"});
  ASSERT_EQ(table.rows.size(), 1u);
  EXPECT_THAT(table.rows[0]["LEFT"], AnyOf(StartsWith("4m5"), Eq("5m00s")));

  r = Run({"keys", "cooldown", "1", "--duration=90", "--reason", "noisy"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  EXPECT_THAT(r.out, ::testing::EndsWith(" is now cooling (1m30s left): noisy\n"));

  // Without --duration, or with a bad one: usage error, nothing sent.
  r = Run({"keys", "cooldown", "2"});
  EXPECT_EQ(r.code, kCtlUsage);
  EXPECT_EQ(r.out, "");
  EXPECT_THAT(r.err, StartsWith("sflbctl: keys cooldown needs --duration, e.g. --duration 5m\n"));
  EXPECT_THAT(r.err, HasSubstr("Usage: sflbctl keys cooldown KEY --duration DURATION"));
  for (const char* bad : {"soon", "0", "-5m", ""}) {
    r = Run({"keys", "cooldown", "2", "--duration", bad});
    EXPECT_EQ(r.code, kCtlUsage) << bad;
    EXPECT_THAT(r.err, StartsWith("sflbctl: --duration: expected a positive duration")) << bad;
  }
  r = Run({"keys", "cooldown", "2", "--duration"});
  EXPECT_EQ(r.code, kCtlUsage);
  EXPECT_THAT(r.err, StartsWith("sflbctl: --duration needs a value (DURATION)\n"));
  // Out of the server's range (1s .. 7 days): its INVALID_ARGUMENT is a usage error too.
  r = Run({"keys", "cooldown", "2", "--duration", "200h"});
  EXPECT_EQ(r.code, kCtlUsage);
  EXPECT_EQ(r.err, "sflbctl: cooldown duration must be between 1s and 7 days\n");
  EXPECT_EQ(KeyAt(2).state(), v1::KEY_STATE_ACTIVE);
  // --duration belongs to cooldown only.
  r = Run({"keys", "disable", "2", "--duration", "5m"});
  EXPECT_EQ(r.code, kCtlUsage);
  EXPECT_THAT(r.err, StartsWith("sflbctl: unknown flag --duration for 'keys disable'\n"));
}

TEST_F(CtlTest, KeySubcommandUsageErrors) {
  env_.clear();  // none of these needs a server or a key
  Result r = Run({"keys", "show"});
  EXPECT_EQ(r.code, kCtlUsage);
  EXPECT_THAT(r.err, StartsWith("sflbctl: missing argument for 'keys show'\n"));
  EXPECT_THAT(r.err, HasSubstr("Usage: sflbctl keys show KEY\n"));

  r = Run({"keys", "show", "1", "2"});
  EXPECT_EQ(r.code, kCtlUsage);
  EXPECT_THAT(r.err, StartsWith("sflbctl: wrong number of arguments for 'keys show'\n"));

  r = Run({"keys", "frobnicate", "1"});
  EXPECT_EQ(r.code, kCtlUsage);
  EXPECT_THAT(r.err, StartsWith("sflbctl: 'keys' has no subcommand 'frobnicate' (there are: "
                                "keys show, keys disable, keys enable, keys cooldown)\n"));

  r = Run({"keys", "disable"});
  EXPECT_EQ(r.code, kCtlUsage);
  r = Run({"keys", "enable", "0", "--state", "active"});
  EXPECT_EQ(r.code, kCtlUsage);
  EXPECT_THAT(r.err, StartsWith("sflbctl: unknown flag --state for 'keys enable'\n"));
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

// ---- balance ----

TEST_F(CtlTest, BalanceTableWithOkUnavailableAndErrorKeysAndTotal) {
  SetFetchAnswer(kKeyA, BalanceAnswer("acct-1001", "88.88"));
  SetFetchAnswer(kKeyB, HttpAnswer(410, R"({"message":"gone"})"));
  SetFetchAnswer(kKeyC, HttpAnswer(500, R"({"message":"internal error"})"));
  Result r = Run({"balance"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  EXPECT_EQ(r.err, "");
  std::vector<std::string> lines = Lines(r.out);
  ParsedTable table = ParseTable(lines, {"INDEX", "BALANCE"});
  EXPECT_EQ(table.headers,
            (std::vector<std::string>{"INDEX", "KEY FINGERPRINT", "ACCOUNT ID", "STATUS",
                                      "BALANCE", "CHECKED", "ERROR"}));
  ASSERT_EQ(table.rows.size(), 3u) << r.out;
  EXPECT_EQ(table.rows[0]["INDEX"], "0");
  EXPECT_EQ(table.rows[0]["KEY FINGERPRINT"], KeyFingerprint(kKeyA));
  EXPECT_EQ(table.rows[0]["ACCOUNT ID"], "acct-1001");
  EXPECT_EQ(table.rows[0]["STATUS"], "ok");
  EXPECT_EQ(table.rows[0]["BALANCE"], "88.8800");
  EXPECT_EQ(table.rows[0]["CHECKED"], "just now");
  EXPECT_EQ(table.rows[0]["ERROR"], "-");
  EXPECT_EQ(table.rows[1]["KEY FINGERPRINT"], KeyFingerprint(kKeyB));
  EXPECT_EQ(table.rows[1]["STATUS"], "unavailable");
  EXPECT_EQ(table.rows[1]["ACCOUNT ID"], "-");
  EXPECT_EQ(table.rows[1]["BALANCE"], "-");
  EXPECT_THAT(table.rows[1]["ERROR"], HasSubstr("HTTP 410"));
  EXPECT_EQ(table.rows[2]["STATUS"], "error");
  EXPECT_EQ(table.rows[2]["BALANCE"], "-");
  EXPECT_THAT(table.rows[2]["ERROR"], HasSubstr("HTTP 500"));
  EXPECT_EQ(table.totals["INDEX"], "TOTAL");
  EXPECT_EQ(table.totals["BALANCE"], "88.8800");
  EXPECT_EQ(lines.back(), "1 of 3 balances known, 1 unavailable, 1 failed");
  EXPECT_THAT(r.out, Not(HasSubstr("Balances are unavailable")));
}

TEST_F(CtlTest, BalanceTotalsSeveralKeysAndRefreshAsksTheUpstreamAgain) {
  SetFetchAnswer(kKeyA, BalanceAnswer("acct-1", "10.5"));
  SetFetchAnswer(kKeyB, BalanceAnswer("acct-2", "0.25"));
  SetFetchAnswer(kKeyC, BalanceAnswer("acct-2", "1.2345"));
  Result r = Run({"balance"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  ParsedTable table = ParseTable(Lines(r.out), {"INDEX", "BALANCE"});
  EXPECT_EQ(table.totals["BALANCE"], "11.9845");
  EXPECT_EQ(Lines(r.out).back(), "3 of 3 balances known");
  EXPECT_EQ(checker_->fetch_count(), 3u);

  // From the cache, then from the upstream again.
  SetFetchAnswer(kKeyA, BalanceAnswer("acct-1", "20"));
  r = Run({"balance"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  EXPECT_EQ(checker_->fetch_count(), 3u);
  EXPECT_EQ(ParseTable(Lines(r.out), {"INDEX", "BALANCE"}).totals["BALANCE"], "11.9845");
  r = Run({"balance", "--refresh"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  EXPECT_EQ(checker_->fetch_count(), 6u);
  EXPECT_EQ(ParseTable(Lines(r.out), {"INDEX", "BALANCE"}).totals["BALANCE"], "21.4845");
}

TEST_F(CtlTest, BalanceAllUnavailableSaysSoAndExitsZero) {
  for (const char* key : {kKeyA, kKeyB, kKeyC}) SetFetchAnswer(key, HttpAnswer(410));
  Result r = Run({"balance"});
  EXPECT_EQ(r.code, kCtlOk) << r.err;
  EXPECT_EQ(r.err, "");
  ParsedTable table = ParseTable(Lines(r.out), {"INDEX", "BALANCE"});
  ASSERT_EQ(table.rows.size(), 3u);
  for (auto& row : table.rows) EXPECT_EQ(row["STATUS"], "unavailable");
  // No "0.0000": nothing is known.
  EXPECT_EQ(table.totals["BALANCE"], "-");
  EXPECT_THAT(r.out, HasSubstr("Balances are unavailable: the upstream no longer reports them "
                               "for any of the 3 keys. This is not an error"));
  EXPECT_THAT(Lines(r.out).back(), StartsWith("balances are unavailable: the upstream"));
}

TEST_F(CtlTest, BalanceJsonIsTheResponse) {
  SetFetchAnswer(kKeyA, BalanceAnswer("acct-1001", "88.88"));
  SetFetchAnswer(kKeyB, HttpAnswer(410));
  Result r = Run({"balance", "--json"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 1);
  nlohmann::json j = nlohmann::json::parse(r.out);
  ASSERT_EQ(j["keys"].size(), 3u);
  EXPECT_EQ(j["keys"][0]["status"], "BALANCE_STATUS_OK");
  EXPECT_EQ(j["keys"][0]["balance"], "88.8800");
  EXPECT_EQ(j["keys"][0]["account_id"], "acct-1001");
  EXPECT_EQ(j["keys"][0]["fingerprint"], KeyFingerprint(kKeyA));
  EXPECT_EQ(j["keys"][1]["status"], "BALANCE_STATUS_UNAVAILABLE");
  EXPECT_EQ(j["keys"][2]["status"], "BALANCE_STATUS_ERROR");
  EXPECT_EQ(j["total_balance"], "88.8800");
  EXPECT_EQ(j["unavailable"], false);
  EXPECT_EQ(j["message"], "1 of 3 balances known, 1 unavailable, 1 failed");
}

// ---- audit ----

// The columns of an audit line: runs separated by two or more spaces, with their positions.
struct AuditLine {
  std::vector<std::string> fields;
  std::vector<size_t> starts;
  std::vector<size_t> ends;
};

AuditLine SplitAuditLine(const std::string& line) {
  AuditLine parsed;
  size_t i = 0;
  while (i < line.size()) {
    if (line[i] == ' ') {
      ++i;
      continue;
    }
    // The details column (JSON) is the rest of the line.
    if (parsed.fields.size() == 4) {
      parsed.starts.push_back(i);
      parsed.ends.push_back(line.size());
      parsed.fields.push_back(line.substr(i));
      break;
    }
    size_t end = line.find("  ", i);
    if (end == std::string::npos) end = line.size();
    parsed.starts.push_back(i);
    parsed.ends.push_back(end);
    parsed.fields.push_back(line.substr(i, end - i));
    i = end;
  }
  return parsed;
}

TEST_F(CtlTest, AuditListsEntriesOnePerLineAligned) {
  AppendAudit("reload", "SIGHUP", {{"result", "ok"}, {"new", 3}});
  AppendAudit("key_state", "admin@ipv4:10.0.0.5:51234",
              {{"key", "0123456789ab"}, {"reason", "rotating keys"}});
  Result r = Run({"audit"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  EXPECT_EQ(r.err, "");
  std::vector<std::string> lines = Lines(r.out);
  // The two entries, and this read itself (audited before it is answered).
  ASSERT_EQ(lines.size(), 3u) << r.out;
  std::vector<AuditLine> parsed;
  for (const std::string& line : lines) {
    parsed.push_back(SplitAuditLine(line));
    ASSERT_EQ(parsed.back().fields.size(), 5u) << line;
  }
  EXPECT_EQ(parsed[0].fields[0], "1");
  EXPECT_EQ(parsed[0].fields[2], "reload");
  EXPECT_EQ(parsed[0].fields[3], "SIGHUP");
  EXPECT_EQ(parsed[0].fields[4], R"({"new":3,"result":"ok"})");
  EXPECT_EQ(parsed[1].fields[0], "2");
  EXPECT_EQ(parsed[1].fields[2], "key_state");
  EXPECT_EQ(parsed[1].fields[3], "admin@ipv4:10.0.0.5:51234");
  EXPECT_EQ(parsed[1].fields[4], R"({"key":"0123456789ab","reason":"rotating keys"})");
  EXPECT_EQ(parsed[2].fields[0], "3");
  EXPECT_EQ(parsed[2].fields[2], "admin_call");
  EXPECT_THAT(parsed[2].fields[3], StartsWith("admin@"));
  EXPECT_EQ(nlohmann::json::parse(parsed[2].fields[4])["method"], "ReadAudit");
  for (const AuditLine& p : parsed) {
    absl::Time ts;
    std::string error;
    EXPECT_TRUE(absl::ParseTime(absl::RFC3339_full, p.fields[1], &ts, &error)) << p.fields[1];
    EXPECT_LT(absl::AbsDuration(absl::Now() - ts), absl::Minutes(1));
    // seq right-aligned; ts, type, actor and details each start in one column.
    EXPECT_EQ(p.ends[0], parsed[0].ends[0]);
    for (size_t c = 1; c < 5; ++c) EXPECT_EQ(p.starts[c], parsed[0].starts[c]) << c;
  }
}

TEST_F(CtlTest, AuditLimitGivesTheNewestEntries) {
  for (int i = 0; i < 5; ++i) AppendAudit("reload", "SIGHUP", {{"n", i}});
  Result r = Run({"audit", "--limit", "2"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  std::vector<std::string> lines = Lines(r.out);
  ASSERT_EQ(lines.size(), 2u) << r.out;
  EXPECT_EQ(SplitAuditLine(lines[0]).fields[0], "5");
  EXPECT_EQ(SplitAuditLine(lines[0]).fields[4], R"({"n":4})");
  EXPECT_EQ(SplitAuditLine(lines[1]).fields[0], "6");
  EXPECT_EQ(SplitAuditLine(lines[1]).fields[2], "admin_call");
}

TEST_F(CtlTest, AuditSinceTakesADurationAgoOrATime) {
  audit_clock_.Shift(-absl::Hours(3));
  AppendAudit("reload", "SIGHUP", {{"which", "old"}});
  audit_clock_.Shift(-absl::Minutes(10));
  uint64_t recent_seq = 0;
  AppendAudit("reload", "SIGHUP", {{"which", "recent"}}, &recent_seq);
  const absl::Time recent_ts = absl::Now() - absl::Minutes(10);
  audit_clock_.Shift(absl::ZeroDuration());

  Result r = Run({"audit", "--since", "1h"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  EXPECT_THAT(r.out, AllOf(HasSubstr(R"({"which":"recent"})"), Not(HasSubstr("old"))));

  r = Run({"audit", "--since", "4h"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  EXPECT_THAT(r.out, AllOf(HasSubstr(R"({"which":"recent"})"), HasSubstr(R"({"which":"old"})")));

  // RFC 3339, in UTC and with an offset.
  r = Run({"audit", "--since", FormatIso8601(recent_ts - absl::Minutes(1))});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  EXPECT_THAT(r.out, AllOf(HasSubstr(R"({"which":"recent"})"), Not(HasSubstr("old"))));
  std::vector<std::string> lines = Lines(r.out);
  ASSERT_FALSE(lines.empty());
  EXPECT_EQ(SplitAuditLine(lines[0]).fields[0], absl::StrCat(recent_seq));
  r = Run({"audit", "--since",
           absl::FormatTime("%Y-%m-%dT%H:%M:%S+02:00", recent_ts - absl::Minutes(1),
                            absl::FixedTimeZone(2 * 3600))});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  EXPECT_THAT(r.out, AllOf(HasSubstr(R"({"which":"recent"})"), Not(HasSubstr("old"))));

  r = Run({"audit", "--since", "2099-01-01T00:00:00Z"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  EXPECT_EQ(r.out, "No audit entries since 2099-01-01T00:00:00.000Z.\n");
}

TEST_F(CtlTest, AuditJsonPrintsJsonLines) {
  AppendAudit("reload", "SIGHUP", {{"result", "ok"}});
  AppendAudit("key_state", "sflbctl", {{"key", "0123456789ab"}});
  Result r = Run({"audit", "--json"});
  ASSERT_EQ(r.code, kCtlOk) << r.err;
  std::vector<std::string> lines = Lines(r.out);
  ASSERT_EQ(lines.size(), 3u) << r.out;
  for (size_t i = 0; i < lines.size(); ++i) {
    nlohmann::json j = nlohmann::json::parse(lines[i]);
    ASSERT_TRUE(j.is_object());
    EXPECT_EQ(j["seq"], i + 1);
    for (const char* field : {"ts", "type", "actor", "details"}) {
      EXPECT_TRUE(j.contains(field)) << field << " in " << lines[i];
    }
  }
  EXPECT_EQ(nlohmann::json::parse(lines[0])["details"]["result"], "ok");
  EXPECT_EQ(nlohmann::json::parse(lines[1])["actor"], "sflbctl");

  // Nothing matching: no lines at all (no text for people in a JSON stream).
  r = Run({"audit", "--json", "--since", "2099-01-01"});
  EXPECT_EQ(r.code, kCtlOk) << r.err;
  EXPECT_EQ(r.out, "");
}

TEST_F(CtlTest, AuditFollowPrintsAnEntryAppendedWhileItWaits) {
  AppendAudit("reload", "SIGHUP", {{"result", "ok"}});
  // The predicate runs on RunCtl's thread: between polls and every 100 ms while one waits.
  // Once the follow has been waiting a while, append; stop once the new entry was printed.
  absl::Time first_call = absl::InfinitePast();
  bool appended = false;
  absl::Time appended_at;
  size_t calls_before_append = 0;
  const absl::Time give_up = absl::Now() + absl::Seconds(30);
  Result r = RunUntil({"audit", "--follow"}, [&](const std::string& out) {
    if (first_call == absl::InfinitePast()) first_call = absl::Now();
    if (!appended) {
      ++calls_before_append;
      if (absl::Now() - first_call >= absl::Milliseconds(400)) {
        uint64_t seq = 0;
        EXPECT_TRUE(
            audit_->Append(AuditEntry{"key_state", "dataplane:dp-1", {{"marker", "new"}}}, &seq)
                .ok());
        appended = true;
        appended_at = absl::Now();
      }
      return false;
    }
    return absl::StrContains(out, R"({"marker":"new"})") || absl::Now() > give_up;
  });
  EXPECT_EQ(r.code, kCtlOk) << r.err;
  EXPECT_EQ(r.err, "");
  ASSERT_TRUE(appended);
  // It was waiting on the server (several checks) when the entry came, and printed it at once
  // (not after the 10 s wait).
  EXPECT_GE(calls_before_append, 3u);
  EXPECT_LT(absl::Now() - appended_at, absl::Seconds(3));
  std::vector<std::string> lines = Lines(r.out);
  ASSERT_EQ(lines.size(), 3u) << r.out;
  EXPECT_EQ(SplitAuditLine(lines[0]).fields[2], "reload");
  EXPECT_EQ(SplitAuditLine(lines[1]).fields[2], "admin_call");
  AuditLine last = SplitAuditLine(lines[2]);
  ASSERT_EQ(last.fields.size(), 5u) << lines[2];
  EXPECT_EQ(last.fields[0], "3");
  EXPECT_EQ(last.fields[2], "key_state");
  EXPECT_EQ(last.fields[3], "dataplane:dp-1");
  EXPECT_EQ(last.fields[4], R"({"marker":"new"})");
  // Follow polls are not audited (they would feed the log they read).
  EXPECT_EQ(audit_->last_seq(), 3u);
}

TEST_F(CtlTest, AuditFollowStopsPromptlyWhileAPollWaits) {
  absl::Time start = absl::Now();
  Result r = RunUntil({"audit", "--follow", "--json"}, [&](const std::string&) {
    return absl::Now() - start > absl::Milliseconds(500);
  });
  EXPECT_EQ(r.code, kCtlOk) << r.err;
  EXPECT_EQ(r.err, "");
  // Far less than the 10 s a poll may wait on the server.
  EXPECT_LT(absl::Now() - start, absl::Seconds(3));
  ASSERT_EQ(Lines(r.out).size(), 1u) << r.out;
  EXPECT_EQ(nlohmann::json::parse(r.out)["type"], "admin_call");
}

// The production path: without a predicate, SIGINT ends the follow with exit 0, and the
// previous disposition is back afterwards.
TEST_F(CtlTest, AuditFollowEndsOnSigint) {
  struct sigaction before = {};
  ASSERT_EQ(sigaction(SIGINT, nullptr, &before), 0);
  ASSERT_EQ(before.sa_handler, SIG_DFL);
  std::atomic<bool> sent{false};
  std::thread interrupter([&] {
    // Once sflbctl catches SIGINT, send it one.
    // (Never while SIGINT would still kill the test.)
    const absl::Time give_up = absl::Now() + absl::Seconds(10);
    bool caught = false;
    while (!caught && absl::Now() < give_up) {
      struct sigaction current = {};
      sigaction(SIGINT, nullptr, &current);
      caught = current.sa_handler != SIG_DFL;
      if (!caught) absl::SleepFor(absl::Milliseconds(10));
    }
    if (!caught) return;
    // Let it get into a waiting poll.
    absl::SleepFor(absl::Milliseconds(300));
    struct sigaction current = {};
    sigaction(SIGINT, nullptr, &current);
    if (current.sa_handler == SIG_DFL) return;
    sent = true;
    kill(getpid(), SIGINT);
  });
  absl::Time start = absl::Now();
  Result r = Run({"audit", "--follow"});
  interrupter.join();
  EXPECT_TRUE(sent);
  EXPECT_EQ(r.code, kCtlOk) << r.err;
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  EXPECT_THAT(r.out, HasSubstr("admin_call"));
  struct sigaction after = {};
  ASSERT_EQ(sigaction(SIGINT, nullptr, &after), 0);
  EXPECT_EQ(after.sa_handler, SIG_DFL);
}

TEST_F(CtlTest, AuditOffExitsOneWithTheServersMessage) {
  AdminServiceImpl no_audit(kAdminKey, registry_.get(), source_.get(), key_service_.get(),
                            /*audit=*/nullptr, balances_.get(), started_at_);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&no_audit);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);
  for (const char* follow : {"--limit=5", "--follow"}) {
    Result r = Run({"audit", follow, "--server", absl::StrCat("127.0.0.1:", port)});
    EXPECT_EQ(r.code, kCtlFailed) << follow;
    EXPECT_EQ(r.out, "");
    EXPECT_EQ(r.err, "sflbctl: the audit log is off (SFLB_AUDIT_LOG=off)\n");
  }
  server->Shutdown(std::chrono::system_clock::now());
}

TEST_F(CtlTest, AuditUsageErrorsExitTwo) {
  for (const char* limit : {"0", "-1", "ten", "10001"}) {
    Result r = Run({"audit", "--limit", limit});
    EXPECT_EQ(r.code, kCtlUsage) << limit;
    EXPECT_THAT(r.err, StartsWith("sflbctl: --limit: expected a number from 1 to 10000"));
  }
  for (const char* since : {"yesterday", "", "2026-13-01", "1h ago", "-5m"}) {
    Result r = Run({"audit", "--since", since});
    EXPECT_EQ(r.code, kCtlUsage) << since;
    EXPECT_THAT(r.err, StartsWith("sflbctl: --since: expected an RFC 3339 time")) << since;
    EXPECT_THAT(r.err, HasSubstr("Usage: sflbctl audit")) << since;
  }
  Result r = Run({"audit", "--follow=yes"});
  EXPECT_EQ(r.code, kCtlUsage);
}

// ---- health ----

TEST_F(CtlTest, HealthServingWithoutAnAdminKey) {
  env_.erase("LB_ADMIN_KEY");
  Result r = Run({"health"});
  EXPECT_EQ(r.code, kCtlOk) << r.err;
  EXPECT_EQ(r.out, absl::StrCat("controlplane ", address_, ": SERVING\n"));
  EXPECT_EQ(r.err, "");

  r = Run({"health", "--json"});
  EXPECT_EQ(r.code, kCtlOk) << r.err;
  nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["status"], "SERVING");
  EXPECT_EQ(j["healthy"], true);
  EXPECT_EQ(j["target"], absl::StrCat("controlplane ", address_));
}

TEST_F(CtlTest, HealthNotServingExitsOne) {
  server_->GetHealthCheckService()->SetServingStatus(false);
  Result r = Run({"health"});
  EXPECT_EQ(r.code, kCtlFailed);
  EXPECT_EQ(r.out, absl::StrCat("controlplane ", address_, ": NOT_SERVING\n"));
}

TEST_F(CtlTest, HealthOfAServerWithoutTheHealthServiceExitsOne) {
  AdminServiceImpl admin(kAdminKey, registry_.get(), source_.get(), key_service_.get(),
                         audit_.get(), balances_.get(), started_at_);
  grpc::EnableDefaultHealthCheckService(false);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&admin);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  grpc::EnableDefaultHealthCheckService(true);
  ASSERT_NE(server, nullptr);
  std::string address = absl::StrCat("127.0.0.1:", port);
  Result r = Run({"health", "--server", address});
  EXPECT_EQ(r.code, kCtlFailed);
  EXPECT_EQ(r.err, absl::StrCat("sflbctl: the controlplane at ", address,
                                " does not serve grpc.health.v1.Health\n"));
  server->Shutdown(std::chrono::system_clock::now());
}

TEST_F(CtlTest, HealthOfAnUnreachableControlplaneExitsThree) {
  std::string refusing = RefusingAddress();
  env_.erase("LB_ADMIN_KEY");
  Result r = Run({"health", "--server", refusing});
  EXPECT_EQ(r.code, kCtlUnreachable);
  EXPECT_EQ(r.out, "");
  EXPECT_THAT(r.err, StartsWith(absl::StrCat("sflbctl: cannot reach the controlplane at ",
                                             refusing, " (")));
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
}

// An in-process HTTP server: /readyz answers with the status set by the test.
class ReadyzServer {
 public:
  ReadyzServer() {
    server_.Get("/readyz", [this](const httplib::Request&, httplib::Response& res) {
      res.status = status_.load();
      res.set_content(res.status == 200 ? "ok\n" : "not ready: no key snapshot yet\nmore\n",
                      "text/plain");
    });
    port_ = server_.bind_to_any_port("127.0.0.1");
    thread_ = std::thread([this] { server_.listen_after_bind(); });
    while (!server_.is_running()) absl::SleepFor(absl::Milliseconds(5));
  }
  ~ReadyzServer() {
    server_.stop();
    thread_.join();
  }
  std::string url() const { return absl::StrCat("http://127.0.0.1:", port_, "/readyz"); }
  void set_status(int status) { status_ = status; }

 private:
  httplib::Server server_;
  std::atomic<int> status_{200};
  int port_ = 0;
  std::thread thread_;
};

TEST_F(CtlTest, HealthHttpChecksAnyUrl) {
  env_.clear();
  ReadyzServer readyz;
  Result r = Run({"health", "--http", readyz.url()});
  EXPECT_EQ(r.code, kCtlOk) << r.err;
  EXPECT_EQ(r.out, absl::StrCat(readyz.url(), ": HTTP 200\n"));
  EXPECT_EQ(r.err, "");

  readyz.set_status(503);
  r = Run({"health", "--http", readyz.url()});
  EXPECT_EQ(r.code, kCtlFailed);
  EXPECT_EQ(r.out, absl::StrCat(readyz.url(), ": HTTP 503 (not ready: no key snapshot yet)\n"));

  r = Run({"health", "--json", "--http=" + readyz.url()});
  EXPECT_EQ(r.code, kCtlFailed);
  nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["http_status"], 503);
  EXPECT_EQ(j["healthy"], false);
  EXPECT_EQ(j["target"], readyz.url());

  std::string refusing = absl::StrCat("http://", RefusingAddress(), "/readyz");
  r = Run({"health", "--http", refusing});
  EXPECT_EQ(r.code, kCtlUnreachable);
  EXPECT_EQ(r.out, "");
  EXPECT_THAT(r.err, StartsWith(absl::StrCat("sflbctl: cannot reach ", refusing, " (")));

  for (const char* bad : {"127.0.0.1:3000/readyz", "ftp://x/", "http:///readyz"}) {
    r = Run({"health", "--http", bad});
    EXPECT_EQ(r.code, kCtlUsage) << bad;
    EXPECT_THAT(r.err, StartsWith("sflbctl: --http: ")) << bad;
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
  for (const char* text :
       {"stats", "keys", "keys show", "keys disable", "keys enable", "keys cooldown", "reload",
        "balance", "audit", "health", "help", "version", "--server ADDR", "--admin-key-file PATH", "--json", "--timeout DURATION",
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

  r = Run({"help", "keys", "show"});
  EXPECT_EQ(r.code, kCtlOk);
  EXPECT_THAT(r.out, StartsWith("Usage: sflbctl keys show KEY\n"));
  EXPECT_THAT(r.out, HasSubstr("id:N"));
  EXPECT_EQ(Run({"keys", "show", "--help"}).out, r.out);

  r = Run({"help", "keys", "cooldown"});
  EXPECT_EQ(r.code, kCtlOk);
  EXPECT_THAT(r.out,
              StartsWith("Usage: sflbctl keys cooldown KEY --duration DURATION [--reason TEXT]\n"));
  EXPECT_THAT(r.out, AllOf(HasSubstr("--duration DURATION"), HasSubstr("--reason TEXT")));

  for (const char* command : {"disable", "enable"}) {
    r = Run({"help", "keys", command});
    EXPECT_EQ(r.code, kCtlOk);
    EXPECT_THAT(
        r.out, StartsWith(absl::StrCat("Usage: sflbctl keys ", command, " KEY [--reason TEXT]\n")));
    EXPECT_THAT(r.out, HasSubstr(absl::StrCat("'sflbctl ", command, " by $USER'")));
  }

  r = Run({"help", "balance"});
  EXPECT_EQ(r.code, kCtlOk);
  EXPECT_THAT(r.out, StartsWith("Usage: sflbctl balance [--refresh]\n"));
  EXPECT_THAT(r.out, AllOf(HasSubstr("--refresh"), HasSubstr("not a failure")));
  EXPECT_EQ(Run({"balance", "--help"}).out, r.out);

  r = Run({"help", "audit"});
  EXPECT_EQ(r.code, kCtlOk);
  EXPECT_THAT(r.out, StartsWith("Usage: sflbctl audit [--since TIME] [--limit N] [--follow]\n"));
  EXPECT_THAT(r.out, AllOf(HasSubstr("--since TIME"), HasSubstr("--limit N"),
                           HasSubstr("--follow"), HasSubstr("JSON Lines")));
  EXPECT_THAT(r.out, Not(HasSubstr("follow-for")));

  r = Run({"help", "health"});
  EXPECT_EQ(r.code, kCtlOk);
  EXPECT_THAT(r.out, StartsWith("Usage: sflbctl health [--http URL]\n"));
  EXPECT_THAT(r.out, AllOf(HasSubstr("--http URL"), HasSubstr("no admin key")));

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

TEST(CtlFormatTest, SinceTime) {
  const absl::Time now = absl::FromUnixSeconds(1'800'000'000);
  EXPECT_EQ(ParseSinceTime("1h", now), now - absl::Hours(1));
  EXPECT_EQ(ParseSinceTime("30m", now), now - absl::Minutes(30));
  EXPECT_EQ(ParseSinceTime(" 1h30m ", now), now - absl::Minutes(90));
  EXPECT_EQ(ParseSinceTime("90", now), now - absl::Seconds(90));
  EXPECT_EQ(ParseSinceTime("2d", now), now - absl::Hours(48));
  EXPECT_EQ(ParseSinceTime("0s", now), now);
  EXPECT_EQ(ParseSinceTime("2026-11-26T13:00:00Z", now),
            absl::FromCivil(absl::CivilSecond(2026, 11, 26, 13, 0, 0), absl::UTCTimeZone()));
  EXPECT_EQ(ParseSinceTime("2026-11-26T14:00:00.5+01:00", now),
            absl::FromCivil(absl::CivilSecond(2026, 11, 26, 13, 0, 0), absl::UTCTimeZone()) +
                absl::Milliseconds(500));
  EXPECT_EQ(ParseSinceTime("2026-11-26 13:00:00z", now),
            absl::FromCivil(absl::CivilSecond(2026, 11, 26, 13, 0, 0), absl::UTCTimeZone()));
  EXPECT_EQ(ParseSinceTime("2026-11-26T13:00:00", now),
            absl::FromCivil(absl::CivilSecond(2026, 11, 26, 13, 0, 0), absl::UTCTimeZone()));
  EXPECT_EQ(ParseSinceTime("2026-11-26", now),
            absl::FromCivil(absl::CivilDay(2026, 11, 26), absl::UTCTimeZone()));
  for (const char* bad : {"", "soon", "-1h", "1h ago", "2026-11-31", "2026-11-26T25:00:00Z",
                          "1x", "d"}) {
    EXPECT_EQ(ParseSinceTime(bad, now), absl::nullopt) << bad;
  }
}

TEST(CtlFormatTest, ShortDuration) {
  EXPECT_EQ(FormatShortDuration(absl::Seconds(-5)), "0s");
  EXPECT_EQ(FormatShortDuration(absl::Seconds(42)), "42s");
  EXPECT_EQ(FormatShortDuration(absl::Seconds(187)), "3m07s");
  EXPECT_EQ(FormatShortDuration(absl::Minutes(62)), "1h02m");
  EXPECT_EQ(FormatShortDuration(absl::Hours(51)), "2d03h");
}

TEST(CtlFormatTest, WrapText) {
  EXPECT_EQ(WrapText("", 20), "");
  EXPECT_EQ(WrapText("  \n ", 20), "");
  EXPECT_EQ(WrapText("short text", 20), "short text\n");
  EXPECT_EQ(WrapText("one two three four five six", 13, "  "),
            "  one two\n  three four\n  five six\n");
  // Exactly the width fits; newlines and runs of spaces are one space.
  EXPECT_EQ(WrapText("abcd  efgh\nij", 9), "abcd efgh\nij\n");
  // Too long words stay whole; width counts code points.
  EXPECT_EQ(WrapText("a verylongword b", 6), "a\nverylongword\nb\n");
  EXPECT_EQ(WrapText("sk-ab\xE2\x80\xA6wxyz x", 12), "sk-ab\xE2\x80\xA6wxyz x\n");
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
