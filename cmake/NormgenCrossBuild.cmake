# A cross build (configured by cmake/NormgenAArch64.cmake with cmake/aarch64-linux-gnu.cmake):
# it compiles the runtime, CLI, example and tests for the target and links what the host build
# generated for it. Nothing here runs Halide's compiler or needs target copies of the host's
# header-only libraries.
foreach (var NORMGEN_HOST_PACKAGE_DIR NORMGEN_HOST_HALIDE_RUNTIME NORMGEN_HALIDE_INCLUDE_DIR
             NORMGEN_JSON_INCLUDE_DIR)
    if (NOT ${var})
        message(FATAL_ERROR "normgen cross build: ${var} is not set (the host build sets it; "
                            "configure the host build with -DNORMGEN_AARCH64=ON instead)")
    endif ()
endforeach ()

# Headers only, taken from the host: Halide's runtime header folder holds nothing else, while
# nlohmann's lives in /usr/include, which must not be searched ahead of the target's own headers:
# stage just that folder.
add_library(Halide::Runtime INTERFACE IMPORTED)
set_target_properties(Halide::Runtime PROPERTIES
    INTERFACE_INCLUDE_DIRECTORIES "${NORMGEN_HALIDE_INCLUDE_DIR}")
set(_staged_headers "${CMAKE_BINARY_DIR}/host-headers")
file(MAKE_DIRECTORY "${_staged_headers}")
file(CREATE_LINK "${NORMGEN_JSON_INCLUDE_DIR}/nlohmann" "${_staged_headers}/nlohmann" SYMBOLIC)
add_library(nlohmann_json::nlohmann_json INTERFACE IMPORTED)
set_target_properties(nlohmann_json::nlohmann_json PROPERTIES
    INTERFACE_INCLUDE_DIRECTORIES "${_staged_headers}")

# GoogleTest from Debian's sources (libgtest-dev ships them): no arm64 multiarch packages needed.
if (NORMGEN_BUILD_TESTS)
    set(INSTALL_GTEST OFF CACHE BOOL "" FORCE)
    add_subdirectory(/usr/src/googletest/googletest "${CMAKE_BINARY_DIR}/googletest" EXCLUDE_FROM_ALL)
endif ()
# oneDNN and libtorch are x86-only here.
set(NORMGEN_BUILD_BENCH OFF CACHE BOOL "" FORCE)

# The package is the host build's (it holds the arm-64 kernels); libnormgen finds it beside
# itself, as in any build.
function(normgen_link_host_package)
    file(MAKE_DIRECTORY "${NORMGEN_LIB_DIR}")
    file(CREATE_LINK "${NORMGEN_HOST_PACKAGE_DIR}" "${NORMGEN_PACKAGE_DIR}" SYMBOLIC)
    add_custom_target(normgen_package)
endfunction()
