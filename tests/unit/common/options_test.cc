// Tests of common/options: OptionParser (environment + flags) and ParseDurationSetting.
#include "common/options.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sflb {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

const char kSecret[] = "sk-topsecretvalue-0123456789abcdef";
const char kOtherSecret[] = "admin-secret-fedcba9876543210";

EnvLookup FakeEnv(std::map<std::string, std::string> vars) {
  return [vars = std::move(vars)](const std::string& name) -> absl::optional<std::string> {
    auto it = vars.find(name);
    if (it == vars.end()) return absl::nullopt;
    return it->second;
  };
}

// Runs Parse with argv = {"prog", args...}.
absl::Status ParseArgs(OptionParser& parser, std::vector<std::string> args,
                       const EnvLookup& env = FakeEnv({})) {
  std::vector<const char*> argv = {"prog"};
  for (const std::string& a : args) argv.push_back(a.c_str());
  return parser.Parse(static_cast<int>(argv.size()), argv.data(), env);
}

// A parser bound to one variable of each kind.
struct Settings {
  std::string url = "https://api.example.com";
  std::string api_key;
  int64_t port = 8080;
  absl::Duration timeout = absl::Seconds(30);
  bool verbose = false;

  OptionParser MakeParser() {
    OptionParser p("sflb-test", "A test program.");
    p.AddString("url", "SFLB_URL", &url, "Upstream URL.");
    p.AddSecret("api-key", "SFLB_API_KEY", &api_key, "Client API key.");
    p.AddInt("port", "SFLB_PORT", &port, 1, 65535, "Port.");
    p.AddDuration("timeout", "SFLB_TIMEOUT", &timeout, "Timeout.");
    p.AddBool("verbose", "SFLB_VERBOSE", &verbose, "Verbose logs.");
    return p;
  }
};

// A file in the test temp dir, removed at the end.
class TempFile {
 public:
  explicit TempFile(const std::string& name)
      : path_(absl::StrCat(::testing::TempDir(), "/sflb_options_test_", ::getpid(), "_", name)) {}
  ~TempFile() {
    ::rmdir(path_.c_str());
    std::remove(path_.c_str());
  }
  void Write(const std::string& content) const {
    std::ofstream out(path_, std::ios::binary | std::ios::trunc);
    out << content;
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

void ExpectInvalid(const absl::Status& status, const std::string& must_mention) {
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr(must_mention));
}

// ---------------------------------------------------------------------------------------------
// Sources and precedence

TEST(OptionParserTest, DefaultsStayWhenNothingIsSet) {
  Settings s;
  OptionParser p = s.MakeParser();
  ASSERT_TRUE(ParseArgs(p, {}).ok());
  EXPECT_EQ(s.url, "https://api.example.com");
  EXPECT_EQ(s.api_key, "");
  EXPECT_EQ(s.port, 8080);
  EXPECT_EQ(s.timeout, absl::Seconds(30));
  EXPECT_FALSE(s.verbose);
  EXPECT_FALSE(p.help_requested());
}

TEST(OptionParserTest, EnvironmentSetsEveryKind) {
  Settings s;
  OptionParser p = s.MakeParser();
  ASSERT_TRUE(ParseArgs(p, {},
                        FakeEnv({{"SFLB_URL", "http://u"},
                                 {"SFLB_API_KEY", kSecret},
                                 {"SFLB_PORT", "9000"},
                                 {"SFLB_TIMEOUT", "2m"},
                                 {"SFLB_VERBOSE", "yes"}}))
                  .ok());
  EXPECT_EQ(s.url, "http://u");
  EXPECT_EQ(s.api_key, kSecret);
  EXPECT_EQ(s.port, 9000);
  EXPECT_EQ(s.timeout, absl::Minutes(2));
  EXPECT_TRUE(s.verbose);
}

TEST(OptionParserTest, FlagWinsOverEnvironment) {
  Settings s;
  OptionParser p = s.MakeParser();
  ASSERT_TRUE(ParseArgs(p,
                        {"--port", "7000", "--url=http://flag", "--timeout=5s", "--verbose=false"},
                        FakeEnv({{"SFLB_URL", "http://env"},
                                 {"SFLB_PORT", "9000"},
                                 {"SFLB_TIMEOUT", "2m"},
                                 {"SFLB_VERBOSE", "1"}}))
                  .ok());
  EXPECT_EQ(s.url, "http://flag");
  EXPECT_EQ(s.port, 7000);
  EXPECT_EQ(s.timeout, absl::Seconds(5));
  EXPECT_FALSE(s.verbose);
}

TEST(OptionParserTest, ValueAfterEqualsKeepsFurtherEqualsSigns) {
  Settings s;
  OptionParser p = s.MakeParser();
  ASSERT_TRUE(ParseArgs(p, {"--url=http://h/p?a=b&c=d"}).ok());
  EXPECT_EQ(s.url, "http://h/p?a=b&c=d");
}

TEST(OptionParserTest, LastFlagWins) {
  Settings s;
  OptionParser p = s.MakeParser();
  ASSERT_TRUE(ParseArgs(p, {"--port=1", "--port", "2"}).ok());
  EXPECT_EQ(s.port, 2);
}

// ---------------------------------------------------------------------------------------------
// Integers

TEST(OptionParserTest, IntRangeIsInclusive) {
  for (const char* ok : {"1", "65535", " 42 "}) {
    Settings s;
    OptionParser p = s.MakeParser();
    EXPECT_TRUE(ParseArgs(p, {"--port", ok}).ok()) << ok;
  }
  for (const char* bad : {"0", "65536", "-1", "12x", "", "1.5", "99999999999999999999999"}) {
    Settings s;
    OptionParser p = s.MakeParser();
    absl::Status status = ParseArgs(p, {"--port", bad});
    ExpectInvalid(status, "--port");
    EXPECT_EQ(s.port, 8080) << "a rejected value must not be stored: " << bad;
  }
}

TEST(OptionParserTest, BadIntErrorNamesFlagRangeAndValue) {
  Settings s;
  OptionParser p = s.MakeParser();
  absl::Status status = ParseArgs(p, {"--port=70000"});
  ExpectInvalid(status, "--port");
  EXPECT_THAT(std::string(status.message()), HasSubstr("65535"));
  EXPECT_THAT(std::string(status.message()), HasSubstr("70000"));
}

TEST(OptionParserTest, BadEnvironmentValueNamesTheVariable) {
  Settings s;
  OptionParser p = s.MakeParser();
  absl::Status status = ParseArgs(p, {}, FakeEnv({{"SFLB_PORT", "eighty"}}));
  ExpectInvalid(status, "SFLB_PORT");
  EXPECT_THAT(std::string(status.message()), HasSubstr("eighty"));
}

// ---------------------------------------------------------------------------------------------
// Durations

TEST(ParseDurationSettingTest, AcceptsAbslDurationsAndPlainSeconds) {
  EXPECT_EQ(ParseDurationSetting("30s"), absl::Seconds(30));
  EXPECT_EQ(ParseDurationSetting("5m"), absl::Minutes(5));
  EXPECT_EQ(ParseDurationSetting("250ms"), absl::Milliseconds(250));
  EXPECT_EQ(ParseDurationSetting("1m30s"), absl::Seconds(90));
  EXPECT_EQ(ParseDurationSetting("1h"), absl::Hours(1));
  EXPECT_EQ(ParseDurationSetting("45"), absl::Seconds(45));
  EXPECT_EQ(ParseDurationSetting("0.5"), absl::Milliseconds(500));
  EXPECT_EQ(ParseDurationSetting("0"), absl::ZeroDuration());
  EXPECT_EQ(ParseDurationSetting(" 10s "), absl::Seconds(10));
}

TEST(ParseDurationSettingTest, RejectsNegativeAndGarbage) {
  for (const char* bad : {"-1", "-5s", "", "abc", "10 s", "5x", "s"}) {
    EXPECT_FALSE(ParseDurationSetting(bad).has_value()) << "'" << bad << "'";
  }
}

// Regression test: the absl-syntax branch deliberately rejects an infinite duration
// ("inf"), but the plain-number branch lets it in: absl::SimpleAtod accepts "inf", "infinity",
// "nan" and "1e400" (overflow), and absl::Seconds() of those is InfiniteDuration (NaN too), so
// e.g. SFLB_..._TIMEOUT=nan silently becomes an infinite timeout.
TEST(ParseDurationSettingTest, RejectsInfinityAndNan) {
  for (const char* bad : {"inf", "infinity", "nan", "1e400"}) {
    absl::optional<absl::Duration> d = ParseDurationSetting(bad);
    EXPECT_FALSE(d.has_value()) << "'" << bad << "' parsed as "
                                << (d.has_value() ? absl::FormatDuration(*d) : "");
  }
}

TEST(OptionParserTest, BadDurationNamesFlagAndValue) {
  Settings s;
  OptionParser p = s.MakeParser();
  absl::Status status = ParseArgs(p, {"--timeout", "soon"});
  ExpectInvalid(status, "--timeout");
  EXPECT_THAT(std::string(status.message()), HasSubstr("soon"));
  EXPECT_EQ(s.timeout, absl::Seconds(30));
}

// ---------------------------------------------------------------------------------------------
// Booleans

TEST(OptionParserTest, BoolSpellings) {
  for (const char* t : {"1", "true", "TRUE", "yes", "On", " on "}) {
    Settings s;
    OptionParser p = s.MakeParser();
    ASSERT_TRUE(ParseArgs(p, {absl::StrCat("--verbose=", t)}).ok()) << t;
    EXPECT_TRUE(s.verbose) << t;
  }
  for (const char* f : {"0", "false", "False", "no", "OFF"}) {
    Settings s;
    s.verbose = true;
    OptionParser p = s.MakeParser();
    ASSERT_TRUE(ParseArgs(p, {}, FakeEnv({{"SFLB_VERBOSE", f}})).ok()) << f;
    EXPECT_FALSE(s.verbose) << f;
  }
}

TEST(OptionParserTest, BareBoolFlagMeansTrueAndDoesNotEatTheNextArgument) {
  Settings s;
  OptionParser p = s.MakeParser();
  ASSERT_TRUE(ParseArgs(p, {"--verbose", "--port", "1234"}).ok());
  EXPECT_TRUE(s.verbose);
  EXPECT_EQ(s.port, 1234);
}

TEST(OptionParserTest, BadBoolIsRejected) {
  Settings s;
  OptionParser p = s.MakeParser();
  absl::Status status = ParseArgs(p, {"--verbose=maybe"});
  ExpectInvalid(status, "--verbose");
  EXPECT_THAT(std::string(status.message()), HasSubstr("maybe"));
}

// ---------------------------------------------------------------------------------------------
// Unknown flags, missing values, help

TEST(OptionParserTest, UnknownFlagIsRejectedByName) {
  Settings s;
  OptionParser p = s.MakeParser();
  ExpectInvalid(ParseArgs(p, {"--colour=blue"}), "--colour");
}

TEST(OptionParserTest, PositionalArgumentAndSingleDashAreRejected) {
  {
    Settings s;
    OptionParser p = s.MakeParser();
    ExpectInvalid(ParseArgs(p, {"stray"}), "stray");
  }
  {
    Settings s;
    OptionParser p = s.MakeParser();
    ExpectInvalid(ParseArgs(p, {"-port", "1"}), "-port");
  }
}

TEST(OptionParserTest, FlagWithoutValueAtTheEndIsRejected) {
  Settings s;
  OptionParser p = s.MakeParser();
  ExpectInvalid(ParseArgs(p, {"--port"}), "--port");
}

TEST(OptionParserTest, HelpIsRecognisedInBothForms) {
  for (const char* h : {"--help", "-h"}) {
    Settings s;
    OptionParser p = s.MakeParser();
    ASSERT_TRUE(ParseArgs(p, {"--port=99", h}).ok()) << h;
    EXPECT_TRUE(p.help_requested()) << h;
    EXPECT_EQ(s.port, 99);
  }
}

TEST(OptionParserTest, UsageListsEveryFlagEnvVarAndDefault) {
  Settings s;
  OptionParser p = s.MakeParser();
  std::string usage = p.Usage();
  EXPECT_THAT(usage, HasSubstr("sflb-test"));
  EXPECT_THAT(usage, HasSubstr("A test program."));
  for (const char* part :
       {"--url", "SFLB_URL", "https://api.example.com", "--api-key-file PATH", "SFLB_API_KEY",
        "--port", "SFLB_PORT", "8080", "--timeout", "SFLB_TIMEOUT", "30s", "--verbose",
        "SFLB_VERBOSE", "false", "--help", "Upstream URL.", "Client API key."}) {
    EXPECT_THAT(usage, HasSubstr(part));
  }
}

// ---------------------------------------------------------------------------------------------
// Secrets

TEST(OptionParserTest, SecretOnTheCommandLineIsRejectedWithoutEchoingIt) {
  for (const std::vector<std::string>& args :
       {std::vector<std::string>{"--api-key", kSecret},
        std::vector<std::string>{absl::StrCat("--api-key=", kSecret)}}) {
    Settings s;
    OptionParser p = s.MakeParser();
    absl::Status status = ParseArgs(p, args);
    ExpectInvalid(status, "--api-key");
    EXPECT_THAT(std::string(status.message()), HasSubstr("SFLB_API_KEY"));
    EXPECT_FALSE(absl::StrContains(status.message(), kSecret)) << "error echoes the secret";
    EXPECT_EQ(s.api_key, "") << "the secret must not be taken from argv";
  }
}

TEST(OptionParserTest, SecretFromFileTrimsTrailingNewlines) {
  TempFile file("secret.txt");
  file.Write(absl::StrCat(kSecret, "\r\n\n"));
  for (const std::vector<std::string>& args :
       {std::vector<std::string>{"--api-key-file", file.path()},
        std::vector<std::string>{absl::StrCat("--api-key-file=", file.path())}}) {
    Settings s;
    OptionParser p = s.MakeParser();
    ASSERT_TRUE(ParseArgs(p, args, FakeEnv({{"SFLB_API_KEY", kOtherSecret}})).ok());
    EXPECT_TRUE(s.api_key == kSecret) << "file value (not printed) must win over the variable";
  }
}

TEST(OptionParserTest, SecretFileThatCannotBeReadIsAnError) {
  TempFile file("does_not_exist.txt");
  Settings s;
  OptionParser p = s.MakeParser();
  absl::Status status = ParseArgs(p, {"--api-key-file", file.path()});
  ExpectInvalid(status, "--api-key-file");
  EXPECT_THAT(std::string(status.message()), HasSubstr(file.path()));
}

// Regression test: std::ifstream opens a directory without error on Linux and the
// read then fails with EISDIR unnoticed, so `--api-key-file /some/dir` silently sets the secret
// to "" instead of failing with "cannot read".
TEST(OptionParserTest, SecretFileThatIsADirectoryIsAnError) {
  TempFile dir("secret_dir");
  ASSERT_EQ(::mkdir(dir.path().c_str(), 0700), 0);
  Settings s;
  OptionParser p = s.MakeParser();
  absl::Status status = ParseArgs(p, {"--api-key-file", dir.path()});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
}

TEST(OptionParserTest, SecretFileFlagNeedsAValue) {
  Settings s;
  OptionParser p = s.MakeParser();
  ExpectInvalid(ParseArgs(p, {"--api-key-file"}), "--api-key-file");
}

TEST(OptionParserTest, UsageNeverShowsSecretValues) {
  Settings s;
  s.api_key = kOtherSecret;  // a compiled-in default must not be shown either
  OptionParser p = s.MakeParser();
  ASSERT_TRUE(ParseArgs(p, {}, FakeEnv({{"SFLB_API_KEY", kSecret}})).ok());
  ASSERT_TRUE(s.api_key == kSecret);
  std::string usage = p.Usage();
  EXPECT_FALSE(absl::StrContains(usage, kSecret)) << "Usage shows the secret";
  EXPECT_FALSE(absl::StrContains(usage, kOtherSecret)) << "Usage shows the secret default";
  EXPECT_THAT(usage, HasSubstr("(secret)"));
  EXPECT_THAT(usage, Not(HasSubstr("--api-key /")));  // only the -file form is offered
}

TEST(ProcessEnvTest, ReadsTheRealEnvironment) {
  ASSERT_EQ(::setenv("SFLB_OPTIONS_TEST_VAR", "v1", 1), 0);
  EnvLookup env = ProcessEnv();
  EXPECT_EQ(env("SFLB_OPTIONS_TEST_VAR"), absl::optional<std::string>("v1"));
  ::unsetenv("SFLB_OPTIONS_TEST_VAR");
  EXPECT_FALSE(env("SFLB_OPTIONS_TEST_VAR").has_value());
}

}  // namespace
}  // namespace sflb
