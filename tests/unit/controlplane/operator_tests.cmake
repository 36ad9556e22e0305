# Unit tests of the audit log and the balance checker (in sflb_controlplane_lib).
sflb_add_test(audit_log_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/audit_log_test.cc
  LIBS sflb_controlplane_lib)
sflb_add_test(balance_checker_test
  SOURCES ${CMAKE_CURRENT_LIST_DIR}/balance_checker_test.cc
  LIBS sflb_controlplane_lib sflb_fake_upstream_lib)
