// Tests of dataplane/client_auth: who is calling, from the Authorization header.
#include "dataplane/client_auth.h"

#include <cctype>
#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace sflb {
namespace {

const char kUser[] = "user-key-0123456789abcdef";
const char kAdmin[] = "admin-key-fedcba9876543210";

const char* RoleName(ClientRole role) {
  switch (role) {
    case ClientRole::kNone:
      return "none";
    case ClientRole::kUser:
      return "user";
    case ClientRole::kAdmin:
      return "admin";
  }
  return "?";
}

// Failure messages show the role only, never the header (it may hold a key).
#define EXPECT_ROLE(auth, header, role) \
  EXPECT_STREQ(RoleName((auth).Check(header)), RoleName(role)) << "case at line " << __LINE__

class ClientAuthTest : public ::testing::Test {
 protected:
  ClientAuth auth_{kUser, kAdmin};
};

TEST_F(ClientAuthTest, BearerUserAndAdminKeys) {
  EXPECT_ROLE(auth_, absl::StrCat("Bearer ", kUser), ClientRole::kUser);
  EXPECT_ROLE(auth_, absl::StrCat("Bearer ", kAdmin), ClientRole::kAdmin);
}

TEST_F(ClientAuthTest, SchemeIsCaseInsensitive) {
  for (const char* scheme : {"bearer", "BEARER", "bEaReR", "Bearer"}) {
    EXPECT_ROLE(auth_, absl::StrCat(scheme, " ", kUser), ClientRole::kUser);
    EXPECT_ROLE(auth_, absl::StrCat(scheme, " ", kAdmin), ClientRole::kAdmin);
  }
}

TEST_F(ClientAuthTest, SurroundingAndSeparatingWhitespaceIsTolerated) {
  EXPECT_ROLE(auth_, absl::StrCat("  Bearer ", kUser, "  "), ClientRole::kUser);
  EXPECT_ROLE(auth_, absl::StrCat("Bearer\t", kUser), ClientRole::kUser);
  EXPECT_ROLE(auth_, absl::StrCat("Bearer   ", kAdmin, "\t"), ClientRole::kAdmin);
  EXPECT_ROLE(auth_, absl::StrCat("Bearer \t ", kUser, "\r\n"), ClientRole::kUser);
}

TEST_F(ClientAuthTest, WrongOrMalformedCredentialsAreRejected) {
  std::string user = kUser;
  std::string wrong_last = user;
  wrong_last.back() = wrong_last.back() == 'f' ? 'e' : 'f';
  for (const std::string& header :
       {std::string(""), std::string("Bearer"), std::string("Bearer "), std::string("Bearer    "),
        std::string("Bearer\t"), absl::StrCat("Bearer ", wrong_last),
        absl::StrCat("Bearer ", user.substr(0, user.size() - 1)),
        absl::StrCat("Bearer ", user, "x"), absl::StrCat("Bearer ", user, " extra"),
        absl::StrCat("Basic ", user), absl::StrCat("Token ", user), absl::StrCat("Bearer", user),
        absl::StrCat("Bearer:", user), absl::StrCat("Bearerx ", user), user,
        absl::StrCat("Bearer ", user, kAdmin), absl::StrCat("Bearer \"", user, "\""),
        absl::StrCat("Bearer ", std::string(kUser, 1)), std::string(kAdmin)}) {
    ClientRole role = auth_.Check(header);
    EXPECT_EQ(role, ClientRole::kNone)
        << "accepted a malformed header of length " << header.size() << " as " << RoleName(role);
  }
}

TEST_F(ClientAuthTest, KeysAreCaseSensitive) {
  std::string upper = kUser;
  for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  EXPECT_ROLE(auth_, absl::StrCat("Bearer ", upper), ClientRole::kNone);
}

TEST(ClientAuthEmptyKeysTest, EmptyConfiguredKeyNeverMatches) {
  // A misconfigured empty key must not let "Bearer " (an empty token) in.
  ClientAuth auth("", "");
  EXPECT_EQ(auth.Check("Bearer "), ClientRole::kNone);
  EXPECT_EQ(auth.Check("Bearer  "), ClientRole::kNone);
  EXPECT_EQ(auth.Check(""), ClientRole::kNone);
  EXPECT_EQ(auth.Check("Bearer x"), ClientRole::kNone);
}

}  // namespace
}  // namespace sflb
