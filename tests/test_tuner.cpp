// The tuner's safety net: a candidate kernel is timed only after it matched the float64
// reference, so a wrong candidate must be rejected. Builds two real candidates with the
// generator (about a second each): a correct one, and a deliberately wrong one (generated with
// a fused ReLU but offered as plain BatchNorm: a plausible build mistake), plus tampered
// outputs of a correct one; the same with float32 row blocks; and checks the shape-class buckets
// tuned entries are keyed by.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cfloat>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <tuple>

#include "../tools/tune/tune_core.h"
#include "../tools/tune/tuned_entries.h"

namespace normgen::tune {
namespace {

BuildTools tools() {
    return {NORMGEN_GENERATOR_EXE, NORMGEN_CXX,
            "/tmp/normgen-test-tuner-" + std::to_string(getpid())};
}

const Task kFwdTrain{"bn_fwd_train", "contig"};

TEST(Tuner, CorrectCandidatePassesTheReferenceCheck) {
    auto cand = Candidate::build(tools(), kFwdTrain, isa_target(best_host_isa()), CpuKnobs{});
    EXPECT_EQ(check_candidate(*cand, kFwdTrain, check_shapes()), "");
    const Task cl_bwd{"bn_bwd_train", "cl"};
    CpuKnobs knobs;
    knobs.vectors = 2;
    knobs.task_elements = 4096;
    auto bwd = Candidate::build(tools(), cl_bwd, isa_target(best_host_isa()), knobs);
    EXPECT_EQ(check_candidate(*bwd, cl_bwd, check_shapes()), "");
}

TEST(Tuner, WrongCandidateIsRejected) {
    // The generator's activation=relu makes y = max(bn(x), 0): wrong for plain BatchNorm
    // wherever bn(x) < 0, i.e. about half of the elements.
    auto wrong = Candidate::build(tools(), kFwdTrain, isa_target(best_host_isa()), CpuKnobs{},
                                  {"activation=relu"});
    const std::string why = check_candidate(*wrong, kFwdTrain, check_shapes());
    EXPECT_NE(why.find("y["), std::string::npos) << "rejection reason: '" << why << "'";
}

TEST(Tuner, TamperedOutputIsRejected) {
    auto cand = Candidate::build(tools(), kFwdTrain, isa_target(best_host_isa()), CpuKnobs{});
    const Shape shape = Shape::from_dims({2, 37, 29});
    Workload w(kFwdTrain, shape, 5);
    ng_plan *plan = make_plan(cand->runtime(), w, kFwdTrain);
    w.run(plan);
    ng_plan_destroy(plan);
    ASSERT_EQ(w.compare_with_reference(), "");
    // One element off by 1e-4 (of values of order 1): 10x the tolerance, far above fp32 error.
    w.y_or_dx()[shape.elements() / 2] += 1e-4f;
    EXPECT_NE(w.compare_with_reference(), "");
}

// prefetch_next_channel adds loads of the next channel whose bits are masked by a runtime zero:
// the kernel must change (it takes opaque_zero) and its results must not, to the bit.
TEST(Tuner, PrefetchNextChannelChangesNoResultBit) {
    for (const Task &task : {kFwdTrain, Task{"bn_bwd_train", "contig"}}) {
        CpuKnobs off, on;
        off.prefetch_next_channel = false;
        on.prefetch_next_channel = true;
        off.vectors = on.vectors = 2;
        auto plain = Candidate::build(tools(), task, isa_target(best_host_isa()), off);
        auto prefetching = Candidate::build(tools(), task, isa_target(best_host_isa()), on);
        auto takes_opaque_zero = [](const Candidate &c) {
            std::ifstream lib(c.dir() + "/libcandidate.so", std::ios::binary);
            const std::string bytes((std::istreambuf_iterator<char>(lib)), {});
            return bytes.find("opaque_zero") != std::string::npos;
        };
        EXPECT_FALSE(takes_opaque_zero(*plain)) << task.key();
        EXPECT_TRUE(takes_opaque_zero(*prefetching)) << task.key();
        for (const Shape &shape : check_shapes()) {
            Workload a(task, shape, 11), b(task, shape, 11);
            for (auto [cand, w] : {std::pair{plain.get(), &a}, std::pair{prefetching.get(), &b}}) {
                ng_plan *plan = make_plan(cand->runtime(), *w, task);
                w->run(plan);
                ng_plan_destroy(plan);
                EXPECT_EQ(w->compare_with_reference(), "") << task.key() << " " << shape.text();
            }
            EXPECT_EQ(std::memcmp(a.y_or_dx(), b.y_or_dx(), shape.elements() * sizeof(float)), 0)
                << task.key() << " " << shape.text();
        }
    }
}

// batch_outer: contiguous blocks visited row by row, statistics over the block (training),
// (n, block) tasks (inference); with blocks that do not divide C, float32 row blocks, and the
// fused residual backward's dz beside dx.
TEST(Tuner, BatchOuterCandidatesPassTheReferenceCheck) {
    for (const Task &task :
         {kFwdTrain, Task{"bn_fwd_infer", "contig"}, Task{"bn_bwd_train", "contig"}})
        for (int channels : {1, 3})
            for (int rows : {1, 8}) {
                if (!task.training() && rows > 1) continue;
                CpuKnobs k;
                k.batch_outer = true;
                k.channels_per_task = channels;
                k.float32_stat_rows = rows;
                auto cand = Candidate::build(tools(), task, isa_target(best_host_isa()), k);
                EXPECT_EQ(check_candidate(*cand, task, check_shapes()), "")
                    << task.key() << " " << k.to_string();
            }
}

// streaming_stores: the output's vector stores become non-temporal; the kernel takes the marker
// argument streaming_output, runs only where the output's rows are 64-byte multiples (the plan
// passes it over elsewhere), and computes the same bits.
TEST(Tuner, StreamingStoresChangeNoResultBit) {
    for (const Task &task :
         {Task{"bn_fwd_infer", "cl"}, Task{"bn_fwd_infer", "contig"}, kFwdTrain,
          Task{"bn_fwd_train", "cl"}, Task{"bn_bwd_train", "contig"}, Task{"bn_bwd_train", "cl"}}) {
        CpuKnobs off, on;
        on.streaming_stores = true;
        off.vectors = on.vectors = 2;  // rows of 3 vectors: a tail of one (scalar) vector
        auto plain = Candidate::build(tools(), task, isa_target(best_host_isa()), off);
        auto streaming = Candidate::build(tools(), task, isa_target(best_host_isa()), on);
        int ran = 0;
        for (const Shape &shape : check_shapes(true)) {
            Workload a(task, shape, 11), b(task, shape, 11);
            ng_plan *plan = nullptr;
            const ng_tensor x = b.tensor();
            const ng_batch_norm_params params = b.params();
            const ng_status st = ng_plan_create(streaming->runtime(),
                                                task.backward() ? NG_OP_BACKWARD : NG_OP_FORWARD,
                                                &x, &params, &plan);
            if (!knobs_run_on(on, task, shape)) {
                EXPECT_EQ(st, NG_NO_KERNEL) << task.key() << " " << shape.text();
                EXPECT_NE(std::string(ng_last_error()).find("streaming stores need rows"),
                          std::string::npos)
                    << ng_last_error();
                continue;
            }
            ASSERT_EQ(st, NG_OK) << ng_last_error();
            EXPECT_NE(std::string(ng_plan_describe(plan)).find("streaming stores"),
                      std::string::npos);
            b.run(plan);
            ng_plan_destroy(plan);
            plan = make_plan(plain->runtime(), a, task);
            a.run(plan);
            ng_plan_destroy(plan);
            EXPECT_EQ(b.compare_with_reference(), "") << task.key() << " " << shape.text();
            EXPECT_EQ(std::memcmp(a.y_or_dx(), b.y_or_dx(), shape.elements() * sizeof(float)), 0)
                << task.key() << " " << shape.text();
            ran++;
        }
        EXPECT_EQ(ran, 3) << task.key();
    }
}

// flat_block_rows: an exact contiguous kernel takes its tensors flat, (C*S, 1, N), and writes a
// block's row as one run of vectors across its channels (S = 49: without the knob each channel's
// row ends in a one-lane vector; 16 channels make 49 whole cache lines, streamed): every output
// passes the reference check, and y or dx agrees with the kernel without the knob to a few
// roundings. A generic kernel ignores the knob.
TEST(Tuner, FlatBlockRowsPassTheCheck) {
    const IsaTarget isa = isa_target(best_host_isa());
    const std::vector<Task> tasks = {kFwdTrain, Task{"bn_fwd_infer", "contig"},
                                     Task{"bn_bwd_train", "contig"}};
    // 3 blocks of 16 channels; blocks of 32 (which do not divide 48: the kernel takes 16, the
    // largest divisor of 48 dividing 32) and of 64 on 32 channels (wider than C: one of 32).
    // Halide 14 lets a partial flat block write a whole block's run, past the row's end; the
    // reference check's guard region behind the output catches that.
    const struct {
        Shape shape;
        int channels_per_task;
    } cases[] = {{Shape::from_dims({5, 48, 7, 7}), 16},
                 {Shape::from_dims({5, 48, 7, 7}), 32},
                 {Shape::from_dims({8, 32, 8, 8}), 64}};
    for (const auto &[shape, channels_per_task] : cases)
        for (const Task &task : tasks) {
            SCOPED_TRACE(task.key() + " " + shape.text() + " channels_per_task " +
                         std::to_string(channels_per_task));
            CpuKnobs blocked;
            blocked.batch_outer = true;
            blocked.channels_per_task = channels_per_task;
            blocked.float32_stat_rows = task.training() ? 2 : 1;  // N = 5: a block of one row too
            CpuKnobs flat = blocked;
            flat.flat_block_rows = flat.streaming_stores = true;
            auto plain = Candidate::build(tools(), task, isa, blocked, {}, &shape);
            auto flat_rows = Candidate::build(tools(), task, isa, flat, {}, &shape);
            const std::string built = flat_rows->build_log();
            EXPECT_NE(built.find("made non-temporal"), std::string::npos)
                << "the flat run's stores are not proven aligned: " << built;
            Workload a(task, shape, 11), b(task, shape, 11);
            ng_plan *plan = make_plan(plain->runtime(), a, task);
            a.run(plan);
            ng_plan_destroy(plan);
            plan = make_plan(flat_rows->runtime(), b, task);
            b.run(plan);
            ng_plan_destroy(plan);
            EXPECT_EQ(b.compare_with_reference(flat.float32_stat_rows), "") << task.key();
            // Not bit for bit: LLVM may contract a*b + c into an FMA (Halide allows it outside
            // strict_float), and loops of another shape contract differently (forward: only each
            // channel's last element, the one-lane tail without the knob). So within a few float32
            // roundings of the terms, which are of the order of the result plus 1.
            double worst = 0;
            for (int64_t i = 0; i < shape.elements(); i++)
                worst = std::max(worst, std::abs(double(a.y_or_dx()[i]) - double(b.y_or_dx()[i])) /
                                            (1 + std::abs(double(a.y_or_dx()[i]))));
            EXPECT_LE(worst, 4 * FLT_EPSILON) << task.key();
        }
    CpuKnobs generic;
    generic.batch_outer = generic.flat_block_rows = true;
    auto ignored = Candidate::build(tools(), kFwdTrain, isa, generic);
    EXPECT_EQ(check_candidate(*ignored, kFwdTrain, check_shapes()), "");
}

// prefetch_next_block: a flat kernel's output loop prefetches the next block's statistics
// inputs (kept in L2: the generator program rewrites Halide's prefetchnta), and a task runs
// blocks_per_task blocks in order. Prefetches and task grouping change no result: the kernel
// writes what the same kernel without them writes, to the bit, and nothing past its output,
// also where the blocks do not fill the last task (3 blocks in tasks of 2). Where a block's run
// is not whole vectors (S = 49, one channel per block), the knob is dropped: Halide 14 would
// drop the prefetch from the loop with a tail.
TEST(Tuner, PrefetchNextBlockChangesNoResult) {
    const IsaTarget isa = isa_target(best_host_isa());
    const Shape shape = Shape::from_dims({5, 48, 7, 7});
    for (const Task &task : {kFwdTrain, Task{"bn_bwd_train", "contig"}}) {
        SCOPED_TRACE(task.key());
        CpuKnobs flat;
        flat.batch_outer = flat.flat_block_rows = flat.streaming_stores = true;
        flat.channels_per_task = 16;
        flat.float32_stat_rows = 2;
        CpuKnobs prefetching = flat;
        prefetching.prefetch_next_block = true;
        prefetching.blocks_per_task = 2;
        auto plain = Candidate::build(tools(), task, isa, flat, {}, &shape);
        auto prefetched = Candidate::build(tools(), task, isa, prefetching, {}, &shape);
        EXPECT_NE(prefetched->build_log().find("prefetches kept in L2"), std::string::npos)
            << prefetched->build_log();
        Workload a(task, shape, 5), b(task, shape, 5);
        for (auto [cand, w] : {std::pair{plain.get(), &a}, std::pair{prefetched.get(), &b}}) {
            ng_plan *plan = make_plan(cand->runtime(), *w, task);
            w->run(plan);
            ng_plan_destroy(plan);
        }
        EXPECT_EQ(b.compare_with_reference(prefetching.float32_stat_rows), "");
        EXPECT_EQ(std::memcmp(a.y_or_dx(), b.y_or_dx(), shape.elements() * sizeof(float)), 0);

        CpuKnobs ragged = prefetching;
        ragged.channels_per_task = 1;
        auto dropped = Candidate::build(tools(), task, isa, ragged, {}, &shape);
        EXPECT_EQ(dropped->build_log().find("prefetches kept in L2"), std::string::npos);
        EXPECT_NE(dropped->build_log().find("prefetch_next_block=0"), std::string::npos)
            << dropped->build_log();
    }
}

// Channels-last float32 row blocks summed row by row (sequential_stat_rows), balanced tasks
// (balanced_tasks) and channel blocks (channel_block) pass the reference check (the guard
// region behind the outputs included), here with blocks of 4 rows over 245 rows (the last
// block partial), 40 channels (a masked vector tail) and tasks of 24 rows (6 blocks; balanced,
// the output's tasks are 12 of 21 rows, the last of 14); channel blocks of 16 (the last of 8),
// with float32 row blocks and with float64 terms. (Not to the bit of the kernel summing down
// the block: LLVM may reassociate the unrolled rows.)
TEST(Tuner, ChannelsLastTaskKnobsPassTheCheck) {
    const IsaTarget isa = isa_target(best_host_isa());
    const Shape shape = Shape::from_dims({5, 40, 7, 7});
    CpuKnobs base;
    base.float32_stat_rows = 4;
    base.task_elements = 40 * 24;
    CpuKnobs row_by_row = base, balanced = base, channel_blocks = base, float64_blocks;
    row_by_row.sequential_stat_rows = true;
    balanced.balanced_tasks = true;
    channel_blocks.channel_block = float64_blocks.channel_block = 16;
    for (const auto &[knob, value, knobs] :
         {std::tuple{"sequential_stat_rows", "1", row_by_row},
          std::tuple{"balanced_tasks", "1", balanced},
          std::tuple{"channel_block", "16", channel_blocks},
          std::tuple{"channel_block", "16", float64_blocks}}) {
        const std::string on = std::string(knob) + "=" + value, off = std::string(knob) + "=0";
        for (const Task &task : {Task{"bn_fwd_train", "cl"}, Task{"bn_bwd_train", "cl"}}) {
            SCOPED_TRACE(task.key() + " " + on);
            auto kernel = Candidate::build(tools(), task, isa, knobs, {}, &shape);
            EXPECT_NE(kernel->build_log().find(on), std::string::npos) << kernel->build_log();
            Workload w(task, shape, 5);
            ng_plan *plan = make_plan(kernel->runtime(), w, task);
            w.run(plan);
            ng_plan_destroy(plan);
            EXPECT_EQ(w.compare_with_reference(knobs.float32_stat_rows), "");
        }
        // Elsewhere the generator drops it, and says so in its log.
        auto dropped = Candidate::build(tools(), kFwdTrain, isa, knobs, {}, &shape);
        EXPECT_NE(dropped->build_log().find(off), std::string::npos) << dropped->build_log();
    }
}

// A streaming kernel with a misaligned output: the plan runs the next-best kernel of its
// package (here a plain generic one beside the streaming kernel, offered as a class covering
// every shape), or, where the package has none, refuses the call by name.
TEST(Tuner, StreamingKernelFallsBackOnMisalignedOutput) {
    const Task task{"bn_fwd_infer", "cl"};
    CpuKnobs on;
    on.streaming_stores = true;
    auto plain = Candidate::build(tools(), task, isa_target(best_host_isa()), CpuKnobs{});
    auto streaming = Candidate::build(tools(), task, isa_target(best_host_isa()), on);
    const Shape shape = Shape::from_dims({2, 80, 29});

    // Alone: aligned runs, misaligned is refused.
    Workload alone(task, shape, 3);
    ng_plan *plan = make_plan(streaming->runtime(), alone, task);
    alone.run(plan);
    EXPECT_EQ(alone.compare_with_reference(), "");
    alone.misalign_output();
    try {
        alone.run(plan);
        ADD_FAILURE() << "a misaligned output ran a streaming kernel";
    } catch (const std::runtime_error &e) {
        EXPECT_NE(std::string(e.what()).find("64-byte aligned"), std::string::npos) << e.what();
    }
    ng_plan_destroy(plan);

    // Both kernels in one package.
    const std::string dir = tools().work_dir + "/both";
    std::filesystem::create_directories(dir);
    std::filesystem::copy_file(plain->dir() + "/libcandidate.so", dir + "/libplain.so");
    std::filesystem::copy_file(streaming->dir() + "/libcandidate.so", dir + "/libstreaming.so");
    nlohmann::json manifest = nlohmann::json::parse(std::ifstream(plain->dir() + "/manifest.json"));
    nlohmann::json entry = manifest["kernels"][0];
    entry["file"] = "libplain.so";
    nlohmann::json streaming_entry = entry;
    streaming_entry["name"] = entry["name"].get<std::string>() + "_streaming";
    streaming_entry["file"] = "libstreaming.so";
    streaming_entry["shape"] = {
        {"kind", "class"}, {"c_min", 1}, {"c_end", nullptr}, {"s_min", 1}, {"s_end", nullptr}};
    manifest["kernels"] = {entry, streaming_entry};
    std::ofstream(dir + "/manifest.json") << manifest.dump(1);
    ng_runtime *rt = nullptr;
    ASSERT_EQ(ng_runtime_open(dir.c_str(), &rt), NG_OK) << ng_last_error();
    Workload aligned(task, shape, 3), misaligned(task, shape, 3);
    misaligned.misalign_output();
    plan = make_plan(rt, aligned, task);
    const std::string described = ng_plan_describe(plan);
    EXPECT_EQ(described.rfind(streaming_entry["name"].get<std::string>() + ":", 0), 0) << described;
    EXPECT_NE(described.find("not 64-byte aligned runs " + entry["name"].get<std::string>()),
              std::string::npos)
        << described;
    aligned.run(plan);
    misaligned.run(plan);
    ng_plan_destroy(plan);
    ng_runtime_close(rt);
    EXPECT_EQ(aligned.compare_with_reference(), "");
    EXPECT_EQ(misaligned.compare_with_reference(), "");
    EXPECT_EQ(
        std::memcmp(aligned.y_or_dx(), misaligned.y_or_dx(), shape.elements() * sizeof(float)), 0);
    std::filesystem::remove_all(dir);
}

// The residual backward writes two tensors, dx and dz: with streaming_stores both are
// non-temporal (a dz written normally would be read from DRAM first), the bits are those of the
// kernel without, and a misaligned dz is refused by name (nothing written) like a misaligned dx.
TEST(Tuner, StreamingStoresCoverTheResidualGradient) {
    const Task task{"bn_bwd_train", "cl"};
    const std::vector<std::string> fused = {"activation=relu", "residual=true"};
    CpuKnobs on;
    on.streaming_stores = true;
    auto plain = Candidate::build(tools(), task, isa_target(best_host_isa()), CpuKnobs{}, fused);
    auto streaming = Candidate::build(tools(), task, isa_target(best_host_isa()), on, fused);
    const std::string built = streaming->build_log();
    EXPECT_NE(built.find("into dz"), std::string::npos) << built;
    // The candidates' manifests say plain BatchNorm: open each as the fused kernel it is.
    auto open_fused = [](const Candidate &c) {
        nlohmann::json m = nlohmann::json::parse(std::ifstream(c.dir() + "/manifest.json"));
        m["kernels"][0]["activation"] = "relu";
        m["kernels"][0]["residual"] = true;
        std::ofstream(c.dir() + "/manifest.json") << m.dump(1);
        ng_runtime *rt = nullptr;
        EXPECT_EQ(ng_runtime_open(c.dir().c_str(), &rt), NG_OK) << ng_last_error();
        return rt;
    };
    ng_runtime *plain_rt = open_fused(*plain), *streaming_rt = open_fused(*streaming);
    ASSERT_TRUE(plain_rt && streaming_rt);

    const int64_t N = 3, C = 32, L = 7, count = N * C * L;  // rows of 32 floats: 2 vectors
    const ng_tensor t = {3, {N, C, L}, NG_CHANNELS_LAST, NG_F32, NG_CPU};
    ng_batch_norm_params params = ng_batch_norm_params_default();
    params.activation = NG_ACT_RELU;
    params.residual = 1;
    auto aligned = [](int64_t floats) {  // 64-byte aligned, one float of room to misalign
        return std::unique_ptr<float, decltype(&std::free)>(
            static_cast<float *>(std::aligned_alloc(64, size_t(floats + 16) * sizeof(float))),
            std::free);
    };
    auto x = aligned(count), dy = aligned(count), z = aligned(count);
    for (int64_t i = 0; i < count; i++) {
        x.get()[i] = float((i * 37) % 23) / 7.0f - 1.5f;
        dy.get()[i] = float((i * 11) % 19) / 9.0f - 1.0f;
        z.get()[i] = float((i * 5) % 13) / 13.0f - 0.5f;
    }
    std::vector<float> weight(C, 1.25f), bias(C, 0.125f), mean(C), invstd(C), dweight(C), dbias(C);
    for (int64_t c = 0; c < C; c++) mean[c] = 0.01f * float(c), invstd[c] = 0.5f + 0.01f * float(c);
    struct Result {
        std::unique_ptr<float, decltype(&std::free)> dx, dz;
        std::vector<float> dweight, dbias;
    };
    auto run = [&](ng_runtime *rt, int64_t dz_offset, ng_status *status) {
        Result r{aligned(count), aligned(count), std::vector<float>(C, -7.0f),
                 std::vector<float>(C, -7.0f)};
        std::fill(r.dx.get(), r.dx.get() + count + 16, -7.0f);
        std::fill(r.dz.get(), r.dz.get() + count + 16, -7.0f);
        ng_plan *plan = nullptr;
        EXPECT_EQ(ng_plan_create(rt, NG_OP_BACKWARD, &t, &params, &plan), NG_OK) << ng_last_error();
        *status =
            ng_batch_norm_backward(plan, x.get(), dy.get(), z.get(), weight.data(), bias.data(),
                                   nullptr, nullptr, mean.data(), invstd.data(), r.dx.get(),
                                   r.dweight.data(), r.dbias.data(), r.dz.get() + dz_offset);
        ng_plan_destroy(plan);
        return r;
    };
    ng_status st_plain = NG_OK, st_streaming = NG_OK, st_misaligned = NG_OK;
    const Result want = run(plain_rt, 0, &st_plain);
    const Result got = run(streaming_rt, 0, &st_streaming);
    ASSERT_EQ(st_plain, NG_OK);
    ASSERT_EQ(st_streaming, NG_OK) << ng_last_error();
    const size_t bytes = size_t(count) * sizeof(float);
    EXPECT_EQ(std::memcmp(want.dx.get(), got.dx.get(), bytes), 0);
    EXPECT_EQ(std::memcmp(want.dz.get(), got.dz.get(), bytes), 0);
    EXPECT_EQ(want.dweight, got.dweight);
    EXPECT_EQ(want.dbias, got.dbias);
    EXPECT_TRUE(std::any_of(got.dz.get(), got.dz.get() + count, [](float v) { return v == 0; }))
        << "the ReLU masks no element: the test data does not exercise the mask";

    const Result refused = run(streaming_rt, 1, &st_misaligned);
    EXPECT_EQ(st_misaligned, NG_INVALID_ARGUMENT);
    const std::string msg = ng_last_error();
    EXPECT_EQ(msg.rfind("dz", 0), 0) << msg;
    EXPECT_NE(msg.find("64-byte aligned"), std::string::npos) << msg;
    auto untouched = [&](const float *p) {
        return std::all_of(p, p + count + 16, [](float v) { return v == -7.0f; });
    };
    EXPECT_TRUE(untouched(refused.dx.get()) && untouched(refused.dz.get()));
    ng_runtime_close(plain_rt);
    ng_runtime_close(streaming_rt);
}

// float32_stat_rows: blocked candidates pass the check (the backward's sums with their blocks'
// error bound as allowance), and the allowance does not let a wrong candidate through.
TEST(Tuner, Float32RowBlocksPassTheCheckAndAWrongOneDoesNot) {
    CpuKnobs blocked;
    blocked.float32_stat_rows = 16;
    // Channels-last blocks run down each channel's rows of C elements; small tasks so that a
    // task holds several blocks and ends in a partial one.
    CpuKnobs blocked_cl = blocked;
    blocked_cl.task_elements = 4096;
    blocked_cl.vectors = 2;
    for (const Task &task : {kFwdTrain, Task{"bn_bwd_train", "contig"}, Task{"bn_fwd_train", "cl"},
                             Task{"bn_bwd_train", "cl"}}) {
        auto cand = Candidate::build(tools(), task, isa_target(best_host_isa()),
                                     task.layout == "cl" ? blocked_cl : blocked);
        EXPECT_EQ(check_candidate(*cand, task, check_shapes()), "") << task.key();
    }
    auto wrong = Candidate::build(tools(), kFwdTrain, isa_target(best_host_isa()), blocked,
                                  {"activation=relu"});
    const std::string why = check_candidate(*wrong, kFwdTrain, check_shapes());
    EXPECT_NE(why.find("y["), std::string::npos) << "rejection reason: '" << why << "'";
    // A wrong blocked backward (built for eval mode: it takes the running statistics where
    // training takes the saved batch ones) is rejected too, allowance or not.
    const Task bwd{"bn_bwd_train", "contig"};
    auto wrong_bwd =
        Candidate::build(tools(), bwd, isa_target(best_host_isa()), blocked, {"mode=eval"});
    const std::string why_bwd = check_candidate(*wrong_bwd, bwd, check_shapes());
    EXPECT_NE(why_bwd.find("dx["), std::string::npos) << "rejection reason: '" << why_bwd << "'";
}

TEST(Tuner, ShapeClassBuckets) {
    EXPECT_EQ(shape_class_of(64, 3136).key(), "class_c64to256_s1024to16384");
    EXPECT_EQ(shape_class_of(2048, 49).key(), "class_c1024toinf_s2to64");
    EXPECT_EQ(shape_class_of(1024, 1).key(), "class_c1024toinf_s1to2");
    EXPECT_EQ(shape_class_of(32, 131072).key(), "class_c1to64_s16384toinf");
    ShapeClass parsed;
    ASSERT_TRUE(parse_shape_class("class_c64to256_s1024to16384", &parsed));
    EXPECT_TRUE(parsed == shape_class_of(255, 1024));
    EXPECT_FALSE(parsed.contains(256, 1024));
    EXPECT_FALSE(parse_shape_class("n32_c64_s3136", &parsed));
}

// Entries from trials (derive_entries): an exact entry comes from its shape's exact trials (the
// kernel the build ships) where there are any, and they compete for nothing else; a hand-set
// entry survives until exact trials of its shape exist.
TEST(Tuner, ExactTrialsChooseOnlyTheirShapesEntry) {
    using nlohmann::json;
    const std::string small = "n32_c512_s49", large = "n32_c64_s3136";
    auto timing = [](double frac) {
        return json{{"frac_cold", frac},
                    {"frac_warm", frac},
                    {"ms_cold", 1.0},
                    {"ms_warm", 1.0},
                    {"gbps_cold", 10.0}};
    };
    auto generic_trial = [&](int vectors, double on_small, double on_large) {
        return json{{"knobs", {{"vectors", vectors}}},
                    {"check", "passed"},
                    {"results", {{small, timing(on_small)}, {large, timing(on_large)}}}};
    };
    auto exact_trial = [&](const std::string &shape, json knobs, double frac) {
        return json{{"knobs", knobs},
                    {"exact", shape},
                    {"check", "passed"},
                    {"verified", {shape}},
                    {"results", {{shape, timing(frac)}}}};
    };
    const json flat = {{"vectors", 1}, {"batch_outer", true}, {"flat_block_rows", true}};
    const json hand_set_knobs = {{"vectors", 4}};
    json doc = {{"target", "x86-64-avx512"},
                {"entries",
                 {{{"family", "bn_fwd_train"},
                   {"dtype", "f32"},
                   {"layout", "contig"},
                   {"shape", large},
                   {"knobs", hand_set_knobs},
                   {"measured", {{"hand_set", "test"}}}},
                  {{"family", "bn_fwd_train"},  // a shape the trials never timed
                   {"dtype", "f32"},
                   {"layout", "contig"},
                   {"shape", "n2_c3_s5"},
                   {"knobs", hand_set_knobs},
                   {"measured", {{"hand_set", "test"}}}},
                  {{"family", "bn_bwd_eval"},
                   {"dtype", "f32"},
                   {"layout", "contig"},
                   {"shape", "generic"},
                   {"knobs", json::object()},
                   {"measured", nullptr}}}},
                {"tuning",
                 {{"tasks",
                   {{"bn_fwd_train/contig",
                     {{"trials",
                       {generic_trial(1, 0.5, 0.9), generic_trial(2, 0.6, 0.8),
                        // Faster than any generic trial on `small`, but timed there only.
                        exact_trial(small, flat, 0.95)}}}}}}}}};
    auto entry = [&](const std::string &family, const std::string &shape) -> json {
        for (const auto &e : doc["entries"])
            if (e["family"] == family && e["shape"] == shape) return e;
        return nullptr;
    };
    derive_entries(doc);
    ASSERT_FALSE(entry("bn_fwd_train", small).is_null());
    EXPECT_EQ(entry("bn_fwd_train", small)["knobs"], flat);
    EXPECT_EQ(entry("bn_fwd_train", small)["measured"]["kernel"], "exact");
    EXPECT_TRUE(entry("bn_fwd_train", small)["measured"]["verified_on_shape"].get<bool>());
    // The hand-set entries stay (one of them for a shape no trial timed); the untuned family's
    // entry too.
    EXPECT_EQ(entry("bn_fwd_train", large)["knobs"], hand_set_knobs);
    EXPECT_EQ(entry("bn_fwd_train", "n2_c3_s5")["knobs"], hand_set_knobs);
    EXPECT_FALSE(entry("bn_bwd_eval", "generic").is_null());
    // Generic and class entries: generic trials only (geomean 0.693 beats 0.671).
    EXPECT_EQ(entry("bn_fwd_train", "generic")["knobs"], json({{"vectors", 2}}));
    EXPECT_EQ(entry("bn_fwd_train", "generic")["measured"]["kernel"], "generic");
    const std::string small_class = shape_class_of(512, 49).key();
    EXPECT_EQ(entry("bn_fwd_train", small_class)["knobs"], json({{"vectors", 2}}));

    // An exact trial of the hand-set entry's shape supersedes it, even if slower than a
    // generic trial there: only exact kernels compete for an exact entry once timed.
    doc["tuning"]["tasks"]["bn_fwd_train/contig"]["trials"].push_back(
        exact_trial(large, hand_set_knobs, 0.7));
    derive_entries(doc);
    EXPECT_EQ(entry("bn_fwd_train", large)["knobs"], hand_set_knobs);
    EXPECT_EQ(entry("bn_fwd_train", large)["measured"]["kernel"], "exact");
    EXPECT_DOUBLE_EQ(
        entry("bn_fwd_train", large)["measured"]["fraction_of_reference"].get<double>(), 0.7);
    EXPECT_EQ(entry("bn_fwd_train", "n2_c3_s5")["knobs"], hand_set_knobs);
    // A rejected exact trial competes for nothing.
    json rejected = exact_trial(small, {{"vectors", 8}}, 2.0);
    rejected["rejected"] = "reference check";
    doc["tuning"]["tasks"]["bn_fwd_train/contig"]["trials"].push_back(rejected);
    derive_entries(doc);
    EXPECT_EQ(entry("bn_fwd_train", small)["knobs"], flat);
}

// A problem that fits in the threads' L2 is ranked by its warm fraction, as the benchmark times
// it (bench::timed_warm); a larger one by its cold fraction. Here the kernel faster from DRAM
// (say, with streaming stores) is the slower one from cache.
TEST(Tuner, ProblemsInL2AreRankedWarm) {
    using nlohmann::json;
    const std::string tiny = "n8_c32_s64", large = "n32_c2048_s49";  // 128 KiB, 25.7 MB
    ASSERT_STREQ(ranked_fraction("bn_fwd_train", tiny), "frac_warm");
    ASSERT_STREQ(ranked_fraction("bn_fwd_train", large), "frac_cold");
    auto exact_trial = [](const std::string &shape, int vectors, double cold, double warm) {
        const json timing = {{"frac_cold", cold}, {"frac_warm", warm}, {"ms_cold", 1.0},
                             {"ms_warm", 1.0},    {"gbps_cold", 10.0}};
        return json{{"knobs", {{"vectors", vectors}}}, {"exact", shape},
                    {"check", "passed"},               {"verified", {shape}},
                    {"results", {{shape, timing}}}};
    };
    // The tuned shapes are those the generic trials were timed on.
    json generic_trial = exact_trial(tiny, 4, 0.1, 0.1);
    generic_trial.erase("exact");
    generic_trial["results"][large] = generic_trial["results"][tiny];
    json doc = {{"target", "x86-64-avx512"},
                {"entries", json::array()},
                {"tuning",
                 {{"tasks",
                   {{"bn_fwd_train/contig",
                     {{"trials",
                       {generic_trial, exact_trial(tiny, 1, 0.9, 0.4),
                        exact_trial(tiny, 2, 0.6, 0.7),
                        exact_trial(large, 1, 0.9, 0.4), exact_trial(large, 2, 0.6, 0.7)}}}}}}}}};
    derive_entries(doc);
    std::map<std::string, json> by_shape;
    for (const auto &e : doc["entries"]) by_shape[e["shape"]] = e;
    ASSERT_TRUE(by_shape.count(tiny) && by_shape.count(large));
    EXPECT_EQ(by_shape[tiny]["knobs"], json({{"vectors", 2}}));
    EXPECT_EQ(by_shape[tiny]["measured"]["ranked_by"], "frac_warm");
    EXPECT_DOUBLE_EQ(by_shape[tiny]["measured"]["fraction_of_reference"].get<double>(), 0.7);
    EXPECT_EQ(by_shape[large]["knobs"], json({{"vectors", 1}}));
    EXPECT_EQ(by_shape[large]["measured"]["ranked_by"], "frac_cold");
}

TEST(Tuner, KnobsRoundTripThroughTheOneParser) {
    CpuKnobs k;
    k.vectors = 4;
    k.stats_per_channel = false;
    k.channels_per_task = 8;
    k.float32_stat_rows = 16;
    k.streaming_stores = true;
    EXPECT_TRUE(parse_cpu_knobs(k.to_json(), "test") == k);
    EXPECT_THROW(parse_cpu_knobs(nlohmann::json{{"float32_stat_rows", 0}}, "test"),
                 std::runtime_error);
    EXPECT_THROW(parse_cpu_knobs(nlohmann::json{{"vectors", 0}}, "test"), std::runtime_error);
    EXPECT_THROW(parse_cpu_knobs(nlohmann::json{{"no_such_knob", 1}}, "test"), std::runtime_error);
}

}  // namespace
}  // namespace normgen::tune
