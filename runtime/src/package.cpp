#include "package.h"

#include "errors.h"
#include "plan.h"
#include "normgen/normgen.h"

#include <nlohmann/json.hpp>

#include <dlfcn.h>

#include <cstdlib>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <tuple>
#include <sys/stat.h>

namespace ng {

namespace {

using json = nlohmann::json;

std::string field_string(const json &entry, const char *field, const std::string &where) {
    auto it = entry.find(field);
    if (it == entry.end() || !it->is_string())
        fail(NG_PACKAGE_ERROR, where, ": field '", field, "' is missing or not a string");
    return it->get<std::string>();
}

KernelShape parse_shape(const json &entry, const std::string &where) {
    auto it = entry.find("shape");
    if (it == entry.end() || !it->is_object())
        fail(NG_PACKAGE_ERROR, where, ": field 'shape' is missing or not an object");
    KernelShape shape;
    const std::string kind = field_string(*it, "kind", where + " shape");
    if (kind == "generic") return shape;
    if (kind == "class") {
        shape.kind = KernelShape::Class;
        // Bounds: positive integers; an end may be null (unbounded) and is past its min.
        for (auto [field, value, may_be_null] :
             {std::tuple{"c_min", &shape.c_min, false}, {"c_end", &shape.c_end, true},
              {"s_min", &shape.s_min, false}, {"s_end", &shape.s_end, true}}) {
            auto v = it->find(field);
            if (v != it->end() && v->is_null() && may_be_null) continue;
            if (v == it->end() || !v->is_number_integer() || v->get<int64_t>() < 1)
                fail(NG_PACKAGE_ERROR, where, ": class shape needs a positive integer '", field,
                     "'", may_be_null ? " (or null: unbounded)" : "");
            *value = v->get<int64_t>();
        }
        if ((shape.c_end && shape.c_end <= shape.c_min) || (shape.s_end && shape.s_end <= shape.s_min))
            fail(NG_PACKAGE_ERROR, where, ": class shape has an empty range");
        return shape;
    }
    if (kind != "exact")
        fail(NG_PACKAGE_ERROR, where, ": shape kind '", kind,
             "' is not 'generic', 'class' or 'exact'");
    shape.kind = KernelShape::Exact;
    for (auto [field, value] : {std::pair{"n", &shape.n}, {"c", &shape.c}, {"s", &shape.s}}) {
        auto v = it->find(field);
        if (v == it->end() || !v->is_number_integer() || v->get<int64_t>() < 1)
            fail(NG_PACKAGE_ERROR, where, ": exact shape needs a positive integer '", field, "'");
        *value = v->get<int64_t>();
    }
    return shape;
}

void check_metadata(const Kernel &k) {
    const auto *md = k.metadata;
    if (md->version != halide_filter_metadata_t::VERSION)
        fail(NG_PACKAGE_ERROR, "kernel '", k.name, "' has Halide metadata version ", md->version);
    for (int i = 0; i < md->num_arguments; i++) {
        const auto &arg = md->arguments[i];
        if (!is_kernel_argument_name(arg.name))
            fail(NG_PACKAGE_ERROR, "kernel '", k.name, "' in ", k.file, " takes argument '",
                 arg.name, "', unknown to this runtime (ABI version ", NG_ABI_VERSION, ")");
    }
}

// Makes libnormgen's Halide runtime symbols visible to the kernel objects even when the host
// loaded libnormgen with RTLD_LOCAL (kernels are built without a runtime of their own).
void export_halide_runtime() {
    Dl_info info;
    if (dladdr(reinterpret_cast<void *>(&default_package_dir), &info) && info.dli_fname)
        dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_GLOBAL);
}

bool is_directory(const std::string &path) {
    struct stat st;
    return stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

}  // namespace

std::string Kernel::describe_shape() const {
    if (shape.kind == KernelShape::Generic) return "generic";
    if (shape.kind == KernelShape::Class) {
        auto end = [](int64_t e) { return e ? std::to_string(e) : std::string("inf"); };
        return "class C in [" + std::to_string(shape.c_min) + ", " + end(shape.c_end) +
               "), S in [" + std::to_string(shape.s_min) + ", " + end(shape.s_end) + ")";
    }
    return "exact n" + std::to_string(shape.n) + " c" + std::to_string(shape.c) + " s" +
           std::to_string(shape.s);
}

std::string default_package_dir() {
    if (const char *env = std::getenv("NORMGEN_PACKAGE"); env && *env) return env;
    Dl_info info;
    if (dladdr(reinterpret_cast<void *>(&default_package_dir), &info) && info.dli_fname) {
        std::string lib = info.dli_fname;
        auto slash = lib.rfind('/');
        return (slash == std::string::npos ? std::string(".") : lib.substr(0, slash)) +
               "/normgen-package";
    }
    return "normgen-package";
}

std::unique_ptr<Package> Package::open(const std::string &dir, const std::string &host_arch) {
    if (!is_directory(dir))
        fail(NG_PACKAGE_ERROR, "package folder '", dir, "' does not exist or is not a folder");
    const std::string manifest_path = dir + "/manifest.json";
    std::ifstream in(manifest_path);
    if (!in) fail(NG_PACKAGE_ERROR, "cannot read '", manifest_path, "'");
    json doc;
    try {
        doc = json::parse(in);
    } catch (const json::exception &e) {
        fail(NG_PACKAGE_ERROR, "'", manifest_path, "' is not valid JSON (", e.what(), ")");
    }
    if (!doc.is_object() || doc.value("format", "") != "normgen-package")
        fail(NG_PACKAGE_ERROR, "'", manifest_path, "' is not a normgen package manifest");
    if (!doc.contains("abi_version") || !doc["abi_version"].is_number_integer() ||
        doc["abi_version"].get<int>() != NG_ABI_VERSION)
        fail(NG_PACKAGE_ERROR, "'", manifest_path, "' has abi_version ",
             doc.contains("abi_version") ? doc["abi_version"].dump() : "(none)",
             "; this runtime reads version ", NG_ABI_VERSION);
    if (!doc.contains("kernels") || !doc["kernels"].is_array())
        fail(NG_PACKAGE_ERROR, "'", manifest_path, "' has no 'kernels' list");

    export_halide_runtime();
    auto pkg = std::unique_ptr<Package>(new Package());
    pkg->dir_ = dir;
    pkg->host_arch_ = host_arch;
    std::map<std::string, void *> opened;
    std::set<std::string> names;
    for (const json &e : doc["kernels"]) {
        const std::string where = manifest_path + " kernel #" + std::to_string(pkg->kernels_.size());
        if (!e.is_object()) fail(NG_PACKAGE_ERROR, where, " is not an object");
        Kernel k;
        k.name = field_string(e, "name", where);
        const std::string at = manifest_path + " kernel '" + k.name + "'";
        if (!names.insert(k.name).second) fail(NG_PACKAGE_ERROR, at, " is listed twice");
        k.op = field_string(e, "op", at);
        k.statistics = field_string(e, "statistics", at);
        k.dtype = field_string(e, "dtype", at);
        k.layout = field_string(e, "layout", at);
        k.activation = field_string(e, "activation", at);
        k.device = field_string(e, "device", at);
        k.arch = field_string(e, "arch", at);
        k.isa = field_string(e, "isa", at);
        k.target = field_string(e, "target", at);
        k.file = field_string(e, "file", at);
        k.symbol = field_string(e, "symbol", at);
        k.residual = e.value("residual", false);
        k.shape = parse_shape(e, at);
        if (!e.contains("features") || !e["features"].is_array())
            fail(NG_PACKAGE_ERROR, at, ": field 'features' is missing or not a list");
        for (const auto &f : e["features"]) k.features.push_back(f.get<std::string>());
        if (k.file.find('/') != std::string::npos)
            fail(NG_PACKAGE_ERROR, at, ": file '", k.file, "' must name a file inside the package");

        // CPU kernels of this architecture load now; device kernels when a plan asks for them.
        if (k.device == "cpu" && k.arch == host_arch) pkg->resolve(k, opened, at);
        pkg->kernels_.push_back(std::move(k));
    }
    return pkg;
}

void Package::resolve(Kernel &k, std::map<std::string, void *> &opened, const std::string &at) {
    void *&handle = opened[k.file];
    if (!handle) {
        const std::string path = dir_ + "/" + k.file;
        handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (!handle) {
            const char *why = dlerror();
            fail(NG_PACKAGE_ERROR, at, ": cannot load kernel file '", path, "': ",
                 why ? why : "unknown dlopen error");
        }
        handles_.push_back(handle);
    }
    const std::string argv_name = k.symbol + "_argv", md_name = k.symbol + "_metadata";
    k.entry = reinterpret_cast<int (*)(void **)>(dlsym(handle, argv_name.c_str()));
    auto md = reinterpret_cast<const halide_filter_metadata_t *(*)()>(dlsym(handle, md_name.c_str()));
    if (!k.entry || !md)
        fail(NG_PACKAGE_ERROR, at, ": symbol '", k.symbol, "' (", argv_name, "/", md_name,
             ") is not in '", k.file, "'");
    k.metadata = md();
    check_metadata(k);
    for (int i = 0; i < k.metadata->num_arguments; i++)
        if (std::string(k.metadata->arguments[i].name) == "streaming_output")
            k.streams_output = true;
        else if (std::string(k.metadata->arguments[i].name) == "flat_rows")
            k.flat_rows = true;
}

void Package::load_device_kernels(const std::string &device) {
    static std::mutex mutex;
    std::lock_guard<std::mutex> lock(mutex);
    if (!loaded_devices_.insert(device).second) return;
    std::map<std::string, void *> opened;
    try {
        for (Kernel &k : kernels_)
            if (k.device == device && k.arch == host_arch_)
                resolve(k, opened, dir_ + "/manifest.json kernel '" + k.name + "'");
    } catch (...) {
        loaded_devices_.erase(device);  // a later plan reports the same error again
        throw;
    }
}

Package::~Package() {
    for (void *h : handles_) dlclose(h);
}

}  // namespace ng
