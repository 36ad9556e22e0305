# sflb_upstream: the dataplane's HTTP/1.1 client towards SiliconFlow (connection pool, TLS).
# Included from dataplane/CMakeLists.txt.
add_library(sflb_upstream STATIC
  ${CMAKE_CURRENT_LIST_DIR}/http_wire.cc
  ${CMAKE_CURRENT_LIST_DIR}/upstream_client.cc
)
sflb_target_defaults(sflb_upstream)
target_link_libraries(sflb_upstream PUBLIC
  absl::status absl::statusor absl::strings absl::time absl::synchronization
  OpenSSL::SSL OpenSSL::Crypto Threads::Threads)
