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
# isa | architecture | Halide target (without no_runtime) — ordered baseline first
set(NORMGEN_X86_ISAS
    "sse41|x86-64|x86-64-linux-sse41"
    "avx2|x86-64|x86-64-linux-sse41-avx-avx2-fma-f16c"
    "avx512|x86-64|x86-64-linux-sse41-avx-avx2-fma-f16c-avx512-avx512_skylake")
# Exact-shape kernels: by default plain f32 for the best x86 ISA; the full set specialises every
# dtype and fusion for every ISA. Shape-class kernels: one per class entry of the ISA's tuned
# file (schedules/tuned/<arch>-<isa>.json), named <variant>_class_c<lo>to<hi>_s<lo>to<hi>.
set(NORMGEN_SPECIALISED_ISAS avx512)
set(NORMGEN_SPECIALISED_VARIANTS "f32|")
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
function(normgen_generate_kernel name family_spec variant_params layout target tuned shape out_object)
    string(REPLACE "|" ";" spec "${family_spec}")
    list(GET spec 1 generator)
    list(GET spec 2 params)
    set(object "${NORMGEN_KERNEL_DIR}/${name}.o")
    set(tuned_dep "")
    set(tuned_arg "")
    if (tuned)
        set(tuned_dep "${tuned}")
        set(tuned_arg "tuned=${tuned}")
    endif ()
    add_custom_command(
        OUTPUT "${object}"
        COMMAND normgen_generators -g ${generator} -f ${name} -n ${name} -e ${_emit}
                -o "${NORMGEN_KERNEL_DIR}" target=${target}-no_runtime
                ${params} ${variant_params} layout=${layout} shape=${shape} ${tuned_arg}
        DEPENDS normgen_generators ${tuned_dep}
        COMMENT "Generating kernel ${name}"
        VERBATIM)
    set(${out_object} "${object}" PARENT_SCOPE)
endfunction()

# Appends one manifest entry (a JSON object) to _manifest_entries in the caller's scope.
macro(normgen_manifest_entry name family_spec dtype activation residual layout isa arch target shape file)
    string(REPLACE "|" ";" _spec "${family_spec}")
    list(GET _spec 3 _op)
    list(GET _spec 4 _stats)
    # Features are what follows arch-bits-os in the target string.
    string(REGEX MATCH "^[^-]+-[^-]+-[^-]+-(.*)$" _m "${target}")
    string(REPLACE "-" "\",\"" _features "${CMAKE_MATCH_1}")
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
        "{\"name\":\"${name}\",\"op\":\"${_op}\",\"statistics\":\"${_stats}\",\"dtype\":\"${dtype}\",\"layout\":\"${layout}\",\"activation\":\"${activation}\",\"residual\":${residual},\"device\":\"cpu\",\"arch\":\"${arch}\",\"isa\":\"${isa}\",\"features\":[\"${_features}\"],\"target\":\"${target}\",\"shape\":${_shape},\"file\":\"${file}\",\"symbol\":\"${name}\"}")
endmacro()

foreach (isa_spec IN LISTS NORMGEN_X86_ISAS)
    string(REPLACE "|" ";" isa_fields "${isa_spec}")
    list(GET isa_fields 0 isa)
    list(GET isa_fields 1 arch)
    list(GET isa_fields 2 target)
    set(tuned "${CMAKE_SOURCE_DIR}/schedules/tuned/${arch}-${isa}.json")
    if (NOT EXISTS "${tuned}")
        set(tuned "")
    endif ()
    # Shape-class kernels: generic kernels scheduled with a tuned class's knobs.
    normgen_read_tuned_classes("${tuned}" tuned_classes)
    set(library "kernels_${arch}-${isa}")
    set(objects "")
    foreach (family_spec IN LISTS NORMGEN_FAMILIES)
        string(REPLACE "|" ";" spec "${family_spec}")
        list(GET spec 0 family)
        foreach (dtype IN LISTS NORMGEN_DTYPES)
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
            if (isa IN_LIST NORMGEN_SPECIALISED_ISAS AND "${dtype}|${fusion}" IN_LIST NORMGEN_SPECIALISED_VARIANTS)
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
                                            "dtype=${dtype};${fusion_params}" ${layout} ${target}
                                            "${tuned}" ${shape} object)
                    list(APPEND objects "${object}")
                    normgen_manifest_entry(${name} "${family_spec}" ${dtype} ${activation}
                                           ${residual} ${layout} ${isa} ${arch} ${target} ${shape}
                                           "lib${library}.so")
                endforeach ()
            endforeach ()
        endforeach ()
        endforeach ()
    endforeach ()
    set_source_files_properties(${objects} PROPERTIES EXTERNAL_OBJECT TRUE GENERATED TRUE)
    # Kernels carry no Halide runtime: they resolve halide_* from libnormgen, which holds the
    # one runtime of the process.
    add_library(${library} MODULE ${objects})
    set_target_properties(${library} PROPERTIES LINKER_LANGUAGE C
                          LIBRARY_OUTPUT_DIRECTORY "${NORMGEN_PACKAGE_DIR}")
    list(APPEND NORMGEN_KERNEL_LIBRARIES ${library})
endforeach ()

list(JOIN _manifest_entries ",\n    " _manifest_body)
file(GENERATE OUTPUT "${NORMGEN_PACKAGE_DIR}/manifest.json" CONTENT
"{
  \"format\": \"normgen-package\",
  \"abi_version\": 1,
  \"generator\": \"normgen ${PROJECT_VERSION}, Halide ${Halide_VERSION}\",
  \"kernels\": [
    ${_manifest_body}
  ]
}
")
add_custom_target(normgen_package ALL DEPENDS ${NORMGEN_KERNEL_LIBRARIES})
