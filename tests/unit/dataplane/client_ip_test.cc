#include "dataplane/client_ip.h"

#include "gtest/gtest.h"

namespace sflb {
namespace {

TEST(TrustedProxiesTest, UntrustedPeerIsTheClient) {
  TrustedProxies trusted = *TrustedProxies::Parse("10.0.0.0/8");
  EXPECT_EQ(trusted.ClientIp("203.0.113.9", "1.2.3.4"), "203.0.113.9");
}

TEST(TrustedProxiesTest, TrustedPeerYieldsTheRightMostUntrustedHop) {
  TrustedProxies trusted = *TrustedProxies::Parse("10.0.0.0/8, 192.168.1.7");
  // The client could have written "6.6.6.6" itself; only hops added by trusted proxies count.
  EXPECT_EQ(trusted.ClientIp("10.1.2.3", "6.6.6.6, 198.51.100.4, 192.168.1.7"), "198.51.100.4");
  EXPECT_EQ(trusted.ClientIp("10.1.2.3", ""), "10.1.2.3");
  EXPECT_EQ(trusted.ClientIp("10.1.2.3", "not-an-ip"), "10.1.2.3");
  EXPECT_EQ(trusted.ClientIp("10.1.2.3", "10.9.9.9"), "10.9.9.9");
}

TEST(TrustedProxiesTest, Ipv6Ranges) {
  TrustedProxies trusted = *TrustedProxies::Parse("fd00::/8, ::1");
  EXPECT_TRUE(trusted.Contains("fd12::1"));
  EXPECT_FALSE(trusted.Contains("fe80::1"));
  EXPECT_EQ(trusted.ClientIp("::1", "2001:db8::5"), "2001:db8::5");
}

TEST(TrustedProxiesTest, PrefixBoundaries) {
  TrustedProxies trusted = *TrustedProxies::Parse("192.168.0.0/23");
  EXPECT_TRUE(trusted.Contains("192.168.1.255"));
  EXPECT_FALSE(trusted.Contains("192.168.2.0"));
}

TEST(TrustedProxiesTest, BadEntriesAreRejectedByName) {
  auto bad = TrustedProxies::Parse("10.0.0.0/8, banana");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("banana"), std::string::npos);
  EXPECT_FALSE(TrustedProxies::Parse("10.0.0.0/33").ok());
  EXPECT_FALSE(TrustedProxies::Parse("10.0.0.0/x").ok());
  EXPECT_TRUE(TrustedProxies::Parse("").ok());
}

}  // namespace
}  // namespace sflb
