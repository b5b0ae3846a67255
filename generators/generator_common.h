// GeneratorParams and steps shared by the BatchNorm generators: layout and shape constraints on
// the buffers, and handing the finished algorithm to the schedule for the target.
#pragma once

#include "norm_pipeline.h"

#include <string>
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
// the row dimension, so the kernel sees (C, N*S, 1).
void constrain_tensor(Halide::OutputImageParam buffer, Layout layout, const FixedShape &shape);
// Constrains a per-channel vector (weight, statistics...) to min 0 and, if known, extent C.
void constrain_channel_vector(Halide::OutputImageParam buffer, const FixedShape &shape);

// Schedules the pipeline for the generator's target with the knobs given as a JSON object
// (knobs_json, the tuner's way), or else those tuned for `family` / `dtype` / `shape`.
// emulate_cuda: the CUDA schedule on a CPU target (see schedule_cuda), for testing it.
void schedule_for_target(NormPipeline &p, const Halide::Target &target, const std::string &family,
                         const std::string &dtype, const std::string &shape,
                         const std::string &tuned_json_path, const std::string &knobs_json,
                         bool emulate_cuda);

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

    // tensors: the 3-D arguments; channel_vectors: the per-channel ones.
    void constrain_and_schedule(NormPipeline &p, const std::string &family,
                                const std::vector<Halide::OutputImageParam> &tensors,
                                const std::vector<Halide::OutputImageParam> &channel_vectors) {
        const FixedShape fixed = parse_fixed_shape(shape);
        for (const auto &t : tensors) constrain_tensor(t, layout, fixed);
        for (const auto &v : channel_vectors) constrain_channel_vector(v, fixed);
        const std::string dtype_name = dtype == StorageType::F32   ? "f32"
                                       : dtype == StorageType::F16 ? "f16"
                                                                   : "bf16";
        schedule_for_target(p, this->get_target(), family, dtype_name, shape, tuned, knobs,
                            emulate_cuda);
    }
};

}  // namespace normgen
