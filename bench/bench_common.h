// Shared types of the BatchNorm benchmark: the problem, its buffers, and the interface every
// implementation (normgen, oneDNN, libtorch) fills in. See bench_batch_norm.cpp for the design.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace bench {

enum class Op { fwd_train, fwd_infer, bwd_train };
enum class Format { contig, cl };
enum class ImplKind { normgen, onednn, torch };
// What follows the BatchNorm: nothing, y = relu(bn(x)), or ResNet's join y = relu(bn(x) + z).
// The backward of a fused form is the gradient of the whole: dx, dweight, dbias (and dz = the
// ReLU-masked dy, for addrelu).
enum class Fusion { none, relu, addrelu };

const char *name(Op op);          // fwd_train | fwd_infer | bwd_train
const char *name(Format format);  // contig | cl (normgen's layout names)
const char *name(ImplKind impl);  // normgen | onednn | torch
const char *name(Fusion fusion);  // none | relu | addrelu (normgen's variant names)

constexpr double kEps = 1e-5;
constexpr double kMomentum = 0.1;

// A BatchNorm input in PyTorch order (N, C, spatial...), 2..5 dims, in one memory format.
struct Problem {
    std::vector<int64_t> dims;
    Format format = Format::contig;
    Fusion fusion = Fusion::none;

    bool relu() const { return fusion != Fusion::none; }
    bool residual() const { return fusion == Fusion::addrelu; }
    int64_t n() const { return dims[0]; }
    int64_t c() const { return dims[1]; }
    int64_t s() const;  // product of the spatial extents (1 for BatchNorm1d on (N, C))
    int64_t numel() const { return n() * c() * s(); }
    std::string shape() const;  // "32x64x56x56"
    // Physical offset of logical element (n, c, s) in this format.
    int64_t offset(int64_t n, int64_t c, int64_t s) const {
        return format == Format::contig ? (n * this->c() + c) * this->s() + s
                                        : (n * this->s() + s) * this->c() + c;
    }
};

// DRAM passes over the tensor at the minimum: forward reads x (and z) and writes y; backward
// reads x and dy (and z) and writes dx (and dz). The bandwidth references move exactly these
// bytes: 2 and 3 passes plain or with ReLU, 3 and 5 with the residual add.
inline int passes(const Problem &p, Op op) {
    return op == Op::bwd_train ? (p.residual() ? 5 : 3) : (p.residual() ? 3 : 2);
}

// 2 MiB-aligned float buffer (none for count 0) with transparent huge pages requested and every
// page touched, so no implementation pays page faults or TLB misses the others do not.
class Buffer {
public:
    Buffer() = default;
    explicit Buffer(size_t count);
    ~Buffer();
    Buffer(Buffer &&o) noexcept : data_(o.data_), count_(o.count_) {
        o.data_ = nullptr;
        o.count_ = 0;
    }
    Buffer &operator=(Buffer &&o) noexcept;
    Buffer(const Buffer &) = delete;
    Buffer &operator=(const Buffer &) = delete;
    float *data() const { return data_; }
    size_t size() const { return count_; }
    float &operator[](size_t i) const { return data_[i]; }

private:
    float *data_ = nullptr;
    size_t count_ = 0;
};

// Inputs shared by every implementation. Values depend only on the logical index, so both
// formats hold the same logical tensor. With a fused ReLU, no pre-activation bn(x) (+ z) of the
// training forward lies within 1e-4 of 0 (see bench_common.cpp), so every correct
// implementation computes the same ReLU mask and the backward can be checked elementwise.
struct Inputs {
    Buffer x, dy;                      // numel each
    Buffer z;                          // numel with a residual, else none
    Buffer weight, bias;               // C each
    Buffer running_mean, running_var;  // C each: the running stats before any step
    explicit Inputs(const Problem &p);

private:
    void keep_pre_activations_off_zero(const Problem &p);
};

// What an implementation computed, for the sanity check. Large outputs are pointers into the
// implementation's own buffers; per-channel values are copies. Empty vectors: not produced.
struct Outputs {
    const float *y_train = nullptr, *y_infer = nullptr, *dx = nullptr, *dz = nullptr;
    std::vector<float> save_mean, save_invstd, running_mean, running_var, dweight, dbias;
    std::string error[3];  // per Op: what run() threw
};

// The per-channel results normgen and libtorch write in PyTorch's terms (oneDNN's differ: it
// keeps the variance and names the gradients scale/shift), and how they are reported.
struct ChannelBuffers {
    explicit ChannelBuffers(int64_t c)
        : save_mean(c), save_invstd(c), running_mean(c), running_var(c), dweight(c), dbias(c) {}
    Buffer save_mean, save_invstd, running_mean, running_var, dweight, dbias;
    void collect(Outputs &out, int64_t c) const;
};

// One implementation bound to one problem. Every buffer it writes is allocated by the
// constructor; run() only calls the library. The bandwidth reference writes into output(op) (and
// residual_grad() for the backward with a residual), so the reference and the kernel move the
// same bytes through the same buffers.
class Impl {
public:
    virtual ~Impl() = default;
    // Empty if the op can run; otherwise why not (e.g. normgen has no kernel for it).
    virtual std::string unavailable(Op op) const = 0;
    virtual std::string kernel(Op op) const = 0;  // the kernel/path that runs, for the CSV
    virtual void run(Op op) = 0;                  // the timed call
    virtual void reset_running_stats() = 0;       // back to Inputs' running stats
    float *output(Op op) { return op == Op::bwd_train ? dx_.data() : y_.data(); }
    // dz, the backward's second output with a residual (nullptr without): the peers' ReLU
    // gradient g, which is dz since the add's gradient is the identity.
    float *residual_grad() { return dz_.data(); }
    // Tensor-sized buffers run(op) reads or writes besides x, dy, z and its outputs (a saved
    // forward output, an intermediate gradient, a workspace), as (pointer, floats): flushed with
    // the others before a cold call.
    virtual std::vector<std::pair<const float *, int64_t>> internal_tensors(Op) const { return {}; }
    // Runs fwd_infer, fwd_train and bwd_train once each from fresh running stats and returns
    // what they produced (y_infer is copied aside since fwd_train overwrites y) or threw.
    Outputs run_for_check();

protected:
    Impl(const Problem &p, const Inputs &in);
    virtual void collect(Outputs &out) const = 0;  // per-channel results after the three runs
    // Called once after the checked fwd_train: a peer whose backward needs the forward's output
    // (autograd saves relu's result) keeps a copy here, untimed.
    virtual void forward_train_done() {}
    const Problem problem_;
    const Inputs &in_;
    Buffer y_, dx_, dz_, y_infer_copy_;
};

// Factories: throw std::runtime_error if the implementation cannot be set up at all.
std::unique_ptr<Impl> make_normgen(const Problem &p, const Inputs &in);
std::unique_ptr<Impl> make_onednn(const Problem &p, const Inputs &in);
std::unique_ptr<Impl> make_torch(const Problem &p, const Inputs &in);

// libtorch's public operators (at::native_batch_norm / at::native_batch_norm_backward, what
// torch.nn.functional.batch_norm and autograd call; with fusion, then add and relu, and in the
// backward threshold_backward first): the oracle every implementation is checked against,
// computed once per problem outside any timed region.
Outputs torch_oracle(const Problem &p, const Inputs &in, std::vector<Buffer> &storage);

// Compares out with the oracle for op; empty string if within tolerance, else what differs.
// *max_err receives the largest normalised error seen, *worst the output it was in.
std::string check(Op op, const Problem &p, const Outputs &oracle, const Outputs &out,
                  double *max_err, std::string *worst);

void set_threads(int threads);  // OpenMP, libtorch (and so oneDNN and normgen's pool)

}  // namespace bench
