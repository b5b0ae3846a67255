// GeneratorParams and steps shared by the BatchNorm generators: layout and shape constraints on
// the buffers, and handing the finished algorithm to the schedule for the target.
#pragma once

#include "norm_pipeline.h"
#include "../schedules/cpu_knobs.h"
#include "../schedules/cuda_knobs.h"

#include <functional>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

namespace normgen {

inline const std::map<std::string, Layout> kLayoutNames = {{"contig", Layout::Contiguous},
                                                           {"cl", Layout::ChannelsLast}};

// Storage type of the tensors (x, z, y, dy, dx, dz). Weight, bias and statistics stay float32,
// and all arithmetic is float32 with float64 sums (PyTorch's mixed-precision convention).
enum class StorageType { F32, F16, BF16 };
inline const std::map<std::string, StorageType> kStorageTypeNames = {
    {"f32", StorageType::F32}, {"f16", StorageType::F16}, {"bf16", StorageType::BF16}};
enum class Activation { None, Relu };
inline const std::map<std::string, Activation> kActivationNames = {{"none", Activation::None},
                                                                   {"relu", Activation::Relu}};

inline Halide::Type halide_type(StorageType t) {
    switch (t) {
    case StorageType::F16: return Halide::Float(16);
    case StorageType::BF16: return Halide::BFloat(16);
    default: return Halide::Float(32);
    }
}

// A shape the kernel is specialised for, in PyTorch's canonical view (N, C, S); 0 = any.
struct FixedShape {
    int n = 0, c = 0, s = 0;
    bool generic() const { return n == 0; }
};

// "generic" or "n32_c64_s3136"; a shape class key (class_c64to256_s1024to16384) is generic too:
// class kernels take any shape, only their knobs differ. Throws std::invalid_argument on
// anything else.
FixedShape parse_fixed_shape(const std::string &text);

// Constrains a 3-D tensor buffer to the storage the runtime passes: mins 0, innermost stride 1,
// and (for an exact shape) every extent and stride. In channels-last the runtime folds N into
// the row dimension, so the kernel sees (C, N*S, 1); with flat rows, (C*S, 1, N).
void constrain_tensor(Halide::OutputImageParam buffer, Layout layout, const FixedShape &shape,
                      bool flat_rows = false);
// Constrains a per-channel vector (weight, statistics...) to min 0 and, if known, extent C.
void constrain_channel_vector(Halide::OutputImageParam buffer, const FixedShape &shape);

// The knobs one kernel is scheduled with: those given as a JSON object (knobs_json, the tuner's
// way), or else those tuned for key (family / dtype / layout / shape). Resolved before the
// algorithm is built, because one knob (prefetch_next_channel) adds loads to it.
// emulate_cuda: the CUDA schedule on a CPU target (see schedule_cuda), for testing it.
struct ScheduleChoice {
    KnobsKey key;
    TunedEntry entry;
    bool cuda = false;
    CpuKnobs cpu;
    CudaKnobs gpu;
};
ScheduleChoice choose_schedule(const Halide::Target &target, const KnobsKey &key,
                               const std::string &tuned_json_path, const std::string &knobs_json,
                               bool emulate_cuda);

// Schedules the pipeline for the target with the chosen knobs (and says so in the build log).
void schedule_for_target(NormPipeline &p, const ScheduleChoice &choice,
                         const Halide::Target &target);

// Streaming stores (knob streaming_stores): a generator asks for its tensor output buffers'
// vector stores (y; dx and dz) to be made non-temporal; the generator program does it after
// Halide has written the object (generators/generator_main.cpp). No names withdraw the request.
void request_streaming_stores(const std::vector<std::string> &output_buffers);
const std::vector<std::string> &streaming_store_buffers();
// Prefetches (knob prefetch_next_block): Halide 14 emits every prefetch with locality 0 (x86
// prefetchnta), whose line may leave the caches before it is read (measured slower than no
// prefetch at all, for prefetch_next_channel); a generator asks for its prefetches to keep the
// line in L2 (locality 2, prefetcht1), which the generator program rewrites in the LLVM IR.
void request_l2_prefetches(bool requested = true);
bool l2_prefetches_requested();
// The row length (in elements) whose multiples keep every row of a streaming output 64-byte
// aligned: what a kernel with streaming stores requires of its output's rows and host pointer.
inline int streaming_row_elements(StorageType t) { return 64 / halide_type(t).bytes(); }

// Schedules per-channel outputs computed on their own (the running-statistics update).
void schedule_channel_update(const std::vector<Halide::Func> &outputs, const Halide::Target &target);

// What every BatchNorm generator shares: the variant's GeneratorParams (layout, storage type,
// fused activation and residual add, exact shape, tuned knobs file); and its last step,
// constraining the buffers and scheduling for the target.
template <typename Derived>
class BatchNormGenerator : public Halide::Generator<Derived> {
public:
    Halide::GeneratorParam<Layout> layout{"layout", Layout::Contiguous, kLayoutNames};
    Halide::GeneratorParam<StorageType> dtype{"dtype", StorageType::F32, kStorageTypeNames};
    Halide::GeneratorParam<Activation> activation{"activation", Activation::None, kActivationNames};
    Halide::GeneratorParam<bool> residual{"residual", false};       // y = act(bn(x) + z)
    Halide::GeneratorParam<std::string> shape{"shape", "generic"};  // or e.g. n32_c64_s3136
    Halide::GeneratorParam<std::string> tuned{"tuned", ""};         // schedules/tuned/<target>.json
    // The CUDA schedule on a CPU target, its GPU loops emulated: tests its reductions here.
    Halide::GeneratorParam<bool> emulate_cuda{"emulate_cuda", false};
    // Knob values as a JSON object ({"vectors":2,...}); when set, `tuned` is not read.
    Halide::GeneratorParam<std::string> knobs{"knobs", ""};

protected:
    using TensorInput = Halide::GeneratorInput<Halide::Buffer<>>;
    using TensorOutput = Halide::GeneratorOutput<Halide::Buffer<>>;
    TensorInput *add_tensor_input(const std::string &name) {
        return this->template add_input<Halide::Buffer<>>(name, halide_type(dtype), 3);
    }
    TensorOutput *add_tensor_output(const std::string &name) {
        return this->template add_output<Halide::Buffer<>>(name, halide_type(dtype), 3);
    }
    // Reads a tensor element as float32 / stores a float32 value in the storage type (round to
    // nearest even). NaN must survive both, as in PyTorch; Halide assumes no NaNs (and its
    // software f16 conversion turns them into infinities) unless an expression is strict_float.
    // On CUDA, bf16 goes through its bits: LLVM 14's NVPTX back end cannot select the bf16
    // arithmetic Halide 14 leaves in the lowered code (it emulates bf16 on CPUs only).
    bool bf16_as_bits() const {
        return dtype == StorageType::BF16 && this->get_target().has_feature(Halide::Target::CUDA);
    }
    Halide::Expr load(Halide::Expr e) const {
        if (bf16_as_bits()) {
            Halide::Expr bits = Halide::cast<uint32_t>(Halide::reinterpret<uint16_t>(e));
            return Halide::reinterpret<float>(bits << 16);
        }
        return Halide::cast<float>(e);
    }
    Halide::Expr store(Halide::Expr e) const {
        const Halide::Type t = halide_type(dtype);
        if (t == Halide::Float(32)) return e;
        if (bf16_as_bits()) {  // round to nearest even; NaN stays a (quiet) NaN
            Halide::Expr bits = Halide::reinterpret<uint32_t>(e);
            auto u32 = [](uint32_t v) { return Halide::Expr(v); };
            Halide::Expr rounded = (bits + u32(0x7fff) + ((bits >> 16) & u32(1))) >> 16;
            Halide::Expr quiet_nan = (bits >> 16) | u32(0x40);
            return Halide::strict_float(Halide::reinterpret(
                t, Halide::cast<uint16_t>(Halide::select(Halide::is_nan(e), quiet_nan, rounded))));
        }
        Halide::Expr rounded = Halide::cast(t, e);
        if (t == Halide::Float(16)) {  // Halide's f16 conversion makes NaN an infinity
            Halide::Expr quiet_nan = Halide::reinterpret(t, Halide::cast<uint16_t>(0x7e00));
            rounded = Halide::select(Halide::is_nan(e), quiet_nan, rounded);
        }
        return Halide::strict_float(rounded);
    }
    // ReLU as torch.relu: max(e, 0), but NaN stays NaN (x86's max would drop it).
    Halide::Expr activate(Halide::Expr e) const {
        if (activation != Activation::Relu) return e;
        return Halide::strict_float(Halide::select(Halide::is_nan(e), e, Halide::max(e, 0.0f)));
    }

    // Resolves the schedule's knobs for `family` (e.g. "bn_fwd_train"); call from configure(),
    // before generate() builds the algorithm. has_statistics: the kernel reduces over each
    // channel's slice, the case prefetch_next_channel serves. masks_loads: the kernel selects
    // between a loaded tensor element and 0 (see select_loaded_or_zero).
    void choose_schedule_for(const std::string &family, bool has_statistics,
                             bool masks_loads = false) {
        const std::string dtype_name = dtype == StorageType::F32   ? "f32"
                                       : dtype == StorageType::F16 ? "f16"
                                                                   : "bf16";
        const std::string layout_name = layout == Layout::Contiguous ? "contig" : "cl";
        choice_ = choose_schedule(this->get_target(), {family, dtype_name, layout_name, shape},
                                  tuned, knobs, emulate_cuda);
        prefetches_next_channel_ = !choice_.cuda && layout == Layout::Contiguous &&
                                   has_statistics && choice_.cpu.stats_per_channel &&
                                   choice_.cpu.prefetch_next_channel && !choice_.cpu.batch_outer;
        // Exact shapes only (see CpuKnobs::flat_block_rows); cleared where it does not apply, so
        // that the schedule and streams_output read the knob as applied.
        if (choice_.cuda || layout != Layout::Contiguous || !choice_.cpu.batch_outer ||
            parse_fixed_shape(shape).generic())
            choice_.cpu.flat_block_rows = false;
        // Whole blocks only: Halide 14 drops the guard of a partial flat block (a block of 16
        // channels after two of 32 wrote a 32-channel run: past its row, into the next row or
        // the buffer's end; likewise a block wider than C). So the block is the largest
        // divisor of C that divides channels_per_task.
        if (choice_.cpu.flat_block_rows)
            choice_.cpu.channels_per_task =
                int(std::gcd(int64_t(choice_.cpu.channels_per_task), parse_fixed_shape(shape).c));
        // Likewise cleared where they do not apply: prefetch_next_block (flat rows, with
        // statistics, and a block's run of whole vectors: Halide 14 drops the prefetch from a
        // vector loop with a tail), blocks_per_task (batch_outer), sequential_stat_rows
        // (channels-last float32 row blocks), balanced_tasks (channels-last), channel_block
        // (channels-last with statistics).
        if (!choice_.cpu.flat_block_rows || !has_statistics ||
            choice_.cpu.channels_per_task * parse_fixed_shape(shape).s % contiguous_sum_lanes())
            choice_.cpu.prefetch_next_block = false;
        if (choice_.cuda || layout != Layout::Contiguous || !choice_.cpu.batch_outer)
            choice_.cpu.blocks_per_task = 1;
        if (choice_.cuda || layout != Layout::ChannelsLast || !has_statistics ||
            choice_.cpu.float32_stat_rows == 1)
            choice_.cpu.sequential_stat_rows = false;
        if (choice_.cuda || layout != Layout::ChannelsLast) choice_.cpu.balanced_tasks = false;
        if (choice_.cuda || layout != Layout::ChannelsLast || !has_statistics)
            choice_.cpu.channel_block = 0;
        if (choice_.cpu.channel_block > 0)  // tasks of channels, not of rows
            choice_.cpu.sequential_stat_rows = choice_.cpu.balanced_tasks = false;
        unmasks_loads_ = masks_loads && !choice_.cuda &&
                         this->get_target().has_feature(Halide::Target::AVX512);
        if (prefetches_next_channel_ || unmasks_loads_)
            opaque_zero_ = this->template add_input<double>("opaque_zero");
        // The argument tells the runtime what the kernel requires (see CpuKnobs); its value is
        // not read.
        if (streams_output()) streaming_output_ = this->template add_input<int>("streaming_output");
        // Likewise: the runtime passes the tensors flat (see CanonicalView).
        if (choice_.cpu.flat_block_rows) flat_rows_ = this->template add_input<int>("flat_rows");
    }

    // The pipeline to build, its view flat when the knob flat_block_rows applies.
    NormPipeline pipeline() const {
        NormPipeline p(layout);
        if (choice_.cpu.flat_block_rows) p.view.flat_spatial = parse_fixed_shape(shape).s;
        return p;
    }

    // Whether the output is written with streaming stores: the knob, on x86, for float32
    // storage, and for an exact shape only if its rows keep them aligned (else the knob is
    // ignored). 16-bit outputs are left out: LLVM 14 folds their narrowing into a truncating
    // store (AVX-512's vpmovdw), which has no non-temporal form, and drops the mark.
    bool streams_output() const {
        if (choice_.cuda || !choice_.cpu.streaming_stores || dtype != StorageType::F32 ||
            this->get_target().arch != Halide::Target::X86)
            return false;
        const FixedShape fixed = parse_fixed_shape(shape);
        // The run written between row strides: a channel's S elements, a block's with
        // flat_block_rows, or the C channels of one (n, s) in channels-last.
        const int row_elements = streaming_row_elements(dtype);
        if (choice_.cpu.flat_block_rows)  // a block's run and the whole row (C*S) of one n
            return fixed.s * choice_.cpu.channels_per_task % row_elements == 0 &&
                   fixed.c * fixed.s % row_elements == 0;
        const int row = layout == Layout::ChannelsLast ? fixed.c : fixed.s;
        return fixed.generic() || row % row_elements == 0;
    }

    // With prefetch_next_channel: `value` (float32, at (s, c, n) of a contiguous tensor) made to
    // depend on the elements at (s, c + 1, n) of `tensors`, so that the loop computing it loads
    // them: the next channel's slice streams in while this one's results stream out, and its
    // statistics then read L2. The value is unchanged: the loaded bits are ANDed with
    // opaque_zero, an input the runtime sets to 0 that the compiler cannot fold away.
    // Without the knob: `value` as it is.
    Halide::Expr with_next_channel_loads(Halide::Expr value, const CanonicalView &view,
                                         const std::vector<TensorInput *> &tensors) const {
        if (!prefetches_next_channel_) return value;
        using namespace Halide;
        const Var &s = view.s, &c = view.c, &n = view.n;
        Expr next_c = min(c + 1, view.channel_extent(*tensors.front()) - 1);
        Expr bits = cast<uint32_t>(0);
        for (TensorInput *t : tensors) {
            Expr e = (*t)(s, next_c, n);
            bits = bits | cast<uint32_t>(reinterpret(UInt(e.type().bits()), e));
        }
        Expr mask = cast<uint32_t>(*opaque_zero_);
        return reinterpret<float>(reinterpret<uint32_t>(value) | (bits & mask));
    }

    // select(keep, loaded, 0) for a loaded element (float32; the ReLU backward's dy). On
    // AVX-512, LLVM folds that select into a masked load, which cannot issue until the mask is
    // computed from other loads: streaming from DRAM, the channels-last ReLU backward's
    // statistics pass ran 2x slower for it on Zen 5. Here the zeroed lanes take
    // loaded & opaque_zero instead (0 at run time, unknown to the compiler): the loaded value
    // has two uses, so the load stays an unconditional one and the select a register blend.
    // The result is the same to the bit (+0.0f where not kept).
    Halide::Expr select_loaded_or_zero(Halide::Expr keep, Halide::Expr loaded) const {
        using namespace Halide;
        if (!unmasks_loads_) return select(keep, loaded, 0.0f);
        Expr zeroed = reinterpret<uint32_t>(loaded) & cast<uint32_t>(*opaque_zero_);
        return select(keep, loaded, reinterpret<float>(zeroed));
    }

    // The terms of channel c (Exprs of c alone) as the elementwise output reads them at (s, c):
    // through p.element_terms, so that the schedule can give a block of channels a copy of them
    // per element (knob flat_block_rows); else inlined, the terms themselves.
    // With flat rows the copy is a Func of the flat index (c*S + s), as the output's run.
    std::vector<Halide::Expr> per_element(NormPipeline &p,
                                          const std::vector<Halide::Expr> &channel_terms) const {
        using namespace Halide;
        const Var &s = p.view.s, &c = p.view.c, &flat = p.view.flat;
        p.element_terms = Func("element_terms");
        std::vector<Expr> args = {s, c};
        if (p.view.flat_rows()) {
            std::vector<Expr> flat_terms;
            for (const Expr &t : channel_terms)
                flat_terms.push_back(
                    Internal::substitute(c.name(), flat / p.view.flat_spatial, t));
            p.element_terms(flat) = Tuple(flat_terms);
            args = {c * p.view.flat_spatial + s};
        } else {
            p.element_terms(s, c) = Tuple(channel_terms);
        }
        std::vector<Expr> at;
        for (size_t i = 0; i < channel_terms.size(); i++)
            at.push_back(channel_terms.size() == 1 ? Expr(p.element_terms(args))
                                                   : Expr(p.element_terms(args)[i]));
        return at;
    }

    // The position of an element's column in the first row of its float32 block: (s, n0) in
    // the contiguous layout (rows: the S elements of one n), (s0, n) in channels-last (rows: the
    // C channels of one s). Undefined when every term is computed in float64.
    struct BlockFirstRow {
        Halide::Expr s, n;
        bool defined() const { return s.defined(); }
    };
    // The per-channel sums over (s, n) of two terms, in float64: p.r and p.sums(c) = Tuple(sum of
    // the first, sum of the second). terms(s, n, type, first) gives the two terms at (s, n)
    // computed in `type`. Plainly (first undefined) every term is computed in float64. With the
    // float32_stat_rows knob (CPU schedules) the terms of each block of that many rows are summed
    // in float32 first (p.row_blocks), and the block sums in float64.
    // A variance's terms (d, d*d), d = v - k_c, would lose precision in float32 wherever a block
    // lies far from k_c (a float32 d*d keeps 24 bits of d's offset, not of its spread). So a
    // variance passes `recentre`: its float32 terms are then taken about v(first), the same
    // column in the block's first row (e = v(s, n) - v(first), terms (e, e*e)), and
    // recentre(first) = v(first) - k_c, in float64, moves each block's sums back to k_c:
    // sum d = sum e + m o, sum d^2 = sum e^2 + 2 o sum e + m o^2 (o the offset, m the block's
    // rows). Other terms (products like g * (x - mean)) are summed as they are.
    using ChannelTerms = std::function<std::pair<Halide::Expr, Halide::Expr>(
        Halide::Expr s, Halide::Expr n, Halide::Type type, const BlockFirstRow &first)>;
    using BlockOffset = std::function<Halide::Expr(const BlockFirstRow &first)>;
    // `tensor` gives the extents of (s, n).
    void define_channel_sums(NormPipeline &p, const TensorInput &tensor, const ChannelTerms &terms,
                             const BlockOffset &recentre = nullptr) const {
        using namespace Halide;
        const Var &c = p.view.c, &s = p.view.s, &n = p.view.n;
        Expr spatial = p.view.spatial_extent(tensor);
        Expr batch = tensor.dim(CanonicalView::batch_dim).extent();
        p.sums = Func("sums");
        p.sums(c) = Tuple(cast<double>(0), cast<double>(0));
        const int rows = float32_stat_rows();
        if (rows == 1 && contiguous_sum_lanes() > 1) {
            // The rows' whole vectors, their lanes a dimension of their own: the schedule's
            // partial sums per lane (rfactor) then need no tail guard in their loop, which
            // would keep LLVM from holding them in registers (measured: the loop ran through
            // memory at ~11 cycles per vector, a third of a copy's speed on Zen 5). Then the
            // rows' last S % lanes elements, one by one.
            const int lanes = contiguous_sum_lanes();
            Expr vectors = spatial / lanes;
            p.r = RDom(0, lanes, 0, vectors, 0, batch, "r");
            p.sum_lanes = lanes;
            auto [first, second] =
                terms(p.r[1] * lanes + p.r[0], p.r[2], Float(64), BlockFirstRow{});
            p.sums(c) = Tuple(p.sums(c)[0] + first, p.sums(c)[1] + second);
            RDom tail(vectors * lanes, spatial - vectors * lanes, 0, batch, "tail");
            auto [tail_first, tail_second] = terms(tail.x, tail.y, Float(64), BlockFirstRow{});
            p.sums(c) = Tuple(p.sums(c)[0] + tail_first, p.sums(c)[1] + tail_second);
            return;
        }
        if (rows == 1) {
            p.r = RDom(0, spatial, 0, batch, "r");
            auto [first, second] = terms(p.r.x, p.r.y, Float(64), BlockFirstRow{});
            p.sums(c) = Tuple(p.sums(c)[0] + first, p.sums(c)[1] + second);
            return;
        }
        // Blocks run along n in the contiguous layout, along s in channels-last; `block` is the
        // block's index in that dimension, and its Var takes that dimension's place.
        const bool along_n = p.view.layout == Layout::Contiguous;
        const Expr row_count = along_n ? batch : spatial;
        RDom j(0, rows, "j");
        p.row_blocks = Func("row_blocks");
        if (p.view.flat_rows()) {
            // Flat rows: the column sums of each block of rows over the flat index (c*S + s), so
            // that a vector runs across channels as the output's does; sums then adds S columns
            // per channel.
            const Var &flat = p.view.flat;
            Expr first_row = n * rows;
            j.where(first_row + j < row_count);
            Expr row = min(first_row + j, row_count - 1);
            auto [first, second] = terms(s, row, Float(32), BlockFirstRow{s, first_row});
            p.row_blocks(flat, n) = Tuple(0.0f, 0.0f);
            p.row_blocks(flat, n) = Tuple(p.row_blocks(flat, n)[0] + p.view.flat_output(first),
                                          p.row_blocks(flat, n)[1] + p.view.flat_output(second));
        } else {
            const Var &block = along_n ? n : s;
            Expr first_row = block * rows;
            j.where(first_row + j < row_count);
            // The clamp only keeps bounds inference within the tensor; `where` skips those rows.
            Expr row = min(first_row + j, row_count - 1);
            auto [first, second] =
                along_n ? terms(s, row, Float(32), BlockFirstRow{s, first_row})
                        : terms(row, n, Float(32), BlockFirstRow{first_row, n});
            std::vector<Var> args = p.view.storage_args();
            p.row_blocks(args) = Tuple(0.0f, 0.0f);
            p.row_blocks(args) =
                Tuple(p.row_blocks(args)[0] + first, p.row_blocks(args)[1] + second);
        }
        const Expr blocks = (row_count + rows - 1) / rows;
        p.r = along_n ? RDom(0, spatial, 0, blocks, "r") : RDom(0, blocks, 0, batch, "r");
        const BlockFirstRow first = along_n ? BlockFirstRow{p.r.x, p.r.y * rows}
                                            : BlockFirstRow{p.r.x * rows, p.r.y};
        const Expr flat_column = c * p.view.flat_spatial + p.r.x;
        Tuple block_sums = p.row_blocks(p.view.flat_rows() ? std::vector<Expr>{flat_column, p.r.y}
                                        : along_n ? std::vector<Expr>{p.r.x, c, p.r.y}
                                                  : std::vector<Expr>{c, p.r.x, p.r.y});
        Expr sum_first = cast<double>(block_sums[0]), sum_second = cast<double>(block_sums[1]);
        if (recentre) {
            Expr offset = recentre(first);
            Expr m = cast<double>(min(rows, row_count - (along_n ? first.n : first.s)));
            sum_second += offset * (2 * sum_first + m * offset);
            sum_first += m * offset;
        }
        p.sums(c) = Tuple(p.sums(c)[0] + sum_first, p.sums(c)[1] + sum_second);
    }

    // The vector lanes the CPU schedule sums a contiguous row's elements in (its vector width);
    // 0 for channels-last (vectors along C) and CUDA.
    int contiguous_sum_lanes() const {
        if (choice_.cuda || layout != Layout::Contiguous) return 0;
        return this->get_target().template natural_vector_size<float>() * choice_.cpu.vectors;
    }

    // Rows per float32 block of the statistics (1: none). The CUDA schedule reduces across
    // threads and keeps float64 terms.
    int float32_stat_rows() const {
        if (choice_.cuda) return 1;
        return choice_.cpu.float32_stat_rows;
    }

    // outputs: the tensor outputs (y; dx and dz); tensors: every 3-D argument (outputs
    // included); channel_vectors: the per-channel ones.
    void constrain_and_schedule(NormPipeline &p,
                                const std::vector<Halide::OutputImageParam> &outputs,
                                const std::vector<Halide::OutputImageParam> &tensors,
                                const std::vector<Halide::OutputImageParam> &channel_vectors) {
        const FixedShape fixed = parse_fixed_shape(shape);
        for (const auto &t : tensors) constrain_tensor(t, layout, fixed, p.view.flat_rows());
        for (const auto &v : channel_vectors) constrain_channel_vector(v, fixed);
        if (streaming_output_) {
            // What lets Halide prove each output's vector stores aligned (asserted on entry):
            // a 64-byte aligned host pointer and, for any shape, row strides in multiples of
            // 64 bytes (an exact shape's constant strides already say so). Every tensor output
            // streams: a second one written normally (the residual's dz) would be read from
            // DRAM before it is written, a pass more.
            const int row = streaming_row_elements(dtype);
            std::vector<std::string> names;
            for (Halide::OutputImageParam output : outputs) {
                output.set_host_alignment(64);
                if (fixed.generic())
                    for (int d : {1, 2})
                        output.dim(d).set_stride((output.dim(d).stride() / row) * row);
                names.push_back(output.name());
            }
            request_streaming_stores(names);
        }
        request_l2_prefetches(choice_.cpu.prefetch_next_block);
        schedule_for_target(p, choice_, this->get_target());
    }

private:
    ScheduleChoice choice_;
    Halide::GeneratorInput<double> *opaque_zero_ = nullptr;
    bool prefetches_next_channel_ = false, unmasks_loads_ = false;
    Halide::GeneratorInput<int> *streaming_output_ = nullptr, *flat_rows_ = nullptr;
};

}  // namespace normgen
