#!/usr/bin/env bash
# Installs dependencies, then builds and runs the whole sflb test suite in each build flavour:
#
#   release  Release build                                     (build-test-release/)
#   asan     RelWithDebInfo + AddressSanitizer + UBSan          (build-test-asan/)
#   tsan     RelWithDebInfo + ThreadSanitizer                   (build-test-tsan/)
#
# Usage: bash tests/run-tests.sh [--flavours "release asan tsan"] [-- CTEST_ARGS...]
#
#   --flavours LIST   flavours to run, in order (default: $SFLB_TEST_FLAVOURS, else all three)
#   -- ARGS           passed to ctest, e.g. -- -R e2e_ or -- -L unit
#
# Environment:
#   SFLB_TEST_FLAVOURS  default flavour list ("release asan tsan")
#   SFLB_BUILD_ROOT     where the build-test-<flavour>/ folders go (default: the repository root)
#   SFLB_BUILD_JOBS     parallel compile jobs (default: nproc)
#   SFLB_SKIP_DEPS=1    do not check system packages
#
# Every flavour is configured with -DSFLB_WERROR=ON. Tests run with `ctest -j2`: end-to-end
# tests start their processes on ephemeral ports, so they can run side by side. The last line
# is "N passed, N failed" over all flavours; the exit status is non-zero if anything failed
# (a flavour that does not build counts as one failure).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
flavours="${SFLB_TEST_FLAVOURS:-release asan tsan}"
ctest_extra=()
while (($#)); do
  case "$1" in
    --flavours) [[ $# -ge 2 ]] || { echo "run-tests: --flavours needs a value" >&2; exit 2; }
                flavours="$2"; shift 2 ;;
    --flavours=*) flavours="${1#*=}"; shift ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; ctest_extra=("$@"); break ;;
    *) echo "run-tests: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
build_root="${SFLB_BUILD_ROOT:-$root}"
jobs="${SFLB_BUILD_JOBS:-$(nproc)}"

for flavour in $flavours; do
  case "$flavour" in
    release|asan|tsan) ;;
    *) echo "run-tests: unknown flavour '$flavour' (known: release asan tsan)" >&2; exit 2 ;;
  esac
done

bash "$root/deploy/install-deps.sh"

# The leak checker runs with suppressions for third-party globals only (see the file).
lsan_supp="$root/tests/lsan.supp"

total_passed=0
total_failed=0
summary=()
overall_start=$SECONDS

fmt_time() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

for flavour in $flavours; do
  dir="$build_root/build-test-$flavour"
  cmake_args=(-G Ninja -DSFLB_WERROR=ON -DSFLB_BUILD_TESTS=ON)
  test_env=()
  case "$flavour" in
    release)
      cmake_args+=(-DCMAKE_BUILD_TYPE=Release -DSFLB_SANITIZE=) ;;
    asan)
      cmake_args+=(-DCMAKE_BUILD_TYPE=RelWithDebInfo -DSFLB_SANITIZE=address)
      test_env=("ASAN_OPTIONS=detect_leaks=1:abort_on_error=1"
                "UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1")
      if [[ -f "$lsan_supp" ]]; then
        test_env+=("LSAN_OPTIONS=suppressions=$lsan_supp:print_suppressions=0")
      fi ;;
    tsan)
      cmake_args+=(-DCMAKE_BUILD_TYPE=RelWithDebInfo -DSFLB_SANITIZE=thread)
      test_env=("TSAN_OPTIONS=ignore_noninstrumented_modules=1 halt_on_error=1 second_deadlock_stack=1 suppressions=$root/tests/tsan.supp") ;;
  esac
  # A cache made by another generator cannot be switched to Ninja in place.
  if [[ -f "$dir/CMakeCache.txt" ]] && ! grep -q '^CMAKE_GENERATOR:INTERNAL=Ninja$' "$dir/CMakeCache.txt"; then
    echo "run-tests: $dir was configured with another generator; remove it or pick SFLB_BUILD_ROOT" >&2
    exit 2
  fi

  echo
  echo "=== [$flavour] configure + build in $dir ==="
  build_start=$SECONDS
  build_ok=1
  cmake -S "$root" -B "$dir" "${cmake_args[@]}" || build_ok=0
  if ((build_ok)); then
    cmake --build "$dir" -j "$jobs" || build_ok=0
  fi
  build_time=$((SECONDS - build_start))
  if ((!build_ok)); then
    echo "=== [$flavour] BUILD FAILED after $(fmt_time $build_time) (see the compiler output above) ==="
    total_failed=$((total_failed + 1))
    summary+=("$(printf '%-8s build FAILED after %s; tests not run' "$flavour" "$(fmt_time $build_time)")")
    continue
  fi

  echo
  echo "=== [$flavour] ctest ${test_env[*]:+(${test_env[*]})} ==="
  test_start=$SECONDS
  log="$dir/ctest-output.log"
  set +e
  (cd "$dir" && env "${test_env[@]}" \
     ctest --output-on-failure --timeout 600 -j2 "${ctest_extra[@]}") 2>&1 | tee "$log"
  ctest_rc=${PIPESTATUS[0]}
  set -e
  test_time=$((SECONDS - test_start))

  # ctest's summary: "97% tests passed, 1 tests failed out of 42".
  line=$(grep -E '[0-9]+% tests passed, [0-9]+ tests? failed out of [0-9]+' "$log" | tail -n 1 || true)
  if [[ -n "$line" ]]; then
    failed=$(sed -E 's/.* ([0-9]+) tests? failed out of ([0-9]+).*/\1/' <<<"$line")
    ran=$(sed -E 's/.* failed out of ([0-9]+).*/\1/' <<<"$line")
    passed=$((ran - failed))
  else
    passed=0
    failed=0
    grep -q 'No tests were found' "$log" && echo "run-tests: [$flavour] ctest found no tests"
  fi
  # ctest failing without failed tests (no tests, crash of ctest itself) is still a failure.
  if ((ctest_rc != 0 && failed == 0)); then failed=1; fi
  total_passed=$((total_passed + passed))
  total_failed=$((total_failed + failed))
  summary+=("$(printf '%-8s build %s  tests %s  %d passed, %d failed' "$flavour" \
    "$(fmt_time $build_time)" "$(fmt_time $test_time)" "$passed" "$failed")")
done

echo
echo "=== summary ($(fmt_time $((SECONDS - overall_start))) in total) ==="
for s in "${summary[@]}"; do echo "  $s"; done
echo "$total_passed passed, $total_failed failed"
((total_failed == 0))
