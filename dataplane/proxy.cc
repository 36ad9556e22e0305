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

ProxyAnswer OpenAiAnswer(int status, absl::string_view message, absl::string_view type,
                         absl::string_view code) {
  ProxyAnswer answer;
  answer.status = status;
  answer.content_type = "application/json";
  answer.body = OpenAiErrorJson(message, type, code);
  return answer;
}

}  // namespace

const char* StatusReason(int status) {
  switch (status) {
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 203: return "Non-Authoritative Information";
    case 204: return "No Content";
    case 206: return "Partial Content";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 409: return "Conflict";
    case 413: return "Payload Too Large";
    case 422: return "Unprocessable Entity";
    case 429: return "Too Many Requests";
    case 500: return "Internal Server Error";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    default: return status < 300 ? "OK" : status < 500 ? "Client Error" : "Server Error";
  }
}

std::string ResponseHeadBytes(int status, const std::vector<HttpHeader>& headers,
                              absl::string_view content_type, absl::string_view framing,
                              bool keep_alive) {
  std::string head = absl::StrCat("HTTP/1.1 ", status, " ", StatusReason(status), "\r\n");
  for (const HttpHeader& h : headers) absl::StrAppend(&head, h.name, ": ", h.value, "\r\n");
  if (!content_type.empty()) absl::StrAppend(&head, "Content-Type: ", content_type, "\r\n");
  if (!framing.empty()) absl::StrAppend(&head, framing, "\r\n");
  absl::StrAppend(&head, "Connection: ", keep_alive ? "keep-alive" : "close", "\r\n\r\n");
  return head;
}

std::vector<HttpHeader> ClientResponseHeaders(const ResponseHead& head, std::string* content_type) {
  std::vector<HttpHeader> out;
  std::string connection;
  if (const std::string* c = head.Find("Connection")) connection = *c;
  for (const HttpHeader& h : head.headers) {
    if (IsResponseHeaderDropped(h.name, connection)) continue;
    if (content_type != nullptr && absl::EqualsIgnoreCase(h.name, "content-type")) {
      *content_type = h.value;
      continue;
    }
    out.push_back(h);
  }
  return out;
}

void ProxyAnswer::ApplyTo(httplib::Response& res) const {
  res.status = status;
  for (const HttpHeader& h : headers) res.set_header(h.name, h.value);
  if (!content_type.empty()) {
    res.set_content(body, content_type);
  } else {
    res.body = body;
  }
}

// ---------------------------------------------------------------------------------------------
// ProxyCall

ProxyCall::ProxyCall(Proxy* proxy, std::shared_ptr<RequestRecord> record, BodySummary summary,
                     UpstreamRequest request)
    : proxy_(proxy),
      record_(std::move(record)),
      summary_(std::move(summary)),
      request_(std::move(request)) {
  record_->model = summary_.model;
  record_->stream = summary_.stream;
  request_.headers.push_back({"Authorization", ""});
  auth_index_ = request_.headers.size() - 1;
  pick_request_.model = summary_.model;
}

ProxyCall::~ProxyCall() { EndProbe(); }

bool ProxyCall::IsKeyFailure(int status) {
  return status == 429 || status == 401 || status == 403 || status == 502 || status == 503 ||
         status == 504;
}

void ProxyCall::EndProbe() {
  if (!probe_pending_) return;
  probe_pending_ = false;
  proxy_->pool()->ProbeDone(key_->account, summary_.model);
}

bool ProxyCall::NextAttempt() {
  EndProbe();
  if (attempt_ >= proxy_->options().max_attempts) return false;
  last_pick_ = proxy_->pool()->Pick(pick_request_);
  key_ = last_pick_.key;
  if (key_ == nullptr) return false;
  ++attempt_;
  probe_ = last_pick_.probe;
  probe_pending_ = probe_;
  pick_request_.exclude.push_back(key_->id);
  record_->attempts = attempt_;
  record_->key_fingerprints.push_back(key_->fingerprint);
  request_.headers[auth_index_].value = absl::StrCat("Bearer ", key_->secret);
  attempt_started_ = absl::Now();
  proxy_->reports()->RecordRequest(key_->id, attempt_started_);
  return true;
}

void ProxyCall::Report(v1::OutcomeKind kind, int status, std::string message,
                       absl::optional<absl::Duration> retry_after) {
  v1::KeyOutcome outcome;
  outcome.set_key_id(key_->id);
  outcome.set_kind(kind);
  outcome.set_http_status(status);
  outcome.set_model(summary_.model);
  if (message.size() > 512) message.resize(512);
  outcome.set_message(std::move(message));
  if (retry_after.has_value()) *outcome.mutable_retry_after() = ToProtoDuration(*retry_after);
  outcome.set_probe(probe_);
  *outcome.mutable_observed_at() = ToProtoTime(attempt_started_);
  proxy_->reports()->RecordOutcome(std::move(outcome));
}

void ProxyCall::TransportFailed(const absl::Status& error, absl::string_view retry_reason,
                                int status, absl::string_view log_event) {
  last_transport_error_ = error;
  if (proxy_->metrics() != nullptr) proxy_->metrics()->RecordRetry(retry_reason);
  Report(v1::OUTCOME_KIND_TRANSPORT_ERROR, status, std::string(error.message()), absl::nullopt);
  EndProbe();
  LogWarning(log_event, {{"request_id", record_->request_id},
                         {"key", key_->fingerprint},
                         {"attempt", attempt_},
                         {"error", std::string(error.message())}});
}

void ProxyCall::SawHead(const ResponseHead& head) {
  if (const std::string* trace = head.Find("x-siliconcloud-trace-id")) {
    record_->upstream_trace_id = *trace;
  }
}

void ProxyCall::KeyRefused(const ResponseHead& head, std::string body, const absl::Status& read) {
  SawHead(head);
  std::string message = ExtractErrorMessage(body);
  absl::optional<absl::Duration> retry_after;
  if (const std::string* ra = head.Find("Retry-After")) {
    retry_after = ParseRetryAfter(*ra, attempt_started_);
  }
  Report(OutcomeFor(head.status), head.status, message, retry_after);
  EndProbe();
  if (proxy_->metrics() != nullptr) {
    proxy_->metrics()->RecordRetry(absl::StrCat("status_", head.status));
  }
  if (head.status == 429) {
    // Keep this replica off the (account, model) scope right away; the controlplane's block
    // reaches every replica within a round trip.
    CooldownDecision cooldown = ComputeCooldown(retry_after, message, attempt_started_, 1, 0.5,
                                                proxy_->options().cooldown);
    proxy_->pool()->AddLocalBlock(key_->account, summary_.model,
                                  attempt_started_ + cooldown.duration);
    pick_request_.avoid_accounts.push_back(key_->account);
  }
  LogWarning("upstream_key_failure", {{"request_id", record_->request_id},
                                      {"key", key_->fingerprint},
                                      {"attempt", attempt_},
                                      {"status", head.status},
                                      {"probe", probe_}});
  if (read.ok()) {
    held_ = std::make_unique<Held>();
    held_->head = head;
    held_->body = std::move(body);
  } else {
    last_transport_error_ = read;
  }
}

void ProxyCall::Commit(const ResponseHead& head) {
  SawHead(head);
  if (probe_) {
    Report(v1::OUTCOME_KIND_SUCCESS, head.status, "", absl::nullopt);
    EndProbe();
  }
  record_->time_to_first_byte = absl::Now() - record_->started;
  record_->upstream_answered = true;
  record_->status = head.status;
}

void ProxyCall::CountUsage(absl::string_view body) {
  record_->response_bytes = body.size();
  uint64_t prompt = 0, completion = 0;
  // Only bodies that mention usage are worth a parse (most non-chat answers do not).
  if (absl::StrContains(body, "\"usage\"") && ExtractUsage(body, &prompt, &completion)) {
    proxy_->reports()->RecordTokens(key_->id, prompt, completion);
    record_->have_usage = true;
    record_->prompt_tokens = prompt;
    record_->completion_tokens = completion;
  }
}

ProxyAnswer ProxyCall::ShuttingDown() {
  record_->error_code = "shutting_down";
  record_->status = 503;
  ProxyAnswer answer = OpenAiAnswer(503, "this sflb replica is shutting down; retry",
                                    "service_unavailable", record_->error_code);
  answer.headers.push_back({"Retry-After", "1"});
  return answer;
}

ProxyAnswer ProxyCall::FinalAnswer() {
  EndProbe();
  RequestRecord& result = *record_;
  if (held_ != nullptr && (held_->head.status == 502 || held_->head.status == 503 ||
                           held_->head.status == 504)) {
    // Upstream trouble on every try: hand the client the upstream's own last answer.
    ProxyAnswer answer;
    answer.status = held_->head.status;
    result.status = answer.status;
    answer.headers = ClientResponseHeaders(held_->head, &answer.content_type);
    result.response_bytes = held_->body.size();
    answer.body = std::move(held_->body);
    return answer;
  }
  // Is the pool rate limited (429) or out of usable keys (503)?
  PickResult probe_pick = last_pick_;
  if (probe_pick.key != nullptr || !probe_pick.rate_limited) {
    PickRequest fresh;
    fresh.model = summary_.model;
    // Ask without this request's exclusions to learn the pool's state for the model.
    probe_pick = proxy_->pool()->Peek(fresh);
  }
  bool rate_limited = (held_ != nullptr && held_->head.status == 429) || probe_pick.rate_limited;
  if (rate_limited) {
    // Other accounts may still be open (this request ran out of attempts): retry soon.
    absl::Time retry_at = probe_pick.rate_limited ? probe_pick.retry_at
                                                  : absl::Now() + absl::Seconds(1);
    result.error_code = "rate_limited";
    ProxyAnswer answer = OpenAiAnswer(
        429,
        absl::StrCat("All SiliconFlow keys", summary_.model.empty() ? "" : " for model ",
                     summary_.model, " are rate limited right now; retry after the Retry-After delay"),
        "rate_limit_error", result.error_code);
    int64_t seconds = absl::ToInt64Seconds(absl::Ceil(retry_at - absl::Now(), absl::Seconds(1)));
    answer.headers.push_back({"Retry-After", absl::StrCat(std::max<int64_t>(1, seconds))});
    result.status = 429;
    return answer;
  }
  if (held_ == nullptr && !last_transport_error_.ok()) {
    bool timeout = last_transport_error_.code() == absl::StatusCode::kDeadlineExceeded;
    int status = timeout ? 504 : 502;
    result.error_code = timeout ? "upstream_timeout" : "upstream_unavailable";
    result.status = status;
    return OpenAiAnswer(status,
                        absl::StrCat("SiliconFlow could not be reached after ", result.attempts,
                                     " attempt(s): ", last_transport_error_.message()),
                        "upstream_error", result.error_code);
  }
  ProxyAnswer answer;
  switch (last_pick_.failure) {
    case PickFailure::kNoSnapshot:
      result.error_code = "no_key_set";
      answer = OpenAiAnswer(
          503, "sflb has not received its key set from the controlplane yet; retry shortly",
          "service_unavailable", result.error_code);
      break;
    case PickFailure::kNoKeys:
      result.error_code = "no_keys_configured";
      answer = OpenAiAnswer(503, "no SiliconFlow API keys are configured in sflb",
                            "service_unavailable", result.error_code);
      break;
    default:
      result.error_code = "no_usable_key";
      answer = OpenAiAnswer(
          503,
          held_ != nullptr
              ? absl::StrCat("no usable SiliconFlow key: the last one tried was refused (",
                             held_->head.status, ")")
              : std::string("no SiliconFlow key is usable right now (all invalid, depleted, "
                            "disabled or refused for this model)"),
          "service_unavailable", result.error_code);
      break;
  }
  answer.headers.push_back({"Retry-After", "30"});
  result.status = 503;
  return answer;
}

// ---------------------------------------------------------------------------------------------
// Proxy

Proxy::Proxy(ProxyOptions options, UpstreamClient* client, KeyPool* pool, ReportBuffer* reports,
             DataplaneMetrics* metrics)
    : options_(options), client_(client), pool_(pool), reports_(reports), metrics_(metrics) {}

void Proxy::set_relay(StreamRelay* relay) { relay_ = relay; }

UpstreamRequest Proxy::UpstreamRequestFor(absl::string_view method, absl::string_view target,
                                          const std::vector<HttpHeader>& headers,
                                          absl::string_view body) const {
  UpstreamRequest upstream;
  upstream.method = std::string(method);
  auto [path, query] = SplitTarget(target);
  upstream.target = UpstreamTarget(client_->endpoint().base_path, StripVersionPrefix(path), query);
  absl::string_view connection;
  for (const HttpHeader& h : headers) {
    if (absl::EqualsIgnoreCase(h.name, "connection")) {
      connection = h.value;
      break;
    }
  }
  upstream.headers.reserve(headers.size() + 1);
  for (const HttpHeader& h : headers) {
    if (!IsRequestHeaderDropped(h.name, connection)) upstream.headers.push_back(h);
  }
  upstream.body = body;
  return upstream;
}

void Proxy::Track(const std::shared_ptr<CancelToken>& token) {
  MutexLock lock(&tokens_mu_);
  tokens_.insert(token);
}

void Proxy::Forget(const std::shared_ptr<CancelToken>& token) {
  MutexLock lock(&tokens_mu_);
  tokens_.erase(token);
}

void Proxy::Forward(const httplib::Request& req, const std::string& path, std::string body,
                    const std::shared_ptr<RequestRecord>& record, httplib::Response& res) {
  UpstreamRequest upstream;
  upstream.method = req.method;
  upstream.target = UpstreamTarget(client_->endpoint().base_path, path,
                                   SplitTarget(req.target).second);
  std::string connection = req.get_header_value("Connection");
  for (const auto& [name, value] : req.headers) {
    if (!IsRequestHeaderDropped(name, connection)) upstream.headers.push_back({name, value});
  }
  upstream.body = body;
  ProxyCall call(this, record, SummarizeBody(body), std::move(upstream));
  RequestRecord& result = *record;

  auto cancel = std::make_shared<CancelToken>();
  Track(cancel);
  // Unregisters the token whatever way Forward returns; a stream keeps its own reference.
  struct TokenGuard {
    Proxy* proxy;
    std::shared_ptr<CancelToken> token;
    ~TokenGuard() { proxy->Forget(token); }
  } token_guard{this, cancel};
  if (aborting_.load()) {
    call.ShuttingDown().ApplyTo(res);
    return;
  }
  std::string first_piece;  // a streamed response's first body bytes, read before committing

  while (call.NextAttempt()) {
    absl::StatusOr<std::unique_ptr<UpstreamExchange>> sent =
        client_->Send(call.request(), nullptr, cancel);
    if (!sent.ok() && aborting_.load()) {
      call.ShuttingDown().ApplyTo(res);
      return;
    }
    if (!sent.ok()) {
      // Nothing reached the client: safe to try another key.
      call.TransportFailed(sent.status());
      continue;
    }
    std::unique_ptr<UpstreamExchange> exchange = std::move(*sent);
    const ResponseHead& head = exchange->head();
    if (ProxyCall::IsKeyFailure(head.status)) {
      std::string error_body;
      absl::Status read = ReadAll(exchange.get(), 64 * 1024, &error_body);
      call.KeyRefused(head, std::move(error_body), read);
      continue;
    }

    // A stream must show its first byte before sflb commits to it: a stall here is retried.
    bool streamed = head.framing == BodyFraming::kChunked ||
                    head.framing == BodyFraming::kUntilClose ||
                    (head.framing == BodyFraming::kContentLength &&
                     static_cast<size_t>(head.content_length) > options_.buffer_limit);
    if (streamed && call.summary().stream && head.status < 300 && req.method != "HEAD") {
      absl::Time deadline = absl::Now() + options_.stream_first_byte_timeout;
      absl::StatusOr<absl::string_view> first =
          exchange->ReadSome([deadline] { return absl::Now() >= deadline; });
      if (!first.ok()) {
        bool stalled = first.status().code() == absl::StatusCode::kCancelled;
        absl::Status error =
            stalled ? absl::DeadlineExceededError(absl::StrCat(
                          "no first byte within ",
                          absl::FormatDuration(options_.stream_first_byte_timeout)))
                    : first.status();
        call.SawHead(head);
        call.TransportFailed(error, stalled ? "first_byte_timeout" : "transport", head.status,
                             "upstream_stream_stalled");
        continue;
      }
      first_piece.assign(first->data(), first->size());
    }

    // Commit: this response goes to the client.
    call.Commit(head);
    res.status = head.status;
    std::string content_type;
    for (HttpHeader& h : ClientResponseHeaders(head, &content_type)) {
      res.headers.emplace(std::move(h.name), std::move(h.value));
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
      call.CountUsage(whole);
      res.body = std::move(whole);
      if (!content_type.empty()) res.set_header("Content-Type", content_type);
      return;
    }

    auto stream = std::make_shared<std::unique_ptr<ResponseStream>>(std::make_unique<ResponseStream>(
        std::move(exchange), call.key(), reports_, record, metrics_,
        absl::StartsWithIgnoreCase(content_type, "text/event-stream")));
    (*stream)->Forwarded(first_piece);  // sent first, whichever way the stream goes
    if (relay_ != nullptr && head.framing != BodyFraming::kContentLength &&
        req.version == "HTTP/1.1") {
      // From here an event loop serves the stream; this thread goes back to the pool.
      const bool keep_alive = !absl::StrContains(
          absl::AsciiStrToLower(req.get_header_value("Connection")), "close");
      std::vector<HttpHeader> headers;
      for (const auto& [name, value] : res.headers) headers.push_back({name, value});
      std::string out = ResponseHeadBytes(head.status, headers, content_type,
                                          "Transfer-Encoding: chunked", keep_alive);
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
  call.FinalAnswer().ApplyTo(res);
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
