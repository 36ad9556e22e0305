# sflbctl's tests: RunCtl() against a real in-process controlplane (AdminService + KeyService).
sflb_add_test(ctl_test SOURCES ${CMAKE_CURRENT_LIST_DIR}/ctl_test.cc LIBS sflb_ctl_lib sflb_controlplane_lib)
