#ifndef ADAPTER_GUARDED_READ_H
#define ADAPTER_GUARDED_READ_H

#include <stddef.h>

/// Copies `count` bytes from `source` (memory-mapped file data) to `destination`. Returns 0, or -1
/// when reading the source raised SIGBUS: the mapped file shrank under the reader (another
/// process truncated or rewrote it). The process is not killed; a SIGBUS outside a guarded copy
/// still terminates it as before.
int adapter_guarded_copy(void *destination, const void *source, size_t count);

/// 1 when a fault inside `adapter_guarded_copy` is recovered; 0 in a ThreadSanitizer build, whose
/// runtime makes SIGBUS fatal whatever handler is installed (test builds only).
int adapter_guarded_copy_recovers(void);

#endif
