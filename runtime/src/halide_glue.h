// The process's one Halide runtime (linked into libnormgen) and the hooks normgen installs in
// it: errors become messages instead of abort(), parallel loops run on OpenMP or the host's pool.
#pragma once

#include "normgen/normgen.h"

#include <string>

namespace ng {

// Installs the hooks once per process (idempotent, thread-safe).
void install_halide_hooks();
// The last message Halide reported on this thread, consumed by the call.
std::string take_halide_error();

}  // namespace ng
