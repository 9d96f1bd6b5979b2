import Foundation

/// Text <-> token ids. `BPETokenizer` implements it from the package's `tokenizer.json`; an
/// app may plug in another library's tokenizer instead.
public protocol Tokenizer: Sendable {
    /// Token ids for `text`. Special tokens written in the text become their ids; with
    /// `addSpecialTokens` BOS goes in front where the tokenizer asks for it.
    func encode(_ text: String, addSpecialTokens: Bool) -> [Int]
    /// The text of `tokens` (a full decode).
    func decode(_ tokens: [Int], skipSpecialTokens: Bool) -> String
    /// A streaming detokenizer whose pieces concatenate to `decode` of the same tokens.
    func makeDetokenizer(skipSpecialTokens: Bool) -> any Detokenizer
}

extension Tokenizer {
    public func encode(_ text: String) -> [Int] {
        encode(text, addSpecialTokens: true)
    }

    public func decode(_ tokens: [Int]) -> String {
        decode(tokens, skipSpecialTokens: false)
    }
}

/// A token added on top of the BPE vocabulary (`added_tokens`): matched whole in the text
/// before normalization.
struct AddedToken: Sendable {
    let id: Int
    let content: Scalars
    let special: Bool
    let lstrip: Bool
    let rstrip: Bool
}

/// The tokenizer of an edgert package: HF `tokenizer.json` (byte-level BPE, and
/// SentencePiece-style BPE with byte fallback as edgert rebuilds SentencePiece vocabularies),
/// plus `tokenizer_config.json` for BOS and cleanup settings. Encodes and decodes as HF
/// tokenizers does, and as edgert's Python tokenizer (edgert.tokenizer) wraps it.
public final class BPETokenizer: Tokenizer {
    let model: BPEModel
    let normalizer: Normalizer?
    let preTokenizer: PreTokenizer?
    let decoder: DecoderPlan
    let added: [AddedToken]
    let addedById: [Int: AddedToken]
    /// Added tokens by their first scalar, longest first (leftmost-longest matching).
    let addedByFirst: [Unicode.Scalar: [AddedToken]]
    /// The post-processor's tokens around the text (TemplateProcessing `single`).
    let templatePrefix: [Int]
    let templateSuffix: [Int]
    /// The BOS token's text and id (tokenizer_config.json `bos_token`).
    public let bosToken: String?
    public let bosTokenId: Int?
    /// tokenizer_config.json `add_bos_token`, and a BOS token exists.
    public let addBosToken: Bool
    /// transformers' " ." -> "." cleanup after decoding. As transformers 5 does for BPE
    /// tokenizers, only where tokenizer_config.json asks for it with both
    /// `clean_up_tokenization_spaces` and
    /// `clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output`.
    public let cleanUpTokenizationSpaces: Bool

    /// Read `tokenizer.json` and, when given, `tokenizer_config.json`.
    public convenience init(tokenizerJSON: URL, config: URL? = nil) throws {
        guard let data = FileManager.default.contents(atPath: tokenizerJSON.path) else {
            throw EdgertError.missingFile(tokenizerJSON.path)
        }
        var configData: Data? = nil
        if let config, FileManager.default.fileExists(atPath: config.path) {
            configData = FileManager.default.contents(atPath: config.path)
        }
        try self.init(tokenizerData: data, configData: configData)
    }

    /// The tokenizer files in `folder` (`tokenizer.json`, optional `tokenizer_config.json`).
    public convenience init(folder: URL) throws {
        try self.init(tokenizerJSON: folder.appendingPathComponent("tokenizer.json"),
                      config: folder.appendingPathComponent("tokenizer_config.json"))
    }

    public init(tokenizerData: Data, configData: Data? = nil) throws {
        let json = try JSON.parse(tokenizerData)
        let config = try configData.map(JSON.parse) ?? .object([])
        guard let modelJSON = json["model"] else {
            throw EdgertError.tokenizer("tokenizer.json has no model")
        }
        model = try BPEModel(modelJSON)
        normalizer = try Normalizer.from(json["normalizer"])
        preTokenizer = try PreTokenizer.from(json["pre_tokenizer"])
        decoder = try DecoderPlan.from(json["decoder"])

        var added: [AddedToken] = []
        for t in json["added_tokens"]?.array ?? [] {
            guard let id = t["id"]?.int, let content = t["content"]?.string else { continue }
            added.append(AddedToken(id: id, content: Scalars(content),
                                    special: t["special"]?.bool ?? false,
                                    lstrip: t["lstrip"]?.bool ?? false,
                                    rstrip: t["rstrip"]?.bool ?? false))
        }
        self.added = added
        addedById = Dictionary(added.map { ($0.id, $0) }, uniquingKeysWith: { a, _ in a })
        var byFirst: [Unicode.Scalar: [AddedToken]] = [:]
        for t in added where !t.content.isEmpty {
            byFirst[t.content[0], default: []].append(t)
        }
        addedByFirst = byFirst.mapValues { $0.sorted { $0.content.count > $1.content.count } }

        (templatePrefix, templateSuffix) = try BPETokenizer.template(json["post_processor"])

        func tokenName(_ v: JSON?) -> String? {
            v?.string ?? v?["content"]?.string
        }
        let vocab = model.vocab
        let addedIds = Dictionary(added.map { (ExactString($0.content.string), $0.id) },
                                  uniquingKeysWith: { a, _ in a })
        func id(of token: String) -> Int? {
            addedIds[ExactString(token)] ?? vocab[ExactString(token)]
        }
        bosToken = tokenName(config["bos_token"])
        bosTokenId = bosToken.flatMap(id(of:))
        addBosToken = (config["add_bos_token"]?.bool ?? false) && bosTokenId != nil
        cleanUpTokenizationSpaces = (config["clean_up_tokenization_spaces"]?.bool ?? false)
            && (config["clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"]?
                .bool ?? false)
    }

    static func template(_ json: JSON?) throws -> ([Int], [Int]) {
        guard let json, !json.isNull else { return ([], []) }
        switch json["type"]?.string {
        case "TemplateProcessing":
            var prefix: [Int] = [], suffix: [Int] = []
            var seenSequence = false
            for item in json["single"]?.array ?? [] {
                if item["Sequence"] != nil {
                    seenSequence = true
                } else if let name = item["SpecialToken"]?["id"]?.string {
                    let ids = (json["special_tokens"]?[name]?["ids"]?.array ?? []).compactMap(\.int)
                    if seenSequence { suffix += ids } else { prefix += ids }
                }
            }
            return (prefix, suffix)
        case "ByteLevel":
            return ([], [])
        case "Sequence":
            var prefix: [Int] = [], suffix: [Int] = []
            for p in json["processors"]?.array ?? [] {
                let (a, b) = try template(p)
                prefix = a + prefix
                suffix += b
            }
            return (prefix, suffix)
        case let other:
            throw EdgertError.tokenizer("post-processor \(other ?? "?") is not supported")
        }
    }

    /// The vocabulary size, added tokens included (the largest id + 1).
    public var vocabularySize: Int {
        max(model.idToToken.keys.max() ?? -1, added.map(\.id).max() ?? -1) + 1
    }

    /// The id of a token's text (added tokens first), if it has one.
    public func tokenID(_ token: String) -> Int? {
        added.first { $0.content.string.utf8.elementsEqual(token.utf8) }?.id
            ?? model.vocab[ExactString(token)]
    }

    /// The text of a token id as the vocabulary writes it (e.g. "Ġthe", "▁the").
    public func token(_ id: Int) -> String? {
        addedById[id]?.content.string ?? model.idToToken[id]
    }

    // MARK: - Encoding

    public func encode(_ text: String, addSpecialTokens: Bool) -> [Int] {
        encode(text, addSpecialTokens: addSpecialTokens, parseSpecialTokens: true)
    }

    /// `parseSpecialTokens: false` reads special tokens written in the text as plain text
    /// (llama.cpp's `parse_special = false`, HF's `encode_special_tokens`).
    public func encode(_ text: String, addSpecialTokens: Bool, parseSpecialTokens: Bool) -> [Int] {
        var addSpecial = addSpecialTokens
        if addSpecial, let bos = bosToken, !bos.isEmpty,
           text.utf8.starts(with: bos.utf8)
        {
            addSpecial = false  // a chat template often writes BOS itself: not twice
        }
        var ids: [Int] = []
        var atStart = true
        for segment in splitOnAdded(Scalars(text), parseSpecial: parseSpecialTokens) {
            switch segment {
            case .added(let id):
                ids.append(id)
            case .text(let run):
                let normalized = normalizer?.apply(run) ?? run
                let pieces = preTokenizer?.apply([normalized], atStart: atStart) ?? [normalized]
                for piece in pieces where !piece.isEmpty {
                    ids += model.tokenize(piece)
                }
            }
            atStart = false
        }
        if addSpecial {
            ids = templatePrefix + ids + templateSuffix
            if addBosToken, let bos = bosTokenId, ids.first != bos {
                ids.insert(bos, at: 0)
            }
        }
        return ids
    }

    enum Segment {
        case text(Scalars)
        case added(Int)
    }

    /// The text cut at added tokens (leftmost, then longest match), as HF does first.
    func splitOnAdded(_ text: Scalars, parseSpecial: Bool) -> [Segment] {
        var segments: [Segment] = []
        var run: Scalars = []
        var i = 0
        func flush() {
            if !run.isEmpty { segments.append(.text(run)) }
            run = []
        }
        while i < text.count {
            let found = addedByFirst[text[i]]?.first { t in
                (parseSpecial || !t.special) && i + t.content.count <= text.count
                    && text[i..<(i + t.content.count)].elementsEqual(t.content)
            }
            guard let token = found else {
                run.append(text[i])
                i += 1
                continue
            }
            if token.lstrip {
                while let last = run.last, last.properties.isWhitespace { run.removeLast() }
            }
            flush()
            segments.append(.added(token.id))
            i += token.content.count
            if token.rstrip {
                while i < text.count, text[i].properties.isWhitespace { i += 1 }
            }
        }
        flush()
        return segments
    }

    // MARK: - Decoding

    public func decode(_ tokens: [Int], skipSpecialTokens: Bool) -> String {
        var detokenizer = makeDetokenizer(skipSpecialTokens: skipSpecialTokens)
        var text = ""
        for t in tokens { text += detokenizer.add(t) }
        return text + detokenizer.finish()
    }

    public func makeDetokenizer(skipSpecialTokens: Bool) -> any Detokenizer {
        StreamingDetokenizer(plan: decoder, cleanUp: cleanUpTokenizationSpaces) { [self] id in
            if let t = addedById[id] {
                return skipSpecialTokens && t.special ? nil : t.content.string
            }
            return model.idToToken[id]
        }
    }
}
