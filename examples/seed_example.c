/* The seed example through normgen's C API: torch.nn.BatchNorm1d(4) in training mode on
 * [[1,2,3,4],[2,3,4,5],[3,4,5,6]]. PyTorch prints rows of -1.2247, 0, 1.2247, running_mean
 * [0.2, 0.3, 0.4, 0.5] and running_var [1, 1, 1, 1]; so must this.
 *   build/bin/seed_example [package_dir] */
#include <normgen/normgen.h>

#include <stdio.h>

#define CHECK(call)                                                                    \
    do {                                                                               \
        ng_status status_ = (call);                                                    \
        if (status_ != NG_OK) {                                                        \
            fprintf(stderr, "%s failed: %s: %s\n", #call, ng_status_name(status_),     \
                    ng_last_error());                                                  \
            return 1;                                                                  \
        }                                                                              \
    } while (0)

int main(int argc, char **argv) {
    float x[3][4] = {{1, 2, 3, 4}, {2, 3, 4, 5}, {3, 4, 5, 6}}, y[3][4];
    float weight[4] = {1, 1, 1, 1}, bias[4] = {0, 0, 0, 0};
    float running_mean[4] = {0, 0, 0, 0}, running_var[4] = {1, 1, 1, 1};
    float save_mean[4], save_invstd[4];
    int64_t num_batches_tracked = 0;

    ng_runtime *rt;
    CHECK(ng_runtime_open(argc > 1 ? argv[1] : NULL, &rt));
    ng_tensor desc = {2, {3, 4}, NG_CONTIGUOUS, NG_F32, NG_CPU};
    ng_batch_norm_params params = ng_batch_norm_params_default(); /* eps 1e-5, momentum 0.1 */
    ng_plan *plan;
    CHECK(ng_plan_create(rt, NG_OP_FORWARD, &desc, &params, &plan));
    printf("kernel: %s\n", ng_plan_describe(plan));
    CHECK(ng_batch_norm_forward(plan, x, NULL, y, weight, bias, running_mean, running_var,
                                &num_batches_tracked, save_mean, save_invstd));

    printf("y =\n");
    for (int n = 0; n < 3; n++)
        printf("  [% .4f, % .4f, % .4f, % .4f]\n", y[n][0], y[n][1], y[n][2], y[n][3]);
    printf("running_mean = [%.4f, %.4f, %.4f, %.4f]\n", running_mean[0], running_mean[1],
           running_mean[2], running_mean[3]);
    printf("running_var  = [%.4f, %.4f, %.4f, %.4f]\n", running_var[0], running_var[1],
           running_var[2], running_var[3]);
    printf("num_batches_tracked = %lld\n", (long long)num_batches_tracked);
    ng_plan_destroy(plan);
    ng_runtime_close(rt);
    return 0;
}
