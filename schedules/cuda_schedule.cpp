#include "cuda_schedule.h"

namespace normgen {

using namespace Halide;

namespace {

// Maps the schedule's block and thread loops to the GPU, or (emulated, on a CPU target) to
// parallel and serial loops with the very same splits, reorders and rfactors: the reduction
// structure and its tail guards then run, and are tested, on the CPU.
struct GpuLoops {
    bool emulated;

    template <typename StageOrFunc>
    void blocks(StageOrFunc f, const std::vector<VarOrRVar> &v) const {
        if (emulated) {
            f.parallel(v.back());  // the outermost block loop
        } else if (v.size() == 1) {
            f.gpu_blocks(v[0]);
        } else {
            f.gpu_blocks(v[0], v[1]);
        }
    }
    template <typename StageOrFunc>
    void threads(StageOrFunc f, const std::vector<VarOrRVar> &v) const {
        if (emulated) return;  // serial loops inside the block
        if (v.size() == 1) {
            f.gpu_threads(v[0]);
        } else {
            f.gpu_threads(v[0], v[1]);
        }
    }
    // One thread per channel, 32 per block.
    template <typename StageOrFunc>
    void tile_channels(StageOrFunc f, const Var &c) const {
        Var block("c_block"), thread("c_thread");
        f.split(c, block, thread, 32, TailStrategy::GuardWithIf);
        blocks(f, {block});
        threads(f, {thread});
    }
};

// Per-channel Funcs (a handful of values each).
void schedule_per_channel(Func f, const GpuLoops &gpu) {
    const Var c = f.args()[0];
    f.compute_root();
    gpu.tile_channels(f, c);
    for (int u = 0; u < f.num_update_definitions(); u++) gpu.tile_channels(f.update(u), c);
}

// Tensor outputs: the tensor flattened in storage order, one element per thread, so that
// consecutive threads touch consecutive addresses in either layout and any extents.
void schedule_elementwise(Func f, const CanonicalView &view, const CudaKnobs &k,
                          const GpuLoops &gpu) {
    std::vector<Var> args = view.storage_args();
    Var inner_mid("inner_mid"), flat("flat"), block("block"), thread("thread");
    f.fuse(args[0], args[1], inner_mid)
        .fuse(inner_mid, args[2], flat)
        .split(flat, block, thread, k.threads, TailStrategy::GuardWithIf);
    gpu.blocks(f, {block});
    gpu.threads(f, {thread});
}

// Contiguous (s, c, n): stage 1 gives thread t of block (n, c) the elements s = t, t + T, ...
// of row (n, c) (coalesced); stage 2 folds the batch per (t, c); stage 3 folds the T lanes.
void schedule_contiguous_stats(NormPipeline &p, const CudaKnobs &k, const GpuLoops &gpu) {
    const Var &c = p.view.c;
    RVar rxo("rxo"), rxi("rxi");
    Var lane("lane"), batch("batch");
    p.sums.update().split(p.r.x, rxo, rxi, k.stats_threads, TailStrategy::GuardWithIf);
    // rfactor appends the new pure dimensions after c: put the thread dimension innermost.
    if (k.stats_split_batch) {
        Func rows = p.sums.update().rfactor({{rxi, lane}, {p.r.y, batch}});
        rows.compute_root().reorder(lane, batch, c);
        rows.update().reorder(lane, batch, c);
        for (Stage s : {Stage(rows), rows.update()}) {
            gpu.blocks(s, {batch, c});
            gpu.threads(s, {lane});
        }
    }
    Func lanes = p.sums.update().rfactor(rxi, lane);
    lanes.compute_root().reorder(lane, c);
    lanes.update().reorder(lane, c);
    for (Stage s : {Stage(lanes), lanes.update()}) {
        gpu.blocks(s, {c});
        gpu.threads(s, {lane});
    }
    schedule_per_channel(p.sums, gpu);
}

// Channels-last (c, m, 1): stage 1 gives a block a tile of channels x row blocks, each thread
// summing stats_rows rows of one channel (a warp reads 32 consecutive channels of a row);
// stage 2 folds the row blocks per channel.
void schedule_channels_last_stats(NormPipeline &p, const CudaKnobs &k, const GpuLoops &gpu) {
    const Var &c = p.view.c;
    RVar row_block("row_block"), row("row");
    Var u("u"), c_block("c_block"), c_thread("c_thread"), u_block("u_block"), u_thread("u_thread");
    Func blocks = p.sums.update()
                      .split(p.r.x, row_block, row, k.stats_rows, TailStrategy::GuardWithIf)
                      .rfactor(row_block, u);
    const int u_threads = k.stats_threads / 32;
    blocks.compute_root();
    for (Stage s : {Stage(blocks), blocks.update()}) {
        s.split(c, c_block, c_thread, 32, TailStrategy::GuardWithIf)
            .split(u, u_block, u_thread, u_threads, TailStrategy::GuardWithIf)
            .reorder(c_thread, u_thread, c_block, u_block);
        gpu.blocks(s, {c_block, u_block});
        gpu.threads(s, {c_thread, u_thread});
    }
    schedule_per_channel(p.sums, gpu);
}

}  // namespace

void schedule_cuda_channel_vector(Func f, const Target &target) {
    schedule_per_channel(f, GpuLoops{!target.has_gpu_feature()});
}

void schedule_cuda(NormPipeline &p, const CudaKnobs &knobs, const Target &target) {
    const GpuLoops gpu{!target.has_gpu_feature()};
    for (Func f : p.channel_pre) schedule_per_channel(f, gpu);
    if (p.sums.defined()) {
        if (p.view.layout == Layout::Contiguous)
            schedule_contiguous_stats(p, knobs, gpu);
        else
            schedule_channels_last_stats(p, knobs, gpu);
    }
    schedule_per_channel(p.coeffs, gpu);
    for (Func f : p.channel_outputs) schedule_per_channel(f, gpu);
    // dz is its own kernel beside dx (GPU loops cannot share a loop nest with compute_with).
    schedule_elementwise(p.out, p.view, knobs, gpu);
    for (Func f : p.tensor_outputs) schedule_elementwise(f, p.view, knobs, gpu);
}

}  // namespace normgen
