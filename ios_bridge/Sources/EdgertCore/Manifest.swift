import Foundation

/// The names both halves agree on. The Python writer (`edgert.convert.coreml_writer`) emits
/// exactly these functions, inputs, outputs and states; `Manifest.validate()` checks that a
/// package says the same, and edgert's test suite checks this enum against a real export.
public enum IONames {
    public static let prefill = "prefill"
    public static let decode = "decode"
    public static let inputIDs = "input_ids"
    public static let position = "position"
    public static let causalMask = "causal_mask"
    public static let logits = "logits"
    public static let keyCache = "key_cache"
    public static let valueCache = "value_cache"
}

/// Where the converter stores its files inside a `.mlpackage`.
public enum PackageLayout {
    /// `<pkg>/Data/com.edgert/manifest.json`; tokenizer files lie in `tokenizer/` beside it.
    public static let itemFolder = ["Data", "com.edgert"]
    public static let manifestFile = "manifest.json"
    /// Key of the manifest JSON in the model's user-defined metadata (also in `.mlmodelc`).
    public static let metadataKey = "edgert.manifest"
    public static let format = "edgert-coreml"
    /// The newest manifest version this bridge reads (edgert.coreml_manifest.MANIFEST_VERSION).
    public static let formatVersion = 2
}

/// The manifest an edgert Core ML package carries (`format` "edgert-coreml").
///
/// Version 2 adds `chat_format`, `weights_sha256` and a `kind` per state; version 1 packages
/// decode too (no chat format: `ChatFormat` refuses them, raw generation works).
public struct Manifest: Decodable, Sendable {
    /// One input, output or state: its name, shape (-1: flexible) and dtype.
    public struct Tensor: Decodable, Sendable {
        public let name: String
        public let shape: [Int]
        public let dtype: String
        /// States only: `kv_cache` (positional, masked: a conversation can be rewound),
        /// `window` (a sliding window's last positions, shifted along: it cannot) or
        /// `recurrent` (carried forward: it cannot). Nil in version 1 (all `kv_cache`).
        /// A hybrid model (Qwen3.5) has both: `key_cache` / `value_cache` for its
        /// full-attention layers, `conv_state` / `delta_state` for its linear-attention ones.
        public let kind: String?
        /// States only: the bytes it takes (allocated once per `MLState`); nil before
        /// edgert wrote sizes (then `byteCount` counts them from the shape).
        public let bytes: Int?
        /// Inputs beyond `input_ids`, `position` and `causal_mask`: where their values come
        /// from (e.g. a per-layer embedding file read outside the program). Nil for those three.
        public let source: InputSource?

        /// Bytes of this tensor: `bytes` where the manifest gives it, else from the shape
        /// (float16 / int32 / float32 elements).
        public var byteCount: Int {
            if let bytes { return bytes }
            let element = dtype == "float16" ? 2 : 4
            return shape.reduce(element) { $0 * max($1, 1) }
        }
    }

    /// Where an extra input's values come from: `kind` names the rule, `path` a file relative
    /// to the manifest's folder. `embedding_rows` (Gemma 4's per-layer embeddings): the rows
    /// of `tensor` (`shape` rows x columns, quantized as `quantization` says, else float) for
    /// the chunk's `input_ids`, read from the memory-mapped file (`EmbeddingRows`).
    public struct InputSource: Decodable, Sendable {
        public let kind: String
        public let path: String?
        public let tensor: String?
        public let shape: [Int]?
        public let quantization: Quantization?
        /// The file's size in bytes, as written at export.
        public let bytes: Int?
    }

    /// MLX affine quantization of a table: w = scale * q + bias per group of `groupSize`.
    public struct Quantization: Decodable, Sendable, Equatable {
        public let bits: Int
        public let groupSize: Int
        public let mode: String?

        public init(bits: Int, groupSize: Int, mode: String? = "affine") {
            self.bits = bits
            self.groupSize = groupSize
            self.mode = mode
        }
    }

    /// One function of the package (`prefill`, `decode`).
    public struct Function: Decodable, Sendable {
        public let inputs: [Tensor]
        public let outputs: [Tensor]
        public let states: [Tensor]
        /// Prefill only: how many tokens one call takes.
        public let minLength: Int?
        public let maxLength: Int?
    }

    /// The additive attention mask: `visibleValue` where key j <= position + i, else
    /// `maskedValue` (finite, e.g. -1e4).
    public struct CausalMask: Decodable, Sendable {
        public let maskedValue: Float
        public let visibleValue: Float
    }

    public let format: String
    public let formatVersion: Int
    public let modelType: String
    public let target: String
    public let contextLength: Int
    public let vocabSize: Int
    public let numHiddenLayers: Int
    public let numKeyValueHeads: Int
    public let headDim: Int
    public let functions: [String: Function]
    public let defaultFunction: String
    public let causalMask: CausalMask
    public let bosTokenId: Int?
    public let eosTokenId: [Int]
    public let stopTokenIds: [Int]
    public let chatTemplate: String?
    /// The chat template reduced to role prefixes and suffixes at export (nil before v2).
    public let chatFormat: ChatFormat?
    /// Paths relative to the manifest's folder, e.g. `tokenizer/tokenizer.json`.
    public let tokenizerFiles: [String]
    /// SHA-256 of the package's weight file (hex), written at export (nil before v2).
    public let weightsSha256: String?

    /// Decode manifest JSON (snake_case keys) and validate it.
    public static func decode(from data: Data) throws -> Manifest {
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        let manifest: Manifest
        do {
            manifest = try decoder.decode(Manifest.self, from: data)
        } catch let error as DecodingError {
            throw EdgertError.manifest(Manifest.describe(error))
        }
        try manifest.validate()
        return manifest
    }

    /// Read `manifest.json` from a file.
    public static func load(contentsOf url: URL) throws -> Manifest {
        guard let data = FileManager.default.contents(atPath: url.path) else {
            throw EdgertError.missingFile(url.path)
        }
        return try decode(from: data)
    }

    /// The longest prompt chunk one `prefill` call takes.
    public var prefillMaxLength: Int {
        functions[IONames.prefill]?.maxLength ?? contextLength
    }

    /// The package's states (the same for both functions).
    public var states: [Tensor] {
        functions[IONames.decode]?.states ?? []
    }

    /// What one conversation's states take in memory (every state, KV and recurrent), so an
    /// app can budget memory before it loads the model.
    public var stateMemoryBytes: Int {
        states.reduce(0) { $0 + $1.byteCount }
    }

    /// True when every state is a positional KV cache: feeding tokens at an earlier position
    /// rewinds the conversation (the mask hides stale slots). Window and recurrent states
    /// cannot rewind.
    public var statesCanRewind: Bool {
        states.allSatisfy { ($0.kind ?? "kv_cache") == "kv_cache" }
    }

    /// The tokenizer file (`tokenizer.json`) among `tokenizerFiles`.
    public var tokenizerJSON: String? {
        tokenizerFiles.first { $0.hasSuffix("tokenizer.json") }
    }

    /// Check the format and that the package uses the names this bridge was written for.
    public func validate() throws {
        guard format == PackageLayout.format else {
            throw EdgertError.manifest("format \(format), expected \(PackageLayout.format)")
        }
        guard formatVersion <= PackageLayout.formatVersion else {
            throw EdgertError.manifest("format version \(formatVersion) is newer than this " +
                                       "bridge reads (\(PackageLayout.formatVersion))")
        }
        let core = [IONames.inputIDs, IONames.position, IONames.causalMask]
        for name in [IONames.prefill, IONames.decode] {
            guard let function = functions[name] else {
                throw EdgertError.manifest("no function \(name)")
            }
            let inputs = function.inputs.map(\.name)
            let outputs = function.outputs.map(\.name)
            guard Array(inputs.prefix(core.count)) == core, outputs == [IONames.logits] else {
                throw EdgertError.manifest("function \(name) has inputs \(inputs), " +
                                           "outputs \(outputs)")
            }
            if let extra = function.inputs.dropFirst(core.count).first(where: { $0.source == nil }) {
                throw EdgertError.manifest("function \(name): input \(extra.name) has no source")
            }
            guard !function.states.isEmpty else {
                throw EdgertError.manifest("function \(name) declares no states")
            }
            if let state = function.states.first(where: {
                !["kv_cache", "window", "recurrent"].contains($0.kind ?? "kv_cache")
            }) {
                throw EdgertError.manifest("state \(state.name) has unknown kind \(state.kind ?? "")")
            }
            if let state = function.states.first(where: { $0.dtype != "float16" }) {
                throw EdgertError.manifest("state \(state.name) has dtype \(state.dtype), " +
                                           "expected float16")
            }
        }
        guard functions[IONames.prefill]?.states.map(\.name) == states.map(\.name) else {
            throw EdgertError.manifest("prefill and decode declare different states")
        }
        guard contextLength > 0, prefillMaxLength > 0, vocabSize > 0 else {
            throw EdgertError.manifest("context \(contextLength), prefill length " +
                                       "\(prefillMaxLength), vocabulary \(vocabSize)")
        }
    }

    static func describe(_ error: DecodingError) -> String {
        func path(_ context: DecodingError.Context) -> String {
            context.codingPath.map(\.stringValue).joined(separator: ".")
        }
        switch error {
        case .keyNotFound(let key, let context):
            let at = path(context)
            return "no field \(key.stringValue)" + (at.isEmpty ? "" : " in \(at)")
        case .typeMismatch(_, let context), .valueNotFound(_, let context):
            return "\(path(context)): \(context.debugDescription)"
        case .dataCorrupted(let context):
            return "invalid JSON: \(context.debugDescription)"
        @unknown default:
            return "\(error)"
        }
    }
}
