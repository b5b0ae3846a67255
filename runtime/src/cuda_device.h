// The CUDA driver, found at run time: libnormgen links no CUDA library and loads libcuda only
// when a plan for a CUDA tensor is made.
#pragma once

#include "HalideRuntime.h"

#include <cstdint>
#include <string>

namespace ng {

struct CudaDevice {
    int ordinal = 0;
    int capability = 0;  // major * 10 + minor, e.g. 80 for sm_80
    std::string name;
};

// The device CUDA kernels run on: the current context's device, else NORMGEN_CUDA_DEVICE, else
// device 0. Loads the driver on first use and routes Halide's CUDA runtime to the current
// context (the framework's) or the device's primary context, never a private one, so that
// device pointers from the host application are valid in the kernels. Throws NG_NO_DEVICE when
// there is no driver or no device.
const CudaDevice &cuda_device();

// The stream the calling thread's next kernels run on (a CUstream; null: the default stream).
void set_cuda_stream(void *stream);

// Halide's CUDA device interface and its device-pointer wrapping (Halide error codes). Builds
// without CUDA (AArch64) have none: cuda_device() then reports NG_NO_DEVICE.
const halide_device_interface_t *cuda_interface();
int cuda_wrap(halide_buffer_t *buffer, uint64_t device_pointer);
int cuda_detach(halide_buffer_t *buffer);

}  // namespace ng
