// Pure request/response rewriting rules of the proxy: which path goes upstream, which headers
// cross in each direction, and what the proxy reads from JSON bodies. No I/O; all functions are
// thread-safe; unit-tested in tests/unit/dataplane/forwarding_test.cc.
#ifndef SFLB_DATAPLANE_FORWARDING_H_
#define SFLB_DATAPLANE_FORWARDING_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/string_view.h"

namespace sflb {

// Splits a raw request target ("/v1/chat/completions?x=1") into path and query (without '?').
std::pair<absl::string_view, absl::string_view> SplitTarget(absl::string_view target);

// Removes one optional leading "/v1" path segment: "/v1/models" -> "/models", "/v1" -> "/",
// "/v1beta/x" stays, "/models" stays. The result always starts with '/'.
std::string StripVersionPrefix(absl::string_view path);

// A decoded path made canonical for access checks: duplicate slashes collapsed, "." and ".."
// segments resolved (never above the root). "/v1//user/./info" -> "/v1/user/info".
std::string NormalizePath(absl::string_view decoded_path);

// Joins the upstream base path ("/v1" or "") with a client path and raw query, byte-exact.
std::string UpstreamTarget(absl::string_view base_path, absl::string_view path,
                           absl::string_view query);

// True for request headers that must not be forwarded upstream: hop-by-hop headers (and any
// named in `connection_header`), Host, Content-Length (re-computed), the client's
// Authorization and Cookie, Accept-Encoding (sflb asks for identity so it can read usage and
// never re-encodes), Expect, Proxy-*, X-Forwarded-* and httplib's pseudo headers.
bool IsRequestHeaderDropped(absl::string_view name, absl::string_view connection_header);

// True for response headers that must not be passed back: hop-by-hop headers (and any named in
// `connection_header`), Content-Length and Transfer-Encoding (the dataplane frames the body).
bool IsResponseHeaderDropped(absl::string_view name, absl::string_view connection_header);

// What the proxy needs to know of a JSON request body.
struct BodySummary {
  // Top-level "model" string; "" when absent or not a JSON object.
  std::string model;
  // Top-level "stream": true.
  bool stream = false;
};

// Scans a request body for its top-level "model" and "stream" members and stops as soon as
// both are found, so a large prompt is not scanned in full when the members come first. Keys
// and the model are compared and returned decoded (JSON escapes, \uXXXX and surrogate pairs).
// Never throws and never allocates beyond the model string. A body that is not a JSON object
// gives an empty summary; a body that turns malformed (or nests deeper than 1024 levels)
// gives what was found before that point; a later duplicate member overrides an earlier one
// unless the scan already stopped.
BodySummary SummarizeBody(absl::string_view body);

// Reads the token counts of a JSON response's top-level "usage" object: the whole body of a
// plain response, or the payload of one SSE "data:" line (leading and trailing JSON whitespace
// allowed). Returns true, and sets both outputs, when `json` is one valid JSON object (nesting
// at most 1024 levels deep) whose top-level "usage" member is an object; in it, a missing
// "prompt_tokens" / "completion_tokens" counts 0. Returns false, leaving the outputs alone,
// for invalid JSON, a non-object, no "usage", a "usage" that is null or not an object, and a
// count that is not a number in [0, 2^64): negative integers (other than -0), booleans and
// strings are rejected; a fraction or exponent is truncated ("12.9" -> 12); integers beyond
// 2^64 - 1 are rejected. "usage" inside strings or nested values is never taken; when a member
// is repeated, the last one counts (as when parsing into a document). One pass, no allocation,
// never throws. Equivalent to nlohmann::json::parse plus a find("usage") except for the
// rejected counts above (where value<uint64_t>() would wrap, convert or throw) and the depth.
bool ExtractUsage(absl::string_view json, uint64_t* prompt_tokens, uint64_t* completion_tokens);

// The upstream error message of a JSON error body: the top-level "message" string, or if
// that is absent, not a string or empty, the "message" string of a top-level "error" object
// (OpenAI's {"error": {"message": ...}}). Decoded and cut to its first 512 bytes (which may
// split a UTF-8 sequence); "" when there is none or `json` is not valid JSON. Repeated members:
// the last counts. Never throws; allocates only the result.
std::string ExtractErrorMessage(absl::string_view json);

}  // namespace sflb

#endif  // SFLB_DATAPLANE_FORWARDING_H_
