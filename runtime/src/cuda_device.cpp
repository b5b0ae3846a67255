#include "cuda_device.h"

#include "errors.h"
#include "normgen/normgen.h"

#if NORMGEN_WITH_CUDA
#include "HalideRuntimeCuda.h"
#endif

#include <dlfcn.h>

#include <cstdlib>
#include <mutex>

namespace ng {

#if NORMGEN_WITH_CUDA
namespace {

// The few driver entry points normgen needs (CUDA driver API, cuda.h), by value: no CUDA headers.
using CUresult = int;
using CUdevice = int;
using CUcontext = void *;
constexpr int kComputeCapabilityMajor = 75, kComputeCapabilityMinor = 76;

struct Driver {
    CUresult (*cuInit)(unsigned) = nullptr;
    CUresult (*cuDeviceGetCount)(int *) = nullptr;
    CUresult (*cuDeviceGet)(CUdevice *, int) = nullptr;
    CUresult (*cuDeviceGetAttribute)(int *, int, CUdevice) = nullptr;
    CUresult (*cuDeviceGetName)(char *, int, CUdevice) = nullptr;
    CUresult (*cuCtxGetCurrent)(CUcontext *) = nullptr;
    CUresult (*cuCtxGetDevice)(CUdevice *) = nullptr;
    CUresult (*cuDevicePrimaryCtxRetain)(CUcontext *, CUdevice) = nullptr;
};

Driver g_driver;
CudaDevice g_device;
CUcontext g_primary_context = nullptr;
thread_local void *g_stream = nullptr;

// Halide's CUDA runtime asks for a context before every call: the host's current one if it has
// made one current (PyTorch does), else the device's primary context.
int acquire_context(void *, void **ctx, bool) {
    CUcontext current = nullptr;
    if (g_driver.cuCtxGetCurrent(&current) == 0 && current) {
        *ctx = current;
        return 0;
    }
    *ctx = g_primary_context;
    return 0;
}
int release_context(void *) { return 0; }
int get_stream(void *, void *, void **stream) {
    *stream = g_stream;
    return 0;
}

void load() {
    // RTLD_GLOBAL: Halide's CUDA runtime resolves the driver's symbols from the process.
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (!lib) lib = dlopen("libcuda.so", RTLD_NOW | RTLD_GLOBAL);
    if (!lib)
        fail(NG_NO_DEVICE, "no CUDA device: the CUDA driver (libcuda.so.1) cannot be loaded");
    auto sym = [&](auto &fn, const char *name) {
        fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, name));
        if (!fn) fail(NG_NO_DEVICE, "no usable CUDA driver: libcuda lacks ", name);
    };
    sym(g_driver.cuInit, "cuInit");
    sym(g_driver.cuDeviceGetCount, "cuDeviceGetCount");
    sym(g_driver.cuDeviceGet, "cuDeviceGet");
    sym(g_driver.cuDeviceGetAttribute, "cuDeviceGetAttribute");
    sym(g_driver.cuDeviceGetName, "cuDeviceGetName");
    sym(g_driver.cuCtxGetCurrent, "cuCtxGetCurrent");
    sym(g_driver.cuCtxGetDevice, "cuCtxGetDevice");
    sym(g_driver.cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain");
    if (CUresult r = g_driver.cuInit(0))
        fail(NG_NO_DEVICE, "no CUDA device: cuInit failed with CUDA error ", r);
    int count = 0;
    if (g_driver.cuDeviceGetCount(&count) || count < 1)
        fail(NG_NO_DEVICE, "no CUDA device: the driver reports ", count, " devices");

    CUdevice device = 0;
    CUcontext current = nullptr;
    if (g_driver.cuCtxGetCurrent(&current) == 0 && current) {
        g_driver.cuCtxGetDevice(&device);
    } else {
        int ordinal = 0;
        if (const char *env = std::getenv("NORMGEN_CUDA_DEVICE"); env && *env)
            ordinal = std::atoi(env);
        if (ordinal < 0 || ordinal >= count)
            fail(NG_NO_DEVICE, "NORMGEN_CUDA_DEVICE = ", ordinal, ": the driver reports ", count,
                 " devices");
        if (g_driver.cuDeviceGet(&device, ordinal))
            fail(NG_NO_DEVICE, "no CUDA device: cuDeviceGet(", ordinal, ") failed");
    }
    int major = 0, minor = 0;
    g_driver.cuDeviceGetAttribute(&major, kComputeCapabilityMajor, device);
    g_driver.cuDeviceGetAttribute(&minor, kComputeCapabilityMinor, device);
    char name[256] = {0};
    g_driver.cuDeviceGetName(name, sizeof(name) - 1, device);
    if (CUresult r = g_driver.cuDevicePrimaryCtxRetain(&g_primary_context, device))
        fail(NG_NO_DEVICE, "CUDA device ", device, ": cannot retain its primary context (error ",
             r, ")");
    g_device = CudaDevice{device, major * 10 + minor, name};
    halide_set_cuda_acquire_context(acquire_context);
    halide_set_cuda_release_context(release_context);
    halide_set_cuda_get_stream(get_stream);
}

}  // namespace

const CudaDevice &cuda_device() {
    static std::mutex mutex;
    static bool ready = false;
    std::lock_guard<std::mutex> lock(mutex);
    if (!ready) {
        load();  // throws (and is retried by the next plan) when there is no device
        ready = true;
    }
    return g_device;
}

void set_cuda_stream(void *stream) { g_stream = stream; }

const halide_device_interface_t *cuda_interface() { return halide_cuda_device_interface(); }
int cuda_wrap(halide_buffer_t *buffer, uint64_t device_pointer) {
    return halide_cuda_wrap_device_ptr(nullptr, buffer, device_pointer);
}
int cuda_detach(halide_buffer_t *buffer) { return halide_cuda_detach_device_ptr(nullptr, buffer); }

#else  // a build without CUDA

const CudaDevice &cuda_device() {
    fail(NG_NO_DEVICE, "no CUDA device: this libnormgen is built without CUDA support");
}
void set_cuda_stream(void *) {}
const halide_device_interface_t *cuda_interface() { return nullptr; }
int cuda_wrap(halide_buffer_t *, uint64_t) { return halide_error_code_device_wrap_native_failed; }
int cuda_detach(halide_buffer_t *) { return 0; }

#endif

}  // namespace ng
