import Foundation

/// Turns generated tokens into text as they arrive.
public protocol Detokenizer {
    /// The text that `token` completes: what no later token can change (may be empty).
    mutating func add(_ token: Int) -> String
    /// The text still held back (an unfinished character), at the end of generation.
    mutating func finish() -> String
}

/// What `tokenizer.json`'s decoder does, as the steps the streaming detokenizer follows.
struct DecoderPlan: Sendable {
    enum TokenStep: Sendable {
        case replace(Scalars, Scalars)
        /// Strip up to `start` leading and `stop` trailing `content` characters of each token.
        case strip(Unicode.Scalar, Int, Int)
        /// Metaspace: the replacement character becomes a space; in the first token it is
        /// dropped (unless the prepend scheme is `never`).
        case metaspace(Unicode.Scalar, dropInFirst: Bool)
    }

    /// GPT-2 byte-level: each token's characters are bytes, decoded as UTF-8 (lossy).
    var byteLevel = false
    var steps: [TokenStep] = []
    /// `<0xXX>` tokens are bytes; a run of them is its UTF-8 text, or one U+FFFD per byte
    /// when the run is not valid UTF-8.
    var byteFallback = false
    /// Strip up to n leading `content` characters of the whole text (Strip after Fuse).
    var stripLeading: (content: Unicode.Scalar, count: Int)? = nil
    /// Between tokens: "" with any decoder, " " without one (HF joins tokens with spaces).
    var joiner: Scalars = []

    static func from(_ json: JSON?) throws -> DecoderPlan {
        var plan = DecoderPlan()
        guard let json, !json.isNull else {
            plan.joiner = [" "]
            return plan
        }
        let list = json["type"]?.string == "Sequence" ? (json["decoders"]?.array ?? []) : [json]
        var fused = false
        for d in list {
            switch d["type"]?.string {
            case "ByteLevel":
                guard list.count == 1 else {
                    throw EdgertError.tokenizer("ByteLevel decoder inside a sequence")
                }
                plan.byteLevel = true
            case "Replace":
                guard !plan.byteFallback, let pattern = d["pattern"]?["String"]?.string else {
                    throw EdgertError.tokenizer("Replace decoder with a regex or after ByteFallback")
                }
                plan.steps.append(.replace(Scalars(pattern), Scalars(d["content"]?.string ?? "")))
            case "ByteFallback":
                plan.byteFallback = true
            case "Fuse":
                fused = true
            case "Strip":
                let content = d["content"]?.string?.unicodeScalars.first ?? " "
                let start = d["start"]?.int ?? 0, stop = d["stop"]?.int ?? 0
                if fused || plan.byteFallback {
                    guard stop == 0 else {
                        throw EdgertError.tokenizer("Strip decoder with stop > 0 after Fuse")
                    }
                    plan.stripLeading = (content, start)
                } else {
                    plan.steps.append(.strip(content, start, stop))
                }
            case "Metaspace":
                let r = d["replacement"]?.string?.unicodeScalars.first ?? "\u{2581}"
                let scheme = d["prepend_scheme"]?.string
                    ?? ((d["add_prefix_space"]?.bool ?? true) ? "always" : "never")
                plan.steps.append(.metaspace(r, dropInFirst: scheme != "never"))
            case let other:
                throw EdgertError.tokenizer("decoder \(other ?? "?") is not supported")
            }
        }
        return plan
    }
}

/// The streaming detokenizer of `BPETokenizer`: it follows the decoder's own steps, so what
/// it emits concatenates to exactly the full decode of the same tokens, and it never stops
/// emitting. The work per token is bounded: each token's text goes through each step once.
///
/// What is held back, and only until it is final:
/// - an unfinished UTF-8 character at the end of byte-level text (at most 3 bytes);
/// - a run of `<0xXX>` byte tokens until the next other token (a run that is not valid
///   UTF-8 decodes to one U+FFFD per byte, so no part of it is final before its end);
/// - the leading characters the decoder may strip, until the first other one;
/// - with `clean_up_tokenization_spaces`, the last few characters that could start one of
///   transformers' cleanups (" ." -> "."), at most 3 per rule.
public struct StreamingDetokenizer: Detokenizer {
    let plan: DecoderPlan
    let lookup: (Int) -> String?
    var tokenIndex = 0
    var pendingBytes: [UInt8] = []
    var run: [UInt8] = []
    var stripRemaining: Int
    var cleanups: [StreamingReplace]

    init(plan: DecoderPlan, cleanUp: Bool, lookup: @escaping (Int) -> String?) {
        self.plan = plan
        self.lookup = lookup
        stripRemaining = plan.stripLeading?.count ?? 0
        cleanups = cleanUp ? StreamingReplace.tokenizationCleanup : []
    }

    public mutating func add(_ token: Int) -> String {
        guard let text = lookup(token) else { return "" }  // unknown ids decode to nothing
        let index = tokenIndex
        tokenIndex += 1
        var out: Scalars = []
        if plan.byteLevel {
            pendingBytes += StreamingDetokenizer.bytes(ofByteLevel: text)
            out = StreamingDetokenizer.takeUTF8(&pendingBytes, final: false)
        } else {
            var t = Scalars(text)
            for step in plan.steps { t = StreamingDetokenizer.apply(step, t, first: index == 0) }
            if plan.byteFallback, let byte = StreamingDetokenizer.fallbackByte(t) {
                run.append(byte)
                return ""
            }
            out = flushRun()
            if index > 0 { out += plan.joiner }
            out += t
        }
        return emit(out, final: false)
    }

    public mutating func finish() -> String {
        var out = StreamingDetokenizer.takeUTF8(&pendingBytes, final: true)
        out += flushRun()
        return emit(out, final: true)
    }

    mutating func flushRun() -> Scalars {
        defer { run = [] }
        guard !run.isEmpty else { return [] }
        if let s = String(bytes: run, encoding: .utf8) { return Scalars(s) }
        return Scalars(repeating: "\u{FFFD}", count: run.count)
    }

    mutating func emit(_ text: Scalars, final: Bool) -> String {
        var t = text[...]
        if stripRemaining > 0, let content = plan.stripLeading?.content {
            while stripRemaining > 0, t.first == content {
                t.removeFirst()
                stripRemaining -= 1
            }
            if !t.isEmpty { stripRemaining = 0 }
        }
        var out = Array(t)
        for i in cleanups.indices { out = cleanups[i].feed(out, final: final) }
        return out.string
    }

    static func apply(_ step: DecoderPlan.TokenStep, _ t: Scalars, first: Bool) -> Scalars {
        switch step {
        case .replace(let a, let b):
            return t.replacing(a, with: b)
        case .strip(let c, let start, let stop):
            var s = t[...]
            for _ in 0..<start where s.first == c { s.removeFirst() }
            for _ in 0..<stop where s.last == c { s.removeLast() }
            return Array(s)
        case .metaspace(let r, let dropInFirst):
            return t.compactMap { $0 == r ? (first && dropInFirst ? nil : " ") : $0 }
        }
    }

    /// `<0xXX>` (exactly six characters, as HF's ByteFallback checks) -> the byte.
    static func fallbackByte(_ t: Scalars) -> UInt8? {
        guard t.count == 6, t.starts(with: Scalars("<0x")), t.last == ">" else { return nil }
        return UInt8(Array(t[3..<5]).string, radix: 16)
    }

    /// A byte-level token's bytes; a token with a character outside the byte table (an added
    /// token such as "<|im_end|>" in non-ASCII) contributes its own UTF-8 instead.
    static func bytes(ofByteLevel text: String) -> [UInt8] {
        var bytes: [UInt8] = []
        for s in text.unicodeScalars {
            guard let b = ByteLevel.scalarToByte[s.value] else { return Array(text.utf8) }
            bytes.append(b)
        }
        return bytes
    }

    /// Decode `bytes` as UTF-8 (invalid sequences -> U+FFFD, as Rust's from_utf8_lossy),
    /// leaving in it an unfinished character at the end unless `final`.
    static func takeUTF8(_ bytes: inout [UInt8], final: Bool) -> Scalars {
        let cut = final ? bytes.count : unfinishedTail(bytes)
        guard cut > 0 else { return [] }
        let text = Scalars(String(decoding: bytes[..<cut], as: UTF8.self))
        bytes.removeFirst(cut)
        return text
    }

    /// Where a trailing incomplete but still valid UTF-8 sequence starts (bytes.count if none).
    static func unfinishedTail(_ b: [UInt8]) -> Int {
        let n = b.count
        for back in 1...min(3, max(n, 1)) where n > 0 {
            let i = n - back
            let lead = b[i]
            if lead & 0xC0 == 0x80 { continue }
            let need: Int
            switch lead {
            case 0xC2...0xDF: need = 2
            case 0xE0...0xEF: need = 3
            case 0xF0...0xF4: need = 4
            default: return n
            }
            if back >= need { return n }
            if back >= 2 {
                let second = b[i + 1]
                let ok: ClosedRange<UInt8>
                switch lead {
                case 0xE0: ok = 0xA0...0xBF
                case 0xED: ok = 0x80...0x9F
                case 0xF0: ok = 0x90...0xBF
                case 0xF4: ok = 0x80...0x8F
                default: ok = 0x80...0xBF
                }
                if !ok.contains(second) { return n }
            }
            return i
        }
        return n
    }
}

/// Python's `str.replace(pattern, replacement)` over a stream: holds back only a tail that
/// could still start a match (fewer than `pattern.count` characters).
struct StreamingReplace {
    let pattern: Scalars
    let replacement: Scalars
    var buffer: Scalars = []

    /// transformers' `clean_up_tokenization`, in its order.
    static let tokenizationCleanup: [StreamingReplace] = [
        (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
        (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
    ].map { StreamingReplace(pattern: Scalars($0.0), replacement: Scalars($0.1)) }

    mutating func feed(_ text: Scalars, final: Bool) -> Scalars {
        buffer += text
        var out: Scalars = []
        var i = 0
        while i + pattern.count <= buffer.count {
            if buffer[i] == pattern[0], buffer[i..<(i + pattern.count)].elementsEqual(pattern) {
                out += replacement
                i += pattern.count
            } else {
                out.append(buffer[i])
                i += 1
            }
        }
        // what is left is shorter than the pattern: keep only a tail that could start it
        while i < buffer.count && !(final ? false : pattern.starts(with: buffer[i...])) {
            out.append(buffer[i])
            i += 1
        }
        buffer.removeFirst(i)
        return out
    }
}
