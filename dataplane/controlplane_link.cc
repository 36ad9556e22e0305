#include "dataplane/controlplane_link.h"

#include <algorithm>

#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/grpc_util.h"
#include "common/log.h"

namespace sflb {
namespace {

constexpr absl::Duration kMinBackoff = absl::Milliseconds(100);
constexpr absl::Duration kMaxBackoff = absl::Seconds(5);

absl::Duration Jittered(absl::Duration d) {
  thread_local absl::BitGen gen;
  return d * absl::Uniform(gen, 0.5, 1.0);
}

}  // namespace

ControlplaneLink::ControlplaneLink(Options options, std::shared_ptr<grpc::Channel> channel,
                                   KeyPool* pool, ReportBuffer* reports)
    : options_(std::move(options)),
      pool_(pool),
      reports_(reports),
      channel_(std::move(channel)),
      stub_(v1::KeyService::NewStub(channel_)) {
  pool_->SetReplicaId(options_.replica_id);
}

ControlplaneLink::~ControlplaneLink() { Stop(); }

void ControlplaneLink::Authorize(grpc::ClientContext* context) const {
  if (!options_.token.empty()) {
    context->AddMetadata(kAuthorizationMetadata, absl::StrCat("Bearer ", options_.token));
  }
}

void ControlplaneLink::Start() {
  watch_thread_ = std::thread([this] { WatchLoop(); });
  lease_thread_ = std::thread([this] { LeaseLoop(); });
  report_thread_ = std::thread([this] { ReportLoop(); });
}

void ControlplaneLink::Stop() {
  if (stopping_.exchange(true)) return;
  {
    MutexLock lock(&mu_);
    if (watch_context_ != nullptr) watch_context_->TryCancel();
    stop_cv_.SignalAll();
  }
  if (watch_thread_.joinable()) watch_thread_.join();
  if (lease_thread_.joinable()) lease_thread_.join();
  if (report_thread_.joinable()) report_thread_.join();
  SendReport();  // last counters, bounded by rpc_timeout
}

bool ControlplaneLink::SleepUnlessStopping(absl::Duration d) {
  absl::Time deadline = absl::Now() + d;
  MutexLock lock(&mu_);
  while (!stopping_.load()) {
    if (!stop_cv_.WaitWithDeadline(&mu_, deadline)) break;
  }
  return !stopping_.load();
}

void ControlplaneLink::WatchLoop() {
  absl::Duration backoff = kMinBackoff;
  bool logged_down = false;
  while (!stopping_.load()) {
    grpc::ClientContext context;
    {
      MutexLock lock(&mu_);
      if (stopping_.load()) break;
      watch_context_ = &context;
    }
    Authorize(&context);
    v1::WatchRequest request;
    request.set_replica_id(options_.replica_id);
    last_watch_message_ms_.store(absl::ToUnixMillis(absl::Now()));
    std::unique_ptr<grpc::ClientReader<v1::WatchResponse>> reader =
        stub_->Watch(&context, request);
    v1::WatchResponse response;
    bool resync = false;
    while (!resync && reader->Read(&response)) {
      last_watch_message_ms_.store(absl::ToUnixMillis(absl::Now()));
      if (response.has_snapshot()) {
        pool_->ApplySnapshot(response.snapshot());
        pool_->SetConnected(true);
        if (!connected_.exchange(true)) {
          LogInfo("controlplane_connected", {{"address", options_.address},
                                             {"version", response.snapshot().version()},
                                             {"keys", response.snapshot().keys_size()}});
        }
        backoff = kMinBackoff;
        logged_down = false;
      } else if (response.has_delta()) {
        if (!pool_->ApplyDelta(response.delta())) {
          LogWarning("watch_resync", {{"held", pool_->version()},
                                      {"delta_from", response.delta().from_version()}});
          resync = true;  // start a new stream, which begins with a full snapshot
        }
      }
    }
    if (resync) context.TryCancel();
    grpc::Status status = reader->Finish();
    {
      MutexLock lock(&mu_);
      watch_context_ = nullptr;
    }
    bool was_connected = connected_.exchange(false);
    pool_->SetConnected(false);
    if (stopping_.load()) break;
    if (resync) continue;
    if (was_connected || !logged_down) {
      LogWarning("controlplane_unreachable",
                 {{"address", options_.address},
                  {"code", static_cast<int>(status.error_code())},
                  {"message", status.error_message()},
                  {"serving_from", was_connected ? "last snapshot" : "nothing yet"}});
      logged_down = true;
    }
    if (status.error_code() == grpc::StatusCode::UNAVAILABLE &&
        channel_->GetState(/*try_to_connect=*/false) != GRPC_CHANNEL_READY) {
      // Not reachable: retry as soon as the channel is connected again (its own reconnect
      // backoff is at most 2 s) rather than after a blind sleep that stacks on top of it. (A
      // connected channel whose calls fail takes the plain backoff below.)
      SleepUnlessStopping(Jittered(kMinBackoff));
      WaitForChannelUnlessStopping(backoff);
    } else {
      SleepUnlessStopping(Jittered(backoff));
    }
    backoff = std::min(backoff * 2, kMaxBackoff);
  }
}

bool ControlplaneLink::WaitForChannelUnlessStopping(absl::Duration limit) {
  absl::Time deadline = absl::Now() + limit;
  // Slices keep Stop() prompt: WaitForConnected itself cannot be interrupted.
  while (!stopping_.load() && absl::Now() < deadline) {
    absl::Time slice = std::min(deadline, absl::Now() + absl::Milliseconds(100));
    if (channel_->WaitForConnected(absl::ToChronoTime(slice))) return true;
  }
  return false;
}

void ControlplaneLink::LeaseLoop() {
  absl::Duration backoff = kMinBackoff;
  while (!stopping_.load()) {
    uint32_t batch = pool_->WaitForLeaseNeed(absl::Milliseconds(500));
    // Watchdog: a stream without even a heartbeat for this long is dead; cancel it so the
    // watch loop reconnects.
    int64_t silent_ms = absl::ToUnixMillis(absl::Now()) - last_watch_message_ms_.load();
    if (silent_ms > absl::ToInt64Milliseconds(options_.watch_silence_limit)) {
      MutexLock lock(&mu_);
      if (watch_context_ != nullptr) {
        LogWarning("watch_silent", {{"silent_ms", silent_ms}});
        watch_context_->TryCancel();
      }
    }
    if (batch == 0 || stopping_.load()) continue;
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + options_.rpc_timeout));
    Authorize(&context);
    v1::LeaseRequest request;
    request.set_replica_id(options_.replica_id);
    request.set_count(batch);
    v1::LeaseResponse response;
    grpc::Status status = stub_->Lease(&context, request, &response);
    if (status.ok()) {
      lease_calls_.fetch_add(1);
      pool_->AddLease(response);
      backoff = kMinBackoff;
    } else {
      LogDebug("lease_failed", {{"code", static_cast<int>(status.error_code())},
                                {"message", status.error_message()}});
      SleepUnlessStopping(Jittered(backoff));
      backoff = std::min(backoff * 2, kMaxBackoff);
    }
  }
}

bool ControlplaneLink::SendReport() {
  v1::ReportRequest request;
  if (!reports_->Take(&request)) return true;
  request.set_replica_id(options_.replica_id);
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + options_.rpc_timeout));
  Authorize(&context);
  v1::ReportResponse response;
  grpc::Status status = stub_->Report(&context, request, &response);
  if (status.ok()) {
    report_calls_.fetch_add(1);
    return true;
  }
  reports_->Restore(request);
  LogDebug("report_failed", {{"code", static_cast<int>(status.error_code())},
                             {"message", status.error_message()}});
  return false;
}

void ControlplaneLink::ReportLoop() {
  absl::Duration backoff = kMinBackoff;
  absl::Time next_regular = absl::Now() + options_.report_interval;
  while (!stopping_.load()) {
    absl::Duration wait = std::max(absl::ZeroDuration(), next_regular - absl::Now());
    bool urgent = reports_->WaitForUrgent(std::min(wait, absl::Milliseconds(500)));
    if (stopping_.load()) break;
    if (!urgent && absl::Now() < next_regular) continue;
    next_regular = absl::Now() + options_.report_interval;
    if (SendReport()) {
      backoff = kMinBackoff;
    } else {
      SleepUnlessStopping(Jittered(backoff));
      backoff = std::min(backoff * 2, kMaxBackoff);
    }
  }
}

}  // namespace sflb
