// Bandwidth references: the floors a BatchNorm kernel is measured against (same bytes, same
// buffers, same OpenMP threads). See bandwidth_reference.cpp for why plain loops.
#pragma once

#include <cstdint>

namespace bench {

// y = x: reads one tensor, writes one (2 passes: the floor for any forward kernel).
void copy_reference(const float *x, float *y, int64_t n);
// dx = x + dy: reads two tensors, writes one (3 passes: the floor for any backward kernel, and
// for the forward with a residual, y = act(bn(x) + z)).
void read2_write1_reference(const float *x, const float *dy, float *dx, int64_t n);
// dx = x + dy, dz = dy + z in one loop: reads three tensors, writes two (5 passes: the floor for
// the backward with a residual, which reads x, dy, z and writes dx, dz).
void read3_write2_reference(const float *x, const float *dy, const float *z, float *dx, float *dz,
                            int64_t n);

// The plain-loop form of the cache-blocked forward training (contiguous (N, C, S) only): per
// channel, one pass summing x and x*x over its slice, then y = (x - mean) * invstd over the same
// slice, re-read from L2 while it is still there. Not a bound but a yardstick: what the 2-pass
// structure reaches on this machine in a plain OpenMP loop (channels split statically over the
// threads), beside the copy's 2-pass bound. Numerically naive (sum of squares); timing only.
void blocked_forward_loop(const float *x, float *y, int64_t n, int64_t c, int64_t s);

// Writes back and evicts [p, p + n) from every cache level (clflushopt, both threads).
void flush_from_cache(const float *p, int64_t n);

// The L2 of one core, from sysfs (1 MiB if unknown).
int64_t l2_bytes_per_core();
// Is a problem whose minimum passes move `bytes` timed warm (as after the layer that produced
// it) rather than cold (flushed, from DRAM)? Warm where it fits in the L2 of `threads` cores
// together: in use, such a tensor is still in cache. The benchmark times by this, and the tuner
// ranks by the same, so that it does not choose for such a problem a kernel that is fast only
// from DRAM (streaming stores, which evict the output).
bool timed_warm(int64_t bytes, int threads);

}  // namespace bench
