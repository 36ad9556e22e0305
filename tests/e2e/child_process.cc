#include "tests/e2e/child_process.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"

extern char** environ;

namespace sflb::e2e {
namespace {

std::vector<std::string> InheritedEnv() {
  // Sanitizer settings and PATH pass through so child processes behave like the test.
  std::vector<std::string> out;
  for (const char* name : {"PATH", "ASAN_OPTIONS", "UBSAN_OPTIONS", "TSAN_OPTIONS",
                           "LSAN_OPTIONS", "HOME"}) {
    if (const char* v = std::getenv(name)) out.push_back(absl::StrCat(name, "=", v));
  }
  return out;
}

pid_t Spawn(const std::string& binary, const std::vector<std::string>& args,
            const std::map<std::string, std::string>& env, int out_fd, int err_fd) {
  std::vector<std::string> argv_s = {binary};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<std::string> env_s = InheritedEnv();
  for (const auto& [k, v] : env) env_s.push_back(absl::StrCat(k, "=", v));
  std::vector<char*> argv, envp;
  for (auto& s : argv_s) argv.push_back(s.data());
  argv.push_back(nullptr);
  for (auto& s : env_s) envp.push_back(s.data());
  envp.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&actions, out_fd, 1);
  posix_spawn_file_actions_adddup2(&actions, err_fd, 2);
  // Children start with default signal dispositions and an empty mask.
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t empty, all;
  sigemptyset(&empty);
  sigfillset(&all);
  posix_spawnattr_setsigmask(&attr, &empty);
  posix_spawnattr_setsigdefault(&attr, &all);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  pid_t pid = -1;
  int rc = posix_spawn(&pid, binary.c_str(), &actions, &attr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  return rc == 0 ? pid : -1;
}

int DecodeStatus(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

}  // namespace

ChildProcess::~ChildProcess() {
  if (pid_ > 0 && exit_code_ < 0) {
    ::kill(pid_, SIGKILL);
    int status;
    ::waitpid(pid_, &status, 0);
  }
}

absl::Status ChildProcess::Start(const std::string& binary, const std::vector<std::string>& args,
                                 const std::map<std::string, std::string>& env,
                                 const std::string& log_path) {
  log_path_ = log_path;
  int fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) return absl::InternalError(absl::StrCat("open ", log_path, ": ", strerror(errno)));
  pid_ = Spawn(binary, args, env, fd, fd);
  ::close(fd);
  if (pid_ <= 0) return absl::InternalError(absl::StrCat("cannot start ", binary));
  exit_code_ = -1;
  return absl::OkStatus();
}

bool ChildProcess::running() {
  if (pid_ <= 0 || exit_code_ >= 0) return false;
  int status;
  pid_t r = ::waitpid(pid_, &status, WNOHANG);
  if (r == pid_) {
    exit_code_ = DecodeStatus(status);
    return false;
  }
  return true;
}

absl::StatusOr<nlohmann::json> ChildProcess::WaitForLog(
    const std::function<bool(const nlohmann::json&)>& predicate, absl::Duration timeout) {
  absl::Time deadline = absl::Now() + timeout;
  for (;;) {
    for (const nlohmann::json& line : LogLines()) {
      if (predicate(line)) return line;
    }
    if (!running()) {
      return absl::FailedPreconditionError(
          absl::StrCat("process exited with ", exit_code_, "; log:\n", ReadLog()));
    }
    if (absl::Now() > deadline) {
      return absl::DeadlineExceededError(absl::StrCat("log line not seen; log:\n", ReadLog()));
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
}

absl::StatusOr<int> ChildProcess::WaitForListening(absl::Duration timeout) {
  absl::StatusOr<nlohmann::json> line = WaitForLog(
      [](const nlohmann::json& j) {
        return j.value("event", "") == "listening" && j.contains("port");
      },
      timeout);
  if (!line.ok()) return line.status();
  return (*line)["port"].get<int>();
}

void ChildProcess::Signal(int sig) {
  if (running()) ::kill(pid_, sig);
}

absl::StatusOr<int> ChildProcess::Wait(absl::Duration timeout) {
  absl::Time deadline = absl::Now() + timeout;
  while (running()) {
    if (absl::Now() > deadline) return absl::DeadlineExceededError("process still running");
    absl::SleepFor(absl::Milliseconds(10));
  }
  return exit_code_;
}

int ChildProcess::Stop(absl::Duration grace) {
  if (!running()) return exit_code_;
  ::kill(pid_, SIGTERM);
  absl::StatusOr<int> code = Wait(grace);
  if (code.ok()) return *code;
  ::kill(pid_, SIGKILL);
  code = Wait(absl::Seconds(10));
  return code.ok() ? *code : -1;
}

std::string ChildProcess::ReadLog() const { return ReadFile(log_path_); }

std::vector<nlohmann::json> ChildProcess::LogLines() const {
  std::vector<nlohmann::json> out;
  for (absl::string_view line : absl::StrSplit(ReadLog(), '\n')) {
    if (line.empty() || line.front() != '{') continue;
    nlohmann::json j = nlohmann::json::parse(line.begin(), line.end(), nullptr, false);
    if (j.is_object()) out.push_back(std::move(j));
  }
  return out;
}

CommandResult RunCommand(const std::string& binary, const std::vector<std::string>& args,
                         const std::map<std::string, std::string>& env, absl::Duration timeout) {
  CommandResult result;
  std::string dir = MakeTempDir("cmd");
  std::string out_path = dir + "/out", err_path = dir + "/err";
  int out_fd = ::open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  int err_fd = ::open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  pid_t pid = Spawn(binary, args, env, out_fd, err_fd);
  ::close(out_fd);
  ::close(err_fd);
  if (pid <= 0) {
    result.err = "cannot start " + binary;
    return result;
  }
  absl::Time deadline = absl::Now() + timeout;
  int status = 0;
  for (;;) {
    pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) {
      result.exit_code = DecodeStatus(status);
      break;
    }
    if (absl::Now() > deadline) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      result.exit_code = -1;
      break;
    }
    absl::SleepFor(absl::Milliseconds(5));
  }
  result.out = ReadFile(out_path);
  result.err = ReadFile(err_path);
  return result;
}

std::string MakeTempDir(const std::string& prefix) {
  const char* base = std::getenv("TEST_TMPDIR");
  std::string templ = absl::StrCat(base ? base : "/tmp", "/sflb-", prefix, "-XXXXXX");
  std::vector<char> buf(templ.begin(), templ.end());
  buf.push_back('\0');
  char* dir = ::mkdtemp(buf.data());
  return dir ? std::string(dir) : std::string("/tmp");
}

void WriteFileAtomically(const std::string& path, const std::string& content) {
  std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << content;
  }
  std::rename(tmp.c_str(), path.c_str());
}

}  // namespace sflb::e2e
