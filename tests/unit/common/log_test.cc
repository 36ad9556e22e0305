#include "common/log.h"

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace sflb {
namespace {

std::string Quoted(absl::string_view value) {
  std::string out;
  AppendJsonString(value, &out);
  return out;
}

TEST(AppendJsonStringTest, PlainTextIsQuotedAsIs) {
  EXPECT_EQ(Quoted("/v1/chat/completions"), "\"/v1/chat/completions\"");
  EXPECT_EQ(Quoted(""), "\"\"");
}

TEST(AppendJsonStringTest, ClientControlledTextCannotBreakTheLine) {
  std::string hostile = "/x\"}\n{\"event\":\"forged\\\x01\xff";
  std::string quoted = Quoted(hostile);
  EXPECT_EQ(quoted.find('\n'), std::string::npos);
  nlohmann::json parsed = nlohmann::json::parse("{\"v\":" + quoted + "}", nullptr, false);
  ASSERT_TRUE(parsed.is_object()) << quoted;
  std::string back = parsed["v"].get<std::string>();
  EXPECT_EQ(back.substr(0, 8), "/x\"}\n{\"e");
}

}  // namespace
}  // namespace sflb
