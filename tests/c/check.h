/* Error checks shared by the C test programs (smoke.c, kinds.c): each failure is printed and
 * counted in `failures`, which the program turns into its exit status. */
#ifndef RANKFUSE_TEST_CHECK_H
#define RANKFUSE_TEST_CHECK_H
#include "rankfuse.h"
#include <stdio.h>
#include <string.h>

static int failures = 0;

/* 1 on success; otherwise prints the error, frees it, counts a failure and returns 0. */
static int check(rf_error *e, const char *what) {
  if (e) {
    fprintf(stderr, "%s: error %d: %s\n", what, (int)rf_error_code(e), rf_error_message(e));
    rf_error_free(e);
    failures++;
    return 0;
  }
  return 1;
}

/* Expects an error with `status` whose message contains `needle`. */
static void expect_error(rf_error *e, rf_status status, const char *needle, const char *what) {
  if (!e || rf_error_code(e) != status || !strstr(rf_error_message(e), needle)) {
    fprintf(stderr, "%s: expected status %d mentioning '%s', got %d '%s'\n", what, (int)status, needle,
            e ? (int)rf_error_code(e) : 0, e ? rf_error_message(e) : "(success)");
    failures++;
  }
  rf_error_free(e);
}
#endif
