# The host build's AArch64 half (DESIGN: "host build makes generators + AArch64 objects; cross
# toolchain links"). Included from the top-level CMakeLists when NORMGEN_AARCH64 is on:
#  - NormgenKernels.cmake generates the arm-64 kernels with the host's normgen_generators and
#    links them with the cross linker below into the package, beside the x86 ones;
#  - normgen_add_aarch64_build() generates the arm-64 Halide runtime object with the same host
#    generator binary, and cross-builds libnormgen, the CLI, the C example and the tests
#    from this same source tree (ExternalProject, cmake/aarch64-linux-gnu.cmake) against that
#    object and package, in ${NORMGEN_AARCH64_BINARY_DIR};
#  - tests/CMakeLists.txt registers the aarch64.* ctest entries, which run the cross-built test
#    executables under ${NORMGEN_QEMU_COMMAND}.
if (NOT NORMGEN_AARCH64_CXX OR NOT NORMGEN_QEMU_AARCH64)
    message(FATAL_ERROR "NORMGEN_AARCH64 needs aarch64-linux-gnu-g++ and qemu-aarch64 "
                        "(scripts/setup --cross installs them), or -DNORMGEN_AARCH64=OFF")
endif ()
find_program(NORMGEN_AARCH64_CC aarch64-linux-gnu-gcc REQUIRED)
set(NORMGEN_AARCH64_SYSROOT /usr/aarch64-linux-gnu)
# The linker NormgenKernels.cmake uses for the arm-64 kernel libraries.
set(NORMGEN_LINKER_arm-64 "${NORMGEN_AARCH64_CC}")
set(NORMGEN_QEMU_COMMAND "${NORMGEN_QEMU_AARCH64}" -L "${NORMGEN_AARCH64_SYSROOT}")
set(NORMGEN_AARCH64_BINARY_DIR "${CMAKE_BINARY_DIR}/aarch64")

function(normgen_add_aarch64_build)
    include(ExternalProject)
    # The Halide runtime the arm-64 libnormgen links (baseline arm-64-linux, as x86's is x86-64).
    normgen_generate_halide_runtime(normgen_halide_runtime_arm_64 arm-64-linux
                                    "${CMAKE_BINARY_DIR}" halide_runtime)
    add_custom_target(normgen_halide_runtime_arm_64 DEPENDS "${halide_runtime}")
    get_target_property(halide_include Halide::Runtime INTERFACE_INCLUDE_DIRECTORIES)
    get_target_property(json_include nlohmann_json::nlohmann_json INTERFACE_INCLUDE_DIRECTORIES)
    # The same source tree, configured with the cross toolchain; it builds nothing with Halide's
    # compiler. BUILD_ALWAYS: the sub-build's own dependency scan decides what is out of date.
    ExternalProject_Add(normgen_aarch64
        SOURCE_DIR "${CMAKE_SOURCE_DIR}"
        BINARY_DIR "${NORMGEN_AARCH64_BINARY_DIR}"
        CMAKE_ARGS
            -DCMAKE_TOOLCHAIN_FILE=${CMAKE_SOURCE_DIR}/cmake/aarch64-linux-gnu.cmake
            -DCMAKE_BUILD_TYPE=${CMAKE_BUILD_TYPE}
            -DNORMGEN_BUILD_TESTS=${NORMGEN_BUILD_TESTS}
            -DNORMGEN_HOST_PACKAGE_DIR=${NORMGEN_PACKAGE_DIR}
            -DNORMGEN_HOST_HALIDE_RUNTIME=${halide_runtime}
            -DNORMGEN_HALIDE_INCLUDE_DIR=${halide_include}
            -DNORMGEN_JSON_INCLUDE_DIR=${json_include}
        INSTALL_COMMAND ""
        BUILD_ALWAYS ON
        DEPENDS normgen_package normgen_halide_runtime_arm_64)
endfunction()
