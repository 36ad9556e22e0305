#include "ctl/ctl.h"

#include <httplib.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdint>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/types/optional.h"
#include "common/grpc_util.h"
#include "common/time_format.h"
#include "common/version.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/struct.pb.h"
#include "google/protobuf/util/json_util.h"
#include "google/protobuf/wire_format_lite.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "nlohmann/json.hpp"
#include "sflb/v1/admin_service.grpc.pb.h"

namespace sflb {

// ---------------------------------------------------------------------------------------------
// Formatting helpers (declared in ctl.h).

namespace {

// Code points, not bytes: key masks contain "…" (3 bytes, one column). Good enough for the
// ASCII-plus-punctuation text sflbctl prints; East Asian wide characters would count as one.
size_t DisplayWidth(absl::string_view text) {
  size_t width = 0;
  for (char c : text) {
    if ((static_cast<unsigned char>(c) & 0xC0) != 0x80) ++width;
  }
  return width;
}

// One unit, for "3s ago"-style ages: precise enough to read at a glance.
std::string CoarseDuration(absl::Duration d) {
  int64_t s = absl::ToInt64Seconds(d);
  if (s < 60) return absl::StrCat(s, "s");
  if (s < 3600) return absl::StrCat(s / 60, "m");
  if (s < 48 * 3600) return absl::StrCat(s / 3600, "h");
  return absl::StrCat(s / 86400, "d");
}

}  // namespace

std::string FormatTimeAgo(absl::Time when, absl::Time now) {
  if (when == absl::InfinitePast()) return "never";
  absl::Duration age = now - when;
  if (age < absl::ZeroDuration()) {
    // Clocks of the controlplane and this machine may disagree by a little.
    if (-age < absl::Seconds(1)) return "just now";
    return absl::StrCat("in ", CoarseDuration(-age));
  }
  if (age < absl::Seconds(1)) return "just now";
  return absl::StrCat(CoarseDuration(age), " ago");
}

std::string FormatShortDuration(absl::Duration d) {
  int64_t s = std::max<int64_t>(0, absl::ToInt64Seconds(d));
  if (s < 60) return absl::StrCat(s, "s");
  if (s < 3600) return absl::StrFormat("%dm%02ds", s / 60, s % 60);
  if (s < 86400) return absl::StrFormat("%dh%02dm", s / 3600, s % 3600 / 60);
  return absl::StrFormat("%dd%02dh", s / 86400, s % 86400 / 3600);
}

absl::optional<absl::Time> ParseSinceTime(absl::string_view text, absl::Time now) {
  text = absl::StripAsciiWhitespace(text);
  if (text.empty()) return absl::nullopt;
  // A duration ago: "1h", "30m", "90s", "1h30m" (a bare number is seconds), or whole days "2d".
  if (absl::optional<absl::Duration> ago = ParseDurationSetting(text)) return now - *ago;
  if (absl::string_view days = text; absl::ConsumeSuffix(&days, "d")) {
    int n = 0;
    if (absl::SimpleAtoi(days, &n) && n >= 0 && n <= 36500) return now - absl::Hours(24) * n;
  }
  // A point in time. RFC 3339 allows a space for the 'T'; without an offset it is UTC.
  std::string time(text);
  if (time.size() > 10 && time[10] == ' ') time[10] = 'T';
  absl::Time t;
  std::string error;
  for (const char* format : {absl::RFC3339_full, "%Y-%m-%d%ET%H:%M:%E*S", "%Y-%m-%d"}) {
    if (absl::ParseTime(format, time, absl::UTCTimeZone(), &t, &error)) return t;
  }
  return absl::nullopt;
}

std::string WrapText(absl::string_view text, size_t width, absl::string_view indent) {
  std::string out;
  std::string line;
  const size_t indent_width = DisplayWidth(indent);
  size_t line_width = 0;
  for (absl::string_view word :
       absl::StrSplit(text, absl::ByAnyChar(" \t\r\n"), absl::SkipEmpty())) {
    const size_t word_width = DisplayWidth(word);
    if (!line.empty() && indent_width + line_width + 1 + word_width > width) {
      absl::StrAppend(&out, indent, line, "\n");
      line.clear();
      line_width = 0;
    }
    if (!line.empty()) {
      line += ' ';
      ++line_width;
    }
    absl::StrAppend(&line, word);
    line_width += word_width;
  }
  if (!line.empty()) absl::StrAppend(&out, indent, line, "\n");
  return out;
}

TextTable::TextTable(std::vector<Column> columns) : columns_(std::move(columns)) {}

void TextTable::AddRow(std::vector<std::string> cells) { rows_.push_back(std::move(cells)); }

void TextTable::SetTotals(std::vector<std::string> cells) {
  totals_ = std::move(cells);
  has_totals_ = true;
}

void TextTable::Print(std::ostream& out, absl::string_view indent) const {
  const size_t n = columns_.size();
  const bool has_header = std::any_of(columns_.begin(), columns_.end(),
                                      [](const Column& c) { return !c.header.empty(); });
  std::vector<size_t> widths(n, 0);
  auto measure = [&](const std::vector<std::string>& cells) {
    for (size_t i = 0; i < n && i < cells.size(); ++i) {
      widths[i] = std::max(widths[i], DisplayWidth(cells[i]));
    }
  };
  if (has_header) {
    for (size_t i = 0; i < n; ++i) widths[i] = DisplayWidth(columns_[i].header);
  }
  for (const auto& row : rows_) measure(row);
  if (has_totals_) measure(totals_);

  auto print_line = [&](const std::vector<std::string>& cells) {
    std::string line(indent);
    for (size_t i = 0; i < n; ++i) {
      const std::string empty;
      const std::string& cell = i < cells.size() ? cells[i] : empty;
      std::string pad(widths[i] - DisplayWidth(cell), ' ');
      if (i > 0) line += "  ";
      if (columns_[i].align == Align::kRight) {
        absl::StrAppend(&line, pad, cell);
      } else {
        absl::StrAppend(&line, cell, pad);
      }
    }
    out << absl::StripTrailingAsciiWhitespace(line) << "\n";
  };

  if (has_header) {
    std::vector<std::string> headers;
    for (const Column& c : columns_) headers.push_back(c.header);
    print_line(headers);
  }
  for (const auto& row : rows_) print_line(row);
  if (has_totals_) {
    std::vector<std::string> rule;
    for (size_t w : widths) rule.push_back(std::string(w, '-'));
    print_line(rule);
    print_line(totals_);
  }
}

// ---------------------------------------------------------------------------------------------
// The CLI.

namespace {

constexpr char kProgram[] = "sflbctl";
constexpr char kDefaultServer[] = "127.0.0.1:50051";
constexpr char kServerEnv[] = "SFLB_CONTROLPLANE";
constexpr char kAdminKeyEnv[] = "LB_ADMIN_KEY";
constexpr absl::Duration kDefaultTimeout = absl::Seconds(10);
// max_args value for commands that take any number of arguments.
constexpr size_t kAnyNumber = static_cast<size_t>(-1);

// A --flag that a command (or every command) accepts.
struct FlagSpec {
  // Without dashes: "server".
  std::string name;
  // Placeholder shown in help ("ADDR"); empty for a switch that takes no value.
  std::string value_name;
  std::string help;
};

// Accepted by every command, anywhere on the line.
const std::vector<FlagSpec>& GlobalFlags() {
  static const auto* flags = new std::vector<FlagSpec>{
      {"server", "ADDR",
       absl::StrCat("controlplane address host:port (env ", kServerEnv, ", default ",
                    kDefaultServer, ")")},
      {"admin-key-file", "PATH",
       absl::StrCat("read the admin key from PATH (default: env ", kAdminKeyEnv,
                    "); the key itself is never a flag")},
      {"json", "", "print the response as one JSON object, for scripts"},
      {"timeout", "DURATION",
       absl::StrCat("deadline of each call, e.g. 10s or 500ms (default ",
                    absl::FormatDuration(kDefaultTimeout), ")")},
      {"help", "", "show help (also -h)"},
  };
  return *flags;
}

class Session;

// One entry of the command table.
struct Command {
  // One or more words: "stats", or "keys show" for a subcommand (the longest match wins).
  std::string name;
  // What follows the name in the usage line: "[--state STATE]".
  std::string usage;
  // One line for the command list; the first line of `sflbctl help <command>`.
  std::string summary;
  // Extra help text after the summary; may be empty.
  std::string details;
  std::vector<FlagSpec> flags;
  // Positional arguments after the name.
  size_t min_args = 0;
  size_t max_args = 0;
  // Returns a CtlExitCode. Called only with a valid number of arguments and known flags.
  int (*handler)(Session& session);
};

const std::vector<Command>& Commands();

// What the command line asked for.
struct Invocation {
  std::string server = kDefaultServer;
  bool json = false;
  absl::Duration timeout = kDefaultTimeout;
  // Whether --timeout was given (some commands have a longer default).
  bool timeout_set = false;
  bool help = false;
  // From --admin-key-file; empty means LB_ADMIN_KEY.
  std::string admin_key_file;
  // Null when no command was named.
  const Command* command = nullptr;
  // Positional arguments after the command's name.
  std::vector<std::string> args;
  // The command's own flags by name; a switch maps to "true". The last occurrence wins.
  std::map<std::string, std::string> flags;
};

std::string FlagSynopsis(const FlagSpec& flag) {
  return flag.value_name.empty() ? absl::StrCat("--", flag.name)
                                 : absl::StrCat("--", flag.name, " ", flag.value_name);
}

void PrintFlagList(const std::vector<FlagSpec>& flags, std::ostream& out) {
  TextTable table({{""}, {""}});
  for (const FlagSpec& flag : flags) table.AddRow({FlagSynopsis(flag), flag.help});
  table.Print(out, "  ");
}

std::string GeneralUsage() {
  std::ostringstream out;
  out << "Usage: " << kProgram << " <command> [args] [--flags]\n\n"
      << "Operator CLI for sflb-controlplane (" << kProductName << " " << kVersion << ").\n\n"
      << "Commands:\n";
  TextTable commands({{""}, {""}});
  for (const Command& c : Commands()) commands.AddRow({c.name, c.summary});
  commands.Print(out, "  ");
  out << "\nGlobal flags (anywhere on the line):\n";
  PrintFlagList(GlobalFlags(), out);
  out << "\nThe admin key comes from " << kAdminKeyEnv
      << " or --admin-key-file, never from the command line.\n"
      << "Run '" << kProgram << " help <command>' for a command's flags.\n\n"
      << "Exit codes: 0 ok, 1 operation failed, 2 usage error, 3 controlplane unreachable,\n"
      << "            4 admin key rejected, 5 admin key missing.\n";
  return out.str();
}

std::string CommandUsage(const Command& command) {
  std::ostringstream out;
  out << "Usage: " << kProgram << " " << command.name;
  if (!command.usage.empty()) out << " " << command.usage;
  out << "\n\n" << command.summary << ".\n";
  if (!command.details.empty()) out << "\n" << command.details;
  if (!command.flags.empty()) {
    out << "\nFlags:\n";
    PrintFlagList(command.flags, out);
  }
  std::vector<std::string> globals;
  for (const FlagSpec& flag : GlobalFlags()) globals.push_back(FlagSynopsis(flag));
  out << "\nGlobal flags: " << absl::StrJoin(globals, ", ") << " (see '" << kProgram
      << " help').\n";
  return out.str();
}

// A usage error: the message, and the command whose usage to print (null: the general one).
struct UsageError {
  std::string message;
  const Command* command = nullptr;
};

// Flag values are parsed here; anything else a user can get wrong is checked by the handler.
absl::optional<UsageError> ApplyGlobalFlag(absl::string_view name,
                                           const absl::optional<std::string>& value,
                                           Invocation* inv) {
  auto parse_switch = [&](bool* target) -> absl::optional<UsageError> {
    if (!value.has_value()) {
      *target = true;
      return absl::nullopt;
    }
    std::string v = absl::AsciiStrToLower(*value);
    if (v == "true" || v == "1" || v == "yes") {
      *target = true;
    } else if (v == "false" || v == "0" || v == "no") {
      *target = false;
    } else {
      return UsageError{absl::StrCat("--", name, " takes no value (got '", *value, "')")};
    }
    return absl::nullopt;
  };
  if (name == "json") return parse_switch(&inv->json);
  if (name == "help") return parse_switch(&inv->help);
  // The rest take a value, already fetched by the caller.
  if (name == "server") {
    if (value->empty()) return UsageError{"--server needs an address like host:port"};
    inv->server = *value;
  } else if (name == "admin-key-file") {
    if (value->empty()) return UsageError{"--admin-key-file needs a path"};
    inv->admin_key_file = *value;
  } else if (name == "timeout") {
    absl::optional<absl::Duration> d = ParseDurationSetting(*value);
    if (!d.has_value() || *d <= absl::ZeroDuration()) {
      return UsageError{absl::StrCat("--timeout: expected a positive duration like 10s or 500ms, "
                                     "got '", *value, "'")};
    }
    inv->timeout = *d;
    inv->timeout_set = true;
  }
  return absl::nullopt;
}

const FlagSpec* FindFlag(const std::vector<FlagSpec>& flags, absl::string_view name) {
  for (const FlagSpec& flag : flags) {
    if (flag.name == name) return &flag;
  }
  return nullptr;
}

// The command whose name is the longest prefix of `words`; sets `*consumed` to its word count.
const Command* FindCommand(const std::vector<std::string>& words, size_t* consumed) {
  const Command* best = nullptr;
  size_t best_words = 0;
  for (const Command& c : Commands()) {
    std::vector<std::string> name = absl::StrSplit(c.name, ' ');
    if (name.size() > words.size() || name.size() <= best_words) continue;
    if (std::equal(name.begin(), name.end(), words.begin())) {
      best = &c;
      best_words = name.size();
    }
  }
  *consumed = best_words;
  return best;
}

// Parses the command line in three steps: global flags are taken out wherever they are; the
// leading words of what remains name the command; the rest are that command's flags and
// arguments. A command's own flags must therefore follow its name.
absl::optional<UsageError> ParseCommandLine(const std::vector<std::string>& args,
                                            const EnvLookup& env, Invocation* inv) {
  if (absl::optional<std::string> server = env(kServerEnv); server.has_value() && !server->empty()) {
    inv->server = *server;
  }

  // Step 1: global flags. `literal` marks tokens after "--", which are never flags.
  struct Token {
    std::string text;
    bool literal = false;
  };
  std::vector<Token> rest;
  bool flags_done = false;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (flags_done) {
      rest.push_back({arg, true});
      continue;
    }
    if (arg == "--") {
      flags_done = true;
      continue;
    }
    if (arg == "-h") {
      inv->help = true;
      continue;
    }
    absl::string_view body = arg;
    if (!absl::ConsumePrefix(&body, "--")) {
      rest.push_back({arg});
      continue;
    }
    absl::string_view name = body.substr(0, body.find('='));
    if (name == "admin-key") {
      // Never echo the value: it is the secret.
      return UsageError{absl::StrCat("--admin-key is not accepted: command lines are visible in "
                                     "ps; set ", kAdminKeyEnv, " or use --admin-key-file PATH")};
    }
    const FlagSpec* flag = FindFlag(GlobalFlags(), name);
    if (flag == nullptr) {
      rest.push_back({arg});
      continue;
    }
    absl::optional<std::string> value;
    if (name.size() < body.size()) {
      value = std::string(body.substr(name.size() + 1));
    } else if (!flag->value_name.empty()) {
      if (i + 1 >= args.size()) {
        return UsageError{absl::StrCat("--", name, " needs a value (", flag->value_name, ")")};
      }
      value = args[++i];
    }
    if (absl::optional<UsageError> error = ApplyGlobalFlag(name, value, inv)) return error;
  }

  // Step 2: the command's name.
  std::vector<std::string> words;
  for (const Token& token : rest) {
    if (!token.literal && absl::StartsWith(token.text, "-")) break;
    words.push_back(token.text);
  }
  if (words.empty()) {
    if (!rest.empty()) {
      return UsageError{absl::StrCat("unknown flag ", rest.front().text,
                                     " (a command's flags follow the command)")};
    }
    return absl::nullopt;  // No command: the caller prints the general usage.
  }
  size_t consumed = 0;
  inv->command = FindCommand(words, &consumed);
  if (inv->command == nullptr) {
    return UsageError{absl::StrCat("unknown command '", words.front(), "'")};
  }

  // Step 3: the command's flags and arguments.
  const Command& command = *inv->command;
  for (size_t i = consumed; i < rest.size(); ++i) {
    const Token& token = rest[i];
    absl::string_view body = token.text;
    if (token.literal || token.text == "-" || !absl::StartsWith(body, "-")) {
      inv->args.push_back(token.text);
      continue;
    }
    if (!absl::ConsumePrefix(&body, "--")) {
      return UsageError{absl::StrCat("unknown flag ", token.text), &command};
    }
    absl::string_view name = body.substr(0, body.find('='));
    const FlagSpec* flag = FindFlag(command.flags, name);
    if (flag == nullptr) {
      return UsageError{absl::StrCat("unknown flag --", name, " for '", command.name, "'"),
                        &command};
    }
    std::string value = "true";
    if (name.size() < body.size()) {
      if (flag->value_name.empty()) {
        return UsageError{absl::StrCat("--", name, " takes no value"), &command};
      }
      value = std::string(body.substr(name.size() + 1));
    } else if (!flag->value_name.empty()) {
      if (i + 1 >= rest.size()) {
        return UsageError{absl::StrCat("--", name, " needs a value (", flag->value_name, ")"),
                          &command};
      }
      value = rest[++i].text;
    }
    inv->flags[flag->name] = value;
  }
  if (inv->help) return absl::nullopt;
  if (inv->args.size() < command.min_args || inv->args.size() > command.max_args) {
    std::vector<std::string> subcommands;
    for (const Command& c : Commands()) {
      if (absl::StartsWith(c.name, absl::StrCat(command.name, " "))) subcommands.push_back(c.name);
    }
    std::string message;
    if (command.max_args == 0 && !subcommands.empty()) {
      message = absl::StrCat("'", command.name, "' has no subcommand '", inv->args.front(),
                             "' (there are: ", absl::StrJoin(subcommands, ", "), ")");
    } else if (command.max_args == 0) {
      message =
          absl::StrCat("'", command.name, "' takes no arguments (got '", inv->args.front(), "')");
    } else if (inv->args.size() < command.min_args) {
      message = absl::StrCat("missing argument for '", command.name, "'");
    } else {
      message = absl::StrCat("wrong number of arguments for '", command.name, "'");
    }
    return UsageError{message, &command};
  }
  return absl::nullopt;
}

// Turns a server message into one line, so each diagnostic is exactly one line.
std::string OneLine(absl::string_view text) {
  return absl::StrReplaceAll(absl::StripAsciiWhitespace(text), {{"\r\n", " "}, {"\n", " "}});
}

// What a command handler works with: the parsed invocation, the output streams and the
// controlplane connection (made on first use, so `help` and usage errors need neither a server
// nor an admin key).
class Session {
 public:
  // `stop_requested` (may be empty: then SIGINT/SIGTERM) ends long-running commands.
  Session(const Invocation& invocation, const EnvLookup& env, std::ostream& out,
          std::ostream& err, std::function<bool()> stop_requested)
      : inv_(invocation),
        env_(env),
        out_(out),
        err_(err),
        now_(absl::Now()),
        timeout_(invocation.timeout),
        stop_requested_(std::move(stop_requested)) {}

  std::ostream& out() { return out_; }
  std::ostream& err() { return err_; }
  bool json() const { return inv_.json; }
  // When the command started; the reference for "3s ago".
  absl::Time now() const { return now_; }
  const std::vector<std::string>& args() const { return inv_.args; }
  const EnvLookup& env() const { return env_; }
  const std::string& server() const { return inv_.server; }
  // The deadline of each call.
  absl::Duration timeout() const { return timeout_; }
  // For commands whose calls take longer by nature: raises the deadline to `d` unless the
  // user chose one with --timeout.
  void UseLongerDefaultTimeout(absl::Duration d) {
    if (!inv_.timeout_set) timeout_ = std::max(timeout_, d);
  }
  // The value of one of the command's own flags, if given.
  absl::optional<std::string> flag(const std::string& name) const {
    auto it = inv_.flags.find(name);
    if (it == inv_.flags.end()) return absl::nullopt;
    return it->second;
  }

  // Prints "sflbctl: <message>" and the command's usage on stderr; returns kCtlUsage.
  int UsageFailure(absl::string_view message) {
    err_ << kProgram << ": " << message << "\n\n" << CommandUsage(*inv_.command);
    return kCtlUsage;
  }
  // Prints "sflbctl: <message>" on stderr and returns `code`.
  int Fail(int code, absl::string_view message) {
    err_ << kProgram << ": " << message << "\n";
    return code;
  }

  // Loads the admin key and opens the channel, once. Returns kCtlOk, or prints why not and
  // returns kCtlNoAdminKey.
  int Connect() {
    if (admin_ != nullptr) return kCtlOk;
    if (int rc = LoadAdminKey(); rc != kCtlOk) return rc;
    if (int rc = OpenChannel(); rc != kCtlOk) return rc;
    admin_ = v1::AdminService::NewStub(channel_);
    return kCtlOk;
  }
  // Opens the channel without an admin key, for services that need none (health). TLS comes
  // from SFLB_CONTROLPLANE_CA_FILE (and _CERT_FILE/_KEY_FILE for mutual TLS,
  // _SERVER_NAME to override the expected name). Returns kCtlOk or kCtlUsage (bad files).
  int OpenChannel() {
    if (channel_ != nullptr) return kCtlOk;
    auto get = [this](const char* name) { return env_(name).value_or(""); };
    absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = MakeControlplaneChannel(
        inv_.server,
        ControlplaneTls{get("SFLB_CONTROLPLANE_CA_FILE"), get("SFLB_CONTROLPLANE_CERT_FILE"),
                        get("SFLB_CONTROLPLANE_KEY_FILE"), get("SFLB_CONTROLPLANE_SERVER_NAME")});
    if (!channel.ok()) return Fail(kCtlUsage, channel.status().message());
    channel_ = std::move(*channel);
    return kCtlOk;
  }
  // After Connect() or OpenChannel(): the channel, for commands that use another service.
  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }
  // After Connect(): the AdminService stub.
  v1::AdminService::Stub& admin() const { return *admin_; }

  // After Connect(): a context with the deadline and the admin key for one call. `extra` is
  // added to the deadline, for calls that wait on the server by design.
  std::unique_ptr<grpc::ClientContext> NewCallContext(
      absl::Duration extra = absl::ZeroDuration()) const {
    auto context = std::make_unique<grpc::ClientContext>();
    context->set_deadline(absl::ToChronoTime(absl::Now() + timeout_ + extra));
    context->AddMetadata(kAuthorizationMetadata, absl::StrCat("Bearer ", admin_key_));
    return context;
  }

  // Whether a long-running command should end now: the caller's predicate, or else a SIGINT
  // or SIGTERM since the last InstallStopSignals().
  bool StopRequested() const;
  // Without a caller's predicate: catches SIGINT and SIGTERM (restored when the session ends),
  // so that StopRequested() sees them. Idempotent.
  void InstallStopSignals();
  ~Session();

  // Explains a failed call `rpc` on stderr and returns its exit code.
  int RpcFailure(absl::string_view rpc, const grpc::Status& status) {
    const std::string message = OneLine(status.error_message());
    const std::string where = absl::StrCat("the controlplane at ", inv_.server);
    const std::string check = absl::StrCat("check --server or ", kServerEnv);
    switch (status.error_code()) {
      case grpc::StatusCode::UNAVAILABLE:
        return Fail(kCtlUnreachable,
                    absl::StrCat("cannot reach ", where, " (", message, "); ", check));
      case grpc::StatusCode::DEADLINE_EXCEEDED:
        return Fail(kCtlUnreachable,
                    absl::StrCat("no answer from ", where, " within ",
                                 absl::FormatDuration(timeout_), "; ", check,
                                 ", or raise --timeout"));
      case grpc::StatusCode::UNAUTHENTICATED:
      case grpc::StatusCode::PERMISSION_DENIED:
        return Fail(kCtlAuthFailed,
                    absl::StrCat("admin key rejected by ", where, " (key from ",
                                 admin_key_origin_, ")"));
      case grpc::StatusCode::FAILED_PRECONDITION:
        // By contract the message is the reason the operation could not be applied.
        return Fail(kCtlFailed, message);
      case grpc::StatusCode::NOT_FOUND:
        // "no key at index 7 (there are 3)": the message says it all.
        return Fail(kCtlFailed, message);
      case grpc::StatusCode::INVALID_ARGUMENT:
        // The request was wrong (an ambiguous key prefix, a duration out of range): to the
        // user that is a usage error.
        return Fail(kCtlUsage, message);
      case grpc::StatusCode::UNIMPLEMENTED:
        return Fail(kCtlFailed, absl::StrCat(where, " does not support ", rpc,
                                             " (is it older than sflbctl ", kVersion, "?)"));
      default:
        return Fail(kCtlFailed,
                    absl::StrCat(rpc, " failed: ", message, " (",
                                 absl::StatusCodeToString(
                                     static_cast<absl::StatusCode>(status.error_code())),
                                 ")"));
    }
  }

  // Prints `message` as one JSON object (proto field names, defaults included) and a newline.
  int PrintJson(const google::protobuf::Message& message) {
    google::protobuf::util::JsonPrintOptions options;
    options.preserve_proto_field_names = true;
    options.always_print_primitive_fields = true;
    std::string json;
    auto status = google::protobuf::util::MessageToJsonString(message, &json, options);
    if (!status.ok()) {
      return Fail(kCtlFailed, absl::StrCat("cannot render JSON: ", status.ToString()));
    }
    out_ << json << "\n";
    return kCtlOk;
  }

  // The common shape of a command: one AdminService call; on success the response goes to
  // stdout as JSON (--json) or through `render` for people; on failure RpcFailure() explains.
  template <typename Request, typename Response, typename Render>
  int CallAdmin(const char* rpc,
                grpc::Status (v1::AdminService::Stub::*method)(grpc::ClientContext*,
                                                               const Request&, Response*),
                const Request& request, Render&& render) {
    if (int rc = Connect(); rc != kCtlOk) return rc;
    std::unique_ptr<grpc::ClientContext> context = NewCallContext();
    Response response;
    grpc::Status status = (admin_.get()->*method)(context.get(), request, &response);
    if (!status.ok()) return RpcFailure(rpc, status);
    if (json()) return PrintJson(response);
    render(response);
    return kCtlOk;
  }

 private:
  // The flag wins over the variable, as for every sflb setting.
  int LoadAdminKey() {
    if (!inv_.admin_key_file.empty()) {
      admin_key_origin_ = absl::StrCat("--admin-key-file ", inv_.admin_key_file);
      std::ifstream in(inv_.admin_key_file, std::ios::binary);
      if (!in) {
        return Fail(kCtlNoAdminKey,
                    absl::StrCat("cannot read admin key file '", inv_.admin_key_file, "'"));
      }
      std::ostringstream content;
      content << in.rdbuf();
      admin_key_ = std::string(absl::StripAsciiWhitespace(content.str()));
      if (admin_key_.empty()) {
        return Fail(kCtlNoAdminKey,
                    absl::StrCat("admin key file '", inv_.admin_key_file, "' is empty"));
      }
      return kCtlOk;
    }
    admin_key_origin_ = kAdminKeyEnv;
    absl::optional<std::string> key = env_(kAdminKeyEnv);
    if (key.has_value()) admin_key_ = std::string(absl::StripAsciiWhitespace(*key));
    if (admin_key_.empty()) {
      return Fail(kCtlNoAdminKey, absl::StrCat("no admin key: set ", kAdminKeyEnv,
                                               " or pass --admin-key-file PATH"));
    }
    return kCtlOk;
  }

  const Invocation& inv_;
  const EnvLookup& env_;
  std::ostream& out_;
  std::ostream& err_;
  const absl::Time now_;
  absl::Duration timeout_;
  const std::function<bool()> stop_requested_;
  // The dispositions InstallStopSignals() replaced, restored by the destructor.
  bool signals_installed_ = false;
  struct sigaction old_sigint_ = {};
  struct sigaction old_sigterm_ = {};
  std::string admin_key_;
  // "LB_ADMIN_KEY" or "--admin-key-file PATH", for messages. Never the key.
  std::string admin_key_origin_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::AdminService::Stub> admin_;
};

// Set by SIGINT/SIGTERM while a session listens for them. Lock-free, so async-signal-safe.
std::atomic<bool> g_stop_signalled{false};
static_assert(std::atomic<bool>::is_always_lock_free, "the signal handler needs a lock-free flag");

extern "C" void OnStopSignal(int) { g_stop_signalled.store(true); }

bool Session::StopRequested() const {
  if (stop_requested_) return stop_requested_();
  return signals_installed_ && g_stop_signalled.load();
}

void Session::InstallStopSignals() {
  if (stop_requested_ || signals_installed_) return;
  g_stop_signalled.store(false);
  struct sigaction action = {};
  action.sa_handler = OnStopSignal;
  sigemptyset(&action.sa_mask);
  sigaction(SIGINT, &action, &old_sigint_);
  sigaction(SIGTERM, &action, &old_sigterm_);
  signals_installed_ = true;
}

Session::~Session() {
  if (signals_installed_) {
    sigaction(SIGINT, &old_sigint_, nullptr);
    sigaction(SIGTERM, &old_sigterm_, nullptr);
  }
}

// ---------------------------------------------------------------------------------------------
// Key tables, shared by `stats` and `keys`.

// "active", "cooling", ...: the KeyState name without its prefix, lower case.
std::string StateName(v1::KeyState state) {
  absl::string_view name = v1::KeyState_Name(state);
  absl::ConsumePrefix(&name, "KEY_STATE_");
  return absl::AsciiStrToLower(name);
}

// The states `keys --state` accepts, in enum order.
std::vector<std::string> FilterableStates() {
  std::vector<std::string> names;
  for (int i = v1::KeyState_MIN; i <= v1::KeyState_MAX; ++i) {
    if (v1::KeyState_IsValid(i) && i != v1::KEY_STATE_UNSPECIFIED) {
      names.push_back(StateName(static_cast<v1::KeyState>(i)));
    }
  }
  return names;
}

absl::optional<v1::KeyState> ParseState(absl::string_view text) {
  std::string lower = absl::AsciiStrToLower(text);
  for (int i = v1::KeyState_MIN; i <= v1::KeyState_MAX; ++i) {
    if (v1::KeyState_IsValid(i) && i != v1::KEY_STATE_UNSPECIFIED &&
        StateName(static_cast<v1::KeyState>(i)) == lower) {
      return static_cast<v1::KeyState>(i);
    }
  }
  return absl::nullopt;
}

// One column of a key table: how to print a key's cell and, for counters, its total.
struct KeyColumn {
  const char* header;
  TextTable::Align align;
  std::string (*cell)(const v1::KeyStatus& key, absl::Time now);
  // Null for columns without a total.
  uint64_t (*total)(const v1::KeyStatus& key);
};

uint64_t RequestCount(const v1::KeyStatus& k) { return k.request_count(); }
uint64_t TokenCount(const v1::KeyStatus& k) { return k.prompt_tokens() + k.completion_tokens(); }

const KeyColumn kIndexColumn{"INDEX", TextTable::Align::kRight,
                             [](const v1::KeyStatus& k, absl::Time) {
                               return absl::StrCat(k.index());
                             },
                             nullptr};
const KeyColumn kKeyColumn{"KEY", TextTable::Align::kLeft,
                           [](const v1::KeyStatus& k, absl::Time) { return k.masked(); },
                           nullptr};
const KeyColumn kFingerprintColumn{
    "FINGERPRINT", TextTable::Align::kLeft,
    [](const v1::KeyStatus& k, absl::Time) { return k.fingerprint(); }, nullptr};
// A key without `account=` is its own rate-limit scope and carries its fingerprint as account:
// "-" says so without repeating the fingerprint.
const KeyColumn kAccountColumn{"ACCOUNT", TextTable::Align::kLeft,
                               [](const v1::KeyStatus& k, absl::Time) {
                                 return k.account().empty() || k.account() == k.fingerprint()
                                            ? std::string("-")
                                            : k.account();
                               },
                               nullptr};
const KeyColumn kStateColumn{
    "STATE", TextTable::Align::kLeft,
    [](const v1::KeyStatus& k, absl::Time now) {
      std::string state = StateName(k.state());
      if (k.has_state_until()) {
        absl::Time until = FromProtoTime(k.state_until());
        if (until > now) absl::StrAppend(&state, " (", FormatShortDuration(until - now), " left)");
      }
      return state;
    },
    nullptr};
// The state alone, for tables that show the time left in a LEFT column.
const KeyColumn kStateNameColumn{
    "STATE", TextTable::Align::kLeft,
    [](const v1::KeyStatus& k, absl::Time) { return StateName(k.state()); }, nullptr};
// Time left of a state that ends on its own (cooling), else "-".
const KeyColumn kLeftColumn{"LEFT", TextTable::Align::kRight,
                            [](const v1::KeyStatus& k, absl::Time now) {
                              if (!k.has_state_until()) return std::string("-");
                              absl::Time until = FromProtoTime(k.state_until());
                              return until > now ? FormatShortDuration(until - now)
                                                 : std::string("-");
                            },
                            nullptr};
// "1 model forbidden", "3 models forbidden": the per-model 403s of the key's account.
std::string ForbiddenSummary(const v1::KeyStatus& k) {
  const int n = k.forbidden_models_size();
  return absl::StrCat(n, n == 1 ? " model" : " models", " forbidden");
}
const KeyColumn kReasonColumn{"REASON", TextTable::Align::kLeft,
                              [](const v1::KeyStatus& k, absl::Time) {
                                std::string reason = OneLine(k.state_reason());
                                if (k.forbidden_models_size() > 0) {
                                  reason = reason.empty()
                                               ? ForbiddenSummary(k)
                                               : absl::StrCat(reason, "; ", ForbiddenSummary(k));
                                }
                                return reason.empty() ? std::string("-") : reason;
                              },
                              nullptr};
const KeyColumn kRequestsColumn{"REQUESTS", TextTable::Align::kRight,
                                [](const v1::KeyStatus& k, absl::Time) {
                                  return absl::StrCat(k.request_count());
                                },
                                RequestCount};
const KeyColumn kLastUsedColumn{"LAST USED", TextTable::Align::kLeft,
                                [](const v1::KeyStatus& k, absl::Time now) {
                                  return FormatTimeAgo(k.has_last_used()
                                                           ? FromProtoTime(k.last_used())
                                                           : absl::InfinitePast(),
                                                       now);
                                },
                                nullptr};
const KeyColumn kTokensColumn{"TOKENS", TextTable::Align::kRight,
                              [](const v1::KeyStatus& k, absl::Time) {
                                return absl::StrCat(TokenCount(k));
                              },
                              TokenCount};

// Prints one row per key and a TOTAL row summing the counter columns.
void PrintKeyTable(const google::protobuf::RepeatedPtrField<v1::KeyStatus>& keys,
                   const std::vector<const KeyColumn*>& columns, absl::Time now,
                   std::ostream& out) {
  std::vector<TextTable::Column> headers;
  for (const KeyColumn* c : columns) headers.push_back({c->header, c->align});
  TextTable table(std::move(headers));
  std::vector<uint64_t> totals(columns.size(), 0);
  for (const v1::KeyStatus& key : keys) {
    std::vector<std::string> row;
    for (size_t i = 0; i < columns.size(); ++i) {
      row.push_back(columns[i]->cell(key, now));
      if (columns[i]->total != nullptr) totals[i] += columns[i]->total(key);
    }
    table.AddRow(std::move(row));
  }
  std::vector<std::string> total_row(columns.size());
  total_row[0] = "TOTAL";
  for (size_t i = 1; i < columns.size(); ++i) {
    if (columns[i]->total != nullptr) total_row[i] = absl::StrCat(totals[i]);
  }
  table.SetTotals(std::move(total_row));
  table.Print(out);
}

// ---------------------------------------------------------------------------------------------
// Rate-limit blocks, shared by `stats` and `keys show`.

// "cooling", "half-open".
std::string PhaseName(v1::BlockPhase phase) {
  absl::string_view name = v1::BlockPhase_Name(phase);
  absl::ConsumePrefix(&name, "BLOCK_PHASE_");
  return absl::StrReplaceAll(absl::AsciiStrToLower(name), {{"_", "-"}});
}

std::string BlockAccount(const v1::ScopeBlock& b) {
  if (b.account() == "*") return "* (pool-wide)";
  return b.account().empty() ? std::string("-") : b.account();
}

std::string BlockModel(const v1::ScopeBlock& b) {
  if (b.model() == "*") return "* (all models)";
  return b.model().empty() ? std::string("-") : b.model();
}

// Time left of a cooling block ("42s"); "-" once it is half-open or over.
std::string BlockLeft(const v1::ScopeBlock& b, absl::Time now) {
  if (b.phase() != v1::BLOCK_PHASE_COOLING || !b.has_until()) return "-";
  absl::Time until = FromProtoTime(b.until());
  return until > now ? FormatShortDuration(until - now) : std::string("-");
}

// For the detailed view: "2026-11-26T13:00:00.123Z (42s left)", or "ended 3s ago" when the
// cooling phase is over (half-open: waiting for the probe).
std::string BlockUntil(const v1::ScopeBlock& b, absl::Time now) {
  if (!b.has_until()) return "-";
  absl::Time until = FromProtoTime(b.until());
  if (until > now) {
    return absl::StrCat(FormatIso8601(until), " (", FormatShortDuration(until - now), " left)");
  }
  return absl::StrCat("ended ", FormatTimeAgo(until, now));
}

// `detailed`: the UNTIL/LEFT column with the end time, and the upstream message as REASON.
void PrintBlockTable(const google::protobuf::RepeatedPtrField<v1::ScopeBlock>& blocks,
                     bool detailed, absl::Time now, std::ostream& out) {
  std::vector<TextTable::Column> columns = {
      {"ACCOUNT"},
      {"MODEL"},
      {"PHASE"},
      {"LIMIT"},
      detailed ? TextTable::Column{"UNTIL/LEFT"}
               : TextTable::Column{"LEFT", TextTable::Align::kRight},
      {"STRIKES", TextTable::Align::kRight},
      {"PROBE BY"}};
  if (detailed) columns.push_back({"REASON"});
  TextTable table(std::move(columns));
  for (const v1::ScopeBlock& b : blocks) {
    std::vector<std::string> row = {
        BlockAccount(b),
        BlockModel(b),
        PhaseName(b.phase()),
        b.limit().empty() ? std::string("-") : b.limit(),
        detailed ? BlockUntil(b, now) : BlockLeft(b, now),
        absl::StrCat(b.strikes()),
        b.probe_replica().empty() ? std::string("-") : b.probe_replica()};
    if (detailed) row.push_back(b.reason().empty() ? std::string("-") : OneLine(b.reason()));
    table.AddRow(std::move(row));
  }
  table.Print(out);
}

// ---------------------------------------------------------------------------------------------
// Commands. Each returns a CtlExitCode.

int StatsCommand(Session& s) {
  return s.CallAdmin(
      "GetStats", &v1::AdminService::Stub::GetStats, v1::GetStatsRequest(),
      [&s](const v1::GetStatsResponse& r) {
        std::string uptime = "unknown";
        if (r.has_started_at()) {
          absl::Time started = FromProtoTime(r.started_at());
          uptime = absl::StrCat(FormatShortDuration(s.now() - started), " (since ",
                                FormatIso8601(started), ")");
        }
        TextTable summary({{""}, {""}});
        summary.AddRow({"Keys:", absl::StrCat(r.total_keys(), " total, ", r.active_keys(),
                                              " active")});
        summary.AddRow({"Requests:", absl::StrCat(r.total_requests())});
        summary.AddRow({"Leased:", absl::StrCat(r.leased_total())});
        summary.AddRow({"Controlplane RPCs:",
                        absl::StrCat(r.lease_calls(), " lease, ", r.report_calls(), " report")});
        summary.AddRow({"Watching replicas:", absl::StrCat(r.watching_replicas())});
        summary.AddRow({"Snapshot version:", absl::StrCat(r.snapshot_version())});
        summary.AddRow({"Source:", r.source().empty() ? "-" : r.source()});
        summary.AddRow({"Uptime:", uptime});
        summary.Print(s.out());
        s.out() << "\n";
        PrintKeyTable(r.keys(),
                      {&kIndexColumn, &kKeyColumn, &kFingerprintColumn, &kAccountColumn,
                       &kStateColumn, &kRequestsColumn, &kLastUsedColumn, &kTokensColumn},
                      s.now(), s.out());
        if (r.blocks_size() > 0) {
          s.out() << "\nRate-limit blocks (" << r.blocks_size() << "):\n";
          PrintBlockTable(r.blocks(), /*detailed=*/false, s.now(), s.out());
        }
      });
}

int KeysCommand(Session& s) {
  v1::ListKeysRequest request;
  absl::optional<std::string> state = s.flag("state");
  if (state.has_value()) {
    absl::optional<v1::KeyState> parsed = ParseState(*state);
    if (!parsed.has_value()) {
      return s.UsageFailure(absl::StrCat("--state: expected one of ",
                                         absl::StrJoin(FilterableStates(), ", "), ", got '",
                                         *state, "'"));
    }
    request.set_state(*parsed);
  }
  return s.CallAdmin("ListKeys", &v1::AdminService::Stub::ListKeys, request,
                     [&](const v1::ListKeysResponse& r) {
                       if (r.keys().empty()) {
                         s.out() << (state.has_value()
                                         ? absl::StrCat("No keys in state ",
                                                        StateName(request.state()), ".\n")
                                         : std::string("No keys.\n"));
                         return;
                       }
                       PrintKeyTable(r.keys(),
                                     {&kIndexColumn, &kKeyColumn, &kFingerprintColumn,
                                      &kAccountColumn, &kStateNameColumn, &kLeftColumn,
                                      &kReasonColumn, &kRequestsColumn, &kLastUsedColumn},
                                     s.now(), s.out());
                     });
}

// "Key 3 (sk-ab…wxyz, fingerprint 0123456789ab)".
std::string KeyLabel(const v1::KeyStatus& k) {
  return absl::StrCat("Key ", k.index(), " (", k.masked(), ", fingerprint ", k.fingerprint(), ")");
}

// "2026-11-26T13:00:00.123Z (3m ago)"; "-" for an unset time.
std::string TimeWithAge(const google::protobuf::Timestamp& t, absl::Time now) {
  absl::Time when = FromProtoTime(t);
  if (when == absl::InfinitePast()) return "-";
  return absl::StrCat(FormatIso8601(when), " (", FormatTimeAgo(when, now), ")");
}

int KeysShowCommand(Session& s) {
  v1::GetKeyRequest request;
  request.set_key(s.args()[0]);
  return s.CallAdmin(
      "GetKey", &v1::AdminService::Stub::GetKey, request, [&s](const v1::GetKeyResponse& r) {
        const v1::KeyStatus& k = r.key();
        const absl::Time now = s.now();
        std::string until = "-";
        if (k.has_state_until()) {
          absl::Time t = FromProtoTime(k.state_until());
          until = t > now
                      ? absl::StrCat(FormatIso8601(t), " (", FormatShortDuration(t - now), " left)")
                      : absl::StrCat(FormatIso8601(t), " (ended ", FormatTimeAgo(t, now), ")");
        }
        std::string upstream = "-";
        if (k.state_status() != 0 || !k.state_message().empty()) {
          upstream = k.state_status() != 0 ? absl::StrCat("HTTP ", k.state_status()) : "";
          if (!k.state_message().empty()) {
            absl::StrAppend(&upstream, upstream.empty() ? "" : ": ", OneLine(k.state_message()));
          }
        }
        TextTable fields({{""}, {""}});
        fields.AddRow({"Index:", absl::StrCat(k.index())});
        fields.AddRow({"Key:", k.masked()});
        fields.AddRow({"Fingerprint:", k.fingerprint()});
        fields.AddRow({"Id:", absl::StrCat(k.id())});
        fields.AddRow({"Account:", k.account().empty() || k.account() == k.fingerprint()
                                       ? std::string("- (the key is its own rate-limit scope)")
                                       : k.account()});
        fields.AddRow({"State:", kStateColumn.cell(k, now)});
        fields.AddRow({"Reason:", k.state_reason().empty() ? "-" : OneLine(k.state_reason())});
        fields.AddRow({"Since:", TimeWithAge(k.state_since(), now)});
        fields.AddRow({"Until:", until});
        fields.AddRow({"Upstream said:", upstream});
        fields.AddRow({"Set by:", k.state_actor().empty() ? "-" : k.state_actor()});
        fields.AddRow({"Requests:", absl::StrCat(k.request_count())});
        fields.AddRow({"Last used:",
                       k.has_last_used() ? TimeWithAge(k.last_used(), now) : std::string("never")});
        fields.AddRow({"Tokens:", absl::StrCat(TokenCount(k), " (", k.prompt_tokens(), " prompt, ",
                                               k.completion_tokens(), " completion)")});
        fields.AddRow({"Forbidden models:",
                       k.forbidden_models().empty()
                           ? std::string("-")
                           : absl::StrCat(absl::StrJoin(k.forbidden_models(), ", "), " (403)")});
        fields.AddRow({"Added:", TimeWithAge(k.added_at(), now)});
        fields.Print(s.out());
        s.out() << "\n";
        if (r.blocks().empty()) {
          s.out() << "Rate-limit blocks: none\n";
        } else {
          s.out() << "Rate-limit blocks (" << r.blocks_size() << "):\n";
          PrintBlockTable(r.blocks(), /*detailed=*/true, now, s.out());
        }
        if (!r.explanation().empty()) {
          s.out() << "\nWhy:\n" << WrapText(r.explanation(), 100, "  ");
        }
      });
}

// `keys disable|enable|cooldown KEY`: one SetKeyState call, one line of output.
int SetKeyStateCommand(Session& s, v1::KeyAction action, absl::string_view verb) {
  v1::SetKeyStateRequest request;
  request.set_key(s.args()[0]);
  request.set_action(action);
  if (action == v1::KEY_ACTION_COOLDOWN) {
    absl::optional<std::string> text = s.flag("duration");
    if (!text.has_value()) {
      return s.UsageFailure("keys cooldown needs --duration, e.g. --duration 5m");
    }
    absl::optional<absl::Duration> duration = ParseDurationSetting(*text);
    if (!duration.has_value() || *duration <= absl::ZeroDuration()) {
      return s.UsageFailure(absl::StrCat(
          "--duration: expected a positive duration like 90s, 5m or 1h, got '", *text, "'"));
    }
    *request.mutable_duration() = ToProtoDuration(*duration);
  }
  if (absl::optional<std::string> reason = s.flag("reason")) {
    request.set_reason(*reason);
  } else {
    absl::optional<std::string> user = s.env()("USER");
    request.set_reason(user.has_value() && !user->empty()
                           ? absl::StrCat("sflbctl ", verb, " by ", *user)
                           : absl::StrCat("sflbctl ", verb));
  }
  return s.CallAdmin("SetKeyState", &v1::AdminService::Stub::SetKeyState, request,
                     [&s](const v1::SetKeyStateResponse& r) {
                       const v1::KeyStatus& k = r.key();
                       s.out() << KeyLabel(k) << " is now " << kStateColumn.cell(k, s.now());
                       if (!k.state_reason().empty()) s.out() << ": " << OneLine(k.state_reason());
                       s.out() << "\n";
                     });
}

int KeysDisableCommand(Session& s) {
  return SetKeyStateCommand(s, v1::KEY_ACTION_DISABLE, "disable");
}
int KeysEnableCommand(Session& s) { return SetKeyStateCommand(s, v1::KEY_ACTION_ENABLE, "enable"); }
int KeysCooldownCommand(Session& s) {
  return SetKeyStateCommand(s, v1::KEY_ACTION_COOLDOWN, "cooldown");
}

int ReloadCommand(Session& s) {
  v1::ReloadRequest request;
  if (absl::optional<std::string> reason = s.flag("reason")) {
    request.set_reason(*reason);
  } else {
    absl::optional<std::string> user = s.env()("USER");
    request.set_reason(user.has_value() && !user->empty()
                           ? absl::StrCat("sflbctl reload by ", *user)
                           : std::string("sflbctl reload"));
  }
  return s.CallAdmin("Reload", &v1::AdminService::Stub::Reload, request,
                     [&s](const v1::ReloadResponse& r) {
                       s.out() << "Reloaded " << r.new_count() << " keys from " << r.source()
                               << " (previous " << r.previous_count() << "): +"
                               << r.added_size() << " added, -" << r.removed_size()
                               << " removed\n";
                       if (r.added_size() > 0) {
                         s.out() << "  added:   " << absl::StrJoin(r.added(), ", ") << "\n";
                       }
                       if (r.removed_size() > 0) {
                         s.out() << "  removed: " << absl::StrJoin(r.removed(), ", ") << "\n";
                       }
                       for (const std::string& warning : r.warnings()) {
                         s.out() << "warning: " << OneLine(warning) << "\n";
                       }
                     });
}

// ---------------------------------------------------------------------------------------------
// balance

// Balance refreshes ask the upstream for every key (10 s each at worst, 8 at a time), so the
// call gets a longer deadline than the others unless --timeout says otherwise.
constexpr absl::Duration kBalanceTimeout = absl::Seconds(60);

// "ok", "unavailable", "error".
std::string BalanceStatusName(v1::BalanceStatus status) {
  switch (status) {
    case v1::BALANCE_STATUS_OK:
      return "ok";
    case v1::BALANCE_STATUS_UNAVAILABLE:
      return "unavailable";
    case v1::BALANCE_STATUS_ERROR:
      return "error";
    default:
      return "unknown";
  }
}

void PrintBalances(const v1::GetBalancesResponse& r, absl::Time now, std::ostream& out) {
  if (r.keys().empty()) {
    out << (r.message().empty() ? std::string("No keys.") : OneLine(r.message())) << "\n";
    return;
  }
  TextTable table({{"INDEX", TextTable::Align::kRight},
                   {"KEY FINGERPRINT"},
                   {"ACCOUNT ID"},
                   {"STATUS"},
                   {"BALANCE", TextTable::Align::kRight},
                   {"CHECKED"},
                   {"ERROR"}});
  for (const v1::KeyBalance& k : r.keys()) {
    table.AddRow({absl::StrCat(k.index()), k.fingerprint(),
                  k.account_id().empty() ? std::string("-") : k.account_id(),
                  BalanceStatusName(k.status()),
                  k.balance().empty() ? std::string("-") : k.balance(),
                  FormatTimeAgo(k.has_checked_at() ? FromProtoTime(k.checked_at())
                                                   : absl::InfinitePast(),
                                now),
                  k.error().empty() ? std::string("-") : OneLine(k.error())});
  }
  // With no balance known a total of 0.0000 would be a lie.
  table.SetTotals({"TOTAL", "", "", "", r.unavailable() ? std::string("-") : r.total_balance()});
  table.Print(out);
  out << "\n";
  if (r.unavailable()) {
    out << "Balances are unavailable: the upstream no longer reports them for any of the "
        << r.keys_size() << (r.keys_size() == 1 ? " key" : " keys")
        << ". This is not an error; the keys keep serving.\n";
  }
  if (!r.message().empty()) out << OneLine(r.message()) << "\n";
}

int BalanceCommand(Session& s) {
  v1::GetBalancesRequest request;
  request.set_refresh(s.flag("refresh").has_value());
  s.UseLongerDefaultTimeout(kBalanceTimeout);
  return s.CallAdmin("GetBalances", &v1::AdminService::Stub::GetBalances, request,
                     [&s](const v1::GetBalancesResponse& r) { PrintBalances(r, s.now(), s.out()); });
}

// ---------------------------------------------------------------------------------------------
// audit

// How long one `audit --follow` poll waits on the server for a new entry.
constexpr absl::Duration kFollowWait = absl::Seconds(10);
// Entries one follow poll may return (the server's maximum).
constexpr uint32_t kFollowLimit = 10000;
// How often a waiting follow poll checks whether to stop.
constexpr absl::Duration kStopCheckInterval = absl::Milliseconds(100);

// Prints audit entries as they come, in batches: `seq  ts  type  actor  details` with the first
// four columns aligned (the widths only grow, so a follow stays aligned as far as possible), or
// with --json each entry as one line of JSON (JSON Lines).
class AuditPrinter {
 public:
  AuditPrinter(std::ostream& out, bool json) : out_(out), json_(json) {}

  void Print(const google::protobuf::RepeatedPtrField<std::string>& entries) {
    std::vector<std::vector<std::string>> rows;
    for (const std::string& entry : entries) {
      nlohmann::json j = nlohmann::json::parse(entry, nullptr, /*allow_exceptions=*/false);
      const bool object = j.is_object();
      if (object) {
        auto seq = j.find("seq");
        if (seq != j.end() && seq->is_number_unsigned()) {
          last_seq_ = std::max(last_seq_, seq->get<uint64_t>());
        }
      }
      ++printed_;
      if (json_) {
        // The entry as the server sent it (as written to the log), one line per entry.
        if (!object) {
          out_ << OneLine(entry) << "\n";
        } else {
          out_ << (entry.find('\n') == std::string::npos ? entry : j.dump()) << "\n";
        }
        continue;
      }
      if (!object) {
        rows.push_back({"?", "-", "-", "-", OneLine(entry)});
        continue;
      }
      rows.push_back({Field(j, "seq"), Field(j, "ts"), Field(j, "type"), Field(j, "actor"),
                      j.contains("details") ? j["details"].dump() : std::string("{}")});
    }
    for (const auto& row : rows) {
      for (size_t i = 0; i < 4; ++i) widths_[i] = std::max(widths_[i], DisplayWidth(row[i]));
    }
    for (const auto& row : rows) {
      std::string line;
      for (size_t i = 0; i < 4; ++i) {
        std::string pad(widths_[i] - DisplayWidth(row[i]), ' ');
        // seq is a number: right-aligned.
        absl::StrAppend(&line, i == 0 ? pad : "", row[i], i == 0 ? "" : pad, "  ");
      }
      absl::StrAppend(&line, row[4]);
      out_ << absl::StripTrailingAsciiWhitespace(line) << "\n";
    }
    out_.flush();
  }

  // The highest seq printed; 0 if none.
  uint64_t last_seq() const { return last_seq_; }
  size_t printed() const { return printed_; }

 private:
  // A top-level field as text: strings without quotes, "-" when missing or empty.
  static std::string Field(const nlohmann::json& j, const char* name) {
    auto it = j.find(name);
    if (it == j.end() || it->is_null()) return "-";
    std::string text = it->is_string() ? it->get<std::string>() : it->dump();
    return text.empty() ? std::string("-") : OneLine(text);
  }

  std::ostream& out_;
  const bool json_;
  size_t widths_[4] = {0, 0, 0, 0};
  uint64_t last_seq_ = 0;
  size_t printed_ = 0;
};

// One ReadAudit call that gives up as soon as the session is asked to stop: the call runs on
// gRPC's callback API while this thread checks StopRequested() every kStopCheckInterval, and
// cancels the call (CANCELLED) when it turns true.
grpc::Status ReadAuditStoppable(Session& s, const v1::ReadAuditRequest& request,
                                v1::ReadAuditResponse* response, absl::Duration extra_deadline) {
  std::unique_ptr<grpc::ClientContext> context = s.NewCallContext(extra_deadline);
  std::mutex mu;
  std::condition_variable done_cv;
  bool done = false;
  grpc::Status result;
  s.admin().async()->ReadAudit(context.get(), &request, response, [&](grpc::Status status) {
    std::lock_guard<std::mutex> lock(mu);
    result = std::move(status);
    done = true;
    done_cv.notify_all();
  });
  std::unique_lock<std::mutex> lock(mu);
  bool cancelled = false;
  while (!done) {
    done_cv.wait_for(lock, absl::ToChronoMilliseconds(kStopCheckInterval));
    if (!done && !cancelled) {
      lock.unlock();
      if (s.StopRequested()) {
        context->TryCancel();
        cancelled = true;
      }
      lock.lock();
    }
  }
  return result;
}

// Sleeps up to `d`, returning early (true) once the session is asked to stop.
bool SleepUnlessStopped(Session& s, absl::Duration d) {
  const absl::Time until = absl::Now() + d;
  while (absl::Now() < until) {
    if (s.StopRequested()) return true;
    absl::SleepFor(std::min(kStopCheckInterval, until - absl::Now()));
  }
  return s.StopRequested();
}

int AuditCommand(Session& s) {
  v1::ReadAuditRequest request;
  absl::optional<std::string> since_text = s.flag("since");
  if (since_text.has_value()) {
    absl::optional<absl::Time> since = ParseSinceTime(*since_text, s.now());
    if (!since.has_value()) {
      return s.UsageFailure(absl::StrCat(
          "--since: expected an RFC 3339 time like 2026-11-26T13:00:00Z or a duration ago like "
          "1h or 30m, got '", *since_text, "'"));
    }
    *request.mutable_since() = ToProtoTime(*since);
  }
  if (absl::optional<std::string> limit_text = s.flag("limit")) {
    uint32_t limit = 0;
    if (!absl::SimpleAtoi(*limit_text, &limit) || limit < 1 || limit > kFollowLimit) {
      return s.UsageFailure(absl::StrCat("--limit: expected a number from 1 to ", kFollowLimit,
                                         ", got '", *limit_text, "'"));
    }
    request.set_limit(limit);
  }
  const bool follow = s.flag("follow").has_value();
  if (int rc = s.Connect(); rc != kCtlOk) return rc;
  if (follow) s.InstallStopSignals();

  AuditPrinter printer(s.out(), s.json());
  v1::ReadAuditResponse response;
  grpc::Status status;
  if (follow) {
    status = ReadAuditStoppable(s, request, &response, absl::ZeroDuration());
  } else {
    status = s.admin().ReadAudit(s.NewCallContext().get(), request, &response);
  }
  if (!status.ok()) {
    if (follow && s.StopRequested()) return kCtlOk;
    return s.RpcFailure("ReadAudit", status);
  }
  printer.Print(response.entries());
  if (!follow) {
    if (printer.printed() == 0 && !s.json()) {
      s.out() << "No audit entries"
              << (request.has_since()
                      ? absl::StrCat(" since ", FormatIso8601(FromProtoTime(request.since())))
                      : std::string())
              << ".\n";
    }
    return kCtlOk;
  }

  // Follow: ask for what comes after the last entry printed (or, if none was, after the
  // newest entry there is), each poll waiting up to kFollowWait on the server.
  uint64_t cursor = printer.printed() > 0 ? printer.last_seq() : response.last_seq();
  request.set_limit(kFollowLimit);
  *request.mutable_wait() = ToProtoDuration(kFollowWait);
  while (!s.StopRequested()) {
    request.set_after_seq(cursor);
    response.Clear();
    const absl::Time started = absl::Now();
    status = ReadAuditStoppable(s, request, &response, kFollowWait);
    if (!status.ok()) {
      // Cancelled because we were asked to stop: a normal end.
      if (s.StopRequested()) break;
      return s.RpcFailure("ReadAudit", status);
    }
    if (response.entries_size() >= static_cast<int>(kFollowLimit)) {
      s.err() << kProgram << ": warning: more than " << kFollowLimit
              << " entries arrived at once; older ones were skipped\n";
    }
    printer.Print(response.entries());
    cursor = std::max(cursor, printer.last_seq());
    // A server that answers at once with nothing (no wait support, or an empty log at seq 0)
    // must not turn this into a busy loop.
    if (response.entries_size() == 0 && absl::Now() - started < absl::Seconds(1)) {
      if (SleepUnlessStopped(s, absl::Seconds(1))) break;
    }
  }
  s.out().flush();
  return kCtlOk;
}

// ---------------------------------------------------------------------------------------------
// health

// grpc.health.v1.HealthCheckResponse.ServingStatus.
std::string ServingStatusName(uint64_t status) {
  switch (status) {
    case 0:
      return "UNKNOWN";
    case 1:
      return "SERVING";
    case 2:
      return "NOT_SERVING";
    case 3:
      return "SERVICE_UNKNOWN";
    default:
      return absl::StrCat("STATUS_", status);
  }
}

// Reads HealthCheckResponse{ServingStatus status = 1} from its wire bytes. Nullopt if they are
// not a valid message.
absl::optional<uint64_t> ParseHealthCheckResponse(const std::string& bytes) {
  using google::protobuf::internal::WireFormatLite;
  google::protobuf::io::CodedInputStream input(reinterpret_cast<const uint8_t*>(bytes.data()),
                                               static_cast<int>(bytes.size()));
  uint64_t status = 0;  // proto3: absent means the default, UNKNOWN
  while (uint32_t tag = input.ReadTag()) {
    if (tag == WireFormatLite::MakeTag(1, WireFormatLite::WIRETYPE_VARINT)) {
      if (!input.ReadVarint64(&status)) return absl::nullopt;
    } else if (!WireFormatLite::SkipField(&input, tag)) {
      return absl::nullopt;
    }
  }
  if (!input.ConsumedEntireMessage()) return absl::nullopt;
  return status;
}

int PrintHealth(Session& s, const std::string& target, bool healthy, const std::string& status,
                int http_status) {
  if (s.json()) {
    // A plain JSON object (not google::protobuf::Struct, whose Map crashes in Debian's
    // uninstrumented protobuf under ThreadSanitizer).
    nlohmann::ordered_json result;
    result["target"] = target;
    result["status"] = status;
    result["healthy"] = healthy;
    if (http_status != 0) result["http_status"] = http_status;
    s.out() << result.dump() << "\n";
  } else {
    s.out() << target << ": " << status << "\n";
  }
  return healthy ? kCtlOk : kCtlFailed;
}

// `health --http URL`: one GET, no redirects; 200 is healthy.
int HttpHealth(Session& s, const std::string& url) {
  absl::string_view rest = url;
  if (!absl::ConsumePrefix(&rest, "http://") && !absl::ConsumePrefix(&rest, "https://")) {
    return s.UsageFailure(absl::StrCat("--http: expected a URL like http://127.0.0.1:3000/readyz, "
                                       "got '", url, "'"));
  }
  const size_t scheme_size = url.size() - rest.size();
  const size_t slash = rest.find('/');
  const absl::string_view authority = rest.substr(0, slash);
  if (authority.empty()) return s.UsageFailure(absl::StrCat("--http: no host in '", url, "'"));
  // httplib wants "scheme://host:port" and the path apart.
  const std::string origin = url.substr(0, scheme_size + authority.size());
  const std::string path = slash == absl::string_view::npos ? "/" : std::string(rest.substr(slash));
  httplib::Client client(origin);
  if (!client.is_valid()) {
    return s.UsageFailure(absl::StrCat("--http: cannot use '", url, "'"));
  }
  const auto timeout = absl::ToChronoMicroseconds(s.timeout());
  client.set_connection_timeout(timeout);
  client.set_read_timeout(timeout);
  client.set_write_timeout(timeout);
  client.set_follow_location(false);
  httplib::Result res = client.Get(path);
  if (!res) {
    return s.Fail(kCtlUnreachable, absl::StrCat("cannot reach ", url, " (",
                                                httplib::to_string(res.error()), ")"));
  }
  const bool healthy = res->status == 200;
  std::string status = absl::StrCat("HTTP ", res->status);
  if (!healthy) {
    // The first line of the answer says why, often enough ("not ready: no keys").
    std::string body = OneLine(res->body.substr(0, res->body.find('\n')));
    if (body.size() > 200) body = absl::StrCat(body.substr(0, 200), "...");
    if (!body.empty()) absl::StrAppend(&status, " (", body, ")");
  }
  return PrintHealth(s, url, healthy, status, res->status);
}

// `health`: grpc.health.v1.Health/Check for the whole server (service ""), without the admin
// key. Debian ships no generated health stubs, so the call goes through grpc::GenericStub with
// hand-encoded messages: the request HealthCheckRequest{service = ""} is zero bytes, and the
// response is decoded by ParseHealthCheckResponse().
int HealthCommand(Session& s) {
  if (absl::optional<std::string> url = s.flag("http")) return HttpHealth(s, *url);
  if (int rc = s.OpenChannel(); rc != kCtlOk) return rc;
  grpc::GenericStub stub(s.channel());
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + s.timeout()));
  grpc::Slice empty;
  grpc::ByteBuffer request(&empty, 1);
  grpc::ByteBuffer reply;
  std::mutex mu;
  std::condition_variable done_cv;
  bool done = false;
  grpc::Status status;
  stub.UnaryCall(&context, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request, &reply,
                 [&](grpc::Status result) {
                   std::lock_guard<std::mutex> lock(mu);
                   status = std::move(result);
                   done = true;
                   done_cv.notify_all();
                 });
  {
    std::unique_lock<std::mutex> lock(mu);
    done_cv.wait(lock, [&] { return done; });
  }
  const std::string target = absl::StrCat("controlplane ", s.server());
  switch (status.error_code()) {
    case grpc::StatusCode::OK:
      break;
    case grpc::StatusCode::UNAVAILABLE:
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return s.RpcFailure("Health/Check", status);
    case grpc::StatusCode::UNIMPLEMENTED:
      return s.Fail(kCtlFailed, absl::StrCat("the controlplane at ", s.server(),
                                             " does not serve grpc.health.v1.Health"));
    default:
      return s.Fail(kCtlFailed,
                    absl::StrCat("health check of the controlplane at ", s.server(), " failed: ",
                                 OneLine(status.error_message()), " (",
                                 absl::StatusCodeToString(
                                     static_cast<absl::StatusCode>(status.error_code())),
                                 ")"));
  }
  std::vector<grpc::Slice> slices;
  std::string bytes;
  if (reply.Valid() && reply.Dump(&slices).ok()) {
    for (const grpc::Slice& slice : slices) {
      bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
    }
  }
  absl::optional<uint64_t> serving = ParseHealthCheckResponse(bytes);
  if (!serving.has_value()) {
    return s.Fail(kCtlFailed, absl::StrCat("the controlplane at ", s.server(),
                                           " sent an unreadable health check answer"));
  }
  return PrintHealth(s, target, *serving == 1, ServingStatusName(*serving), 0);
}

int HelpCommand(Session& s) {
  if (s.args().empty()) {
    s.out() << GeneralUsage();
    return kCtlOk;
  }
  size_t consumed = 0;
  const Command* command = FindCommand(s.args(), &consumed);
  if (command == nullptr || consumed != s.args().size()) {
    return s.UsageFailure(
        absl::StrCat("no command '", absl::StrJoin(s.args(), " "), "' (see '", kProgram,
                     " help')"));
  }
  s.out() << CommandUsage(*command);
  return kCtlOk;
}

int VersionCommand(Session& s) {
  if (s.json()) {
    nlohmann::ordered_json version;
    version["name"] = kProgram;
    version["version"] = kVersion;
    s.out() << version.dump() << "\n";
    return kCtlOk;
  }
  s.out() << kProgram << " " << kVersion << "\n";
  return kCtlOk;
}

// The command table. Keep it in the order `sflbctl help` should list it.
const std::vector<Command>& Commands() {
  static const auto* commands = new std::vector<Command>{
      {"stats",
       "",
       "Pool totals, one row per key with its usage, and the rate-limit blocks",
       "Summary: key counts, requests, leased assignments, Lease/Report calls answered, watching\n"
       "replicas, snapshot version, key source, uptime.\n"
       "Key columns: INDEX, KEY (masked), FINGERPRINT, ACCOUNT ('-': the key is its own\n"
       "rate-limit scope), STATE, REQUESTS, LAST USED, TOKENS (prompt + completion).\n"
       "Rate-limit blocks (only when there are any): a 429 blocks an (ACCOUNT, MODEL) scope for\n"
       "every key of the account; ACCOUNT '*' is pool-wide, MODEL '*' every model. PHASE is\n"
       "cooling (no traffic for LEFT) or half-open (only the replica in PROBE BY may send one\n"
       "probe request). LIMIT is what was hit (TPM, RPM, ...), STRIKES the 429s in a row.\n",
       {},
       0,
       0,
       StatsCommand},
      {"keys",
       "[--state STATE]",
       "List the keys (masked) with their state and why",
       "Columns: INDEX, KEY (masked), FINGERPRINT, ACCOUNT ('-': its own rate-limit scope),\n"
       "STATE, LEFT (time until a cooling key is back), REASON (why the state; plus how many\n"
       "models its account is refused), REQUESTS, LAST USED. Rate-limit blocks of accounts\n"
       "are in 'sflbctl stats' and 'sflbctl keys show KEY'.\n",
       {{"state", "STATE",
         absl::StrCat("only keys in STATE: ", absl::StrJoin(FilterableStates(), ", "))}},
       0,
       0,
       KeysCommand},
      {"keys show",
       "KEY",
       "One key in detail, the blocks on it, and why it is (not) used",
       "KEY is an index (3), a fingerprint or a unique prefix of it (6+ hex digits), or id:N.\n"
       "Prints the key's state with its reason, since/until, the upstream answer that caused\n"
       "it and who set it; its usage and forbidden models; the rate-limit blocks of its account\n"
       "and pool-wide ones; and the controlplane's explanation. --json prints GetKeyResponse.\n"
       "Exit 1 if no key matches, 2 if the reference is ambiguous or malformed.\n",
       {},
       1,
       1,
       KeysShowCommand},
      {"keys disable",
       "KEY [--reason TEXT]",
       "Take a key out of rotation until enabled",
       "KEY as in 'keys show'. Prints the key's new state; --json prints SetKeyStateResponse.\n",
       {{"reason", "TEXT", "recorded with the state (default: 'sflbctl disable by $USER')"}},
       1,
       1,
       KeysDisableCommand},
      {"keys enable",
       "KEY [--reason TEXT]",
       "Put a key back into rotation (clears disabled, invalid, depleted, cooling)",
       "Also forgets the models refused to the key's account and lifts its account's\n"
       "rate-limit blocks. KEY as in 'keys show'.\n",
       {{"reason", "TEXT", "recorded with the state (default: 'sflbctl enable by $USER')"}},
       1,
       1,
       KeysEnableCommand},
      {"keys cooldown",
       "KEY --duration DURATION [--reason TEXT]",
       "Take a key out of rotation for a while",
       "The key is cooling for DURATION (1s .. 7 days), then active again. KEY as in\n"
       "'keys show'.\n",
       {{"duration", "DURATION", "how long, e.g. 90s, 5m or 1h (required)"},
        {"reason", "TEXT", "recorded with the state (default: 'sflbctl cooldown by $USER')"}},
       1,
       1,
       KeysCooldownCommand},
      {"reload",
       "[--reason TEXT]",
       "Re-read the key source (keys file, else SILICONFLOW_API_KEY_N)",
       "Atomic: if the source has no usable key, the running keys stay and sflbctl exits 1.\n",
       {{"reason", "TEXT",
         "recorded in the controlplane's log (default: 'sflbctl reload by $USER')"}},
       0,
       0,
       ReloadCommand},
      {"balance",
       "[--refresh]",
       "Account balances per key (from the upstream's user/info), with their total",
       "Columns: INDEX, KEY FINGERPRINT, ACCOUNT ID (the upstream's account of the key), STATUS\n"
       "(ok; unavailable: the upstream no longer offers balances, HTTP 404/410; error: see\n"
       "ERROR), BALANCE (totalBalance, 4 places), CHECKED (when the upstream was asked), ERROR.\n"
       "TOTAL sums the known balances; the last line says what was and was not known.\n"
       "Answers come from the controlplane's cache (5 minutes) unless --refresh. A known\n"
       "balance at or below the threshold marks the key depleted. Balances being unavailable\n"
       "is information, not a failure: exit 0. The call's deadline defaults to 60s here.\n"
       "--json prints GetBalancesResponse.\n",
       {{"refresh", "", "ask the upstream now instead of answering from the cache"}},
       0,
       0,
       BalanceCommand},
      {"audit",
       "[--since TIME] [--limit N] [--follow]",
       "The controlplane's audit log: reloads, key state changes, admin calls",
       "One line per entry, oldest first: SEQ, TIME (UTC), TYPE, ACTOR and the details as\n"
       "compact JSON. --json prints each entry as one JSON object per line (JSON Lines).\n"
       "--follow keeps printing new entries as they are written until interrupted (Ctrl-C\n"
       "or SIGTERM; exit 0). Exit 1 if the controlplane runs without an audit log.\n",
       {{"since", "TIME",
         "only entries at or after TIME: RFC 3339 (2026-11-26T13:00:00Z), a date, or a "
         "duration ago (1h, 30m, 2d)"},
        {"limit", "N", "the newest N entries (1 .. 10000; default 100)"},
        {"follow", "", "then keep waiting for new entries and print them as they come"}},
       0,
       0,
       AuditCommand},
      {"health",
       "[--http URL]",
       "Check that the controlplane (or, with --http, any HTTP endpoint) is serving",
       "Calls the controlplane's standard grpc.health.v1.Health/Check; needs no admin key.\n"
       "Prints 'controlplane ADDR: SERVING'. With --http URL it GETs URL instead (e.g. a\n"
       "dataplane's http://127.0.0.1:3000/readyz) and prints 'URL: HTTP 200', so container\n"
       "health checks need no curl. Exit 0 when serving (HTTP 200), 1 when not, 3 when\n"
       "unreachable.\n",
       {{"http", "URL", "GET URL instead; healthy means HTTP 200 (redirects not followed)"}},
       0,
       0,
       HealthCommand},
      {"help",
       "[COMMAND]",
       "Show the command list, or one command's usage",
       "",
       {},
       0,
       kAnyNumber,
       HelpCommand},
      {"version", "", "Print sflbctl's version", "", {}, 0, 0, VersionCommand},
  };
  return *commands;
}

}  // namespace

int RunCtl(const std::vector<std::string>& args, const EnvLookup& env, std::ostream& out,
           std::ostream& err) {
  return RunCtl(args, env, out, err, nullptr);
}

int RunCtl(const std::vector<std::string>& args, const EnvLookup& env, std::ostream& out,
           std::ostream& err, const std::function<bool()>& stop_requested) {
  Invocation inv;
  if (absl::optional<UsageError> error = ParseCommandLine(args, env, &inv)) {
    err << kProgram << ": " << error->message << "\n\n"
        << (error->command != nullptr ? CommandUsage(*error->command) : GeneralUsage());
    return kCtlUsage;
  }
  if (inv.command == nullptr) {
    // `sflbctl --help` asks for help; a bare `sflbctl` is a usage error.
    (inv.help ? out : err) << GeneralUsage();
    return inv.help ? kCtlOk : kCtlUsage;
  }
  if (inv.help) {
    out << CommandUsage(*inv.command);
    return kCtlOk;
  }
  Session session(inv, env, out, err, stop_requested);
  return inv.command->handler(session);
}

}  // namespace sflb
