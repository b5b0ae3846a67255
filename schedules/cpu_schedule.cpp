#include "cpu_schedule.h"

#include <stdexcept>
#include <string>

namespace normgen {

using namespace Halide;

namespace {

std::vector<Func> elementwise_outputs(const NormPipeline &p) {
    std::vector<Func> all = {p.out};
    all.insert(all.end(), p.tensor_outputs.begin(), p.tensor_outputs.end());
    return all;
}

// Contiguous (s, c, n): a channel's data is N runs of S contiguous elements. A parallel task
// takes a block of channels; the statistics reduction keeps `lanes` partial sums (rfactor over
// the vector lanes of s) so the inner loop is a plain vector accumulate.
//
// A task visits its block channel by channel (each channel's N runs, then the next channel's),
// or with batch_outer row by row: at each n, the block's channels_per_task * S contiguous
// elements, so that a task reads and writes a few long runs instead of N short ones per
// channel (small S: the hardware prefetcher follows them). Then the block's statistics are
// computed over the whole block before its output, and inference takes blocks of one row
// (n, block) as its parallel tasks. With flat rows (knob flat_block_rows: the tensors are
// (C*S, 1, N), see CanonicalView) a block's row is one run of vectors across its channels,
// which read the channel terms from the task's copy of them per element (p.element_terms):
// no vector ends at a channel's end; then inference tasks are blocks over every n too.
void schedule_contiguous(NormPipeline &p, const CpuKnobs &k, int lanes) {
    const Var &s = p.view.s, &c = p.view.c, &n = p.view.n;
    Var c_block("c_block"), task("task");
    const bool statistics = p.sums.defined();
    const bool batch_outer = k.batch_outer;
    const bool flat = p.view.flat_rows();
    // Channels are parallel tasks, alone or in blocks (small slices: fewer, longer tasks).
    auto split_channels = [&](Func f) {
        if (k.channels_per_task > 1 || batch_outer)
            f.split(c, c_block, c, k.channels_per_task, TailStrategy::GuardWithIf);
    };
    // With batch_outer, blocks_per_task consecutive blocks make one parallel task (so that a
    // task's next block is its own, for prefetch_next_block).
    auto parallel_blocks = [&](Func f) {
        if (batch_outer && k.blocks_per_task > 1) {
            f.split(c_block, task, c_block, k.blocks_per_task, TailStrategy::GuardWithIf)
                .parallel(task);
        } else {
            f.parallel(c_block);
        }
    };
    auto parallel_channels = [&](Func f) {
        split_channels(f);
        if (batch_outer)
            parallel_blocks(f);
        else
            f.parallel(k.channels_per_task > 1 ? c_block : c);
    };
    // With flat rows, the loop writing a block's row (over its vectors, `at`) prefetches the
    // same elements of the next block's statistics inputs, one block's run further along the
    // row (see CpuKnobs::prefetch_next_block). The offset is in iterations of `at`: Halide 14
    // ignores an offset given on an outer loop (c_block) when, as here, the index reaches the
    // inner loop through lets. NonFaulting: the last block's prefetches past the tensor's end
    // are harmless (a prefetch never faults).
    auto prefetch_next_block = [&](Func f, const Var &at) {
        if (!(statistics && k.prefetch_next_block)) return;
        const int block_vectors = (k.channels_per_task * p.view.flat_spatial + lanes - 1) / lanes;
        for (const OutputImageParam &in : p.statistics_inputs)
            f.prefetch(in, at, at, block_vectors, PrefetchBoundStrategy::NonFaulting);
    };
    for (Func f : elementwise_outputs(p)) {
        if (flat) {
            // Blocks of channels_per_task channels: runs of that many rows of S elements.
            const Var &flat_index = p.view.flat;
            f.split(flat_index, c_block, flat_index, k.channels_per_task * p.view.flat_spatial,
                    TailStrategy::GuardWithIf);
            // A task is a block (or blocks_per_task of them) over every n, inference too: the
            // task expands the block's channel terms once, not once per row.
            f.reorder(flat_index, c, n, c_block);
            parallel_blocks(f);
            f.vectorize(flat_index, lanes, TailStrategy::GuardWithIf);
            if (f.name() != p.out.name()) f.compute_with(p.out, n);
            if (f.name() == p.out.name()) prefetch_next_block(f, flat_index);
            continue;
        }
        if (!batch_outer) {
            f.reorder(s, n, c);
            parallel_channels(f);
        } else if (statistics) {
            split_channels(f);
            f.reorder(s, c, n, c_block);
            parallel_blocks(f);
        } else {
            split_channels(f);
            f.reorder(s, c, c_block, n).fuse(c_block, n, task).parallel(task);
        }
        f.vectorize(s, lanes, TailStrategy::GuardWithIf);
        // Further outputs (dz) run beside out, row by row, while the row is in L1.
        if (f.name() != p.out.name()) f.compute_with(p.out, batch_outer ? c : n);
    }
    if (flat && p.element_terms.defined()) {
        // Channel by channel (runs of S), so that a run's terms are one channel's, broadcast:
        // vectors along the flat index would gather each lane's channel terms.
        Var channel("channel"), in_channel("in_channel");
        p.element_terms.compute_at(p.out, c_block)
            .split(p.element_terms.args()[0], channel, in_channel, p.view.flat_spatial,
                   TailStrategy::GuardWithIf)
            .vectorize(in_channel, lanes, TailStrategy::GuardWithIf);
    }

    if (!statistics) {
        p.coeffs.compute_root();
        return;
    }
    // Partial sums per vector lane: the algorithm's lane dimension (p.sum_lanes), or a split of
    // s here (its tail guarded inside the loop).
    RVar rxo("rxo"), rxi("rxi"), row = p.r.y;
    Var lane("lane");
    Func partial;
    if (p.sum_lanes) {
        if (p.sum_lanes != lanes)
            throw std::logic_error("sums are split into " + std::to_string(p.sum_lanes) +
                                   " lanes, the schedule vectorizes " + std::to_string(lanes));
        rxo = p.r[1];
        row = p.r[2];
        partial = p.sums.update(0).rfactor(p.r[0], lane);
        p.sums.update(1).unscheduled();  // the rows' tails, serial where sums is computed
    } else {
        partial = p.sums.update()
                      .split(p.r.x, rxo, rxi, lanes, TailStrategy::GuardWithIf)
                      .rfactor(rxi, lane);
    }
    partial.vectorize(lane);
    partial.update().vectorize(lane);
    if (p.row_blocks.defined() && flat) {
        // Column sums across the block's channels, one vector of columns at a time down a
        // block of rows (in registers), for all the task's channels before their sums.
        const RVar row_in_block = p.row_blocks.rvars(0)[0];
        if (k.stats_per_channel) {
            p.row_blocks.compute_at(p.out, c_block);
        } else {
            p.row_blocks.compute_root().parallel(p.row_blocks.args()[1]);
        }
        p.row_blocks.vectorize(p.view.flat, lanes, TailStrategy::GuardWithIf);
        p.row_blocks.update().reorder(row_in_block, p.view.flat);
        p.row_blocks.update().vectorize(p.view.flat, lanes, TailStrategy::GuardWithIf);
    } else if (p.row_blocks.defined()) {
        // One vector of a block's float32 sums at a time, widened into partial right away.
        p.row_blocks.compute_at(partial, rxo).vectorize(s, lanes, TailStrategy::GuardWithIf);
        p.row_blocks.update().vectorize(s, lanes, TailStrategy::GuardWithIf);
    }

    if (k.stats_per_channel) {
        // Everything about a channel (batch_outer: a block) happens in out's iteration of it: the
        // slice is read for the statistics and re-read from L2 by the elementwise loop.
        const Var &at = batch_outer ? c_block : c;
        if (batch_outer) partial.update().reorder(lane, rxo, c, row);  // the block row by row
        for (Func f : p.channel_pre) f.compute_at(p.out, at);
        p.sums.compute_at(p.out, at);
        partial.compute_at(p.out, at);
        p.coeffs.compute_at(p.out, at);
        for (Func f : p.channel_outputs) {
            if (flat) {
                // compute_with needs out's loop names: its blocks split the flat dimension.
                f.rename(c, p.view.flat)
                    .split(p.view.flat, c_block, p.view.flat, k.channels_per_task,
                           TailStrategy::GuardWithIf);
                parallel_blocks(f);
            } else {
                parallel_channels(f);
            }
            f.compute_with(p.out, at);
        }
    } else {
        for (Func f : p.channel_pre) f.compute_root();
        p.sums.compute_root().parallel(c);
        p.sums.update().parallel(c);
        partial.compute_at(p.sums, c);
        p.coeffs.compute_root();
    }
}

// The split factor that cuts `total` items into tasks of `per_task`, or with balanced (knob
// balanced_tasks) into an even number of tasks of equal size (the last short by less than one
// item per task), one task staying one.
Expr task_split(Expr total, Expr per_task, bool balanced) {
    if (!balanced) return per_task;
    Expr tasks = (total + per_task - 1) / per_task;
    tasks = select(tasks > 1, (tasks + 1) / 2 * 2, 1);
    return max(1, (total + tasks - 1) / tasks);
}

// Channels-last (c, m, 1): rows of C contiguous channels. Vectors run along c; parallel tasks
// take blocks of rows, and the reduction is split into per-block partial sums (rfactor over
// row blocks), combined afterwards.
void schedule_channels_last(NormPipeline &p, const CpuKnobs &k, int lanes) {
    const Var &s = p.view.s, &c = p.view.c;
    Var rows("rows"), row("row");
    Expr rows_per_task = max(1, k.task_elements / p.channels);
    const Expr total_rows = p.out.output_buffer().dim(1).extent();
    for (Func f : elementwise_outputs(p)) {
        f.split(s, rows, row, task_split(total_rows, rows_per_task, k.balanced_tasks),
                TailStrategy::GuardWithIf)
            .vectorize(c, lanes, TailStrategy::GuardWithIf)
            .parallel(rows);
        // Further outputs (dz) run beside out, row by row, while the row is in L1 (task by
        // task, a task's rows of x, dy and z outgrew L2 on wide tensors and were read again
        // from DRAM).
        if (f.name() != p.out.name()) f.compute_with(p.out, row);
    }

    if (p.sums.defined()) {
        // With float32 row blocks, sums' reduction runs over blocks of rows, not rows.
        const int block_rows = p.row_blocks.defined() ? k.float32_stat_rows : 1;
        RVar block("block"), in_block("in_block");
        Var u("u");
        Expr blocks_per_task =
            task_split(p.r.x.extent(), max(1, rows_per_task / block_rows), k.balanced_tasks);
        Func partial = p.sums.update()
                           .split(p.r.x, block, in_block, blocks_per_task,
                                  TailStrategy::GuardWithIf)
                           .rfactor(block, u);
        partial.compute_root().vectorize(c, lanes, TailStrategy::GuardWithIf);
        partial.update().reorder(c, in_block, p.r.y, u);
        partial.update().vectorize(c, lanes, TailStrategy::GuardWithIf).parallel(u);
        if (p.row_blocks.defined()) {
            // A block's float32 sums, then widened into partial: one vector of channels at a
            // time down the block's rows (in registers; the block's rows are R streams at a
            // stride of C elements), or with sequential_stat_rows row by row (the sums in L1).
            const RVar row_in_block = p.row_blocks.rvars(0)[0];
            p.row_blocks.compute_at(partial, in_block)
                .vectorize(c, lanes, TailStrategy::GuardWithIf);
            if (k.sequential_stat_rows) {
                p.row_blocks.update().reorder(c, row_in_block);
            } else {
                p.row_blocks.update().reorder(row_in_block, c);
            }
            p.row_blocks.update().vectorize(c, lanes, TailStrategy::GuardWithIf);
        }
        p.sums.compute_root().vectorize(c, lanes, TailStrategy::GuardWithIf);
        p.sums.update().vectorize(c, lanes, TailStrategy::GuardWithIf);
    }
    for (Func f : p.channel_pre) f.compute_root();
    p.coeffs.compute_root().vectorize(c, lanes, TailStrategy::GuardWithIf);
    for (Func f : p.channel_outputs) f.vectorize(c, lanes, TailStrategy::GuardWithIf);
}

// Channels-last with channel_block: a parallel task is a block of channels over every row. It
// sums its channels row by row (vectors along c, the block's sums in L1), then writes their
// output, re-reading the block's slice from L2.
void schedule_channels_last_blocked(NormPipeline &p, const CpuKnobs &k, int lanes) {
    const Var &s = p.view.s, &c = p.view.c, &n = p.view.n;
    Var c_block("c_block");
    auto split_channels = [&](Func f) {
        f.split(c, c_block, c, k.channel_block, TailStrategy::GuardWithIf)
            .parallel(c_block)
            .vectorize(c, lanes, TailStrategy::GuardWithIf);
    };
    for (Func f : elementwise_outputs(p)) {
        split_channels(f);
        f.reorder(c, s, n, c_block);
        if (f.name() != p.out.name()) f.compute_with(p.out, s);
    }
    for (Func f : p.channel_pre) f.compute_at(p.out, c_block);
    p.sums.compute_at(p.out, c_block).vectorize(c, lanes, TailStrategy::GuardWithIf);
    p.sums.update().reorder(c, p.r.x, p.r.y).vectorize(c, lanes, TailStrategy::GuardWithIf);
    if (p.row_blocks.defined()) {
        const RVar row_in_block = p.row_blocks.rvars(0)[0];
        p.row_blocks.compute_at(p.sums, p.r.x).vectorize(c, lanes, TailStrategy::GuardWithIf);
        p.row_blocks.update().reorder(c, row_in_block).vectorize(c, lanes,
                                                                 TailStrategy::GuardWithIf);
    }
    p.coeffs.compute_at(p.out, c_block).vectorize(c, lanes, TailStrategy::GuardWithIf);
    for (Func f : p.channel_outputs) {
        split_channels(f);
        f.compute_with(p.out, c_block);
    }
}

}  // namespace

void schedule_cpu(NormPipeline &p, const CpuKnobs &knobs, const Target &target) {
    const int lanes = target.natural_vector_size<float>() * knobs.vectors;
    if (p.view.layout == Layout::Contiguous) {
        schedule_contiguous(p, knobs, lanes);
    } else if (knobs.channel_block > 0 && p.sums.defined()) {
        schedule_channels_last_blocked(p, knobs, lanes);
    } else {
        schedule_channels_last(p, knobs, lanes);
    }
}

}  // namespace normgen
