#include "dataplane/error_response.h"

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace sflb {

std::string OpenAiErrorJson(absl::string_view message, absl::string_view type,
                            absl::string_view code) {
  nlohmann::ordered_json body;
  body["error"]["message"] = std::string(message);
  body["error"]["type"] = std::string(type);
  body["error"]["code"] = std::string(code);
  return body.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

void SetOpenAiError(httplib::Response& res, int status, absl::string_view message,
                    absl::string_view type, absl::string_view code) {
  res.status = status;
  res.set_content(OpenAiErrorJson(message, type, code), "application/json");
}

void SetLegacyError(httplib::Response& res, int status, absl::string_view title,
                    absl::string_view message) {
  nlohmann::ordered_json body;
  body["error"] = std::string(title);
  body["message"] = std::string(message);
  res.status = status;
  res.set_content(body.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace),
                  "application/json");
}

std::string SseErrorEvent(absl::string_view message, absl::string_view type,
                          absl::string_view code) {
  return absl::StrCat("data: ", OpenAiErrorJson(message, type, code), "\n\n");
}

}  // namespace sflb
