#include "common/options.h"

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

namespace sflb {

EnvLookup ProcessEnv() {
  return [](const std::string& name) -> absl::optional<std::string> {
    const char* value = std::getenv(name.c_str());
    if (value == nullptr) return absl::nullopt;
    return std::string(value);
  };
}

absl::optional<absl::Duration> ParseDurationSetting(absl::string_view text) {
  text = absl::StripAsciiWhitespace(text);
  double seconds;
  if (absl::SimpleAtod(text, &seconds)) {
    // SimpleAtod accepts "inf", "nan" and overflowing exponents: none is a usable duration.
    if (!std::isfinite(seconds) || seconds < 0 || seconds > 1e9) return absl::nullopt;
    return absl::Seconds(seconds);
  }
  absl::Duration d;
  if (absl::ParseDuration(text, &d) && d >= absl::ZeroDuration() && d != absl::InfiniteDuration()) {
    return d;
  }
  return absl::nullopt;
}

OptionParser::OptionParser(std::string program, std::string summary)
    : program_(std::move(program)), summary_(std::move(summary)) {}

void OptionParser::Add(Option option) { options_.push_back(std::move(option)); }

void OptionParser::AddString(std::string flag, std::string env, std::string* target,
                             std::string help) {
  Add({std::move(flag), std::move(env), Kind::kString, target, 0, 0, std::move(help),
       target->empty() ? "(unset)" : *target});
}

void OptionParser::AddSecret(std::string flag, std::string env, std::string* target,
                             std::string help) {
  Add({std::move(flag), std::move(env), Kind::kSecret, target, 0, 0, std::move(help),
       "(secret)"});
}

void OptionParser::AddInt(std::string flag, std::string env, int64_t* target, int64_t min,
                          int64_t max, std::string help) {
  Add({std::move(flag), std::move(env), Kind::kInt, target, min, max, std::move(help),
       absl::StrCat(*target)});
}

void OptionParser::AddDuration(std::string flag, std::string env, absl::Duration* target,
                               std::string help) {
  Add({std::move(flag), std::move(env), Kind::kDuration, target, 0, 0, std::move(help),
       absl::FormatDuration(*target)});
}

void OptionParser::AddBool(std::string flag, std::string env, bool* target, std::string help) {
  Add({std::move(flag), std::move(env), Kind::kBool, target, 0, 0, std::move(help),
       *target ? "true" : "false"});
}

absl::Status OptionParser::Apply(const Option& option, absl::string_view value,
                                 absl::string_view where) {
  switch (option.kind) {
    case Kind::kString:
    case Kind::kSecret:
      *static_cast<std::string*>(option.target) = std::string(value);
      return absl::OkStatus();
    case Kind::kInt: {
      int64_t n;
      if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(value), &n) || n < option.min ||
          n > option.max) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": expected a whole number from ",
                                                       option.min, " to ", option.max, ", got '",
                                                       absl::CEscape(value), "'"));
      }
      *static_cast<int64_t*>(option.target) = n;
      return absl::OkStatus();
    }
    case Kind::kDuration: {
      absl::optional<absl::Duration> d = ParseDurationSetting(value);
      if (!d.has_value()) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": expected a duration like 30s, 5m or 250ms, got '",
                         absl::CEscape(value), "'"));
      }
      *static_cast<absl::Duration*>(option.target) = *d;
      return absl::OkStatus();
    }
    case Kind::kBool: {
      std::string v = absl::AsciiStrToLower(absl::StripAsciiWhitespace(value));
      bool* b = static_cast<bool*>(option.target);
      if (v == "1" || v == "true" || v == "yes" || v == "on") {
        *b = true;
      } else if (v == "0" || v == "false" || v == "no" || v == "off") {
        *b = false;
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": expected true or false, got '", absl::CEscape(value), "'"));
      }
      return absl::OkStatus();
    }
  }
  return absl::InternalError("unknown option kind");
}

absl::Status OptionParser::Parse(int argc, const char* const* argv, const EnvLookup& env) {
  for (const Option& option : options_) {
    if (option.env.empty()) continue;
    absl::optional<std::string> value = env(option.env);
    if (!value.has_value()) continue;
    absl::Status status = Apply(option, *value, absl::StrCat("environment variable ", option.env));
    if (!status.ok()) return status;
  }
  for (int i = 1; i < argc; ++i) {
    absl::string_view arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      help_requested_ = true;
      continue;
    }
    if (!absl::ConsumePrefix(&arg, "--")) {
      return absl::InvalidArgumentError(
          absl::StrCat("unexpected argument '", absl::CEscape(arg), "' (see --help)"));
    }
    absl::string_view name = arg;
    absl::optional<std::string> value;
    size_t eq = arg.find('=');
    if (eq != absl::string_view::npos) {
      name = arg.substr(0, eq);
      value = std::string(arg.substr(eq + 1));
    }
    const Option* match = nullptr;
    bool from_file = false;
    for (const Option& option : options_) {
      if (option.kind == Kind::kSecret) {
        if (name == absl::StrCat(option.flag, "-file")) {
          match = &option;
          from_file = true;
        } else if (name == option.flag) {
          return absl::InvalidArgumentError(absl::StrCat(
              "--", option.flag, " is a secret and is not accepted on the command line (visible "
              "in ps); set ", option.env, " or use --", option.flag, "-file PATH"));
        }
      } else if (name == option.flag) {
        match = &option;
      }
      if (match != nullptr) break;
    }
    if (match == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown flag --", absl::CEscape(name), " (see --help)"));
    }
    if (!value.has_value()) {
      if (match->kind == Kind::kBool && !from_file) {
        value = "true";
      } else if (i + 1 < argc) {
        value = argv[++i];
      } else {
        return absl::InvalidArgumentError(absl::StrCat("--", name, " needs a value"));
      }
    }
    if (from_file) {
      std::ifstream in(*value, std::ios::binary);
      if (!in || !std::filesystem::is_regular_file(*value)) {
        return absl::InvalidArgumentError(
            absl::StrCat("--", name, ": cannot read '", *value, "'"));
      }
      std::ostringstream content;
      content << in.rdbuf();
      std::string secret = content.str();
      while (!secret.empty() && (secret.back() == '\n' || secret.back() == '\r')) secret.pop_back();
      *static_cast<std::string*>(match->target) = secret;
      continue;
    }
    absl::Status status = Apply(*match, *value, absl::StrCat("--", name));
    if (!status.ok()) return status;
  }
  return absl::OkStatus();
}

std::string OptionParser::Usage() const {
  std::string out = absl::StrCat("Usage: ", program_, " [flags]\n\n", summary_,
                                 "\n\nEvery setting is an environment variable or a flag (the flag "
                                 "wins).\nSecrets are read from the variable or from a file given "
                                 "with --<name>-file, never from the command line.\n\n");
  for (const Option& option : options_) {
    std::string flag = option.kind == Kind::kSecret ? absl::StrCat("--", option.flag, "-file PATH")
                                                    : absl::StrCat("--", option.flag);
    absl::StrAppend(&out, "  ", flag);
    if (!option.env.empty()) absl::StrAppend(&out, " / ", option.env);
    absl::StrAppend(&out, "\n      ", option.help, " [default: ", option.default_text, "]\n");
  }
  absl::StrAppend(&out, "  --help\n      Show this text.\n");
  return out;
}

}  // namespace sflb
