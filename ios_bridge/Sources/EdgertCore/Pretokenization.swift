import Foundation

// The text side of `tokenizer.json`: normalizers and pre-tokenizers, as HF tokenizers applies
// them. Text is handled as Unicode scalars throughout (Rust `char`s), never as Swift
// `Character`s: a split may fall inside a grapheme cluster.

typealias Scalars = [Unicode.Scalar]

extension Array where Element == Unicode.Scalar {
    init(_ text: String) {
        self = Array(text.unicodeScalars)
    }

    var string: String {
        var s = String.UnicodeScalarView()
        s.append(contentsOf: self)
        return String(s)
    }

    /// Non-overlapping occurrences of `pattern` replaced left to right (Python's str.replace).
    func replacing(_ pattern: Scalars, with content: Scalars) -> Scalars {
        guard !pattern.isEmpty, count >= pattern.count else { return self }
        var out: Scalars = []
        out.reserveCapacity(count)
        var i = 0
        while i < count {
            if i + pattern.count <= count, self[i] == pattern[0],
               self[i..<(i + pattern.count)].elementsEqual(pattern)
            {
                out.append(contentsOf: content)
                i += pattern.count
            } else {
                out.append(self[i])
                i += 1
            }
        }
        return out
    }
}

/// A regular expression as HF tokenizers (Oniguruma) reads it, run by ICU
/// (NSRegularExpression). ICU's `\s` lacks U+000B and U+0085, which Oniguruma's has: they are
/// added. Immutable, so shared across threads.
final class TokenizerRegex: @unchecked Sendable {
    let regex: NSRegularExpression

    init(_ pattern: String) throws {
        do {
            regex = try NSRegularExpression(pattern: TokenizerRegex.translate(pattern))
        } catch {
            throw EdgertError.tokenizer("regex \(pattern) does not compile: \(error)")
        }
    }

    /// `\s` -> `[\s\x{0B}\x{85}]` outside character classes, `\s\x{0B}\x{85}` inside;
    /// `\S` -> `[^\s\x{0B}\x{85}]` outside classes.
    static func translate(_ pattern: String) -> String {
        var out = ""
        var inClass = false
        var chars = [Character](pattern)[...]
        while let c = chars.popFirst() {
            if c == "\\", let next = chars.popFirst() {
                switch (next, inClass) {
                case ("s", false): out += "[\\s\\x{0B}\\x{85}]"
                case ("s", true): out += "\\s\\x{0B}\\x{85}"
                case ("S", false): out += "[^\\s\\x{0B}\\x{85}]"
                default: out += "\\\(next)"
                }
                continue
            }
            if c == "[" && !inClass {
                inClass = true
                out.append(c)
                if chars.first == "^" { out.append(chars.removeFirst()) }
                if chars.first == "]" { out.append(chars.removeFirst()) }
                continue
            }
            if c == "]" && inClass { inClass = false }
            out.append(c)
        }
        return out
    }

    /// The matches in `text` as scalar-offset ranges.
    func matches(in text: Scalars) -> [Range<Int>] {
        let string = text.string
        // UTF-16 offset -> scalar offset
        var scalarAt = [Int](repeating: 0, count: string.utf16.count + 1)
        var u = 0
        for (i, s) in text.enumerated() {
            let width = s.value > 0xFFFF ? 2 : 1
            for k in 0..<width { scalarAt[u + k] = i }
            u += width
        }
        scalarAt[u] = text.count
        let ns = NSRange(location: 0, length: u)
        return regex.matches(in: string, range: ns).compactMap { m in
            let r = m.range
            guard r.location != NSNotFound, r.length > 0 else { return nil }
            return scalarAt[r.location]..<scalarAt[r.location + r.length]
        }
    }
}

/// A `tokenizer.json` normalizer (applied to each text run between added tokens).
enum Normalizer: Sendable {
    case prepend(Scalars)
    case replace(Scalars, Scalars)
    case nfc, nfkc, lowercase
    case sequence([Normalizer])

    static func from(_ json: JSON?) throws -> Normalizer? {
        guard let json, !json.isNull else { return nil }
        switch json["type"]?.string {
        case "Sequence":
            return .sequence(try (json["normalizers"]?.array ?? []).compactMap(from))
        case "Prepend":
            return .prepend(Scalars(json["prepend"]?.string ?? ""))
        case "Replace":
            guard let pattern = json["pattern"]?["String"]?.string else {
                throw EdgertError.tokenizer("Replace normalizer with a regex pattern")
            }
            return .replace(Scalars(pattern), Scalars(json["content"]?.string ?? ""))
        case "NFC": return .nfc
        case "NFKC": return .nfkc
        case "Lowercase": return .lowercase
        case let other:
            throw EdgertError.tokenizer("normalizer \(other ?? "?") is not supported")
        }
    }

    func apply(_ text: Scalars) -> Scalars {
        switch self {
        case .prepend(let p):
            return text.isEmpty ? text : p + text
        case .replace(let a, let b):
            return text.replacing(a, with: b)
        case .nfc:
            return Scalars(text.string.precomposedStringWithCanonicalMapping)
        case .nfkc:
            return Scalars(text.string.precomposedStringWithCompatibilityMapping)
        case .lowercase:
            return Scalars(text.string.lowercased())
        case .sequence(let steps):
            return steps.reduce(text) { $1.apply($0) }
        }
    }
}

/// GPT-2's byte-to-character table: printable bytes map to themselves, the rest to U+0100...
enum ByteLevel {
    static let byteToScalar: [Unicode.Scalar] = {
        var table = [Unicode.Scalar](repeating: " ", count: 256)
        var next: UInt32 = 256
        for b in 0..<256 {
            let printable = (0x21...0x7E).contains(b) || (0xA1...0xAC).contains(b)
                || (0xAE...0xFF).contains(b)
            if printable {
                table[b] = Unicode.Scalar(UInt32(b))!
            } else {
                table[b] = Unicode.Scalar(next)!
                next += 1
            }
        }
        return table
    }()

    static let scalarToByte: [UInt32: UInt8] = {
        var map: [UInt32: UInt8] = [:]
        for (b, s) in byteToScalar.enumerated() { map[s.value] = UInt8(b) }
        return map
    }()

    static let gpt2Split = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"
}

/// A `tokenizer.json` pre-tokenizer: splits a normalized run into the pieces BPE sees.
enum PreTokenizer: Sendable {
    enum Behavior: String, Sendable {
        case isolated = "Isolated", removed = "Removed"
        case mergedWithPrevious = "MergedWithPrevious", mergedWithNext = "MergedWithNext"
    }

    case split(TokenizerRegex, Behavior)
    case byteLevel(addPrefixSpace: Bool, split: TokenizerRegex?)
    case metaspace(replacement: Unicode.Scalar, prependAlways: Bool, prependFirst: Bool,
                   split: Bool)
    case sequence([PreTokenizer])

    static func from(_ json: JSON?) throws -> PreTokenizer? {
        guard let json, !json.isNull else { return nil }
        switch json["type"]?.string {
        case "Sequence":
            return .sequence(try (json["pretokenizers"]?.array ?? []).compactMap(from))
        case "Split":
            guard json["invert"]?.bool != true else {
                throw EdgertError.tokenizer("inverted Split pre-tokenizer is not supported")
            }
            let raw = json["behavior"]?.string ?? "Isolated"
            guard let behavior = Behavior(rawValue: raw) else {
                throw EdgertError.tokenizer("Split behavior \(raw) is not supported")
            }
            let regex: String
            if let r = json["pattern"]?["Regex"]?.string {
                regex = r
            } else if let s = json["pattern"]?["String"]?.string {
                regex = NSRegularExpression.escapedPattern(for: s)
            } else {
                throw EdgertError.tokenizer("Split pre-tokenizer without a pattern")
            }
            return .split(try TokenizerRegex(regex), behavior)
        case "ByteLevel":
            let useRegex = json["use_regex"]?.bool ?? true
            return .byteLevel(addPrefixSpace: json["add_prefix_space"]?.bool ?? false,
                              split: useRegex ? try TokenizerRegex(ByteLevel.gpt2Split) : nil)
        case "Metaspace":
            let replacement = json["replacement"]?.string?.unicodeScalars.first ?? "\u{2581}"
            let scheme = json["prepend_scheme"]?.string ?? "always"
            return .metaspace(replacement: replacement, prependAlways: scheme == "always",
                              prependFirst: scheme == "first", split: json["split"]?.bool ?? true)
        case let other:
            throw EdgertError.tokenizer("pre-tokenizer \(other ?? "?") is not supported")
        }
    }

    /// `pieces` -> the finer pieces; `atStart` is true for the run at the very start of the
    /// text (Metaspace's `first` scheme).
    func apply(_ pieces: [Scalars], atStart: Bool) -> [Scalars] {
        switch self {
        case .sequence(let steps):
            return steps.reduce(pieces) { $1.apply($0, atStart: atStart) }
        case .split(let regex, let behavior):
            return pieces.flatMap { PreTokenizer.split($0, regex, behavior) }
        case .byteLevel(let addPrefixSpace, let regex):
            return pieces.flatMap { piece -> [Scalars] in
                var p = piece
                if addPrefixSpace && p.first != " " { p.insert(" ", at: 0) }
                let parts = regex.map { PreTokenizer.split(p, $0, .isolated) } ?? [p]
                return parts.map { part in
                    var bytes: Scalars = []
                    for b in part.string.utf8 { bytes.append(ByteLevel.byteToScalar[Int(b)]) }
                    return bytes
                }
            }
        case .metaspace(let r, let always, let first, let split):
            var out: [Scalars] = []
            for (i, piece) in pieces.enumerated() {
                var p = piece.map { $0 == " " ? r : $0 }
                if (always || (first && atStart && i == 0)) && p.first != r {
                    p.insert(r, at: 0)
                }
                guard split else {
                    out.append(p)
                    continue
                }
                var current: Scalars = []
                for s in p {  // MergedWithNext on the replacement character
                    if s == r && !current.isEmpty {
                        out.append(current)
                        current = []
                    }
                    current.append(s)
                }
                if !current.isEmpty { out.append(current) }
            }
            return out
        }
    }

    /// HF's Split: the text as alternating gaps and matches, then joined per `behavior`.
    static func split(_ text: Scalars, _ regex: TokenizerRegex, _ behavior: Behavior) -> [Scalars] {
        var segments: [(Range<Int>, Bool)] = []  // (range, is a match)
        var last = 0
        for r in regex.matches(in: text) {
            if r.lowerBound > last { segments.append((last..<r.lowerBound, false)) }
            segments.append((r, true))
            last = r.upperBound
        }
        if last < text.count { segments.append((last..<text.count, false)) }

        var merged: [Range<Int>] = []
        switch behavior {
        case .isolated:
            merged = segments.map(\.0)
        case .removed:
            merged = segments.filter { !$0.1 }.map(\.0)
        case .mergedWithPrevious:
            var previousMatch = false
            for (r, isMatch) in segments {
                if isMatch && !previousMatch, let prev = merged.last {
                    merged[merged.count - 1] = prev.lowerBound..<r.upperBound
                } else {
                    merged.append(r)
                }
                previousMatch = isMatch
            }
        case .mergedWithNext:
            var previousMatch = false
            for (r, isMatch) in segments.reversed() {
                if isMatch && !previousMatch, let next = merged.last {
                    merged[merged.count - 1] = r.lowerBound..<next.upperBound
                } else {
                    merged.append(r)
                }
                previousMatch = isMatch
            }
            merged.reverse()
        }
        return merged.filter { !$0.isEmpty }.map { Array(text[$0]) }
    }
}
