// Pure request/response rewriting rules of the proxy: which path goes upstream, which headers
// cross in each direction. No I/O; unit-tested in tests/unit/dataplane/forwarding_test.cc.
#ifndef SFLB_DATAPLANE_FORWARDING_H_
#define SFLB_DATAPLANE_FORWARDING_H_

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

// Scans a request body for its top-level "model" and "stream" members with a streaming (SAX)
// parse that stops as soon as both are found, so a large prompt is not parsed in full when
// the members come first. Never throws; a non-JSON body gives an empty summary.
BodySummary SummarizeBody(absl::string_view body);

}  // namespace sflb

#endif  // SFLB_DATAPLANE_FORWARDING_H_
