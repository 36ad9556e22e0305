// Error bodies the dataplane produces itself. Proxied API paths use the OpenAI shape that SDKs
// parse ({"error": {"message", "type", "code"}}); the old tool's own endpoints keep its shape
// ({"error": "<Title>", "message": "..."}).
#ifndef SFLB_DATAPLANE_ERROR_RESPONSE_H_
#define SFLB_DATAPLANE_ERROR_RESPONSE_H_

#include <string>

#include "absl/strings/string_view.h"
#include "httplib.h"

namespace sflb {

// {"error":{"message":..., "type":..., "code":...}}
std::string OpenAiErrorJson(absl::string_view message, absl::string_view type,
                            absl::string_view code);

// Sets status and an OpenAI-shaped JSON body on `res`.
void SetOpenAiError(httplib::Response& res, int status, absl::string_view message,
                    absl::string_view type, absl::string_view code);

// Sets status and the old tool's {"error": title, "message": message} body.
void SetLegacyError(httplib::Response& res, int status, absl::string_view title,
                    absl::string_view message);

// One SSE event carrying an OpenAI-shaped error, for failures after a stream has started.
std::string SseErrorEvent(absl::string_view message, absl::string_view type,
                          absl::string_view code);

}  // namespace sflb

#endif  // SFLB_DATAPLANE_ERROR_RESPONSE_H_
