// sflb-controlplane: owns the key registry and serves dataplanes and sflbctl over gRPC.
#include <iostream>

#include "common/log.h"
#include "common/signals.h"
#include "controlplane/controlplane_server.h"

int main(int argc, char** argv) {
  sflb::BlockTerminationSignals();
  sflb::SetLogComponent("controlplane");
  sflb::ControlplaneOptions options;
  sflb::OptionParser parser(
      "sflb-controlplane",
      "The sflb controlplane: owns the SiliconFlow key set, the global round-robin, key state\n"
      "and counters, and serves dataplanes and sflbctl over gRPC.");
  sflb::RegisterControlplaneOptions(&parser, &options);
  sflb::EnvLookup env = sflb::ProcessEnv();
  absl::Status status = parser.Parse(argc, argv, env);
  if (parser.help_requested()) {
    std::cout << parser.Usage();
    return 0;
  }
  if (status.ok()) status = sflb::ValidateControlplaneOptions(options);
  if (!status.ok()) {
    std::cerr << "sflb-controlplane: " << status.message() << "\n";
    return 2;
  }
  sflb::LogLevel level;
  sflb::ParseLogLevel(options.log_level, &level);
  sflb::SetMinLogLevel(level);
  status = sflb::RunControlplane(options, env);
  if (!status.ok()) {
    sflb::LogError("fatal", {{"reason", std::string(status.message())}});
    return 1;
  }
  return 0;
}
