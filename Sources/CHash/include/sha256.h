#ifndef ADAPTER_SHA256_H
#define ADAPTER_SHA256_H

#include <stddef.h>
#include <stdint.h>

/// SHA-256 (FIPS 180-4), streaming. The block function uses the x86 SHA extensions where the CPU
/// has them (chosen at run time) and portable C otherwise; both give the same digest.
typedef struct {
    uint32_t state[8];
    uint64_t length;      /* bytes hashed so far */
    uint8_t buffer[64];   /* a partial block */
    size_t used;          /* bytes in buffer */
    int accelerated;      /* 1: SHA extensions, 0: portable */
} adapter_sha256;

/// Starts a digest; `accelerated` < 0 picks the fastest block function, 0 forces portable C,
/// 1 the SHA extensions (only when adapter_sha256_has_extensions()).
void adapter_sha256_init(adapter_sha256 *h, int accelerated);
void adapter_sha256_update(adapter_sha256 *h, const void *data, size_t count);
/// Writes the 32-byte digest; `h` must be initialised again before further use.
void adapter_sha256_final(adapter_sha256 *h, uint8_t digest[32]);
/// 1 when this CPU has the SHA extensions (and SSE4.1), 0 otherwise.
int adapter_sha256_has_extensions(void);

#endif
