// Chunk framing of relayed streams, and the bookkeeping of a stream on its way (ResponseStream).
#include "dataplane/stream_relay.h"

#include <memory>

#include "absl/status/status.h"
#include "dataplane/response_stream.h"

#include <string>

#include "gtest/gtest.h"

namespace sflb {
namespace {

TEST(AppendChunkTest, FramesDataWithItsHexSize) {
  std::string out = "head";
  AppendChunk("hello", &out);
  EXPECT_EQ(out, "head5\r\nhello\r\n");
  std::string big(300, 'x');
  out.clear();
  AppendChunk(big, &out);
  EXPECT_EQ(out.substr(0, 5), "12c\r\n");
  EXPECT_EQ(out.size(), 5 + 300 + 2u);
  EXPECT_EQ(out.substr(out.size() - 2), "\r\n");
}

TEST(AppendChunkTest, EmptyDataAddsNothingBecauseAnEmptyChunkWouldEndTheBody) {
  std::string out = "x";
  AppendChunk("", &out);
  EXPECT_EQ(out, "x");
}

TEST(AppendChunkTest, SizesUpToManyMegabytes) {
  std::string data(0x1abcde, 'y');
  std::string out;
  AppendChunk(data, &out);
  EXPECT_EQ(out.substr(0, 8), "1abcde\r\n");
}

}  // namespace
}  // namespace sflb

namespace sflb {
namespace {

class ResponseStreamTest : public ::testing::Test {
 protected:
  std::unique_ptr<ResponseStream> Make(bool sse) {
    auto key = std::make_shared<PoolKey>();
    key->id = 7;
    key->fingerprint = "abcdef012345";
    record_ = std::make_shared<RequestRecord>();
    record_->enabled = false;
    return std::make_unique<ResponseStream>(nullptr, key, &reports_, record_, nullptr, sse);
  }
  ReportBuffer reports_;
  std::shared_ptr<RequestRecord> record_;
};

TEST_F(ResponseStreamTest, UsageIsReadFromDataLinesSplitAcrossPieces) {
  auto stream = Make(/*sse=*/true);
  stream->Forwarded("data: {\"choices\":[]}\n\ndata: {\"usage\":{\"prompt_");
  stream->Forwarded("tokens\":11,\"completion_tokens\":4}}\n\n");
  stream->Forwarded("data: [DONE]\n\n");
  stream->Finish();
  EXPECT_TRUE(record_->have_usage);
  EXPECT_EQ(record_->prompt_tokens, 11u);
  EXPECT_EQ(record_->completion_tokens, 4u);
  EXPECT_GT(record_->response_bytes, 60u);
  v1::ReportRequest report;
  ASSERT_TRUE(reports_.Take(&report));
}

TEST_F(ResponseStreamTest, BrokenStreamEndsWithAnErrorEventAfterACompleteEvent) {
  auto stream = Make(/*sse=*/true);
  stream->Forwarded("data: {\"x\":1}\n\ndata: {\"x\"");  // cut inside the second event
  absl::optional<std::string> last = stream->Ending(absl::UnavailableError("reset"), false);
  ASSERT_TRUE(last.has_value());
  EXPECT_EQ(last->substr(0, 2), "\n\n");  // closes the cut event first
  EXPECT_NE(last->find("stream_interrupted"), std::string::npos);
  EXPECT_EQ(record_->stream_end, "upstream_broken");
  stream->Finish();
}

TEST_F(ResponseStreamTest, ClientGoneAndPlainBodiesAreCutNotFramed) {
  auto sse = Make(/*sse=*/true);
  EXPECT_FALSE(sse->Ending(absl::CancelledError("client left"), false).has_value());
  EXPECT_EQ(record_->stream_end, "client_disconnected");
  sse->Finish();
  auto plain = Make(/*sse=*/false);
  EXPECT_FALSE(plain->Ending(absl::UnavailableError("reset"), false).has_value());
  plain->Finish();
  auto draining = Make(/*sse=*/true);
  draining->Forwarded("data: {}\n\n");
  absl::optional<std::string> last = draining->Ending(absl::CancelledError("drain"), true);
  ASSERT_TRUE(last.has_value());
  EXPECT_NE(last->find("server_shutting_down"), std::string::npos);
  EXPECT_EQ(last->substr(0, 2), "da");  // already at an event boundary
  EXPECT_EQ(record_->stream_end, "server_shutdown");
  draining->Finish();
}

}  // namespace
}  // namespace sflb
