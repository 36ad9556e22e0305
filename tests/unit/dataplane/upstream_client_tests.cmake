# Tests of dataplane/http_wire and dataplane/upstream_client. Included from tests/unit.
sflb_add_test(http_wire_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/http_wire_test.cc
  LIBS sflb_upstream)
sflb_add_test(upstream_client_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/upstream_client_test.cc
  LIBS sflb_upstream PkgConfig::HTTPLIB)
