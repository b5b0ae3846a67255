# Expands normgen's variant table into generator runs and packs the results: one shared object
# per target plus manifest.json, in ${NORMGEN_PACKAGE_DIR}. Variants are listed once, here.
#
# A kernel's name is its key everywhere (symbol, manifest, benchmark rows):
#   <family>_<dtype>_<layout>[_<fusion>]_<isa>[_n<N>_c<C>_s<S>]
#   e.g. bn_fwd_train_f32_contig_avx512, bn_bwd_train_bf16_cl_addrelu_avx2

# family | generator | generator params | op | statistics it normalises with
set(NORMGEN_FAMILIES
    "bn_fwd_train|batch_norm_forward|mode=training|forward|batch"
    "bn_fwd_infer|batch_norm_forward|mode=inference|forward|running"
    "bn_bwd_train|batch_norm_backward|mode=training|backward|batch"
    "bn_bwd_eval|batch_norm_backward|mode=eval|backward|running")
set(NORMGEN_LAYOUTS contig cl)
set(NORMGEN_DTYPES f32 f16 bf16)
# fusion | generator params | activation | residual   ("" = plain BatchNorm)
set(NORMGEN_FUSIONS
    "|activation=none residual=false|none|false"
    "relu|activation=relu residual=false|relu|false"
    "add|activation=none residual=true|none|true"
    "addrelu|activation=relu residual=true|relu|true")
# isa | architecture | Halide target (without no_runtime) | dtypes ("" = all) — baseline first
# within each architecture. neon_fp16 holds only f16 kernels: arm_fp16 lets Halide 14 convert
# f16 with fcvtl/fcvtn instead of emulating it with integer ops, and changes nothing else (the
# f32 and bf16 kernels' assembly is identical with and without it; arm_dot_prod changes no
# kernel at all, so it gets no build).
set(NORMGEN_X86_ISAS
    "sse41|x86-64|x86-64-linux-sse41|"
    "avx2|x86-64|x86-64-linux-sse41-avx-avx2-fma-f16c|"
    "avx512|x86-64|x86-64-linux-sse41-avx-avx2-fma-f16c-avx512-avx512_skylake|")
set(NORMGEN_ARM_ISAS
    "neon|arm-64|arm-64-linux|"
    "neon_fp16|arm-64|arm-64-linux-arm_fp16|f16")
set(NORMGEN_ISAS ${NORMGEN_X86_ISAS})
if (NORMGEN_AARCH64)
    list(APPEND NORMGEN_ISAS ${NORMGEN_ARM_ISAS})
endif ()
# CUDA: PTX for capability 8.0 (Ampere), the JIT input of every newer GPU too (Halide 14's newest
# capability is 8.6; sm_90 devices run the 8.0 PTX through the driver's JIT, and the tests
# assemble every kernel's PTX for sm_80 and sm_90 with ptxas). The host part is x86-64.
set(NORMGEN_CUDA_TARGETS
    "cuda_sm80|x86-64|x86-64-linux-cuda-cuda_capability_80|")
# Exact-shape kernels: by default plain f32 for the best x86 ISA (and the f32 kernels of the
# fusions in NORMGEN_SPECIALISED_FUSIONS); the full set specialises every dtype and fusion for
# every x86 ISA (none for arm-64: the qemu suite has no exact-shape tests). A fused kernel takes
# the knobs tuned for its plain variant's shape (the tuner times plain kernels only).
# Shape-class kernels: one per class entry of the ISA's tuned file
# (schedules/tuned/<arch>-<isa>.json), named <variant>_class_c<lo>to<hi>_s<lo>to<hi>.
set(NORMGEN_SPECIALISED_ISAS avx512)
set(NORMGEN_SPECIALISED_VARIANTS "f32|")
foreach (fusion IN LISTS NORMGEN_SPECIALISED_FUSIONS)
    if (NOT fusion MATCHES "^(relu|add|addrelu)$")
        message(FATAL_ERROR "NORMGEN_SPECIALISED_FUSIONS: '${fusion}' is not relu, add or addrelu")
    endif ()
    list(APPEND NORMGEN_SPECIALISED_VARIANTS "f32|${fusion}")
endforeach ()
if (NORMGEN_FULL_KERNELS)
    set(NORMGEN_SPECIALISED_ISAS sse41 avx2 avx512)
    set(NORMGEN_SPECIALISED_VARIANTS "")
    foreach (dtype IN LISTS NORMGEN_DTYPES)
        foreach (fusion_spec IN LISTS NORMGEN_FUSIONS)
            string(REPLACE "|" ";" fusion_fields "${fusion_spec}")
            list(GET fusion_fields 0 fusion)
            list(APPEND NORMGEN_SPECIALISED_VARIANTS "${dtype}|${fusion}")
        endforeach ()
    endforeach ()
endif ()

# Reads a shape file into canonical keys n<N>_c<C>_s<S> (S = product of the spatial extents).
function(normgen_read_shapes file out_var)
    file(STRINGS "${file}" lines)
    set(keys "")
    foreach (line IN LISTS lines)
        string(STRIP "${line}" line)
        if (line STREQUAL "" OR line MATCHES "^#")
            continue()
        endif ()
        string(REPLACE "x" ";" dims "${line}")
        list(LENGTH dims ndim)
        if (ndim LESS 2 OR ndim GREATER 5)
            message(FATAL_ERROR "${file}: shape '${line}' must have 2..5 extents")
        endif ()
        list(GET dims 0 n)
        list(GET dims 1 c)
        set(s 1)
        if (ndim GREATER 2)
            list(SUBLIST dims 2 -1 spatial)
            foreach (e IN LISTS spatial)
                math(EXPR s "${s} * ${e}")
            endforeach ()
        endif ()
        list(APPEND keys "n${n}_c${c}_s${s}")
    endforeach ()
    list(REMOVE_DUPLICATES keys)
    set(${out_var} "${keys}" PARENT_SCOPE)
endfunction()

set(NORMGEN_KERNEL_DIR "${CMAKE_BINARY_DIR}/kernels")
file(MAKE_DIRECTORY "${NORMGEN_KERNEL_DIR}" "${NORMGEN_PACKAGE_DIR}")
set(_manifest_entries "")
set(_emit object,c_header)
if (NORMGEN_EMIT_STMT)
    set(_emit object,c_header,stmt,assembly)
endif ()
normgen_read_shapes("${NORMGEN_SHAPES}" NORMGEN_SHAPE_KEYS)

# Reads the shape classes a tuned JSON file has entries for: "family|dtype|layout|class_key".
function(normgen_read_tuned_classes tuned out_var)
    set(classes "")
    if (tuned)
        # Re-configure when the tuned file changes: its classes are part of the variant table.
        set_property(DIRECTORY "${CMAKE_SOURCE_DIR}" APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS "${tuned}")
        file(READ "${tuned}" text)
        string(JSON count LENGTH "${text}" entries)
        if (count GREATER 0)
            math(EXPR last "${count} - 1")
            foreach (i RANGE ${last})
                string(JSON shape GET "${text}" entries ${i} shape)
                if (shape MATCHES "^class_c[0-9]+to([0-9]+|inf)_s[0-9]+to([0-9]+|inf)$")
                    string(JSON family GET "${text}" entries ${i} family)
                    string(JSON dtype GET "${text}" entries ${i} dtype)
                    string(JSON layout GET "${text}" entries ${i} layout)
                    list(APPEND classes "${family}|${dtype}|${layout}|${shape}")
                endif ()
            endforeach ()
        endif ()
    endif ()
    set(${out_var} "${classes}" PARENT_SCOPE)
endfunction()

# Runs the generator once: one object file holding one kernel function.
function(normgen_generate_kernel name family_spec variant_params layout target tuned shape kernel_dir out_object)
    string(REPLACE "|" ";" spec "${family_spec}")
    list(GET spec 1 generator)
    list(GET spec 2 params)
    set(object "${kernel_dir}/${name}.o")
    set(tuned_dep "")
    set(tuned_arg "")
    if (tuned)
        set(tuned_dep "${tuned}")
        set(tuned_arg "tuned=${tuned}")
    endif ()
    add_custom_command(
        OUTPUT "${object}"
        COMMAND normgen_generators -g ${generator} -f ${name} -n ${name} -e ${_emit}
                -o "${kernel_dir}" target=${target}-no_runtime
                ${params} ${variant_params} layout=${layout} shape=${shape} ${tuned_arg}
        DEPENDS normgen_generators ${tuned_dep}
        COMMENT "Generating kernel ${name}"
        VERBATIM)
    set(${out_object} "${object}" PARENT_SCOPE)
endfunction()

# Appends one manifest entry (a JSON object) to _manifest_entries in the caller's scope.
macro(normgen_manifest_entry name family_spec dtype activation residual layout isa arch device target shape file)
    string(REPLACE "|" ";" _spec "${family_spec}")
    list(GET _spec 3 _op)
    list(GET _spec 4 _stats)
    # Features are what follows arch-bits-os in the target string (none for a baseline such as
    # arm-64-linux).
    set(_features "")
    if ("${target}" MATCHES "^[^-]+-[^-]+-[^-]+-(.+)$")
        string(REPLACE "-" "\",\"" _features "\"${CMAKE_MATCH_1}\"")
    endif ()
    if ("${shape}" STREQUAL "generic")
        set(_shape "{\"kind\":\"generic\"}")
    elseif ("${shape}" MATCHES "^class_c([0-9]+)to([0-9]+|inf)_s([0-9]+)to([0-9]+|inf)$")
        set(_c_end "${CMAKE_MATCH_2}")
        set(_s_end "${CMAKE_MATCH_4}")
        if (_c_end STREQUAL "inf")
            set(_c_end null)
        endif ()
        if (_s_end STREQUAL "inf")
            set(_s_end null)
        endif ()
        set(_shape "{\"kind\":\"class\",\"c_min\":${CMAKE_MATCH_1},\"c_end\":${_c_end},\"s_min\":${CMAKE_MATCH_3},\"s_end\":${_s_end}}")
    else ()
        string(REGEX MATCH "n([0-9]+)_c([0-9]+)_s([0-9]+)" _m "${shape}")
        set(_shape "{\"kind\":\"exact\",\"n\":${CMAKE_MATCH_1},\"c\":${CMAKE_MATCH_2},\"s\":${CMAKE_MATCH_3}}")
    endif ()
    list(APPEND _manifest_entries
        "{\"name\":\"${name}\",\"op\":\"${_op}\",\"statistics\":\"${_stats}\",\"dtype\":\"${dtype}\",\"layout\":\"${layout}\",\"activation\":\"${activation}\",\"residual\":${residual},\"device\":\"${device}\",\"arch\":\"${arch}\",\"isa\":\"${isa}\",\"features\":[${_features}],\"target\":\"${target}\",\"shape\":${_shape},\"file\":\"${file}\",\"symbol\":\"${name}\"}")
endmacro()

# Generates every variant (family x dtype x fusion x layout, plus exact shapes where
# NORMGEN_SPECIALISED_* ask) for one target into lib<library>.so in package_dir, appending the
# manifest entries to manifest_var. extra_params go to every generator run; knobs are read from
# schedules/tuned/<tuned_stem>.json.
function(normgen_add_kernel_library isa arch device target dtypes package_dir extra_params
         tuned_stem manifest_var)
    set(_manifest_entries "${${manifest_var}}")
    set(tuned "${CMAKE_SOURCE_DIR}/schedules/tuned/${tuned_stem}.json")
    if (NOT EXISTS "${tuned}")
        set(tuned "")
    endif ()
    # Shape-class kernels: generic kernels scheduled with a tuned class's knobs.
    normgen_read_tuned_classes("${tuned}" tuned_classes)
    set(library "kernels_${arch}-${isa}")
    set(kernel_dir "${NORMGEN_KERNEL_DIR}")
    if (NOT package_dir STREQUAL NORMGEN_PACKAGE_DIR)
        get_filename_component(_package_name "${package_dir}" NAME)
        set(library "${_package_name}_${library}")
        set(kernel_dir "${NORMGEN_KERNEL_DIR}/${_package_name}")
        file(MAKE_DIRECTORY "${kernel_dir}")
    endif ()
    set(objects "")
    foreach (family_spec IN LISTS NORMGEN_FAMILIES)
        string(REPLACE "|" ";" spec "${family_spec}")
        list(GET spec 0 family)
        foreach (dtype IN LISTS dtypes)
        foreach (fusion_spec IN LISTS NORMGEN_FUSIONS)
            string(REPLACE "|" ";" fusion_fields "${fusion_spec}")
            list(GET fusion_fields 0 fusion)
            list(GET fusion_fields 1 fusion_params)
            list(GET fusion_fields 2 activation)
            list(GET fusion_fields 3 residual)
            separate_arguments(fusion_params)
            set(fusion_suffix "")
            if (fusion)
                set(fusion_suffix "_${fusion}")
            endif ()
            set(shapes generic)
            if (device STREQUAL "cpu" AND package_dir STREQUAL NORMGEN_PACKAGE_DIR AND
                isa IN_LIST NORMGEN_SPECIALISED_ISAS AND
                "${dtype}|${fusion}" IN_LIST NORMGEN_SPECIALISED_VARIANTS)
                list(APPEND shapes ${NORMGEN_SHAPE_KEYS})
            endif ()
            foreach (layout IN LISTS NORMGEN_LAYOUTS)
                set(layout_shapes ${shapes})
                if (fusion STREQUAL "")
                    foreach (tuned_class IN LISTS tuned_classes)
                        if (tuned_class MATCHES "^${family}\\|${dtype}\\|${layout}\\|(.*)$")
                            list(APPEND layout_shapes "${CMAKE_MATCH_1}")
                        endif ()
                    endforeach ()
                endif ()
                foreach (shape IN LISTS layout_shapes)
                    set(name "${family}_${dtype}_${layout}${fusion_suffix}_${isa}")
                    if (NOT shape STREQUAL "generic")
                        # With S = 1 both layouts are one memory layout; the runtime uses channels-last.
                        if (layout STREQUAL "contig" AND shape MATCHES "_s1$")
                            continue()
                        endif ()
                        set(name "${name}_${shape}")
                    endif ()
                    normgen_generate_kernel(${name} "${family_spec}"
                                            "dtype=${dtype};${fusion_params};${extra_params}"
                                            ${layout} ${target} "${tuned}" ${shape}
                                            "${kernel_dir}" object)
                    list(APPEND objects "${object}")
                    normgen_manifest_entry(${name} "${family_spec}" ${dtype} ${activation}
                                           ${residual} ${layout} ${isa} ${arch} ${device}
                                           ${target} ${shape} "lib${library}.so")
                endforeach ()
            endforeach ()
        endforeach ()
        endforeach ()
    endforeach ()
    if (device STREQUAL "cuda")
        # Running statistics live in device memory: the runtime updates them with this kernel.
        set(name "bn_running_stats_${isa}")
        add_custom_command(
            OUTPUT "${kernel_dir}/${name}.o"
            COMMAND normgen_generators -g batch_norm_running_stats -f ${name} -n ${name}
                    -e ${_emit} -o "${kernel_dir}" target=${target}-no_runtime
            DEPENDS normgen_generators
            COMMENT "Generating kernel ${name}"
            VERBATIM)
        list(APPEND objects "${kernel_dir}/${name}.o")
        normgen_manifest_entry(${name} "bn_running_stats|||running_stats|batch" f32 none false
                               any ${isa} ${arch} ${device} ${target} generic "lib${library}.so")
    endif ()
    if (arch STREQUAL NORMGEN_HOST_ARCH)
        set_source_files_properties(${objects} PROPERTIES EXTERNAL_OBJECT TRUE GENERATED TRUE)
        # Kernels carry no Halide runtime: they resolve halide_* from libnormgen, which holds
        # the one runtime of the process.
        add_library(${library} MODULE ${objects})
        set_target_properties(${library} PROPERTIES LINKER_LANGUAGE C
                              LIBRARY_OUTPUT_DIRECTORY "${package_dir}")
    else ()
        # Another architecture's kernels (AArch64): this project's compiler cannot link them,
        # the cross linker can. Listed in the manifest; only a runtime on that arch loads them.
        set(shared_object "${package_dir}/lib${library}.so")
        add_custom_command(
            OUTPUT "${shared_object}"
            COMMAND ${NORMGEN_LINKER_${arch}} -shared -o "${shared_object}" ${objects}
            DEPENDS ${objects}
            COMMENT "Linking ${arch} kernel library lib${library}.so"
            VERBATIM)
        add_custom_target(${library} DEPENDS "${shared_object}")
    endif ()
    set(NORMGEN_KERNEL_LIBRARIES ${NORMGEN_KERNEL_LIBRARIES} ${library} PARENT_SCOPE)
    set(${manifest_var} "${_manifest_entries}" PARENT_SCOPE)
endfunction()

# The package ABI version, from the one place the runtime reads it.
file(STRINGS "${CMAKE_CURRENT_LIST_DIR}/../runtime/include/normgen/normgen.h" _normgen_abi_line
     REGEX "^#define NG_ABI_VERSION [0-9]+")
string(REGEX REPLACE "^#define NG_ABI_VERSION ([0-9]+).*" "\\1" NORMGEN_ABI_VERSION "${_normgen_abi_line}")

# Writes package_dir/manifest.json listing the entries.
function(normgen_write_manifest package_dir entries)
    list(JOIN entries ",\n    " body)
    file(GENERATE OUTPUT "${package_dir}/manifest.json" CONTENT
"{
  \"format\": \"normgen-package\",
  \"abi_version\": ${NORMGEN_ABI_VERSION},
  \"generator\": \"normgen ${PROJECT_VERSION}, Halide ${Halide_VERSION}\",
  \"kernels\": [
    ${body}
  ]
}
")
endfunction()

set(NORMGEN_KERNEL_LIBRARIES "")
set(_package_entries "")
foreach (isa_spec IN LISTS NORMGEN_ISAS NORMGEN_CUDA_TARGETS)
    string(REPLACE "|" ";" isa_fields "${isa_spec}")
    list(GET isa_fields 0 isa)
    list(GET isa_fields 1 arch)
    list(GET isa_fields 2 target)
    list(GET isa_fields 3 isa_dtypes)
    if (NOT isa_dtypes)
        set(isa_dtypes ${NORMGEN_DTYPES})
    endif ()
    set(device cpu)
    if (target MATCHES "-cuda")
        set(device cuda)
    endif ()
    normgen_add_kernel_library(${isa} ${arch} ${device} ${target} "${isa_dtypes}"
                               "${NORMGEN_PACKAGE_DIR}" "" ${arch}-${isa} _package_entries)
endforeach ()
normgen_write_manifest("${NORMGEN_PACKAGE_DIR}" "${_package_entries}")

# A second package for the tests: the CUDA schedule emulated on the CPU (x86 baseline, same
# kernel names as the sse41 ones), so the test suite can check the CUDA schedule's reductions
# and tail handling against the reference without a GPU.
set(NORMGEN_CUDA_EMULATION_PACKAGE_DIR "${NORMGEN_LIB_DIR}/normgen-cuda-emulation-package")
file(MAKE_DIRECTORY "${NORMGEN_CUDA_EMULATION_PACKAGE_DIR}")
set(_emulation_entries "")
normgen_add_kernel_library(sse41 x86-64 cpu x86-64-linux-sse41 "${NORMGEN_DTYPES}"
                           "${NORMGEN_CUDA_EMULATION_PACKAGE_DIR}" "emulate_cuda=true"
                           x86-64-cuda_sm80 _emulation_entries)
normgen_write_manifest("${NORMGEN_CUDA_EMULATION_PACKAGE_DIR}" "${_emulation_entries}")
add_custom_target(normgen_package ALL DEPENDS ${NORMGEN_KERNEL_LIBRARIES})
