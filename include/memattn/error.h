// Typed errors. The Python binding maps each kind to a Python exception class, so a bad
// argument surfaces as ValueError / TypeError and an unsupported configuration as
// NotImplementedError, never as a crash.
#pragma once

#include <stdexcept>
#include <string>

namespace memattn {

enum class ErrorKind {
  invalid_value,    // -> ValueError: a shape, size or option is wrong
  invalid_type,     // -> TypeError: a dtype is wrong
  not_implemented,  // -> NotImplementedError: valid, but no backend supports it here
  runtime,          // -> RuntimeError: a failure while running (e.g. a CUDA error)
};

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

}  // namespace memattn
