#include "dataplane/forwarding.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "absl/base/config.h"
#include "absl/numeric/bits.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace sflb {
namespace {

// ---------------------------------------------------------------------------------------------
// Header names

// ASCII lower-casing that does not consult the C locale (std::tolower does, on every call).
inline char AsciiLower(char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c | 0x20) : c; }

// `name` equals `lower` (which is all lower case) ignoring ASCII case.
bool EqualsLower(absl::string_view name, absl::string_view lower) {
  if (name.size() != lower.size()) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    if (AsciiLower(name[i]) != lower[i]) return false;
  }
  return true;
}

bool StartsWithLower(absl::string_view name, absl::string_view lower) {
  return name.size() >= lower.size() && EqualsLower(name.substr(0, lower.size()), lower);
}

// The length decides which few names can match, so a header costs at most two short compares.
bool IsHopByHop(absl::string_view name) {
  switch (name.size()) {
    case 2: return EqualsLower(name, "te");
    case 7: return EqualsLower(name, "trailer") || EqualsLower(name, "upgrade");
    case 10: return EqualsLower(name, "connection") || EqualsLower(name, "keep-alive");
    case 16: return EqualsLower(name, "proxy-connection");
    case 17: return EqualsLower(name, "transfer-encoding");
    case 18: return EqualsLower(name, "proxy-authenticate");
    case 19: return EqualsLower(name, "proxy-authorization");
    default: return false;
  }
}

// Request headers the proxy owns (besides hop-by-hop ones and the prefixes checked apart).
bool IsProxyOwnedRequestHeader(absl::string_view name) {
  switch (name.size()) {
    case 4: return EqualsLower(name, "host");
    case 6: return EqualsLower(name, "cookie") || EqualsLower(name, "expect");
    case 9: return EqualsLower(name, "forwarded");
    case 10: return EqualsLower(name, "local_addr") || EqualsLower(name, "local_port");
    case 11: return EqualsLower(name, "remote_addr") || EqualsLower(name, "remote_port");
    case 13: return EqualsLower(name, "authorization");
    case 14: return EqualsLower(name, "content-length");
    case 15: return EqualsLower(name, "accept-encoding");
    default: return false;
  }
}

// `name` is one of the comma-separated tokens of a Connection header (surrounding whitespace
// ignored). An empty header is one empty token, which matches only an empty name.
bool NamedInConnection(absl::string_view name, absl::string_view connection_header) {
  if (connection_header.empty()) return name.empty();
  size_t start = 0;
  for (;;) {
    size_t comma = connection_header.find(',', start);
    absl::string_view token = connection_header.substr(
        start, comma == absl::string_view::npos ? absl::string_view::npos : comma - start);
    if (absl::EqualsIgnoreCase(absl::StripAsciiWhitespace(token), name)) return true;
    if (comma == absl::string_view::npos) return false;
    start = comma + 1;
  }
}

// ---------------------------------------------------------------------------------------------
// JSON scanning
//
// A validating, allocation-free scanner for the few members the proxy reads from request and
// response bodies. It accepts exactly the JSON that nlohmann::json accepts (RFC 8259, UTF-8
// checked, surrogate pairs checked, numbers whose double value would be infinite rejected),
// except that nesting deeper than kMaxJsonDepth is an error; tests/unit/dataplane/
// forwarding_test.cc checks it against nlohmann on generated and mutated documents.

constexpr int kMaxJsonDepth = 1024;

inline bool IsJsonSpace(char c) { return c == ' ' || c == '\n' || c == '\r' || c == '\t'; }
inline bool IsDigit(char c) { return c >= '0' && c <= '9'; }

// Bytes that end a run of plain string content: '"', '\\', control characters and non-ASCII.
inline bool IsStringSpecial(char c) {
  unsigned char u = static_cast<unsigned char>(c);
  return u < 0x20 || u >= 0x80 || c == '"' || c == '\\';
}

// The first byte at or after `p` that IsStringSpecial, or `end`. Eight bytes at a time: in
// each byte of `w`, the top bit of `t` is set for a special byte (and possibly for bytes above
// a special one, through borrows; only the lowest matters).
const char* SkipPlainStringBytes(const char* p, const char* end) {
#if defined(ABSL_IS_LITTLE_ENDIAN)
  constexpr uint64_t kOnes = 0x0101010101010101ULL;
  constexpr uint64_t kHighs = 0x8080808080808080ULL;
  while (end - p >= 8) {
    uint64_t w;
    std::memcpy(&w, p, sizeof(w));
    uint64_t quote = w ^ (kOnes * '"');
    uint64_t backslash = w ^ (kOnes * '\\');
    uint64_t t = ((quote - kOnes) & ~quote) | ((backslash - kOnes) & ~backslash) |
                 (w - kOnes * 0x20) | w;
    t &= kHighs;
    if (t != 0) return p + absl::countr_zero(t) / 8;
    p += 8;
  }
#endif
  while (p < end && !IsStringSpecial(*p)) ++p;
  return p;
}

// Value of four hex digits at `p`, or -1.
int Hex4(const char* p) {
  int value = 0;
  for (int i = 0; i < 4; ++i) {
    char c = p[i];
    int digit;
    if (c >= '0' && c <= '9') digit = c - '0';
    else if (c >= 'a' && c <= 'f') digit = c - 'a' + 10;
    else if (c >= 'A' && c <= 'F') digit = c - 'A' + 10;
    else return -1;
    value = value * 16 + digit;
  }
  return value;
}

// A string token: the bytes between the quotes, as written.
struct JsonString {
  absl::string_view raw;
  bool escaped = false;  // `raw` contains backslash escapes

  // Calls sink(char) for each decoded byte until it returns false. `raw` must be valid (as
  // ScanString leaves it).
  template <typename Sink>
  void Decode(Sink&& sink) const {
    const char* p = raw.data();
    const char* end = p + raw.size();
    while (p < end) {
      char c = *p++;
      if (c == '\\') {
        char e = *p++;
        switch (e) {
          case 'b': c = '\b'; break;
          case 'f': c = '\f'; break;
          case 'n': c = '\n'; break;
          case 'r': c = '\r'; break;
          case 't': c = '\t'; break;
          case 'u': {
            uint32_t cp = static_cast<uint32_t>(Hex4(p));
            p += 4;
            if (cp >= 0xD800 && cp <= 0xDBFF) {  // a high surrogate; the low one follows
              uint32_t low = static_cast<uint32_t>(Hex4(p + 2));
              p += 6;
              cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
            }
            char utf8[4];
            int n;
            if (cp < 0x80) {
              utf8[0] = static_cast<char>(cp);
              n = 1;
            } else if (cp < 0x800) {
              utf8[0] = static_cast<char>(0xC0 | (cp >> 6));
              utf8[1] = static_cast<char>(0x80 | (cp & 0x3F));
              n = 2;
            } else if (cp < 0x10000) {
              utf8[0] = static_cast<char>(0xE0 | (cp >> 12));
              utf8[1] = static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
              utf8[2] = static_cast<char>(0x80 | (cp & 0x3F));
              n = 3;
            } else {
              utf8[0] = static_cast<char>(0xF0 | (cp >> 18));
              utf8[1] = static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
              utf8[2] = static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
              utf8[3] = static_cast<char>(0x80 | (cp & 0x3F));
              n = 4;
            }
            for (int i = 0; i < n; ++i) {
              if (!sink(utf8[i])) return;
            }
            continue;
          }
          default: c = e; break;  // '"', '\\' or '/'
        }
      }
      if (!sink(c)) return;
    }
  }

  // The decoded string equals `name`.
  bool Equals(absl::string_view name) const {
    if (!escaped) return raw == name;
    if (raw.size() < name.size()) return false;  // decoding never lengthens
    size_t i = 0;
    bool same = true;
    Decode([&](char c) {
      if (i == name.size() || name[i] != c) {
        same = false;
        return false;
      }
      ++i;
      return true;
    });
    return same && i == name.size();
  }

  // Replaces `*out` with the decoded string, cut to `limit` bytes.
  void AssignTo(std::string* out, size_t limit = std::string::npos) const {
    if (!escaped) {
      out->assign(raw.data(), std::min(raw.size(), limit));
      return;
    }
    out->clear();
    Decode([&](char c) {
      if (out->size() >= limit) return false;
      out->push_back(c);
      return true;
    });
  }
};

// A number token.
struct JsonNumber {
  absl::string_view text;
  bool negative = false;
  bool integer = true;  // no fraction and no exponent
};

// What a member callback tells ScanObject.
enum class Step { kContinue, kStop, kError };
enum class ObjectEnd { kClosed, kStopped, kError };

class JsonScanner {
 public:
  explicit JsonScanner(absl::string_view text)
      : p_(text.data()), end_(text.data() + text.size()) {}

  bool AtEnd() const { return p_ == end_; }
  // The next byte; only when !AtEnd().
  char Peek() const { return *p_; }
  void SkipWhitespace() {
    while (p_ < end_ && IsJsonSpace(*p_)) ++p_;
  }
  // Skips a UTF-8 byte order mark at the very start, as nlohmann does.
  void SkipByteOrderMark() {
    if (end_ - p_ >= 3 && p_[0] == '\xEF' && p_[1] == '\xBB' && p_[2] == '\xBF') p_ += 3;
  }
  bool Consume(char c) {
    if (p_ == end_ || *p_ != c) return false;
    ++p_;
    return true;
  }

  // At '"': scans a string and, if `out` is not null, stores it there.
  bool ScanString(JsonString* out) {
    const char* start = ++p_;
    bool escaped = false;
    for (;;) {
      p_ = SkipPlainStringBytes(p_, end_);
      if (p_ == end_) return false;
      unsigned char c = static_cast<unsigned char>(*p_);
      if (c == '"') {
        if (out != nullptr) {
          out->raw = absl::string_view(start, static_cast<size_t>(p_ - start));
          out->escaped = escaped;
        }
        ++p_;
        return true;
      }
      if (c == '\\') {
        escaped = true;
        if (!SkipEscape()) return false;
      } else if (c < 0x20) {
        return false;
      } else if (!SkipUtf8Sequence()) {
        return false;
      }
    }
  }

  // At '-' or a digit: scans a number. `out` may be null.
  bool ScanNumber(JsonNumber* out) {
    const char* start = p_;
    bool negative = Consume('-');
    if (p_ == end_) return false;
    const char* int_begin = p_;
    if (*p_ == '0') {
      ++p_;
    } else if (*p_ >= '1' && *p_ <= '9') {
      while (p_ < end_ && IsDigit(*p_)) ++p_;
    } else {
      return false;
    }
    const char* int_end = p_;
    const char* frac_begin = p_;
    const char* frac_end = p_;
    bool integer = true;
    if (Consume('.')) {
      frac_begin = p_;
      if (p_ == end_ || !IsDigit(*p_)) return false;
      while (p_ < end_ && IsDigit(*p_)) ++p_;
      frac_end = p_;
      integer = false;
    }
    int64_t exponent = 0;
    if (p_ < end_ && (*p_ == 'e' || *p_ == 'E')) {
      ++p_;
      bool exponent_negative = false;
      if (p_ < end_ && (*p_ == '+' || *p_ == '-')) exponent_negative = *p_++ == '-';
      if (p_ == end_ || !IsDigit(*p_)) return false;
      for (; p_ < end_ && IsDigit(*p_); ++p_) {
        if (exponent < 1000000000) exponent = exponent * 10 + (*p_ - '0');
      }
      if (exponent_negative) exponent = -exponent;
      integer = false;
    }
    absl::string_view text(start, static_cast<size_t>(p_ - start));
    // nlohmann rejects a number whose double value is infinite (integers too long for 64 bits
    // become doubles). Only a decimal magnitude near 10^308 can be: check those exactly.
    int64_t magnitude;  // the value is below 10^magnitude
    if (int_end - int_begin > 1 || *int_begin != '0') {
      magnitude = std::min<int64_t>(int_end - int_begin, 1000000000);
    } else {
      const char* q = frac_begin;
      while (q < frac_end && *q == '0') ++q;
      magnitude = q == frac_end ? -2000000000  // zero
                                : -std::min<int64_t>(q - frac_begin, 1000000000);
    }
    if (magnitude + exponent > 300) {
      double value;
      if (!absl::SimpleAtod(text, &value) || !std::isfinite(value)) return false;
    }
    if (out != nullptr) {
      out->text = text;
      out->negative = negative;
      out->integer = integer;
    }
    return true;
  }

  // At 't' or 'f': scans true or false.
  bool ScanBool(bool* value) {
    if (*p_ == 't') {
      *value = true;
      return ScanWord("true");
    }
    *value = false;
    return ScanWord("false");
  }

  // Skips one value of any type; `depth` is the nesting depth of the value's container.
  bool SkipValue(int depth) {
    // Which open containers (beyond `depth`) are objects: bit i for the i-th.
    uint64_t is_object_bits[kMaxJsonDepth / 64];
    int open = 0;
    for (;;) {
      // A value starts here.
      if (p_ == end_) return false;
      char c = *p_;
      if (c == '{' || c == '[') {
        if (depth + open + 1 > kMaxJsonDepth) return false;
        bool is_object = c == '{';
        uint64_t& word = is_object_bits[open / 64];
        if (open % 64 == 0) word = 0;
        uint64_t bit = uint64_t{1} << (open % 64);
        word = is_object ? (word | bit) : (word & ~bit);
        ++open;
        ++p_;
        SkipWhitespace();
        if (Consume(is_object ? '}' : ']')) {
          --open;
        } else {
          if (is_object && !ScanKeyAndColon()) return false;
          SkipWhitespace();
          continue;  // the first element's value
        }
      } else if (c == '"') {
        if (!ScanString(nullptr)) return false;
      } else if (c == '-' || IsDigit(c)) {
        if (!ScanNumber(nullptr)) return false;
      } else if (c == 't') {
        if (!ScanWord("true")) return false;
      } else if (c == 'f') {
        if (!ScanWord("false")) return false;
      } else if (c == 'n') {
        if (!ScanWord("null")) return false;
      } else {
        return false;
      }
      // A value ended: close containers until one has a next element.
      for (;;) {
        if (open == 0) return true;
        SkipWhitespace();
        if (p_ == end_) return false;
        bool is_object = (is_object_bits[(open - 1) / 64] >> ((open - 1) % 64)) & 1;
        char d = *p_++;
        if (d == ',') {
          SkipWhitespace();
          if (is_object && !ScanKeyAndColon()) return false;
          SkipWhitespace();
          break;
        }
        if (d != (is_object ? '}' : ']')) return false;
        --open;
      }
    }
  }

  // At '{' of an object at nesting depth `depth` (1 for the top level): for each member, scans
  // the key and calls on_member(const JsonString& key) with the scanner at the member's value
  // (not at the end); on_member consumes the value.
  template <typename OnMember>
  ObjectEnd ScanObject(int depth, OnMember&& on_member) {
    if (depth > kMaxJsonDepth) return ObjectEnd::kError;
    ++p_;
    SkipWhitespace();
    if (Consume('}')) return ObjectEnd::kClosed;
    for (;;) {
      if (p_ == end_ || *p_ != '"') return ObjectEnd::kError;
      JsonString key;
      if (!ScanString(&key)) return ObjectEnd::kError;
      SkipWhitespace();
      if (!Consume(':')) return ObjectEnd::kError;
      SkipWhitespace();
      if (p_ == end_) return ObjectEnd::kError;
      Step step = on_member(key);
      if (step == Step::kStop) return ObjectEnd::kStopped;
      if (step == Step::kError) return ObjectEnd::kError;
      SkipWhitespace();
      if (Consume(',')) {
        SkipWhitespace();
        continue;
      }
      return Consume('}') ? ObjectEnd::kClosed : ObjectEnd::kError;
    }
  }

  // Skips a value inside a container at `depth` and says how that went.
  Step Skip(int depth) { return SkipValue(depth) ? Step::kContinue : Step::kError; }

 private:
  bool ScanWord(absl::string_view word) {
    if (static_cast<size_t>(end_ - p_) < word.size() ||
        absl::string_view(p_, word.size()) != word) {
      return false;
    }
    p_ += word.size();
    return true;
  }

  bool ScanKeyAndColon() {
    if (p_ == end_ || *p_ != '"' || !ScanString(nullptr)) return false;
    SkipWhitespace();
    return Consume(':');
  }

  // At '\\' inside a string: one escape, with nlohmann's surrogate rules (a high surrogate
  // must be followed by an escaped low one; a lone low surrogate is an error).
  bool SkipEscape() {
    if (end_ - p_ < 2) return false;
    switch (p_[1]) {
      case '"': case '\\': case '/': case 'b': case 'f': case 'n': case 'r': case 't':
        p_ += 2;
        return true;
      case 'u': break;
      default: return false;
    }
    if (end_ - p_ < 6) return false;
    int cp = Hex4(p_ + 2);
    if (cp < 0) return false;
    p_ += 6;
    if (cp >= 0xD800 && cp <= 0xDBFF) {
      if (end_ - p_ < 6 || p_[0] != '\\' || p_[1] != 'u') return false;
      int low = Hex4(p_ + 2);
      if (low < 0xDC00 || low > 0xDFFF) return false;
      p_ += 6;
      return true;
    }
    return cp < 0xDC00 || cp > 0xDFFF;
  }

  // At a byte >= 0x80 inside a string: one well-formed UTF-8 sequence.
  bool SkipUtf8Sequence() {
    unsigned char c = static_cast<unsigned char>(*p_);
    int length;
    unsigned char second_low = 0x80, second_high = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) {
      length = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      length = 3;
      if (c == 0xE0) second_low = 0xA0;
      if (c == 0xED) second_high = 0x9F;  // no surrogates
    } else if (c >= 0xF0 && c <= 0xF4) {
      length = 4;
      if (c == 0xF0) second_low = 0x90;
      if (c == 0xF4) second_high = 0x8F;  // at most U+10FFFF
    } else {
      return false;
    }
    if (end_ - p_ < length) return false;
    unsigned char second = static_cast<unsigned char>(p_[1]);
    if (second < second_low || second > second_high) return false;
    for (int i = 2; i < length; ++i) {
      unsigned char next = static_cast<unsigned char>(p_[i]);
      if (next < 0x80 || next > 0xBF) return false;
    }
    p_ += length;
    return true;
  }

  const char* p_;
  const char* end_;
};

// One of the usage object's counters.
struct TokenCount {
  uint64_t value = 0;
  bool valid = true;  // absent (0) or a number ExtractUsage accepts
};

// At a usage member's value: reads it into `count` (see ExtractUsage for what is accepted).
Step ScanTokenCount(JsonScanner& s, TokenCount* count) {
  char c = s.Peek();
  if (c != '-' && !IsDigit(c)) {
    count->value = 0;
    count->valid = false;
    return s.Skip(2);
  }
  JsonNumber number;
  if (!s.ScanNumber(&number)) return Step::kError;
  count->value = 0;
  count->valid = false;
  if (number.integer && !number.negative) {
    uint64_t value = 0;
    for (char d : number.text) {
      uint64_t digit = static_cast<uint64_t>(d - '0');
      if (value > (std::numeric_limits<uint64_t>::max() - digit) / 10) return Step::kContinue;
      value = value * 10 + digit;
    }
    count->value = value;
    count->valid = true;
  } else if (number.integer) {
    count->valid = number.text == "-0";
  } else {
    double value;
    if (absl::SimpleAtod(number.text, &value) && value > -1.0 && value < 18446744073709551616.0) {
      count->value = static_cast<uint64_t>(value);
      count->valid = true;
    }
  }
  return Step::kContinue;
}

}  // namespace

std::pair<absl::string_view, absl::string_view> SplitTarget(absl::string_view target) {
  size_t q = target.find('?');
  if (q == absl::string_view::npos) return {target, absl::string_view()};
  return {target.substr(0, q), target.substr(q + 1)};
}

std::string StripVersionPrefix(absl::string_view path) {
  if (path == "/v1") return "/";
  if (absl::StartsWith(path, "/v1/")) return std::string(path.substr(3));
  if (path.empty() || path.front() != '/') return absl::StrCat("/", path);
  return std::string(path);
}

std::string NormalizePath(absl::string_view decoded_path) {
  std::vector<absl::string_view> segments;
  for (absl::string_view segment : absl::StrSplit(decoded_path, '/')) {
    if (segment.empty() || segment == ".") continue;
    if (segment == "..") {
      if (!segments.empty()) segments.pop_back();
      continue;
    }
    segments.push_back(segment);
  }
  std::string out;
  for (absl::string_view segment : segments) absl::StrAppend(&out, "/", segment);
  return out.empty() ? "/" : out;
}

std::string UpstreamTarget(absl::string_view base_path, absl::string_view path,
                           absl::string_view query) {
  std::string out = absl::StrCat(base_path, path);
  if (!query.empty()) absl::StrAppend(&out, "?", query);
  return out;
}

bool IsRequestHeaderDropped(absl::string_view name, absl::string_view connection_header) {
  return IsHopByHop(name) || IsProxyOwnedRequestHeader(name) ||
         StartsWithLower(name, "x-forwarded-") || StartsWithLower(name, "proxy-") ||
         NamedInConnection(name, connection_header);
}

bool IsResponseHeaderDropped(absl::string_view name, absl::string_view connection_header) {
  return IsHopByHop(name) || EqualsLower(name, "content-length") ||
         NamedInConnection(name, connection_header);
}

BodySummary SummarizeBody(absl::string_view body) {
  BodySummary out;
  absl::string_view trimmed = absl::StripLeadingAsciiWhitespace(body);
  if (trimmed.empty() || trimmed.front() != '{') return out;
  JsonScanner s(trimmed);
  bool seen_model = false;
  bool seen_stream = false;
  // A malformed body stops the scan; `out` keeps what was found before that point.
  s.ScanObject(1, [&](const JsonString& key) {
    char c = s.Peek();
    if (c == '"') {
      JsonString value;
      if (!s.ScanString(&value)) return Step::kError;
      if (key.Equals("model")) {
        value.AssignTo(&out.model);
        seen_model = true;
      }
    } else if (c == 't' || c == 'f') {
      bool value;
      if (!s.ScanBool(&value)) return Step::kError;
      if (key.Equals("stream")) {
        out.stream = value;
        seen_stream = true;
      }
    } else if (!s.SkipValue(1)) {
      return Step::kError;
    }
    return seen_model && seen_stream ? Step::kStop : Step::kContinue;
  });
  return out;
}

bool ExtractUsage(absl::string_view json, uint64_t* prompt_tokens, uint64_t* completion_tokens) {
  JsonScanner s(json);
  s.SkipByteOrderMark();
  s.SkipWhitespace();
  if (s.AtEnd() || s.Peek() != '{') return false;
  // The last "usage" member wins, as in a parsed document.
  bool have_usage = false;
  TokenCount prompt;
  TokenCount completion;
  ObjectEnd end = s.ScanObject(1, [&](const JsonString& key) {
    if (!key.Equals("usage")) return s.Skip(1);
    have_usage = false;
    if (s.Peek() != '{') return s.Skip(1);
    prompt = TokenCount();
    completion = TokenCount();
    ObjectEnd usage_end = s.ScanObject(2, [&](const JsonString& name) {
      if (name.Equals("prompt_tokens")) return ScanTokenCount(s, &prompt);
      if (name.Equals("completion_tokens")) return ScanTokenCount(s, &completion);
      return s.Skip(2);
    });
    if (usage_end != ObjectEnd::kClosed) return Step::kError;
    have_usage = true;
    return Step::kContinue;
  });
  if (end != ObjectEnd::kClosed) return false;
  s.SkipWhitespace();
  if (!s.AtEnd() || !have_usage || !prompt.valid || !completion.valid) return false;
  *prompt_tokens = prompt.value;
  *completion_tokens = completion.value;
  return true;
}

std::string ExtractErrorMessage(absl::string_view json) {
  constexpr size_t kMaxMessageBytes = 512;
  JsonScanner s(json);
  s.SkipByteOrderMark();
  s.SkipWhitespace();
  if (s.AtEnd() || s.Peek() != '{') return "";
  // The last top-level "message" and the last "message" of the last "error", when strings.
  JsonString message;
  bool have_message = false;
  JsonString error_message;
  bool have_error_message = false;
  ObjectEnd end = s.ScanObject(1, [&](const JsonString& key) {
    if (key.Equals("message")) {
      have_message = s.Peek() == '"';
      return have_message ? (s.ScanString(&message) ? Step::kContinue : Step::kError) : s.Skip(1);
    }
    if (!key.Equals("error")) return s.Skip(1);
    have_error_message = false;
    if (s.Peek() != '{') return s.Skip(1);
    ObjectEnd error_end = s.ScanObject(2, [&](const JsonString& name) {
      if (!name.Equals("message")) return s.Skip(2);
      have_error_message = s.Peek() == '"';
      if (!have_error_message) return s.Skip(2);
      return s.ScanString(&error_message) ? Step::kContinue : Step::kError;
    });
    return error_end == ObjectEnd::kClosed ? Step::kContinue : Step::kError;
  });
  if (end != ObjectEnd::kClosed) return "";
  s.SkipWhitespace();
  if (!s.AtEnd()) return "";
  std::string out;
  if (have_message) message.AssignTo(&out, kMaxMessageBytes);
  if (out.empty() && have_error_message) error_message.AssignTo(&out, kMaxMessageBytes);
  return out;
}

}  // namespace sflb
