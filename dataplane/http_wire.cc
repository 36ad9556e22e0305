#include "dataplane/http_wire.h"

#include <cstring>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace sflb {
namespace {

bool IsTchar(unsigned char c) {
  // RFC 9110 section 5.6.2: tchar.
  return absl::ascii_isalnum(c) || (c != 0 && std::strchr("!#$%&'*+-.^_`|~", c) != nullptr);
}

bool IsOws(char c) { return c == ' ' || c == '\t'; }

absl::string_view TrimOws(absl::string_view s) {
  while (!s.empty() && IsOws(s.front())) s.remove_prefix(1);
  while (!s.empty() && IsOws(s.back())) s.remove_suffix(1);
  return s;
}

// Strips the CR of a CRLF line ending; a line ending in a bare LF is accepted as is.
absl::string_view StripCr(absl::string_view line) {
  if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
  return line;
}

absl::Status Malformed(absl::string_view what) {
  return absl::InternalError(absl::StrCat("malformed upstream response: ", what));
}

// Calls `fn(token)` for every comma-separated, OWS-trimmed, non-empty element of `value`.
template <typename Fn>
void ForEachListElement(absl::string_view value, Fn fn) {
  while (!value.empty()) {
    size_t comma = value.find(',');
    absl::string_view element = TrimOws(value.substr(0, comma));
    if (!element.empty()) fn(element);
    if (comma == absl::string_view::npos) break;
    value.remove_prefix(comma + 1);
  }
}

constexpr uint64_t kMaxBodyLength = uint64_t{1} << 62;

absl::Status ParseStatusLine(absl::string_view line, ResponseHead* out) {
  // HTTP-version SP status-code SP [ reason-phrase ]; the SP before an empty reason is optional.
  if (line.size() < 12 || !absl::StartsWith(line, "HTTP/1.") || !absl::ascii_isdigit(line[7]) ||
      line[8] != ' ') {
    return Malformed("bad status line (expected \"HTTP/1.x NNN reason\")");
  }
  out->version_minor = line[7] - '0';
  int status = 0;
  for (int i = 9; i < 12; ++i) {
    if (!absl::ascii_isdigit(line[i])) return Malformed("status code is not 3 digits");
    status = status * 10 + (line[i] - '0');
  }
  if (status < 100 || status > 599) return Malformed("status code out of range 100-599");
  out->status = status;
  absl::string_view rest = line.substr(12);
  if (!rest.empty() && rest[0] != ' ') return Malformed("status code is not 3 digits");
  if (!rest.empty()) rest.remove_prefix(1);
  for (char c : rest) {
    unsigned char u = static_cast<unsigned char>(c);
    if ((u < 0x20 && c != '\t') || u == 0x7f) return Malformed("control character in reason");
  }
  out->reason = std::string(rest);
  return absl::OkStatus();
}

absl::Status MalformedRequest(absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("malformed request: ", what));
}

// One header line into `out`; errors through `malformed`.
absl::Status ParseHeaderLine(absl::string_view line, std::vector<HttpHeader>* out,
                             absl::Status (*malformed)(absl::string_view) = Malformed) {
  if (IsOws(line[0])) return malformed("obsolete line folding in header section");
  size_t colon = line.find(':');
  if (colon == absl::string_view::npos) return malformed("header line without ':'");
  absl::string_view name = line.substr(0, colon);
  if (!IsHttpToken(name)) {
    // Also rejects whitespace between the name and the colon (RFC 9112 section 5.1).
    return malformed("invalid header name");
  }
  absl::string_view value = TrimOws(line.substr(colon + 1));
  if (!IsValidHeaderValue(value)) {
    return malformed(absl::StrCat("invalid character in value of header ", name));
  }
  out->push_back(HttpHeader{std::string(name), std::string(value)});
  return absl::OkStatus();
}

absl::Status DetermineFraming(bool request_was_head, ResponseHead* out) {
  bool has_te = false;
  bool chunked_last = false;
  bool chunked_twice = false;
  int chunked_count = 0;
  bool has_cl = false;
  bool cl_invalid = false;
  bool cl_conflict = false;
  uint64_t cl = 0;
  bool conn_close = false;
  bool conn_keep_alive = false;
  for (const HttpHeader& h : out->headers) {
    if (absl::EqualsIgnoreCase(h.name, "transfer-encoding")) {
      has_te = true;
      ForEachListElement(h.value, [&](absl::string_view coding) {
        chunked_last = absl::EqualsIgnoreCase(coding, "chunked");
        if (chunked_last && ++chunked_count > 1) chunked_twice = true;
      });
    } else if (absl::EqualsIgnoreCase(h.name, "content-length")) {
      ForEachListElement(h.value, [&](absl::string_view v) {
        uint64_t n = 0;
        bool digits = !v.empty() && v.size() <= 19;
        for (char c : v) digits = digits && absl::ascii_isdigit(c);
        if (!digits || !absl::SimpleAtoi(v, &n) || n > kMaxBodyLength) {
          cl_invalid = true;
          return;
        }
        if (has_cl && n != cl) cl_conflict = true;
        has_cl = true;
        cl = n;
      });
      if (TrimOws(h.value).empty()) cl_invalid = true;
    } else if (absl::EqualsIgnoreCase(h.name, "connection")) {
      ForEachListElement(h.value, [&](absl::string_view option) {
        if (absl::EqualsIgnoreCase(option, "close")) conn_close = true;
        if (absl::EqualsIgnoreCase(option, "keep-alive")) conn_keep_alive = true;
      });
    }
  }

  out->keep_alive = !conn_close && (out->version_minor >= 1 || conn_keep_alive);
  out->content_length = -1;
  const int s = out->status;
  if (request_was_head || (s >= 100 && s < 200) || s == 204 || s == 304) {
    out->framing = BodyFraming::kNone;
    return absl::OkStatus();
  }
  if (has_te) {
    // RFC 9112 section 6.3: Transfer-Encoding overrides Content-Length, but a message with both
    // may be an attempt at smuggling: use it, then close the connection.
    if (chunked_twice) return Malformed("chunked transfer coding applied twice");
    if (has_cl || out->version_minor == 0) out->keep_alive = false;
    if (chunked_last) {
      out->framing = BodyFraming::kChunked;
    } else {
      // A response whose final coding is not chunked is delimited by closing the connection.
      out->framing = BodyFraming::kUntilClose;
      out->keep_alive = false;
    }
    return absl::OkStatus();
  }
  if (cl_invalid) return Malformed("invalid Content-Length");
  if (cl_conflict) return Malformed("conflicting Content-Length values");
  if (has_cl) {
    out->framing = BodyFraming::kContentLength;
    out->content_length = static_cast<int64_t>(cl);
    return absl::OkStatus();
  }
  out->framing = BodyFraming::kUntilClose;
  out->keep_alive = false;
  return absl::OkStatus();
}

}  // namespace

const std::string* ResponseHead::Find(absl::string_view name) const {
  for (const HttpHeader& h : headers) {
    if (absl::EqualsIgnoreCase(h.name, name)) return &h.value;
  }
  return nullptr;
}

size_t FindHeadEnd(absl::string_view buf, size_t* scan_from) {
  size_t i = *scan_from;
  while (i < buf.size()) {
    const void* p = std::memchr(buf.data() + i, '\n', buf.size() - i);
    if (p == nullptr) {
      *scan_from = buf.size();
      return absl::string_view::npos;
    }
    size_t lf = static_cast<size_t>(static_cast<const char*>(p) - buf.data());
    // A blank line follows this LF as "\n" or "\r\n".
    if (lf + 1 < buf.size() && buf[lf + 1] == '\n') return lf + 2;
    if (lf + 2 < buf.size() && buf[lf + 1] == '\r' && buf[lf + 2] == '\n') return lf + 3;
    if (lf + 1 == buf.size() || (lf + 2 == buf.size() && buf[lf + 1] == '\r')) {
      *scan_from = lf;  // not decidable yet: rescan from this LF when more bytes arrive
      return absl::string_view::npos;
    }
    i = lf + 1;
  }
  *scan_from = buf.size();
  return absl::string_view::npos;
}

absl::Status ParseResponseHead(absl::string_view head, bool request_was_head, ResponseHead* out) {
  *out = ResponseHead();
  if (head.size() > kMaxResponseHeadBytes) return Malformed("response head exceeds 64 KiB");
  bool first = true;
  while (!head.empty()) {
    size_t lf = head.find('\n');
    if (lf == absl::string_view::npos) return Malformed("response head not terminated");
    absl::string_view line = StripCr(head.substr(0, lf));
    head.remove_prefix(lf + 1);
    if (line.find('\r') != absl::string_view::npos) return Malformed("bare CR in response head");
    if (first) {
      absl::Status s = ParseStatusLine(line, out);
      if (!s.ok()) return s;
      first = false;
      continue;
    }
    if (line.empty()) {
      if (!head.empty()) return Malformed("bytes after the end of the response head");
      return DetermineFraming(request_was_head, out);
    }
    absl::Status s = ParseHeaderLine(line, &out->headers);
    if (!s.ok()) return s;
  }
  return Malformed("response head not terminated");
}

const std::string* RequestHead::Find(absl::string_view name) const {
  for (const HttpHeader& h : headers) {
    if (absl::EqualsIgnoreCase(h.name, name)) return &h.value;
  }
  return nullptr;
}

absl::Status ParseRequestHead(absl::string_view head, RequestHead* out) {
  *out = RequestHead();
  if (head.size() > kMaxRequestHeadBytes) return MalformedRequest("request head too large");
  // Request line: method SP target SP HTTP-version CRLF.
  size_t eol = head.find("\r\n");
  if (eol == absl::string_view::npos) return MalformedRequest("request line not terminated");
  absl::string_view line = head.substr(0, eol);
  head.remove_prefix(eol + 2);
  size_t sp1 = line.find(' ');
  size_t sp2 = sp1 == absl::string_view::npos ? sp1 : line.find(' ', sp1 + 1);
  if (sp2 == absl::string_view::npos) return MalformedRequest("bad request line");
  absl::string_view method = line.substr(0, sp1);
  absl::string_view target = line.substr(sp1 + 1, sp2 - sp1 - 1);
  absl::string_view version = line.substr(sp2 + 1);
  if (!IsHttpToken(method)) return MalformedRequest("bad method");
  if (target.empty() || target[0] != '/' || !IsValidRequestTarget(target) ||
      target.find_first_of(" \t#") != absl::string_view::npos) {
    return MalformedRequest("bad request target");
  }
  if (version.size() != 8 || !absl::StartsWith(version, "HTTP/1.") ||
      (version[7] != '0' && version[7] != '1')) {
    return MalformedRequest("unsupported HTTP version");
  }
  out->method = std::string(method);
  out->target = std::string(target);
  out->version_minor = version[7] - '0';
  bool conn_close = false;
  bool conn_keep_alive = false;
  for (;;) {
    eol = head.find("\r\n");
    if (eol == absl::string_view::npos) return MalformedRequest("request head not terminated");
    line = head.substr(0, eol);
    head.remove_prefix(eol + 2);
    if (line.empty()) break;
    if (line.find_first_of("\r\n") != absl::string_view::npos) {
      return MalformedRequest("bare CR or LF in request head");
    }
    absl::Status s = ParseHeaderLine(line, &out->headers, MalformedRequest);
    if (!s.ok()) return s;
    const HttpHeader& h = out->headers.back();
    if (absl::EqualsIgnoreCase(h.name, "content-length")) {
      uint64_t n = 0;
      bool digits = !h.value.empty() && h.value.size() <= 18;
      for (char c : h.value) digits = digits && absl::ascii_isdigit(c);
      if (!digits || !absl::SimpleAtoi(h.value, &n)) return MalformedRequest("bad Content-Length");
      if (out->has_content_length && n != out->content_length) {
        return MalformedRequest("conflicting Content-Length values");
      }
      out->has_content_length = true;
      out->content_length = n;
    } else if (absl::EqualsIgnoreCase(h.name, "transfer-encoding")) {
      out->has_transfer_encoding = true;
    } else if (absl::EqualsIgnoreCase(h.name, "expect")) {
      out->has_expect = true;
    } else if (absl::EqualsIgnoreCase(h.name, "connection")) {
      ForEachListElement(h.value, [&](absl::string_view option) {
        if (absl::EqualsIgnoreCase(option, "close")) conn_close = true;
        if (absl::EqualsIgnoreCase(option, "keep-alive")) conn_keep_alive = true;
      });
    }
  }
  if (!head.empty()) return MalformedRequest("bytes after the end of the request head");
  out->keep_alive = !conn_close && (out->version_minor >= 1 || conn_keep_alive);
  return absl::OkStatus();
}

absl::Status ChunkedDecoder::Decode(absl::string_view in, size_t* consumed,
                                    absl::string_view* data) {
  *consumed = 0;
  *data = absl::string_view();
  size_t pos = 0;
  while (true) {
    switch (state_) {
      case State::kSize: {
        size_t lf = in.find('\n', pos);
        if (lf == absl::string_view::npos) {
          if (in.size() - pos > kMaxChunkLineBytes) return Malformed("chunk-size line too long");
          *consumed = pos;
          return absl::OkStatus();
        }
        if (lf - pos > kMaxChunkLineBytes) return Malformed("chunk-size line too long");
        absl::string_view line = StripCr(in.substr(pos, lf - pos));
        uint64_t size = 0;
        size_t i = 0;
        for (; i < line.size(); ++i) {
          char c = line[i];
          int digit;
          if (c >= '0' && c <= '9') {
            digit = c - '0';
          } else if (c >= 'a' && c <= 'f') {
            digit = c - 'a' + 10;
          } else if (c >= 'A' && c <= 'F') {
            digit = c - 'A' + 10;
          } else {
            break;
          }
          if (size > (kMaxBodyLength >> 4)) return Malformed("chunk size too large");
          size = (size << 4) | static_cast<uint64_t>(digit);
        }
        if (i == 0) return Malformed("invalid chunk size");
        // chunk-ext: BWS ";" ... up to the end of the line. Extensions are ignored.
        absl::string_view ext = line.substr(i);
        while (!ext.empty() && IsOws(ext.front())) ext.remove_prefix(1);
        if (!ext.empty() && ext.front() != ';') return Malformed("invalid chunk size");
        if (ext.find('\r') != absl::string_view::npos ||
            ext.find('\0') != absl::string_view::npos) {
          return Malformed("invalid chunk extension");
        }
        pos = lf + 1;
        if (size == 0) {
          state_ = State::kTrailer;
        } else {
          remaining_ = size;
          state_ = State::kData;
        }
        break;
      }
      case State::kData: {
        size_t avail = in.size() - pos;
        if (avail == 0) {
          *consumed = pos;
          return absl::OkStatus();
        }
        size_t n = avail < remaining_ ? avail : static_cast<size_t>(remaining_);
        *data = in.substr(pos, n);
        remaining_ -= n;
        pos += n;
        if (remaining_ == 0) state_ = State::kDataEnd;
        *consumed = pos;
        return absl::OkStatus();
      }
      case State::kDataEnd: {
        size_t avail = in.size() - pos;
        if (avail == 0) {
          *consumed = pos;
          return absl::OkStatus();
        }
        if (in[pos] == '\n') {
          pos += 1;
        } else if (in[pos] == '\r') {
          if (avail < 2) {
            *consumed = pos;
            return absl::OkStatus();
          }
          if (in[pos + 1] != '\n') return Malformed("missing CRLF after chunk data");
          pos += 2;
        } else {
          return Malformed("missing CRLF after chunk data");
        }
        state_ = State::kSize;
        break;
      }
      case State::kTrailer: {
        size_t lf = in.find('\n', pos);
        if (lf == absl::string_view::npos) {
          if (trailer_bytes_ + (in.size() - pos) > kMaxTrailerBytes) {
            return Malformed("trailer section exceeds 64 KiB");
          }
          *consumed = pos;
          return absl::OkStatus();
        }
        trailer_bytes_ += lf + 1 - pos;
        if (trailer_bytes_ > kMaxTrailerBytes) return Malformed("trailer section exceeds 64 KiB");
        absl::string_view line = StripCr(in.substr(pos, lf - pos));
        pos = lf + 1;
        if (line.empty()) {
          state_ = State::kDone;
          *consumed = pos;
          return absl::OkStatus();
        }
        // Trailer fields are validated like header fields and then dropped.
        if (IsOws(line[0])) return Malformed("obsolete line folding in trailer section");
        size_t colon = line.find(':');
        if (colon == absl::string_view::npos || !IsHttpToken(line.substr(0, colon)) ||
            line.find('\r') != absl::string_view::npos) {
          return Malformed("invalid trailer field");
        }
        break;
      }
      case State::kDone:
        *consumed = pos;
        return absl::OkStatus();
    }
  }
}

bool IsHttpToken(absl::string_view s) {
  if (s.empty()) return false;
  for (char c : s) {
    if (!IsTchar(static_cast<unsigned char>(c))) return false;
  }
  return true;
}

bool IsValidRequestTarget(absl::string_view target) {
  if (target.empty()) return false;
  if (target != "*" && target[0] != '/') return false;
  for (char c : target) {
    unsigned char u = static_cast<unsigned char>(c);
    if (u <= 0x20 || u == 0x7f) return false;
  }
  return true;
}

bool IsValidHeaderValue(absl::string_view value) {
  for (char c : value) {
    if (c == '\r' || c == '\n' || c == '\0') return false;
  }
  return true;
}

bool IsClientOwnedHeader(absl::string_view name) {
  static constexpr absl::string_view kOwned[] = {
      "host",       "content-length", "transfer-encoding",
      "connection", "keep-alive",     "proxy-connection",
      "te",         "upgrade",        "expect"};
  for (absl::string_view owned : kOwned) {
    if (absl::EqualsIgnoreCase(name, owned)) return true;
  }
  return false;
}

absl::Status SerializeRequestHead(const HttpRequestHeadInput& in, std::string* out) {
  if (!IsHttpToken(in.method)) return absl::InvalidArgumentError("invalid request method");
  if (!IsValidRequestTarget(in.target)) {
    return absl::InvalidArgumentError("invalid request target (must be origin-form)");
  }
  size_t estimate = in.method.size() + in.target.size() + in.host_header.size() + 96;
  if (in.headers != nullptr) {
    for (const HttpHeader& h : *in.headers) {
      if (!IsHttpToken(h.name)) return absl::InvalidArgumentError("invalid request header name");
      if (!IsValidHeaderValue(h.value)) {
        return absl::InvalidArgumentError(
            absl::StrCat("invalid character in value of request header ", h.name));
      }
      estimate += h.name.size() + h.value.size() + 4;
    }
  }
  out->clear();
  out->reserve(estimate);
  absl::StrAppend(out, in.method, " ", in.target, " HTTP/1.1\r\nHost: ", in.host_header, "\r\n");
  if (in.headers != nullptr) {
    for (const HttpHeader& h : *in.headers) {
      if (IsClientOwnedHeader(h.name)) continue;
      absl::StrAppend(out, h.name, ": ", h.value, "\r\n");
    }
  }
  if (in.body_size > 0 || in.method == "POST" || in.method == "PUT" || in.method == "PATCH") {
    absl::StrAppend(out, "Content-Length: ", in.body_size, "\r\n");
  }
  out->append("Connection: keep-alive\r\n\r\n");
  return absl::OkStatus();
}

}  // namespace sflb
