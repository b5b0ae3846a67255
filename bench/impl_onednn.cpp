// oneDNN 2.6 batch normalization: primitives, memory objects (over our own buffers) and a
// user-mode scratchpad are all created once here, so a timed call is one execute().
//
// oneDNN is stateless: forward training writes the batch mean and (biased) variance but does not
// update running statistics (a framework does that, O(C) work); backward takes the variance,
// not 1/sqrt(var + eps), so it consumes its own forward's outputs.
#include <cmath>
#include <map>
#include <oneapi/dnnl/dnnl.hpp>

#include "bench_common.h"

namespace bench {
namespace {

using dnnl::memory;
using tag = dnnl::memory::format_tag;
using flags = dnnl::normalization_flags;

class OnednnImpl final : public Impl {
public:
    OnednnImpl(const Problem &p, const Inputs &in)
        : Impl(p, in),
          eng_(dnnl::engine::kind::cpu, 0),
          stream_(eng_),
          mean_(p.c()),
          variance_(p.c()),
          running_mean_(p.c()),
          running_var_(p.c()),
          dscale_(p.c()),
          dshift_(p.c()) {
        // (N, C): oneDNN 2.6 sends 'nc' to its generic ncsp_bnorm:any (about 100x slower than
        // its JIT kernel here), so describe the same memory as (N, C, 1, 1) nhwc.
        memory::dims dims(p.dims.begin(), p.dims.end());
        if (dims.size() == 2) dims = {p.n(), p.c(), 1, 1};
        const tag data_tag = dims.size() == 4 && p.dims.size() == 2 ? tag::nhwc : data_format(p);
        const memory::desc data_md(dims, memory::data_type::f32, data_tag);
        const memory::desc c_md({p.c()}, memory::data_type::f32, tag::a);
        dnnl::primitive_attr attr;
        attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);  // no allocation inside execute()

        const auto affine = flags::use_scale | flags::use_shift;
        using fwd = dnnl::batch_normalization_forward;
        using bwd = dnnl::batch_normalization_backward;
        const fwd::primitive_desc train_pd(
            fwd::desc(dnnl::prop_kind::forward_training, data_md, float(kEps), affine), attr, eng_);
        const fwd::primitive_desc infer_pd(fwd::desc(dnnl::prop_kind::forward_inference, data_md,
                                                     float(kEps), affine | flags::use_global_stats),
                                           attr, eng_);
        const bwd::primitive_desc bwd_pd(
            bwd::desc(dnnl::prop_kind::backward, data_md, data_md, float(kEps), affine), attr, eng_,
            train_pd);

        auto mem = [&](const memory::desc &md, const float *ptr) {
            return memory(md, eng_, const_cast<float *>(ptr));
        };
        const memory x = mem(data_md, in.x.data()), y = mem(data_md, y_.data());
        const memory scale = mem(c_md, in.weight.data()), shift = mem(c_md, in.bias.data());
        const memory mean = mem(c_md, mean_.data()), var = mem(c_md, variance_.data());
        setup(Op::fwd_train, train_pd, train_pd.scratchpad_desc(), train_pd.workspace_desc(),
              {{DNNL_ARG_SRC, x},
               {DNNL_ARG_DST, y},
               {DNNL_ARG_SCALE, scale},
               {DNNL_ARG_SHIFT, shift},
               {DNNL_ARG_MEAN, mean},
               {DNNL_ARG_VARIANCE, var}});
        setup(Op::fwd_infer, infer_pd, infer_pd.scratchpad_desc(), infer_pd.workspace_desc(),
              {{DNNL_ARG_SRC, x},
               {DNNL_ARG_DST, y},
               {DNNL_ARG_SCALE, scale},
               {DNNL_ARG_SHIFT, shift},
               {DNNL_ARG_MEAN, mem(c_md, running_mean_.data())},
               {DNNL_ARG_VARIANCE, mem(c_md, running_var_.data())}});
        setup(Op::bwd_train, bwd_pd, bwd_pd.scratchpad_desc(), bwd_pd.workspace_desc(),
              {{DNNL_ARG_SRC, x},
               {DNNL_ARG_DIFF_DST, mem(data_md, in.dy.data())},
               {DNNL_ARG_MEAN, mean},
               {DNNL_ARG_VARIANCE, var},
               {DNNL_ARG_SCALE, scale},
               {DNNL_ARG_SHIFT, shift},  // 2.6's backward asks for it (unused without ReLU)
               {DNNL_ARG_DIFF_SRC, mem(data_md, dx_.data())},
               {DNNL_ARG_DIFF_SCALE, mem(c_md, dscale_.data())},
               {DNNL_ARG_DIFF_SHIFT, mem(c_md, dshift_.data())}});
        prims_[int(Op::fwd_train)] = fwd(train_pd);
        prims_[int(Op::fwd_infer)] = fwd(infer_pd);
        prims_[int(Op::bwd_train)] = bwd(bwd_pd);
    }

    std::string unavailable(Op) const override { return ""; }
    std::string kernel(Op op) const override { return kernel_[int(op)]; }
    void run(Op op) override {
        prims_[int(op)].execute(stream_, args_[int(op)]);
        stream_.wait();
    }
    void reset_running_stats() override {
        for (int64_t c = 0; c < problem_.c(); c++) {
            running_mean_[c] = in_.running_mean[c];
            running_var_[c] = in_.running_var[c];
        }
    }

protected:
    void collect(Outputs &out) const override {
        const int64_t C = problem_.c();
        if (out.y_train) {
            out.save_mean.assign(mean_.data(), mean_.data() + C);
            out.save_invstd.resize(C);
            for (int64_t c = 0; c < C; c++)
                out.save_invstd[c] = float(1.0 / std::sqrt(double(variance_[c]) + kEps));
        }
        if (out.dx) {
            out.dweight.assign(dscale_.data(), dscale_.data() + C);
            out.dbias.assign(dshift_.data(), dshift_.data() + C);
        }
    }

private:
    // nc(d)(h)w or n(d)(h)wc (2-D inputs are handled by the caller).
    static tag data_format(const Problem &p) {
        static const tag contig[] = {tag::undef, tag::undef, tag::nc,
                                     tag::ncw,   tag::nchw,  tag::ncdhw};
        static const tag last[] = {tag::undef, tag::undef, tag::nc,
                                   tag::nwc,   tag::nhwc,  tag::ndhwc};
        return (p.format == Format::contig ? contig : last)[p.dims.size()];
    }

    void setup(Op op, const dnnl::primitive_desc &pd, const memory::desc &scratch,
               const memory::desc &workspace, std::unordered_map<int, memory> args) {
        const int i = int(op);
        kernel_[i] = pd.impl_info_str();
        if (scratch.get_size() > 0) {
            scratch_[i] = Buffer((scratch.get_size() + sizeof(float) - 1) / sizeof(float));
            args.emplace(DNNL_ARG_SCRATCHPAD, memory(scratch, eng_, scratch_[i].data()));
        }
        if (workspace.get_size() > 0) {
            workspace_[i] = Buffer((workspace.get_size() + sizeof(float) - 1) / sizeof(float));
            args.emplace(DNNL_ARG_WORKSPACE, memory(workspace, eng_, workspace_[i].data()));
        }
        args_[i] = std::move(args);
    }

    dnnl::engine eng_;
    dnnl::stream stream_;
    Buffer mean_, variance_, running_mean_, running_var_, dscale_, dshift_;
    Buffer scratch_[3], workspace_[3];
    dnnl::primitive prims_[3];
    std::unordered_map<int, memory> args_[3];
    std::string kernel_[3];
};

}  // namespace

std::unique_ptr<Impl> make_onednn(const Problem &p, const Inputs &in) {
    return std::make_unique<OnednnImpl>(p, in);
}

}  // namespace bench
