#include "controlplane/audit_log.h"

#include <dirent.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "common/time_format.h"
#include "tests/unit/fake_clock.h"

namespace sflb {
namespace {

using json = nlohmann::json;

// A fresh directory, removed with its files at the end of the test.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = ::testing::TempDir() + "/audit_log_test.XXXXXX";
    char* made = mkdtemp(&tmpl[0]);
    EXPECT_NE(made, nullptr);
    path_ = tmpl;
  }
  ~TempDir() {
    for (const std::string& f : Files()) unlink((path_ + "/" + f).c_str());
    rmdir(path_.c_str());
  }
  const std::string& path() const { return path_; }
  std::vector<std::string> Files() const {
    std::vector<std::string> out;
    if (DIR* d = opendir(path_.c_str())) {
      while (dirent* e = readdir(d)) {
        std::string name = e->d_name;
        if (name != "." && name != "..") out.push_back(name);
      }
      closedir(d);
    }
    return out;
  }

 private:
  std::string path_;
};

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void AppendRaw(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::app);
  out << bytes;
}

bool Exists(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0;
}

std::vector<std::string> Lines(const std::string& text) {
  return absl::StrSplit(text, '\n', absl::SkipEmpty());
}

// The defensive check: no file in `dir` contains any of `secrets`.
void ExpectNoSecrets(const TempDir& dir, const std::vector<std::string>& secrets) {
  for (const std::string& f : dir.Files()) {
    const std::string content = ReadFile(dir.path() + "/" + f);
    for (const std::string& s : secrets) {
      EXPECT_FALSE(absl::StrContains(content, s)) << "secret found in " << f;
    }
  }
}

std::vector<uint64_t> Seqs(const std::vector<json>& entries) {
  std::vector<uint64_t> out;
  for (const json& e : entries) out.push_back(e.at("seq").get<uint64_t>());
  return out;
}

AuditEntry Entry(std::string type, int n = 0) {
  AuditEntry e;
  e.type = std::move(type);
  e.actor = "sflbctl@ipv4:127.0.0.1:5000";
  e.details = json{{"n", n}, {"fingerprint", "0123456789ab"}};
  return e;
}

class AuditLogTest : public ::testing::Test {
 protected:
  AuditLogOptions Options() {
    AuditLogOptions o;
    o.path = path_;
    o.clock = &clock_;
    return o;
  }
  std::unique_ptr<AuditLog> OpenLog(AuditLogOptions o) {
    absl::StatusOr<std::unique_ptr<AuditLog>> log = AuditLog::Open(std::move(o));
    EXPECT_TRUE(log.ok()) << log.status();
    return log.ok() ? std::move(*log) : nullptr;
  }
  std::unique_ptr<AuditLog> OpenLog() { return OpenLog(Options()); }
  std::vector<json> ReadAll(const AuditLog& log, AuditQuery q = AuditQuery(),
                            size_t* skipped = nullptr) {
    absl::StatusOr<std::vector<json>> r = log.Read(q, skipped);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *r : std::vector<json>();
  }

  TempDir dir_;
  const std::string path_ = dir_.path() + "/audit.jsonl";
  FakeClock clock_;
};

TEST_F(AuditLogTest, AppendAndReadRoundtrip) {
  auto log = OpenLog();
  ASSERT_NE(log, nullptr);
  EXPECT_EQ(log->last_seq(), 0u);
  uint64_t seq = 0;
  ASSERT_TRUE(log->Append(Entry("reload", 1), &seq).ok());
  EXPECT_EQ(seq, 1u);
  clock_.Advance(absl::Milliseconds(1500));
  AuditEntry e;
  e.type = "key_state";
  e.actor = "dataplane:dp-1";
  e.details = json{{"from", "active"}, {"to", "cooldown"}, {"reason", "429 \"quoted\"\n"}};
  ASSERT_TRUE(log->Append(e, &seq).ok());
  EXPECT_EQ(seq, 2u);
  AuditEntry null_details;
  null_details.type = "admin_call";
  null_details.details = nullptr;
  ASSERT_TRUE(log->Append(null_details).ok());
  EXPECT_EQ(log->last_seq(), 3u);

  std::vector<json> all = ReadAll(*log);
  ASSERT_EQ(all.size(), 3u);
  EXPECT_EQ(all[0]["seq"], 1);
  EXPECT_EQ(all[0]["ts"], "2026-01-01T00:00:00.000Z");
  EXPECT_EQ(all[0]["type"], "reload");
  EXPECT_EQ(all[0]["actor"], "sflbctl@ipv4:127.0.0.1:5000");
  EXPECT_EQ(all[0]["details"]["n"], 1);
  EXPECT_EQ(all[1]["ts"], "2026-01-01T00:00:01.500Z");
  EXPECT_EQ(all[1]["details"], e.details);
  EXPECT_EQ(all[2]["details"], json::object());

  // On disk: one line per entry, seq and ts first.
  std::vector<std::string> lines = Lines(ReadFile(path_));
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_TRUE(absl::StartsWith(lines[0], "{\"seq\":1,\"ts\":\"2026-01-01T00:00:00.000Z\",\"type\""))
      << lines[0];
  // Reading from disk (a reopened log) gives the same entries.
  log.reset();
  auto reopened = OpenLog();
  EXPECT_EQ(ReadAll(*reopened), all);
}

TEST_F(AuditLogTest, RejectsBadEntries) {
  auto log = OpenLog();
  AuditEntry no_type;
  EXPECT_EQ(log->Append(no_type).code(), absl::StatusCode::kInvalidArgument);
  AuditEntry array_details = Entry("admin_call");
  array_details.details = json::array({1, 2});
  EXPECT_EQ(log->Append(array_details).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(log->last_seq(), 0u);
  EXPECT_EQ(ReadFile(path_), "");
}

TEST_F(AuditLogTest, OpenErrorsNameThePath) {
  AuditLogOptions o = Options();
  o.path = dir_.path() + "/missing-dir/audit.jsonl";
  absl::StatusOr<std::unique_ptr<AuditLog>> log = AuditLog::Open(o);
  ASSERT_FALSE(log.ok());
  EXPECT_TRUE(absl::StrContains(log.status().message(), o.path)) << log.status();

  o = Options();
  o.max_bytes = 0;
  EXPECT_EQ(AuditLog::Open(o).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(AuditLogTest, SecondOpenOfTheSameFileIsRefused) {
  auto log = OpenLog();
  ASSERT_NE(log, nullptr);
  absl::StatusOr<std::unique_ptr<AuditLog>> second = AuditLog::Open(Options());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition) << second.status();
  EXPECT_TRUE(absl::StrContains(second.status().message(), path_));
}

TEST_F(AuditLogTest, SeqContinuesAfterReopen) {
  {
    auto log = OpenLog();
    ASSERT_TRUE(log->Append(Entry("reload", 1)).ok());
    ASSERT_TRUE(log->Append(Entry("reload", 2)).ok());
  }
  auto log = OpenLog();
  EXPECT_EQ(log->last_seq(), 2u);
  uint64_t seq = 0;
  ASSERT_TRUE(log->Append(Entry("reload", 3), &seq).ok());
  EXPECT_EQ(seq, 3u);
  EXPECT_EQ(Seqs(ReadAll(*log)), (std::vector<uint64_t>{1, 2, 3}));
}

TEST_F(AuditLogTest, TornLastLineIsCutOnReopenAndEarlierEntriesStay) {
  {
    auto log = OpenLog();
    for (int i = 1; i <= 3; ++i) ASSERT_TRUE(log->Append(Entry("reload", i)).ok());
  }
  const std::string intact = ReadFile(path_);
  AppendRaw(path_, "{\"seq\":4,\"ts\":\"2026-01-01T00:0");  // a crash mid-write

  auto log = OpenLog();
  ASSERT_NE(log, nullptr);
  EXPECT_EQ(ReadFile(path_), intact);  // earlier entries byte for byte
  EXPECT_EQ(log->last_seq(), 3u);
  uint64_t seq = 0;
  ASSERT_TRUE(log->Append(Entry("reload", 4), &seq).ok());
  EXPECT_EQ(seq, 4u);
  size_t skipped = 99;
  log.reset();
  log = OpenLog();
  EXPECT_EQ(Seqs(ReadAll(*log, AuditQuery(), &skipped)), (std::vector<uint64_t>{1, 2, 3, 4}));
  EXPECT_EQ(skipped, 0u);
  for (const std::string& line : Lines(ReadFile(path_))) {
    EXPECT_TRUE(json::parse(line, nullptr, false).is_object()) << line;
  }
}

TEST_F(AuditLogTest, FileWithOnlyATornLineStartsOver) {
  AppendRaw(path_, "{\"seq\":1,\"ts\"");
  auto log = OpenLog();
  ASSERT_NE(log, nullptr);
  EXPECT_EQ(log->last_seq(), 0u);
  EXPECT_EQ(ReadFile(path_), "");
  ASSERT_TRUE(log->Append(Entry("reload")).ok());
  EXPECT_EQ(Lines(ReadFile(path_)).size(), 1u);
}

TEST_F(AuditLogTest, UnparsableLinesAreSkippedAndCounted) {
  {
    auto log = OpenLog();
    ASSERT_TRUE(log->Append(Entry("reload", 1)).ok());
  }
  AppendRaw(path_, "this is not json\n{\"no_seq\":true}\n");
  auto log = OpenLog();
  EXPECT_EQ(log->last_seq(), 1u);  // recovered past the junk at the end
  ASSERT_TRUE(log->Append(Entry("reload", 2)).ok());
  log.reset();
  log = OpenLog();
  size_t skipped = 0;
  EXPECT_EQ(Seqs(ReadAll(*log, AuditQuery(), &skipped)), (std::vector<uint64_t>{1, 2}));
  EXPECT_EQ(skipped, 2u);
}

TEST_F(AuditLogTest, RotationKeepsMaxFilesAndReadSpansThem) {
  AuditLogOptions o = Options();
  o.max_bytes = 1000;
  o.max_files = 2;
  auto log = OpenLog(o);
  for (int i = 1; i <= 40; ++i) ASSERT_TRUE(log->Append(Entry("admin_call", i)).ok());

  EXPECT_TRUE(Exists(path_));
  EXPECT_TRUE(Exists(path_ + ".1"));
  EXPECT_TRUE(Exists(path_ + ".2"));
  EXPECT_FALSE(Exists(path_ + ".3"));
  size_t kept_lines = 0;
  for (const std::string& name : {path_ + ".2", path_ + ".1", path_}) {
    const std::string content = ReadFile(name);
    EXPECT_LE(content.size(), 1000u) << name;
    EXPECT_TRUE(absl::EndsWith(content, "\n")) << name;
    kept_lines += Lines(content).size();
  }

  auto check = [&](const AuditLog& l) {
    std::vector<uint64_t> seqs = Seqs(ReadAll(l));
    ASSERT_EQ(seqs.size(), kept_lines);
    ASSERT_FALSE(seqs.empty());
    EXPECT_GT(seqs.front(), 1u);  // the oldest file was dropped
    EXPECT_EQ(seqs.back(), 40u);
    for (size_t i = 1; i < seqs.size(); ++i) EXPECT_EQ(seqs[i], seqs[i - 1] + 1);
    // limit: newest N, oldest first, even when they span two files.
    AuditQuery q;
    q.limit = kept_lines - 1;
    std::vector<uint64_t> newest = Seqs(ReadAll(l, q));
    EXPECT_EQ(newest, std::vector<uint64_t>(seqs.begin() + 1, seqs.end()));
    // after_seq into the middle of the oldest kept file.
    q = AuditQuery();
    q.after_seq = seqs.front() + 1;
    EXPECT_EQ(Seqs(ReadAll(l, q)), std::vector<uint64_t>(seqs.begin() + 2, seqs.end()));
  };
  check(*log);
  log.reset();
  log = OpenLog(o);  // disk reads only
  check(*log);
  uint64_t seq = 0;
  ASSERT_TRUE(log->Append(Entry("admin_call", 41), &seq).ok());
  EXPECT_EQ(seq, 41u);
}

TEST_F(AuditLogTest, MaxFilesZeroDiscardsOnRotation) {
  AuditLogOptions o = Options();
  o.max_bytes = 500;
  o.max_files = 0;
  auto log = OpenLog(o);
  for (int i = 1; i <= 20; ++i) ASSERT_TRUE(log->Append(Entry("admin_call", i)).ok());
  EXPECT_EQ(dir_.Files(), std::vector<std::string>{"audit.jsonl"});
  log.reset();
  log = OpenLog(o);
  EXPECT_EQ(log->last_seq(), 20u);
}

TEST_F(AuditLogTest, SeqRecoveredFromRotatedFileWhenLiveFileIsEmpty) {
  {
    auto log = OpenLog();
    for (int i = 1; i <= 5; ++i) ASSERT_TRUE(log->Append(Entry("reload", i)).ok());
  }
  // A crash right after a rotation: the live file exists but is empty.
  ASSERT_EQ(rename(path_.c_str(), (path_ + ".1").c_str()), 0);
  AppendRaw(path_, "");
  auto log = OpenLog();
  EXPECT_EQ(log->last_seq(), 5u);
  uint64_t seq = 0;
  ASSERT_TRUE(log->Append(Entry("reload", 6), &seq).ok());
  EXPECT_EQ(seq, 6u);
  EXPECT_EQ(Seqs(ReadAll(*log)), (std::vector<uint64_t>{1, 2, 3, 4, 5, 6}));
}

TEST_F(AuditLogTest, SinceLimitAndAfterSeqFilters) {
  const absl::Time t0 = clock_.Now();
  {
    auto log = OpenLog();
    for (int i = 1; i <= 10; ++i) {
      ASSERT_TRUE(log->Append(Entry("admin_call", i)).ok());
      clock_.Advance(absl::Minutes(1));
    }
  }
  auto log = OpenLog();
  // The same answers from disk (first) and from memory (after enough new appends, below).
  auto check = [&](const AuditLog& l) {
    AuditQuery q;
    q.since = t0 + absl::Minutes(5);  // entries 6..10 (entry i has ts t0 + (i-1) min)
    EXPECT_EQ(Seqs(ReadAll(l, q)), (std::vector<uint64_t>{6, 7, 8, 9, 10}));
    q.limit = 2;
    EXPECT_EQ(Seqs(ReadAll(l, q)), (std::vector<uint64_t>{9, 10}));
    q = AuditQuery();
    q.limit = 3;
    EXPECT_EQ(Seqs(ReadAll(l, q)), (std::vector<uint64_t>{8, 9, 10}));
    q = AuditQuery();
    q.after_seq = 7;
    EXPECT_EQ(Seqs(ReadAll(l, q)), (std::vector<uint64_t>{8, 9, 10}));
    q.after_seq = 10;
    EXPECT_TRUE(ReadAll(l, q).empty());
    q = AuditQuery();
    q.after_seq = 2;
    q.since = t0 + absl::Minutes(1);
    q.limit = 100;
    EXPECT_EQ(Seqs(ReadAll(l, q)), (std::vector<uint64_t>{3, 4, 5, 6, 7, 8, 9, 10}));
    q.since = t0 + absl::Hours(1);
    EXPECT_TRUE(ReadAll(l, q).empty());
  };
  check(*log);

  // A follower: after_seq at the end is served from the appends of this process.
  for (int i = 11; i <= 12; ++i) ASSERT_TRUE(log->Append(Entry("admin_call", i)).ok());
  AuditQuery q;
  q.after_seq = 10;
  std::vector<json> tail = ReadAll(*log, q);
  EXPECT_EQ(Seqs(tail), (std::vector<uint64_t>{11, 12}));
  EXPECT_EQ(tail[1]["details"]["n"], 12);
  q.since = absl::InfiniteFuture();
  EXPECT_TRUE(ReadAll(*log, q).empty());
  q = AuditQuery();
  q.after_seq = 11;
  q.limit = 5;
  EXPECT_EQ(Seqs(ReadAll(*log, q)), (std::vector<uint64_t>{12}));
}

TEST_F(AuditLogTest, ConcurrentAppendsAreSerialised) {
  AuditLogOptions o = Options();
  o.clock = RealClock::Get();
  auto log = OpenLog(o);
  constexpr int kThreads = 8;
  constexpr int kPerThread = 50;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&log, t] {
      for (int i = 0; i < kPerThread; ++i) {
        AuditEntry e = Entry("admin_call", i);
        e.actor = absl::StrCat("thread-", t);
        e.details["padding"] = std::string(static_cast<size_t>(100 + 37 * t), 'x');
        EXPECT_TRUE(log->Append(std::move(e)).ok());
      }
    });
  }
  for (std::thread& th : threads) th.join();

  std::vector<std::string> lines = Lines(ReadFile(path_));
  ASSERT_EQ(lines.size(), static_cast<size_t>(kThreads * kPerThread));
  std::set<uint64_t> seqs;
  uint64_t previous = 0;
  for (const std::string& line : lines) {
    json j = json::parse(line, nullptr, false);
    ASSERT_TRUE(j.is_object()) << line;
    uint64_t seq = j["seq"].get<uint64_t>();
    EXPECT_EQ(seq, previous + 1);  // file order is seq order
    previous = seq;
    seqs.insert(seq);
  }
  EXPECT_EQ(seqs.size(), lines.size());
  EXPECT_EQ(log->last_seq(), static_cast<uint64_t>(kThreads * kPerThread));
}

TEST_F(AuditLogTest, SurvivesSigkillMidAppend) {
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    // The child appends as fast as it can until it is killed. No gtest calls in here.
    AuditLogOptions o;
    o.path = path_;
    o.max_bytes = 64 << 10;  // rotations happen too
    o.max_files = 10;
    absl::StatusOr<std::unique_ptr<AuditLog>> log = AuditLog::Open(o);
    if (!log.ok()) _exit(2);
    for (int i = 0;; ++i) {
      AuditEntry e = Entry("admin_call", i);
      e.details["padding"] = std::string(static_cast<size_t>(500 + i % 3000), 'y');
      if (!(*log)->Append(std::move(e)).ok()) _exit(3);
    }
  }
  // Kill it once it has written a few hundred entries (or after 5 s at worst).
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  while (absl::Now() < deadline) {
    struct stat st;
    if (stat((path_ + ".1").c_str(), &st) == 0) break;  // at least one rotation
    int status = 0;
    ASSERT_EQ(waitpid(child, &status, WNOHANG), 0) << "child exited early: " << status;
    absl::SleepFor(absl::Milliseconds(2));
  }
  ASSERT_EQ(kill(child, SIGKILL), 0);
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFSIGNALED(status));

  AuditLogOptions o = Options();
  o.max_bytes = 64 << 10;
  o.max_files = 10;
  auto log = OpenLog(o);
  ASSERT_NE(log, nullptr);
  const uint64_t last = log->last_seq();
  EXPECT_GT(last, 0u);
  size_t skipped = 99;
  std::vector<uint64_t> seqs = Seqs(ReadAll(*log, AuditQuery(), &skipped));
  EXPECT_EQ(skipped, 0u);
  ASSERT_EQ(seqs.size(), last);
  for (size_t i = 0; i < seqs.size(); ++i) EXPECT_EQ(seqs[i], i + 1);
  for (const std::string& f : dir_.Files()) {
    for (const std::string& line : Lines(ReadFile(dir_.path() + "/" + f))) {
      ASSERT_TRUE(json::parse(line, nullptr, false).is_object()) << f << ": " << line;
    }
  }
  uint64_t seq = 0;
  ASSERT_TRUE(log->Append(Entry("reload"), &seq).ok());
  EXPECT_EQ(seq, last + 1);
}

TEST_F(AuditLogTest, WaitForAppendWakesOnAppend) {
  auto log = OpenLog();
  uint64_t woke_with = 0;
  std::thread waiter([&] { woke_with = log->WaitForAppend(0, absl::Seconds(30)); });
  const absl::Time start = absl::Now();
  ASSERT_TRUE(log->Append(Entry("reload")).ok());
  waiter.join();
  EXPECT_EQ(woke_with, 1u);
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
  // Already past: returns at once.
  EXPECT_EQ(log->WaitForAppend(0, absl::InfiniteDuration()), 1u);
}

TEST_F(AuditLogTest, WaitForAppendTimesOut) {
  auto log = OpenLog();
  ASSERT_TRUE(log->Append(Entry("reload")).ok());
  const absl::Time start = absl::Now();
  EXPECT_EQ(log->WaitForAppend(1, absl::Milliseconds(50)), 1u);
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(50));
}

TEST_F(AuditLogTest, KeyShapedStringsAreRedacted) {
  const std::string secret = "sk-abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKL";
  auto log = OpenLog();
  AuditEntry e = Entry("reload");
  e.actor = "sflbctl " + secret;
  e.details["oops"] = "key=" + secret + " end";
  e.details["list"] = json::array({secret});
  e.details[secret] = 1;
  e.details["short"] = "sk-notakey";  // too short to be a key: kept
  ASSERT_TRUE(log->Append(e).ok());
  ExpectNoSecrets(dir_, {secret});
  std::vector<json> all = ReadAll(*log);
  ASSERT_EQ(all.size(), 1u);
  EXPECT_TRUE(absl::StrContains(all[0]["details"]["oops"].get<std::string>(), "[redacted key "));
  EXPECT_EQ(all[0]["details"]["short"], "sk-notakey");
}

TEST_F(AuditLogTest, InvalidUtf8IsReplacedNotFatal) {
  auto log = OpenLog();
  AuditEntry e = Entry("auth_failed");
  e.actor = std::string("peer\xff\xfe");
  e.details["header"] = std::string("\xc3");
  ASSERT_TRUE(log->Append(e).ok());
  std::vector<json> all = ReadAll(*log);
  ASSERT_EQ(all.size(), 1u);
  EXPECT_TRUE(absl::StartsWith(all[0]["actor"].get<std::string>(), "peer"));
}

}  // namespace
}  // namespace sflb
