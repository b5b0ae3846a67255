// The CUDA schedule shared by every op family: a two-stage statistics reduction (coalesced
// partial sums, then a per-channel combine) and flat, coalesced elementwise kernels.
#pragma once

#include "cuda_knobs.h"
#include "../generators/norm_pipeline.h"

namespace normgen {

// On a target without CUDA the same schedule is emulated (blocks become parallel loops, threads
// serial ones), so the CPU tests can check its reductions.
void schedule_cuda(NormPipeline &p, const CudaKnobs &knobs, const Halide::Target &target);

// A per-channel output (C values): one thread per channel.
void schedule_cuda_channel_vector(Halide::Func f, const Halide::Target &target);

}  // namespace normgen
