// sflb-dataplane: the stateless HTTP proxy replicas that carry client traffic.
#include <iostream>

#include "common/log.h"
#include "common/signals.h"
#include "dataplane/dataplane_server.h"

int main(int argc, char** argv) {
  sflb::BlockTerminationSignals();
  sflb::SetLogComponent("dataplane");
  sflb::DataplaneOptions options;
  sflb::OptionParser parser(
      "sflb-dataplane",
      "An sflb dataplane replica: authenticates clients and forwards the SiliconFlow API with\n"
      "keys leased from the controlplane, streaming responses as they arrive.");
  sflb::RegisterDataplaneOptions(&parser, &options);
  absl::Status status = parser.Parse(argc, argv, sflb::ProcessEnv());
  if (parser.help_requested()) {
    std::cout << parser.Usage();
    return 0;
  }
  if (status.ok()) status = sflb::ValidateDataplaneOptions(options);
  if (!status.ok()) {
    std::cerr << "sflb-dataplane: " << status.message() << "\n";
    return 2;
  }
  sflb::LogLevel level;
  sflb::ParseLogLevel(options.log_level, &level);
  sflb::SetMinLogLevel(level);
  status = sflb::RunDataplane(options);
  if (!status.ok()) {
    sflb::LogError("fatal", {{"reason", std::string(status.message())}});
    return 1;
  }
  return 0;
}
