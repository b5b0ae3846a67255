# Runs the generator for the Halide runtime the kernels of one target architecture share (they
# are generated with no_runtime); out_object is its object file, a rule of the calling folder.
function(normgen_generate_halide_runtime name target out_dir out_object)
    set(object "${out_dir}/${name}.o")
    add_custom_command(
        OUTPUT "${object}"
        COMMAND normgen_generators -r ${name} -e object -o "${out_dir}" target=${target}
        DEPENDS normgen_generators
        COMMENT "Generating the shared Halide runtime for ${target}"
        VERBATIM)
    set(${out_object} "${object}" PARENT_SCOPE)
endfunction()
