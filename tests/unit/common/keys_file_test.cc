// Tests of common/keys_file: ParseKeysText, ReadKeysFromEnv and LoadKeySource.
#include "common/keys_file.h"

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sflb {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;
using ::testing::SizeIs;
using ::testing::StartsWith;

// Secrets used below: long enough to be realistic, distinct, and easy to search for in output.
const char kKeyA[] = "sk-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa1111";
const char kKeyB[] = "sk-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb2222";
const char kKeyC[] = "sk-cccccccccccccccccccccccccccccccccccc3333";

std::vector<std::string> Secrets(const KeySet& set) {
  std::vector<std::string> out;
  for (const KeySpec& k : set.keys) out.push_back(k.secret);
  return out;
}

// Fails if any warning contains any of `secrets`.
void ExpectNoSecretIn(const std::vector<std::string>& warnings,
                      const std::vector<std::string>& secrets) {
  for (const std::string& w : warnings) {
    for (const std::string& s : secrets) {
      EXPECT_FALSE(absl::StrContains(w, s)) << "a warning contains a key (not printed)";
    }
  }
}

// An environment for ReadKeysFromEnv/LoadKeySource.
std::function<absl::optional<std::string>(const std::string&)> FakeEnv(
    std::map<std::string, std::string> vars) {
  return [vars = std::move(vars)](const std::string& name) -> absl::optional<std::string> {
    auto it = vars.find(name);
    if (it == vars.end()) return absl::nullopt;
    return it->second;
  };
}

// A file under the test's temp dir, removed at the end of the test.
class TempPath {
 public:
  explicit TempPath(const std::string& name)
      : path_(absl::StrCat(::testing::TempDir(), "/sflb_keys_file_test_", ::getpid(), "_", name)) {
    std::remove(path_.c_str());
  }
  ~TempPath() {
    ::chmod(path_.c_str(), 0600);
    ::rmdir(path_.c_str());
    std::remove(path_.c_str());
  }
  void Write(const std::string& content) const {
    std::ofstream out(path_, std::ios::binary | std::ios::trunc);
    out << content;
    ASSERT_TRUE(out.good());
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// ---------------------------------------------------------------------------------------------
// ParseKeysText

TEST(ParseKeysTextTest, KeysInOrderWithAccountsAndOrigins) {
  std::string text = absl::StrCat(kKeyA, "\n", kKeyB, " account=team-a\n", kKeyC, "\n");
  KeySet set = ParseKeysText(text, "keys.txt");
  EXPECT_EQ(set.source, "keys.txt");
  EXPECT_THAT(set.warnings, IsEmpty());
  ASSERT_THAT(set.keys, SizeIs(3));
  EXPECT_EQ(set.keys[0].secret, kKeyA);
  EXPECT_EQ(set.keys[0].account, "");
  EXPECT_EQ(set.keys[0].origin, "keys.txt:1");
  EXPECT_EQ(set.keys[1].secret, kKeyB);
  EXPECT_EQ(set.keys[1].account, "team-a");
  EXPECT_EQ(set.keys[1].origin, "keys.txt:2");
  EXPECT_EQ(set.keys[2].secret, kKeyC);
  EXPECT_EQ(set.keys[2].origin, "keys.txt:3");
}

TEST(ParseKeysTextTest, CommentsAndBlankLinesAreSkippedButCounted) {
  std::string text = absl::StrCat("# header comment\n\n   \n\t# indented comment\n", kKeyA, "\n\n",
                                  kKeyB);  // no final newline
  KeySet set = ParseKeysText(text, "k");
  EXPECT_THAT(set.warnings, IsEmpty());
  ASSERT_THAT(set.keys, SizeIs(2));
  EXPECT_EQ(set.keys[0].origin, "k:5");
  EXPECT_EQ(set.keys[1].origin, "k:7");
}

TEST(ParseKeysTextTest, TrimsWhitespaceAndAcceptsCrlf) {
  std::string text =
      absl::StrCat("  ", kKeyA, "  \r\n\t", kKeyB, "\taccount=x\t\r\n", kKeyC, "\r\n");
  KeySet set = ParseKeysText(text, "k");
  EXPECT_THAT(set.warnings, IsEmpty());
  EXPECT_THAT(Secrets(set), ElementsAre(kKeyA, kKeyB, kKeyC));
  EXPECT_EQ(set.keys[1].account, "x");
}

TEST(ParseKeysTextTest, EmptyTextGivesNothing) {
  KeySet set = ParseKeysText("", "k");
  EXPECT_THAT(set.keys, IsEmpty());
  EXPECT_THAT(set.warnings, IsEmpty());
  set = ParseKeysText("\n\n# only comments\n", "k");
  EXPECT_THAT(set.keys, IsEmpty());
  EXPECT_THAT(set.warnings, IsEmpty());
}

TEST(ParseKeysTextTest, WhitespaceInsideKeySkipsLineWithWarning) {
  // A key broken by a space: both halves must not become keys.
  std::string text = absl::StrCat(kKeyA, "\nsk-half1 half2\n", kKeyB, "\n");
  KeySet set = ParseKeysText(text, "keys.txt");
  EXPECT_THAT(Secrets(set), ElementsAre(kKeyA, kKeyB));
  ASSERT_THAT(set.warnings, SizeIs(1));
  EXPECT_THAT(set.warnings[0], StartsWith("keys.txt:2: "));
  EXPECT_THAT(set.warnings[0], HasSubstr("skipped"));
  ExpectNoSecretIn(set.warnings, {"sk-half1", "half2"});
}

TEST(ParseKeysTextTest, AttributeErrorsSkipTheLine) {
  struct Case {
    std::string line;
    std::string reason_part;
  };
  std::vector<Case> cases = {
      {absl::StrCat(kKeyA, " team=x"), "unknown attribute"},
      {absl::StrCat(kKeyA, " account="), "account="},
      {absl::StrCat(kKeyA, " account=", std::string(129, 'a')), "account="},
      {absl::StrCat(kKeyA, " account=bad/char"), "account="},
      {absl::StrCat(kKeyA, " account=a b"), "unexpected text"},
      {"sk-with=equals", "'='"},
      {"account=team-a", "'='"},
  };
  for (const Case& c : cases) {
    KeySet set = ParseKeysText(absl::StrCat("# first\n", c.line, "\n"), "f");
    EXPECT_THAT(set.keys, IsEmpty()) << c.reason_part;
    ASSERT_THAT(set.warnings, SizeIs(1)) << c.reason_part;
    EXPECT_THAT(set.warnings[0], StartsWith("f:2: ")) << c.reason_part;
    EXPECT_THAT(set.warnings[0], HasSubstr(c.reason_part));
    ExpectNoSecretIn(set.warnings, {kKeyA, "sk-with=equals", "sk-with"});
  }
}

TEST(ParseKeysTextTest, AccountOfMaxLengthAndAllowedCharactersIsAccepted) {
  std::string account = std::string(120, 'a') + "-_.:@9Z";
  ASSERT_EQ(account.size(), 127u);
  account += "b";
  KeySet set = ParseKeysText(absl::StrCat(kKeyA, " account=", account), "f");
  EXPECT_THAT(set.warnings, IsEmpty());
  ASSERT_THAT(set.keys, SizeIs(1));
  EXPECT_EQ(set.keys[0].account, account);
}

TEST(ParseKeysTextTest, ControlAndNonAsciiCharactersSkipTheLine) {
  std::string text = absl::StrCat("sk-ctrl\x01", "abc\n", "sk-caf\xC3\xA9xyz\n", kKeyA, "\n");
  KeySet set = ParseKeysText(text, "f");
  EXPECT_THAT(Secrets(set), ElementsAre(kKeyA));
  ASSERT_THAT(set.warnings, SizeIs(2));
  EXPECT_THAT(set.warnings[0], StartsWith("f:1: "));
  EXPECT_THAT(set.warnings[0], HasSubstr("control character"));
  EXPECT_THAT(set.warnings[1], StartsWith("f:2: "));
  EXPECT_THAT(set.warnings[1], HasSubstr("non-ASCII"));
}

TEST(ParseKeysTextTest, DuplicateKeyIsUsedOnceAndReportedWithoutTheSecret) {
  std::string text =
      absl::StrCat(kKeyA, " account=first\n", kKeyB, "\n", kKeyA, " account=second\n");
  KeySet set = ParseKeysText(text, "keys.txt");
  ASSERT_THAT(Secrets(set), ElementsAre(kKeyA, kKeyB));
  EXPECT_EQ(set.keys[0].account, "first") << "the first occurrence wins";
  EXPECT_EQ(set.keys[0].origin, "keys.txt:1");
  ASSERT_THAT(set.warnings, SizeIs(1));
  EXPECT_THAT(set.warnings[0], StartsWith("keys.txt:3: duplicate key"));
  ExpectNoSecretIn(set.warnings, {kKeyA, kKeyB});
}

TEST(ParseKeysTextTest, WarningsOfAMessyFileNeverContainAKey) {
  const std::vector<std::string> secrets = {kKeyA, kKeyB, kKeyC, "sk-zzzzzzzzzzzzzzzzzzzz9"};
  std::string text = absl::StrCat(kKeyA, "\n", kKeyA, "\n", kKeyB, " ", kKeyC, "\n", kKeyC,
                                  " account=\n", kKeyB, " foo=bar\n", secrets[3], "\x7f\n");
  KeySet set = ParseKeysText(text, "keys.txt");
  EXPECT_THAT(set.warnings, SizeIs(5));
  ExpectNoSecretIn(set.warnings, secrets);
}

// ---------------------------------------------------------------------------------------------
// ReadKeysFromEnv

TEST(ReadKeysFromEnvTest, ReadsUntilTheFirstMissingNumber) {
  KeySet set = ReadKeysFromEnv(FakeEnv({{"SILICONFLOW_API_KEY_1", kKeyA},
                                        {"SILICONFLOW_API_KEY_2", kKeyB},
                                        {"SILICONFLOW_API_KEY_4", kKeyC}}));
  EXPECT_EQ(set.source, "env:SILICONFLOW_API_KEY_N");
  EXPECT_THAT(set.warnings, IsEmpty());
  ASSERT_THAT(Secrets(set), ElementsAre(kKeyA, kKeyB));
  EXPECT_EQ(set.keys[0].origin, "env:SILICONFLOW_API_KEY_1");
  EXPECT_EQ(set.keys[1].origin, "env:SILICONFLOW_API_KEY_2");
}

TEST(ReadKeysFromEnvTest, NothingSetGivesNothing) {
  KeySet set = ReadKeysFromEnv(FakeEnv({{"SILICONFLOW_API_KEY_2", kKeyA}}));
  EXPECT_THAT(set.keys, IsEmpty());
  EXPECT_THAT(set.warnings, IsEmpty());
}

TEST(ReadKeysFromEnvTest, ValueIsParsedLikeALineIncludingAccount) {
  KeySet set = ReadKeysFromEnv(
      FakeEnv({{"SILICONFLOW_API_KEY_1", absl::StrCat("  ", kKeyA, " account=team-b \n")}}));
  EXPECT_THAT(set.warnings, IsEmpty());
  ASSERT_THAT(set.keys, SizeIs(1));
  EXPECT_EQ(set.keys[0].secret, kKeyA);
  EXPECT_EQ(set.keys[0].account, "team-b");
}

TEST(ReadKeysFromEnvTest, EmptyAndBadValuesWarnAndDoNotStopTheScan) {
  KeySet set = ReadKeysFromEnv(FakeEnv({{"SILICONFLOW_API_KEY_1", ""},
                                        {"SILICONFLOW_API_KEY_2", "sk-broken key"},
                                        {"SILICONFLOW_API_KEY_3", kKeyA}}));
  EXPECT_THAT(Secrets(set), ElementsAre(kKeyA));
  ASSERT_THAT(set.warnings, SizeIs(2));
  EXPECT_THAT(set.warnings[0], StartsWith("env:SILICONFLOW_API_KEY_1: "));
  EXPECT_THAT(set.warnings[0], HasSubstr("empty"));
  // The ":1" line number of the one-line parse is not shown for a variable.
  EXPECT_THAT(set.warnings[1], StartsWith("env:SILICONFLOW_API_KEY_2: "));
  ExpectNoSecretIn(set.warnings, {"sk-broken", kKeyA});
}

TEST(ReadKeysFromEnvTest, DuplicateAcrossVariablesIsUsedOnce) {
  KeySet set = ReadKeysFromEnv(FakeEnv({{"SILICONFLOW_API_KEY_1", kKeyA},
                                        {"SILICONFLOW_API_KEY_2", kKeyB},
                                        {"SILICONFLOW_API_KEY_3", kKeyA}}));
  EXPECT_THAT(Secrets(set), ElementsAre(kKeyA, kKeyB));
  ASSERT_THAT(set.warnings, SizeIs(1));
  EXPECT_THAT(set.warnings[0], StartsWith("env:SILICONFLOW_API_KEY_3: duplicate"));
  ExpectNoSecretIn(set.warnings, {kKeyA, kKeyB});
}

// Regression test: ReadKeysFromEnv strips the ":1" line number of a variable's
// one-line parse by checking the prefix "env:NAME:1" without the following ':', so a warning for
// line 10..19 of a multi-line value of SILICONFLOW_API_KEY_1 becomes
// "env:SILICONFLOW_API_KEY_10: ..." and names a different variable.
TEST(ReadKeysFromEnvTest, WarningForLaterLineOfMultiLineValueNamesTheRightVariable) {
  std::string value;
  for (int i = 0; i < 9; ++i) absl::StrAppend(&value, "sk-multiline-key-", i, "\n");
  value += "sk-broken key\n";  // line 10
  KeySet set = ReadKeysFromEnv(FakeEnv({{"SILICONFLOW_API_KEY_1", value}}));
  EXPECT_THAT(set.keys, SizeIs(9));
  ASSERT_THAT(set.warnings, SizeIs(1));
  EXPECT_THAT(set.warnings[0], StartsWith("env:SILICONFLOW_API_KEY_1"));
  EXPECT_THAT(set.warnings[0], Not(StartsWith("env:SILICONFLOW_API_KEY_10"))) << set.warnings[0];
}

// ---------------------------------------------------------------------------------------------
// LoadKeySource

TEST(LoadKeySourceTest, ExistingFileWinsOverEnvironment) {
  TempPath file("wins.txt");
  file.Write(absl::StrCat(kKeyA, "\n", kKeyB, " account=t\n"));
  absl::StatusOr<KeySet> set =
      LoadKeySource(file.path(), FakeEnv({{"SILICONFLOW_API_KEY_1", kKeyC}}));
  ASSERT_TRUE(set.ok()) << set.status().code();
  EXPECT_EQ(set->source, file.path());
  EXPECT_THAT(Secrets(*set), ElementsAre(kKeyA, kKeyB));
  EXPECT_EQ(set->keys[1].origin, absl::StrCat(file.path(), ":2"));
}

TEST(LoadKeySourceTest, MissingFileFallsBackToEnvironment) {
  TempPath file("missing.txt");
  absl::StatusOr<KeySet> set = LoadKeySource(
      file.path(), FakeEnv({{"SILICONFLOW_API_KEY_1", kKeyA}, {"SILICONFLOW_API_KEY_2", kKeyB}}));
  ASSERT_TRUE(set.ok()) << set.status().code();
  EXPECT_EQ(set->source, "env:SILICONFLOW_API_KEY_N");
  EXPECT_THAT(Secrets(*set), ElementsAre(kKeyA, kKeyB));
}

TEST(LoadKeySourceTest, NeitherFileNorEnvironmentIsNotFound) {
  TempPath file("nothing.txt");
  absl::StatusOr<KeySet> set = LoadKeySource(file.path(), FakeEnv({}));
  ASSERT_FALSE(set.ok());
  EXPECT_EQ(set.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(set.status().message()), HasSubstr(file.path()));
}

TEST(LoadKeySourceTest, FileWithoutUsableKeyIsFailedPreconditionListingWarnings) {
  TempPath file("bad.txt");
  file.Write("# only a comment\nsk-a b\n");
  // The file exists, so the environment's key must not be used instead.
  absl::StatusOr<KeySet> set =
      LoadKeySource(file.path(), FakeEnv({{"SILICONFLOW_API_KEY_1", kKeyA}}));
  ASSERT_FALSE(set.ok());
  EXPECT_EQ(set.status().code(), absl::StatusCode::kFailedPrecondition);
  std::string message(set.status().message());
  EXPECT_THAT(message, HasSubstr(file.path()));
  EXPECT_THAT(message, HasSubstr(absl::StrCat(file.path(), ":2:")));
  EXPECT_FALSE(absl::StrContains(message, kKeyA));
}

TEST(LoadKeySourceTest, EmptyFileIsFailedPrecondition) {
  TempPath file("empty.txt");
  file.Write("");
  absl::StatusOr<KeySet> set =
      LoadKeySource(file.path(), FakeEnv({{"SILICONFLOW_API_KEY_1", kKeyA}}));
  ASSERT_FALSE(set.ok());
  EXPECT_EQ(set.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(set.status().message()), HasSubstr(file.path()));
}

TEST(LoadKeySourceTest, EnvironmentWithOnlyBadValuesIsFailedPrecondition) {
  TempPath file("absent.txt");
  absl::StatusOr<KeySet> set =
      LoadKeySource(file.path(), FakeEnv({{"SILICONFLOW_API_KEY_1", "sk-x y"}}));
  ASSERT_FALSE(set.ok());
  EXPECT_EQ(set.status().code(), absl::StatusCode::kFailedPrecondition);
  std::string message(set.status().message());
  EXPECT_THAT(message, HasSubstr("env:SILICONFLOW_API_KEY_1"));
  EXPECT_FALSE(absl::StrContains(message, "sk-x"));
}

// Loads `path` as a user who may not read it. As root (where mode 000 does not stop reads) the
// load runs in a forked child that drops to nobody; the child reports the status code.
absl::StatusCode LoadAsUnprivileged(const std::string& path, std::string* message) {
  if (::geteuid() != 0) {
    absl::StatusOr<KeySet> set = LoadKeySource(path, FakeEnv({{"SILICONFLOW_API_KEY_1", kKeyB}}));
    *message = std::string(set.status().message());
    return set.status().code();
  }
  pid_t pid = ::fork();
  if (pid == 0) {
    if (::setgid(65534) != 0 || ::setuid(65534) != 0) ::_exit(100);
    absl::StatusOr<KeySet> set = LoadKeySource(path, FakeEnv({{"SILICONFLOW_API_KEY_1", kKeyB}}));
    bool names_file = absl::StrContains(set.status().message(), path);
    ::_exit(static_cast<int>(set.status().code()) + (names_file ? 0 : 50));
  }
  int status = 0;
  if (pid < 0 || ::waitpid(pid, &status, 0) != pid || !WIFEXITED(status)) {
    *message = "fork/wait failed";
    return absl::StatusCode::kUnknown;
  }
  int code = WEXITSTATUS(status);
  if (code == 100) {
    *message = "could not drop privileges";
    return absl::StatusCode::kUnknown;
  }
  *message = code >= 50 ? "(message does not name the file)" : path;
  return static_cast<absl::StatusCode>(code % 50);
}

TEST(LoadKeySourceTest, UnreadableFileIsPermissionDenied) {
  TempPath file("unreadable.txt");
  file.Write(absl::StrCat(kKeyA, "\n"));
  ASSERT_EQ(::chmod(file.path().c_str(), 0), 0);
  std::string message;
  absl::StatusCode code = LoadAsUnprivileged(file.path(), &message);
  EXPECT_EQ(code, absl::StatusCode::kPermissionDenied) << message;
  EXPECT_THAT(message, HasSubstr(file.path()));
}

// Regression test: a keys path that is a directory opens fine with std::ifstream on
// Linux, reading it fails with EISDIR, but that failure is not detected (only badbit is checked,
// and `content << in.rdbuf()` sets failbit on `content`, not on `in`). The result is
// FAILED_PRECONDITION "...: no usable key (it holds no keys)" instead of the read error the
// header promises (INTERNAL naming the file).
TEST(LoadKeySourceTest, DirectoryIsAReadErrorNotAnEmptyFile) {
  TempPath dir("a_directory");
  ASSERT_EQ(::mkdir(dir.path().c_str(), 0700), 0);
  absl::StatusOr<KeySet> set = LoadKeySource(dir.path(), FakeEnv({}));
  ASSERT_FALSE(set.ok());
  EXPECT_THAT(std::string(set.status().message()), HasSubstr(dir.path()));
  EXPECT_EQ(set.status().code(), absl::StatusCode::kInternal) << set.status().message();
}

}  // namespace
}  // namespace sflb
