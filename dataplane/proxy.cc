#include "dataplane/proxy.h"

#include <algorithm>
#include <memory>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/types/optional.h"
#include "common/cooldown_policy.h"
#include "common/log.h"
#include "common/time_format.h"
#include "dataplane/error_response.h"
#include "dataplane/forwarding.h"
#include "dataplane/response_stream.h"
#include "dataplane/stream_relay.h"

namespace sflb {
namespace {

// Upstream answers that say "this key (or its account) cannot serve this now": worth another key.
bool IsKeyFailure(int status) {
  return status == 429 || status == 401 || status == 403 || status == 502 || status == 503 ||
         status == 504;
}

v1::OutcomeKind OutcomeFor(int status) {
  switch (status) {
    case 429: return v1::OUTCOME_KIND_RATE_LIMITED;
    case 401: return v1::OUTCOME_KIND_UNAUTHORIZED;
    case 403: return v1::OUTCOME_KIND_FORBIDDEN;
    default: return v1::OUTCOME_KIND_UPSTREAM_ERROR;
  }
}

// Reads a whole body of at most `limit` bytes. OUT_OF_RANGE when larger.
absl::Status ReadAll(UpstreamExchange* exchange, size_t limit, std::string* out) {
  for (;;) {
    absl::StatusOr<absl::string_view> piece = exchange->ReadSome();
    if (!piece.ok()) return piece.status();
    if (piece->empty()) return absl::OkStatus();
    if (out->size() + piece->size() > limit) return absl::OutOfRangeError("body too large");
    out->append(piece->data(), piece->size());
  }
}

// The reason phrase of a status line sflb writes itself.
const char* StatusReason(int status) {
  switch (status) {
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 203: return "Non-Authoritative Information";
    case 206: return "Partial Content";
    case 400: return "Bad Request";
    case 404: return "Not Found";
    case 409: return "Conflict";
    case 422: return "Unprocessable Entity";
    case 500: return "Internal Server Error";
    default: return status < 300 ? "OK" : status < 500 ? "Client Error" : "Server Error";
  }
}

// The response head of a relayed stream: what httplib would have written for a chunked
// content provider.
std::string StreamHead(int status, const httplib::Headers& headers,
                       const std::string& content_type, bool keep_alive) {
  std::string head = absl::StrCat("HTTP/1.1 ", status, " ", StatusReason(status), "\r\n");
  for (const auto& [name, value] : headers) absl::StrAppend(&head, name, ": ", value, "\r\n");
  if (!content_type.empty()) absl::StrAppend(&head, "Content-Type: ", content_type, "\r\n");
  absl::StrAppend(&head, "Transfer-Encoding: chunked\r\nConnection: ",
                  keep_alive ? "keep-alive" : "close", "\r\n\r\n");
  return head;
}

}  // namespace

Proxy::Proxy(ProxyOptions options, UpstreamClient* client, KeyPool* pool, ReportBuffer* reports,
             DataplaneMetrics* metrics)
    : options_(options), client_(client), pool_(pool), reports_(reports), metrics_(metrics) {}

void Proxy::set_relay(StreamRelay* relay) { relay_ = relay; }

void Proxy::Forward(const httplib::Request& req, const std::string& path, std::string body,
                    const std::shared_ptr<RequestRecord>& record, httplib::Response& res) {
  RequestRecord& result = *record;
  const std::string& request_id = record->request_id;
  BodySummary summary = SummarizeBody(body);
  result.model = summary.model;
  result.stream = summary.stream;

  UpstreamRequest upstream;
  upstream.method = req.method;
  upstream.target = UpstreamTarget(client_->endpoint().base_path, path,
                                   SplitTarget(req.target).second);
  std::string connection = req.get_header_value("Connection");
  for (const auto& [name, value] : req.headers) {
    if (!IsRequestHeaderDropped(name, connection)) upstream.headers.push_back({name, value});
  }
  upstream.headers.push_back({"Authorization", ""});
  const size_t auth_index = upstream.headers.size() - 1;
  upstream.body = body;

  auto cancel = std::make_shared<CancelToken>();
  {
    MutexLock lock(&tokens_mu_);
    tokens_.insert(cancel);
  }
  // Unregisters the token whatever way Forward returns; a stream keeps its own reference.
  struct TokenGuard {
    Proxy* proxy;
    std::shared_ptr<CancelToken> token;
    ~TokenGuard() {
      MutexLock lock(&proxy->tokens_mu_);
      proxy->tokens_.erase(token);
    }
  } token_guard{this, cancel};
  if (aborting_.load()) {
    result.error_code = "shutting_down";
    SetOpenAiError(res, 503, "this sflb replica is shutting down; retry", "service_unavailable",
                   result.error_code);
    res.set_header("Retry-After", "1");
    result.status = 503;
    return;
  }
  PickRequest pick_request;
  pick_request.model = summary.model;
  // The last upstream answer that was not committed, returned if no attempt succeeds.
  struct Held {
    ResponseHead head;
    std::string body;
  };
  std::unique_ptr<Held> held;
  absl::Status last_transport_error;
  PickResult last_pick;
  std::string first_piece;  // a streamed response's first body bytes, read before committing

  auto report = [this, &summary](const PoolKey& key, v1::OutcomeKind kind, int status,
                                 std::string message, absl::optional<absl::Duration> retry_after,
                                 bool probe, absl::Time when) {
    v1::KeyOutcome outcome;
    outcome.set_key_id(key.id);
    outcome.set_kind(kind);
    outcome.set_http_status(status);
    outcome.set_model(summary.model);
    if (message.size() > 512) message.resize(512);
    outcome.set_message(std::move(message));
    if (retry_after.has_value()) *outcome.mutable_retry_after() = ToProtoDuration(*retry_after);
    outcome.set_probe(probe);
    *outcome.mutable_observed_at() = ToProtoTime(when);
    reports_->RecordOutcome(std::move(outcome));
  };

  for (int attempt = 1; attempt <= options_.max_attempts; ++attempt) {
    last_pick = pool_->Pick(pick_request);
    if (last_pick.key == nullptr) break;
    std::shared_ptr<const PoolKey> key = last_pick.key;
    const bool probe = last_pick.probe;
    pick_request.exclude.push_back(key->id);
    result.attempts = attempt;
    result.key_fingerprints.push_back(key->fingerprint);
    upstream.headers[auth_index].value = absl::StrCat("Bearer ", key->secret);
    absl::Time now = absl::Now();
    reports_->RecordRequest(key->id, now);
    auto finish_probe = [&] {
      if (probe) pool_->ProbeDone(key->account, summary.model);
    };

    absl::StatusOr<std::unique_ptr<UpstreamExchange>> sent = client_->Send(upstream, nullptr, cancel);
    if (!sent.ok() && aborting_.load()) {
      result.error_code = "shutting_down";
      SetOpenAiError(res, 503, "this sflb replica is shutting down; retry", "service_unavailable",
                     result.error_code);
      res.set_header("Retry-After", "1");
      result.status = 503;
      finish_probe();
      return;
    }
    if (!sent.ok()) {
      last_transport_error = sent.status();
      if (metrics_ != nullptr) metrics_->RecordRetry("transport");
      report(*key, v1::OUTCOME_KIND_TRANSPORT_ERROR, 0, std::string(sent.status().message()),
             absl::nullopt, probe, now);
      finish_probe();
      LogWarning("upstream_transport_error", {{"request_id", request_id},
                                              {"key", key->fingerprint},
                                              {"attempt", attempt},
                                              {"error", std::string(sent.status().message())}});
      // Nothing reached the client: safe to try another key.
      continue;
    }
    std::unique_ptr<UpstreamExchange> exchange = std::move(*sent);
    const ResponseHead& head = exchange->head();
    if (const std::string* trace = head.Find("x-siliconcloud-trace-id")) {
      result.upstream_trace_id = *trace;
    }
    if (IsKeyFailure(head.status)) {
      auto failed = std::make_unique<Held>();
      failed->head = head;
      absl::Status read = ReadAll(exchange.get(), 64 * 1024, &failed->body);
      std::string message = ExtractErrorMessage(failed->body);
      absl::optional<absl::Duration> retry_after;
      if (const std::string* ra = head.Find("Retry-After")) retry_after = ParseRetryAfter(*ra, now);
      report(*key, OutcomeFor(head.status), head.status, message, retry_after, probe, now);
      finish_probe();
      if (metrics_ != nullptr) metrics_->RecordRetry(absl::StrCat("status_", head.status));
      if (head.status == 429) {
        // Keep this replica off the (account, model) scope right away; the controlplane's
        // block reaches every replica within a round trip.
        CooldownDecision cooldown =
            ComputeCooldown(retry_after, message, now, 1, 0.5, options_.cooldown);
        pool_->AddLocalBlock(key->account, summary.model, now + cooldown.duration);
        pick_request.avoid_accounts.push_back(key->account);
      }
      LogWarning("upstream_key_failure", {{"request_id", request_id},
                                          {"key", key->fingerprint},
                                          {"attempt", attempt},
                                          {"status", head.status},
                                          {"probe", probe}});
      if (read.ok()) {
        held = std::move(failed);
      } else {
        last_transport_error = read;
      }
      continue;
    }

    // A stream must show its first byte before sflb commits to it: a stall here is retried.
    bool streamed = head.framing == BodyFraming::kChunked ||
                    head.framing == BodyFraming::kUntilClose ||
                    (head.framing == BodyFraming::kContentLength &&
                     static_cast<size_t>(head.content_length) > options_.buffer_limit);
    if (streamed && summary.stream && head.status < 300 && req.method != "HEAD") {
      absl::Time deadline = absl::Now() + options_.stream_first_byte_timeout;
      absl::StatusOr<absl::string_view> first =
          exchange->ReadSome([deadline] { return absl::Now() >= deadline; });
      if (!first.ok()) {
        bool stalled = first.status().code() == absl::StatusCode::kCancelled;
        last_transport_error =
            stalled ? absl::DeadlineExceededError(absl::StrCat(
                          "no first byte within ",
                          absl::FormatDuration(options_.stream_first_byte_timeout)))
                    : first.status();
        if (metrics_ != nullptr) metrics_->RecordRetry(stalled ? "first_byte_timeout" : "transport");
        report(*key, v1::OUTCOME_KIND_TRANSPORT_ERROR, head.status,
               std::string(last_transport_error.message()), absl::nullopt, probe, now);
        finish_probe();
        LogWarning("upstream_stream_stalled", {{"request_id", request_id},
                                               {"key", key->fingerprint},
                                               {"attempt", attempt},
                                               {"error", std::string(last_transport_error.message())}});
        continue;
      }
      first_piece.assign(first->data(), first->size());
    }
    if (probe) {
      report(*key, v1::OUTCOME_KIND_SUCCESS, head.status, "", absl::nullopt, true, now);
      finish_probe();
    }

    // Commit: this response goes to the client.
    result.time_to_first_byte = absl::Now() - result.started;
    result.upstream_answered = true;
    res.status = head.status;
    result.status = head.status;
    std::string content_type;
    std::string resp_connection;
    if (const std::string* c = head.Find("Connection")) resp_connection = *c;
    for (const HttpHeader& h : head.headers) {
      if (IsResponseHeaderDropped(h.name, resp_connection)) continue;
      if (absl::EqualsIgnoreCase(h.name, "content-type")) {
        content_type = h.value;
        continue;
      }
      res.headers.emplace(h.name, h.value);
    }
    if (head.framing == BodyFraming::kNone || req.method == "HEAD") {
      if (!content_type.empty()) res.set_header("Content-Type", content_type);
      return;
    }
    if (head.framing == BodyFraming::kContentLength &&
        static_cast<size_t>(head.content_length) <= options_.buffer_limit) {
      std::string whole;
      absl::Status read = ReadAll(exchange.get(), options_.buffer_limit, &whole);
      if (!read.ok()) {
        res.headers.clear();
        SetOpenAiError(res, 502, absl::StrCat("upstream response broke off: ", read.message()),
                       "upstream_error", "upstream_broken_response");
        result.status = 502;
        result.error_code = "upstream_broken_response";
        return;
      }
      uint64_t prompt = 0, completion = 0;
      // Only bodies that mention usage are worth a parse (most non-chat answers do not).
      if (absl::StrContains(whole, "\"usage\"") && ExtractUsage(whole, &prompt, &completion)) {
        reports_->RecordTokens(key->id, prompt, completion);
        result.have_usage = true;
        result.prompt_tokens = prompt;
        result.completion_tokens = completion;
      }
      result.response_bytes = whole.size();
      res.body = std::move(whole);
      if (!content_type.empty()) res.set_header("Content-Type", content_type);
      return;
    }

    auto stream = std::make_shared<std::unique_ptr<ResponseStream>>(std::make_unique<ResponseStream>(
        std::move(exchange), key, reports_, record, metrics_,
        absl::StartsWithIgnoreCase(content_type, "text/event-stream")));
    (*stream)->Forwarded(first_piece);  // sent first, whichever way the stream goes
    if (relay_ != nullptr && head.framing != BodyFraming::kContentLength &&
        req.version == "HTTP/1.1") {
      // From here an event loop serves the stream; this thread goes back to the pool.
      const bool keep_alive = !absl::StrContains(
          absl::AsciiStrToLower(req.get_header_value("Connection")), "close");
      std::string out = StreamHead(head.status, res.headers, content_type, keep_alive);
      AppendChunk(first_piece, &out);
      if (relay_->Adopt(*stream, std::move(out), keep_alive)) return;
      // Not adopted (and nothing sent): stream from this thread after all.
    }
    auto provider = [stream, pending = std::move(first_piece), this](
                        size_t /*offset*/, httplib::DataSink& sink) mutable -> bool {
      ResponseStream& s = **stream;
      absl::StatusOr<absl::string_view> piece;
      bool from_pending = !pending.empty();
      if (from_pending) {
        piece = absl::string_view(pending);
      } else {
        piece = s.exchange()->ReadSome(
            [&sink, this] { return aborting() || !sink.is_writable(); });
      }
      if (!piece.ok()) {
        absl::optional<std::string> last =
            s.Ending(piece.status(), aborting() && sink.is_writable());
        if (!last.has_value()) return false;
        sink.write(last->data(), last->size());
        sink.done();
        return true;
      }
      if (piece->empty()) {
        sink.done();
        return true;
      }
      if (!from_pending) s.Forwarded(*piece);
      bool written = sink.write(piece->data(), piece->size());
      if (from_pending) pending.clear();
      if (!written) {
        s.record().stream_end = "client_disconnected";
        return false;
      }
      return true;
    };
    auto releaser = [stream](bool /*success*/) { (*stream)->Finish(); };
    if (head.framing == BodyFraming::kContentLength) {
      auto sized = [provider](size_t offset, size_t /*length*/, httplib::DataSink& sink) mutable {
        return provider(offset, sink);
      };
      res.set_content_provider(static_cast<size_t>(head.content_length), content_type,
                               std::move(sized), std::move(releaser));
    } else {
      res.set_chunked_content_provider(content_type, std::move(provider), std::move(releaser));
    }
    return;
  }

  // No attempt was committed.
  auto set_retry_after = [&res](absl::Time retry_at) {
    int64_t seconds = absl::ToInt64Seconds(absl::Ceil(retry_at - absl::Now(), absl::Seconds(1)));
    res.set_header("Retry-After", absl::StrCat(std::max<int64_t>(1, seconds)));
  };
  if (held != nullptr && (held->head.status == 502 || held->head.status == 503 ||
                          held->head.status == 504)) {
    // Upstream trouble on every try: hand the client the upstream's own last answer.
    res.status = held->head.status;
    result.status = held->head.status;
    std::string resp_connection;
    if (const std::string* c = held->head.Find("Connection")) resp_connection = *c;
    for (const HttpHeader& h : held->head.headers) {
      if (!IsResponseHeaderDropped(h.name, resp_connection)) res.headers.emplace(h.name, h.value);
    }
    result.response_bytes = held->body.size();
    res.body = std::move(held->body);
    return;
  }
  // Is the pool rate limited (429) or out of usable keys (503)?
  PickResult probe_pick = last_pick;
  if (probe_pick.key != nullptr || !probe_pick.rate_limited) {
    PickRequest fresh;
    fresh.model = summary.model;
    // Ask without this request's exclusions to learn the pool's state for the model.
    probe_pick = pool_->Peek(fresh);
  }
  bool rate_limited = (held != nullptr && held->head.status == 429) || probe_pick.rate_limited;
  if (rate_limited) {
    // Other accounts may still be open (this request ran out of attempts): retry soon.
    absl::Time retry_at = probe_pick.rate_limited ? probe_pick.retry_at
                                                  : absl::Now() + absl::Seconds(1);
    result.error_code = "rate_limited";
    SetOpenAiError(res, 429,
                   absl::StrCat("All SiliconFlow keys", summary.model.empty() ? "" : " for model ",
                                summary.model,
                                " are rate limited right now; retry after the Retry-After delay"),
                   "rate_limit_error", result.error_code);
    set_retry_after(retry_at);
    result.status = 429;
    return;
  }
  if (held == nullptr && !last_transport_error.ok()) {
    bool timeout = last_transport_error.code() == absl::StatusCode::kDeadlineExceeded;
    int status = timeout ? 504 : 502;
    result.error_code = timeout ? "upstream_timeout" : "upstream_unavailable";
    SetOpenAiError(res, status,
                   absl::StrCat("SiliconFlow could not be reached after ", result.attempts,
                                " attempt(s): ", last_transport_error.message()),
                   "upstream_error", result.error_code);
    result.status = status;
    return;
  }
  switch (last_pick.failure) {
    case PickFailure::kNoSnapshot:
      result.error_code = "no_key_set";
      SetOpenAiError(res, 503,
                     "sflb has not received its key set from the controlplane yet; retry shortly",
                     "service_unavailable", result.error_code);
      break;
    case PickFailure::kNoKeys:
      result.error_code = "no_keys_configured";
      SetOpenAiError(res, 503, "no SiliconFlow API keys are configured in sflb",
                     "service_unavailable", result.error_code);
      break;
    default:
      result.error_code = "no_usable_key";
      SetOpenAiError(res, 503,
                     held != nullptr
                         ? absl::StrCat("no usable SiliconFlow key: the last one tried was refused (",
                                        held->head.status, ")")
                         : std::string("no SiliconFlow key is usable right now (all invalid, "
                                       "depleted, disabled or refused for this model)"),
                     "service_unavailable", result.error_code);
      break;
  }
  res.set_header("Retry-After", "30");
  result.status = 503;
}

void Proxy::AbortAll() {
  aborting_.store(true);
  std::set<std::shared_ptr<CancelToken>> tokens;
  {
    MutexLock lock(&tokens_mu_);
    tokens = tokens_;
  }
  // Requests still waiting for the upstream's answer end now; streams notice `aborting_`.
  for (const auto& token : tokens) token->Cancel();
}

}  // namespace sflb
