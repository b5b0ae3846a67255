/* Calls into the C API as C code does: the header compiles as C, and enum arguments may hold
 * any int (valid C, undefined behaviour if a C++ test converted an out-of-range int itself). */
#include <normgen/normgen.h>

ng_status c_plan_create_with_op(ng_runtime *runtime, int op, const ng_tensor *x,
                                const ng_batch_norm_params *params, ng_plan **out_plan) {
    return ng_plan_create(runtime, (ng_op)op, x, params, out_plan);
}

const char *c_status_name(int status) { return ng_status_name((ng_status)status); }

/* ng_plan_create with the tensor's dtype and the parameters' activation and residual stored as
 * a C caller may store them: any int. */
ng_status c_plan_create_with_fields(ng_runtime *runtime, int op, const ng_tensor *x, int dtype,
                                    const ng_batch_norm_params *params, int activation,
                                    int residual, ng_plan **out_plan) {
    ng_tensor t = *x;
    ng_batch_norm_params p = *params;
    t.dtype = (ng_dtype)dtype;
    p.activation = (ng_activation)activation;
    p.residual = residual;
    return ng_plan_create(runtime, (ng_op)op, &t, &p, out_plan);
}
