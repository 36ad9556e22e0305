// MetricsServer: serves a prometheus::Registry as Prometheus text on GET /metrics, on its own
// plain-HTTP listener (SFLB_METRICS_LISTEN), apart from the API and gRPC ports.
#ifndef SFLB_COMMON_METRICS_SERVER_H_
#define SFLB_COMMON_METRICS_SERVER_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "prometheus/exposer.h"
#include "prometheus/registry.h"

namespace sflb {

class MetricsServer {
 public:
  // Listens on `address` ("host:port"; port 0 picks one). UNAVAILABLE naming the address when
  // it cannot bind.
  static absl::StatusOr<std::unique_ptr<MetricsServer>> Start(
      const std::string& address, std::shared_ptr<prometheus::Registry> registry);

  int port() const { return port_; }

 private:
  MetricsServer(std::unique_ptr<prometheus::Exposer> exposer, int port)
      : exposer_(std::move(exposer)), port_(port) {}
  std::unique_ptr<prometheus::Exposer> exposer_;
  int port_;
};

}  // namespace sflb

#endif  // SFLB_COMMON_METRICS_SERVER_H_
