#include "common/keys_file.h"

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/key_format.h"

namespace sflb {
namespace {

bool IsKeyChar(char c) {
  // Printable ASCII except space; '=' would make "key=value" ambiguous.
  return c > 0x20 && c < 0x7f && c != '=';
}

// Validates one attribute token "name=value" into `spec`. Returns an error text or "".
std::string ApplyAttribute(absl::string_view token, KeySpec* spec) {
  size_t eq = token.find('=');
  if (eq == absl::string_view::npos) {
    return "unexpected text after the key (whitespace inside a key?)";
  }
  absl::string_view name = token.substr(0, eq);
  absl::string_view value = token.substr(eq + 1);
  if (name != "account") {
    return absl::StrCat("unknown attribute '", absl::CEscape(name), "' (known: account)");
  }
  if (value.empty() || value.size() > 128) return "account= needs a value of 1 to 128 characters";
  for (char c : value) {
    if (!(absl::ascii_isalnum(c) || c == '-' || c == '_' || c == '.' || c == ':' || c == '@')) {
      return "account= may hold letters, digits and - _ . : @ only";
    }
  }
  spec->account = std::string(value);
  return "";
}

void AddUnique(KeySpec spec, absl::flat_hash_set<std::string>* seen, KeySet* out) {
  if (!seen->insert(spec.secret).second) {
    out->warnings.push_back(absl::StrCat(spec.origin, ": duplicate key ", MaskKey(spec.secret),
                                         " (fingerprint ", KeyFingerprint(spec.secret),
                                         "), used once"));
    return;
  }
  out->keys.push_back(std::move(spec));
}

}  // namespace

KeySet ParseKeysText(absl::string_view text, absl::string_view source_name) {
  KeySet out;
  out.source = std::string(source_name);
  absl::flat_hash_set<std::string> seen;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_number;
    std::string origin = absl::StrCat(source_name, ":", line_number);
    absl::string_view trimmed = absl::StripAsciiWhitespace(line);  // also strips '\r'
    if (trimmed.empty() || trimmed.front() == '#') continue;

    std::vector<absl::string_view> tokens =
        absl::StrSplit(trimmed, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    absl::string_view secret = tokens.front();
    std::string error;
    for (char c : trimmed) {
      if (static_cast<unsigned char>(c) < 0x20 && c != '\t') {
        error = "control character in line";
        break;
      }
      if (static_cast<unsigned char>(c) >= 0x7f) {
        error = "non-ASCII character in line";
        break;
      }
    }
    if (error.empty()) {
      for (char c : secret) {
        if (!IsKeyChar(c)) {
          error = "key contains '=' (attributes go after the key, separated by a space)";
          break;
        }
      }
    }
    KeySpec spec{std::string(secret), "", origin};
    for (size_t i = 1; error.empty() && i < tokens.size(); ++i) {
      error = ApplyAttribute(tokens[i], &spec);
    }
    if (!error.empty()) {
      out.warnings.push_back(absl::StrCat(origin, ": ", error, "; line skipped"));
      continue;
    }
    AddUnique(std::move(spec), &seen, &out);
  }
  return out;
}

KeySet ReadKeysFromEnv(
    const std::function<absl::optional<std::string>(const std::string&)>& getenv) {
  KeySet out;
  out.source = "env:SILICONFLOW_API_KEY_N";
  absl::flat_hash_set<std::string> seen;
  for (int n = 1;; ++n) {
    std::string name = absl::StrCat("SILICONFLOW_API_KEY_", n);
    absl::optional<std::string> value = getenv(name);
    if (!value.has_value()) break;
    std::string origin = absl::StrCat("env:", name);
    // An env value is parsed like one keys.txt line, so "sk-x account=a" works there too.
    KeySet one = ParseKeysText(*value, origin);
    for (std::string& warning : one.warnings) {
      // ParseKeysText appends ":1"; for a variable the line number says nothing.
      // Keep "line N" only when the value has several lines.
      absl::string_view w = warning;
      std::string prefix = absl::StrCat(origin, ":1:");
      if (absl::StartsWith(w, prefix)) {
        w.remove_prefix(prefix.size());
        out.warnings.push_back(absl::StrCat(origin, ":", w));
      } else {
        out.warnings.push_back(warning);
      }
    }
    if (one.keys.empty() && one.warnings.empty()) {
      out.warnings.push_back(absl::StrCat(origin, ": empty value, skipped"));
    }
    for (KeySpec& spec : one.keys) {
      spec.origin = origin;
      AddUnique(std::move(spec), &seen, &out);
    }
  }
  return out;
}

absl::StatusOr<KeySet> LoadKeySource(
    const std::string& keys_file,
    const std::function<absl::optional<std::string>(const std::string&)>& getenv) {
  std::ifstream in(keys_file, std::ios::binary);
  KeySet keys;
  std::error_code ec;
  if (in && std::filesystem::is_directory(keys_file, ec)) {
    return absl::InternalError(absl::StrCat(keys_file, ": is a directory, not a keys file"));
  }
  if (in) {
    std::ostringstream content;
    content << in.rdbuf();
    if (in.bad()) {
      return absl::InternalError(absl::StrCat(keys_file, ": read error: ", std::strerror(errno)));
    }
    keys = ParseKeysText(content.str(), keys_file);
  } else if (errno == EACCES) {
    return absl::PermissionDeniedError(absl::StrCat(keys_file, ": ", std::strerror(errno)));
  } else {
    keys = ReadKeysFromEnv(getenv);
    if (keys.keys.empty() && keys.warnings.empty()) {
      return absl::NotFoundError(absl::StrCat("no keys file at '", keys_file,
                                              "' and no SILICONFLOW_API_KEY_1 in the environment"));
    }
  }
  if (keys.keys.empty()) {
    std::string why = keys.warnings.empty() ? "it holds no keys"
                                            : absl::StrJoin(keys.warnings, "; ");
    return absl::FailedPreconditionError(
        absl::StrCat(keys.source, ": no usable key (", why, ")"));
  }
  return keys;
}

}  // namespace sflb
