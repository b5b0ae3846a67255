// Errors of the runtime: a status and a message naming the argument and the bad value, kept
// per thread for ng_last_error(). Internally a failure is thrown as ng::Error and turned into a
// status at the C ABI boundary (exceptions never cross it).
#pragma once

#include "normgen/normgen.h"

#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace ng {

class Error : public std::runtime_error {
public:
    Error(ng_status status, const std::string &message)
        : std::runtime_error(message), status_(status) {}
    ng_status status() const { return status_; }

private:
    ng_status status_;
};

template <typename... Parts>
[[noreturn]] void fail(ng_status status, Parts &&...parts) {
    std::ostringstream os;
    (os << ... << std::forward<Parts>(parts));
    throw Error(status, os.str());
}

// The integer a C caller stored in an enum-typed field or parameter: any value is possible
// there, and loading it as the enum type would be undefined behaviour.
template <typename Enum>
int raw_value(const Enum &field) {
    static_assert(sizeof(Enum) == sizeof(int));
    int value;
    std::memcpy(&value, &field, sizeof value);
    return value;
}

void set_last_error(const std::string &message);
void clear_last_error();

// Runs body, mapping exceptions to a status and the thread's last-error message.
template <typename Body>
ng_status guarded(Body &&body) noexcept {
    try {
        clear_last_error();
        body();
        return NG_OK;
    } catch (const Error &e) {
        set_last_error(e.what());
        return e.status();
    } catch (const std::bad_alloc &) {
        set_last_error("out of memory");
        return NG_OUT_OF_MEMORY;
    } catch (const std::exception &e) {
        set_last_error(std::string("internal error: ") + e.what());
        return NG_INTERNAL;
    } catch (...) {
        set_last_error("internal error: unknown exception");
        return NG_INTERNAL;
    }
}

}  // namespace ng
