// The CPU schedule shared by every op family and every CPU target (x86 and ARM alike): the
// vector width comes from the Target, everything else from the knobs.
#pragma once

#include "cpu_knobs.h"
#include "../generators/norm_pipeline.h"

namespace normgen {

void schedule_cpu(NormPipeline &p, const CpuKnobs &knobs, const Halide::Target &target);

}  // namespace normgen
