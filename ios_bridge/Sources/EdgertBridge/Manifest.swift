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
    public static let formatVersion = 1
}

/// The manifest an edgert Core ML package carries (`format` "edgert-coreml", version 1).
public struct Manifest: Decodable, Sendable {
    /// One input, output or state: its name, shape (-1: flexible) and dtype.
    public struct Tensor: Decodable, Sendable {
        public let name: String
        public let shape: [Int]
        public let dtype: String
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
    /// Paths relative to the manifest's folder, e.g. `tokenizer/tokenizer.json`.
    public let tokenizerFiles: [String]

    /// Decode manifest JSON (snake_case keys).
    public static func decode(from data: Data) throws -> Manifest {
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        let manifest = try decoder.decode(Manifest.self, from: data)
        try manifest.validate()
        return manifest
    }

    /// The longest prompt chunk one `prefill` call takes.
    public var prefillMaxLength: Int {
        functions[IONames.prefill]?.maxLength ?? contextLength
    }

    /// Check the format and that the package uses the names this bridge was written for.
    public func validate() throws {
        guard format == PackageLayout.format else {
            throw EdgertError.manifest("format \(format), expected \(PackageLayout.format)")
        }
        guard formatVersion <= PackageLayout.formatVersion else {
            throw EdgertError.manifest("format version \(formatVersion) is newer than this bridge")
        }
        for name in [IONames.prefill, IONames.decode] {
            guard let function = functions[name] else {
                throw EdgertError.manifest("no function \(name)")
            }
            let inputs = function.inputs.map { $0.name }
            let outputs = function.outputs.map { $0.name }
            let states = function.states.map { $0.name }
            guard inputs == [IONames.inputIDs, IONames.position, IONames.causalMask],
                  outputs == [IONames.logits],
                  states == [IONames.keyCache, IONames.valueCache] else {
                throw EdgertError.manifest("function \(name) has inputs \(inputs), " +
                                           "outputs \(outputs), states \(states)")
            }
        }
    }
}

/// Errors of the bridge, each with a one-line description.
public enum EdgertError: Error, CustomStringConvertible {
    case manifest(String)
    case missingFile(URL)
    case contextFull(needed: Int, context: Int)
    case prediction(String)

    public var description: String {
        switch self {
        case .manifest(let why):
            return "edgert manifest: \(why)"
        case .missingFile(let url):
            return "missing file: \(url.path)"
        case .contextFull(let needed, let context):
            return "\(needed) tokens do not fit the package's context of \(context)"
        case .prediction(let why):
            return "prediction failed: \(why)"
        }
    }
}
