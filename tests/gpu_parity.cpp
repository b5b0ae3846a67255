// Runs every CUDA kernel of the default package on the GPU against the float64 reference:
// forward (training, inference) and backward (training, eval) x dtype x fusion x memory format,
// on odd shapes and a ResNet-50 shape. Device memory comes from the CUDA driver (loaded at run
// time, like libnormgen does); inputs are copied in and results out by this program, so the
// kernels themselves see device pointers only.
//
// Without a CUDA driver or device it prints why and exits with 77, which ctest reports as
// skipped (not passed). On a GPU machine: `ctest --test-dir build -R cuda.gpu_parity -V`.
#include "reference.h"

#include <normgen/normgen.h>

#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace normgen;

// The CUDA driver entry points this program uses (cuda.h's, without its header).
struct Driver {
    int (*cuInit)(unsigned);
    int (*cuDeviceGet)(int *, int);
    int (*cuDevicePrimaryCtxRetain)(void **, int);
    int (*cuCtxSetCurrent)(void *);
    int (*cuMemAlloc)(uint64_t *, size_t);
    int (*cuMemFree)(uint64_t);
    int (*cuMemcpyHtoD)(uint64_t, const void *, size_t);
    int (*cuMemcpyDtoH)(void *, uint64_t, size_t);
    int (*cuCtxSynchronize)();
} cu;

bool load_driver(std::string *why) {
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (!lib) return *why = "the CUDA driver (libcuda.so.1) cannot be loaded", false;
    auto sym = [&](auto &fn, const char *name) {
        fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, name));
        return fn != nullptr;
    };
    if (!sym(cu.cuInit, "cuInit") || !sym(cu.cuDeviceGet, "cuDeviceGet") ||
        !sym(cu.cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain") ||
        !sym(cu.cuCtxSetCurrent, "cuCtxSetCurrent") || !sym(cu.cuMemAlloc, "cuMemAlloc_v2") ||
        !sym(cu.cuMemFree, "cuMemFree_v2") || !sym(cu.cuMemcpyHtoD, "cuMemcpyHtoD_v2") ||
        !sym(cu.cuMemcpyDtoH, "cuMemcpyDtoH_v2") || !sym(cu.cuCtxSynchronize, "cuCtxSynchronize"))
        return *why = "libcuda lacks a driver API entry point", false;
    int device = 0;
    void *ctx = nullptr;
    if (cu.cuInit(0) || cu.cuDeviceGet(&device, 0) || cu.cuDevicePrimaryCtxRetain(&ctx, device) ||
        cu.cuCtxSetCurrent(ctx))
        return *why = "no usable CUDA device (cuInit / primary context failed)", false;
    return true;
}

// A device copy of `bytes` bytes, optionally initialised from host memory.
struct DeviceBuffer {
    uint64_t ptr = 0;
    size_t bytes = 0;
    explicit DeviceBuffer(size_t n, const void *init = nullptr) : bytes(n) {
        if (cu.cuMemAlloc(&ptr, n)) std::abort();
        if (init) cu.cuMemcpyHtoD(ptr, init, n);
    }
    ~DeviceBuffer() { cu.cuMemFree(ptr); }
    void *get() const { return reinterpret_cast<void *>(ptr); }
    template <typename T>
    std::vector<T> read() const {
        std::vector<T> v(bytes / sizeof(T));
        cu.cuMemcpyDtoH(v.data(), ptr, bytes);
        return v;
    }
};

ref::Storage storage(ng_dtype d) {
    return d == NG_F16 ? ref::Storage::F16 : d == NG_BF16 ? ref::Storage::BF16 : ref::Storage::F32;
}
// Host bytes of a tensor in the dtype (16-bit types as bit patterns), and back to float.
std::vector<uint8_t> encode(const std::vector<float> &v, ng_dtype d) {
    std::vector<uint8_t> out(v.size() * (d == NG_F32 ? 4 : 2));
    for (size_t i = 0; i < v.size(); i++) {
        if (d == NG_F32) {
            std::memcpy(&out[4 * i], &v[i], 4);
        } else {
            uint16_t bits = ref::encode16(v[i], storage(d));
            std::memcpy(&out[2 * i], &bits, 2);
        }
    }
    return out;
}
std::vector<float> decode(const std::vector<uint8_t> &bytes, ng_dtype d) {
    const size_t n = bytes.size() / (d == NG_F32 ? 4 : 2);
    std::vector<float> v(n);
    for (size_t i = 0; i < n; i++) {
        if (d == NG_F32) {
            std::memcpy(&v[i], &bytes[4 * i], 4);
        } else {
            uint16_t bits;
            std::memcpy(&bits, &bytes[2 * i], 2);
            v[i] = ref::decode16(bits, storage(d));
        }
    }
    return v;
}

int failures = 0, checks = 0;

// |got - want| <= tol * max(1, max |want|) + half a storage ulp of want.
void expect_near(const std::string &what, const std::vector<float> &got,
                 const std::vector<double> &want, ng_dtype d) {
    checks++;
    double scale = 1, worst = 0;
    for (double w : want) scale = std::max(scale, std::fabs(w));
    for (size_t i = 0; i < want.size(); i++) {
        const double allowed = 2e-5 * scale + 0.5 * ref::storage_ulp(want[i], storage(d));
        const double err = std::fabs(got[i] - want[i]);
        if (!(err <= allowed)) {
            worst = std::max(worst, std::isnan(err) ? INFINITY : err / allowed);
        }
    }
    if (worst > 0) {
        failures++;
        std::printf("FAIL %s: error up to %.3g x the tolerance\n", what.c_str(), worst);
    }
}

}  // namespace

int main() {
    ng_runtime *rt = nullptr;
    if (ng_runtime_open(nullptr, &rt) != NG_OK) {
        std::printf("FAIL: cannot open the package: %s\n", ng_last_error());
        return 1;
    }
    // Ask the runtime first: it is what a user sees without a device.
    {
        ng_tensor t = {4, {2, 3, 4, 5}, NG_CONTIGUOUS, NG_F32, NG_CUDA};
        ng_batch_norm_params p = ng_batch_norm_params_default();
        ng_plan *plan = nullptr;
        const ng_status s = ng_plan_create(rt, NG_OP_FORWARD, &t, &p, &plan);
        if (s == NG_NO_DEVICE) {
            std::printf("SKIPPED: %s\n", ng_last_error());
            ng_runtime_close(rt);
            return 77;
        }
        ng_plan_destroy(plan);
    }
    std::string why;
    if (!load_driver(&why)) {
        std::printf("SKIPPED: %s\n", why.c_str());
        ng_runtime_close(rt);
        return 77;
    }

    std::mt19937 rng(7);
    std::normal_distribution<float> normal(0.5f, 2.0f);
    const std::vector<std::vector<int64_t>> shapes = {
        {2, 3}, {3, 5, 7}, {2, 3, 5, 7}, {4, 7, 3, 5, 3}, {5, 33, 17, 19}, {32, 64, 28, 28}};
    for (ng_dtype dtype : {NG_F32, NG_F16, NG_BF16})
        for (int fusion = 0; fusion < 4; fusion++)
            for (ng_memory_format format : {NG_CONTIGUOUS, NG_CHANNELS_LAST})
                for (bool training : {true, false})
                    for (const auto &shape : shapes) {
                        ng_tensor t = {static_cast<int32_t>(shape.size()), {}, format, dtype, NG_CUDA};
                        ref::View v;
                        v.n = shape[0];
                        v.c = shape[1];
                        for (size_t i = 0; i < shape.size(); i++) t.shape[i] = shape[i];
                        for (size_t i = 2; i < shape.size(); i++) v.s *= shape[i];
                        v.channels_last = format == NG_CHANNELS_LAST || v.s == 1;
                        const int64_t C = v.c, M = v.size();
                        ng_batch_norm_params p = ng_batch_norm_params_default();
                        p.training = training;
                        p.activation = fusion & 1 ? NG_ACT_RELU : NG_ACT_NONE;
                        p.residual = fusion >> 1;
                        ref::Params rp;
                        rp.training = training;
                        rp.relu = fusion & 1;
                        rp.residual = fusion >> 1;

                        auto tensor = [&] {
                            std::vector<float> x(M);
                            for (auto &e : x) e = static_cast<float>(ref::round_to_storage(normal(rng), storage(dtype)));
                            return x;
                        };
                        auto channels = [&](float lo, float hi) {
                            std::uniform_real_distribution<float> u(lo, hi);
                            std::vector<float> w(C);
                            for (auto &e : w) e = u(rng);
                            return w;
                        };
                        const std::vector<float> x = tensor(), z = tensor(), dy = tensor();
                        const std::vector<float> w = channels(0.5f, 1.5f), b = channels(-0.5f, 0.5f);
                        std::vector<float> rm = channels(-0.2f, 0.2f), rv = channels(0.5f, 2.0f);
                        ref::RunningStats running{{rm.begin(), rm.end()}, {rv.begin(), rv.end()}, 0};
                        const ref::ForwardResult want = ref::forward(v, rp, x.data(), w.data(), b.data(),
                                                                     &running, rp.residual ? z.data() : nullptr);

                        const size_t tensor_bytes = M * (dtype == NG_F32 ? 4 : 2), vec = C * 4;
                        auto xb = encode(x, dtype), zb = encode(z, dtype), dyb = encode(dy, dtype);
                        DeviceBuffer dx_in(tensor_bytes, xb.data()), dz_in(tensor_bytes, zb.data()),
                            ddy(tensor_bytes, dyb.data()), dy_out(tensor_bytes), dw(vec, w.data()),
                            db(vec, b.data()), drm(vec, rm.data()), drv(vec, rv.data()), dmean(vec),
                            dinvstd(vec), ddx(tensor_bytes), ddz(tensor_bytes), ddw(vec), ddb(vec);
                        int64_t batches = 0;
                        char name[160];
                        std::snprintf(name, sizeof name, "%s %s fusion %d %s %s",
                                      training ? "train" : "eval", dtype == NG_F32 ? "f32" : dtype == NG_F16 ? "f16" : "bf16",
                                      fusion, format == NG_CONTIGUOUS ? "contig" : "cl",
                                      std::to_string(M).c_str());
                        ng_plan *fwd = nullptr, *bwd = nullptr;
                        if (ng_plan_create(rt, NG_OP_FORWARD, &t, &p, &fwd) != NG_OK ||
                            ng_plan_create(rt, NG_OP_BACKWARD, &t, &p, &bwd) != NG_OK) {
                            std::printf("FAIL %s: plan: %s\n", name, ng_last_error());
                            failures++;
                            ng_plan_destroy(fwd);
                            continue;
                        }
                        auto fp = [](const DeviceBuffer &d) { return static_cast<float *>(d.get()); };
                        if (ng_batch_norm_forward(fwd, dx_in.get(), p.residual ? dz_in.get() : nullptr, dy_out.get(),
                                                  fp(dw), fp(db), fp(drm), fp(drv), &batches, fp(dmean),
                                                  fp(dinvstd)) != NG_OK) {
                            std::printf("FAIL %s: forward: %s\n", name, ng_last_error());
                            failures++;
                        } else {
                            cu.cuCtxSynchronize();
                            expect_near(std::string(name) + " y", decode(dy_out.read<uint8_t>(), dtype), want.y, dtype);
                            if (training) {
                                expect_near(std::string(name) + " running_mean", drm.read<float>(), running.mean, NG_F32);
                                expect_near(std::string(name) + " running_var", drv.read<float>(), running.var, NG_F32);
                            }
                        }
                        // Backward with the statistics the forward used (saved ones in training).
                        const std::vector<float> save_mean = training ? dmean.read<float>() : std::vector<float>(),
                                                 save_invstd = training ? dinvstd.read<float>() : std::vector<float>();
                        const ref::BackwardResult gwant = ref::backward(
                            v, x.data(), dy.data(), w.data(), rm.data(), rv.data(),
                            training ? save_mean.data() : nullptr, training ? save_invstd.data() : nullptr,
                            training, p.eps, ref::Fusion{rp.relu, b.data(), rp.residual ? z.data() : nullptr});
                        if (ng_batch_norm_backward(bwd, dx_in.get(), ddy.get(), p.residual ? dz_in.get() : nullptr,
                                                   fp(dw), fp(db), fp(drm), fp(drv),
                                                   training ? fp(dmean) : nullptr, training ? fp(dinvstd) : nullptr,
                                                   ddx.get(), fp(ddw), fp(ddb), p.residual ? ddz.get() : nullptr) != NG_OK) {
                            std::printf("FAIL %s: backward: %s\n", name, ng_last_error());
                            failures++;
                        } else {
                            cu.cuCtxSynchronize();
                            expect_near(std::string(name) + " dx", decode(ddx.read<uint8_t>(), dtype), gwant.dx, dtype);
                            expect_near(std::string(name) + " dweight", ddw.read<float>(), gwant.dweight, NG_F32);
                            expect_near(std::string(name) + " dbias", ddb.read<float>(), gwant.dbias, NG_F32);
                            if (p.residual)
                                expect_near(std::string(name) + " dz", decode(ddz.read<uint8_t>(), dtype), gwant.dz, dtype);
                        }
                        ng_plan_destroy(fwd);
                        ng_plan_destroy(bwd);
                    }
    ng_runtime_close(rt);
    std::printf("%d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}
