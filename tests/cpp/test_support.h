// Helpers shared by the C++ tests: tensor views from metadata, error assertions, a scoped
// environment variable (MEMATTN_CPU_ISA is read by the CPU backend on every call).
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "memattn/api.h"

namespace memattn_test {

// A view with row-major strides; data stays null (validation works from metadata alone).
inline memattn::TensorView meta_view(memattn::DType dtype, std::vector<std::int64_t> sizes,
                                     memattn::DeviceType device = memattn::DeviceType::cpu,
                                     int device_index = 0) {
  memattn::TensorView v;
  v.dtype = dtype;
  v.device = device;
  v.device_index = device_index;
  v.rank = static_cast<int>(sizes.size());
  std::int64_t stride = 1;
  for (int d = v.rank - 1; d >= 0; --d) {
    v.sizes[d] = sizes[d];
    v.strides[d] = stride;
    stride *= sizes[d] > 0 ? sizes[d] : 1;
  }
  return v;
}

inline const char* kind_name(memattn::ErrorKind kind) {
  switch (kind) {
    case memattn::ErrorKind::invalid_value:
      return "invalid_value";
    case memattn::ErrorKind::invalid_type:
      return "invalid_type";
    case memattn::ErrorKind::not_implemented:
      return "not_implemented";
    case memattn::ErrorKind::runtime:
      return "runtime";
  }
  return "<unknown ErrorKind>";
}

// True when `word` occurs in `text` as a whole identifier: "q" matches "q: expected" and
// "q.size(0)" but not "required" or "grad_q".
inline bool contains_word(const std::string& text, const std::string& word) {
  auto is_ident = [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
  };
  for (std::size_t pos = text.find(word); pos != std::string::npos;
       pos = text.find(word, pos + 1)) {
    const bool left_ok = pos == 0 || !is_ident(text[pos - 1]);
    const std::size_t end = pos + word.size();
    const bool right_ok = end == text.size() || !is_ident(text[end]);
    if (left_ok && right_ok) return true;
  }
  return false;
}

// Runs `fn` and checks that it throws memattn::Error of `kind` whose message names the
// argument `arg` (as a whole word) and contains every string of `needles`.
template <class Fn>
::testing::AssertionResult ThrowsError(Fn&& fn, memattn::ErrorKind kind, const std::string& arg,
                                       std::initializer_list<std::string> needles = {}) {
  try {
    fn();
  } catch (const memattn::Error& e) {
    const std::string msg = e.what();
    if (e.kind() != kind) {
      return ::testing::AssertionFailure()
             << "expected ErrorKind::" << kind_name(kind)
             << ", got ErrorKind::" << kind_name(e.kind()) << " with message: " << msg;
    }
    if (!arg.empty() && !contains_word(msg, arg)) {
      return ::testing::AssertionFailure()
             << "message does not name the argument '" << arg << "': " << msg;
    }
    for (const std::string& needle : needles) {
      if (msg.find(needle) == std::string::npos) {
        return ::testing::AssertionFailure()
               << "message does not contain \"" << needle << "\": " << msg;
      }
    }
    return ::testing::AssertionSuccess() << msg;
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure()
           << "expected memattn::Error, got another std::exception: " << e.what();
  }
  return ::testing::AssertionFailure()
         << "expected memattn::Error(" << kind_name(kind) << "), nothing was thrown";
}

// Sets (or, with nullopt, unsets) an environment variable for the lifetime of the object.
class ScopedEnv {
 public:
  ScopedEnv(std::string name, const std::optional<std::string>& value) : name_(std::move(name)) {
    if (const char* old = std::getenv(name_.c_str())) old_ = std::string(old);
    set(value);
  }
  ~ScopedEnv() { set(old_); }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  void set(const std::optional<std::string>& value) {
    if (value) {
      setenv(name_.c_str(), value->c_str(), 1);
    } else {
      unsetenv(name_.c_str());
    }
  }
  std::string name_;
  std::optional<std::string> old_;
};

}  // namespace memattn_test
