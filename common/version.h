// sflb's version, shown by /info, --help and sflbctl.
#ifndef SFLB_COMMON_VERSION_H_
#define SFLB_COMMON_VERSION_H_

namespace sflb {
inline constexpr char kVersion[] = "0.1.0";
inline constexpr char kProductName[] = "sflb";
}  // namespace sflb

#endif  // SFLB_COMMON_VERSION_H_
