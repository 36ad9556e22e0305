// HTTP/1.1 wire format: for the upstream client, request serialisation, response-head parsing
// and chunked-body decoding; for the dataplane's event loop, client request-head parsing
// (RFC 9112). Pure functions and a small state machine, no I/O, so
// every rule is unit-testable without sockets.
//
// Parsing is strict where leniency enables smuggling or splitting (obs-fold, whitespace before
// the colon, conflicting Content-Length values, bare CR) and lenient where it costs nothing
// (a bare LF ends a line, the reason phrase may be missing).
#ifndef SFLB_DATAPLANE_HTTP_WIRE_H_
#define SFLB_DATAPLANE_HTTP_WIRE_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace sflb {

// Largest response head (status line + header lines + blank line) the client accepts.
inline constexpr size_t kMaxResponseHeadBytes = 64 * 1024;
// Largest chunk-size line (with extensions) and total trailer section of a chunked body.
inline constexpr size_t kMaxChunkLineBytes = 4096;
inline constexpr size_t kMaxTrailerBytes = 64 * 1024;

struct HttpHeader {
  std::string name;
  std::string value;
};

// How the body of a response is delimited (RFC 9112 section 6.3).
enum class BodyFraming {
  kNone,           // HEAD request, 1xx, 204, 304: no body at all
  kContentLength,  // exactly ResponseHead::content_length bytes (may be 0)
  kChunked,        // Transfer-Encoding ending in "chunked"
  kUntilClose,     // neither: the body ends when the server closes the connection
};

struct ResponseHead {
  int status = 0;
  int version_minor = 1;  // HTTP/1.<version_minor>
  std::string reason;
  // In received order; names as sent (compare case-insensitively), values without OWS.
  std::vector<HttpHeader> headers;
  BodyFraming framing = BodyFraming::kNone;
  int64_t content_length = -1;  // set only for kContentLength
  // The server allows another request on this connection after this response: HTTP/1.1 without
  // "Connection: close", or HTTP/1.0 with "Connection: keep-alive"; false if Transfer-Encoding
  // and Content-Length were both present (a smuggling smell: do not reuse the connection).
  bool keep_alive = false;

  // First header named `name` (ASCII case-insensitive), or nullptr. The pointer is valid while
  // `headers` is not modified.
  const std::string* Find(absl::string_view name) const;
};

// Returns the offset just past the blank line that ends a message head in `buf` ("\r\n\r\n" or a
// bare-LF variant), or npos if the head is not complete yet. `*scan_from` is where the previous
// call stopped; it is updated so repeated calls on a growing buffer scan each byte about once.
size_t FindHeadEnd(absl::string_view buf, size_t* scan_from);

// Parses a complete response head `head` (as delimited by FindHeadEnd, blank line included) into
// `*out`, including framing and keep-alive. `request_was_head`: the request method was HEAD, so
// there is no body whatever the headers say. Errors are INTERNAL with a message that names the
// rule broken; header values never appear in messages.
absl::Status ParseResponseHead(absl::string_view head, bool request_was_head, ResponseHead* out);

// A client's request head, parsed by the event loop that serves plain requests itself.
struct RequestHead {
  std::string method;
  std::string target;  // as sent (origin-form)
  int version_minor = 1;  // HTTP/1.<version_minor>
  // In received order; names as sent, values without OWS.
  std::vector<HttpHeader> headers;
  bool has_content_length = false;
  uint64_t content_length = 0;  // 0 when absent
  bool has_transfer_encoding = false;
  bool has_expect = false;
  // HTTP/1.1 without "Connection: close" (HTTP/1.0 needs "Connection: keep-alive").
  bool keep_alive = true;

  // First header named `name` (ASCII case-insensitive), or nullptr.
  const std::string* Find(absl::string_view name) const;
};

// Largest request head the event loop parses; longer ones go to the thread path (httplib).
inline constexpr size_t kMaxRequestHeadBytes = 16 * 1024;

// Parses a complete request head (as delimited by FindHeadEnd, blank line included). Strict: a
// request-line of token SP origin-form-target SP "HTTP/1.x", CRLF line endings only, header
// names that are tokens, values without control characters, no obs-fold, at most one valid
// Content-Length value. INVALID_ARGUMENT with the rule broken (values never quoted) otherwise:
// the caller then lets httplib answer the request as it always did.
absl::Status ParseRequestHead(absl::string_view head, RequestHead* out);

// Incremental decoder of a chunked body. Feed it the unconsumed bytes; it consumes framing and
// returns data as views into the input, so body bytes are never copied.
class ChunkedDecoder {
 public:
  // Decodes a prefix of `in`. On OK, `*consumed` bytes of `in` were used and `*data` is the next
  // piece of decoded body (a view into `in`, possibly empty). Returns at most one piece per call.
  // `*consumed == 0 && data->empty() && !done()` means more input is needed: call again with the
  // same bytes plus what arrives next. Errors (INTERNAL) are final.
  absl::Status Decode(absl::string_view in, size_t* consumed, absl::string_view* data);
  // The last chunk and the trailer section have been consumed.
  bool done() const { return state_ == State::kDone; }

 private:
  enum class State { kSize, kData, kDataEnd, kTrailer, kDone };
  State state_ = State::kSize;
  uint64_t remaining_ = 0;    // bytes left in the current chunk (kData)
  size_t trailer_bytes_ = 0;  // trailer bytes consumed so far (kTrailer)
};

// Request-line tokens and header fields that are safe to put on the wire.
bool IsHttpToken(absl::string_view s);
bool IsValidRequestTarget(absl::string_view target);
bool IsValidHeaderValue(absl::string_view value);

// True for headers the client owns and drops from the caller's list: Host, Content-Length,
// Transfer-Encoding, Connection, Keep-Alive, Proxy-Connection, TE, Upgrade, Expect.
bool IsClientOwnedHeader(absl::string_view name);

// Serialises a request head (request line, Host, the caller's headers minus client-owned ones,
// Content-Length, "Connection: keep-alive", blank line). Content-Length is sent when the body is
// non-empty or the method usually carries one (POST, PUT, PATCH). Returns INVALID_ARGUMENT for a
// method, target, header name or value that would corrupt the framing (CR, LF, NUL, ...).
struct HttpRequestHeadInput {
  absl::string_view method;
  absl::string_view target;
  absl::string_view host_header;
  const std::vector<HttpHeader>* headers = nullptr;
  size_t body_size = 0;
};
absl::Status SerializeRequestHead(const HttpRequestHeadInput& in, std::string* out);

}  // namespace sflb

#endif  // SFLB_DATAPLANE_HTTP_WIRE_H_
