// sflbctl: the operator CLI for sflb-controlplane. All logic is in ctl.cc (RunCtl).
#include <iostream>
#include <string>
#include <vector>

#include "ctl/ctl.h"

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  return sflb::RunCtl(args, sflb::ProcessEnv(), std::cout, std::cerr);
}
