#include "common/log.h"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace sflb {
namespace {

std::string Quoted(absl::string_view value) {
  std::string out;
  AppendJsonString(value, &out);
  return out;
}

TEST(AppendJsonStringTest, PlainTextIsQuotedAsIs) {
  EXPECT_EQ(Quoted("/v1/chat/completions"), "\"/v1/chat/completions\"");
  EXPECT_EQ(Quoted(""), "\"\"");
}

TEST(AppendJsonStringTest, ClientControlledTextCannotBreakTheLine) {
  std::string hostile = "/x\"}\n{\"event\":\"forged\\\x01\xff";
  std::string quoted = Quoted(hostile);
  EXPECT_EQ(quoted.find('\n'), std::string::npos);
  nlohmann::json parsed = nlohmann::json::parse("{\"v\":" + quoted + "}", nullptr, false);
  ASSERT_TRUE(parsed.is_object()) << quoted;
  std::string back = parsed["v"].get<std::string>();
  EXPECT_EQ(back.substr(0, 8), "/x\"}\n{\"e");
}

// Points the process's stderr at a temporary file for the test's duration.
class BufferedLogTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = absl::StrCat(::testing::TempDir(), "/sflb-log-", ::getpid(), "-",
                         ::testing::UnitTest::GetInstance()->current_test_info()->name());
    int fd = ::open(path_.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_APPEND, 0600);
    ASSERT_GE(fd, 0);
    saved_stderr_ = ::dup(STDERR_FILENO);
    ::dup2(fd, STDERR_FILENO);
    ::close(fd);
  }
  void TearDown() override {
    StopLogBuffering();
    ::dup2(saved_stderr_, STDERR_FILENO);
    ::close(saved_stderr_);
    std::remove(path_.c_str());
  }
  std::string Written() const {
    std::ifstream in(path_);
    std::stringstream all;
    all << in.rdbuf();
    return all.str();
  }
  // Waits up to 10 s for `bytes` to have been written.
  bool WaitForBytes(size_t bytes) const {
    absl::Time deadline = absl::Now() + absl::Seconds(10);
    while (Written().size() < bytes) {
      if (absl::Now() > deadline) return false;
      absl::SleepFor(absl::Milliseconds(5));
    }
    return true;
  }

  std::string path_;
  int saved_stderr_ = -1;
};

TEST_F(BufferedLogTest, WithoutBufferingEachLineIsWrittenAtOnce) {
  WriteBufferedLogLine("{\"n\":1}\n");
  EXPECT_EQ(Written(), "{\"n\":1}\n");
}

TEST_F(BufferedLogTest, LinesWaitForTheIntervalAndStopWritesThem) {
  StartLogBuffering(absl::Hours(1));
  WriteBufferedLogLine("{\"n\":1}\n");
  WriteBufferedLogLine("{\"n\":2}\n");
  EXPECT_EQ(Written(), "") << "a line was written before its batch";
  StopLogBuffering();
  EXPECT_EQ(Written(), "{\"n\":1}\n{\"n\":2}\n");
  WriteBufferedLogLine("{\"n\":3}\n");  // buffering is off again
  EXPECT_EQ(Written(), "{\"n\":1}\n{\"n\":2}\n{\"n\":3}\n");
}

TEST_F(BufferedLogTest, LinesWrittenWhileStoppingStayInOrder) {
  StartLogBuffering(absl::Hours(1));
  std::atomic<bool> stopped{false};
  std::thread writer([&stopped] {
    // Goes on until some lines were certainly written after buffering ended.
    for (int i = 0, after = 0; after < 100; ++i) {
      if (stopped.load()) ++after;
      WriteBufferedLogLine(absl::StrCat("{\"i\":", i, "}\n"));
    }
  });
  absl::SleepFor(absl::Milliseconds(20));
  StopLogBuffering();
  stopped.store(true);
  writer.join();
  int next = 0;
  for (absl::string_view text : absl::StrSplit(Written(), '\n', absl::SkipEmpty())) {
    nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
    ASSERT_TRUE(j.is_object()) << "torn line: " << text;
    ASSERT_EQ(j["i"].get<int>(), next++) << "a line overtook the pending batch";
  }
  EXPECT_GE(next, 100);
}

TEST_F(BufferedLogTest, TheIntervalFlushesWithoutStop) {
  StartLogBuffering(absl::Milliseconds(20));
  WriteBufferedLogLine("{\"n\":1}\n");
  EXPECT_TRUE(WaitForBytes(8)) << "the pending line was never written";
  EXPECT_EQ(Written(), "{\"n\":1}\n");
}

TEST_F(BufferedLogTest, A64KiBBacklogIsWrittenBeforeTheInterval) {
  StartLogBuffering(absl::Hours(1));
  std::string line = absl::StrCat("{\"pad\":\"", std::string(1000, 'x'), "\"}\n");
  // The 65th line takes the backlog past 64 KiB, and nothing is added after it.
  ASSERT_GE(65 * line.size(), 64u * 1024);
  for (int i = 0; i < 65; ++i) WriteBufferedLogLine(line);
  EXPECT_TRUE(WaitForBytes(65 * line.size())) << "64 KiB stayed pending for an hour-long interval";
}

TEST_F(BufferedLogTest, LinesFromManyThreadsComeOutWholeAndInOrderPerThread) {
  StartLogBuffering(absl::Milliseconds(1));
  constexpr int kThreads = 4;
  constexpr int kLines = 5000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([t] {
      for (int i = 0; i < kLines; ++i) {
        WriteBufferedLogLine(absl::StrCat("{\"t\":", t, ",\"i\":", i, "}\n"));
      }
    });
  }
  for (auto& thread : threads) thread.join();
  StopLogBuffering();
  std::vector<int> next(kThreads, 0);
  int lines = 0;
  for (absl::string_view text : absl::StrSplit(Written(), '\n', absl::SkipEmpty())) {
    nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
    ASSERT_TRUE(j.is_object()) << "torn line: " << text;
    int t = j["t"].get<int>();
    EXPECT_EQ(j["i"].get<int>(), next[t]++) << "thread " << t << " out of order";
    ++lines;
  }
  EXPECT_EQ(lines, kThreads * kLines);
}

}  // namespace
}  // namespace sflb
