// oneDNN 2.6 batch normalization: primitives, memory objects (over our own buffers) and a
// user-mode scratchpad are all created once here, so a timed call is one execute() per primitive.
//
// Fused forms. BN+ReLU: batch normalization with normalization_flags::fuse_norm_relu, whose
// training forward writes a workspace (the ReLU mask) that its backward reads. BN+add+ReLU has
// no fused primitive; the sequence a framework would run, in place on y:
//   forward:  batch_normalization (x -> y) -> binary add (y + z -> y) -> eltwise relu (y -> y)
//             (training: eltwise_relu_use_dst_for_bwd, so the backward needs only y)
//   backward: eltwise_backward relu (dy, y_saved -> g) -> batch_normalization_backward (g -> dx)
//             with g = dz: the add's gradient is the identity.
// y_saved is the forward's output kept aside once, untimed (a framework keeps it for the
// backward). NORMGEN_BENCH_ONEDNN_POSTOP=1 runs the add with a ReLU post-op instead of the
// separate eltwise (one primitive and one pass fewer): not in the published runs, which time the
// sequence above, but there to see what a framework's binary fusion would gain.
//
// oneDNN is stateless: forward training writes the batch mean and (biased) variance but does not
// update running statistics (a framework does that, O(C) work); backward takes the variance,
// not 1/sqrt(var + eps), so it consumes its own forward's outputs.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <list>
#include <map>
#include <oneapi/dnnl/dnnl.hpp>
#include <string>

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

        auto affine = flags::use_scale | flags::use_shift;
        if (p.relu() && !p.residual()) affine = affine | flags::fuse_norm_relu;
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
        auto buffer = [&](const memory::desc &md) {  // a preallocated buffer for md
            buffers_.emplace_back((md.get_size() + sizeof(float) - 1) / sizeof(float));
            return memory(md, eng_, buffers_.back().data());
        };
        const memory x = mem(data_md, in.x.data()), y = mem(data_md, y_.data());
        const memory scale = mem(c_md, in.weight.data()), shift = mem(c_md, in.bias.data());
        const memory mean = mem(c_md, mean_.data()), var = mem(c_md, variance_.data());
        // fuse_norm_relu: the training forward writes the workspace the backward reads.
        const memory workspace =
            train_pd.workspace_desc().get_size() > 0 ? buffer(train_pd.workspace_desc()) : memory();
        if (workspace) workspace_ = {buffers_.back().data(), int64_t(buffers_.back().size())};
        Args train_args = {{DNNL_ARG_SRC, x},       {DNNL_ARG_DST, y},
                           {DNNL_ARG_SCALE, scale}, {DNNL_ARG_SHIFT, shift},
                           {DNNL_ARG_MEAN, mean},   {DNNL_ARG_VARIANCE, var}};
        if (workspace) train_args.emplace(DNNL_ARG_WORKSPACE, workspace);
        add(Op::fwd_train, fwd(train_pd), train_pd, train_args);
        add(Op::fwd_infer, fwd(infer_pd), infer_pd,
            {{DNNL_ARG_SRC, x},
             {DNNL_ARG_DST, y},
             {DNNL_ARG_SCALE, scale},
             {DNNL_ARG_SHIFT, shift},
             {DNNL_ARG_MEAN, mem(c_md, running_mean_.data())},
             {DNNL_ARG_VARIANCE, mem(c_md, running_var_.data())}});
        if (p.residual()) {  // y += z; y = relu(y), in place
            using binary = dnnl::binary;
            using eltwise = dnnl::eltwise_forward;
            const binary::primitive_desc add_pd(
                binary::desc(dnnl::algorithm::binary_add, data_md, data_md, data_md), attr, eng_);
            const eltwise::primitive_desc relu_train_pd(
                eltwise::desc(dnnl::prop_kind::forward_training,
                              dnnl::algorithm::eltwise_relu_use_dst_for_bwd, data_md, 0.f, 0.f),
                attr, eng_);
            const eltwise::primitive_desc relu_infer_pd(
                eltwise::desc(dnnl::prop_kind::forward_inference, dnnl::algorithm::eltwise_relu,
                              data_md, 0.f, 0.f),
                attr, eng_);
            const Args add_args = {{DNNL_ARG_SRC_0, y},
                                   {DNNL_ARG_SRC_1, mem(data_md, in.z.data())},
                                   {DNNL_ARG_DST, y}};
            // NORMGEN_BENCH_ONEDNN_POSTOP=1: the add with a ReLU post-op instead (one primitive,
            // one pass fewer), to see how much a framework's binary fusion would gain.
            const char *postop = std::getenv("NORMGEN_BENCH_ONEDNN_POSTOP");
            if (postop && std::string(postop) == "1") {
                dnnl::post_ops relu;
                relu.append_eltwise(1.f, dnnl::algorithm::eltwise_relu, 0.f, 0.f);
                dnnl::primitive_attr add_attr;  // not a copy of attr: handles share the object
                add_attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
                add_attr.set_post_ops(relu);
                const binary::primitive_desc add_relu_pd(
                    binary::desc(dnnl::algorithm::binary_add, data_md, data_md, data_md), add_attr,
                    eng_);
                for (Op op : {Op::fwd_train, Op::fwd_infer}) {
                    add(op, binary(add_relu_pd), add_relu_pd, add_args);
                    kernel_[int(op)] += "(+relu post-op)";
                }
            } else {
                for (Op op : {Op::fwd_train, Op::fwd_infer}) {
                    add(op, binary(add_pd), add_pd, add_args);
                    const auto &relu_pd = op == Op::fwd_train ? relu_train_pd : relu_infer_pd;
                    add(op, eltwise(relu_pd), relu_pd, {{DNNL_ARG_SRC, y}, {DNNL_ARG_DST, y}});
                }
            }
            // Backward: g = dy where y > 0 (into dz), then BatchNorm's backward of g.
            y_saved_ = Buffer(p.numel());
            const eltwise_bwd_pd relu_bwd_pd(
                dnnl::eltwise_backward::desc(dnnl::algorithm::eltwise_relu_use_dst_for_bwd, data_md,
                                             data_md, 0.f, 0.f),
                attr, eng_, relu_train_pd);
            const memory g = mem(data_md, dz_.data());
            add(Op::bwd_train, dnnl::eltwise_backward(relu_bwd_pd), relu_bwd_pd,
                {{DNNL_ARG_DIFF_DST, mem(data_md, in.dy.data())},
                 {DNNL_ARG_DST, mem(data_md, y_saved_.data())},
                 {DNNL_ARG_DIFF_SRC, g}});
            add_bwd(bwd_pd, x, g, mean, var, scale, shift, workspace);
        } else {
            add_bwd(bwd_pd, x, mem(data_md, in.dy.data()), mean, var, scale, shift, workspace);
        }
    }

    std::string unavailable(Op) const override { return ""; }
    std::string kernel(Op op) const override { return kernel_[int(op)]; }
    void run(Op op) override {
        for (Step &step : steps_[int(op)]) step.prim.execute(stream_, step.args);
        stream_.wait();
    }
    std::vector<std::pair<const float *, int64_t>> internal_tensors(Op op) const override {
        std::vector<std::pair<const float *, int64_t>> out;
        if (op != Op::fwd_infer && workspace_.first) out.push_back(workspace_);
        if (op == Op::bwd_train && y_saved_.data())
            out.push_back({y_saved_.data(), problem_.numel()});
        return out;
    }
    void reset_running_stats() override {
        for (int64_t c = 0; c < problem_.c(); c++) {
            running_mean_[c] = in_.running_mean[c];
            running_var_[c] = in_.running_var[c];
        }
    }

protected:
    void forward_train_done() override {
        if (y_saved_.data())
            std::memcpy(y_saved_.data(), y_.data(), problem_.numel() * sizeof(float));
    }

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

    using Args = std::unordered_map<int, memory>;
    using eltwise_bwd_pd = dnnl::eltwise_backward::primitive_desc;
    struct Step {
        dnnl::primitive prim;
        Args args;
    };

    // Appends one primitive to op's sequence, with its own preallocated scratchpad.
    void add(Op op, const dnnl::primitive &prim, const dnnl::primitive_desc &pd, Args args) {
        const int i = int(op);
        kernel_[i] += (kernel_[i].empty() ? "" : " -> ") + std::string(pd.impl_info_str());
        const memory::desc scratch = pd.scratchpad_desc();
        if (scratch.get_size() > 0) {
            buffers_.emplace_back((scratch.get_size() + sizeof(float) - 1) / sizeof(float));
            args.emplace(DNNL_ARG_SCRATCHPAD, memory(scratch, eng_, buffers_.back().data()));
        }
        steps_[i].push_back({prim, std::move(args)});
    }

    void add_bwd(const dnnl::batch_normalization_backward::primitive_desc &pd, const memory &x,
                 const memory &diff_dst, const memory &mean, const memory &var, const memory &scale,
                 const memory &shift, const memory &workspace) {
        const memory::desc &data_md = x.get_desc();
        const memory::desc c_md = mean.get_desc();
        Args args = {{DNNL_ARG_SRC, x},
                     {DNNL_ARG_DIFF_DST, diff_dst},
                     {DNNL_ARG_MEAN, mean},
                     {DNNL_ARG_VARIANCE, var},
                     {DNNL_ARG_SCALE, scale},
                     {DNNL_ARG_SHIFT, shift},  // 2.6's backward asks for it (ReLU: the mask)
                     {DNNL_ARG_DIFF_SRC, memory(data_md, eng_, dx_.data())},
                     {DNNL_ARG_DIFF_SCALE, memory(c_md, eng_, dscale_.data())},
                     {DNNL_ARG_DIFF_SHIFT, memory(c_md, eng_, dshift_.data())}};
        if (workspace) args.emplace(DNNL_ARG_WORKSPACE, workspace);
        add(Op::bwd_train, dnnl::batch_normalization_backward(pd), pd, std::move(args));
    }

    dnnl::engine eng_;
    dnnl::stream stream_;
    Buffer mean_, variance_, running_mean_, running_var_, dscale_, dshift_;
    std::list<Buffer> buffers_;  // scratchpads and the workspace (a list: stable addresses)
    std::pair<const float *, int64_t> workspace_{nullptr, 0};
    Buffer y_saved_;
    std::vector<Step> steps_[3];
    std::string kernel_[3];
};

}  // namespace

std::unique_ptr<Impl> make_onednn(const Problem &p, const Inputs &in) {
    return std::make_unique<OnednnImpl>(p, in);
}

}  // namespace bench
