// ControlplaneLink: the dataplane's three background loops towards the controlplane.
//
//  - watch:  keeps a Watch stream open, applies snapshots and deltas to the KeyPool, and
//            reconnects with jittered exponential backoff (100 ms .. 5 s) when it breaks;
//            while the controlplane is unreachable it retries as soon as the channel
//            reconnects (within the backoff).
//  - lease:  refills the KeyPool's lease queue ahead of need; also the watch stream's
//            watchdog (cancels a stream silent for 3 heartbeats).
//  - report: ships the ReportBuffer every `report_interval`, at once for failures.
//
// None of this is on the request path: when the controlplane is away, requests keep being
// served from the last snapshot (KeyPool's local round robin).
#ifndef SFLB_DATAPLANE_CONTROLPLANE_LINK_H_
#define SFLB_DATAPLANE_CONTROLPLANE_LINK_H_

#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include "absl/time/time.h"
#include "common/mutex.h"
#include "dataplane/key_pool.h"
#include "dataplane/report_buffer.h"
#include "grpcpp/grpcpp.h"
#include "sflb/v1/key_service.grpc.pb.h"

namespace sflb {

class ControlplaneLink {
 public:
  struct Options {
    std::string address = "127.0.0.1:50051";
    std::string replica_id;
    // Sent as `authorization: Bearer <token>` on every call (empty: none).
    std::string token;
    // Deadline of each Lease/Report call.
    absl::Duration rpc_timeout = absl::Seconds(2);
    // Regular report cadence (failures go at once).
    absl::Duration report_interval = absl::Seconds(1);
    // A watch stream silent this long is considered dead (controlplane heartbeat is 5 s).
    absl::Duration watch_silence_limit = absl::Seconds(15);
  };

  // `pool` and `reports` must outlive the link. `channel` reaches the controlplane (plaintext
  // or TLS, see MakeControlplaneChannel).
  ControlplaneLink(Options options, std::shared_ptr<grpc::Channel> channel, KeyPool* pool,
                   ReportBuffer* reports);
  ~ControlplaneLink();  // Stop()s

  // Starts the three threads. Call once.
  void Start();
  // Flushes a last report (bounded by rpc_timeout) and joins the threads. Idempotent.
  void Stop();

  // True while a Watch stream is open and has delivered a snapshot.
  bool connected() const { return connected_.load(); }
  // Successful Lease calls, for stats.
  uint64_t lease_calls() const { return lease_calls_.load(); }
  uint64_t report_calls() const { return report_calls_.load(); }

 private:
  void WatchLoop();
  void LeaseLoop();
  void ReportLoop();
  bool SendReport();
  // Adds the token to a call.
  void Authorize(grpc::ClientContext* context) const;
  // Sleeps up to `d`, returning early (false) when stopping.
  bool SleepUnlessStopping(absl::Duration d);
  // Waits up to `limit` for the channel to be connected (asking it to connect); false when
  // the limit passed or the link is stopping.
  bool WaitForChannelUnlessStopping(absl::Duration limit);

  const Options options_;
  KeyPool* const pool_;
  ReportBuffer* const reports_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::KeyService::Stub> stub_;

  std::atomic<bool> stopping_{false};
  std::atomic<bool> connected_{false};
  std::atomic<int64_t> last_watch_message_ms_{0};
  std::atomic<uint64_t> lease_calls_{0};
  std::atomic<uint64_t> report_calls_{0};

  Mutex mu_;
  CondVar stop_cv_;
  // The open Watch call's context, so Stop() and the watchdog can cancel it.
  grpc::ClientContext* watch_context_ ABSL_GUARDED_BY(mu_) = nullptr;

  std::thread watch_thread_;
  std::thread lease_thread_;
  std::thread report_thread_;
};

}  // namespace sflb

#endif  // SFLB_DATAPLANE_CONTROLPLANE_LINK_H_
