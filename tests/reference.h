// The oracle: BatchNorm forward and backward in float64, written for clarity, not speed.
//
// Every BatchNorm1d/2d/3d input is viewed as (N, C, S), S the product of the spatial extents,
// stored either contiguously (PyTorch's default: index (n*C + c)*S + s) or channels-last
// (C innermost: index (n*S + s)*C + c). Semantics are PyTorch's:
//   forward  = torch.nn.functional.batch_norm + the module's running-statistics bookkeeping
//   backward = aten::native_batch_norm_backward (train: saved batch statistics; eval: running)
// with the fused forms of issue 3: y = act(bn(x) [+ z]), act = identity or ReLU, and their
// gradient (dy masked where the pre-activation bn(x) [+ z] is not > 0; dz = that masked dy).
//
// Reduced precision (f16, bf16 storage): the reference takes the *stored* values, decoded to
// float (exactly: every f16/bf16 value is a float), computes in float64, and gives float64
// results; round_to_storage() says what the correctly rounded stored result of a value is.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

namespace normgen::ref {

// The canonical (N, C, S) view of a tensor and where element (n, c, s) lives in memory.
struct View {
    int64_t n = 1, c = 1, s = 1;
    bool channels_last = false;

    int64_t size() const { return n * c * s; }
    int64_t at(int64_t in, int64_t ic, int64_t is) const {
        return channels_last ? (in * s + is) * c + ic : (in * c + ic) * s + is;
    }
    // Calls f(c, index) for every element, in storage order (cache-friendly for big tensors).
    template <typename F>
    void for_each(F &&f) const {
        for (int64_t in = 0; in < n; in++)
            for (int64_t j = 0; j < c * s; j++)
                channels_last ? f(j % c, in * c * s + j) : f(j / s, in * c * s + j);
    }
};

struct Params {
    double eps = 1e-5;
    double momentum = 0.1;  // NaN: momentum=None, cumulative average
    bool affine = true;
    bool track_running_stats = true;
    bool training = true;
    bool relu = false;      // y = max(pre, 0)
    bool residual = false;  // pre = bn(x) + z
};

// A module's running-statistics buffers, kept in float64 by the reference.
struct RunningStats {
    std::vector<double> mean, var;
    int64_t num_batches_tracked = 0;
};

struct ForwardResult {
    std::vector<double> y;
    std::vector<double> pre;        // bn(x) [+ z], before the activation (= y without ReLU)
    bool batch_statistics = false;  // true: mean/invstd below are the batch's (save_mean/invstd)
    std::vector<double> mean, invstd, biased_var;  // the statistics y was normalised with
};

// weight/bias: C floats, ignored (1 and 0) unless params.affine.
// running: updated in training when track_running_stats, read in eval; may be null only when
// it is neither read nor written.
// z: the residual (required iff params.residual).
ForwardResult forward(const View &v, const Params &p, const float *x, const float *weight,
                      const float *bias, RunningStats *running, const float *z = nullptr);

struct BackwardResult {
    std::vector<double> dx, dweight, dbias;
    std::vector<double> dz;      // the gradient reaching bn(x) (and z): dy, masked by the ReLU
    std::vector<double> pre;     // with ReLU: the pre-activation the mask was taken from
    std::vector<double> invstd;  // the one the gradients were computed with
};

// The forward's fusion, as the backward needs it: with ReLU the mask is pre > 0, pre =
// (x - mean) * invstd * weight + bias [+ z] in float64 with the statistics the backward uses
// (saved batch statistics in training, running ones in eval). bias null means 0; z is read
// only with relu && residual.
struct Fusion {
    bool relu = false;
    const float *bias = nullptr;
    const float *z = nullptr;
};

// As aten::native_batch_norm_backward(dy, x, weight, running_mean, running_var, save_mean,
// save_invstd, train, eps), applied to the masked dy: train uses save_mean/save_invstd, eval
// running_mean/running_var. weight null means 1.
BackwardResult backward(const View &v, const float *x, const float *dy, const float *weight,
                        const float *running_mean, const float *running_var,
                        const float *save_mean, const float *save_invstd, bool train,
                        double eps, const Fusion &fusion = {});

// ---- Storage types ------------------------------------------------------------------------

// The tensor storage types of normgen: IEEE binary32, IEEE binary16 and bfloat16 (binary32's
// top 16 bits).
enum class Storage { F32, F16, BF16 };

// v rounded to the storage type, round to nearest, ties to even, in one step from float64 (IEEE
// semantics: gradual underflow, and magnitudes at or beyond the overflow threshold become inf).
double round_to_storage(double v, Storage s);
// The spacing of the storage type's values at magnitude |v| (in the binade of |v|; the
// subnormal spacing below the smallest normal).
double storage_ulp(double v, Storage s);
// Bit patterns of 16-bit values (v must be exactly representable: round first), and back.
uint16_t encode16(double v, Storage s);
float decode16(uint16_t bits, Storage s);

// Float32 row blocks (the float32_stat_rows schedule knob): a kernel sums each block of `rows`
// rows in float32, term by term in row order, before the block joins its float64 sums (rows:
// contiguous, the n at one s; channels-last, the (n, s) positions in storage order). These bound that float32 sum's error from the data, as Higham's running error
// bound of a recursive sum: a term t_j computed with relative error k*u (u = 2^-24) and added to
// the partial sum P_j errs by at most k*u*|t_j| + u*|P_j| (first order; the partial sums taken
// exactly), doubled for second-order terms and the float64 steps. Per channel, first/second
// bound the error of the kernel's sums of its two terms.
struct BlockSumError {
    std::vector<double> first, second;
};
// The forward's sums of d and d^2, d = x - x(0, c, 0): the kernel takes e = x - x(block's first
// row) in float32 and moves the block's sums to d in float64 (sum d^2 = sum e^2 + 2 o sum e +
// m o^2, o the block's offset), so sum e's error counts 2|o| times in the second.
BlockSumError forward_block_sum_error(const View &v, int rows, const float *x);
// The backward's sums of g and g * (x - mean): g(i) the gradient at element i (dy, masked by
// the ReLU), a stored value; x - mean and the product each round once in float32.
BlockSumError backward_block_sum_error(const View &v, int rows, const float *x,
                                       const std::function<double(int64_t i)> &g,
                                       const float *mean);

}  // namespace normgen::ref
