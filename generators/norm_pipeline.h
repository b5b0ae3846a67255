// What a BatchNorm generator hands to its schedule: the Funcs of one pipeline, named by role.
// Every op family has the same shape: an optional per-channel reduction over (s, n), per-channel
// coefficients derived from it, one elementwise output over the tensor, and per-channel outputs.
#pragma once

#include "Halide.h"

#include <string>
#include <vector>

namespace normgen {

enum class Layout { Contiguous, ChannelsLast };
enum class Mode { Training, Inference };

// Storage order of the canonical (N, C, S) view, innermost first, as the runtime builds buffers:
//   contiguous:    (s, c, n)  strides (1, S, C*S)
//   channels-last: (c, m, 1)  with m = n*S + s folded by the runtime, strides (1, C, C*N*S)
// Both are 3-D so that one algorithm serves both; in channels-last the kernel sees N = 1.
//
// Flat rows (contiguous, S fixed at generation; knob flat_block_rows): the runtime passes each
// tensor as (C*S, 1, N), its rows whole, and element (s, c, n) is at (c*S + s, 0, n). The tensor
// outputs are then Funcs of (flat, c, n), c of extent 1, so that a schedule can vectorize along
// a row across channels: their values are written in (s, c, n) and flattened (flat_output).
struct CanonicalView {
    explicit CanonicalView(Layout l) : layout(l) {}
    Layout layout;
    int flat_spatial = 0;  // S, with flat rows; else 0
    Halide::Var s{"s"}, c{"c"}, n{"n"}, flat{"flat"};

    bool flat_rows() const { return flat_spatial > 0; }
    // Loads element (s, c, n) of a tensor stored in this layout.
    template <typename T>
    Halide::Expr at(const T &tensor, Halide::Expr s_, Halide::Expr c_, Halide::Expr n_) const {
        if (flat_rows()) return tensor(c_ * flat_spatial + s_, 0, n_);
        return layout == Layout::Contiguous ? tensor(s_, c_, n_) : tensor(c_, s_, n_);
    }
    // The pure arguments of an elementwise Func in storage order (s, c, n).
    std::vector<Halide::Var> storage_args() const {
        return layout == Layout::Contiguous ? std::vector<Halide::Var>{s, c, n}
                                            : std::vector<Halide::Var>{c, s, n};
    }
    // Those of a tensor output: storage_args(), or with flat rows (flat, c, n).
    std::vector<Halide::Var> output_args() const {
        return flat_rows() ? std::vector<Halide::Var>{flat, c, n} : storage_args();
    }
    // A tensor output's value written in (s, c, n), over output_args(): with flat rows, s and c
    // become flat % S and flat / S (loads at c*S + s then simplify back to flat).
    Halide::Expr flat_output(const Halide::Expr &value) const {
        if (!flat_rows()) return value;
        return Halide::Internal::substitute(
            {{s.name(), flat % flat_spatial}, {c.name(), flat / flat_spatial}}, value);
    }
    // Extents of the canonical dimensions of a tensor passed in this layout.
    template <typename T>
    Halide::Expr spatial_extent(const T &tensor) const {
        if (flat_rows()) return flat_spatial;
        return tensor.dim(layout == Layout::Contiguous ? 0 : 1).extent();
    }
    template <typename T>
    Halide::Expr channel_extent(const T &tensor) const {
        if (flat_rows()) return tensor.dim(0).extent() / flat_spatial;
        return tensor.dim(layout == Layout::Contiguous ? 1 : 0).extent();
    }
    static constexpr int batch_dim = 2;
};

struct NormPipeline {
    explicit NormPipeline(Layout layout) : view(layout) {}
    CanonicalView view;
    Halide::Expr channels;                  // C, the extent of the channel dimension
    Halide::RDom r;                         // (s, n) of one channel; undefined without reduction
    // > 0: r is (lane, vector, n) with s = vector * sum_lanes + lane over the whole vectors of
    // each row, and sums has a second update adding the rows' last S % sum_lanes elements (see
    // define_channel_sums).
    int sum_lanes = 0;
    std::vector<Halide::Func> channel_pre;  // per-channel Funcs the reduction reads (e.g. a shift)
    Halide::Func sums;                      // per-channel Tuple reduction over r (may be undefined)
    // With float32 row blocks (knob float32_stat_rows): float32 sums over a block of rows at
    // (s, c, block), or (flat, block) with flat rows, which sums adds up in float64 over
    // r = (s, block). Else undefined.
    Halide::Func row_blocks;
    Halide::Func coeffs;                    // per-channel Tuple of what the elementwise stage needs
    // (s, c), or (flat) with flat rows: the channel terms out reads at (s, c), the same at every
    // s (see BatchNormGenerator::per_element). Inlined unless the schedule keeps a copy for a block of
    // channels, to vectorize across channels (knob flat_block_rows). May be undefined.
    Halide::Func element_terms;
    Halide::Func out;                       // the tensor output (y or dx), in storage order
    // The tensors the statistics read (x; x and dy): what the loop writing one block of channels
    // prefetches of the next block (knob prefetch_next_block).
    std::vector<Halide::OutputImageParam> statistics_inputs;
    std::vector<Halide::Func> tensor_outputs;   // further tensor outputs computed beside out (dz)
    std::vector<Halide::Func> channel_outputs;  // per-channel outputs (statistics, gradients)
};

}  // namespace normgen
