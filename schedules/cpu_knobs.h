// The knobs of the CPU schedule and where their values come from (schedules/tuned/<target>.json,
// or a knobs JSON object given directly, as the tuner does).
#pragma once

#include "tuned_knobs.h"

#include <string>

namespace normgen {

// The largest block of rows CpuKnobs::float32_stat_rows may sum in float32.
constexpr int kMaxFloat32StatRows = 64;

struct CpuKnobs {
    // Vector lanes = the target's natural f32 width * vectors (1: one register per step).
    int vectors = 1;
    // Contiguous layout: true computes a channel's statistics inside the loop that writes that
    // channel, while its slice is still in L2 (2 DRAM passes for forward training instead of 3);
    // false computes all statistics first. Channels-last always computes them first.
    bool stats_per_channel = true;
    // Contiguous layout: channels per parallel task (1: one task per channel).
    int channels_per_task = 1;
    // Contiguous layout: a task visits its block of channels row by row (at each n, the block's
    // channels_per_task * S contiguous elements) instead of channel by channel (N runs of S
    // elements each), and training computes the block's statistics before its output; inference
    // tasks are then (n, block). For small S, where a channel's N short runs at a stride of C*S
    // elements are more streams than the hardware prefetcher follows. prefetch_next_channel
    // does not apply.
    bool batch_outer = false;
    // Contiguous layout with batch_outer: the elementwise loop takes a block's row (its
    // channels_per_task * S contiguous elements) as one run of vectors across channels, each
    // element's channel terms read from a copy the task expands for its block (S elements per
    // channel, in L1), instead of each channel's S elements apart; with float32_stat_rows the
    // statistics' float32 blocks are column sums over the flat index too (then S columns per
    // channel in float64). For small S, where a
    // channel's vectors end in a masked tail every S elements (S = 49: 3 whole vectors and one
    // lane) and no row is 64-byte aligned for streaming stores: a block row of
    // channels_per_task * S elements can be (e.g. 16 * 49 * 4 bytes = 49 lines). Exact shapes
    // only (with S unknown, Halide cannot prove the run's elements contiguous and would
    // gather); ignored elsewhere, and without batch_outer. Inference tasks are then blocks over
    // every n, like training's, so that a task expands its block's channel terms once rather than
    // for every row (forward inference 32x1024x14x14, 32 channels per block: 0.29 -> 0.71 of a
    // copy).
    bool flat_block_rows = false;
    // Contiguous layout with stats_per_channel (training): the loop writing channel c also loads
    // the same elements of channel c+1, so that the next channel's slice streams in from DRAM
    // while this one's results stream out, and its statistics then read L2. (Demand loads, not
    // Halide's prefetch directive: Halide 14 emits prefetchnta, which does not keep the line in
    // L2; measured slower.) On by default: on this machine it gained 0.07-0.14 of a copy on
    // ResNet shapes with slices up to 100 KiB and lost up to 0.1 on 400 KiB+ slices, where the
    // tuned entries turn it off.
    bool prefetch_next_channel = true;
    // Contiguous layout with flat_block_rows, training (forward and backward): the loop writing
    // block b's rows prefetches the same elements of the tensors the statistics read (x; x and
    // dy) in block b + 1, one cache line per vector (Halide's prefetch directive, made to keep
    // the line in L2: see generators/generator_main.cpp). Block b + 1's slice then streams in
    // from DRAM while block b's output streams out, as in a copy, and its statistics read L2,
    // instead of a read-only pass over DRAM followed by a write-only one (tuner, same rounds:
    // backward 32x2048x7x7 0.75 -> 0.99 of the reference, forward 32x256x56x56 0.94 -> 1.03).
    // Block b + 1 should be the same thread's next block: see blocks_per_task. Only where a
    // block's run is whole vectors (Halide 14 drops the prefetch from a loop with a tail);
    // ignored elsewhere.
    bool prefetch_next_block = false;
    // Contiguous layout with batch_outer: consecutive blocks of channels_per_task channels that
    // one parallel task runs in order (1: every block is a task). With prefetch_next_block, a
    // task's blocks after its first find their slice in L2; its first block is read from DRAM.
    int blocks_per_task = 1;
    // Kernels with sums (forward training, backward): each block of this many rows is summed in
    // float32, then joins the channel's float64 sums (a row: contiguous, the S elements of one
    // n; channels-last, the C channels of one (n, s), whose blocks are summed one vector of
    // channels at a time down the block's rows, in registers). 1 widens every term to float64:
    // results within 2 ulps of float64 for any input, the default and what generic kernels keep
    // (the tuner sets it per tuned shape only). More rows widen once per block: the statistics
    // loop needs about half the instructions (+0.1-0.2 of a copy on contiguous ResNet-50 shapes
    // here; channels-last, +0.07-0.12 on C >= 512, where float64 partial sums of every channel
    // went through memory), the sums then carry the float32 rounding of a block's terms
    // (bounded from the data in tests/test_kernels.cpp, a few ulps of the block), and a block
    // whose terms sum beyond float32's range (|terms| ~ 1e37) overflows.
    // The forward's variance terms are taken about each block's first row (not the channel's
    // first element), so that a block far from that element loses no precision.
    int float32_stat_rows = 1;
    // Channels-last with float32_stat_rows > 1: a block's float32 sums are taken row by row,
    // each row's C channels in turn (one sequential stream; the block's 2 C sums stay in L1),
    // instead of one vector of channels at a time down the block's rows (in registers, but
    // float32_stat_rows streams at a stride of C elements, more than the hardware prefetcher
    // follows). Ignored elsewhere.
    bool sequential_stat_rows = false;
    // Channels-last: the rows are cut into an even number of tasks of equal size (and the
    // statistics' row blocks likewise), not into tasks of task_elements and a shorter last
    // one. The runtime hands each thread a fixed share of the tasks (OpenMP static), so an odd
    // count, or a last task of a few rows, leaves a thread idle at the end: forward training
    // 32x512x7x7 (13 tasks, the last of 32 rows) ran at 0.52-0.61 of a copy, 0.62-0.71
    // balanced (normgen-compare, 7 rounds, twice). Not the default: it lost 0.1-0.13 on two
    // backward shapes (32x512x7x7, 32x64x56x56), where the tasks' boundaries moved off whole
    // multiples of task_elements. One task stays one.
    bool balanced_tasks = false;
    // Channels-last, kernels with statistics: 0 cuts the rows into tasks (task_elements) and
    // sums every channel before any output, so that forward training reads a tensor larger
    // than the caches twice from DRAM. > 0: a task is a block of this many channels over every
    // row, which sums its channels and then writes them while the block's slice (rows *
    // channel_block elements: one 64-byte line per row at 16 float32 channels, C * 4 bytes
    // apart) is in L2, as the contiguous layout's stats_per_channel does. Wide blocks read
    // more per row: forward training 32x2048x7x7 ran at 0.51 of a copy as tuned, 0.73, 0.86
    // and 0.73 in blocks of 64, 128 and 256 channels (normgen-compare, same rounds). No gain
    // on 14x14, where a block of 64 channels is already past L2. task_elements and
    // balanced_tasks then do not apply.
    int channel_block = 0;
    // Channels-last: elements per parallel task (rounded to whole rows of C elements), in the
    // reduction and the elementwise loops. Sized in elements, not rows, so that wide and narrow
    // tensors both split into enough tasks for every thread.
    int task_elements = 65536;

    // x86, float32 storage: the tensor outputs (y; dx and dz) are written with non-temporal
    // (streaming) stores, which skip the read-for-ownership of each output line and the caches:
    // a cold channels-last inference ran at 1.29-1.49x a plain copy's speed with them on this
    // machine (AMD Zen 5), against 0.90-1.02 without. Halide 14 cannot emit them, so the
    // generator program marks the outputs' vector stores non-temporal in the LLVM IR and
    // assembles it again (generators/generator_main.cpp). Only stores Halide proves 64-byte
    // aligned are marked, so such a kernel requires what makes them aligned (asserted on entry):
    // each output's host pointer and the row length (S contiguous, C channels-last) in
    // multiples of 64 bytes. It takes the marker argument `streaming_output`, by which the
    // runtime knows to pass it over for other rows and to run its next-best kernel on a
    // misaligned pointer. Output the next layer reads at once from cache is better written
    // normally: the tuner's call per shape. Generic entries keep it off (the generic kernel is
    // every streaming kernel's fallback).
    bool streaming_stores = false;

    std::string to_string() const;
    nlohmann::json to_json() const;  // every field, in the form parse_cpu_knobs reads
    bool operator==(const CpuKnobs &o) const;
};

// The one knob parser: a JSON object of knob values (any subset; the rest keep their defaults).
// Throws std::runtime_error naming `where` and the field on an unknown knob or a bad value.
CpuKnobs parse_cpu_knobs(const nlohmann::json &j, const std::string &where);

// Reads the knobs for key from a tuned JSON file: the entry for key.shape if present; for an
// exact shape, else the entry of the class holding it; else the family's generic entry, else
// the defaults above. An empty path means the defaults. Throws std::runtime_error naming the
// file and field on a malformed file or an invalid knob value.
CpuKnobs load_cpu_knobs(const std::string &tuned_json_path, const KnobsKey &key,
                        std::string *chosen_entry = nullptr);

}  // namespace normgen
