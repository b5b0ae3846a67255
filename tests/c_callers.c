/* Calls into the C API as C code does: the header compiles as C, and enum arguments may hold
 * any int (valid C, undefined behaviour if a C++ test converted an out-of-range int itself). */
#include <normgen/normgen.h>

ng_status c_plan_create_with_op(ng_runtime *runtime, int op, const ng_tensor *x,
                                const ng_batch_norm_params *params, ng_plan **out_plan) {
    return ng_plan_create(runtime, (ng_op)op, x, params, out_plan);
}

const char *c_status_name(int status) { return ng_status_name((ng_status)status); }
