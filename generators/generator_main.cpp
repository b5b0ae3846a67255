// The generator program: Halide's generator main, plus one step Halide 14 lacks. A kernel
// scheduled with streaming_stores asks (request_streaming_stores) for its tensor outputs' vector
// stores to be non-temporal; Halide cannot emit those, so after Halide has written the object this
// program generates the same kernel once more as LLVM IR, marks those stores `!nontemporal`,
// and assembles the IR with LLVM 14's llc into the object, in place of Halide's.
//
// Only stores Halide itself proved aligned to their vector width (up to 64 bytes) are marked:
// the x86 back end emits movntps only for those, and the kernel's entry assertions (host
// alignment, row strides) keep them aligned. llc gets the CPU and features Halide 14 uses for
// the target, so the object is Halide's own but for the marked stores (checked when this was
// written: unmarked IR through this llc call gives a byte-identical disassembly for sse41, avx2
// and avx512).
#include "generator_common.h"

#include "Halide.h"

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <regex>
#include <sstream>
#include <map>
#include <set>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;

std::string arg_after(const std::vector<std::string> &args, const std::string &flag) {
    for (size_t i = 0; i + 1 < args.size(); i++)
        if (args[i] == flag) return args[i + 1];
    return "";
}

std::string target_of(const std::vector<std::string> &args) {
    for (const auto &a : args)
        if (a.rfind("target=", 0) == 0) return a.substr(7);
    return "";
}

// llc's -mcpu and -mattr for what Halide 14's x86 code generator uses for the target; empty for
// targets this step does not serve.
std::pair<std::string, std::string> llc_cpu_and_features(const Halide::Target &t) {
    using T = Halide::Target;
    if (t.arch != T::X86 || t.bits != 64 || t.has_gpu_feature()) return {};
    if (t.has_feature(T::AVX512_Skylake))
        return {"skylake-avx512",
                "+sse4.1,+avx,+avx2,+fma,+f16c,+avx512f,+avx512cd,+avx512vl,+avx512bw,+avx512dq"};
    if (t.has_feature(T::AVX512)) return {};  // other AVX-512 flavours: not checked
    if (t.has_feature(T::AVX2)) return {"haswell", "+sse4.1,+avx,+avx2,+fma,+f16c"};
    if (t.has_feature(T::SSE41) && !t.has_feature(T::AVX)) return {"penryn", "+sse4.1"};
    return {};
}

// The edits made to Halide's LLVM IR: stores marked per buffer, prefetches rewritten.
struct IrEdits {
    std::map<std::string, int> marked;
    int l2_prefetches = 0;
};

// Marks the vector stores into each of `buffers` that are aligned to their width (up to 64
// bytes) non-temporal. Halide names each store's TBAA type after its buffer, uniquified per run
// ("y", "y$3", "y.1"...): a buffer's name is given without that suffix. With l2_prefetches,
// rewrites Halide's prefetches (locality 0, prefetchnta) to locality 2 (prefetcht1), which
// keeps the line in the caches until it is read (see request_l2_prefetches).
IrEdits edit_ir(const std::string &in_path, const std::string &out_path,
                const std::vector<std::string> &buffers, bool l2_prefetches) {
    std::ifstream in(in_path);
    std::vector<std::string> lines;
    for (std::string l; std::getline(in, l);) lines.push_back(l);
    IrEdits edits;
    if (l2_prefetches) {
        const std::regex prefetch(R"re(^(\s*(tail )?call void @llvm\.prefetch\.p0i8\(.*, i32 0, )i32 0(, i32 1\).*)$)re");
        std::smatch pm;
        for (auto &l : lines)
            if (std::regex_match(l, pm, prefetch)) {
                l = std::string(pm[1]) + "i32 2" + std::string(pm[3]);
                edits.l2_prefetches++;
            }
    }

    const std::regex type_node(R"re(^!(\d+) = !\{!"([^"]*)", !(\d+), i64 \d+\}$)re");
    const std::regex access_tag(R"re(^!(\d+) = !\{!(\d+), !(\d+), i64 \d+\}$)re");
    const std::regex metadata_id(R"re(^!(\d+) = )re");
    // Vectors of float, or of integers of the same bits (Halide stores y through i32 where a
    // knob reinterprets it; f16/bf16 outputs as i16).
    const std::regex vector_store(
        R"re(^(\s*store <(\d+) x (float|i32|half|bfloat|i16)> .*, align )(\d+)(, !tbaa !(\d+))(.*)$)re");
    std::map<std::string, std::pair<std::string, std::string>> types;  // id -> (name, parent)
    std::map<std::string, std::string> tags;                          // tag id -> access type
    int next_id = 0;
    std::smatch m;
    for (const auto &l : lines) {
        if (std::regex_match(l, m, type_node)) types[m[1]] = {m[2], m[3]};
        if (std::regex_match(l, m, access_tag)) tags[m[1]] = m[3];
        if (std::regex_search(l, m, metadata_id)) next_id = std::max(next_id, std::stoi(m[1]) + 1);
    }
    // The requested buffer a TBAA access type belongs to, or "".
    auto buffer_of = [&](std::string id) -> std::string {
        for (int depth = 0; depth < 64 && types.count(id); depth++) {
            const std::string &name = types[id].first;
            for (const std::string &buffer : buffers)
                if (name == buffer || name.rfind(buffer + "$", 0) == 0 ||
                    name.rfind(buffer + ".", 0) == 0)
                    return buffer;
            id = types[id].second;
        }
        return "";
    };
    std::map<std::string, int> &marked = edits.marked;
    for (const std::string &buffer : buffers) marked[buffer] = 0;
    const std::string nontemporal = ", !nontemporal !" + std::to_string(next_id);
    // Non-temporal stores are weakly ordered: a function that makes them drains them (sfence)
    // before it returns, so a parallel task's results are visible once the pool has joined it.
    const std::regex function_start(R"re(^define .*@([^(]+)\(.*$)re");
    std::set<std::string> streaming_functions;
    std::string function;
    for (auto &l : lines) {
        if (std::regex_match(l, m, function_start)) function = m[1];
        if (!std::regex_match(l, m, vector_store)) continue;
        const std::string element = m[3];
        const int bytes = std::stoi(m[2]) * (element == "float" || element == "i32" ? 4 : 2);
        const int align = std::stoi(m[4]);
        const std::string buffer = tags.count(m[6]) ? buffer_of(tags[m[6]]) : "";
        if (buffer.empty() || align < std::min(bytes, 64)) continue;
        l = std::string(m[1]) + std::string(m[4]) + std::string(m[5]) + nontemporal +
            std::string(m[7]);
        marked[buffer]++;
        streaming_functions.insert(function);
    }
    std::ofstream out(out_path);
    const std::regex ret(R"re(^\s+ret .*$)re");
    for (const auto &l : lines) {
        if (std::regex_match(l, m, function_start)) function = m[1];
        if (streaming_functions.count(function) && std::regex_match(l, ret))
            out << "  call void @llvm.x86.sse.sfence()\n";
        out << l << "\n";
    }
    if (!streaming_functions.empty()) {
        out << "declare void @llvm.x86.sse.sfence()\n";
        out << "!" << next_id << " = !{i32 1}\n";  // the !nontemporal node the stores name
    }
    return edits;
}

int run(const std::vector<std::string> &argv) {
    std::vector<char *> c_argv;
    for (const auto &a : argv) c_argv.push_back(const_cast<char *>(a.c_str()));
    c_argv.push_back(nullptr);
    const pid_t pid = fork();
    if (pid == 0) {
        execv(c_argv[0], c_argv.data());
        _exit(127);
    }
    int status = 0;
    if (pid < 0 || waitpid(pid, &status, 0) < 0) return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

int generate(const std::vector<std::string> &args) {
    std::vector<char *> c_argv;
    for (const auto &a : args) c_argv.push_back(const_cast<char *>(a.c_str()));
    return Halide::Internal::generate_filter_main(int(c_argv.size()), c_argv.data(), std::cerr);
}

// Replaces Halide's object for the kernel just generated with one whose stores into `buffers`
// (its tensor outputs) are non-temporal and, with l2_prefetches, whose prefetches keep their
// line in L2. Returns 0 or prints why not and returns 1.
int rebuild_with_ir_edits(std::vector<std::string> args, const std::vector<std::string> &buffers,
                          bool l2_prefetches) {
    const std::string dir = arg_after(args, "-o"), name = arg_after(args, "-n").empty()
                                                           ? arg_after(args, "-f")
                                                           : arg_after(args, "-n");
    const std::string emit = arg_after(args, "-e");
    if (emit.find("object") == std::string::npos) return 0;  // no object to replace
    const auto [cpu, features] = llc_cpu_and_features(Halide::Target(target_of(args)));
    auto fail = [&](const std::string &why) {
        std::cerr << "normgen: " << name << ": LLVM IR edits: " << why << "\n";
        return 1;
    };
    if (cpu.empty() && buffers.empty()) {  // prefetches elsewhere than x86: Halide's as they are
        std::cerr << "normgen: " << name << ": prefetches left as Halide emits them ("
                  << target_of(args) << ")\n";
        return 0;
    }
    if (cpu.empty()) return fail("no known llc CPU for target " + target_of(args));
    const fs::path tmp = fs::path(dir) / (name + ".streaming");
    fs::create_directories(tmp);
    for (size_t i = 0; i + 1 < args.size(); i++) {
        if (args[i] == "-e") args[i + 1] = "llvm_assembly";
        if (args[i] == "-o") args[i + 1] = tmp.string();
    }
    if (generate(args) != 0) return fail("generating the LLVM IR failed");
    const std::string ll = (tmp / (name + ".ll")).string(), marked_ll = ll + ".marked.ll";
    const IrEdits edits = edit_ir(ll, marked_ll, buffers, l2_prefetches);
    const std::map<std::string, int> &marked = edits.marked;
    std::string summary;
    for (const auto &[buffer, count] : marked) {
        if (count == 0)
            return fail("no vector store into '" + buffer + "' is proven aligned: nothing to mark");
        summary += (summary.empty() ? "" : ", ") + std::to_string(count) + " into " + buffer;
    }
    const std::string object = (fs::path(dir) / (name + ".o")).string();
    const std::string assembly = (tmp / (name + ".s")).string();
    auto llc = [&](const std::string &filetype, const std::string &out) {
        return run({NORMGEN_LLC, "-O3", "-filetype=" + filetype, "-relocation-model=pic",
                    "--function-sections", "--data-sections", "-mcpu=" + cpu,
                    "-mattr=" + features, marked_ll, "-o", out});
    };
    if (llc("obj", object) != 0 || llc("asm", assembly) != 0)
        return fail(std::string(NORMGEN_LLC) + " failed");
    // LLVM drops the mark where it cannot keep it (e.g. a store it folds into another
    // instruction): the kernel must really have non-temporal stores.
    int streaming_instructions = 0;
    {
        std::ifstream in(assembly);
        for (std::string l; std::getline(in, l);)
            if (l.find("\tvmovnt") != std::string::npos || l.find("\tmovnt") != std::string::npos)
                streaming_instructions++;
    }
    if (!buffers.empty() && streaming_instructions == 0)
        return fail("LLVM kept none of the non-temporal marks (" + summary +
                    "; no movnt instruction in the assembly)");
    fs::remove_all(tmp);
    if (!buffers.empty())
        std::fprintf(stderr,
                     "normgen: %s: vector stores made non-temporal: %s (%d movnt instructions)\n",
                     name.c_str(), summary.c_str(), streaming_instructions);
    // Halide drops a prefetch it can prove lands outside the tensor (an exact shape of one
    // block): then there is none.
    if (l2_prefetches && edits.l2_prefetches > 0)
        std::fprintf(stderr, "normgen: %s: prefetches kept in L2: %d\n", name.c_str(),
                     edits.l2_prefetches);
    else if (l2_prefetches)
        std::fprintf(stderr, "normgen: %s: no prefetch left in the kernel to keep in L2\n",
                     name.c_str());
    return 0;
}

}  // namespace

int main(int argc, char **argv) {
    std::vector<std::string> args(argv, argv + argc);
    if (int rc = generate(args); rc != 0) return rc;
    // Halide's unique names for the output buffers ("y$1"), without the suffix that differs in
    // the second run.
    std::vector<std::string> buffers;
    for (const std::string &requested : normgen::streaming_store_buffers())
        buffers.push_back(requested.substr(0, requested.find('$')));
    const bool l2_prefetches = normgen::l2_prefetches_requested();
    if (buffers.empty() && !l2_prefetches) return 0;
    normgen::request_streaming_stores({});
    normgen::request_l2_prefetches(false);
    return rebuild_with_ir_edits(args, buffers, l2_prefetches);
}
