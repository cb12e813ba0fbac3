// Reading a memory-mapped file that another process truncates raises SIGBUS on the first touch of
// a page past the new end. Swift cannot recover from a signal, so every read of mapped input goes
// through this copy: a SIGBUS inside it jumps back here and the copy reports failure.
//
// The handler is installed once, with SA_NODEFER so that SIGBUS stays unblocked after the jump
// (sigsetjmp then need not save the signal mask, which would cost a system call per copy). A
// SIGBUS on a thread that is not inside a guarded copy restores the default action and re-raises.
#define _GNU_SOURCE
#include "guarded_read.h"

#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <string.h>

// Under a sanitizer, memcpy is the sanitizer's own function, and a fault inside the sanitizer's
// runtime is fatal whatever handler is installed: copy with a plain loop there instead.
#if defined(__has_feature)
#if __has_feature(thread_sanitizer) || __has_feature(address_sanitizer)
#define ADAPTER_COPY_BY_LOOP 1
#endif
#endif

static __thread sigjmp_buf *active_jump;

static void copy_bytes(void *destination, const void *source, size_t count) {
#ifdef ADAPTER_COPY_BY_LOOP
    const volatile unsigned char *from = source;
    unsigned char *to = destination;
    for (size_t i = 0; i < count; i++) to[i] = from[i];
#else
    memcpy(destination, source, count);
#endif
}
static pthread_once_t install_once = PTHREAD_ONCE_INIT;

static void on_bus_error(int sig, siginfo_t *info, void *context) {
    (void)info;
    (void)context;
    sigjmp_buf *jump = active_jump;
    if (jump) {
        active_jump = NULL;
        siglongjmp(*jump, 1);
    }
    signal(sig, SIG_DFL);
    raise(sig);
}

static void install_handler(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_bus_error;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    sigaction(SIGBUS, &action, NULL);
}

int adapter_guarded_copy(void *destination, const void *source, size_t count) {
    if (count == 0) return 0;
    pthread_once(&install_once, install_handler);
    sigjmp_buf jump;
    if (sigsetjmp(jump, 0) != 0) {
        return -1;
    }
    active_jump = &jump;
    copy_bytes(destination, source, count);
    active_jump = NULL;
    return 0;
}

int adapter_guarded_copy_recovers(void) {
#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
    return 0;
#endif
#endif
    return 1;
}
