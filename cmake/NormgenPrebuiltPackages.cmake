# Uses the kernel packages another build of this tree generated (NORMGEN_PREBUILT_PACKAGES = its
# lib folder) instead of generating them again: scripts/test's sanitizer build reuses the Release
# build's, since kernels are not sanitized anyway and generating them is most of a build.
foreach (package normgen-package normgen-cuda-emulation-package)
    if (NOT EXISTS "${NORMGEN_PREBUILT_PACKAGES}/${package}/manifest.json")
        message(FATAL_ERROR "NORMGEN_PREBUILT_PACKAGES=${NORMGEN_PREBUILT_PACKAGES} has no "
                            "${package}/manifest.json (build that tree first)")
    endif ()
    file(MAKE_DIRECTORY "${NORMGEN_LIB_DIR}")
    file(REMOVE_RECURSE "${NORMGEN_LIB_DIR}/${package}")
    file(CREATE_LINK "${NORMGEN_PREBUILT_PACKAGES}/${package}" "${NORMGEN_LIB_DIR}/${package}"
         SYMBOLIC)
endforeach ()
set(NORMGEN_CUDA_EMULATION_PACKAGE_DIR "${NORMGEN_LIB_DIR}/normgen-cuda-emulation-package")
add_custom_target(normgen_package)
