#if canImport(CoreML)
import CoreML
import Foundation

/// An edgert Core ML package as a `LanguageModel`: its `prefill` and `decode` functions (one
/// MLModel each, sharing the weights) and one `MLState` holding every state the manifest
/// declares (the KV cache; window and recurrent states where a package has them). Inputs with
/// an `embedding_rows` source (Gemma 4's per-layer embeddings) are read from the package's
/// memory-mapped file for each call's tokens (`EmbeddingRows`).
public actor CoreMLLanguageModel: LanguageModel {
    public nonisolated let info: ModelInfo
    public nonisolated let manifest: Manifest
    private let prefillModel: MLModel
    private let decodeModel: MLModel
    private var state: MLState
    private let tables: [(name: String, rows: EmbeddingRows)]

    init(manifest: Manifest, prefill: MLModel, decode: MLModel,
         tables: [(name: String, rows: EmbeddingRows)] = []) {
        self.manifest = manifest
        self.tables = tables
        info = ModelInfo(contextLength: manifest.contextLength, vocabularySize: manifest.vocabSize,
                         maxChunkLength: manifest.prefillMaxLength,
                         canRewind: manifest.statesCanRewind)
        prefillModel = prefill
        decodeModel = decode
        state = decode.makeState()
    }

    /// Load the functions of a compiled model (`.mlmodelc`, e.g. from `CompiledModelCache`);
    /// `files` is the package's manifest folder, where input tables (`EmbeddingRows`) live.
    public static func load(compiledModelAt url: URL, manifest: Manifest, files: URL? = nil,
                            computeUnits: MLComputeUnits = .all) async throws -> CoreMLLanguageModel
    {
        var tables: [(name: String, rows: EmbeddingRows)] = []
        for input in manifest.functions[IONames.decode]?.inputs ?? [] {
            guard let source = input.source else { continue }
            guard let files else {
                throw EdgertError.manifest("input \(input.name) reads \(source.path ?? "a file"), " +
                                           "but no package folder was given")
            }
            tables.append((input.name, try EmbeddingRows(source: source, folder: files)))
        }
        let prefill = try await loadFunction(IONames.prefill, url, computeUnits)
        let decode = try await loadFunction(IONames.decode, url, computeUnits)
        return CoreMLLanguageModel(manifest: manifest, prefill: prefill, decode: decode,
                                   tables: tables)
    }

    static func loadFunction(_ name: String, _ url: URL, _ computeUnits: MLComputeUnits)
        async throws -> MLModel
    {
        let configuration = MLModelConfiguration()
        configuration.computeUnits = computeUnits
        configuration.functionName = name
        return try await MLModel.load(contentsOf: url, configuration: configuration)
    }

    public func resetState() {
        state = decodeModel.makeState()
    }

    /// One token runs `decode`; more run `prefill` (at most `manifest.prefillMaxLength`).
    public func logits(for tokens: [Int], at position: Int) throws -> [Float] {
        let count = tokens.count
        guard count >= 1, count <= manifest.prefillMaxLength else {
            throw EdgertError.prediction("\(count) tokens in one call (1...\(manifest.prefillMaxLength))")
        }
        guard position + count <= manifest.contextLength else {
            throw EdgertError.contextFull(needed: position + count, context: manifest.contextLength)
        }
        var features: [String: MLFeatureValue] = [
            IONames.inputIDs: MLFeatureValue(multiArray: try Self.inputIDs(tokens)),
            IONames.position: MLFeatureValue(multiArray: try Self.position(position)),
            IONames.causalMask: MLFeatureValue(multiArray: try causalMask(position, count)),
        ]
        for table in tables {
            features[table.name] = MLFeatureValue(multiArray: try Self.rows(table.rows, tokens))
        }
        let inputs = try MLDictionaryFeatureProvider(dictionary: features)
        let function = count == 1 ? decodeModel : prefillModel
        let output = try function.prediction(from: inputs, using: state)
        guard let logits = output.featureValue(for: IONames.logits)?.multiArrayValue else {
            throw EdgertError.prediction("no \(IONames.logits) output")
        }
        return Self.lastRow(logits)
    }

    // MARK: - Inputs and outputs

    /// input_ids (1, L) int32.
    static func inputIDs(_ tokens: [Int]) throws -> MLMultiArray {
        let array = try MLMultiArray(shape: [1, NSNumber(value: tokens.count)], dataType: .int32)
        array.withUnsafeMutableBufferPointer(ofType: Int32.self) { buffer, strides in
            for (i, token) in tokens.enumerated() {
                buffer[i * strides[1]] = Int32(token)
            }
        }
        return array
    }

    /// position (1,) int32: the cache slot of the first token.
    static func position(_ position: Int) throws -> MLMultiArray {
        let array = try MLMultiArray(shape: [1], dataType: .int32)
        array.withUnsafeMutableBufferPointer(ofType: Int32.self) { buffer, _ in
            buffer[0] = Int32(position)
        }
        return array
    }

    /// causal_mask (1, 1, L, context) fp16: row i sees keys j <= position + i.
    func causalMask(_ position: Int, _ count: Int) throws -> MLMultiArray {
        let context = manifest.contextLength
        let shape = [1, 1, count, context].map { NSNumber(value: $0) }
        let array = try MLMultiArray(shape: shape, dataType: .float16)
        let visible = HalfFloat.bits(manifest.causalMask.visibleValue)
        let masked = HalfFloat.bits(manifest.causalMask.maskedValue)
        array.withUnsafeMutableBytes { raw, strides in
            let halves = raw.bindMemory(to: UInt16.self)
            for i in 0..<count {
                for j in 0..<context {
                    halves[i * strides[2] + j * strides[3]] = j <= position + i ? visible : masked
                }
            }
        }
        return array
    }

    /// A table's rows for `tokens`: (1, L, columns) fp16.
    static func rows(_ table: EmbeddingRows, _ tokens: [Int]) throws -> MLMultiArray {
        let halves = try table.halfRows(tokens)
        let shape = [1, tokens.count, table.columns].map { NSNumber(value: $0) }
        let array = try MLMultiArray(shape: shape, dataType: .float16)
        array.withUnsafeMutableBytes { raw, strides in
            let out = raw.bindMemory(to: UInt16.self)
            for i in 0..<tokens.count {
                for j in 0..<table.columns {
                    out[i * strides[1] + j * strides[2]] = halves[i * table.columns + j]
                }
            }
        }
        return array
    }

    /// The logits (1, 1, vocab) float32 as an array.
    static func lastRow(_ logits: MLMultiArray) -> [Float] {
        let n = logits.shape[logits.shape.count - 1].intValue
        let stride = logits.strides[logits.strides.count - 1].intValue
        return logits.withUnsafeBufferPointer(ofType: Float.self) { buffer in
            (0..<n).map { buffer[$0 * stride] }
        }
    }
}

/// An edgert package loaded for chat: the model, its tokenizer and its manifest.
///
/// ```swift
/// let package = try await EdgertPackage.load(Bundle.main.url(forResource: "SmolLM2",
///                                                            withExtension: "mlpackage")!)
/// let session = package.makeChatSession()
/// for try await event in session.respond(to: "Hello!") { ... }
/// ```
public struct EdgertPackage: Sendable {
    public let files: PackageFiles
    public let model: CoreMLLanguageModel
    public let tokenizer: BPETokenizer

    public var manifest: Manifest { files.manifest }

    /// Load a `.mlpackage`: its manifest and tokenizer, and its compiled model from `cache`
    /// (compiled on first use). `computeUnits` as in `MLModelConfiguration`.
    public static func load(_ url: URL, computeUnits: MLComputeUnits = .all,
                            cache: CompiledModelCache = .default) async throws -> EdgertPackage
    {
        let files = try PackageFiles(package: url)
        let compiled = try await cache.compiledModel(for: files)
        let model = try await CoreMLLanguageModel.load(compiledModelAt: compiled,
                                                       manifest: files.manifest,
                                                       files: files.folder,
                                                       computeUnits: computeUnits)
        return EdgertPackage(files: files, model: model, tokenizer: try files.tokenizer())
    }

    /// A conversation with the package's chat format and stop tokens.
    public func makeChatSession(systemPrompt: String? = nil) -> ChatSession {
        ChatSession(model: model, tokenizer: tokenizer, format: manifest.chatFormat,
                    stopTokens: Set(manifest.stopTokenIds), systemPrompt: systemPrompt)
    }
}
#endif
