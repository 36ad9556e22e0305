#include "controlplane/balance_checker.h"

#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <thread>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/strip.h"
#include "common/key_format.h"
#include "common/log.h"
#include "common/version.h"
#include "nlohmann/json.hpp"

namespace sflb {
namespace {

using json = nlohmann::json;

constexpr size_t kMaxBodyBytes = 1 << 20;
// Longest piece of upstream text copied into an error message.
constexpr size_t kMaxMessageChars = 200;
// SiliconFlow's "success" code in user/info bodies.
constexpr int64_t kUpstreamOk = 20000;

// Replaces every occurrence of `secret` in `text` by its mask, then truncates the text.
std::string Scrub(absl::string_view text, const std::string& secret) {
  std::string out(text.substr(0, 4 * kMaxMessageChars));
  if (!secret.empty()) out = absl::StrReplaceAll(out, {{secret, MaskKey(secret)}});
  if (out.size() > kMaxMessageChars) out = absl::StrCat(out.substr(0, kMaxMessageChars), "...");
  return out;
}

// A JSON scalar as short text, for error messages.
std::string ScalarText(const json& j) {
  if (j.is_string()) return j.get<std::string>();
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

// The upstream's own explanation in an error body ({"message": ...} or {"error": {"message"}}).
std::string UpstreamMessage(const std::string& body) {
  json j = json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) return "";
  auto m = j.find("message");
  if (m != j.end() && m->is_string()) return m->get<std::string>();
  auto e = j.find("error");
  if (e != j.end() && e->is_object()) {
    auto em = e->find("message");
    if (em != e->end() && em->is_string()) return em->get<std::string>();
  }
  if (e != j.end() && e->is_string()) return e->get<std::string>();
  return "";
}

std::string WithMessage(std::string error, const std::string& message, const std::string& secret) {
  if (!message.empty()) absl::StrAppend(&error, ": ", Scrub(message, secret));
  return error;
}

}  // namespace

const char* BalanceStatusName(BalanceStatus status) {
  switch (status) {
    case BalanceStatus::kOk:
      return "ok";
    case BalanceStatus::kUnavailable:
      return "unavailable";
    case BalanceStatus::kError:
      return "error";
  }
  return "error";
}

absl::StatusOr<std::string> NormalizeDecimal(absl::string_view text, int places) {
  auto invalid = [&text]() {
    return absl::InvalidArgumentError(
        absl::StrCat("not a decimal number: \"", text.substr(0, 40), "\""));
  };
  if (places < 0 || places > 18) return absl::InvalidArgumentError("places must be in [0, 18]");
  if (text.empty() || text.size() > 64) return invalid();
  absl::string_view rest = text;
  const bool negative = absl::ConsumePrefix(&rest, "-");
  size_t dot = rest.find('.');
  absl::string_view int_part = rest.substr(0, dot);
  absl::string_view frac_part =
      dot == absl::string_view::npos ? absl::string_view() : rest.substr(dot + 1);
  auto all_digits = [](absl::string_view s) {
    return std::all_of(s.begin(), s.end(),
                       [](char c) { return absl::ascii_isdigit(static_cast<unsigned char>(c)); });
  };
  if (int_part.empty() || !all_digits(int_part) || !all_digits(frac_part)) return invalid();
  if (dot != absl::string_view::npos && frac_part.empty()) return invalid();  // "5."

  // All kept digits in one string, rounded half away from zero on the first dropped digit.
  const size_t kept_frac = static_cast<size_t>(places);
  std::string digits(int_part);
  std::string frac(frac_part.substr(0, kept_frac));
  frac.append(kept_frac - frac.size(), '0');
  digits += frac;
  if (frac_part.size() > kept_frac && frac_part[kept_frac] >= '5') {
    size_t i = digits.size();
    while (i > 0) {
      --i;
      if (digits[i] == '9') {
        digits[i] = '0';
        if (i == 0) digits.insert(digits.begin(), '1');
      } else {
        ++digits[i];
        break;
      }
    }
  }
  std::string int_digits = digits.substr(0, digits.size() - kept_frac);
  const std::string frac_digits = digits.substr(digits.size() - kept_frac);
  size_t first = int_digits.find_first_not_of('0');
  int_digits = first == std::string::npos ? "0" : int_digits.substr(first);
  const bool zero = int_digits == "0" && frac_digits.find_first_not_of('0') == std::string::npos;
  std::string out = negative && !zero ? "-" : "";
  absl::StrAppend(&out, int_digits);
  if (kept_frac > 0) absl::StrAppend(&out, ".", frac_digits);
  return out;
}

BalanceFetchFn DefaultBalanceFetch(const std::string& base_url, absl::Duration timeout) {
  // Split "scheme://authority/path" into httplib's "scheme://authority" and the path prefix.
  std::string origin;
  std::string path;
  std::string config_error;
  absl::string_view url = absl::StripAsciiWhitespace(base_url);
  size_t sep = url.find("://");
  const std::string scheme =
      sep == absl::string_view::npos ? "" : absl::AsciiStrToLower(url.substr(0, sep));
  if (scheme != "http" && scheme != "https") {
    config_error = "invalid base URL: must start with http:// or https://";
  } else {
    absl::string_view rest = url.substr(sep + 3);
    size_t slash = rest.find('/');
    absl::string_view authority = rest.substr(0, slash);
    absl::string_view prefix =
        slash == absl::string_view::npos ? absl::string_view() : rest.substr(slash);
    while (absl::ConsumeSuffix(&prefix, "/")) {
    }
    if (authority.empty() || absl::StrContains(authority, '@')) {
      config_error = "invalid base URL: bad host";
    } else if (absl::StrContains(rest, '?') || absl::StrContains(rest, '#')) {
      config_error = "invalid base URL: query or fragment not allowed";
    } else {
      origin = absl::StrCat(scheme, "://", authority);
      path = absl::StrCat(prefix, "/user/info");
    }
  }
  if (!config_error.empty()) LogWarning("balance_base_url_invalid", {{"error", config_error}});

  return [origin, path, config_error, timeout](const std::string& secret) -> FetchResult {
    FetchResult out;
    if (!config_error.empty()) {
      out.error = config_error;
      return out;
    }
    // One client (one connection) per call: calls run in parallel, and httplib::Client
    // serialises the requests made through one instance.
    httplib::Client client(origin);
    const auto chrono_timeout = absl::ToChronoMicroseconds(timeout);
    client.set_connection_timeout(chrono_timeout);
    client.set_read_timeout(chrono_timeout);
    client.set_write_timeout(chrono_timeout);
    client.enable_server_certificate_verification(true);
    client.set_follow_location(false);
    client.set_keep_alive(false);
    const httplib::Headers headers = {{"Authorization", absl::StrCat("Bearer ", secret)},
                                      {"Accept", "application/json"},
                                      {"User-Agent", absl::StrCat(kProductName, "/", kVersion)}};

    const absl::Time deadline = absl::Now() + timeout;
    bool too_big = false;
    bool timed_out = false;
    std::string body;
    httplib::Result res = client.Get(path, headers, [&](const char* data, size_t length) {
      if (body.size() + length > kMaxBodyBytes) {
        too_big = true;
        return false;
      }
      body.append(data, length);
      if (absl::Now() > deadline) {
        timed_out = true;
        return false;
      }
      return true;
    });
    if (!res) {
      if (too_big) {
        out.error = "response body larger than 1 MiB";
      } else if (timed_out) {
        out.error = "timed out reading the response";
      } else {
        out.error = absl::StrCat("request failed (", httplib::to_string(res.error()), ")");
      }
      return out;
    }
    out.http_status = res->status;
    out.body = std::move(body);
    return out;
  };
}

BalanceChecker::BalanceChecker(BalanceCheckerOptions options)
    : options_(std::move(options)),
      fetch_(options_.fetch ? options_.fetch
                            : DefaultBalanceFetch(options_.base_url, options_.timeout)) {}

BalanceChecker::~BalanceChecker() = default;

bool BalanceChecker::FreshLocked(const KeyBalance& cached, absl::Time now) const {
  const absl::Duration ttl =
      cached.status == BalanceStatus::kError ? options_.error_ttl : options_.cache_ttl;
  return now - cached.checked_at < ttl;
}

std::vector<KeyBalance> BalanceChecker::Get(const std::vector<BalanceTarget>& keys, bool refresh) {
  std::vector<KeyBalance> out(keys.size());
  // A key answered by a fetch: ours (`mine`) or one another caller already started.
  struct Job {
    size_t index = 0;
    std::shared_ptr<Pending> pending;
    bool mine = false;
  };
  std::vector<Job> jobs;
  std::vector<size_t> mine;  // indexes into jobs
  {
    MutexLock lock(&mu_);
    const absl::Time now = options_.clock->Now();
    for (size_t i = 0; i < keys.size(); ++i) {
      const BalanceTarget& key = keys[i];
      if (!refresh) {
        auto cached = cache_.find(key.id);
        if (cached != cache_.end() && cached->second.fingerprint == key.fingerprint &&
            FreshLocked(cached->second, now)) {
          out[i] = cached->second;
          out[i].from_cache = true;
          continue;
        }
      }
      auto running = pending_.find(key.id);
      if (running != pending_.end()) {
        jobs.push_back(Job{i, running->second, false});
        continue;
      }
      auto pending = std::make_shared<Pending>();
      pending_[key.id] = pending;
      mine.push_back(jobs.size());
      jobs.push_back(Job{i, std::move(pending), true});
    }
  }

  // A small worker set over a shared queue; FetchOne also takes a global slot, so concurrent
  // Get() calls together stay within max_concurrency.
  std::atomic<size_t> next{0};
  auto work = [&]() {
    for (size_t n = next.fetch_add(1); n < mine.size(); n = next.fetch_add(1)) {
      const Job& job = jobs[mine[n]];
      FetchOne(keys[job.index], job.pending);
    }
  };
  const size_t workers =
      std::min(mine.size(), static_cast<size_t>(std::max(1, options_.max_concurrency)));
  std::vector<std::thread> threads;
  for (size_t i = 1; i < workers; ++i) threads.emplace_back(work);
  if (workers > 0) work();
  for (std::thread& t : threads) t.join();

  size_t ok = 0, unavailable = 0, failed = 0;
  {
    MutexLock lock(&mu_);
    for (const Job& job : jobs) {
      // Our own fetches are done; another caller's finish within their own timeout.
      while (!job.pending->done) changed_.WaitWithTimeout(&mu_, absl::Seconds(1));
      out[job.index] = job.pending->result;
      out[job.index].fingerprint = keys[job.index].fingerprint;
    }
    for (size_t n : mine) {
      switch (jobs[n].pending->result.status) {
        case BalanceStatus::kOk:
          ++ok;
          break;
        case BalanceStatus::kUnavailable:
          ++unavailable;
          break;
        case BalanceStatus::kError:
          ++failed;
          break;
      }
    }
  }
  if (!mine.empty()) {
    LogInfo("balance_check", {{"keys", keys.size()},
                              {"fetched", mine.size()},
                              {"ok", ok},
                              {"unavailable", unavailable},
                              {"error", failed},
                              {"refresh", refresh}});
  }
  return out;
}

void BalanceChecker::FetchOne(const BalanceTarget& target,
                              const std::shared_ptr<Pending>& pending) {
  {
    MutexLock lock(&mu_);
    const int limit = std::max(1, options_.max_concurrency);
    while (active_fetches_ >= limit) changed_.WaitWithTimeout(&mu_, absl::Seconds(1));
    ++active_fetches_;
    ++fetch_count_;
  }
  FetchResult fetched;
  try {
    fetched = fetch_(target.secret);
  } catch (const std::exception& e) {
    // The seam promises not to throw; a throwing fetch must not take the controlplane down.
    fetched = FetchResult{};
    fetched.error = Scrub(absl::StrCat("fetch threw: ", e.what()), target.secret);
  }
  KeyBalance result = Interpret(target, fetched);

  bool first_unavailable = false;
  {
    MutexLock lock(&mu_);
    --active_fetches_;
    cache_[target.id] = result;
    pending->result = result;
    pending->done = true;
    auto it = pending_.find(target.id);
    if (it != pending_.end() && it->second == pending) pending_.erase(it);
    if (result.status == BalanceStatus::kUnavailable && !logged_unavailable_) {
      logged_unavailable_ = true;
      first_unavailable = true;
    }
    changed_.SignalAll();
  }
  if (result.status == BalanceStatus::kError) {
    LogWarning("balance_check_failed", {{"fingerprint", target.fingerprint},
                                        {"http_status", result.http_status},
                                        {"error", result.error}});
  } else if (first_unavailable) {
    LogWarning("balance_endpoint_unavailable",
               {{"http_status", result.http_status},
                {"message", "user/info answers as retired; balances are reported unavailable"}});
  }
}

KeyBalance BalanceChecker::Interpret(const BalanceTarget& target,
                                     const FetchResult& fetched) const {
  KeyBalance b;
  b.id = target.id;
  b.fingerprint = target.fingerprint;
  b.checked_at = options_.clock->Now();
  b.http_status = fetched.http_status;
  b.status = BalanceStatus::kError;
  const std::string& secret = target.secret;
  const int code = fetched.http_status;

  if (code == 0) {
    b.error = Scrub(fetched.error.empty() ? "request failed" : fetched.error, secret);
    return b;
  }
  if (code == 410 || code == 404) {
    b.status = BalanceStatus::kUnavailable;
    b.error = absl::StrCat("balance endpoint retired upstream (HTTP ", code, ")");
    return b;
  }
  if (code != 200) {
    std::string what = absl::StrCat("HTTP ", code);
    if (code == 401 || code == 403) {
      what = absl::StrCat("key rejected upstream (HTTP ", code, ")");
    } else if (code == 429) {
      what = "rate limited upstream (HTTP 429)";
    } else if (code >= 500) {
      what = absl::StrCat("upstream error (HTTP ", code, ")");
    }
    b.error = WithMessage(what, UpstreamMessage(fetched.body), secret);
    return b;
  }

  json j = json::parse(fetched.body, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) {
    b.error = "unexpected user/info answer: not a JSON object";
    return b;
  }
  auto code_field = j.find("code");
  if (code_field != j.end() &&
      !(code_field->is_number_integer() && code_field->get<int64_t>() == kUpstreamOk)) {
    b.error = WithMessage(absl::StrCat("upstream code ", Scrub(ScalarText(*code_field), secret)),
                          UpstreamMessage(fetched.body), secret);
    return b;
  }
  auto status_field = j.find("status");
  if (status_field != j.end() && status_field->is_boolean() && !status_field->get<bool>()) {
    b.error = WithMessage("upstream status false", UpstreamMessage(fetched.body), secret);
    return b;
  }
  auto data = j.find("data");
  if (data == j.end() || !data->is_object()) {
    b.error = "unexpected user/info answer: no data object";
    return b;
  }
  auto total = data->find("totalBalance");
  if (total == data->end() || !(total->is_string() || total->is_number())) {
    b.error = "unexpected user/info answer: no data.totalBalance";
    return b;
  }
  const std::string total_text = ScalarText(*total);
  absl::StatusOr<std::string> normalized = NormalizeDecimal(total_text, 4);
  double value = 0;
  if (!normalized.ok() || !absl::SimpleAtod(*normalized, &value)) {
    b.error = absl::StrCat("unexpected data.totalBalance \"", Scrub(total_text, secret), "\"");
    return b;
  }
  b.status = BalanceStatus::kOk;
  b.total_balance = *normalized;
  b.total_balance_value = value;
  auto id = data->find("id");
  if (id != data->end() && (id->is_string() || id->is_number())) {
    b.account_id = Scrub(ScalarText(*id), secret);
  }
  return b;
}

absl::optional<KeyBalance> BalanceChecker::Cached(uint64_t id) const {
  MutexLock lock(&mu_);
  auto it = cache_.find(id);
  if (it == cache_.end()) return absl::nullopt;
  KeyBalance b = it->second;
  b.from_cache = true;
  return b;
}

uint64_t BalanceChecker::fetch_count() const {
  MutexLock lock(&mu_);
  return fetch_count_;
}

}  // namespace sflb
