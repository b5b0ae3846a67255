/* normgen — C API of the runtime that loads and runs ahead-of-time BatchNorm kernels.
 *
 * Semantics follow torch.nn.BatchNorm1d/2d/3d. Tensors are described by an ng_tensor in PyTorch
 * order (N, C, spatial...) and passed as raw pointers; every pointer belongs to the caller and
 * normgen never writes outside the buffers the call names. Every function returns a status; on
 * failure ng_last_error() (thread-local) names the argument and the value that was wrong.
 *
 *   ng_runtime *rt;  ng_runtime_open(NULL, &rt);            // the package installed with the library
 *   ng_tensor x = {4, {32, 64, 56, 56}, NG_CONTIGUOUS, NG_F32, NG_CPU};
 *   ng_batch_norm_params p = ng_batch_norm_params_default();  // eps 1e-5, momentum 0.1, training
 *   ng_plan *plan;  ng_plan_create(rt, NG_OP_FORWARD, &x, &p, &plan);
 *   ng_batch_norm_forward(plan, x_data, NULL, y_data, weight, bias, running_mean, running_var,
 *                         &num_batches_tracked, save_mean, save_invstd);
 *   ng_plan_destroy(plan);  ng_runtime_close(rt);
 */
#ifndef NORMGEN_H
#define NORMGEN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define NG_API __attribute__((visibility("default")))
#else
#define NG_API
#endif

/* Version of the kernel ABI (argument names and order) a package must declare in its manifest.
   2: kernels may take `opaque_zero` (the prefetch_next_channel schedule knob).
   3: kernels may take `streaming_output` (the streaming_stores knob: the output is written with
      non-temporal stores, so the kernel runs only on 64-byte aligned output rows).
   4: kernels may take `flat_rows` (the flat_block_rows knob: contiguous tensors are passed as
      (C*S, 1, N)). */
#define NG_ABI_VERSION 4

typedef enum {
    NG_OK = 0,
    NG_INVALID_ARGUMENT = 1, /* a null pointer, bad extent, unknown enum value, wrong plan... */
    NG_UNSUPPORTED = 2,      /* valid in PyTorch but not (yet) by normgen, e.g. > 2 GiB tensors */
    NG_NO_KERNEL = 3,        /* the package holds no kernel this CPU/device can run for the plan */
    NG_NO_DEVICE = 4,        /* a CUDA tensor was asked for and no CUDA driver/device is present */
    NG_OUT_OF_MEMORY = 5,
    NG_INTERNAL = 6,         /* a kernel or the package failed: a bug or a broken package */
    NG_PACKAGE_ERROR = 7     /* the package folder, manifest or a kernel file is missing/corrupt */
} ng_status;

typedef enum { NG_F32 = 0, NG_F16 = 1, NG_BF16 = 2 } ng_dtype;
typedef enum { NG_CONTIGUOUS = 0, NG_CHANNELS_LAST = 1 } ng_memory_format;
typedef enum { NG_CPU = 0, NG_CUDA = 1 } ng_device;
typedef enum { NG_ACT_NONE = 0, NG_ACT_RELU = 1 } ng_activation;
typedef enum { NG_OP_FORWARD = 0, NG_OP_BACKWARD = 1 } ng_op;

/* A dense tensor: shape in PyTorch order (N, C, then 0..3 spatial dims), ndim 2..5.
 * NG_CONTIGUOUS is PyTorch's default strides; NG_CHANNELS_LAST is torch.channels_last(_3d),
 * i.e. C is the innermost dimension (for ndim 2 both formats are the same memory layout). */
typedef struct {
    int32_t ndim;
    int64_t shape[5];
    ng_memory_format format;
    ng_dtype dtype;
    ng_device device;
} ng_tensor;

/* BatchNorm hyper-parameters, as torch.nn.BatchNormNd's constructor and .train()/.eval(). */
typedef struct {
    double eps;                 /* > 0 */
    double momentum;            /* in [0, 1], or NAN for PyTorch's momentum=None (cumulative average) */
    int32_t affine;             /* 1: weight/bias are used (and their gradients produced) */
    int32_t track_running_stats;/* 1: running_mean/var are updated in training and used in eval */
    int32_t training;           /* 1: module.train(), 0: module.eval() */
    ng_activation activation;   /* fused activation: y = act(bn(x) [+ z]) */
    int32_t residual;           /* 1: add z (same shape, format, dtype as x) before the activation */
} ng_batch_norm_params;

typedef struct ng_runtime ng_runtime;
typedef struct ng_plan ng_plan;

/* eps 1e-5, momentum 0.1, affine, track_running_stats, training, no activation, no residual. */
NG_API ng_batch_norm_params ng_batch_norm_params_default(void);

/* Opens a kernel package: a folder holding manifest.json and the kernel shared objects.
 * package_dir NULL: $NORMGEN_PACKAGE if set, else the package installed beside libnormgen.
 * NORMGEN_ISA=sse41|avx2|avx512 caps the x86 ISA level the runtime will pick. */
NG_API ng_status ng_runtime_open(const char *package_dir, ng_runtime **out_runtime);
NG_API void ng_runtime_close(ng_runtime *runtime);
/* Package path, detected CPU features and every kernel of the package, one per line. */
NG_API const char *ng_runtime_describe(const ng_runtime *runtime);

/* Picks the kernel for (op, x, params): exact shape, then shape class, then generic, best ISA
 * first. A plan is bound to that op, shape and parameters; it is not safe to run one plan from
 * two threads at once (it owns per-channel scratch), but separate plans are independent. */
NG_API ng_status ng_plan_create(ng_runtime *runtime, ng_op op, const ng_tensor *x,
                                const ng_batch_norm_params *params, ng_plan **out_plan);
/* CUDA plans (x.device = NG_CUDA): every tensor and per-channel pointer passed to the forward and
 * backward calls is a device pointer (cuMemAlloc / cudaMalloc memory of the context current on
 * the calling thread, or of the device's primary context, which is what kernels run in), except
 * num_batches_tracked, a host int64 (momentum=None needs its value on the host). Nothing is
 * copied between host and device. A host pointer where a device pointer is expected cannot be
 * detected cheaply: the kernel then fails with a CUDA error (NG_INTERNAL) or reads garbage.
 * Kernels run on `stream` (a CUstream; NULL, the default, is the legacy default stream) and are
 * asynchronous to the host like any CUDA launch. Without a CUDA driver or device, creating a
 * CUDA plan returns NG_NO_DEVICE. NORMGEN_CUDA_DEVICE picks the device when no context is
 * current. */
NG_API ng_status ng_plan_set_cuda_stream(ng_plan *plan, void *stream);

/* The chosen kernel and why (and why more specialised candidates were not taken). */
NG_API const char *ng_plan_describe(const ng_plan *plan);
NG_API void ng_plan_destroy(ng_plan *plan);

/* Forward, as torch.nn.functional.batch_norm (+ the module's running-stats bookkeeping).
 *  x, y:            the tensor and the output, same shape/format/dtype (required).
 *  x, z, y share the plan's dtype: float for NG_F32, uint16_t bit patterns for NG_F16/NG_BF16
 *                   (weight, bias and all statistics are float whatever the dtype).
 *  z:               residual input: required iff params.residual.
 *  weight, bias:    C floats each, required iff affine (ignored otherwise).
 *  running_mean/var: C floats; read in eval, updated in training when track_running_stats.
 *  num_batches_tracked: incremented in training when track_running_stats; required if momentum
 *                   is NAN (None), may be NULL otherwise.
 *  save_mean/save_invstd: C floats, batch mean and 1/sqrt(biased var + eps), written when batch
 *                   statistics are used (training, or eval without running stats); may be NULL.
 * Alignment: any element-aligned pointer works. Some tuned kernels write y (backward: dx) with
 * streaming stores, which need it 64-byte aligned (as PyTorch's allocator gives); a plan that
 * chose one runs its next-best kernel on a call whose output is not (ng_plan_describe names
 * both). */
NG_API ng_status ng_batch_norm_forward(ng_plan *plan, const void *x, const void *z, void *y,
                                       const float *weight, const float *bias, float *running_mean,
                                       float *running_var, int64_t *num_batches_tracked,
                                       float *save_mean, float *save_invstd);

/* Backward, as aten::native_batch_norm_backward: with batch statistics (training, or eval
 * without running stats) it uses save_mean/save_invstd from the forward pass; in eval with
 * running stats it uses running_mean/running_var.
 *  dx: required.  dweight, dbias: C floats, may be NULL (not computed for the caller).
 *  bias: with a fused ReLU (and affine), required: the mask is recomputed from x, z and the
 *        statistics, so no forward output is needed. Otherwise unused (may be NULL).
 *  z:    with residual + ReLU, required (part of the mask); otherwise unused (may be NULL).
 *  dz:   the residual's gradient (= dy masked by the ReLU): required iff params.residual. */
NG_API ng_status ng_batch_norm_backward(ng_plan *plan, const void *x, const void *dy,
                                        const void *z, const float *weight, const float *bias,
                                        const float *running_mean, const float *running_var,
                                        const float *save_mean, const float *save_invstd, void *dx,
                                        float *dweight, float *dbias, void *dz);

/* Message of the last call on this thread that returned a status: "" if it succeeded. */
NG_API const char *ng_last_error(void);
NG_API const char *ng_status_name(ng_status status);

/* Threads. By default kernels run their parallel loops on the process's OpenMP pool (the one
 * libtorch and oneDNN use). A host with its own pool installs a parallel-for: it must call
 * task(task_context, i) for every i in [0, count) and return nonzero if any call did.
 * NULL restores the default. NORMGEN_NUM_THREADS caps the OpenMP thread count. */
typedef int (*ng_task_fn)(void *task_context, int index);
typedef int (*ng_parallel_for_fn)(void *host_context, int count, ng_task_fn task,
                                  void *task_context);
NG_API void ng_set_parallel_for(ng_parallel_for_fn parallel_for, void *host_context);

#ifdef __cplusplus
}
#endif
#endif /* NORMGEN_H */
